"""DPO with lorafit against TRL's DPOTrainer + PEFT LoRA, side by side in one run (fp32 on the CPU).

    python scripts/bench_pref.py                       # a 30M Llama (hidden 512, 6 layers, vocab 32k), 30 steps of 4 pairs
    python scripts/bench_pref.py --tiny                # hidden 64, 2 layers, 6 steps: checks the script in seconds

Both sides get the same pairs (synthetic prompts and answers of words, up to max_length 256 tokens), the same
randomly initialised base model (saved once), LoRA r 16 / alpha 32 on all linear layers, dropout 0, batch 4 pairs,
lr 5e-5, no gradient checkpointing, and the same reference: the base, i.e. the fresh adapter switched off (TRL's way
with a peft_config). Each side runs in its own process, so the figures are whole-process time, the training loop's
tokens/s (its own timer: lorafit's metrics, TRL's train_runtime) and peak RSS. Prints a table and the ratios.
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
TOKENIZER = ROOT / "assets" / "tiny-llama"
R, ALPHA, LR, BATCH, MAX_LENGTH = 16, 32, 5e-5, 4, 256


def make_model(out: Path, tiny: bool) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    # A Llama-sized vocabulary (32,000, embedding tied to the head) as on real models, where the head's (B, T, V)
    # logits are much of a DPO step's cost; the tiny tokenizer uses only its first ids.
    shape = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=len(tok)) if tiny else \
        dict(hidden_size=512, intermediate_size=768, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8,
             vocab_size=32000)
    torch.manual_seed(0)
    cfg = LlamaConfig(max_position_embeddings=1024, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=not tiny, **shape)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {shape}", flush=True)


def make_pairs(out: Path, n: int) -> None:
    words = [json.loads(line)["instruction"].rsplit(" ", 1)[1]
             for line in (ROOT / "data/tiny-task/train.jsonl").read_text().splitlines()]
    rng = random.Random(0)

    def text(k: int) -> str:
        return " ".join(rng.choice(words) for _ in range(k))

    rows = [{"prompt": text(rng.randint(20, 50)) + "\n", "chosen": " " + text(rng.randint(15, 40)),
             "rejected": " " + text(rng.randint(15, 40))} for _ in range(n)]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))


def run_lorafit(work: Path, steps: int) -> dict:
    import yaml

    from lorafit.cli import main

    cfg = {"model": {"path": str(work / "model"), "dtype": "float32", "attention": "sdpa"},
           "adapter": {"r": R, "alpha": ALPHA, "dropout": 0.0, "targets": "all-linear"},
           "data": {"train": [{"path": str(work / "pairs.jsonl"), "format": "preference"}], "max_length": MAX_LENGTH},
           "train": {"objective": "dpo", "max_steps": steps, "batch_size": BATCH, "grad_accum": 1, "lr": LR,
                     "warmup": 0, "scheduler": "constant", "precision": "fp32", "gradient_checkpointing": False,
                     "log_every": 1, "seed": 0},
           "output": {"dir": str(work / "lorafit-run")}}
    (work / "dpo.yaml").write_text(yaml.safe_dump(cfg))
    try:
        main(["train", str(work / "dpo.yaml")])
    except SystemExit as e:
        if e.code:
            raise
    rows = [json.loads(line) for line in (work / "lorafit-run/metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    return {"loop_s": train_rows[-1]["elapsed"], "tokens": train_rows[-1]["tokens"], "first_loss": train_rows[0]["loss"],
            "last_loss": train_rows[-1]["loss"]}


def run_trl(work: Path, steps: int) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(work / "model")
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32, attn_implementation="sdpa")
    rows = [json.loads(line) for line in (work / "pairs.jsonl").read_text().splitlines()]
    args = DPOConfig(output_dir=str(work / "trl-run"), per_device_train_batch_size=BATCH, max_steps=steps,
                     learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, max_length=MAX_LENGTH,
                     beta=0.1, use_cpu=True, bf16=False, fp16=False, report_to="none", logging_steps=1,
                     save_strategy="no", gradient_checkpointing=False, dataloader_num_workers=0, seed=0)
    peft = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=peft)
    out = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    tokens = sum(len(tok(r["prompt"])["input_ids"]) * 2 + len(tok(r["chosen"])["input_ids"]) +
                 len(tok(r["rejected"])["input_ids"]) + 2 for r in rows[: steps * BATCH])
    return {"loop_s": out.metrics["train_runtime"], "tokens": tokens, "first_loss": losses[0], "last_loss": losses[-1]}


def child(side: str, work: Path, steps: int) -> None:
    started = time.perf_counter()
    result = (run_lorafit if side == "lorafit" else run_trl)(work, steps)
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    result["inner_s"] = time.perf_counter() - started
    (work / f"{side}.json").write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a 64-wide 2-layer model, 6 steps: test the script")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--side", choices=["lorafit", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    steps = args.steps or (6 if args.tiny else 30)
    if args.side:
        return child(args.side, args.work, steps)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with tempfile.TemporaryDirectory(prefix="bench-pref-") as tmp:
        work = Path(tmp)
        os.environ["LORAFIT_CACHE"] = env["LORAFIT_CACHE"] = str(work / "cache")
        make_model(work / "model", args.tiny)
        make_pairs(work / "pairs.jsonl", steps * BATCH)
        results = {}
        for side in ("trl", "lorafit"):
            started = time.perf_counter()
            subprocess.run([sys.executable, __file__, "--side", side, "--work", str(work), "--steps", str(steps)]
                           + (["--tiny"] if args.tiny else []), env=env, check=True, stdout=subprocess.DEVNULL)
            results[side] = {**json.loads((work / f"{side}.json").read_text()),
                             "process_s": time.perf_counter() - started}
    print(f"\n{steps} DPO steps of {BATCH} pairs, max_length {MAX_LENGTH}, LoRA r {R} alpha {ALPHA} all-linear, fp32 CPU;"
          f" load {os.getloadavg()[0]:.1f}")
    print(f"{'':10}{'process s':>10}{'loop s':>9}{'loop tok/s':>12}{'peak RSS GB':>13}{'first loss':>12}{'last loss':>11}")
    for side, r in results.items():
        print(f"{side:10}{r['process_s']:10.1f}{r['loop_s']:9.1f}{r['tokens'] / r['loop_s']:12.0f}"
              f"{r['peak_rss_gb']:13.2f}{r['first_loss']:12.6f}{r['last_loss']:11.4f}")
    t, lf = results["trl"], results["lorafit"]
    print(f"lorafit / TRL: {t['loop_s'] / lf['loop_s']:.2f}x loop speed, {t['process_s'] / lf['process_s']:.2f}x "
          f"whole process, {lf['peak_rss_gb'] / t['peak_rss_gb']:.2f}x peak memory")


if __name__ == "__main__":
    main()
