"""Where the adapter goes, at one trainable-parameter budget: uniform all-linear LoRA against `adapter.allocate:
gradient` and against attention-only and MLP-only LoRA at (about) the same budget, over several seeds.

    .venv/bin/python scripts/compare_placement.py                          # both setups, 3 seeds, prints the tables
    .venv/bin/python scripts/compare_placement.py --write docs/methods.md  # and puts them into the doc
    .venv/bin/python scripts/compare_placement.py --setups quickstart --seeds 1 --small-steps 4   # a quick check
    .venv/bin/python scripts/compare_placement.py --setups quickstart --r 16,2         # two budgets
    .venv/bin/python scripts/compare_placement.py --setups small --from-log run.log   # the table of an unfinished run

Variants (every one keeps uniform r's scale alpha / r, so only the placement differs):
    uniform     adapter.targets all-linear at the setup's adapter.r: the budget
    allocate    adapter.allocate: gradient at that budget (ranks 0 .. 4r from the gradient probe)
    attention   q, k, v, o only, at the rank that spends the same budget (rounded)
    mlp         gate, up, down only, likewise

The setups, the training and the measuring are `compare_methods.py`'s (`setup_config`, `measure`). Each seed sets
train.seed (adapter init, data order; on the small setup also which 10% is held out). Reported per variant: the
trainable parameters, the held-out loss and exact match as mean ± standard deviation over the seeds, and the probe's
time for allocate.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

import compare_methods  # noqa: E402

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
VARIANTS = ("uniform", "allocate", "attention", "mlp")
TABLE_START, TABLE_END = "<!-- placement-table:start -->", "<!-- placement-table:end -->"
PROBE_TIME = re.compile(r"placement: gradient probe of .* in ([\d.]+) s")


def _targets(names: list[str]) -> str:
    return "adapter.targets=[" + ", ".join(names) + "]"


def matched_overrides(config: Path) -> dict[str, list[str]]:
    """Each variant's overrides: attention and MLP get the rank that spends uniform r's budget on fewer modules,
    and alpha scaled with it (same alpha / r)."""
    from lorafit.config import load_config
    from lorafit.plan import model_shape

    cfg = load_config(config).config
    r, alpha = cfg.adapter.r, cfg.adapter.alpha
    budget = model_shape(cfg).adapter_params
    out = {"uniform": [], "allocate": ["adapter.allocate=gradient"]}
    for label, names in (("attention", ATTENTION), ("mlp", MLP)):
        at_r = model_shape(load_config(config, [_targets(names)]).config).adapter_params
        r_sub = max(1, round(r * budget / at_r))
        out[label] = [_targets(names), f"adapter.r={r_sub}", f"adapter.alpha={alpha * r_sub / r:g}"]
    return out


def narrowed(config: Path, setup: str, work: Path, quickstart_steps: int | None, r: int | None) -> tuple[Path, str]:
    """The setup's config with --quickstart-steps / --r applied (r at the same alpha / r), and its table label."""
    from lorafit.config import load_config

    lines, label = [], setup
    if setup == "quickstart" and quickstart_steps:
        lines.append(f"train:\n  max_steps: {quickstart_steps}")
    if r:
        a = load_config(config).config.adapter
        lines.append(f"adapter:\n  r: {r}\n  alpha: {a.alpha * r / a.r:g}")
        label = f"{setup}, r={r}"
    if not lines:
        return config, label
    work.mkdir(parents=True, exist_ok=True)
    extra = work / f"{setup}-narrowed.yaml"
    extra.write_text(f"extends: {config}\n" + "\n".join(lines) + "\n")
    return extra, label


def run_variant(label: str, overrides: list[str], config: Path, lr: float, work: Path, seeds: list[int],
                generate: int) -> dict:
    """Train and evaluate one variant once per seed; mean and spread of the held-out figures."""
    runs = []
    for seed in seeds:
        result = compare_methods.measure(label, config, lr, work / f"{label}-seed{seed}", generate,
                                         overrides=[*overrides, f"train.seed={seed}"])
        found = PROBE_TIME.search(result.pop("stdout", ""))
        result["probe_s"] = float(found.group(1)) if found else None
        print(json.dumps({"seed": seed, **result}), flush=True)
        runs.append(result)
    return summarise(label, runs, overrides)


