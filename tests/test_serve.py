"""`lorafit serve`: a real server process on a free local port, answered through the official `openai` client:
models, completions, chat, streaming, usage, seeds, mixed-adapter batches equal to serial answers, run-time adapter
loading, OpenAI-style 4xx errors after which the server keeps serving, and a busy port refused; continuous batching
(a short request behind a long one finishes first), merged_adapters equal to the merged adapter, answers unchanged
under adapter swapping (--max-loras 1), 429 under a full queue, a disconnect freeing its row, /health and /metrics,
--adapter-root and an exposed server without a key refused."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from rundirs import make_run

from lorafit.cli import main

openai = pytest.importorskip("openai")  # the dev extra; `make install` has it

KEY = "test-key"
PROMPTS = ["Reverse the word: stone", "def add(a, b):", "hello, how are you?", "Count to five:"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(port: int, proc, timeout: float = 120.0) -> None:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
        try:
            urllib.request.urlopen(request, timeout=2).read()
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.3)
    raise RuntimeError("server did not start")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, tiny_tokenizer):
    tmp = tmp_path_factory.mktemp("serve")
    made = {}
    for i, name in enumerate(["a", "b", "c"]):
        torch.manual_seed(10 + i)
        made[name] = make_run(tmp, tiny_model_dir, tiny_tokenizer, name=name, fmt="chat", dora=name == "c")
    return made


@contextlib.contextmanager
def _serving(args: list[str]):
    """A `lorafit serve` process on a free port for the block: yields (port, client); stopped by its pid after."""
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lorafit", "serve", *args, "--port", str(port), "--api-key", KEY]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_ready(port, proc)
        yield port, openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def _three_adapters(runs, merged) -> list[str]:
    """Run a's adapter as the default, b's, and the a+b composition."""
    return [str(runs["a"]), "--adapter", f"b={runs['b']}", "--adapter", f"ab={merged}"]


@pytest.fixture(scope="module")
def server(runs, merged, tmp_path_factory):
    root = tmp_path_factory.getbasetemp()  # every test's folders, not the rest of the disk
    with _serving([*_three_adapters(runs, merged), "--batch-wait-ms", "300", "--adapter-root", str(root)]) as s:
        yield s


@pytest.fixture(scope="module")
def small_server(runs, merged):
    """One slot, two adapters in the model at a time (of three), two requests may wait."""
    with _serving([*_three_adapters(runs, merged), "--max-batch", "1", "--max-loras", "2", "--max-queue", "2",
                   "--batch-wait-ms", "0"]) as s:
        yield s


@pytest.fixture(scope="module")
def merged(runs, tmp_path_factory):
    """`lorafit merge a b --weights 0.6,0.5 --as-adapter`: one LoRA adapter holding both updates."""
    out = tmp_path_factory.mktemp("merged") / "ab"
    assert main_exit("merge", str(runs["a"]), str(runs["b"]), "--weights", "0.6,0.5", "--as-adapter", "--out",
                     str(out)) == 0
    return out


def main_exit(*args: str) -> int:
    with pytest.raises(SystemExit) as info:
        main(list(args))
    return info.value.code


def _complete(client, model, prompt, **kwargs):
    settings = {"max_tokens": 8, "temperature": 0, **kwargs}
    return client.completions.create(model=model, prompt=prompt, **settings)


def test_models_lists_the_base_and_every_adapter(server, tiny_model_dir):
    _, client = server
    ids = [m.id for m in client.models.list().data]
    assert ids == [str(tiny_model_dir), "a", "b", "ab"]


def test_mixed_concurrent_requests_share_a_batch_and_equal_serial_answers(server, tiny_model_dir, tiny_tokenizer):
    _, client = server
    jobs = [(model, prompt) for prompt in PROMPTS[:3] for model in ("a", "b", str(tiny_model_dir))][:8]
    serial = [_complete(client, m, p) for m, p in jobs]
    assert all(r.model_extra["lorafit"]["batch_rows"] == 1 for r in serial)
    with ThreadPoolExecutor(len(jobs)) as pool:
        concurrent = list(pool.map(lambda job: _complete(client, *job), jobs))
    assert [r.choices[0].text for r in concurrent] == [r.choices[0].text for r in serial]
    assert max(r.model_extra["lorafit"]["batch_rows"] for r in concurrent) >= 4  # requests shared forward passes
    by_model = {m: r.choices[0].text for (m, p), r in zip(jobs, serial, strict=True) if p == PROMPTS[0]}
    assert len(set(by_model.values())) == 3  # three adapters (base included), three different answers
    first = serial[0]
    assert first.usage.prompt_tokens == len(tiny_tokenizer(jobs[0][1])["input_ids"])  # BOS added, as transformers
    lengths = [r.usage.completion_tokens for r in serial if r.choices[0].finish_reason == "length"]
    assert lengths and set(lengths) == {8}  # max_tokens reached: exactly 8 new tokens
    assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens


def test_completion_matches_lorafit_generate_on_the_same_adapter(server, runs):
    from lorafit.generate import Sampling, decode
    from lorafit.sources import load_inference_model, load_source_tokenizer, resolve_source, stop_token_ids

    _, client = server
    src = resolve_source(runs["b"])
    tokenizer = load_source_tokenizer(src)
    expected = decode(load_inference_model(src), tokenizer, [tokenizer(PROMPTS[1])["input_ids"]],
                      [Sampling(max_new_tokens=8)], stop_token_ids(tokenizer, src))[0]
    assert _complete(client, "b", PROMPTS[1]).choices[0].text == expected.text


def test_chat_stream_equals_the_whole_reply_and_seeds_repeat(server):
    _, client = server
    messages = [{"role": "user", "content": "Reverse the word: stone"}]
    whole = client.chat.completions.create(model="a", messages=messages, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model="a", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and whole.choices[0].message.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    sampled = [_complete(client, "a", PROMPTS[0], temperature=1.5, top_p=0.9, seed=s, max_tokens=12).choices[0].text
               for s in (7, 7, 8)]
    assert sampled[0] == sampled[1] != sampled[2]
    cut = _complete(client, "b", PROMPTS[0], max_tokens=12)
    stop = cut.choices[0].text[3:5]
    stopped = _complete(client, "b", PROMPTS[0], max_tokens=12, stop=[stop])
    assert stopped.choices[0].text == cut.choices[0].text[: cut.choices[0].text.find(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def test_adapters_load_and_unload_at_run_time(server, runs):
    port, client = server
    assert _post(port, "/v1/load_lora_adapter", {"lora_name": "c", "lora_path": str(runs["c"])})[0] == 200
    assert "c" in [m.id for m in client.models.list().data]
    assert _complete(client, "c", PROMPTS[0]).choices[0].text != _complete(client, "a", PROMPTS[0]).choices[0].text
    assert _post(port, "/v1/unload_lora_adapter", {"lora_name": "c"})[0] == 200
    with pytest.raises(openai.NotFoundError):
        _complete(client, "c", PROMPTS[0])


def _post(port: int, path: str, body, key: str | None = KEY) -> tuple[int, dict | str]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            text = response.read().decode()
            return response.status, text
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read().decode())


@pytest.mark.parametrize("case,status,needle", [
    ("unknown-model", 404, "does not exist"),
    ("malformed-json", 400, "not valid JSON"),
    ("too-long", 400, "maximum context length is 512"),
    ("not-an-adapter", 400, "lora_path"),
    ("bad-temperature", 400, "temperature"),
    ("no-key", 401, "API key"),
])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, tmp_path, case, status, needle):
    port, client = server
    path, body, key = "/v1/completions", {"model": "a", "prompt": "hi", "max_tokens": 4}, KEY
    if case == "unknown-model":
        body["model"] = "nope"
    elif case == "malformed-json":
        body = b'{"model": "a", "prompt": '
    elif case == "too-long":
        body["prompt"] = "stone " * 600
    elif case == "not-an-adapter":
        path, body = "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(tmp_path)}
    elif case == "bad-temperature":
        body["temperature"] = "hot"
    else:
        key = None
    code, answer = _post(port, path, body, key)
    assert code == status
    assert needle in answer["error"]["message"] and answer["error"]["code"] == status
    assert _complete(client, "a", "hello").choices[0].text is not None  # still serving


def test_busy_port_exits_2_before_loading(runs, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        with pytest.raises(SystemExit) as info:
            main(["serve", str(runs["a"]), "--port", str(port)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"--port {port}: already in use" in err and "Traceback" not in err


def test_a_short_request_behind_a_long_one_finishes_first(server):
    _, client = server
    finished = {}

    def send(name, tokens, delay):
        time.sleep(delay)
        _complete(client, "a", PROMPTS[0], max_tokens=tokens, extra_body={"ignore_eos": True})
        finished[name] = time.monotonic()

    with ThreadPoolExecutor(2) as pool:
        jobs = [pool.submit(send, "long", 400, 0.0), pool.submit(send, "short", 8, 0.3)]
        for job in jobs:
            job.result()
    assert finished["short"] < finished["long"]  # it joined the running batch and left when it ended


def test_merged_adapters_answer_as_the_merged_adapter_in_the_same_batch(small_server, tiny_model_dir):
    _, client = small_server
    composed = {"ids": ["a", "b"], "weights": [0.6, 0.5], "merge_strategy": "linear"}
    for prompt in PROMPTS[:3]:
        mixed = _complete(client, str(tiny_model_dir), prompt, max_tokens=10,
                          extra_body={"merged_adapters": composed})
        alone = _complete(client, "ab", prompt, max_tokens=10)
        assert mixed.choices[0].text == alone.choices[0].text
    assert mixed.model == str(tiny_model_dir)


def test_answers_do_not_change_when_adapters_swap_in_and_out(server, small_server):
    _, full = server
    port, small = small_server
    jobs = [("ab", PROMPTS[0]), ("a", PROMPTS[1]), ("b", PROMPTS[2]), ("ab", PROMPTS[0]), ("a", PROMPTS[3])]
    expected = [_complete(full, m, p).choices[0].text for m, p in jobs]
    before = _metric(port, "lorafit_adapter_swaps_total")
    assert [_complete(small, m, p).choices[0].text for m, p in jobs] == expected
    assert _metric(port, "lorafit_adapter_swaps_total") - before >= 3  # 3 adapters, 2 places: each turn swaps


def _metric(port: int, name: str, labels: str = "") -> float:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {KEY}"})
    text = urllib.request.urlopen(request, timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(f"{name}{labels} ") :
            return float(line.split()[-1])
    raise AssertionError(f"{name}{labels} not in /metrics:\n{text}")


def test_a_full_queue_gets_429_with_retry_after_and_the_server_goes_on(small_server):
    port, client = small_server
    long = {"max_tokens": 480, "extra_body": {"ignore_eos": True}}
    with ThreadPoolExecutor(3) as pool:
        running = [pool.submit(_complete, client, "a", PROMPTS[0], **long)]
        _wait_for(port, running=1)
        waiting = [pool.submit(_complete, client, "a", PROMPTS[1], **long) for _ in range(2)]
        _wait_for(port, running=1, waiting=2)
        with pytest.raises(openai.RateLimitError) as info:
            _complete(client, "a", PROMPTS[2])
        for job in running + waiting:
            assert job.result().usage.completion_tokens == 480
    assert info.value.response.headers["retry-after"] == "1"
    assert info.value.body["code"] == 429 and "--max-queue 2" in info.value.body["message"]
    assert _metric(port, "lorafit_requests_total", '{status="429"}') >= 1
    assert _complete(client, "a", PROMPTS[2]).choices[0].text is not None


def _wait_for(port: int, timeout: float = 60.0, **expected) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10).read())
        if all(health[k] == v for k, v in expected.items()):
            return health
        time.sleep(0.02)
    raise AssertionError(f"/health never showed {expected}: {health}")


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_frees_its_row(small_server, stream):
    port, client = small_server
    steps = _metric(port, "lorafit_engine_steps")
    body = {"model": "a", "prompt": PROMPTS[0], "max_tokens": 400, "ignore_eos": True, "stream": stream}
    with socket.create_connection(("127.0.0.1", port)) as raw:
        data = json.dumps(body).encode()
        raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
        _wait_for(port, running=1)
    _wait_for(port, running=0, waiting=0)
    reply = _complete(client, "a", PROMPTS[1], max_tokens=4)
    assert reply.usage.completion_tokens == 4
    assert _metric(port, "lorafit_engine_steps") - steps < 400  # the 400-token answer was not decoded to its end


def test_health_metrics_and_the_access_log(server):
    port, client = server
    _complete(client, "a", PROMPTS[0])
    assert json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10).read())["status"] == "ok"
    assert _metric(port, "lorafit_requests_total", '{status="200"}') >= 1
    assert _metric(port, "lorafit_time_to_first_token_seconds_count") >= 1
    assert _metric(port, "lorafit_generation_tokens_total") >= 8
    assert _metric(port, "lorafit_requests_running") == 0


@pytest.mark.parametrize("case,status,needle", [
    ("unknown-id", 404, "`nope` does not exist"),
    ("weights", 400, "expected 2 numbers"),
    ("strategy", 400, "'ties' is not supported"),
    ("model-not-base", 400, "must be the base's id"),
    ("not-lora", 400, "not a plain LoRA adapter"),
])
def test_bad_merged_adapters_get_openai_errors(server, runs, tiny_model_dir, case, status, needle):
    port, client = server
    spec = {"ids": ["a", "b"], "weights": [0.5, 0.5], "merge_strategy": "linear"}
    model = str(tiny_model_dir)
    if case == "unknown-id":
        spec["ids"] = ["a", "nope"]
    elif case == "weights":
        spec["weights"] = [1.0]
    elif case == "strategy":
        spec["merge_strategy"] = "ties"
    elif case == "model-not-base":
        model = "a"
    else:
        assert _post(port, "/v1/load_lora_adapter", {"lora_name": "c2", "lora_path": str(runs["c"])})[0] == 200
        spec["ids"] = ["a", "c2"]
    code, answer = _post(port, "/v1/completions", {"model": model, "prompt": "hi", "max_tokens": 4,
                                                   "merged_adapters": spec})
    if case == "not-lora":
        _post(port, "/v1/unload_lora_adapter", {"lora_name": "c2"})
    assert code == status and needle in answer["error"]["message"]
    assert _complete(client, "a", "hello").choices[0].text is not None


def test_loading_outside_the_adapter_root_is_403_whether_or_not_it_exists(server, runs):
    port, _ = server
    escape = runs["a"].parent / ".." / ".." / ".." / "etc"  # climbs out of the root
    answers = [_post(port, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(path)})
               for path in ("/etc", "/nonexistent/lorafit-adapter", escape)]
    assert {code for code, _ in answers} == {403}
    assert len({a["error"]["message"] for _, a in answers}) == 1  # the same words: nothing about existence


@pytest.mark.parametrize("args,needle", [
    (["--host", "0.0.0.0"], "--api-key KEY"),
    (["--max-loras", "0"], "--max-loras"),
    (["--max-queue", "0"], "--max-queue"),
])
def test_unsafe_or_empty_limits_exit_2_before_loading(runs, args, needle, capsys):
    assert main_exit("serve", str(runs["a"]), "--port", str(_free_port()), *args) == 2
    captured = capsys.readouterr()
    assert needle in captured.err + captured.out and "Traceback" not in captured.err
