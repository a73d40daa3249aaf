"""`make gpu-check`: one command that proves (or disproves) lorafit on a GPU and leaves the numbers behind.

    python scripts/gpu_check.py gpu-report              # on the GPU machine: ≤ 8 minutes on one H100/H200
    python scripts/gpu_check.py /tmp/rehearsal --cpu    # the same steps at tiny sizes on the CPU (tests/test_gpu_check.py)

Steps, each in a child process with a time limit, each recorded as passed / failed / skipped with the reason:

  environment         torch, CUDA, the GPU(s) and their memory, which optional packages are importable
  gpu-tests           `pytest -m gpu` (the modules that have GPU tests): the CUDA paths, one line per test
  bench-lora          scripts/bench.py --size 8b --steps N: lorafit against transformers + PEFT + Trainer on the same
                      data (random Llama-3.1-8B-shaped weights built on the GPU, none written to disk): steady tokens/s,
                      MFU and peak memory of both sides, and the ratios
  bench-qlora         the same with a 4-bit NF4 base (bf16 compute)
  plan-vs-measured    `lorafit validate`'s memory estimate against each lorafit run's measured peak
                      (torch.cuda.max_memory_allocated); off by more than 15% fails
  auto-checkpointing  `gradient_checkpointing: auto` at the largest batch the plan runs without checkpointing (must
                      fit) and, forced off, at the smallest it would turn it on for (should not fit)

With --cpu the sizes are tiny (the tests' Llama, a few steps) and the measured peak is the process's peak RSS, which
holds the Python runtime too: plan-vs-measured is computed but not judged there. The report (gpu-report.json and
gpu-report.md) is rewritten after every step, so a run cut short still leaves what it measured; each child's output
is in OUT_DIR/logs/. Exit code: 0 when no step failed, 1 otherwise, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "scripts" / "bench.py"
PLAN_TOLERANCE = 0.15  # measured peak vs the plan's estimate, relative
GiB = 1024**3

# Per-mode sizes and each step's time cap in seconds (the whole run is also held to --budget-s).
PROFILES = {
    # 8b sides: ~15 s of imports and tokenizing, the random 8B weights built on the GPU, then the steps
    "gpu": dict(size="8b", steps=20, examples=None, budget=480, min_s=30,
                caps={"environment": 60, "gpu-tests": 120, "bench-lora": 150, "bench-qlora": 170, "auto": 80}),
    # generous caps: a shared CPU can be several times slower than an idle one, and these only catch hangs
    "cpu": dict(size="tiny", steps=3, examples=24, budget=900, min_s=10,
                caps={"environment": 120, "gpu-tests": 240, "bench-lora": 300, "bench-qlora": 300, "auto": 180}),
}
MAX_AUTO_BATCH = 64  # largest batch (rows) searched for the plan's checkpointing boundary

ENV_PROBE = r"""
import importlib, json, platform, torch
out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.cuda.is_available(),
       "gpus": torch.cuda.device_count(), "packages": {}}
if out["cuda"]:
    p = torch.cuda.get_device_properties(0)
    out.update(device=p.name, capacity_bytes=p.total_memory, cuda_version=torch.version.cuda)
