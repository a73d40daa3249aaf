"""`lorafit serve`: a real server process on a free local port, answered through the official `openai` client:
models, completions, chat, streaming, usage, seeds, mixed-adapter batches equal to serial answers, run-time adapter
loading, OpenAI-style 4xx errors after which the server keeps serving, and a busy port refused."""

from __future__ import annotations

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


@pytest.fixture(scope="module")
def server(runs, tmp_path_factory):
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lorafit", "serve", str(runs["a"]), "--adapter", f"b={runs['b']}", "--port",
           str(port), "--api-key", KEY, "--batch-wait-ms", "300"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_ready(port, proc)
        yield port, openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)
    finally:
        os.kill(proc.pid, signal.SIGTERM)  # stopped by its pid
        proc.wait(timeout=30)


def _complete(client, model, prompt, **kwargs):
    settings = {"max_tokens": 8, "temperature": 0, **kwargs}
    return client.completions.create(model=model, prompt=prompt, **settings)


def test_models_lists_the_base_and_every_adapter(server, tiny_model_dir):
    _, client = server
    ids = [m.id for m in client.models.list().data]
    assert ids == [str(tiny_model_dir), "a", "b"]


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
