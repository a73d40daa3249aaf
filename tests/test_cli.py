"""The command line: help, the one error handler, exit codes, and `validate`'s plan."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lorafit.cli import app, main

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["train", "validate", "data", "merge", "eval", "generate", "export"]


def run_main(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(args)
    out, err = capsys.readouterr()
    return info.value.code, out, err


@pytest.fixture
def tiny_config(tmp_path, tiny_model_dir) -> Path:
    data = tmp_path / "train.jsonl"
    rows = [{"instruction": f"Repeat {i}", "output": str(i)} for i in range(10)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = tmp_path / "tiny.yaml"
    path.write_text(textwrap.dedent(f"""
        model:
          path: {tiny_model_dir}
          dtype: float32
        adapter:
          r: 4
          alpha: 12
          targets: all-linear
        data:
          train:
            - path: {data}
              format: alpaca
          max_length: 128
        train:
          batch_size: 2
          grad_accum: 2
          precision: fp32
        output:
          dir: {tmp_path / 'run'}
    """))
    return path


def test_help_lists_every_command():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in COMMANDS:
        assert f"  {command} " in result.output


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_help_shows_an_example(command):
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0
    assert "Example:" in result.output and "lorafit " + command in result.output


def test_missing_config_exits_2_with_one_line_and_no_traceback(capsys, tmp_path):
    code, out, err = run_main(["validate", str(tmp_path / "nope.yaml")], capsys)
    assert code == 2
    assert err.strip() == f"error: {tmp_path / 'nope.yaml'}: config file not found"
    assert "Traceback" not in err + out


def test_bad_override_exits_2(capsys, tiny_config):
    code, _, err = run_main(["validate", str(tiny_config), "adapter.rank=4"], capsys)
    assert code == 2 and "adapter.rank: unknown key (did you mean adapter.r?)" in err


def test_usage_error_exits_2(capsys):
    code, _, err = run_main(["merge", "somewhere"], capsys)
    assert code == 2 and "--out" in err


def test_debug_flag_anywhere_shows_the_traceback(capsys, tmp_path):
    code, _, err = run_main(["validate", str(tmp_path / "nope.yaml"), "--debug"], capsys)
    assert code == 2 and "Traceback" in err and "config file not found" in err


def test_debug_environment_variable_shows_the_traceback(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFIT_DEBUG", "1")
    code, _, err = run_main(["validate", str(tmp_path / "nope.yaml")], capsys)
    assert code == 2 and "Traceback" in err


def test_internal_failure_exits_1_and_says_it_is_not_the_users_fault(capsys, tiny_config, monkeypatch):
    import lorafit.plan

    def broken(cfg, processes=None, fsdp=None):
        raise RuntimeError("boom")

    monkeypatch.setattr(lorafit.plan, "make_plan", broken)
    code, _, err = run_main(["validate", str(tiny_config)], capsys)
    assert code == 1 and "RuntimeError: boom" in err and "--debug" in err and "Traceback" not in err


def test_validate_prints_resolved_config_and_plan_for_a_local_model(capsys, tiny_config, tiny_model_dir):
    code, out, err = run_main(["validate", str(tiny_config), "adapter.r=8"], capsys)
    assert code == 0, err
    assert "Resolved config" in out and "r: 8" in out
    # independent count: every linear layer but the head gets r × (in + out) parameters
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    expected = sum(8 * (m.in_features + m.out_features) for m in linears)
    assert f"{len(linears)} modules" in out
    assert f"{expected / 1e3:.2f}K trainable" in out
    assert "train.jsonl (alpaca): 10 rows" in out
    assert "≤ 3 per epoch" in out  # 10 rows / (2 × 2) rows per step, fewer when packed
    assert "memory (est.)" in out


def test_validate_plans_for_several_processes(capsys, tiny_config):
    code, out, err = run_main(["validate", str(tiny_config), "--processes", "2"], capsys)
    assert code == 0, err
    assert "2 per device × 2 accumulation × 2 process(es) = 8" in out
    assert "≤ 2 per epoch" in out  # 10 rows / 8 rows per step, rounded up


def test_validate_counts_a_bundled_8b_architecture_offline(capsys):
    code, out, err = run_main(["validate", str(ROOT / "configs/llama-8b-qlora.yaml")], capsys)
    assert code == 0, err
    # Llama-3.1-8B: 32 layers × r=16 × (sum of in+out over q,k,v,o,gate,up,down = 81920) = 41,943,040
    assert "224 modules" in out and "41.94M trainable / 8.03B total" in out
    assert "not counted" in out  # the hub dataset cannot be counted offline, and the plan says so


SHIPPED = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "accelerate" not in p.parts)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_prints_its_plan_offline(capsys, monkeypatch, path):
    monkeypatch.chdir(ROOT)  # relative paths in configs are relative to where lorafit runs: the repo root
    code, out, err = run_main(["validate", str(path.relative_to(ROOT))], capsys)
    assert code == 0, err
    assert "Plan" in out and "trainable /" in out and "memory (est.)" in out


def test_train_dry_run_stops_before_training(capsys, tiny_config, tmp_path):
    code, out, _ = run_main(["train", str(tiny_config), "--dry-run"], capsys)
    assert code == 0 and "Plan" in out
    assert not (tmp_path / "run").exists()


def test_real_subprocess_exit_codes_and_no_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("LORAFIT_DEBUG", None)
    ok = subprocess.run([sys.executable, "-m", "lorafit", "--help"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and "validate" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  path: x\n  dtype: [oops\n")
    res = subprocess.run([sys.executable, "-m", "lorafit", "validate", str(bad)], capture_output=True, text=True,
                         env=env)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [f"error: {bad}:4:1: YAML syntax error: expected ',' or ']', but got "
                                               f"'<stream end>'"]
