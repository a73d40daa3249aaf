"""The training loop end to end on a tiny Llama: learning, accumulation equivalence, resume, signals, NaN guard."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorafit.cli import main

WORDS = ["stone", "river", "cloud", "apple", "green", "house", "light", "water", "table", "night", "bread", "chair"]


def write_task(path: Path, n: int = 48) -> Path:
    """A learnable task: repeat a word twice."""
    rows = [{"instruction": "Repeat the word twice.", "input": WORDS[i % len(WORDS)],
             "output": f"{WORDS[i % len(WORDS)]} {WORDS[i % len(WORDS)]}"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_config(path: Path, model_dir: Path, out_dir: Path, data: Path, fmt: str, train_keys: dict,
                 **data_keys) -> Path:
    """A tiny run's config at `path`: fp32 `model_dir`, LoRA r 4 / alpha 12, one data file of format `fmt`,
    `data_keys` (max_length, packing, ...) beside data.train, and `train_keys` as given."""
    def block(keys: dict) -> str:
        return "".join(f"  {k}: {v}\n" for k, v in keys.items())

    path.write_text(f"model:\n  path: {model_dir}\n  dtype: float32\n"
                    f"adapter:\n  r: 4\n  alpha: 12\n  dropout: 0.0\n"
                    f"data:\n  train:\n    - path: {data}\n      format: {fmt}\n{block(data_keys)}"
                    f"train:\n{block(train_keys)}"
                    f"output:\n  dir: {out_dir}\n")
    return path


def make_config(tmp_path: Path, learnable_model_dir: Path, name: str = "run", **train) -> Path:
    data = write_task(tmp_path / "task.jsonl")
    train_keys = {"batch_size": 4, "grad_accum": 1, "lr": 1e-2, "max_steps": 6, "warmup": 0, "precision": "fp32",
                  "gradient_checkpointing": False, "log_every": 1, "seed": 7, **train}
    return write_config(tmp_path / f"{name}.yaml", learnable_model_dir, tmp_path / name, data, "alpaca", train_keys,
                        max_length=256, packing="false")


def train(config: Path, *args: str) -> int:
    with pytest.raises(SystemExit) as info:
        main(["train", str(config), *args])
    return info.value.code


def adapter_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def straight_and_resumed(tmp_path: Path, model_dir: Path, *args: str) -> tuple[Path, Path]:
    """Two runs of 6 steps with dropout 0.1 and a checkpoint every 2: one straight through, one interrupted at its
    end (after the step-4 checkpoint, before the adapter is written) and then resumed. Returns their run folders;
    a resume that restores everything gives the same adapter bit for bit.
    """
    from lorafit import runstate

    configs = []
    for name in ("straight", "resumed"):
        (tmp_path / name).mkdir()
        config = make_config(tmp_path / name, model_dir, max_steps=6, save_every=2, keep_checkpoints=3)
        config.write_text(config.read_text().replace("dropout: 0.0", "dropout: 0.1"))  # the RNG must resume too
        configs.append(config)
    assert train(configs[0], *args) == 0
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runstate, "save_final_adapter", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        assert train(configs[1], *args) == 130
    assert train(configs[1], *args, "--resume") == 0
    return tmp_path / "straight" / "run", tmp_path / "resumed" / "run"


def assert_qlora_run_merges(tmp_path: Path, model_dir: Path, capsys, *args: str) -> None:
    """Two steps on a 4-bit base (float32 compute, checkpointing on), then `lorafit merge`, which checks the merged
    model's logits against the adapter itself and exits 0 only when they agree."""
    config = make_config(tmp_path, model_dir, max_steps=2, gradient_checkpointing="true")
    assert train(config, *args, "model.quantization.bits=4", "model.quantization.compute_dtype=float32") == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["merge", str(tmp_path / "run"), "--out", str(tmp_path / "merged"), "--dtype", "float32"])
    assert info.value.code == 0, capsys.readouterr().err


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_training(a_dir: Path, b_dir: Path, rtol: float) -> None:
    """Two runs made the same updates: equal per-step loss and gradient norm, and (nearly) equal adapters.

    The gradient norm is the decisive check: Adam is almost blind to the scale of the gradient, so a wrong
    normalization (per process instead of global tokens, a missing world-size factor) barely moves the adapter
    but changes the norm by a whole factor. The adapters are compared element-wise with care: Adam's update is
    about lr·m/√v, so a weight whose gradient nearly cancels across steps or micro-batches turns last-ulp differences
    of a different summation order into differences of a fraction of lr. At most 1% of weights may differ by more
    than `rtol` of their tensor's scale (measured: 0.8% after two steps of 2 processes × 2 micro-steps vs one).
    """
    ma, mb = metrics(a_dir), metrics(b_dir)
    assert [sorted(m) for m in ma] == [sorted(m) for m in mb]  # same rows, train and eval, in the same order
    for x, y in zip(ma, mb):
        for key in ("loss", "grad_norm", "eval_loss"):
            if key in x:
                assert abs(x[key] - y[key]) <= rtol * abs(x[key]), (x["step"], key, x[key], y[key])
    a, b = adapter_tensors(a_dir), adapter_tensors(b_dir)
    assert a.keys() == b.keys()
    off = total = 0
    for k in a:
        scale = a[k].abs().max().clamp_min(1e-12)
        off += int(((a[k] - b[k]).abs() > rtol * scale).sum())
        total += a[k].numel()
    assert off <= 0.01 * total, f"{off} of {total} adapter weights differ"
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)  # the adapter actually trained


