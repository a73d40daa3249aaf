"""lorafit's data stage vs `datasets.map(batched=True)`: time and peak memory to tokenize an Alpaca-style file.

    .venv/bin/python scripts/bench_data.py --rows 10000 100000          # ~2 min on 2 cores
    .venv/bin/python scripts/bench_data.py --rows 1000000 --skip-baseline

Each measurement is a separate process (this script with `--role`), so imports, caches and memory are its own:

- `lorafit`: `prepare_examples` + packing + label audit with an empty cache (what `lorafit data` and the start of
  `lorafit train` do), at the default `data.num_proc` (one process: the fast tokenizer uses every core);
  `lorafit-2proc` (with --workers) the same with two worker processes;
- `lorafit-cached`: the same again on the cache the `lorafit` run left (a second start);
- `datasets`: `load_dataset("json")` + `.map(batched=True)` with the same fast tokenizer, template, response-only
  labels and EOS, into an empty datasets cache (its default: one process; the fast tokenizer uses every core).

Both sides produce identical token ids and labels (checked on the first 100 rows at the smallest size). The data is
synthetic Alpaca rows (Stanford template, about 150 tokens a row, half with an input) and the tokenizer a byte-level
BPE of 16k tokens trained here on a sample. Reported: seconds of data work (after imports and loading the tokenizer),
the process's peak RSS (ru_maxrss) and, for lorafit's worker processes, the largest worker's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SYLLABLES = ["ka", "lo", "mi", "ren", "to", "sa", "vi", "del", "quo", "an", "ber", "is", "ul", "ph", "ex", "str",
             "on", "ta", "ne", "mor", "gi", "cal", "ent", "ly", "tion", "pre", "um", "or", "ax", "we"]
ROLES = ("lorafit", "lorafit-2proc", "lorafit-cached", "datasets")


def _words(rng: random.Random, n: int) -> str:
    return " ".join("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(n))


def write_data(path: Path, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(rows):
            row = {"instruction": _words(rng, rng.randint(5, 25)) + "?",
                   "input": _words(rng, rng.randint(3, 30)) if rng.random() < 0.5 else "",
                   "output": _words(rng, rng.randint(10, 80)) + "."}
            f.write(json.dumps(row) + "\n")


def build_tokenizer(data: Path, out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    with data.open() as f:
        sample = [next(f) for _ in range(2000)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=16000, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(sample, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="<unk>").save_pretrained(out)


# ------------------------------------------------------------------------------------------------ the two sides


def run_lorafit(data: Path, tokenizer, cache: Path, num_proc: int | None, dump: Path | None) -> dict:
    from lorafit.config import DataConfig
    from lorafit.data import make_audit, make_rows, prepare_examples

    cfg = DataConfig(train=[{"path": str(data), "format": "alpaca"}], max_length=2048, num_proc=num_proc)
    prepared = prepare_examples(cfg, tokenizer, seed=0, cache_dir=cache)
    rows = make_rows(prepared.train, cfg.max_length, cfg.packing)
    audit = make_audit(prepared, rows, cfg.max_length)
    if dump is not None:
        dump.write_text(json.dumps([[e.input_ids, e.labels] for e in prepared.train[:100]]))
    return {"examples": audit.examples, "tokens": audit.tokens, "store_mb": prepared.store_bytes / 2**20}


def run_datasets(data: Path, tokenizer, cache: Path, dump: Path | None) -> dict:
    import datasets

    from lorafit.data import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT

    eos = tokenizer.eos_token_id

    def tokenize(batch):
        prompts = [(ALPACA_PROMPT if i.strip() else ALPACA_PROMPT_NO_INPUT).replace("{instruction}", ins)
                   .replace("{input}", i) for ins, i in zip(batch["instruction"], batch["input"], strict=True)]
        p_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
        r_ids = tokenizer(batch["output"], add_special_tokens=False)["input_ids"]
        ids = [p + r + [eos] for p, r in zip(p_ids, r_ids, strict=True)]
        labels = [[-100] * len(p) + r + [eos] for p, r in zip(p_ids, r_ids, strict=True)]
        return {"input_ids": ids, "labels": labels}

    ds = datasets.load_dataset("json", data_files=str(data), split="train", cache_dir=str(cache))
    ds = ds.map(tokenize, batched=True, remove_columns=ds.column_names)
    if dump is not None:
        dump.write_text(json.dumps([[r["input_ids"], r["labels"]] for r in ds.select(range(100))]))
    return {"examples": len(ds), "tokens": sum(len(x) for x in ds["input_ids"])}


def child(role: str, data: Path, tokenizer_dir: Path, cache: Path, dump: Path | None) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    start = time.perf_counter()
    if role == "datasets":
        out = run_datasets(data, tokenizer, cache, dump)
    else:
        out = run_lorafit(data, tokenizer, cache, 2 if role == "lorafit-2proc" else None, dump)
    out["seconds"] = time.perf_counter() - start
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["worker_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print("RESULT " + json.dumps(out), flush=True)


# ------------------------------------------------------------------------------------------------ driver


def measure(role: str, data: Path, tokenizer_dir: Path, cache: Path, dump: Path | None = None) -> dict:
    cmd = [sys.executable, __file__, "--role", role, "--data", str(data), "--tokenizer", str(tokenizer_dir),
           "--cache", str(cache)] + (["--dump", str(dump)] if dump else [])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{role} failed:\n{proc.stderr[-3000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return {**json.loads(line[7:]), "wall": time.perf_counter() - started}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--skip-baseline", action="store_true", help="lorafit only (e.g. for 1M rows)")
    ap.add_argument("--workers", action="store_true", help="also lorafit with num_proc 2 (worker processes)")
    ap.add_argument("--role", choices=ROLES)
    ap.add_argument("--data", type=Path)
    ap.add_argument("--tokenizer", type=Path)
    ap.add_argument("--cache", type=Path)
    ap.add_argument("--dump", type=Path)
    args = ap.parse_args()
    if args.role:
        return child(args.role, args.data, args.tokenizer, args.cache, args.dump)
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        tmp = Path(tmp)
        print("| rows | tokens | side | cold s | peak RSS MB (workers) | cached start s | cached RSS MB |")
        print("|---|---|---|---|---|---|---|")
        for i, n in enumerate(args.rows):
            data, tok = tmp / f"alpaca-{n}.jsonl", tmp / "tokenizer"
            write_data(data, n)
            if not tok.exists():
                build_tokenizer(data, tok)
            check = i == 0 and not args.skip_baseline
            cold = measure("lorafit", data, tok, tmp / f"c-{n}", tmp / "l.json" if check else None)
            warm = measure("lorafit-cached", data, tok, tmp / f"c-{n}")
            print(f"| {n:,} | {cold['tokens']:,} | lorafit (default num_proc) | {cold['seconds']:.1f} | "
                  f"{cold['peak_rss_mb']:.0f} ({cold['worker_rss_mb']:.0f}) | {warm['seconds']:.2f} | "
                  f"{warm['peak_rss_mb']:.0f} |", flush=True)
            if args.workers:
                two = measure("lorafit-2proc", data, tok, tmp / f"c2-{n}")
                print(f"| {n:,} | {two['tokens']:,} | lorafit num_proc 2 | {two['seconds']:.1f} | "
                      f"{two['peak_rss_mb']:.0f} ({two['worker_rss_mb']:.0f}) | | |", flush=True)
            if not args.skip_baseline:
                base = measure("datasets", data, tok, tmp / f"d-{n}", tmp / "d.json" if check else None)
                print(f"| {n:,} | {base['tokens']:,} | datasets.map(batched=True) | {base['seconds']:.1f} | "
                      f"{base['peak_rss_mb']:.0f} | | |", flush=True)
                if check and json.loads((tmp / "l.json").read_text()) != json.loads((tmp / "d.json").read_text()):
                    raise SystemExit("lorafit and datasets.map disagree on the first 100 rows' ids or labels")
            print(f"<!-- {n} rows: store {cold['store_mb']:.0f} MB on disk; store size and process wall times: "
                  f"lorafit {cold['wall']:.1f} s, cached {warm['wall']:.1f} s -->", flush=True)
            data.unlink()


if __name__ == "__main__":
    main()
