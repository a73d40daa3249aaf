"""Faults a long run meets: a checkpoint damaged after it was written, a disk that fills up mid-save, a disk too
small for what the run will write. None of them is reported as a lorafit bug, and none loses a complete checkpoint."""

from __future__ import annotations

import errno
import os
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from test_train import adapter_tensors, make_config, metrics, train

from lorafit import checkpoint, runstate
from lorafit.errors import disk_full_reason


def _run_until_crash(config: Path, monkeypatch, *overrides: str) -> Path:
    """Train (max_steps 6, save_every 2) and stop hard right before the final adapter is written."""

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # the process ends: checkpoints on disk, no adapter

    with monkeypatch.context() as patch:
        patch.setattr(runstate, "save_final_adapter", crash)
        assert train(config, *overrides) == 130
    run = config.parent / "run"
    assert [p.name for p in checkpoint.complete_checkpoints(run)] == ["step-000002", "step-000004"]
    assert not (run / "adapter").exists()
    return run


def _largest_file(folder: Path) -> Path:
    return max((p for p in folder.iterdir() if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("damage", ["cut", "flip"])
def test_resume_skips_a_damaged_newest_checkpoint_and_equals_an_uninterrupted_run(tmp_path, learnable_model_dir,
                                                                                  monkeypatch, capsys, damage):
    common = dict(max_steps=6, save_every=2, keep_checkpoints=3)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    straight = make_config(tmp_path / "a", learnable_model_dir, **common)
    crashed = make_config(tmp_path / "b", learnable_model_dir, **common)
    assert train(straight) == 0
    run = _run_until_crash(crashed, monkeypatch)
    newest = run / "checkpoints" / "step-000004"
    victim = _largest_file(newest)
    data = victim.read_bytes()
    if damage == "cut":  # a file cut short by a crash or a full disk after the save
        victim.write_bytes(data[: len(data) // 2])
    else:  # same size, one byte changed (bit rot, a bad copy): only the checksum can tell
        victim.write_bytes(data[:-100] + bytes([data[-100] ^ 0xFF]) + data[-99:])
    capsys.readouterr()
    assert train(crashed, "--resume") == 0
    err = capsys.readouterr().err
    why = (f"{victim.name} is {len(data) // 2} bytes, {len(data)} were saved (cut short?)" if damage == "cut"
           else f"{victim.name} has changed since it was saved (SHA-256 differs)")
    assert f"skipped checkpoint step-000004: {why}" in err and "resuming from step-000002" in err
    assert "lorafit failure" not in err and "Traceback" not in err
    assert [m["step"] for m in metrics(run) if "loss" in m] == [1, 2, 3, 4, 5, 6]
    a, b = adapter_tensors(tmp_path / "a" / "run"), adapter_tensors(run)
    assert all(torch.equal(a[k], b[k]) for k in a)  # resumed from step 2, it made exactly the same updates
    assert (run / "checkpoints" / "damaged-step-000004").is_dir()  # kept aside, never again taken as the newest


def test_resume_when_every_checkpoint_is_damaged_is_a_clear_input_error(tmp_path, learnable_model_dir, monkeypatch,
                                                                       capsys):
    config = make_config(tmp_path, learnable_model_dir, max_steps=6, save_every=2, keep_checkpoints=3)
    run = _run_until_crash(config, monkeypatch)
    (run / "checkpoints" / "step-000004" / "optimizer.pt").unlink()
    (run / "checkpoints" / "step-000002" / "state.json").write_text("{not json")
    capsys.readouterr()
    assert train(config, "--resume") == 2
    err = capsys.readouterr().err
    assert "no whole checkpoint to resume from" in err and "step-000004: optimizer.pt is missing" in err
    assert "step-000002: state.json cannot be read" in err
    assert "lorafit failure" not in err and "Traceback" not in err


def test_state_json_records_every_files_size_and_checksum(tmp_path, learnable_model_dir, monkeypatch):
    import hashlib
    import json

    config = make_config(tmp_path, learnable_model_dir, max_steps=6, save_every=2, keep_checkpoints=3)
    run = _run_until_crash(config, monkeypatch)
    ckpt = run / "checkpoints" / "step-000004"
    files = json.loads((ckpt / "state.json").read_text())["files"]
    on_disk = {p.name for p in ckpt.iterdir()} - {"state.json"}
    assert set(files) == on_disk and {"trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng-0.pt"} <= on_disk
    for name, record in files.items():
        data = (ckpt / name).read_bytes()
        assert record == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


# ------------------------------------------------------------------------------------------------ disk full


def _enospc(code: int = errno.ENOSPC) -> OSError:
    return OSError(code, os.strerror(code))


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_disk_full_during_a_checkpoint_keeps_the_older_one_and_resume_finishes(tmp_path, learnable_model_dir,
                                                                              monkeypatch, capsys, code):
    real_save = torch.save
    calls = {"optimizer": 0}

    def save_until_the_disk_fills(obj, f, *args, **kwargs):
        if getattr(f, "name", "").endswith("optimizer.pt"):
            calls["optimizer"] += 1
            if calls["optimizer"] == 2:  # the second checkpoint (step 4): half the file, then the disk is full
                f.write(b"\0" * 4096)
                raise _enospc(code)
        return real_save(obj, f, *args, **kwargs)

    config = make_config(tmp_path, learnable_model_dir, max_steps=6, save_every=2, keep_checkpoints=3)
    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", save_until_the_disk_fills)
        assert train(config) == 1
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]  # the message, one line (model loading may print progress before it)
    run = tmp_path / "run"
    reason = os.strerror(code).lower()
    assert line.startswith(f"error: {reason} while writing checkpoint {run / 'checkpoints' / 'step-000004'}")
    assert f"the newest complete checkpoint is {run / 'checkpoints' / 'step-000002'}" in line
    assert "free space and continue with --resume" in line
    assert "lorafit failure" not in err and "Traceback" not in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002"]  # no partial folder kept
    assert train(config, "--resume") == 0
    assert [m["step"] for m in metrics(run) if "loss" in m] == [1, 2, 3, 4, 5, 6]


def test_disk_full_while_writing_the_adapter_names_the_checkpoint_to_resume(tmp_path, learnable_model_dir,
                                                                           monkeypatch, capsys):
    import safetensors.torch
    from safetensors import SafetensorError

    real_save_file = safetensors.torch.save_file

    def full_for_the_adapter(tensors, filename, *args, **kwargs):
        if str(filename).endswith("adapter_model.safetensors"):  # the error safetensors (Rust) raises on ENOSPC
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                                  '"No space left on device" })')
        return real_save_file(tensors, filename, *args, **kwargs)

    config = make_config(tmp_path, learnable_model_dir, max_steps=4, save_every=2)
    monkeypatch.setattr(safetensors.torch, "save_file", full_for_the_adapter)
    assert train(config) == 1
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    run = tmp_path / "run"
    assert line.startswith(f"error: no space left on device while writing the adapter {run / 'adapter'}")
    assert f"newest complete checkpoint is {run / 'checkpoints' / 'step-000002'}" in line and "--resume" in line
    assert "lorafit failure" not in err and "Traceback" not in err
    assert sorted(p.name for p in run.iterdir() if "adapter" in p.name) == []  # neither adapter/ nor its temp folder


def test_disk_full_reason_reads_oserrors_and_library_messages():
    assert disk_full_reason(_enospc()) == "no space left on device"
    assert disk_full_reason(_enospc(errno.EDQUOT)) == "disk quota exceeded"
    assert disk_full_reason(_enospc(errno.EROFS)) == "read-only file system"
    try:
        try:
            raise _enospc()
        except OSError as inner:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0") from inner
    except RuntimeError as outer:
        assert disk_full_reason(outer) == "no space left on device"  # found through the cause
    assert disk_full_reason(OSError(errno.ENOENT, "No such file or directory")) is None
    assert disk_full_reason(ValueError("bad value")) is None


# ------------------------------------------------------------------------------------------------ free disk at start


Usage = namedtuple("Usage", "total used free")


def test_a_disk_too_small_for_the_run_is_refused_before_anything_is_written(tmp_path, learnable_model_dir,
                                                                          monkeypatch, capsys):
    config = make_config(tmp_path, learnable_model_dir, max_steps=2)
    monkeypatch.setattr(runstate.shutil, "disk_usage", lambda path: Usage(10 * 1024**2, 9 * 1024**2, 1024**2))
    assert train(config) == 2
    err = capsys.readouterr().err
    assert "1.0 MiB free on its disk, the run needs about" in err and "lower train.keep_checkpoints" in err
    assert not (tmp_path / "run").exists()
    monkeypatch.setattr(runstate.shutil, "disk_usage", lambda path: Usage(10 * 1024**3, 0, 10 * 1024**3))
    assert train(config) == 0


def test_disk_estimate_matches_what_the_run_writes(tmp_path, learnable_model_dir, monkeypatch):
    from lorafit.adapters import attach_lora, param_report
    from lorafit.model import load_model

    config = make_config(tmp_path, learnable_model_dir, max_steps=6, save_every=2, keep_checkpoints=3)
    run = _run_until_crash(config, monkeypatch, "adapter.r=64")  # weights large enough to dominate the framing
    model = load_model(str(learnable_model_dir), dtype="float32")
    attach_lora(model, "all-linear", r=64, alpha=12)
    need = runstate.disk_needed(param_report(model).trainable, "adamw", keep=3, total_steps=6, save_every=2)
    written = sum(p.stat().st_size for p in (run / "checkpoints" / "step-000004").iterdir())
    assert written <= need.checkpoint <= written + runstate.CHECKPOINT_FIXED_BYTES  # an upper bound, not a loose one
    # measured: weights + moments are 0.97 of what was written (the rest: RNG states, framing, state.json)
    assert 0.95 * written < need.checkpoint - runstate.CHECKPOINT_FIXED_BYTES <= written
    assert need.checkpoints == 3  # periodic saves at steps 2 and 4, plus the one being written / the interrupt's
    assert train(config, "--resume", "adapter.r=64") == 0
    adapter_file = (run / "adapter" / "adapter_model.safetensors").stat().st_size
    assert 0.95 * adapter_file < need.adapter <= adapter_file
    # an 8B LoRA r=16 on every linear layer (41.94M trainable, AdamW) writes ~0.5 GB per checkpoint
    big = runstate.disk_needed(41_943_040, "adamw", keep=2, total_steps=1000, save_every=100)
    assert 0.45e9 < big.checkpoint < 0.55e9 and big.checkpoints == 3


def test_resume_counts_the_checkpoints_already_on_disk(tmp_path):
    need = runstate.DiskNeed(checkpoint=100 * 1024**2, adapter=10 * 1024**2, checkpoints=3)
    run = tmp_path / "run"
    run.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runstate.shutil, "disk_usage",
                      lambda path: Usage(0, 0, need.total - 2 * need.checkpoint))  # 2 kept ones already written
        runstate._check_free_space(run, need, existing=2)
        with pytest.raises(runstate.RunDirError, match="free on its disk"):
            runstate._check_free_space(run, need, existing=0)


def test_a_damaged_base_model_file_is_reported_as_such(tmp_path, tiny_model_dir):
    from lorafit.errors import ModelLoadError
    from lorafit.model import load_model

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="a weight file is damaged or incomplete") as err:
        load_model(str(model_dir), dtype="float32")
    assert str(model_dir) in str(err.value) and "copy or download the model again" in str(err.value)