def test_loss_falls_and_run_dir_is_complete(tmp_path, learnable_model_dir, capsys):
    config = make_config(tmp_path, learnable_model_dir, max_steps=30, eval_every=10)
    config.write_text(config.read_text().replace("  packing: false", "  packing: false\n  eval_fraction: 0.1"))
    assert train(config) == 0
    run = tmp_path / "run"
    rows = [m for m in metrics(run) if "loss" in m]
    assert len(rows) == 30 and rows[-1]["loss"] < 0.5 * rows[0]["loss"]
    assert {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed", "memory_gib"} <= set(rows[0])
    assert 0 < rows[0]["supervised_tokens"] < rows[0]["tokens"] < rows[1]["tokens"]
    evals = [m for m in metrics(run) if "eval_loss" in m]
    assert [e["step"] for e in evals] == [10, 20, 30]
    assert (run / "config.yaml").is_file() and (run / "loss.png").stat().st_size > 1000
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (run / "adapter").iterdir()}
    out = capsys.readouterr().out
    assert "lorafit eval" in out and "lorafit merge" in out


def test_accumulation_equals_one_large_batch(tmp_path, learnable_model_dir):
    big = make_config(tmp_path, learnable_model_dir, name="big", batch_size=4, grad_accum=1, max_steps=3)
    acc = make_config(tmp_path, learnable_model_dir, name="acc", batch_size=1, grad_accum=4, max_steps=3)
    assert train(big) == 0 and train(acc) == 0
    assert_same_training(tmp_path / "big", tmp_path / "acc", rtol=1e-5)


def test_existing_run_dir_is_not_overwritten(tmp_path, learnable_model_dir, capsys):
    config = make_config(tmp_path, learnable_model_dir, max_steps=1)
    assert train(config) == 0
    before = adapter_tensors(tmp_path / "run")
    capsys.readouterr()
    assert train(config) == 2
    assert "already holds files; add --resume" in capsys.readouterr().err
    after = adapter_tensors(tmp_path / "run")
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("override,needle", [
    ("model.path=/nonexistent/model", "does not exist"),
    ("adapter.targets=[no_such_proj]", "no_such_proj"),
    ("data.train=[{path: /nonexistent/train.jsonl, format: alpaca}]", "/nonexistent/train.jsonl"),
])
def test_a_refused_start_leaves_no_output_dir_and_does_not_block_the_next(tmp_path, learnable_model_dir, capsys,
                                                                          override, needle):
    config = make_config(tmp_path, learnable_model_dir, max_steps=1)
    assert train(config, override) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert train(config) == 0
    assert "/nonexistent" not in (tmp_path / "run" / "config.yaml").read_text()


def test_config_yaml_left_by_an_older_failed_start_does_not_block_the_next(tmp_path, learnable_model_dir):
    from lorafit.runstate import CONFIG_HEADER

    config = make_config(tmp_path, learnable_model_dir, max_steps=1)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(CONFIG_HEADER + "model: {path: /nonexistent/model}\n")
    assert train(config) == 0
    assert "/nonexistent" not in (tmp_path / "run" / "config.yaml").read_text()