else:
    import os
    out.update(device="cpu", capacity_bytes=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
for name in ("transformers", "peft", "accelerate", "bitsandbytes", "datasets", "flash_attn", "pytest"):
    try:
        out["packages"][name] = getattr(importlib.import_module(name), "__version__", "?")
    except Exception as e:
        out["packages"][name] = None
        out.setdefault("missing", {})[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
print("ENV " + json.dumps(out))
"""


@dataclass
class Step:
    """One step's outcome as the report holds it."""

    name: str
    status: str = "skipped"  # passed | failed | skipped
    reason: str = ""  # why it failed or was skipped; for a pass, a one-line result
    seconds: float = 0.0
    logs: list[str] = field(default_factory=list)  # files under OUT_DIR/logs
    data: dict = field(default_factory=dict)


@dataclass
class Child:
    """A finished (or stopped) child process."""

    rc: int | None  # None: stopped at its time limit
    seconds: float
    output: str

    @property
    def timed_out(self) -> bool:
        return self.rc is None

    def tail(self, n: int = 1500) -> str:
        return self.output[-n:].strip()


class Check:
    """The run: mode, time budget, folders, the steps done so far, and writing the report."""

    def __init__(self, out: Path, mode: str, budget_s: float, steps: int | None, keep_work: bool):
        self.out, self.mode, self.profile = out, mode, PROFILES[mode]
        self.budget_s = budget_s or self.profile["budget"]
        self.bench_steps = steps or self.profile["steps"]
        self.started = time.monotonic()
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="lorafit-gpu-check-"))
        self.keep_work = keep_work
        self.steps: list[Step] = []
        self.environment: dict = {}
        self.lorafit_runs: list[dict] = []  # {label, config, run_dir, checkpointing} of runs beside the benchmark's

    # ------------------------------------------------------------------------------------------------ time

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def limit(self, cap_key: str) -> float | None:
        """Seconds a child of this step may run: its cap, or what is left of the budget; None: too little left."""
        limit = min(self.profile["caps"][cap_key], self.left() - 5)
        return limit if limit >= self.profile["min_s"] else None

    # ------------------------------------------------------------------------------------------------ children

    def run(self, cmd: list[str], log_name: str, timeout: float, env: dict | None = None) -> Child:
        """Run `cmd` from the repository root, output to logs/`log_name`; stopped (its whole process group) at
        `timeout` seconds."""
        log = self.logs / log_name
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                    "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
                    "LORAFIT_CACHE": str(self.work / "cache"), **(env or {})}
        start = time.monotonic()
        with log.open("w") as fh:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=fh, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc: int | None = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                rc = None
                _stop(proc)
        return Child(rc, time.monotonic() - start, log.read_text(errors="replace"))

    # ------------------------------------------------------------------------------------------------ report

    def record(self, step: Step) -> Step:
        self.steps.append(step)
        self.write_report()
        mark = {"passed": "ok  ", "failed": "FAIL", "skipped": "skip"}[step.status]
        print(f"[{mark}] {step.name} ({step.seconds:.0f} s){': ' + step.reason if step.reason else ''}", flush=True)
        return step

    def step(self, name: str) -> Step | None:
        return next((s for s in self.steps if s.name == name), None)

    def report(self) -> dict:
        counts = {k: sum(s.status == k for s in self.steps) for k in ("passed", "failed", "skipped")}
        return {"mode": self.mode, "budget_s": self.budget_s, "seconds": round(time.monotonic() - self.started, 1),
                "bench_steps": self.bench_steps, "environment": self.environment, "summary": counts,
                "steps": [asdict(s) for s in self.steps]}

    def write_report(self) -> None:
        report = self.report()
        (self.out / "gpu-report.json").write_text(json.dumps(report, indent=1))
        (self.out / "gpu-report.md").write_text(render_markdown(report))

    def close(self) -> None:
        if not self.keep_work:
            shutil.rmtree(self.work, ignore_errors=True)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the child's process group (lorafit saves and exits on it), SIGKILL what is left after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def skipped(name: str, reason: str) -> Step:
    return Step(name, "skipped", reason)


def child_failure(child: Child, what: str) -> str:
    if child.timed_out:
        return f"{what} stopped at its time limit ({child.seconds:.0f} s)"
    return f"{what} exited {child.rc}: {last_error_line(child.output)}"


def last_error_line(output: str) -> str:
    """The most telling line of a failed child's output: its last error line, else its last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if re.search(r"error|exception|out of memory|failed", line, re.I)]
    return (errors or lines or ["(no output)"])[-1][:300]


def is_out_of_memory(output: str) -> bool:
    return bool(re.search(r"out of memory|OutOfMemoryError", output, re.I))


# ------------------------------------------------------------------------------------------------ environment


def step_environment(check: Check) -> Step:
    """Versions, the device and its memory, and which optional packages import (the later steps read these)."""
    child = check.run([sys.executable, "-c", ENV_PROBE], "environment.log", check.profile["caps"]["environment"])
    line = next((x for x in child.output.splitlines() if x.startswith("ENV ")), None)
    if child.rc != 0 or line is None:
        return Step("environment", "failed", child_failure(child, "the environment probe"), child.seconds,
                    ["environment.log"])
    check.environment = json.loads(line[4:])
    env = check.environment
    memory = f"{env['capacity_bytes'] / GiB:.1f} GiB"
    where = f"{env['gpus']} × {env['device']} ({memory} each)" if env["cuda"] else f"CPU ({memory} RAM)"
    missing = [k for k, v in env["packages"].items() if v is None]
    summary = f"{where}; torch {env['torch']}" + (f"; not importable: {', '.join(missing)}" if missing else "")
    return Step("environment", "passed", summary, child.seconds, ["environment.log"], data=env)


def missing_package(check: Check, name: str) -> str | None:
    """Why `name` cannot be imported here (None when it can)."""
    if check.environment.get("packages", {}).get(name):
        return None
    why = check.environment.get("missing", {}).get(name, "not importable")
    return f"{name} is not importable ({why}); `make wheels` on a networked machine, then `make install` here"


# ------------------------------------------------------------------------------------------------ (a) GPU tests


def gpu_test_files() -> list[str]:
    """Test modules that mark tests `gpu`: collecting only these, a module whose CPU-side extras (a server's packages,
    say) are not installed on the GPU machine cannot break the run."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py") if "mark.gpu" in p.read_text())