def test_any_other_write_the_disk_refuses_is_not_reported_as_a_lorafit_bug(tmp_path, learnable_model_dir,
                                                                          monkeypatch, capsys):
    from lorafit.reporting import RunReporter

    def full(self, row, log):  # e.g. appending to metrics.jsonl on a full disk
        raise _enospc()

    monkeypatch.setattr(RunReporter, "step", full)
    config = make_config(tmp_path, learnable_model_dir, max_steps=2)
    assert train(config) == 1
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: no space left on device (OSError: ") and "free space and run the command again" in line
    assert "lorafit failure" not in err and "Traceback" not in err


RANK_1_DISK_FULL = """
import errno, os, sys
import torch

real_save = torch.save

def save(obj, f, *args, **kwargs):  # rank 1's disk fills while it writes its RNG state into the step-4 checkpoint
    if os.environ.get("RANK") == "1" and str(getattr(f, "name", "")).endswith("step-000004/rng-1.pt"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real_save(obj, f, *args, **kwargs)

torch.save = save
from lorafit.cli import main
main(sys.argv[1:])
"""


@pytest.mark.slow
def test_disk_full_on_one_of_two_processes_stops_both_with_one_message(tmp_path, learnable_model_dir):
    import subprocess
    import sys

    from test_distributed import torchrun

    script = tmp_path / "rank1_full.py"
    script.write_text(RANK_1_DISK_FULL)
    config = make_config(tmp_path, learnable_model_dir, max_steps=6, save_every=2, batch_size=2, keep_checkpoints=3)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           "train", str(config)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)  # a hang would time out
    assert done.returncode != 0
    run = tmp_path / "run"
    assert f"error: no space left on device while writing checkpoint {run / 'checkpoints' / 'step-000004'}" \
        in done.stderr
    assert "lorafit failure" not in done.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002"]
    torchrun(config, "--resume")
    assert [m["step"] for m in metrics(run) if "loss" in m] == [1, 2, 3, 4, 5, 6]
