"""The adapter family side by side: every `adapter.method` / `adapter.init` trained on the same task, measured.

    .venv/bin/python scripts/compare_methods.py                          # both setups, prints the tables
    .venv/bin/python scripts/compare_methods.py --write docs/methods.md  # and puts them into the doc
    .venv/bin/python scripts/compare_methods.py --setups quickstart --methods lora,vera

Setups:
    quickstart   configs/tiny-quickstart.yaml on the shipped tiny model (3.5M parameters): held-out words
    small        the small benchmark model (scripts/bench.py --size small, ~25M parameters, random weights)
                 trained for a fixed number of steps on its pseudo-word completions, 10% held out

Each run is a separate `lorafit train` process, then `lorafit eval --json`. Measured per run: trainable parameters
(the run's own report), the saved adapter's size, peak memory (the run's metrics: process RSS on the CPU, peak
allocated on a GPU), seconds per optimizer step (training time / steps), the adapter's held-out loss and exact match
(greedy, against the reference answers). Numbers depend on the machine; the script prints what it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

# label -> config overrides (on top of the setup's config). VeRA's shared projections make a large r cheap: its
# trainable parameters grow with r only through d (r per layer), so it runs at a larger rank, as in the paper, and
# once more at 10× the learning rate (the paper trains its few scaling vectors at much higher rates than LoRA).
# "LR×10" stands for ten times the setup's own train.lr.
RUNS = {
    "lora": ["adapter.method=lora"],
    "dora": ["adapter.method=dora"],
    "lora_fa": ["adapter.method=lora_fa"],
    "vera": ["adapter.method=vera", "adapter.r=128"],
    "vera_lr10": ["adapter.method=vera", "adapter.r=128", "LR×10"],
    "adalora": ["adapter.method=adalora", "adapter.r=8", "adapter.adalora.init_r=16"],
    "pissa": ["adapter.init=pissa"],
    "olora": ["adapter.init=olora"],
    "qlora": ["model.quantization.bits=4"],
    "loftq": ["adapter.init=loftq", "model.quantization.bits=4"],
}
TRAINABLE = re.compile(r"([\d,]+) trainable / ")  # the run header's "adapter: N modules wrapped, X trainable / Y"
TABLE_START, TABLE_END = "<!-- methods-table:start -->", "<!-- methods-table:end -->"


def lorafit(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "lorafit", *args], cwd=cwd, env=env, capture_output=True, text=True)


def setup_config(setup: str, work: Path, steps: int) -> tuple[Path, float]:
    """(config path, its train.lr) for a setup; the small setup's model and data are written under `work`."""
    if setup == "quickstart":
        path = ROOT / "configs" / "tiny-quickstart.yaml"
        return path, float(yaml.safe_load(path.read_text())["train"]["lr"])
    import bench

    (work / "assets").mkdir(parents=True, exist_ok=True)
    run = bench.write_assets(work / "assets", "small", epochs=1, qlora=False)
    config = bench.lorafit_config(run, rows_per_step=8, out_dir=work / "unused")
    config["train"].update(max_steps=steps, log_every=5)
    config["data"]["eval_fraction"] = 0.1
    path = work / "small.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path, float(config["train"]["lr"])