def step_gpu_tests(check: Check) -> Step:
    """`pytest -m gpu` over the test modules that have GPU tests, one result per test."""
    limit = check.limit("gpu-tests")
    if limit is None:
        return skipped("gpu-tests", "the time budget ran out")
    if (why := missing_package(check, "pytest")) is not None:
        return skipped("gpu-tests", why)
    junit = check.logs / "gpu-tests.xml"
    junit.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", *gpu_test_files(), "-v", "-rs", "-p", "no:cacheprovider",
           f"--junitxml={junit}"]
    child = check.run(cmd, "gpu-tests.log", limit)
    tests = junit_results(junit) if junit.is_file() else verbose_results(child.output)
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "skipped")}
    step = Step("gpu-tests", "passed", "", child.seconds, ["gpu-tests.log"], data={"counts": counts, "tests": tests})
    summary = f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped"
    if child.timed_out or child.rc != 0:
        step.status, step.reason = "failed", f"{summary}; " + child_failure(child, "pytest -m gpu")
    elif not tests:
        step.status, step.reason = "failed", "pytest collected no GPU test"
    elif check.mode == "gpu" and counts["passed"] == 0:
        step.status, step.reason = "failed", f"{summary}: every GPU test was skipped (is CUDA usable from pytest?)"
    else:
        step.reason = summary
    return step


def junit_results(path: Path) -> list[dict]:
    """[{test, outcome, message}] from pytest's JUnit XML."""
    results = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome, message = "failed", child.get("message", "")
            elif child.tag == "skipped" and outcome != "failed":
                outcome, message = "skipped", child.get("message", "")
        results.append({"test": f"{case.get('classname', '')}::{case.get('name', '')}", "outcome": outcome,
                        "message": message.splitlines()[0][:300] if message else ""})
    return results


def verbose_results(output: str) -> list[dict]:
    """The same from `pytest -v` lines, for a run stopped before it wrote the XML."""
    found = re.findall(r"^(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR)", output, re.M)
    names = {"PASSED": "passed", "FAILED": "failed", "ERROR": "failed", "SKIPPED": "skipped"}
    return [{"test": test, "outcome": names[word], "message": ""} for test, word in found]


# ------------------------------------------------------------------------------------------------ (b) benchmark


def step_bench(check: Check, qlora: bool) -> Step:
    """scripts/bench.py cut to a few steps: both sides' steady tokens/s, MFU, peak memory and the ratios."""
    name = "bench-qlora" if qlora else "bench-lora"
    limit = check.limit(name)
    if limit is None:
        return skipped(name, "the time budget ran out")
    for package in ["peft"] + (["bitsandbytes"] if qlora else []):
        if (why := missing_package(check, package)) is not None:
            return skipped(name, why)
    work, result = check.work / name, check.work / f"{name}.json"
    p = check.profile
    cmd = [sys.executable, str(BENCH), "--size", p["size"], "--steps", str(check.bench_steps), "--weights", "random",
           "--work", str(work), "--json", str(result)] + (["--qlora"] if qlora else [])
    if p["examples"]:
        cmd += ["--examples", str(p["examples"])]
    child = check.run(cmd, f"{name}.log", limit)
    step = Step(name, "failed", "", child.seconds, [f"{name}.log"])
    if (work / "run-0" / "metrics.jsonl").is_file():  # lorafit's side ran: its peak is measured even if the rest failed
        step.data["lorafit_run"] = {"config": str(work / "lorafit-0.yaml"), "run_dir": str(work / "run-0")}
    if child.rc != 0 or not result.is_file():
        step.reason = child_failure(child, "scripts/bench.py")
        return step
    bench = json.loads(result.read_text())
    step.data.update(bench_summary(bench))
    r = step.data["ratio"]
    step.status = "passed"
    step.reason = (f"lorafit / baseline: {r['steady_tok_s']:.2f}× steady tokens/s, {r['peak_gib']:.2f}× peak memory"
                   + (f"; lorafit MFU {step.data['lorafit']['mfu']:.1%}" if step.data["lorafit"].get("mfu") else ""))
    return step


