"""`lorafit serve` on the CPU: 8 requests on 8 different adapters sent at once (one mixed-adapter batch) vs the same
8 requests sent one after another.

    .venv/bin/python scripts/bench_serve.py                      # ~1-2 min on 2 cores
    .venv/bin/python scripts/bench_serve.py --hidden 1024 --layers 8 --max-tokens 128

A random-weight Llama (hidden 512, 4 layers by default) is saved with a byte-level BPE tokenizer trained here, and 8
LoRA adapters (r=16 on every linear layer, random nonzero B) in PEFT's format. A real `lorafit serve` process answers
through HTTP (the `openai` client); each request is a greedy completion of `--max-tokens` new tokens of a different
prompt. Reported: generated tokens / wall seconds for each way, the ratio, and whether the answers are identical.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["The quick brown fox", "Once upon a time", "def add(a, b):", "Question: what is 12 times 7?",
           "Reverse the word: stone", "Dear colleagues,", "import numpy as np", "The capital of France"]


def build_assets(work: Path, hidden: int, layers: int, adapters: int) -> tuple[Path, list[Path]]:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from lorafit.adapters import attach_lora, lora_layers, unwrap_lora
    from lorafit.adapters.peft_io import save_adapter

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2048, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([p + " and some more ordinary words to learn merges from." for p in PROMPTS] * 50, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=3 * hidden,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128,
                         max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
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
    return base, folders


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(base: Path, adapters: list[Path], port: int):
    cmd = [sys.executable, "-m", "lorafit", "serve", str(base), "--port", str(port), "--batch-wait-ms", "50",
           *[a for i, folder in enumerate(adapters) for a in ("--adapter", f"a{i}={folder}")]]
    proc = subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=ROOT)
    for _ in range(600):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2).read()
            return proc
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited with {proc.returncode}") from None
            time.sleep(0.5)
    raise SystemExit("the server did not start")


def measure(client, jobs: list[tuple[str, str]], max_tokens: int, concurrent: bool) -> tuple[float, int, list[str]]:
    def one(job):
        return client.completions.create(model=job[0], prompt=job[1], max_tokens=max_tokens, temperature=0)

    start = time.perf_counter()
    if concurrent:
        with ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(one, jobs))
    else:
        answers = [one(job) for job in jobs]
    seconds = time.perf_counter() - start
    return seconds, sum(a.usage.completion_tokens for a in answers), [a.choices[0].text for a in answers]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    import openai

    with tempfile.TemporaryDirectory(prefix="lorafit-bench-serve-") as tmp:
        base, adapters = build_assets(Path(tmp), args.hidden, args.layers, len(PROMPTS))
        port = free_port()
        proc = start_server(base, adapters, port)
        try:
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
            jobs = [(f"a{i}", p) for i, p in enumerate(PROMPTS)]
            measure(client, jobs[:2], 4, concurrent=False)  # warm-up
            rows = {"one after another": [], "8 at once (mixed batch)": []}
            for _ in range(args.repeats):
                rows["one after another"].append(measure(client, jobs, args.max_tokens, concurrent=False))
                rows["8 at once (mixed batch)"].append(measure(client, jobs, args.max_tokens, concurrent=True))
        finally:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
    best = {k: min(v, key=lambda r: r[0]) for k, v in rows.items()}
    print(f"model: Llama hidden {args.hidden}, {args.layers} layers; 8 LoRA adapters r=16 all-linear; "
          f"{args.max_tokens} new tokens per request, greedy; best of {args.repeats}; torch threads: default")
    print(f"{'requests':<26}{'seconds':>9}{'tokens':>8}{'tokens/s':>10}")
    for name, (seconds, tokens, _) in best.items():
        print(f"{name:<26}{seconds:>9.2f}{tokens:>8}{tokens / seconds:>10.1f}")
    serial, mixed = best["one after another"], best["8 at once (mixed batch)"]
    print(f"ratio (mixed batch / serial tokens/s): {(mixed[1] / mixed[0]) / (serial[1] / serial[0]):.2f}x; "
          f"identical answers: {mixed[2] == serial[2]}")


if __name__ == "__main__":
    main()