def summarise(label: str, runs: list[dict], overrides: list[str] = ()) -> dict:
    """Mean and standard deviation over the seeds that finished."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"variant": label, "error": runs[0]["error"]}
    summary = {"variant": label, "seeds": len(ok), "trainable": ok[0]["trainable"], "runs": ok,
               "overrides": overrides}
    for key in ("loss", "exact_match", "probe_s"):
        values = [r[key] for r in ok if r.get(key) is not None]
        if values:
            summary[key] = statistics.mean(values)
            summary[key + "_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return summary


def table(setup: str, results: list[dict], steps: str) -> str:
    lines = [f"**{setup}** ({steps})\n",
             "| placement | trainable params | held-out loss | exact match | seeds | probe |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error']} | | | | |")
            continue
        em = f"{r['exact_match']:.2f} ± {r['exact_match_sd']:.2f}" if "exact_match" in r else "—"
        probe = f"{r['probe_s']:.1f} s" if "probe_s" in r else ""
        lines.append(f"| {r['variant']} | {r['trainable']:,} | {r['loss']:.3f} ± {r['loss_sd']:.3f} | {em} | "
                     f"{r['seeds']} | {probe} |")
    return "\n".join(lines)


VARIANT_LINE = re.compile(r"^\[([\w-]+)\] (\w+) ")


def from_log(log: Path, setup: str) -> list[dict]:
    """The per-variant summaries of the runs of `setup` a (possibly unfinished) run of this script printed to `log`
    (each variant's seeds follow its "[setup] variant ..." line)."""
    runs: dict[str, list[dict]] = {}
    current = None
    for line in log.read_text().splitlines():
        if found := VARIANT_LINE.match(line):
            current = found.group(1)
        elif line.startswith('{"seed"') and current == setup:
            row = json.loads(line)
            runs.setdefault(row["method"], []).append(row)
    return [summarise(label, runs[label]) for label in VARIANTS if label in runs]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setups", default="quickstart,small", help="comma-separated: quickstart, small (with "
                                                                     "--from-log: the log's tags, e.g. quickstart-r2)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per variant (train.seed = 1 .. N)")
    parser.add_argument("--small-steps", type=int, default=40, help="optimizer steps on the small model")
    parser.add_argument("--quickstart-steps", type=int, default=None, help="train.max_steps on the quickstart "
                                                                           "(default: its 6 epochs)")
    parser.add_argument("--r", default=None, help="budgets, comma-separated: uniform rank r (alpha scaled to keep "
                                                  "alpha / r; default: the setup's own); tables and log tags setup-rN")
    parser.add_argument("--generate", type=int, default=50, help="eval rows answered greedily for exact match")
    parser.add_argument("--work", type=Path, default=None, help="folder for runs (default: a temporary one)")
    parser.add_argument("--write", type=Path, default=None, help="put the tables into this markdown file")
    parser.add_argument("--from-log", type=Path, default=None, metavar="LOG",
                        help="print the table of the runs an unfinished run of this script logged, and stop")
    args = parser.parse_args(argv)
    if args.from_log:
        for setup in args.setups.split(","):
            print(table(setup, from_log(args.from_log, setup), "from its log") + "\n")
        return
    variants = args.variants.split(",")
    if unknown := [v for v in variants if v not in VARIANTS]:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    os.chdir(ROOT)  # the quickstart config's paths are relative to the repository root
    work = args.work or Path(tempfile.mkdtemp(prefix="lorafit-placement-"))
    seeds = list(range(1, args.seeds + 1))
    sections = [f"Measured by `scripts/compare_placement.py` on {compare_methods.machine()}."]
    try:
        budgets = [int(r) for r in args.r.split(",")] if args.r else [None]
    except ValueError:
        parser.error(f"--r {args.r}: give whole ranks, comma-separated (e.g. 16,4,1)")
    if any(r is not None and r < 1 for r in budgets):
        parser.error(f"--r {args.r}: a rank is at least 1")
    for setup in args.setups.split(","):
        for r in budgets:
            tag = setup if r is None else f"{setup}-r{r}"  # names the log's lines and the run folders
            config, lr = compare_methods.setup_config(setup, work / setup, args.small_steps)
            config, label = narrowed(config, setup, work / tag, args.quickstart_steps, r)
            overrides = matched_overrides(config)
            results = []
            for variant in variants:
                print(f"[{tag}] {variant} {overrides[variant]} ...", flush=True)
                results.append(run_variant(variant, overrides[variant], config, lr, work / tag, seeds, args.generate))
            steps = f"{args.small_steps} steps" if setup == "small" else (
                f"{args.quickstart_steps} steps" if args.quickstart_steps else "configs/tiny-quickstart.yaml as shipped")
            sections.append(table(label, results, steps))
            (work / f"placement-{tag}.json").write_text(json.dumps(results, indent=1))
    text = "\n\n".join(sections)
    print("\n" + text)
    if args.write:
        compare_methods.write_doc(args.write, text, TABLE_START, TABLE_END)
        print(f"wrote {args.write}")


if __name__ == "__main__":
    main()
