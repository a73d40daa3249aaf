"""The run directory and resume state: `config.yaml`, `checkpoints/step-NNNNNN/`, the final `adapter/`.

A checkpoint is written into `checkpoints/.tmp-step-NNNNNN/` and renamed when complete, so the newest
`step-*` folder is always whole: a run killed mid-save leaves only a `.tmp-*` folder, which the next start removes.
Each checkpoint holds the trainable weights (exact names), a PEFT-format adapter, the optimizer and scheduler
state, every process's RNG states, and progress (step, tokens, metrics so far).
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
import yaml

from lorafit import parallel
from lorafit.config import Config, config_diff
from lorafit.errors import ConfigError, DiskFullError, RunDirError, disk_full_reason

CHECKPOINTS = "checkpoints"
METHOD_STATE = "method_state.pt"  # the adapter method's training state (AdaLoRA's importance scores and ranks)
CONFIG_HEADER = "# Resolved by lorafit train (extends and overrides applied). --resume compares against it.\n"


@dataclass
class Progress:
    """Where a run is. Saved in every checkpoint; a resumed run continues from exactly here."""

    step: int = 0  # optimizer steps done
    tokens: int = 0  # input tokens processed, padding excluded (all processes)
    supervised: int = 0  # tokens with a loss term (all processes)
    elapsed: float = 0.0  # seconds of training before this process started
    metrics: list[dict[str, Any]] = field(default_factory=list)
    data: dict[str, int] = field(default_factory=dict)  # data.streaming: where the stream stands


# ------------------------------------------------------------------------------------------------ run dir


def check_run_dir(run_dir: Path, cfg: Config, resume: bool, config_path: Path) -> list[str]:
    """Everything `prepare_run_dir` refuses that can be known before the model is loaded; creates nothing.
    Main process only.

    Returns:
        With `resume`: the config keys that changed in ways a resume allows.

    Raises:
        RunDirError: the folder holds another run (without --resume), has nothing to resume, or is not writable.
        ConfigError: --resume with a config that differs from the run's; the differing keys are named.
    """
    config_file = run_dir / "config.yaml"
    if config_path.resolve() == config_file.resolve():
        raise RunDirError(f"output.dir {run_dir} is the folder of the config itself: lorafit would write its "
                          f"resolved config over {config_path}; choose another output.dir")
    changed = _check_resumable(run_dir, cfg) if resume else []
    if not resume and run_dir.exists() and not _only_a_failed_start(run_dir):
        raise RunDirError(f"output.dir {run_dir} already holds files; add --resume to continue that run, or choose "
                          f"another folder (output.dir=... on the command line)")
    _check_writable(run_dir)
    return changed


def prepare_run_dir(run_dir: Path, cfg: Config, resume: bool, config_path: Path, disk: DiskNeed | None = None) -> None:
    """Check (`check_run_dir`), then create the run directory and write `config.yaml`. Main process only.

    Called once the data, model and targets are known to be good, so a refused start leaves no folder behind.

    Args:
        disk: what the run will write; refused when the disk has less free space (see `disk_needed`).

    Raises:
        RunDirError: as `check_run_dir`, or a disk too small for `disk`.
        ConfigError: as `check_run_dir`.
    """
    changed = check_run_dir(run_dir, cfg, resume, config_path)
    if disk is not None:
        _check_free_space(run_dir, disk, existing=len(complete_checkpoints(run_dir)) if resume else 0)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"output.dir {run_dir} is not writable: {e.strerror or e}") from None
    for tmp in (run_dir / CHECKPOINTS).glob(".tmp-*"):  # a save that was killed half-way
        shutil.rmtree(tmp, ignore_errors=True)
    config_file = run_dir / "config.yaml"
    if changed:  # recorded, so the next --resume compares against what this one ran with
        print(f"warning: resuming with changed {', '.join(changed)}; where these change the math (lr, "
              f"max_grad_norm) the result differs from an uninterrupted run", file=sys.stderr, flush=True)
    if changed or not resume:
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


def _existing_ancestor(path: Path) -> Path:
    """`path` itself when it exists, else its nearest existing parent (where mkdir would start)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_writable(run_dir: Path) -> None:
    """Refuse an output.dir that cannot be created or written, without creating it."""
    place = _existing_ancestor(run_dir)
    if not place.is_dir():
        raise RunDirError(f"output.dir {run_dir} is not writable: {place} is a file, not a folder")
    if not os.access(place, os.W_OK | os.X_OK):  # also false on a read-only filesystem (EROFS)
        raise RunDirError(f"output.dir {run_dir} is not writable: no write permission in {place} (or it is on a "
                          f"read-only filesystem); choose another output.dir")


@dataclass(frozen=True)
class DiskNeed:
    """Bytes a run will write: each checkpoint, the final adapter, how many checkpoints exist at once at most."""

    checkpoint: int
    adapter: int
    checkpoints: int

    @property
    def total(self) -> int:
        return self.checkpoints * self.checkpoint + self.adapter + RUN_FILES_BYTES


