"""Data parallel on the CPU: `torchrun --nproc_per_node 2 -m lorafit train` (gloo) against one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import _wait_for, adapter_tensors, assert_same_training, make_config, metrics, train

pytestmark = pytest.mark.slow


def torchrun(config: Path, *args: str, wait: bool = True, fsdp: bool = False):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    if fsdp:  # what accelerate launch --config_file configs/accelerate/fsdp.yaml sets
        env.update(ACCELERATE_USE_FSDP="true", FSDP_VERSION="1", FSDP_SHARDING_STRATEGY="FULL_SHARD")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "lorafit", "train", str(config), *args]
    # a session of its own, so a test can SIGKILL the launcher and every rank at once
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return out


def one_and_two_processes(tmp_path: Path, model_dir: Path, method: str) -> tuple[Path, Path]:
    """`adapter.method` trained for 2 steps by one process at batch 4 and by two (torchrun, gloo) at batch 2: the
    same global batch, so the same updates. Returns the two run folders."""
    from test_train import make_config, train

    one = make_config(tmp_path, model_dir, name="one", batch_size=4, max_steps=2)
    two = make_config(tmp_path, model_dir, name="two", batch_size=2, max_steps=2)
    for cfg in (one, two):
        cfg.write_text(cfg.read_text().replace("  r: 4", f"  method: {method}\n  r: 4"))
    assert train(one) == 0
    torchrun(two)
    return tmp_path / "one", tmp_path / "two"


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_two_processes_at_batch_2_equal_one_at_batch_4(tmp_path, learnable_model_dir, grad_accum):
    one = make_config(tmp_path, learnable_model_dir, name="one", batch_size=4, grad_accum=grad_accum, max_steps=2)
    two = make_config(tmp_path, learnable_model_dir, name="two", batch_size=2, grad_accum=grad_accum, max_steps=2)
    for cfg in (one, two):  # one eval row for two processes: the rank without one must not hang the other
        cfg.write_text(cfg.read_text().replace("  packing: false", "  packing: false\n  eval_fraction: 0.02"))
    assert train(one) == 0
    out = torchrun(two)
    assert_same_training(tmp_path / "one", tmp_path / "two", rtol=1e-4)
    # rank 0 alone writes: one metrics row per step, one summary
    assert [m["step"] for m in metrics(tmp_path / "two") if "loss" in m] == [1, 2]
    evals = [m for m in metrics(tmp_path / "two") if "eval_loss" in m]
    assert len(evals) == 1 and evals[0]["eval_tokens"] > 0
    assert out.count("done: 2 steps") == 1
    # the global token count is the same as one process's
    last = [[m for m in metrics(tmp_path / run) if "tokens" in m][-1] for run in ("one", "two")]
    assert last[0]["tokens"] == last[1]["tokens"]


def straight_and_killed_runs(tmp_path: Path, model_dir: Path, max_steps: int, kill_after: int,
                             fsdp: bool = False) -> Path:
    """Train `straight` to the end and `killed` until checkpoint `kill_after`, then SIGKILL it (dropout on, so a
    resume must restore every rank's RNG). Returns the killed run's config."""
    common = dict(max_steps=max_steps, save_every=4, batch_size=1, keep_checkpoints=100)
    straight = make_config(tmp_path, model_dir, name="straight", **common)
    killed = make_config(tmp_path, model_dir, name="killed", **common)
    for cfg in (straight, killed):
        cfg.write_text(cfg.read_text().replace("dropout: 0.0", "dropout: 0.1"))
    torchrun(straight, fsdp=fsdp)
    proc = torchrun(killed, wait=False, fsdp=fsdp)
    _wait_for(tmp_path / "killed" / "checkpoints" / f"step-{kill_after:06d}" / "state.json", proc)
    os.killpg(proc.pid, signal.SIGKILL)  # launcher and both ranks, as a crashed machine would
    proc.wait()
    assert not (tmp_path / "killed" / "adapter").exists()
    return killed


def test_kill_and_resume_under_two_processes_equals_a_straight_run(tmp_path, learnable_model_dir):
    killed = straight_and_killed_runs(tmp_path, learnable_model_dir, max_steps=24, kill_after=8)
    ckpt = json.loads(sorted((tmp_path / "killed" / "checkpoints").glob("step-*"))[-1].joinpath("state.json")
                      .read_text())
    assert ckpt["world_size"] == 2
    torchrun(killed, "--resume")
    a, b = adapter_tensors(tmp_path / "straight"), adapter_tensors(tmp_path / "killed")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_sigterm_under_two_processes_saves_one_checkpoint(tmp_path, learnable_model_dir):
    config = make_config(tmp_path, learnable_model_dir, max_steps=100000, batch_size=1)
    proc = torchrun(config, wait=False)
    try:
        _wait_for(tmp_path / "run" / "metrics.jsonl", proc)
        os.killpg(proc.pid, signal.SIGTERM)  # torchrun forwards it to both ranks
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:  # never leave a 100000-step run behind
            os.killpg(proc.pid, signal.SIGKILL)
    ckpts = list((tmp_path / "run" / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1, "both ranks must agree on the step they stop at"
    state = json.loads((ckpts[0] / "state.json").read_text())
    assert state["world_size"] == 2 and {p.name for p in ckpts[0].glob("rng-*.pt")} == {"rng-0.pt", "rng-1.pt"}