def bench_summary(bench: dict) -> dict:
    """The figures the report shows, per side, and lorafit / baseline ratios."""
    keys = ("steady_tok_s", "real_tok_s", "padded_tok_s", "mfu", "peak_gib", "final_loss", "steps", "train_s", "wall_s")
    sides = {side: {k: bench["sides"][side].get(k) for k in keys} for side in ("lorafit", "baseline")}
    a, b = sides["lorafit"], sides["baseline"]
    ratio = {k: a[k] / b[k] for k in ("steady_tok_s", "real_tok_s", "peak_gib", "mfu") if a.get(k) and b.get(k)}
    shape = {k: bench["plan"][k] for k in ("examples", "rows", "rows_per_step", "mean_len", "max_len")}
    return {**sides, "ratio": ratio, "data": shape, "params": bench["run"]["params"], "size": bench["run"]["size"],
            "qlora": bench["run"]["qlora"]}


# ------------------------------------------------------------------------------------------------ (d) auto checkpointing


def checkpointing_boundary(config: Path, capacity: float) -> int | None:
    """The smallest batch (rows per step) for which the plan turns `gradient_checkpointing: auto` on on a device of
    `capacity` bytes; None when that is above MAX_AUTO_BATCH."""
    from lorafit import plan
    from lorafit.config import load_config

    shape = plan.model_shape(load_config(config).config)
    for batch in range(1, MAX_AUTO_BATCH + 1):
        cfg = load_config(config, [f"train.batch_size={batch}"]).config
        if plan.checkpointing_needed(cfg, shape, capacity):
            return batch
    return None


def auto_runs(bench_batch: int, boundary: int | None, rows: int) -> tuple[list[tuple[str, int]], str]:
    """Which runs test auto's choice: (setting, batch) pairs and a note on why these.

    The plan's boundary is where its choice flips: auto just below it must fit without checkpointing, and forced off at
    the boundary it should not fit (or fit only above the plan's 90% limit), else auto turns it on needlessly.
    """
    if boundary is None:
        return [("auto", bench_batch)], (f"the plan keeps checkpointing off up to {MAX_AUTO_BATCH} rows on this "
                                         f"device; auto is checked at the benchmark's batch")
    if boundary > rows:
        return [("auto", min(bench_batch, rows))], (f"the plan turns checkpointing on from {boundary} rows, more than "
                                                    f"the {rows} rows of data; auto is checked at the benchmark's batch")
    if boundary == 1:
        return [("auto", 1)], "the plan needs checkpointing from one row: auto must turn it on and fit"
    return [("auto", boundary - 1), ("off", boundary)], (f"the plan turns checkpointing on from {boundary} rows: "
                                                         f"auto at {boundary - 1}, and forced off at {boundary}")


