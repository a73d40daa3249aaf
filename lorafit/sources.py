"""What a folder given to `merge`, `eval` or `generate` holds, and the base model and tokenizer that go with it.

Three kinds of folder are accepted:

- a run directory (`output.dir`): `config.yaml` + `adapter/` (the adapter's `lorafit.yaml` holds the same config);
- an adapter directory: `adapter_config.json` + weights, with `lorafit.yaml` when lorafit wrote it. A PEFT adapter
  has no `lorafit.yaml`: its base is `base_model_name_or_path`, loaded in full precision (plain LoRA);
- a model directory (`config.json` + weights, e.g. the output of `lorafit merge`), for `generate` only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import ValidationError

from lorafit.config import Config, ModelConfig, load_config
from lorafit.errors import ConfigError, RunDirError

ADAPTER_CONFIG = "adapter_config.json"
LORAFIT_CONFIG = "lorafit.yaml"  # the resolved lorafit config, saved beside the adapter (and the merged model)
RUN_CONFIG = "config.yaml"


@dataclass
class Source:
    """A resolved input folder.

    kind: "run", "adapter" or "model". adapter_dir: None for a model folder. config: the run's lorafit config when
    known (run folders, lorafit adapters, merged models). model: the base model to load (for a model folder, itself).
    """

    path: Path
    kind: str
    adapter_dir: Path | None
    config: Config | None
    model: ModelConfig

    @property
    def quantization(self):
        """The QLoRA settings the adapter was trained with, or None (full-precision base)."""
        return self.model.quantization if self.adapter_dir is not None else None


def resolve_source(path: Path, allow_model: bool = False) -> Source:
    """Find what `path` is and what base model goes with it.

    Args:
        path: a run, adapter or (with `allow_model`) model folder.
        allow_model: accept a plain Hugging Face model folder (generate does; merge and eval need an adapter).

    Returns:
        The resolved source.

    Raises:
        RunDirError: the folder is missing or holds no adapter (or model); ConfigError: its config is invalid.
    """
    path = Path(path)
    if not path.exists():
        raise RunDirError(f"{path}: no such directory")
    if not path.is_dir():
        what = "a run, adapter or model directory" if allow_model else "a run or adapter directory"
        raise RunDirError(f"{path}: is a file; give {what}")
    if (path / "adapter" / ADAPTER_CONFIG).is_file():
        config = read_run_config(path / RUN_CONFIG) or read_run_config(path / "adapter" / LORAFIT_CONFIG)
        return _adapter_source(path, "run", path / "adapter", config)
    if (path / ADAPTER_CONFIG).is_file():
        return _adapter_source(path, "adapter", path, read_run_config(path / LORAFIT_CONFIG))
    if allow_model and (path / "config.json").is_file():
        config = read_run_config(path / LORAFIT_CONFIG)
        return Source(path, "model", None, config, ModelConfig(path=str(path), dtype="float32"))
    if (path / RUN_CONFIG).is_file():
        raise RunDirError(f"{path}: this run has no adapter/ yet (training did not finish); finish it with "
                          f"lorafit train {path / RUN_CONFIG} --resume, or give an adapter directory")
    if allow_model:
        raise RunDirError(f"{path}: not a run, adapter or model directory: it holds no adapter (adapter/ or "
                          f"adapter_config.json) and no model (config.json)")
    raise RunDirError(f"{path}: not a run or adapter directory: it holds no adapter (adapter/ or adapter_config.json)")


def read_run_config(file: Path) -> Config | None:
    """A run's saved, resolved config; None when the file does not exist.

    A saved config passed every check when its run started. If today's cross-field checks refuse it (a check added
    in a later lorafit), the schema alone decides: a trained run must still merge and evaluate. Schema errors are
    reported as load_config reports them.
    """
    if not file.is_file():
        return None
    try:
        return load_config(file).config
    except ConfigError as error:
        try:
            return Config.model_validate(yaml.safe_load(file.read_text(encoding="utf-8")))
        except (ValidationError, yaml.YAMLError):
            raise error from None


def _adapter_source(path: Path, kind: str, adapter_dir: Path, config: Config | None) -> Source:
    from lorafit.adapters.peft_io import read_adapter_config

    base = read_adapter_config(adapter_dir).get("base_model_name_or_path")
    return Source(path, kind, adapter_dir, config, base_model_config(config, base, adapter_dir))


def base_model_config(config: Config | None, base: str | None, adapter_dir: Path) -> ModelConfig:
    """The base model settings: the run's `model:` section, or a PEFT adapter's base in full precision.

    The run's model.path may be relative to where training ran; the adapter records the absolute folder, so that
    one is used when the configured path does not exist from here.
    """
    if config is None:
        if not base:
            raise RunDirError(f"{adapter_dir / ADAPTER_CONFIG}: base_model_name_or_path is empty and there is no "
                              f"{LORAFIT_CONFIG}; lorafit cannot tell which base model the adapter belongs to")
        return ModelConfig(path=base, dtype="float32")  # PEFT adapters without lorafit settings: plain LoRA
    model = config.model
    if base and not Path(model.path).expanduser().exists() and Path(base).is_dir():
        model = model.model_copy(update={"path": base})
    return model


def load_source_tokenizer(source: Source):
    """The tokenizer used in training: the one saved beside the adapter (or model), else the base model's.

    The run's `data.chat_template` override, when set, becomes the tokenizer's chat template.
    """
    from lorafit.model import load_tokenizer

    own = source.adapter_dir or source.path
    tokenizer = load_tokenizer(str(own)) if (own / "tokenizer_config.json").is_file() else load_tokenizer(source.model)
    if source.config is not None and source.config.data.chat_template:
        tokenizer.chat_template = source.config.data.chat_template
    return tokenizer


def is_chat_run(source: Source) -> bool:
    """True when the run trained on chat data (its first train source has format chat)."""
    return source.config is not None and source.config.data.train[0].format == "chat"


def stop_token_ids(tokenizer, source: Source) -> list[int]:
    """Where generated answers end: EOS, plus the end-of-turn tokens (e.g. <|im_end|>) for chat runs."""
    from lorafit.data import end_token_ids

    template = source.config.data.chat_template if source.config is not None else None
    return sorted(end_token_ids(tokenizer, template, chat=is_chat_run(source)) | saved_stop_ids(source))


def saved_stop_ids(source: Source) -> set[int]:
    """The eos_token_id(s) of the adapter's (or model's) generation_config.json: a run that added an end-of-turn
    token records it there."""
    import json

    path = (source.adapter_dir or source.path) / "generation_config.json"
    try:
        eos = json.loads(path.read_text()).get("eos_token_id") if path.is_file() else None
    except (OSError, ValueError, AttributeError):
        return set()
    return {int(i) for i in (eos if isinstance(eos, list) else [eos]) if isinstance(i, int)}


def residual_base_note(source: Source) -> str | None:
    """Why a PiSSA / OLoRA run on a 4/8-bit base cannot be reproduced on the ordinary quantized load, or None.

    Such a run trained on the quantization of the residual W − s·B0 A0; its saved adapter is the rank-2r LoRA
    equivalent on W, exact in full precision but not on top of Q(W). `lorafit merge` rebuilds the trained model.
    """
    cfg = source.config
    if source.quantization is None or cfg is None or cfg.adapter.init not in ("pissa", "olora"):
        return None
    return (f"this run trained init {cfg.adapter.init} on a {source.quantization.bits}-bit base: its base was the "
            f"quantized residual, and the ordinary {source.quantization.bits}-bit load used here plus the saved "
            f"(converted) adapter differs from the trained model; for exact results merge it first (lorafit merge "
            f"RUN --out DIR) and use the merged folder")


def load_inference_model(source: Source):
    """The model `eval` and `generate` run (its home is `lorafit.inference.load`)."""
    from lorafit.inference.load import load_inference_model as load

    return load(source)


def warn_residual_base(source: Source) -> None:
    """Print `residual_base_note` to stderr when it applies."""
    import sys

    note = residual_base_note(source)
    if note is not None and source.adapter_dir is not None:
        print(f"warning: {note}", file=sys.stderr, flush=True)