def measure(label: str, config: Path, lr: float, out: Path, generate: int, overrides: list[str] | None = None) -> dict:
    """Train one method (`RUNS[label]`, or `overrides` when given) and evaluate it; a failed run is reported with its
    last error line, not raised."""
    overrides = [f"train.lr={10 * lr:g}" if o == "LR×10" else o for o in (RUNS[label] if overrides is None else overrides)]
    started = time.perf_counter()
    trained = lorafit("train", str(config), *overrides, f"output.dir={out}")
    if trained.returncode != 0:
        return {"method": label, "error": (trained.stderr.strip().splitlines() or ["?"])[-1][:200]}
    wall = time.perf_counter() - started
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "loss" in r and "step" in r and "eval_loss" not in r]
    last = steps[-1]
    found = TRAINABLE.search(trained.stdout + trained.stderr)
    evaluated = lorafit("eval", str(out), "--json", str(out / "eval.json"), "--generate", str(generate))
    if evaluated.returncode != 0:
        return {"method": label, "error": "eval: " + (evaluated.stderr.strip().splitlines() or ["?"])[-1][:200]}
    result = json.loads((out / "eval.json").read_text())
    adapter = result.get("adapter") or next(iter(result["adapters"].values()))
    generation = result.get("generation", {}).get("adapter", {})
    return {
        "method": label,
        "trainable": int(found.group(1).replace(",", "")) if found else None,
        "adapter_kib": sum(f.stat().st_size for f in (out / "adapter").glob("adapter_model.*")) / 1024,
        "peak_gib": max(r.get("memory_gib", 0.0) for r in steps),
        "s_per_step": last["elapsed"] / last["step"],
        "steps": last["step"],
        "wall_s": wall,
        "base_loss": result["base"]["loss"],
        "loss": adapter["loss"],
        "exact_match": generation.get("exact_match"),
        "stdout": trained.stdout,
    }


def table(setup: str, results: list[dict]) -> str:
    head = ("| method | trainable params | adapter file | peak memory | s / step | held-out loss | exact match |\n"
            "|---|---:|---:|---:|---:|---:|---:|")
    lines = [f"**{setup}**\n", head]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error']} | | | | | |")
            continue
        em = "—" if r["exact_match"] is None else f"{r['exact_match']:.2f}"
        lines.append(f"| {r['method']} | {r['trainable']:,} | {r['adapter_kib']:,.0f} KiB | {r['peak_gib']:.2f} GiB | "
                     f"{r['s_per_step']:.3f} | {r['loss']:.3f} | {em} |")
    base = next((r["base_loss"] for r in results if "base_loss" in r), None)
    if base is not None:
        lines.append(f"\nBase model before training: held-out loss {base:.3f}.")
    return "\n".join(lines)


def machine() -> str:
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    return f"{device}, torch {torch.__version__}, Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}"


def write_doc(path: Path, text: str, start: str = TABLE_START, end: str = TABLE_END) -> None:
    doc = path.read_text()
    if start not in doc or end not in doc:
        raise SystemExit(f"{path}: has no {start} ... {end} markers to put the tables between")
    head, rest = doc.split(start, 1)
    path.write_text(head + start + "\n" + text + "\n" + end + rest.split(end, 1)[1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setups", default="quickstart,small", help="comma-separated: quickstart, small")
    parser.add_argument("--methods", default=",".join(RUNS), help=f"comma-separated, of: {', '.join(RUNS)}")
    parser.add_argument("--small-steps", type=int, default=60, help="optimizer steps on the small model")
    parser.add_argument("--generate", type=int, default=50, help="eval rows answered greedily for exact match")
    parser.add_argument("--work", type=Path, default=None, help="folder for runs (default: a temporary one)")
    parser.add_argument("--write", type=Path, default=None, help="put the tables into this markdown file")
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in RUNS]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(RUNS)}")
    work = args.work or Path(tempfile.mkdtemp(prefix="lorafit-methods-"))
    sections = [f"Measured by `scripts/compare_methods.py` on {machine()}."]
    for setup in args.setups.split(","):
        config, lr = setup_config(setup, work / setup, args.small_steps)
        results = []
        for label in methods:
            print(f"[{setup}] {label} ...", flush=True)
            results.append(measure(label, config, lr, work / setup / label, args.generate))
            results[-1].pop("stdout", None)
            print(json.dumps(results[-1]), flush=True)
        sections.append(table(setup, results))
        (work / f"{setup}.json").write_text(json.dumps(results, indent=1))
    text = "\n\n".join(sections)
    print("\n" + text)
    if args.write:
        write_doc(args.write, text)
        print(f"wrote {args.write}")


if __name__ == "__main__":
    main()