def test_output_dir_holding_the_users_own_config_is_refused(tmp_path, learnable_model_dir, capsys):
    exp = tmp_path / "exp"
    exp.mkdir()
    config = make_config(exp, learnable_model_dir, max_steps=1)
    user_config = exp / "config.yaml"
    user_config.write_text(config.read_text().replace(str(exp / "run"), str(exp)))
    before = user_config.read_text()
    assert train(user_config) == 2
    assert "is the folder of the config itself" in capsys.readouterr().err
    assert user_config.read_text() == before


def test_resume_without_a_checkpoint_says_what_to_do(tmp_path, learnable_model_dir, capsys):
    config = make_config(tmp_path, learnable_model_dir, max_steps=2)
    assert train(config) == 0
    capsys.readouterr()
    assert train(config, "--resume") == 2
    assert "this run is finished (adapter/ is saved)" in capsys.readouterr().err
    (tmp_path / "run" / "adapter").rename(tmp_path / "moved")
    assert train(config, "--resume") == 2
    assert "stopped before its first checkpoint" in capsys.readouterr().err


def test_checkpoints_are_ordered_by_step_number_not_by_name(tmp_path):
    from lorafit.checkpoint import complete_checkpoints, newest_checkpoint

    for step in (999_999, 1_000_000, 20):
        d = tmp_path / "checkpoints" / f"step-{step:06d}"
        d.mkdir(parents=True)
        (d / "state.json").write_text("{}")
    (tmp_path / "checkpoints" / ".tmp-step-1000001").mkdir()  # incomplete: never counted
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-000020", "step-999999", "step-1000000"]
    assert newest_checkpoint(tmp_path).name == "step-1000000"


def test_changed_config_refuses_to_resume(tmp_path, learnable_model_dir, capsys):
    config = make_config(tmp_path, learnable_model_dir, max_steps=4, save_every=2)
    assert train(config) == 0
    capsys.readouterr()
    assert train(config, "--resume", "train.lr=1e-3", "adapter.r=8", "data.max_length=128") == 2
    err = capsys.readouterr().err
    assert "differs from the run's" in err and "in: adapter.r, data.max_length;" in err  # lr alone may change


def test_resume_may_lower_the_learning_rate_and_records_it(tmp_path, learnable_model_dir, capsys):
    config = make_config(tmp_path, learnable_model_dir, max_steps=4, save_every=2, keep_checkpoints=5)
    assert train(config) == 0
    capsys.readouterr()
    assert train(config, "--resume", "train.lr=1e-3") == 0
    assert "warning: resuming with changed train.lr" in capsys.readouterr().err
    assert "lr: 0.001" in (tmp_path / "run" / "config.yaml").read_text()
    assert [m["step"] for m in metrics(tmp_path / "run") if "loss" in m] == [1, 2, 3, 4]


def test_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, learnable_model_dir, capsys, monkeypatch):
    import lorafit.data

    real = lorafit.data.causal_lm_loss
    calls = {"n": 0}

    def poisoned(logits, labels):
        calls["n"] += 1
        loss, n = real(logits, labels)
        return (loss * float("nan"), n) if calls["n"] == 4 else (loss, n)

    monkeypatch.setattr(lorafit.data, "causal_lm_loss", poisoned)
    config = make_config(tmp_path, learnable_model_dir, max_steps=6, save_every=2)
    assert train(config) == 1
    err = capsys.readouterr().err
    assert "loss became nan at step 4" in err and "step-000002" in err and "Traceback" not in err
    ckpt = tmp_path / "run" / "checkpoints" / "step-000002"
    assert (ckpt / "state.json").is_file() and not (tmp_path / "run" / "adapter").exists()


