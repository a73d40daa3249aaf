"""The training state --resume reads: `checkpoints/step-NNNNNN/`.

A checkpoint is written into `checkpoints/.tmp-step-NNNNNN/` and renamed when complete, so the newest
`step-*` folder is always whole: a run killed mid-save leaves only a `.tmp-*` folder, which the next start removes.
Each checkpoint holds the trainable weights (exact names), the optimizer and scheduler state, every process's RNG
states, and progress (step, tokens, metrics so far). The adapter files themselves are `lorafit.adapters.peft_io`'s.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorafit import parallel
from lorafit.errors import DiskFullError, RunDirError, disk_full_reason

CHECKPOINTS = "checkpoints"
METHOD_STATE = "method_state.pt"  # the adapter method's training state (AdaLoRA's importance scores and ranks)


@dataclass
class Progress:
    """Where a run is. Saved in every checkpoint; a resumed run continues from exactly here."""

    step: int = 0  # optimizer steps done
    tokens: int = 0  # input tokens processed, padding excluded (all processes)
    supervised: int = 0  # tokens with a loss term (all processes)
    elapsed: float = 0.0  # seconds of training before this process started
    metrics: list[dict[str, Any]] = field(default_factory=list)
    data: dict[str, int] = field(default_factory=dict)  # data.streaming: where the stream stands


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


def save_training_state(run_dir: Path, accelerator, model, optimizer, scheduler, progress, keep: int,
                        hooks=None) -> Path:
    """Write `checkpoints/step-NNNNNN/` atomically (all processes call this; rank 0 writes the shared parts).

    `hooks` (the adapter method's `TrainingHooks`) with a state (AdaLoRA's importance scores) add `method_state.pt`.

    Under FSDP the weights and optimizer state are gathered whole first, so the files are the same as one
    process would write (the optimizer's keyed by parameter name rather than position, and `state.json` says so).
    `state.json`, written last, records every file's size and SHA-256, which `--resume` checks.

    Raises:
        DiskFullError: the disk (or quota) ran out; the half-written folder is removed, older checkpoints are kept.
    """
    from safetensors.torch import save_file

    final = run_dir / CHECKPOINTS / f"step-{progress.step:06d}"
    tmp = run_dir / CHECKPOINTS / f".tmp-step-{progress.step:06d}"
    main = accelerator.is_main_process

    def make_folder() -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)

    def write_shared() -> None:
        save_file(weights, tmp / "trainable.safetensors")
        _torch_save(optimizer_state, tmp / "optimizer.pt")
        _torch_save(scheduler.state_dict(), tmp / "scheduler.pt")
        if accelerator.scaler is not None:  # fp16 loss scale: without it a resumed run skips steps anew
            _torch_save(accelerator.scaler.state_dict(), tmp / "scaler.pt")
        method_state = hooks.state_dict() if hooks is not None else {}
        if method_state:  # the same on every process (it follows the shared adapter), so rank 0's is the state
            _torch_save(method_state, tmp / METHOD_STATE)

    def seal() -> None:
        state = {"step": progress.step, "tokens": progress.tokens, "supervised": progress.supervised,
                 "elapsed": progress.elapsed, "world_size": accelerator.num_processes,
                 "fsdp": parallel.is_sharded(model), "metrics": progress.metrics, "files": _file_records(tmp),
                 "data": progress.data}
        (tmp / "state.json").write_text(json.dumps(state))  # last file in: its presence marks a complete save
        _fsync_dir(tmp)
        if final.exists():  # a step saved twice (interrupt right on a save_every step): the newer wins
            shutil.rmtree(final)
        os.replace(tmp, final)
        _rotate(run_dir, keep)

    # Every process reaches every collective even after a failed write; they all stop together at the checks.
    failures: list[Exception] = []
    attempt(failures, main, make_folder)
    accelerator.wait_for_everyone()
    attempt(failures, True, lambda: _torch_save(_rng_state(), tmp / f"rng-{accelerator.process_index}.pt"))
    if parallel.is_sharded(model) or main:  # collective under FSDP: every process gathers
        weights = parallel.trainable_state(model)
        optimizer_state = parallel.optimizer_state(model, _inner(optimizer))
    attempt(failures, main, write_shared)
    raise_if_any_failed(accelerator, failures, tmp, f"checkpoint {final}", run_dir)
    attempt(failures, main, seal)
    raise_if_any_failed(accelerator, failures, tmp, f"checkpoint {final}", run_dir)
    return final


def attempt(failures: list[Exception], active: bool, write) -> None:
    """Call `write()` when `active` and nothing failed yet; record an exception instead of raising it."""
    if active and not failures:
        try:
            write()
        except Exception as e:
            failures.append(e)


def _torch_save(obj: Any, path: Path) -> None:
    """torch.save through a Python file, so a full disk surfaces as OSError(ENOSPC), not as torch's vague
    "PytorchStreamWriter failed"."""
    with open(path, "wb") as fh:
        torch.save(obj, fh)


def raise_if_any_failed(accelerator, failures: list[Exception], tmp: Path | None, what: str, run_dir: Path) -> None:
    """A collective: if a write failed on any process, remove the half-written `tmp` and raise on every process.

    A full disk (or quota, or read-only filesystem) is `DiskFullError`: one line naming what was being written
    and the newest complete checkpoint. Anything else is re-raised where it happened (other processes raise a
    RuntimeError naming it).
    """
    messages = [f"{type(failures[0]).__name__}: {failures[0]}" if failures else None]
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        messages = gather_object(messages)
    failed = [m for m in messages if m is not None]
    if not failed:
        return
    if accelerator.is_main_process and tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    reasons = [r for r in (disk_full_reason(e) for e in failures) if r] or \
              [r for r in (disk_full_reason(Exception(m)) for m in failed) if r]
    if reasons:
        raise disk_full(what, reasons[0], run_dir) from None
    if failures:
        raise failures[0]
    raise RuntimeError(f"another process failed while writing {what}: {failed[0]}")


def disk_full(what: str, reason: str, run_dir: Path) -> DiskFullError:
    """The one-line message for a save the disk refused: what, the newest complete checkpoint, how to go on."""
    newest = newest_checkpoint(run_dir)
    kept = (f"the newest complete checkpoint is {newest}; free space and continue with --resume" if newest else
            "no complete checkpoint was saved yet; free space and start again (train.save_every keeps checkpoints)")
    return DiskFullError(f"{reason} while writing {what}; nothing half-written was kept: {kept}")


def _file_records(folder: Path) -> dict[str, dict[str, Any]]:
    """{file name: {"size", "sha256"}} for every file in `folder` (state.json records them; --resume checks)."""
    return {f.name: {"size": f.stat().st_size, "sha256": _sha256(f)} for f in sorted(folder.iterdir()) if f.is_file()}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


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


def load_training_state(run_dir: Path, accelerator, model, optimizer, scheduler, hooks=None) -> Progress:
    """Restore weights, optimizer, scheduler, this process's RNG and progress from the newest whole checkpoint,
    and the adapter method's state into `hooks` when the checkpoint has one.

    Checkpoints are tried newest first; one whose files are damaged (cut short, changed, missing, unreadable) is
    skipped with a warning saying why, and renamed `damaged-step-NNNNNN` so it is never taken as the newest again.
    Also rewrites `metrics.jsonl` to what it held at that checkpoint, so rows logged after it are not duplicated.

    Raises:
        RunDirError: no checkpoint is whole, or the checkpoint was saved by another process count or FSDP setting.
    """
    ckpt, state, files, skipped = _newest_whole_checkpoint(run_dir, accelerator.process_index)
    accelerator.wait_for_everyone()  # every process has read its files before a damaged folder is moved
    if accelerator.is_main_process:
        for bad, why in skipped:
            aside = bad.with_name(f"damaged-{bad.name}")
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(bad, aside)
            print(f"warning: skipped checkpoint {bad.name}: {why}; moved it to {aside.name} (delete it when you "
                  f"like)", file=sys.stderr, flush=True)
        if skipped:
            print(f"resuming from {ckpt.name}", file=sys.stderr, flush=True)
    if state["world_size"] != accelerator.num_processes:  # the global batch and the data order depend on it
        raise RunDirError(f"{ckpt}: saved by {state['world_size']} process(es); resume with the same number "
                          f"(now {accelerator.num_processes})")
    sharded = parallel.is_sharded(model)
    if state.get("fsdp", False) != sharded:  # the optimizer state is keyed differently
        launch = "with the FSDP launch config" if state.get("fsdp") else "without FSDP (torchrun, or the DDP config)"
        raise RunDirError(f"{ckpt}: saved by a run {'with' if state.get('fsdp') else 'without'} FSDP; resume it "
                          f"{launch}")
    parallel.load_trainable_state(model, files["trainable.safetensors"], where=str(ckpt))
    parallel.load_optimizer_state(model, _inner(optimizer), files["optimizer.pt"])
    scheduler.load_state_dict(files["scheduler.pt"])
    if accelerator.scaler is not None and "scaler.pt" in files:
        accelerator.scaler.load_state_dict(files["scaler.pt"])
    if hooks is not None and METHOD_STATE in files:
        hooks.load_state_dict(files[METHOD_STATE])
    _set_rng_state(files[f"rng-{accelerator.process_index}.pt"])
    metrics = state["metrics"]
    if accelerator.is_main_process:
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    return Progress(step=state["step"], tokens=state["tokens"], supervised=state["supervised"],
                    elapsed=state["elapsed"], metrics=metrics, data=state.get("data") or {})


def _newest_whole_checkpoint(run_dir: Path, rank: int):
    """(checkpoint, its state, its files loaded, [(damaged checkpoint, why), ...]) for the newest whole one.

    Raises:
        RunDirError: none is whole (each one's problem named).
    """
    skipped: list[tuple[Path, str]] = []
    for ckpt in reversed(complete_checkpoints(run_dir)):
        try:
            state, files = _read_checkpoint(ckpt, rank)
        except _Damaged as e:
            skipped.append((ckpt, str(e)))
            continue
        return ckpt, state, files, skipped
    if not skipped:
        raise RunDirError(f"{run_dir}: no complete checkpoint to resume from; start again without --resume")
    problems = "; ".join(f"{p.name}: {why}" for p, why in skipped)
    raise RunDirError(f"{run_dir}: no whole checkpoint to resume from ({problems}); the files were damaged after "
                      f"they were written (disk, copy or crash). Restore them from a backup, or move the folder aside "
                      f"and start again without --resume")


class _Damaged(Exception):
    """A checkpoint file is missing, cut short, changed since it was saved, or cannot be read."""


def _read_checkpoint(ckpt: Path, rank: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """A checkpoint's state.json and the files this process loads, checked against the sizes and SHA-256 sums
    state.json recorded (checkpoints from before lorafit recorded them are checked by loading alone).

    Raises:
        _Damaged: with what is wrong, e.g. "optimizer.pt is 1024 bytes, 2048 were saved".
    """
    from safetensors.torch import load_file

    try:
        state = json.loads((ckpt / "state.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise _Damaged(f"state.json cannot be read ({type(e).__name__}: {e})") from None
    missing = [k for k in ("step", "tokens", "supervised", "elapsed", "world_size", "metrics")
               if not isinstance(state, dict) or k not in state]
    if missing:
        raise _Damaged(f"state.json lacks {', '.join(missing)}")
    for name, record in state.get("files", {}).items():
        path = ckpt / name
        if not path.is_file():
            raise _Damaged(f"{name} is missing")
        size = path.stat().st_size
        if size != record["size"]:
            raise _Damaged(f"{name} is {size} bytes, {record['size']} were saved (cut short?)" if size < record["size"]
                           else f"{name} is {size} bytes, {record['size']} were saved")
        if _sha256(path) != record["sha256"]:
            raise _Damaged(f"{name} has changed since it was saved (SHA-256 differs)")
    loaders = {"trainable.safetensors": lambda p: load_file(p),
               "optimizer.pt": _torch_load, "scheduler.pt": _torch_load, f"rng-{rank}.pt": _torch_load}
    for optional in ("scaler.pt", METHOD_STATE):
        if (ckpt / optional).is_file():
            loaders[optional] = _torch_load
    files = {}
    for name, load in loaders.items():
        if not (ckpt / name).is_file():
            raise _Damaged(f"{name} is missing")
        try:
            files[name] = load(ckpt / name)
        except Exception as e:  # truncated zip, bad header, unpickling error: each library has its own type
            raise _Damaged(f"{name} cannot be read ({type(e).__name__}: {_first_line(e)})") from None
    return state, files


def _torch_load(path: Path) -> Any:
    return torch.load(path, weights_only=False)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]
