"""The run directory and resume state: `config.yaml`, `checkpoints/step-NNNNNN/`, the final `adapter/`.

A checkpoint is written into `checkpoints/.tmp-step-NNNNNN/` and renamed when complete, so the newest
`step-*` folder is always whole: a run killed mid-save leaves only a `.tmp-*` folder, which the next start removes.
Each checkpoint holds the trainable weights (exact names), a PEFT-format adapter, the optimizer and scheduler
state, every process's RNG states, and progress (step, tokens, metrics so far).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from lorafit import parallel
from lorafit.config import Config, config_diff
from lorafit.errors import ConfigError, RunDirError

CHECKPOINTS = "checkpoints"
MIN_FREE_BYTES = 256 * 1024**2  # refuse to start with less free disk than this in output.dir
CONFIG_HEADER = "# Resolved by lorafit train (extends and overrides applied). --resume compares against it.\n"


@dataclass
class Progress:
    """Where a run is. Saved in every checkpoint; a resumed run continues from exactly here."""

    step: int = 0  # optimizer steps done
    tokens: int = 0  # input tokens processed, padding excluded (all processes)
    supervised: int = 0  # tokens with a loss term (all processes)
    elapsed: float = 0.0  # seconds of training before this process started
    metrics: list[dict[str, Any]] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ run dir


def prepare_run_dir(run_dir: Path, cfg: Config, resume: bool, config_path: Path) -> None:
    """Create (or, with `resume`, check) the run directory and write `config.yaml`. Main process only.

    Raises:
        RunDirError: the folder holds another run (without --resume), has nothing to resume, or is not writable.
        ConfigError: --resume with a config that differs from the run's; the differing keys are named.
    """
    config_file = run_dir / "config.yaml"
    if config_path.resolve() == config_file.resolve():
        raise RunDirError(f"output.dir {run_dir} is the folder of the config itself: lorafit would write its "
                          f"resolved config over {config_path}; choose another output.dir")
    if resume:
        changed = _check_resumable(run_dir, cfg)
        if changed:  # recorded, so the next --resume compares against what this one ran with
            print(f"warning: resuming with changed {', '.join(changed)}; where these change the math (lr, "
                  f"max_grad_norm) the result differs from an uninterrupted run", file=sys.stderr, flush=True)
            config_file.write_text(CONFIG_HEADER + cfg.to_yaml())
    elif run_dir.exists() and not _only_a_failed_start(run_dir):
        raise RunDirError(f"output.dir {run_dir} already holds files; add --resume to continue that run, or choose "
                          f"another folder (output.dir=... on the command line)")
    _check_writable(run_dir)
    for tmp in (run_dir / CHECKPOINTS).glob(".tmp-*"):  # a save that was killed half-way
        shutil.rmtree(tmp, ignore_errors=True)
    if not resume:
        config_file.write_text(CONFIG_HEADER + cfg.to_yaml())


def _only_a_failed_start(run_dir: Path) -> bool:
    """True for an empty folder, or one holding only the config.yaml of a start that failed before training."""
    files = list(run_dir.iterdir())
    if not files:
        return True
    config_file = run_dir / "config.yaml"
    return files == [config_file] and config_file.read_text().startswith(CONFIG_HEADER)


# Keys a resumed run may change: how it reports and saves, and the two knobs one turns after a diverged run.
# Anything else (data, model, adapter, batch, schedule length) would make the checkpoint a different run's.
RESUMABLE_CHANGES = frozenset({"train.log_every", "train.eval_every", "train.save_every", "train.keep_checkpoints",
                               "train.trackers", "train.lr", "train.max_grad_norm"})


def _check_resumable(run_dir: Path, cfg: Config) -> list[str]:
    """Refuse to resume a run that cannot be; returns the keys that changed in ways a resume allows."""
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise RunDirError(f"{run_dir}: no run to resume here (no config.yaml); start without --resume")
    changed = config_diff(yaml.safe_load(config_file.read_text()), cfg.to_dict())
    refused = [k for k in changed if k not in RESUMABLE_CHANGES]
    if refused:
        raise ConfigError(f"--resume: the config differs from the run's {config_file} in: {', '.join(refused)}; "
                          f"resume with the same config, or train into a new output.dir")
    if newest_checkpoint(run_dir) is None:
        finished = (run_dir / "adapter").is_dir()
        raise RunDirError(f"{run_dir}: " + ("this run is finished (adapter/ is saved); nothing to resume" if finished
                          else "it stopped before its first checkpoint, so there is nothing to resume; move or "
                               f"delete the folder (rm -r {run_dir}) and start again, and set train.save_every to "
                               f"keep checkpoints"))
    return changed


def _check_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise RunDirError(f"output.dir {run_dir} is not writable: {e.strerror or e}") from None
    free = shutil.disk_usage(run_dir).free
    if free < MIN_FREE_BYTES:
        raise RunDirError(f"output.dir {run_dir}: only {free / 1024**2:.0f} MiB free on its disk; checkpoints need "
                          f"more. Free some space or choose another output.dir")


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints (those with state.json), oldest first by step number."""
    found = [p for p in (run_dir / CHECKPOINTS).glob("step-*") if (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    done = complete_checkpoints(run_dir)
    return done[-1] if done else None


# ------------------------------------------------------------------------------------------------ save


def _rng_state() -> dict[str, Any]:
    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(run_dir: Path, accelerator, model, optimizer, scheduler, progress, keep: int) -> Path:
    """Write `checkpoints/step-NNNNNN/` atomically (all processes call this; rank 0 writes the shared parts).

    Under FSDP the weights and optimizer state are gathered whole first, so the files are the same as one
    process would write (the optimizer's keyed by parameter name rather than position, and `state.json` says so).
    """
    from safetensors.torch import save_file

    final = run_dir / CHECKPOINTS / f"step-{progress.step:06d}"
    tmp = run_dir / CHECKPOINTS / f".tmp-step-{progress.step:06d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
    if parallel.is_sharded(model) or accelerator.is_main_process:  # collective under FSDP: every process gathers
        weights = parallel.trainable_state(model)
        optimizer_state = parallel.optimizer_state(model, _inner(optimizer))
    if accelerator.is_main_process:
        save_file(weights, tmp / "trainable.safetensors")
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if accelerator.scaler is not None:  # fp16 loss scale: without it a resumed run skips steps anew
            torch.save(accelerator.scaler.state_dict(), tmp / "scaler.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {"step": progress.step, "tokens": progress.tokens, "supervised": progress.supervised,
                 "elapsed": progress.elapsed, "world_size": accelerator.num_processes,
                 "fsdp": parallel.is_sharded(model), "metrics": progress.metrics}
        (tmp / "state.json").write_text(json.dumps(state))  # last file in: its presence marks a complete save
        _fsync_dir(tmp)
        if final.exists():  # a step saved twice (interrupt right on a save_every step): the newer wins
            shutil.rmtree(final)
        os.replace(tmp, final)
        _rotate(run_dir, keep)
    accelerator.wait_for_everyone()
    return final


def _inner(optimizer):
    """The torch optimizer inside Accelerate's wrapper (FSDP's state functions need the real one)."""
    return getattr(optimizer, "optimizer", optimizer)


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def _rotate(run_dir: Path, keep: int) -> None:
    for old in complete_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ load


def load_training_state(run_dir: Path, accelerator, model, optimizer, scheduler) -> Progress:
    """Restore weights, optimizer, scheduler, this process's RNG and progress from the newest checkpoint.

    Also rewrites `metrics.jsonl` to what it held at that checkpoint, so rows logged after it are not duplicated.
    """
    from safetensors.torch import load_file

    ckpt = newest_checkpoint(run_dir)
    if ckpt is None:
        raise RunDirError(f"{run_dir}: no complete checkpoint to resume from; start again without --resume")
    state = json.loads((ckpt / "state.json").read_text())
    if state["world_size"] != accelerator.num_processes:  # the global batch and the data order depend on it
        raise RunDirError(f"{ckpt}: saved by {state['world_size']} process(es); resume with the same number "
                          f"(now {accelerator.num_processes})")
    sharded = parallel.is_sharded(model)
    if state.get("fsdp", False) != sharded:  # the optimizer state is keyed differently
        launch = "with the FSDP launch config" if state.get("fsdp") else "without FSDP (torchrun, or the DDP config)"
        raise RunDirError(f"{ckpt}: saved by a run {'with' if state.get('fsdp') else 'without'} FSDP; resume it "
                          f"{launch}")
    parallel.load_trainable_state(model, load_file(ckpt / "trainable.safetensors"), where=str(ckpt))
    parallel.load_optimizer_state(model, _inner(optimizer), torch.load(ckpt / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=False))
    if accelerator.scaler is not None and (ckpt / "scaler.pt").is_file():
        accelerator.scaler.load_state_dict(torch.load(ckpt / "scaler.pt", weights_only=False))
    _set_rng_state(torch.load(ckpt / f"rng-{accelerator.process_index}.pt", weights_only=False))
    metrics = state["metrics"]
    if accelerator.is_main_process:
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    return Progress(step=state["step"], tokens=state["tokens"], supervised=state["supervised"],
                    elapsed=state["elapsed"], metrics=metrics)


def save_final_adapter(run_dir: Path, cfg: Config, accelerator, model, tokenizer) -> Path:
    """The run's `adapter/` folder in PEFT format, with the tokenizer and lorafit's config beside it.

    Every process calls this (under FSDP the adapter is gathered from all of them); the main process writes.
    """
    from lorafit.checkpoint import save_adapter

    weights = parallel.trainable_state(model) if parallel.is_sharded(model) else None
    path = run_dir / "adapter"
    if accelerator.is_main_process:
        a = cfg.adapter
        base = cfg.model.path
        if Path(base).is_dir():
            base = str(Path(base).resolve())
        # lorafit.yaml: merge and eval read the quantization settings the adapter was trained against from it
        save_adapter(parallel.unwrap(model), path, base_model_name_or_path=base, r=a.r, alpha=a.alpha,
                     dropout=a.dropout, targets=a.targets, rslora=a.rslora, dora=a.method == "dora",
                     tokenizer=tokenizer, extra_files={"lorafit.yaml": cfg.to_yaml()}, weights=weights)
    accelerator.wait_for_everyone()
    return path