def _spawn(config: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "lorafit", "train", str(config), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.communicate()}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"{path} did not appear")
        time.sleep(0.05)


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, learnable_model_dir):
    # dropout on, so the resumed run must restore RNG state to match
    common = dict(max_steps=40, save_every=4, batch_size=2, keep_checkpoints=100)  # step 8 must stay to be seen
    straight = make_config(tmp_path, learnable_model_dir, name="straight", **common)
    killed = make_config(tmp_path, learnable_model_dir, name="killed", **common)
    for cfg in (straight, killed):
        cfg.write_text(cfg.read_text().replace("dropout: 0.0", "dropout: 0.1"))
    assert train(straight) == 0
    proc = _spawn(killed)
    _wait_for(tmp_path / "killed" / "checkpoints" / "step-000008" / "state.json", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "adapter").exists(), "the run finished before it was killed"
    assert train(killed, "--resume") == 0
    a, b = adapter_tensors(tmp_path / "straight"), adapter_tensors(tmp_path / "killed")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [m["step"] for m in metrics(tmp_path / "killed") if "loss" in m]
    assert steps == list(range(1, 41))  # no step lost or logged twice


def test_sigterm_saves_a_checkpoint_and_exits_130(tmp_path, learnable_model_dir):
    config = make_config(tmp_path, learnable_model_dir, max_steps=100000, batch_size=1)
    proc = _spawn(config)
    try:
        _wait_for(tmp_path / "run" / "metrics.jsonl", proc)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()  # never leave a 100000-step run behind
    assert proc.returncode == 130, err
    assert "checkpoint saved" in err and "--resume" in err and "Traceback" not in err
    ckpts = list((tmp_path / "run" / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1 and (ckpts[0] / "state.json").is_file()


def test_qlora_run_with_8bit_optimizer_trains_and_merges(tmp_path, learnable_model_dir, capsys):
    config = make_config(tmp_path, learnable_model_dir, max_steps=3, optimizer="adamw_8bit", gradient_checkpointing="true")
    overrides = ["model.quantization.bits=4", "model.quantization.compute_dtype=float32"]
    assert train(config, *overrides) == 0
    adapter = adapter_tensors(tmp_path / "run")
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
    with pytest.raises(SystemExit) as info:
        main(["merge", str(tmp_path / "run"), "--out", str(tmp_path / "merged"), "--dtype", "float32"])
    assert info.value.code == 0, capsys.readouterr().err
    assert any(p.suffix == ".safetensors" for p in (tmp_path / "merged").iterdir())


def test_missing_tracker_package_is_named_before_anything_is_written(tmp_path, learnable_model_dir, capsys):
    config = make_config(tmp_path, learnable_model_dir, trackers="[wandb]")
    assert train(config) == 2
    assert "train.trackers: wandb is not installed; pip install wandb" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_unwritable_output_dir_is_reported_before_training(tmp_path, learnable_model_dir, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    config = make_config(tmp_path, learnable_model_dir)
    assert train(config, f"output.dir={blocker / 'run'}") == 2
    assert "is not writable" in capsys.readouterr().err


def test_auto_checkpointing_is_on_only_when_the_plan_without_it_does_not_fit():
    from lorafit import plan
    from lorafit.config import load_config

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs" / "llama-8b-qlora.yaml", ["train.gradient_checkpointing=auto"]).config
    shape = plan.model_shape(cfg)
    without = sum(plan.estimate_memory(cfg, shape, checkpointing=False).values())
    with_it = sum(plan.estimate_memory(cfg, shape, checkpointing=True).values())
    assert with_it < 0.5 * without  # 8B at 4 × 2048 tokens: activations dominate
    assert plan.checkpointing_needed(cfg, shape, capacity=80 * 1024**3) is False  # an 80 GB GPU holds it
    assert plan.checkpointing_needed(cfg, shape, capacity=24 * 1024**3) is True  # a 24 GB one does not
    assert plan.checkpointing_needed(cfg, shape, capacity=without / plan.FIT_FRACTION * 0.99) is True
    # FSDP over 2 processes halves the weights, so a device just too small for one copy may fit without it
    assert plan.checkpointing_needed(cfg, shape, capacity=without / plan.FIT_FRACTION * 0.99, shards=2) is False


def test_auto_checkpointing_prints_its_choice_and_trains(tmp_path, learnable_model_dir, capsys):
    config = make_config(tmp_path, learnable_model_dir, max_steps=2, gradient_checkpointing="auto")
    assert train(config) == 0
    out = capsys.readouterr().out
    assert "gradient checkpointing (auto): off (estimated" in out  # a tiny model in this machine's RAM
    assert "(float32, sdpa attention (auto))" in out  # the run header: model.attention auto; no FA2 in float32
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
