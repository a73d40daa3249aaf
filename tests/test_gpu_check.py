"""scripts/gpu_check.py: the CPU rehearsal of `make gpu-check` runs every step for real, and its judging functions.

The rehearsal (`gpu_check.py OUT --cpu`) runs once per session, as CI would run it, and the tests read its report.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"
STEPS = ["environment", "gpu-tests", "bench-lora", "bench-qlora", "auto-checkpointing", "plan-vs-measured"]
TINY_VOCAB = 384  # scripts/bench.py's tiny size


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


gc = _load_script()


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory) -> tuple[int, Path, dict]:
    """`python scripts/gpu_check.py OUT --cpu`, as a user (and CI) runs it: (exit code, OUT, the JSON report)."""
    out = tmp_path_factory.mktemp("gpu-report")
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out), "--cpu"], capture_output=True, text=True,
                          timeout=1500)
    report = json.loads((out / "gpu-report.json").read_text())
    return proc.returncode, out, report


def _step(report: dict, name: str) -> dict:
    return next(s for s in report["steps"] if s["name"] == name)


# ------------------------------------------------------------------------------------------------ the rehearsal


@pytest.mark.slow
def test_rehearsal_runs_every_step_and_writes_both_reports(rehearsal):
    rc, out, report = rehearsal
    problems = {s["name"]: s["reason"] for s in report["steps"] if s["status"] != "passed"}
    assert rc == 0 and not problems, problems
    assert [s["name"] for s in report["steps"]] == STEPS
    assert report["mode"] == "cpu" and report["summary"] == {"passed": len(STEPS), "failed": 0, "skipped": 0}
    md = (out / "gpu-report.md").read_text()
    for title in ("## GPU tests", "## bench-lora", "## bench-qlora", "## Memory plan vs measured peak",
                  "## gradient_checkpointing: auto"):
        assert title in md
    for step in report["steps"]:  # every child's output is kept
        assert all((out / "logs" / log).is_file() and (out / "logs" / log).stat().st_size > 0 for log in step["logs"])


@pytest.mark.slow
def test_rehearsal_collects_every_gpu_test_and_skips_each_for_want_of_cuda(rehearsal):
    _, _, report = rehearsal
    data = _step(report, "gpu-tests")["data"]
    defined = re.findall(r"^def (test_\w+)", (ROOT / "tests" / "test_gpu.py").read_text(), re.M)
    assert sorted(t["test"].rsplit("::", 1)[1] for t in data["tests"]) == sorted(defined)
    assert data["counts"] == {"passed": 0, "failed": 0, "skipped": len(defined)}
    assert all(t["message"].startswith("needs ") for t in data["tests"])  # each skip says what it lacks


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bench-lora", "bench-qlora"])
def test_rehearsal_benchmark_measured_both_sides(rehearsal, name):
    _, _, report = rehearsal
    d = _step(report, name)["data"]
    assert d["size"] == "tiny" and d["qlora"] is (name == "bench-qlora")
    for side in ("lorafit", "baseline"):
        s = d[side]
        assert s["steady_tok_s"] > 0 and s["real_tok_s"] > 0 and s["steps"] >= 2
        assert 0.05 < s["peak_gib"] < 16  # the process's peak RSS: a Python with torch, not a 16 GB model
        assert 0 < s["final_loss"] < 2 * math.log(TINY_VOCAB)  # random weights: about log(vocab)
        assert s.get("mfu") is None  # no peak FLOP/s on a CPU
    assert d["lorafit"]["steps"] == report["bench_steps"]
    for key in ("steady_tok_s", "peak_gib"):
        assert d["ratio"][key] == pytest.approx(d["lorafit"][key] / d["baseline"][key])


@pytest.mark.slow
def test_rehearsal_compares_the_plan_with_each_lorafit_runs_peak(rehearsal):
    _, _, report = rehearsal
    runs = {r["run"]: r for r in _step(report, "plan-vs-measured")["data"]["runs"]}
    assert {"bench-lora", "bench-qlora"} <= set(runs) and any(k.startswith("auto-") for k in runs)
    for r in runs.values():
        assert r["plan_gib"] == pytest.approx(sum(r["plan_parts_gib"].values()))
        assert r["ratio"] == pytest.approx(r["measured_gib"] / r["plan_gib"])
        assert r["within"] is (abs(r["ratio"] - 1) <= 0.15)
        assert r["measured_gib"] > r["plan_gib"]  # RSS holds the Python runtime besides the tiny model
    # the plan's weights: the benchmark's parameter count in float32, and 4-bit layers in the QLoRA run
    params = _step(report, "bench-lora")["data"]["params"]
    assert runs["bench-lora"]["plan_parts_gib"]["weights"] == pytest.approx(params * 4 / 2**30)
    assert runs["bench-qlora"]["plan_parts_gib"]["weights"] < runs["bench-lora"]["plan_parts_gib"]["weights"]


@pytest.mark.slow
def test_rehearsal_checks_auto_checkpointing_against_what_fit(rehearsal):
    _, _, report = rehearsal
    d = _step(report, "auto-checkpointing")["data"]
    assert d["boundary_rows"] is None  # a tiny model never needs checkpointing in this machine's RAM
    [run] = d["runs"]
    assert run["setting"] == "auto" and run["choice"] == "off" and run["fit"] is True
    assert run["verdict"].startswith("right") and run["peak_gib"] > 0


# ------------------------------------------------------------------------------------------------ judging


def test_auto_runs_bracket_the_plans_boundary():
    assert gc.auto_runs(bench_batch=2, boundary=9, rows=40)[0] == [("auto", 8), ("off", 9)]
    assert gc.auto_runs(bench_batch=2, boundary=1, rows=40)[0] == [("auto", 1)]
    assert gc.auto_runs(bench_batch=2, boundary=None, rows=40)[0] == [("auto", 2)]
    assert gc.auto_runs(bench_batch=2, boundary=50, rows=40)[0] == [("auto", 2)]  # more rows than the data has


def _child(rc, output=""):
    return gc.Child(rc, 1.0, output)


@pytest.mark.parametrize("run,child,verdict", [
    (dict(setting="auto", choice="off", fit=True, out_of_memory=False, peak_gib=60.0), _child(0), "right"),
    (dict(setting="auto", choice="off", fit=False, out_of_memory=True), _child(1, "CUDA out of memory"), "wrong"),
    (dict(setting="off", choice="off", fit=False, out_of_memory=True), _child(1, "OutOfMemoryError"), "right"),
    (dict(setting="off", choice="off", fit=True, out_of_memory=False, peak_gib=75.0), _child(0), "right"),  # > 90%
    (dict(setting="off", choice="off", fit=True, out_of_memory=False, peak_gib=40.0), _child(0), "wrong"),
    (dict(setting="auto", choice="on", fit=False, out_of_memory=False), _child(1, "KeyError: 'x'"), "error"),
    (dict(setting="auto", choice=None, fit=True, out_of_memory=False, peak_gib=1.0), _child(0), "error"),
    (dict(setting="auto", choice="on", fit=False, out_of_memory=False), _child(None), "error"),
])
def test_auto_checkpointing_verdicts(run, child, verdict):
    assert gc.judge_auto(run, child, capacity_gib=80.0).split(":")[0] == verdict


def test_junit_results_name_each_test_and_its_outcome(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text('<testsuites><testsuite><testcase classname="tests.test_gpu" name="test_a"/>'
                   '<testcase classname="tests.test_gpu" name="test_b"><skipped message="needs a CUDA GPU"/></testcase>'
                   '<testcase classname="tests.test_gpu" name="test_c"><failure message="loss went up: 2.5 &gt; 2.1&#10;more"/>'
                   '</testcase></testsuite></testsuites>')
    assert gc.junit_results(xml) == [
        {"test": "tests.test_gpu::test_a", "outcome": "passed", "message": ""},
        {"test": "tests.test_gpu::test_b", "outcome": "skipped", "message": "needs a CUDA GPU"},
        {"test": "tests.test_gpu::test_c", "outcome": "failed", "message": "loss went up: 2.5 > 2.1"}]
    out = "tests/test_gpu.py::test_a PASSED [ 50%]\ntests/test_gpu.py::test_c FAILED [100%]\n"
    assert [t["outcome"] for t in gc.verbose_results(out)] == ["passed", "failed"]


def test_a_child_past_its_limit_is_stopped_with_its_children(tmp_path):
    check = gc.Check(tmp_path, "cpu", budget_s=60, steps=None, keep_work=False)
    start = time.monotonic()
    # a shell that starts a grandchild: stopping only the shell would leave the sleep running
    child = check.run(["bash", "-c", "sleep 30 & echo started; wait"], "sleepy.log", timeout=1)
    assert child.timed_out and "started" in child.output
    assert time.monotonic() - start < 15
    assert "stopped at its time limit" in gc.child_failure(child, "sleepy")
    check.close()


def test_a_step_that_does_not_fit_the_budget_is_skipped_and_reported(tmp_path):
    check = gc.Check(tmp_path, "cpu", budget_s=5, steps=None, keep_work=False)
    assert check.limit("bench-lora") is None
    step = gc.step_bench(check, qlora=False)
    assert step.status == "skipped" and "time budget" in step.reason
    check.record(step)
    report = json.loads((tmp_path / "gpu-report.json").read_text())
    assert report["summary"]["skipped"] == 1 and "| bench-lora | skipped |" in (tmp_path / "gpu-report.md").read_text()
    check.close()


def test_bad_arguments_exit_2_with_one_line():
    proc = subprocess.run([sys.executable, str(SCRIPT), "out", "--steps", "1"], capture_output=True, text=True)
    assert proc.returncode == 2 and "--steps must be at least 2" in proc.stderr and "Traceback" not in proc.stderr