# Beside checkpoints and adapter: tokenizer files (Llama-3's tokenizer.json is 9 MB), metrics.jsonl, loss.png.
RUN_FILES_BYTES = 64 * 1024**2
# Per checkpoint, beside the weights and optimizer moments: RNG states (~15 KB a process), scheduler, state.json with
# the metrics so far, and ~1 KB of framing per tensor.
CHECKPOINT_FIXED_BYTES = 1024**2
OPTIMIZER_BYTES = {"adamw": 8.0, "adamw_8bit": 2.0 + 8 / 256, "paged_adamw_8bit": 2.0 + 8 / 256}  # per parameter


def disk_needed(trainable: int, optimizer: str, keep: int, total_steps: int, save_every: int,
                param_bytes: int = 4, method_state: int = 0) -> DiskNeed:
    """What a run writes, estimated from its trainable parameter count.

    A checkpoint holds the trainable weights (`param_bytes` each, fp32) and the optimizer state (AdamW: two fp32
    moments per weight; 8-bit AdamW: two 8-bit moments plus an fp32 scale per 256-weight block). At most `keep`
    periodic checkpoints exist at once, plus the one being written before the oldest is removed (or the one an
    interrupt writes); the adapter holds the weights once more. `method_state`: bytes an adapter method adds to
    each checkpoint (`method_state.pt`: AdaLoRA's importance scores, LoRA-FA's frozen A).
    """
    periodic = (max(total_steps - 1, 0) // save_every) if save_every else 0
    checkpoint = int(trainable * (param_bytes + OPTIMIZER_BYTES[optimizer])) + method_state + CHECKPOINT_FIXED_BYTES
    return DiskNeed(checkpoint=checkpoint, adapter=trainable * param_bytes, checkpoints=min(keep, periodic) + 1)


def _check_free_space(run_dir: Path, need: DiskNeed, existing: int = 0) -> None:
    """Refuse a disk that cannot hold what the run will write (`existing` checkpoints, on resume, are there already
    and are rotated out as new ones come)."""
    free = shutil.disk_usage(_existing_ancestor(run_dir)).free
    required = need.total - min(existing, need.checkpoints - 1) * need.checkpoint
    if free < required:
        raise RunDirError(f"output.dir {run_dir}: {_size(free)} free on its disk, the run needs about {_size(required)} "
                          f"({need.checkpoints} checkpoint(s) of {_size(need.checkpoint)} at once, the adapter "
                          f"{_size(need.adapter)}, logs and tokenizer files); free some space, lower "
                          f"train.keep_checkpoints, or choose another output.dir")


def _size(n: float) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


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
    _attempt(failures, main, make_folder)
    accelerator.wait_for_everyone()
    _attempt(failures, True, lambda: _torch_save(_rng_state(), tmp / f"rng-{accelerator.process_index}.pt"))
    if parallel.is_sharded(model) or main:  # collective under FSDP: every process gathers
        weights = parallel.trainable_state(model)
        optimizer_state = parallel.optimizer_state(model, _inner(optimizer))
    _attempt(failures, main, write_shared)
    _raise_if_any_failed(accelerator, failures, tmp, f"checkpoint {final}", run_dir)
    _attempt(failures, main, seal)
    _raise_if_any_failed(accelerator, failures, tmp, f"checkpoint {final}", run_dir)
    return final


def _attempt(failures: list[Exception], active: bool, write) -> None:
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


def _raise_if_any_failed(accelerator, failures: list[Exception], tmp: Path | None, what: str, run_dir: Path) -> None:
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


def save_final_adapter(run_dir: Path, cfg: Config, accelerator, model, tokenizer) -> Path:
    """The run's `adapter/` folder in PEFT format, with the tokenizer and lorafit's config beside it.

    Every process calls this (under FSDP the adapter is gathered from all of them); the main process writes.
    """
    from lorafit.checkpoint import save_adapter

    weights = parallel.trainable_state(model) if parallel.is_sharded(model) else None
    path = run_dir / "adapter"

    def write() -> None:
        a = cfg.adapter
        base = cfg.model.path
        if Path(base).is_dir():
            base = str(Path(base).resolve())
        # lorafit.yaml: merge and eval read the quantization settings the adapter was trained against from it
        save_adapter(parallel.unwrap(model), path, base_model_name_or_path=base, r=a.r, alpha=a.alpha,
                     dropout=a.dropout, targets=a.targets, rslora=a.rslora, dora=a.method == "dora",
                     tokenizer=tokenizer, extra_files={"lorafit.yaml": cfg.to_yaml()}, weights=weights,
                     settings=a.settings())

    failures: list[Exception] = []
    _attempt(failures, accelerator.is_main_process, write)  # written atomically: a failure leaves no partial folder
    _raise_if_any_failed(accelerator, failures, None, f"the adapter {path}", run_dir)
    return path
