"""`lorafit serve` under load on the CPU, against today's static batching and vLLM's CPU build in the same run.

    .venv/bin/python scripts/bench_serve.py --quick                       # tiny scale, ~1 min: checks the script
    .venv/bin/python scripts/bench_serve.py                               # 25M Llama, 4 adapters, c = 1 / 8 / 32
    .venv/bin/python scripts/bench_serve.py --vllm-venv /work/venvs/vllm --static-ref c77620b \\
        --aiperf /work/venvs/aiperf/bin/aiperf --json bench.json

A random-weight Llama (hidden 512, 6 layers by default) is saved with a BPE tokenizer (Metaspace) trained here, and 4
LoRA adapters (r=16, alpha=32 on every linear layer, random nonzero B) in PEFT's format. Each server gets the same
load: `--requests` greedy completions per concurrency level, round-robin over the adapters, mixed prompt lengths
(a short and a long prompt family) and mixed output lengths (`ignore_eos`, so every server writes exactly as many
tokens), sent by `--concurrency` client threads streaming through the `openai` client. Reported per server and level:
output tokens / wall second, mean time to first token (TTFT), mean time per output token after the first (TPOT),
mean and p90 request latency, and the ratio to lorafit. The greedy answers of every server are compared with
lorafit's (vLLM loads lorafit's adapters and should answer the same). Servers:

- lorafit     this tree's `lorafit serve` (continuous batching, stacked adapters);
- static      `--static-ref REV`: the `lorafit` package of an older git revision (today's static batches), the same
              command line;
- vllm        `--vllm-venv DIR`: `python -m vllm.entrypoints.openai.api_server` from that venv (vLLM's CPU build),
              float32, `--enable-lora --max-lora-rank 16`, VLLM_CPU_KVCACHE_SPACE=1;
- aiperf      `--aiperf PATH`: the aiperf load tool pointed at lorafit (concurrency 8), its own summary printed.

The machine's load (`os.getloadavg`) is printed beside the figures: they swing with other work; compare servers
only within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches near old "
         "stone bridges and rivers of ordinary words to learn merges from").split()


def build_assets(work: Path, hidden: int, layers: int, adapters: int, vocab: int) -> tuple[Path, list[Path], int]:
    """A random Llama + tokenizer in work/base, and `adapters` LoRA adapters (PEFT format) in work/adapter-I."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from lorafit.adapters import attach_lora, lora_layers, unwrap_lora
    from lorafit.adapters.peft_io import save_adapter

    # Metaspace (SentencePiece's word marker), not byte-level: every token decodes to whole characters, so a random
    # model's answers are valid text and servers' answers compare as text (byte tokens make U+FFFD soup, which each
    # server's incremental detokenizer renders its own way)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    rng = random.Random(0)
    tok.train_from_iterator([" ".join(rng.choices(WORDS, k=30)) for _ in range(2000)], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=3 * hidden,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128,
                         max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    base = work / "base"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    folders = []
    for i in range(adapters):
        attach_lora(model, "all-linear", r=16, alpha=32)
        gen = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for layer in lora_layers(model).values():
                layer.lora_B.weight.normal_(0, 0.02, generator=gen)
        folders.append(save_adapter(model, work / f"adapter-{i}", base_model_name_or_path=str(base), r=16, alpha=32,
                                    dropout=0.0, targets="all-linear"))
        unwrap_lora(model)
    params = sum(p.numel() for p in model.parameters())
    return base, folders, params


def workload(requests: int, adapters: int, max_tokens: int, seed: int) -> list[tuple[str, str, int]]:
    """(adapter, prompt, output tokens) per request: prompts of ~8 or ~120 words, outputs from 1/8 to all of
    max_tokens, round-robin over the adapters; the same list for every server."""
    rng = random.Random(seed)
    jobs = []
    for i in range(requests):
        words = rng.randint(4, 12) if i % 2 == 0 else rng.randint(80, 160)
        prompt = " ".join(rng.choices(WORDS, k=words))
        jobs.append((f"a{i % adapters}", prompt, rng.randint(max(1, max_tokens // 8), max_tokens)))
    return jobs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, proc, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2).read()
            return
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited with {proc.returncode}") from None
            time.sleep(0.5)
    raise SystemExit("the server did not start")


def start_lorafit(base: Path, adapters: list[Path], port: int, tree: Path, log, threads: int | None = None,
                  static: bool = False):
    """lorafit serve from `tree`; an older static-batching tree has no --threads, so OMP_NUM_THREADS gives it the
    thread count today's serve picks (all cores but one)."""
    cmd = [sys.executable, "-m", "lorafit", "serve", str(base), "--port", str(port), "--batch-wait-ms", "10",
           *[a for i, folder in enumerate(adapters) for a in ("--adapter", f"a{i}={folder}")],
           *(["--threads", str(threads)] if threads and not static else [])]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(tree)}
    if static:
        env["OMP_NUM_THREADS"] = str(threads or max(1, (os.cpu_count() or 2) - 1))
    return subprocess.Popen(cmd, env=env, cwd=tree, stdout=log, stderr=log)


def start_vllm(venv: Path, base: Path, adapters: list[Path], port: int, log) -> subprocess.Popen:
    cmd = [str(venv / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model", str(base),
           "--dtype", "float32", "--enable-lora", "--max-lora-rank", "16", "--max-loras", str(len(adapters)),
           "--port", str(port), "--max-model-len", "2048", "--lora-modules",
           *[f"a{i}={folder}" for i, folder in enumerate(adapters)]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": ""}
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=log)


def one_request(client, job) -> dict:
    """A streamed greedy completion: its text, tokens, time to first token and total time."""
    model, prompt, tokens = job
    start = time.perf_counter()
    first, pieces, usage = None, [], None
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=tokens, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            first = first or time.perf_counter()
            pieces.append(chunk.choices[0].text)
        if chunk.usage is not None:
            usage = chunk.usage
    end = time.perf_counter()
    n = usage.completion_tokens if usage is not None else tokens
    first = first or end
    return {"text": "".join(pieces), "tokens": n, "ttft": first - start, "latency": end - start,
            "tpot": (end - first) / max(n - 1, 1)}


def run_level(client, jobs, concurrency: int) -> dict:
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda job: one_request(client, job), jobs))
    wall = time.perf_counter() - start
    latencies = sorted(r["latency"] for r in results)
    return {"concurrency": concurrency, "requests": len(jobs), "wall_s": wall,
            "tokens_per_s": sum(r["tokens"] for r in results) / wall,
            "ttft_s": sum(r["ttft"] for r in results) / len(results),
            "tpot_s": sum(r["tpot"] for r in results) / len(results),
            "latency_s": sum(latencies) / len(latencies),
            "p90_latency_s": latencies[min(len(latencies) - 1, int(0.9 * len(latencies)))],
            "texts": [r["text"] for r in results]}


def short_behind_long(client, max_tokens: int) -> float:
    """Latency of an 8-token request sent 0.3 s after a long one, as a fraction of the long one's."""
    times = {}

    def send(name, tokens, delay):
        time.sleep(delay)
        times[name] = one_request(client, ("a0", "the quick brown fox", tokens))["latency"]

    threads = [threading.Thread(target=send, args=("long", max_tokens, 0.0)),
               threading.Thread(target=send, args=("short", 8, 0.3))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return times["short"] / times["long"]


def bench_server(name: str, start, port: int, jobs_by_level: dict, long_tokens: int, startup: float) -> dict:
    import openai

    with tempfile.NamedTemporaryFile("w+", prefix=f"bench-{name}-", suffix=".log", delete=False) as log:
        proc = start(port, log)
    try:
        wait_ready(port, proc, startup)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
        run_level(client, jobs_by_level[1][:2], 1)  # warm-up
        levels = {c: run_level(client, jobs, c) for c, jobs in jobs_by_level.items()}
        return {"levels": levels, "short_behind_long": short_behind_long(client, long_tokens), "log": log.name}
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)


def run_aiperf(aiperf: str, base: Path, adapters: list[Path], port: int, tree: Path, max_tokens: int) -> str:
    """aiperf's own measurement of lorafit at concurrency 8 (its summary table, as it prints it)."""
    with tempfile.NamedTemporaryFile("w+", prefix="bench-aiperf-server-", suffix=".log", delete=False) as log:
        proc = start_lorafit(base, adapters, port, tree, log)
    try:
        wait_ready(port, proc, 300)
        cmd = [aiperf, "profile", "--model", "a0", "--url", f"http://127.0.0.1:{port}", "--endpoint-type",
               "completions", "--streaming", "--concurrency", "8", "--request-count", "32", "--tokenizer", str(base),
               "--isl", "64", "--osl", str(max_tokens), "--extra-inputs", "ignore_eos:true", "--ui-type", "simple",
               "--artifact-dir", tempfile.mkdtemp(prefix="aiperf-")]
        # not HF_HUB_OFFLINE: aiperf 0.13 then looks a local tokenizer folder up as a hub cache entry and fails
        env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=env)
        return done.stdout[-6000:] + (f"\n(aiperf exited {done.returncode}: {done.stderr[-2000:]})"
                                      if done.returncode else "")
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def print_table(results: dict, params: int, args) -> None:
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\nmodel: Llama hidden {args.hidden}, {args.layers} layers ({params / 1e6:.1f}M parameters), "
          f"{args.adapters} LoRA adapters r=16 all-linear, round-robin; {args.requests} greedy requests per level, "
          f"outputs {max(1, args.max_tokens // 8)}..{args.max_tokens} tokens, prompts ~8 or ~120 words; "
          f"load average (1/5/15 min) at the end: {load}; {os.cpu_count()} CPUs")
    print(f"{'server':<9}{'conc':>5}{'tok/s':>9}{'× lorafit':>10}{'TTFT s':>9}{'TPOT ms':>9}{'mean s':>8}"
          f"{'p90 s':>8}{'same text':>11}")
    reference = results["lorafit"]["levels"]
    for name, result in results.items():
        for c, level in result["levels"].items():
            ours = reference[c]
            same = f"{sum(a == b for a, b in zip(level['texts'], ours['texts'], strict=True))}/{len(ours['texts'])}"
            print(f"{name:<9}{c:>5}{level['tokens_per_s']:>9.1f}{level['tokens_per_s'] / ours['tokens_per_s']:>10.2f}"
                  f"{level['ttft_s']:>9.3f}{level['tpot_s'] * 1000:>9.1f}{level['latency_s']:>8.2f}"
                  f"{level['p90_latency_s']:>8.2f}{same:>11}")
    for name, result in results.items():
        print(f"{name}: an 8-token request sent 0.3 s after a {args.max_tokens * 4}-token one took "
              f"{result['short_behind_long']:.2f}× the long one's latency")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--vllm-venv", type=Path, default=None)
    parser.add_argument("--static-ref", default=None, help="a git revision whose lorafit serve batches statically")
    parser.add_argument("--aiperf", default=None, help="the aiperf executable (in its own venv)")
    parser.add_argument("--threads", type=int, default=None,
                        help="lorafit serve --threads (default: serve's own, all cores but one, as vLLM's CPU build)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="a tiny model and load, to check the script")
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.layers, args.vocab, args.requests, args.max_tokens = 128, 2, 512, 8, 16
        args.concurrency = "1,4"
    levels = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory(prefix="lorafit-bench-serve-") as tmp:
        work = Path(tmp)
        base, adapters, params = build_assets(work, args.hidden, args.layers, args.adapters, args.vocab)
        jobs = workload(args.requests, args.adapters, args.max_tokens, seed=1)
        jobs_by_level = {c: jobs[: max(8, args.requests // 4)] if c == 1 else jobs for c in levels}
        servers = {"lorafit": lambda port, log: start_lorafit(base, adapters, port, ROOT, log, args.threads)}
        if args.static_ref:
            old = work / "static"
            old.mkdir()
            archive = subprocess.run(["git", "archive", args.static_ref, "lorafit"], cwd=ROOT, capture_output=True,
                                     check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
            servers["static"] = lambda port, log: start_lorafit(base, adapters, port, old, log, args.threads,
                                                                static=True)
        if args.vllm_venv:
            servers["vllm"] = lambda port, log: start_vllm(args.vllm_venv, base, adapters, port, log)
        results = {}
        for name, start in servers.items():
            print(f"benchmarking {name} ...", flush=True)
            results[name] = bench_server(name, start, free_port(), jobs_by_level, args.max_tokens * 4,
                                         startup=900 if name == "vllm" else 300)
        aiperf = run_aiperf(args.aiperf, base, adapters, free_port(), ROOT, args.max_tokens) if args.aiperf else None
    print_table(results, params, args)
    if aiperf is not None:
        print("\naiperf against lorafit (concurrency 8):\n" + aiperf)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "params": params,
                                         "load": os.getloadavg(), "results": results, "aiperf": aiperf}, indent=1))


if __name__ == "__main__":
    main()
