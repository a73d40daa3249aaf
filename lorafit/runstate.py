"""The run directory: `config.yaml` (checked on --resume), the disk it needs, the final `adapter/`.

The checkpoints under `checkpoints/` (the training state --resume reads) are `lorafit.checkpoint`'s.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from lorafit import parallel
from lorafit.checkpoint import CHECKPOINTS, attempt, complete_checkpoints, newest_checkpoint, raise_if_any_failed
from lorafit.config import Config, config_diff
from lorafit.errors import ConfigError, RunDirError

CONFIG_HEADER = "# Resolved by lorafit train (extends and overrides applied). --resume compares against it.\n"


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
    probed = {run_dir / "allocation.json", run_dir / "placement.png"}  # adapter.allocate's, written before training
    rest = [f for f in files if f not in probed]
    return rest == [config_file] and config_file.read_text().startswith(CONFIG_HEADER)


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


def save_final_adapter(run_dir: Path, cfg: Config, accelerator, model, tokenizer) -> Path:
    """The run's `adapter/` folder in PEFT format, with the tokenizer and lorafit's config beside it.

    Every process calls this (under FSDP the adapter is gathered from all of them); the main process writes.
    """
    from lorafit.adapters.peft_io import LINEAGE_NAME, save_adapter

    weights = parallel.trainable_state(model) if parallel.is_sharded(model) else None
    path = run_dir / "adapter"

    def write() -> None:
        a = cfg.adapter
        base = cfg.model.path
        if Path(base).is_dir():
            base = str(Path(base).resolve())
        # lorafit.yaml: merge and eval read the quantization settings the adapter was trained against from it
        extra = {"lorafit.yaml": cfg.to_yaml(), **_generation_config(cfg, tokenizer)}
        if a.modules_to_save:
            print(f"note: the adapter holds {', '.join(a.modules_to_save)} whole (modules_to_save); vLLM refuses such "
                  f"adapters (vllm#9280): for vLLM, merge first (lorafit merge {run_dir} --out DIR)", flush=True)
        if a.from_ is not None:  # a continued adapter: the whole adapter, and where it came from
            extra[LINEAGE_NAME] = json.dumps({"lineage": _lineage(a.from_)}, indent=2) + "\n"
        save_adapter(parallel.unwrap(model), path, base_model_name_or_path=base, r=a.r, alpha=a.alpha,
                     dropout=a.dropout, targets=a.targets, rslora=a.rslora, dora=a.method == "dora",
                     tokenizer=tokenizer, extra_files=extra, weights=weights, settings=a.settings(),
                     modules_to_save=a.modules_to_save)

    failures: list[Exception] = []
    attempt(failures, accelerator.is_main_process, write)  # written atomically: a failure leaves no partial folder
    raise_if_any_failed(accelerator, failures, None, f"the adapter {path}", run_dir)
    return path


def _lineage(parent: str) -> list[dict]:
    """adapter.from's lineage record; a parent folder gone since the start is recorded by path alone (the trained
    adapter is saved either way)."""
    from lorafit.adapters.peft_io import adapter_dir_of, lineage

    try:
        return lineage(adapter_dir_of(parent))
    except RunDirError:
        return [{"path": str(Path(parent).resolve()), "sha256": None}]


def _generation_config(cfg: Config, tokenizer) -> dict[str, str]:
    """{"generation_config.json": ...} naming where answers stop (EOS and a chat template's end-of-turn token, e.g.
    an added <|im_end|>), so plain transformers / PEFT generation stops where training taught it to."""
    from lorafit.data import end_token_ids

    chat = any(s.format == "chat" for s in cfg.data.train)
    ends = sorted(end_token_ids(tokenizer, cfg.data.chat_template, chat=chat))
    if not ends:
        return {}
    config = {"eos_token_id": ends if len(ends) > 1 else ends[0], "pad_token_id": tokenizer.pad_token_id}
    if tokenizer.bos_token_id is not None:
        config["bos_token_id"] = tokenizer.bos_token_id
    return {"generation_config.json": json.dumps(config, indent=2) + "\n"}