def step_auto(check: Check) -> Step:
    """`gradient_checkpointing: auto`: its choice against what actually fit, at the plan's boundary."""
    name = "auto-checkpointing"
    bench = check.step("bench-lora")
    base = check.work / "bench-lora" / "lorafit-0.yaml"
    if bench is None or not base.is_file() or "data" not in bench.data:
        return skipped(name, "needs bench-lora's model, data and config, which it did not leave")
    capacity = check.environment["capacity_bytes"]
    boundary = checkpointing_boundary(base, capacity)
    runs, note = auto_runs(bench.data["data"]["rows_per_step"], boundary, bench.data["data"]["rows"] // 2)
    step = Step(name, "passed", "", 0.0, data={"boundary_rows": boundary, "capacity_gib": capacity / GiB,
                                                 "note": note, "runs": []})
    for setting, batch in runs:
        limit = check.limit("auto")
        if limit is None:
            step.data["runs"].append({"setting": setting, "batch": batch, "verdict": "not run: the time budget ran out"})
            continue
        run = auto_run(check, base, setting, batch, limit)
        step.seconds += run.pop("seconds")
        step.logs.append(run["log"])
        step.data["runs"].append(run)
    verdicts = [r["verdict"] for r in step.data["runs"]]
    if any(v.startswith(("wrong", "error")) for v in verdicts):
        step.status = "failed"
    elif all(v.startswith("not run") for v in verdicts):
        step.status = "skipped"
    step.reason = "; ".join(f"{r['setting']} at {r['batch']} rows: {r['verdict']}" for r in step.data["runs"])
    return step


def auto_run(check: Check, base: Path, setting: str, batch: int, limit: float) -> dict:
    """One lorafit run of 2 steps at `batch` rows with checkpointing `setting` ("auto" or "off"), judged."""
    tag = f"auto-{setting}-{batch}"
    spec = json.loads(base.read_text())
    spec["train"].update(batch_size=batch, max_steps=2, gradient_checkpointing="auto" if setting == "auto" else False)
    spec["output"]["dir"] = str(check.work / tag)
    config = check.work / f"{tag}.yaml"
    config.write_text(json.dumps(spec, indent=1))
    cmd = [sys.executable, str(BENCH), "--role", "lorafit", "--config", str(config),
           "--result", str(check.work / f"{tag}.json")]
    child = check.run(cmd, f"{tag}.log", limit)
    found = re.search(r"gradient checkpointing \(auto\): (on|off)", child.output)
    choice = found.group(1) if found else ("off" if setting == "off" else None)
    oom = is_out_of_memory(child.output)
    fit = child.rc == 0
    peak = measured_peak_gib(check.work / tag) if fit else None
    run = {"setting": setting, "batch": batch, "choice": choice, "fit": fit, "out_of_memory": oom,
           "peak_gib": peak, "log": f"{tag}.log", "seconds": child.seconds}
    run["verdict"] = judge_auto(run, child, check.environment["capacity_bytes"] / GiB)
    if fit and choice is not None:
        check.lorafit_runs.append({"label": tag, "config": str(config), "run_dir": str(check.work / tag),
                                   "checkpointing": choice == "on"})
    return run


def judge_auto(run: dict, child: Child, capacity_gib: float) -> str:
    """right / wrong / error, with the evidence, for one run of `auto_run`."""
    from lorafit.plan import FIT_FRACTION

    if child.timed_out:
        return f"error: stopped at its time limit ({child.seconds:.0f} s)"
    if not run["fit"] and not run["out_of_memory"]:
        return f"error: {last_error_line(child.output)}"
    if run["setting"] == "auto":
        if run["choice"] is None:
            return "error: the run did not print its gradient checkpointing (auto) choice"
        if run["fit"]:
            return f"right: auto chose {run['choice']} and it fit ({run['peak_gib']:.1f} of {capacity_gib:.1f} GiB)"
        return f"wrong: auto chose {run['choice']} and the run ran out of memory"
    if not run["fit"]:
        return "right: without checkpointing it ran out of memory, so auto's 'on' is needed here"
    if run["peak_gib"] > FIT_FRACTION * capacity_gib:
        return f"right: without checkpointing it fit only above {FIT_FRACTION:.0%} ({run['peak_gib']:.1f} GiB)"
    return (f"wrong: auto would turn checkpointing on, but without it the run fit in {run['peak_gib']:.1f} of "
            f"{capacity_gib:.1f} GiB (the plan overestimates)")


# ------------------------------------------------------------------------------------------------ (c) plan vs measured


def measured_peak_gib(run_dir: Path) -> float | None:
    """The highest `memory_gib` a run logged: torch.cuda.max_memory_allocated on a GPU, peak RSS on the CPU."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    peaks = [r["memory_gib"] for r in rows if "memory_gib" in r]
    return max(peaks) if peaks else None


def plan_estimate_gib(config: Path, checkpointing: bool) -> dict[str, float]:
    """`lorafit validate`'s memory estimate for `config`, by part, in GiB, with the checkpointing the run used."""
    from lorafit import plan
    from lorafit.config import load_config

    cfg = load_config(config).config
    parts = plan.estimate_memory(cfg, plan.model_shape(cfg), checkpointing=checkpointing)
    return {k: v / GiB for k, v in parts.items()}


def step_plan(check: Check) -> Step:
    """The memory plan against each lorafit run's measured peak: the ratio, and whether it is within 15%."""
    name = "plan-vs-measured"
    runs = []
    for bench_name in ("bench-lora", "bench-qlora"):
        bench = check.step(bench_name)
        if bench is not None and "lorafit_run" in bench.data:
            spec = json.loads(Path(bench.data["lorafit_run"]["config"]).read_text())
            runs.append({"label": bench_name, **bench.data["lorafit_run"],
                         "checkpointing": spec["train"]["gradient_checkpointing"]})
    runs += check.lorafit_runs  # the auto-checkpointing runs that fit
    start = time.monotonic()
    rows = []
    for run in runs:
        measured = measured_peak_gib(Path(run["run_dir"]))
        if measured is None:
            continue
        parts = plan_estimate_gib(Path(run["config"]), bool(run["checkpointing"]))
        estimate = sum(parts.values())
        ratio = measured / estimate
        rows.append({"run": run["label"], "checkpointing": bool(run["checkpointing"]), "plan_gib": estimate,
                     "measured_gib": measured, "ratio": ratio, "within": abs(ratio - 1) <= PLAN_TOLERANCE,
                     "plan_parts_gib": parts})
    step = Step(name, "passed", "", time.monotonic() - start, data={"runs": rows, "tolerance": PLAN_TOLERANCE})
    if not rows:
        step.status, step.reason = "skipped", "no lorafit run finished to compare with (see the bench steps)"
        return step
    summary = ", ".join(f"{r['run']} {r['ratio']:.2f}×" for r in rows)
    off = [r["run"] for r in rows if not r["within"]]
    if check.mode == "cpu":
        step.reason = f"measured / plan: {summary} (CPU: peak RSS holds the Python runtime too; not judged)"
    elif off:
        step.status = "failed"
        step.reason = f"measured / plan: {summary}; off by more than {PLAN_TOLERANCE:.0%}: {', '.join(off)}"
    else:
        step.reason = f"measured / plan: {summary}; all within {PLAN_TOLERANCE:.0%}"
    return step


# ------------------------------------------------------------------------------------------------ report


def render_markdown(report: dict) -> str:
    """gpu-report.md: the steps at a glance, then each step's figures."""
    env, counts = report["environment"], report["summary"]
    where = (f"{env.get('gpus')} × {env.get('device')} ({env.get('capacity_bytes', 0) / GiB:.1f} GiB), CUDA "
             f"{env.get('cuda_version')}" if env.get("cuda") else "CPU rehearsal (tiny sizes)") if env else "unknown"
    lines = [f"# lorafit GPU check ({report['mode']})", "",
             f"{where}; torch {env.get('torch', '?')}, Python {env.get('python', '?')}. "
             f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped in "
             f"{report['seconds']:.0f} s (budget {report['budget_s']:.0f} s). Logs: logs/.", "",
             "| step | status | seconds | result |", "|---|---|---|---|"]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']:.0f} | {_cell(s['reason'])} |" for s in report["steps"]]
    for s in report["steps"]:
        section = SECTIONS.get(s["name"].split("-")[0] if s["name"].startswith("bench") else s["name"])
        if section and s["data"]:
            lines += ["", *section(s)]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _tests_section(step: dict) -> list[str]:
    out = ["## GPU tests (pytest -m gpu)", "", "| test | outcome | note |", "|---|---|---|"]
    return out + [f"| {t['test']} | {t['outcome']} | {_cell(t['message'])} |" for t in step["data"].get("tests", [])]


def _bench_section(step: dict) -> list[str]:
    d = step["data"]
    if "lorafit" not in d:
        return []
    title = f"## {step['name']}: {d['size']} ({d['params'] / 1e9:.2f}B parameters{', 4-bit NF4 base' if d['qlora'] else ''})"
    head = "| | steady tok/s | real tok/s | MFU | peak GiB | final loss | steps |"
    out = [title, "", f"{d['data']['examples']} examples, {d['data']['rows_per_step']} packed rows per lorafit step "
           f"(baseline: padded batches). Steady = after the first step.", "", head, "|---|---|---|---|---|---|---|"]
    for side, label in (("lorafit", "lorafit"), ("baseline", "transformers + PEFT + Trainer")):
        s = d[side]
        mfu = f"{s['mfu']:.1%}" if s.get("mfu") else "-"
        out.append(f"| {label} | {s['steady_tok_s']:.0f} | {s['real_tok_s']:.0f} | {mfu} | {s['peak_gib']:.2f} | "
                   f"{s['final_loss']:.3f} | {s['steps']} |")
    r = d["ratio"]
    fmt = lambda k: f"{r[k]:.2f}×" if k in r else "-"  # noqa: E731
    out.append(f"| lorafit / baseline | {fmt('steady_tok_s')} | {fmt('real_tok_s')} | {fmt('mfu')} | "
               f"{fmt('peak_gib')} | | |")
    return out


def _plan_section(step: dict) -> list[str]:
    out = ["## Memory plan vs measured peak", "", "| run | checkpointing | plan GiB | measured GiB | measured / plan | "
           f"within {step['data']['tolerance']:.0%} |", "|---|---|---|---|---|---|"]
    for r in step["data"]["runs"]:
        out.append(f"| {r['run']} | {'on' if r['checkpointing'] else 'off'} | {r['plan_gib']:.2f} | "
                   f"{r['measured_gib']:.2f} | {r['ratio']:.2f} | {'yes' if r['within'] else 'no'} |")
    return out


def _auto_section(step: dict) -> list[str]:
    d = step["data"]
    out = ["## gradient_checkpointing: auto", "", d["note"] + f" (device {d['capacity_gib']:.1f} GiB).", "",
           "| batch (rows) | setting | choice | fit | peak GiB | verdict |", "|---|---|---|---|---|---|"]
    for r in d["runs"]:
        peak = f"{r['peak_gib']:.2f}" if r.get("peak_gib") else "-"
        out.append(f"| {r['batch']} | {r['setting']} | {r.get('choice') or '-'} | {r.get('fit', '-')} | {peak} | "
                   f"{_cell(r['verdict'])} |")
    return out


SECTIONS = {"gpu-tests": _tests_section, "bench": _bench_section, "plan-vs-measured": _plan_section,
            "auto-checkpointing": _auto_section}


# ------------------------------------------------------------------------------------------------ main


def guarded(check: Check, name: str, fn, *args) -> Step:
    """Run one step; a bug in this script fails that step, not the whole check."""
    start = time.monotonic()
    try:
        step = fn(check, *args)
    except Exception as e:  # noqa: BLE001 - recorded in the report with its type; the other steps still run
        step = Step(name, "failed", f"gpu_check.py raised {type(e).__name__}: {e}", time.monotonic() - start)
    return check.record(step)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="example: python scripts/gpu_check.py gpu-report  (make gpu-check)")
    ap.add_argument("out_dir", help="folder for gpu-report.json, gpu-report.md and logs/ (created)")
    ap.add_argument("--cpu", action="store_true", help="rehearse every step at tiny sizes on the CPU")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="time for the whole check in seconds (default: 480 on a GPU, 900 with --cpu)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per benchmark side (default 20; 3 with --cpu)")
    ap.add_argument("--keep-work", action="store_true", help="keep the working folder (models' configs, data, runs)")
    args = ap.parse_args(argv)
    if args.budget_s is not None and args.budget_s <= 0:
        ap.error("--budget-s must be positive")
    if args.steps is not None and args.steps < 2:
        ap.error("--steps must be at least 2 (the steady rate is measured after the first step)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"error: cannot create {out}: {e.strerror or e}", file=sys.stderr)
        return 2
    check = Check(out, "cpu" if args.cpu else "gpu", args.budget_s, args.steps, args.keep_work)
    try:
        env = guarded(check, "environment", step_environment)
        if env.status != "passed":
            return 1
        if check.mode == "gpu" and not check.environment["cuda"]:
            print("error: torch sees no CUDA GPU here; `python scripts/gpu_check.py OUT_DIR --cpu` rehearses the "
                  "steps on the CPU", file=sys.stderr)
            return 2
        guarded(check, "gpu-tests", step_gpu_tests)
        guarded(check, "bench-lora", step_bench, False)
        guarded(check, "bench-qlora", step_bench, True)
        guarded(check, "auto-checkpointing", step_auto)
        guarded(check, "plan-vs-measured", step_plan)
    finally:
        check.write_report()
        check.close()
    print(f"report: {out / 'gpu-report.md'} and {out / 'gpu-report.json'}")
    return 1 if check.report()["summary"]["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
