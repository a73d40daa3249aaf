"""The config: typed models for every key, YAML loading with `extends:`, `KEY=VALUE` overrides, and error messages.

A config is resolved in three steps, and every problem found is reported together:

1. read the YAML file and its `extends:` parents (deep-merged in order, the including file wins);
2. apply command-line overrides (`train.lr=1e-4`, dotted paths checked against the schema);
3. validate with the pydantic models below (unknown keys forbidden) and then the cross-field checks.

Each problem names the file (and line where known) the offending key came from, the dotted key, and what is
allowed. Defaults live in the field declarations below and nowhere else. No torch here: `validate` and the CLI's
help must stay fast.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from lorafit.errors import ConfigError


def _not_a_bool(value: Any) -> Any:
    # YAML reads yes/no/true/false as booleans, and pydantic would take True as 1: `r: yes` is a mistake, not r=1.
    if isinstance(value, bool):
        raise ValueError(f"must be a number, not {str(value).lower()}")
    return value


def _scalar_as_text(value: Any) -> Any:
    # `output.dir=2024` or `revision: 1234567` arrive as numbers from YAML; they are names.
    return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value


Int = Annotated[int, BeforeValidator(_not_a_bool)]
Float = Annotated[float, BeforeValidator(_not_a_bool)]
Text = Annotated[str, BeforeValidator(_scalar_as_text)]
Dtype = Literal["float32", "bfloat16", "float16"]
COMMAND_LINE = "command line"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------------- schema


class QuantizationConfig(_Section):
    """bitsandbytes quantization of the frozen base (QLoRA)."""

    bits: Literal[4, 8] = 4
    type: Literal["nf4", "fp4"] = "nf4"  # 4-bit only
    double_quant: bool = True  # 4-bit only: quantize the quantization constants too (~0.4 bit/param saved)
    compute_dtype: Dtype = "bfloat16"  # 4-bit only: dtype of the dequantized matmul


class ModelConfig(_Section):
    path: Text = Field(min_length=1)  # hub id or local directory
    revision: Text | None = None
    dtype: Dtype = "bfloat16"
    attention: Literal["auto", "sdpa", "flash_attention_2", "eager"] = "auto"  # auto: the best the model and machine run
    trust_remote_code: bool = False
    quantization: QuantizationConfig | None = None  # null: full-precision base (LoRA); set: QLoRA
    add_tokens: list[Text] = []  # added to the tokenizer as special tokens; embedding and head grow; rows train


class VeraConfig(_Section):
    """adapter.method vera: frozen random projections shared by all layers, trainable scaling vectors per layer."""

    projection_seed: int = 0  # the shared projections are regenerated from this seed (PEFT's projection_prng_key)
    d_initial: Float = Field(0.1, gt=0)  # initial value of the scaling vector d (b starts at 0)


class AdaloraConfig(_Section):
    """adapter.method adalora: SVD-form updates whose ranks are pruned from init_r to an average of adapter.r."""

    init_r: Int = Field(12, ge=1)  # every layer's starting rank
    tinit: Float = Field(0.1, ge=0, lt=1)  # fraction of the run's steps before pruning starts
    tfinal: Float = Field(0.2, ge=0, lt=1)  # fraction of the run's steps at the end with the final ranks fixed
    delta_t: Float = Field(0.01, gt=0, lt=1)  # fraction of the run's steps between two rank updates
    beta1: Float = Field(0.85, ge=0, lt=1)  # EMA of the sensitivity
    beta2: Float = Field(0.85, ge=0, lt=1)  # EMA of its uncertainty
    orth_reg_weight: Float = Field(0.5, ge=0)  # weight of the orthogonality regulariser in the loss


ADAPTER_METHODS = ("lora", "dora", "lora_fa", "vera", "adalora")
ADAPTER_INITS = ("default", "gaussian", "pissa", "olora", "loftq")


class AdapterConfig(_Section):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    method: Literal[ADAPTER_METHODS] = "lora"
    init: Literal[ADAPTER_INITS] = "default"  # pissa/olora: from the weight's SVD/QR; loftq: quantized bases only
    init_iters: Int = Field(1, ge=1)  # loftq: alternating quantize / SVD steps
    pissa_niter: Int | None = Field(None, ge=0)  # pissa: null = exact SVD; N = randomised SVD, N power iterations
    vera: VeraConfig | None = None  # method vera only; null: the defaults
    adalora: AdaloraConfig | None = None  # method adalora only; null: the defaults
    r: Int = Field(16, ge=1)
    alpha: Float = Field(32, gt=0)  # usually 2 × r
    dropout: Float = Field(0.05, ge=0, lt=1)
    layers: list[Int] | None = None  # decoder layers that get adapters (PEFT layers_to_transform); null: all
    rank_pattern: dict[str, Int] = {}  # {module-path regex: r}, PEFT's rule: matched at the end of the path
    alpha_pattern: dict[str, Float] = {}  # {module-path regex: alpha}
    allocate: Literal["none", "gradient"] = "none"  # gradient: a probe of data.train sets each target's rank
    allocate_batches: Int = Field(8, ge=1)  # batches of data.train the gradient probe reads
    targets: str | list[str] = "all-linear"  # all-linear | [suffix, ...] | "re:<regex>"
    exclude: list[str] = []  # module-name suffixes never wrapped
    rslora: bool = False  # scale alpha/sqrt(r) instead of alpha/r
    # Continue this adapter (a run or adapter folder, lorafit's or PEFT's): `load_config` takes its method, r, alpha,
    # targets from it (`_adapter_from`), training starts from its weights with a fresh optimizer.
    from_: Text | None = Field(None, alias="from", min_length=1)
    # auto: the added tokens and the special tokens the data uses whose rows are untrained (`adapters.tokens`);
    # none: refuse such tokens; a list: exactly these tokens' rows train (PEFT trainable_token_indices)
    train_tokens: Literal["auto", "none"] | list[Text] = "auto"
    modules_to_save: list[Text] = []  # modules trained and saved whole (PEFT modules_to_save), e.g. [lm_head]

    def settings(self) -> dict[str, Any]:
        """The section as plain data for `lorafit.adapters`, the chosen method's section filled with its defaults."""
        data = self.model_dump(mode="json", by_alias=True)
        data["vera"] = (self.vera or VeraConfig()).model_dump(mode="json")
        data["adalora"] = (self.adalora or AdaloraConfig()).model_dump(mode="json")
        return data

    @field_validator("targets")
    @classmethod
    def _targets_shape(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list):
            if not v or any(not isinstance(s, str) or not s.strip() for s in v):
                raise ValueError("a list of targets must hold at least one non-empty module-name suffix")
            return v
        if v == "all-linear":
            return v
        if v.startswith("re:"):
            try:
                re.compile(v[3:])
            except re.error as e:
                raise ValueError(f"invalid regular expression {v[3:]!r}: {e}") from None
            return v
        raise ValueError(
            f"must be 'all-linear', a list of module-name suffixes, or 're:<regex>' (got {v!r}; "
            f"for one suffix write [{v}])"
        )


class DataSource(_Section):
    path: Text = Field(min_length=1)  # file, folder, or hub dataset id
    format: Literal["alpaca", "chat", "completion", "text", "preference", "unpaired"]  # the last two: train.objective
    split: Text = "train"  # hub datasets
    columns: dict[str, str] = {}  # renames: {expected_name: name_in_the_data}
    name: Text | None = None  # hub datasets: the config name (load_dataset(path, name))
    data_files: str | list[str] | None = None  # hub datasets: only these files of the repository
    samples: Float | None = Field(None, gt=0)  # mixing: take N rows (or, below 1, this fraction) of the source
    fraction: Float | None = Field(None, gt=0)  # mixing: take this fraction of the source (above 1 needs replace)
    replace: bool = False  # mixing: draw with replacement, so samples may exceed the source's rows


class DataConfig(_Section):
    train: list[DataSource] = Field(min_length=1)
    eval: list[DataSource] = []
    eval_fraction: Float = Field(0.0, ge=0, lt=1)  # held out of train when eval is empty
    max_length: Int = Field(2048, ge=8)
    packing: bool = True
    train_on_prompt: bool = False  # false: loss only on responses / assistant turns (and their EOS)
    chat_template: str | None = None  # overrides the tokenizer's template for format: chat
    prompt_template: str | None = None  # alpaca: overrides the default template ({instruction}, {input})
    num_proc: Int | None = Field(None, ge=1)  # tokenization processes; null: one (a fast tokenizer uses every core)
    streaming: bool = False  # format text: tokenize and pack on the fly (corpora larger than RAM)


class PreferenceConfig(_Section):
    """train.preference: the settings of the preference objectives (docs/preference.md)."""

    beta: Float | None = Field(None, gt=0)  # null: the objective's usual value (dpo, kto, orpo 0.1; simpo 2.0)
    loss: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"  # dpo only
    label_smoothing: Float = Field(0.0, ge=0, lt=0.5)  # dpo sigmoid / robust (and simpo): share of flipped labels
    gamma: Float = Field(0.5, ge=0)  # simpo: the target reward margin
    sft_weight: Float = Field(0.0, ge=0)  # dpo / simpo: + sft_weight × the chosen answers' NLL (orpo always has it)
    precompute_reference: bool = False  # dpo / kto: the reference's log-probs once, before the first step
    desirable_weight: Float = Field(1.0, gt=0)  # kto
    undesirable_weight: Float = Field(1.0, gt=0)  # kto


class TrainConfig(_Section):
    objective: Literal["sft", "dpo", "simpo", "orpo", "kto"] = "sft"  # preference objectives read preference data
    preference: PreferenceConfig | None = None  # objectives other than sft; null: the defaults
    epochs: Int = Field(1, ge=1)
    max_steps: Int | None = Field(None, ge=1)  # when set, wins over epochs
    batch_size: Int = Field(4, ge=1)  # per device, per micro-step
    grad_accum: Int = Field(4, ge=1)
    lr: Float = Field(2.0e-4, gt=0)
    lora_plus_ratio: Float | None = Field(None, gt=0)  # LoRA+: B's lr = lr × ratio (16 is typical)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup: Float = Field(0.03, ge=0)  # < 1: fraction of steps; >= 1: number of steps
    weight_decay: Float = Field(0.0, ge=0)
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = "adamw"
    max_grad_norm: Float | None = Field(1.0, ge=0)  # null or 0: no clipping
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    gradient_checkpointing: bool | Literal["auto"] = True  # auto: on only when the memory plan says it is needed
    seed: int = 42
    log_every: Int = Field(10, ge=1)
    eval_every: Int = Field(0, ge=0)  # steps; 0 = at the end only
    save_every: Int = Field(0, ge=0)  # steps; 0 = at the end only
    keep_checkpoints: Int = Field(2, ge=1)
    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = []


class OutputConfig(_Section):
    dir: Text = Field(min_length=1)


class Config(_Section):
    """A whole resolved config. Build one with `load_config`, not directly, to get file-aware messages."""

    model: ModelConfig
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    output: OutputConfig

    def to_dict(self) -> dict[str, Any]:
        """The config as plain data, as written to a run's config.yaml (and compared on --resume)."""
        data = self.model_dump(mode="json", by_alias=True)
        q = data["model"]["quantization"]
        if q is not None and q["bits"] == 8:  # 4-bit-only keys would make the file fail its own validation
            for key in ("type", "double_quant", "compute_dtype"):
                q.pop(key)
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False, allow_unicode=True)


# ---------------------------------------------------------------------------------------- loading the YAML


@dataclass
class _Layer:
    """A dict read from YAML plus where each dotted key came from ("file:line")."""

    data: dict[str, Any]
    origins: dict[str, str] = field(default_factory=dict)


def _key_lines(node: yaml.Node, path: str, file: str, out: dict[str, str], dupes: list[str]) -> None:
    """Record `file:line` of every mapping key under `node`, and collect duplicated keys."""
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            dotted = f"{path}.{key}" if path else key
            where = f"{file}:{key_node.start_mark.line + 1}"
            if key in seen:
                dupes.append(f"{where}: {dotted}: duplicate key (the later one would silently win)")
            seen.add(key)
            out[dotted] = where
            _key_lines(value_node, dotted, file, out, dupes)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[f"{path}.{i}"] = f"{file}:{item.start_mark.line + 1}"
            _key_lines(item, f"{path}.{i}", file, out, dupes)


def _display(path: Path) -> str:
    """A path as the user would type it: relative to the working directory when it is below it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _read_yaml(path: Path) -> _Layer:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config file ({e.__class__.__name__}: {e})") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{where}: YAML syntax error: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, adapter:, ...)")
    origins: dict[str, str] = {}
    dupes: list[str] = []
    if node is not None:
        _key_lines(node, "", str(path), origins, dupes)
    if dupes:
        raise ConfigError(dupes, source=str(path))
    return _Layer(data, origins)


def _deep_merge(base: _Layer, top: _Layer) -> _Layer:
    """Merge `top` over `base`: mappings merge key by key, anything else (lists included) is replaced."""

    def merge(a: Any, b: Any) -> Any:
        if isinstance(a, dict) and isinstance(b, dict):
            out = dict(a)
            for k, v in b.items():
                out[k] = merge(a[k], v) if k in a else v
            return out
        return b

    # Where `top` replaces a value (not a mapping), what `base` had below it is gone: forget those origins.
    replaced = [k for k in top.origins if not isinstance(_get(top.data, k), dict)]
    origins = {k: v for k, v in base.origins.items() if not any(k.startswith(r + ".") for r in replaced)}
    origins.update(top.origins)
    return _Layer(merge(base.data, top.data), origins)


def _get(data: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if isinstance(data, dict):
            data = data.get(part)
        elif isinstance(data, list) and part.isdigit() and int(part) < len(data):
            data = data[int(part)]
        else:
            return None
    return data


def _load_with_extends(path: Path, chain: tuple[Path, ...] = ()) -> _Layer:
    path = Path(_display(path.resolve())) if path.exists() else path
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise ConfigError(f"{chain[-1]}: extends: cycle: {cycle}")
    layer = _read_yaml(path)
    parents = layer.data.pop("extends", None)
    layer.origins = {k: v for k, v in layer.origins.items() if k != "extends" and not k.startswith("extends.")}
    if parents is None:
        return layer
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) and p for p in parents):
        raise ConfigError(f"{path}: extends: must be a path or a list of paths (relative to this file)")
    merged = _Layer({}, {})
    for parent in parents:
        parent_path = path.parent / parent
        if not parent_path.is_file():
            raise ConfigError(f"{path}: extends: parent config {parent!r} not found (looked for {parent_path})")
        merged = _deep_merge(merged, _load_with_extends(parent_path, (*chain, path)))
    return _deep_merge(merged, layer)


# -------------------------------------------------------------------------------------------- overrides


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation like `QuantizationConfig | None`, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (Union, types.UnionType, Annotated):
        for arg in typing.get_args(annotation):
            found = _section_model(arg)
            if found is not None:
                return found
    return None


def _list_item_model(annotation: Any) -> type[BaseModel] | None:
    if typing.get_origin(annotation) is list:
        return _section_model(typing.get_args(annotation)[0])
    return None


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    return close[0] if close else ""


def _all_dotted_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, info in model.model_fields.items():
        dotted = f"{prefix}{info.alias or name}"
        keys.append(dotted)
        sub = _section_model(info.annotation) or _list_item_model(info.annotation)
        if sub is not None:
            keys += _all_dotted_keys(sub, dotted + ("." if _section_model(info.annotation) else ".N."))
    return keys


# Names other tools (PEFT, transformers, axolotl, torchtune) use for our keys: users bring them along.
_KNOWN_ALIASES = {
    "rank": "adapter.r", "lora_r": "adapter.r", "lora_alpha": "adapter.alpha", "lora_dropout": "adapter.dropout",
    "target_modules": "adapter.targets", "lora_target_modules": "adapter.targets", "use_rslora": "adapter.rslora",
    "use_dora": "adapter.method", "learning_rate": "train.lr", "num_epochs": "train.epochs",
    "num_train_epochs": "train.epochs", "gradient_accumulation_steps": "train.grad_accum",
    "micro_batch_size": "train.batch_size", "per_device_train_batch_size": "train.batch_size",
    "warmup_steps": "train.warmup", "warmup_ratio": "train.warmup", "lr_scheduler": "train.scheduler",
    "lr_scheduler_type": "train.scheduler", "output_dir": "output.dir", "base_model": "model.path",
    "sequence_len": "data.max_length", "max_seq_length": "data.max_length", "load_in_4bit": "model.quantization.bits",
    "load_in_8bit": "model.quantization.bits", "torch_dtype": "model.dtype", "bnb_4bit_quant_type": "model.quantization.type",
    "sample_packing": "data.packing", "datasets": "data.train",
}


def _unknown_key_message(dotted: str) -> str:
    """`adapter.rank: unknown key (did you mean adapter.r?)`: the same name in another section first, then near misses."""
    parts = dotted.split(".")
    generic = ".".join("N" if p.isdigit() else p for p in parts)
    parent, _, leaf = generic.rpartition(".")
    known = _all_dotted_keys(Config)
    elsewhere = [k for k in known if k.rpartition(".")[2] == leaf]  # `train.r` -> `adapter.r`
    siblings = [k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == parent]
    if len(elsewhere) == 1:
        guess = elsewhere[0]
    elif leaf in _KNOWN_ALIASES:
        guess = _KNOWN_ALIASES[leaf]
    elif close := _suggest(leaf, siblings):
        guess = f"{parent}.{close}" if parent else close
    else:
        guess = ""
    if not guess:
        return f"{dotted}: unknown key"
    indexes = [p for p in parts if p.isdigit()]  # put list indexes back: data.train.N.fromat -> data.train.0.format
    guess = ".".join(indexes.pop(0) if p == "N" and indexes else p for p in guess.split("."))
    return f"{dotted}: unknown key (did you mean {guess}?)"


def _check_override_path(dotted: str) -> None:
    """Raise if `dotted` is not a path into the schema (list items addressed by index: data.train.0.path)."""
    model: type[BaseModel] | None = Config
    parts = dotted.split(".")
    i = 0
    while i < len(parts):
        name = parts[i]
        fields = {info.alias or n: info for n, info in model.model_fields.items()} if model is not None else {}
        if name not in fields:
            raise ConfigError(f"{COMMAND_LINE}: {_unknown_key_message(dotted)}")
        annotation = fields[name].annotation
        item = _list_item_model(annotation)
        if item is not None and i + 1 < len(parts):
            if not parts[i + 1].isdigit():
                raise ConfigError(f"{COMMAND_LINE}: {dotted}: {'.'.join(parts[: i + 1])} is a list; address an item by "
                                  f"its index, e.g. {'.'.join(parts[: i + 1])}.0.{parts[i + 1]}")
            model, i = item, i + 2
            continue
        model = _section_model(annotation)
        if model is None and i + 1 < len(parts):
            raise ConfigError(f"{COMMAND_LINE}: {_unknown_key_message(dotted)}")
        i += 1


def parse_override(text: str) -> tuple[str, Any]:
    """`train.lr=1e-4` -> ("train.lr", 0.0001). The value is read as YAML (so `[q_proj, v_proj]` is a list)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"{COMMAND_LINE}: override {text!r} is not KEY=VALUE (e.g. train.lr=1e-4)")
    if not re.fullmatch(r"[A-Za-z_][\w]*(\.\w+)*", key):
        raise ConfigError(f"{COMMAND_LINE}: override key {key!r} is not a dotted path (e.g. adapter.r)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"{COMMAND_LINE}: {key}: value {raw!r} is not valid YAML ({e})") from None
    return key, value


def _apply_override(layer: _Layer, key: str, value: Any) -> None:
    _check_override_path(key)
    parts = key.split(".")
    node: Any = layer.data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            idx = int(part)
            if idx >= len(node):
                raise ConfigError(f"{COMMAND_LINE}: {key}: {'.'.join(parts[:i])} has {len(node)} item(s); "
                                  f"index {idx} does not exist")
            node = node[idx]
            continue
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        elif not isinstance(nxt, dict | list):
            raise ConfigError(f"{COMMAND_LINE}: {key}: {'.'.join(parts[: i + 1])} is not a section")
        node = nxt
    last = parts[-1]
    if isinstance(node, list):  # data.train.1={path: b.jsonl, format: text}: replace an item, or append one
        idx = int(last)
        if idx > len(node):
            raise ConfigError(f"{COMMAND_LINE}: {key}: {'.'.join(parts[:-1])} has {len(node)} item(s); "
                              f"use index {len(node)} to add one")
        node[idx:idx + 1] = [value]
    else:
        node[last] = value
    layer.origins[key] = COMMAND_LINE


# ------------------------------------------------------------------------------------------- validation


def _describe_error(err: dict[str, Any]) -> str:
    """One pydantic error as 'what is wrong and what is allowed'."""
    kind, ctx = err["type"], err.get("ctx", {})
    got = err.get("input")
    if kind == "missing":
        return "required key is missing"
    if kind == "literal_error":
        options = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        close = _suggest(got, options) if isinstance(got, str) else ""
        hint = f"; did you mean {close!r}?" if close else ""
        return f"must be one of {ctx.get('expected', '')} (got {got!r}{hint})"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return f"{err['msg'].lower()} (got {got!r})"
    if kind == "too_short" and isinstance(got, list):
        return "must hold at least one item"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    if kind == "model_type" or kind == "dict_type":
        return f"must be a mapping of keys (got {type(got).__name__} {got!r})"
    return f"{err['msg'].lower()} (got {type(got).__name__} {got!r})"


def _origin(origins: dict[str, str], dotted: str, fallback: str) -> str:
    """Where `dotted` (or its nearest parent) was set; for a missing key, the file that should set it."""
    probe = dotted
    while probe:
        if probe in origins:
            return origins[probe]
        probe = probe.rpartition(".")[0]
    return fallback


# Union members and validators add their own names to an error's location: `targets.list[str].0`, `r.function-before[...]`.
_UNION_TAIL = re.compile(r"[a-z]+\[.*\]|str|int|float|bool|none|function-(after|before|wrap|plain)\[.*\]")


def _pydantic_problems(exc: ValidationError, origins: dict[str, str], fallback: str) -> list[str]:
    problems: dict[str, str] = {}
    for err in exc.errors():
        # Union members add their own tail to loc (`targets.str`, `targets.list[str].0`): drop type names.
        loc = [str(p) for p in err["loc"] if not _UNION_TAIL.fullmatch(str(p))]
        dotted = ".".join(loc)
        if err["type"] == "extra_forbidden":
            msg = _unknown_key_message(dotted)
        else:
            msg = f"{dotted}: {_describe_error(err)}"
        problems.setdefault(dotted, f"{_origin(origins, dotted, fallback)}: {msg}")
    return list(problems.values())


def _file_of(origins: dict[str, str], dotted: str) -> str:
    return origins.get(dotted, "").rsplit(":", 1)[0]


def _data_problems(cfg: Config) -> list[str]:
    """Mixing and streaming keys that only make sense together."""
    d, problems = cfg.data, []
    for part in ("train", "eval"):
        for i, s in enumerate(getattr(d, part)):
            key = f"data.{part}.{i}"
            if s.samples is not None and s.fraction is not None:
                problems.append(f"{key}.fraction: set both samples and fraction; use one or the other")
            if s.samples is not None and s.samples >= 1 and s.samples != int(s.samples):
                problems.append(f"{key}.samples: {s.samples} is >= 1, so it counts rows and must be a whole number "
                                "(for a fraction of the source use a value below 1, or fraction:)")
            if s.fraction is not None and s.fraction > 1 and not s.replace:
                problems.append(f"{key}.fraction: {s.fraction} is more than the whole source; set replace: true to "
                                "draw rows more than once, or use a fraction up to 1")
    if d.streaming:
        bad = [f"data.train.{i}.format: {s.format}" for i, s in enumerate(d.train) if s.format != "text"]
        problems += [f"{b} cannot stream; data.streaming takes format text only" for b in bad]
        if d.eval_fraction > 0:
            problems.append("data.eval_fraction: a stream cannot hold rows out; with data.streaming give the eval rows "
                            "as their own file under data.eval")
        if cfg.train.max_steps is None:
            problems.append("train.max_steps: data.streaming needs it (a stream's length is not known in advance)")
        mixed = [f"data.train.{i}" for i, s in enumerate(d.train) if s.samples is not None or s.fraction is not None]
        problems += [f"{m}.samples: cannot sample a stream; remove samples/fraction or data.streaming" for m in mixed]
    return problems


def _adapter_problems(cfg: Config) -> list[str]:
    """A method's section under another method, and inits that need what the run does not have."""
    a, q, problems = cfg.adapter, cfg.model.quantization, []
    for section in ("vera", "adalora"):
        if getattr(a, section) is not None and a.method != section:
            problems.append(f"adapter.{section}: settings for method {section}, but adapter.method is {a.method}; "
                            f"remove the section or set adapter.method: {section}")
    if a.init == "loftq" and q is None:
        problems.append("adapter.init: loftq prepares an adapter for a quantized base, and model.quantization is not "
                        "set; use init pissa / olora on a full-precision base, or set model.quantization.bits")
    if a.init != "loftq" and a.init_iters != 1:
        problems.append(f"adapter.init_iters: applies to init loftq only (init is {a.init})")
    if a.init == "loftq" and a.init_iters != 1:
        problems.append(f"adapter.init_iters: {a.init_iters}; lorafit's loftq keeps the ordinary quantized load of the "
                        f"checkpoint as the base, so the saved adapter works on it, and for that base one quantize / "
                        f"SVD step is already the best rank-r fit (more steps would quantize a changed base, which "
                        f"the saved adapter could not reproduce); use 1")
    if a.pissa_niter is not None and a.init != "pissa":
        problems.append(f"adapter.pissa_niter: applies to init pissa only (init is {a.init})")
    if a.init in ("pissa", "olora", "loftq") and a.method in ("vera", "adalora"):
        problems.append(f"adapter.init: {a.init} sets LoRA's A and B from the weight; method {a.method} has no such "
                        f"pair (use init default, or method lora / dora)")
    if a.method in ("lora_fa", "vera") and cfg.train.lora_plus_ratio is not None:
        trains = "only B (A stays frozen)" if a.method == "lora_fa" else "only scaling vectors (no A or B)"
        problems.append(f"train.lora_plus_ratio: LoRA+ sets B's learning rate relative to A's, and method {a.method} "
                        f"trains {trains}; remove lora_plus_ratio (raise train.lr instead)")
    if a.method == "vera" and a.rslora:
        problems.append("adapter.rslora: VeRA has no alpha / r scale to change (its trained vectors set the scale); "
                        "remove rslora")
    if a.method == "vera" and a.init == "gaussian":
        problems.append("adapter.init: gaussian sets LoRA's A; VeRA's projections are regenerated from "
                        "adapter.vera.projection_seed; use init default")
    problems += _token_problems(cfg)
    ada = a.adalora or AdaloraConfig()
    if a.method == "adalora" and ada.init_r < a.r:
        problems.append(f"adapter.adalora.init_r: {ada.init_r} is below adapter.r ({a.r}), the average rank AdaLoRA "
                        f"prunes down to; set adapter.adalora.init_r >= r (e.g. 1.5 × r) or lower adapter.r")
    if a.method == "adalora" and a.rslora:
        problems.append("adapter.rslora: AdaLoRA scales its update by alpha / adalora.init_r (as PEFT, which has no "
                        "rsLoRA for it); remove rslora or use method lora")
    if a.method == "adalora" and a.init == "gaussian":
        problems.append("adapter.init: gaussian sets LoRA's A and B; AdaLoRA starts its singular values at 0 and its "
                        "vectors at N(0, 0.02) (as PEFT); use init default")
    if a.method == "adalora" and ada.tinit + ada.tfinal >= 1:
        problems.append(f"adapter.adalora.tfinal: tinit + tfinal = {ada.tinit + ada.tfinal:g} leaves no steps for "
                        f"pruning; keep their sum below 1")
    return problems


def _token_problems(cfg: Config) -> list[str]:
    """model.add_tokens / adapter.train_tokens / modules_to_save that are wrong whatever the tokenizer holds."""
    problems, added = [], cfg.model.add_tokens
    dupes = sorted({t for t in added if added.count(t) > 1})
    if dupes:
        problems.append(f"model.add_tokens: {', '.join(dupes)} listed more than once; list each token once")
    if any(not t.strip() for t in added):
        problems.append("model.add_tokens: an empty token; every token needs text, e.g. <|im_end|>")
    a = cfg.adapter
    if isinstance(a.train_tokens, list) and len(set(a.train_tokens)) != len(a.train_tokens):
        problems.append("adapter.train_tokens: a token listed more than once")
    if a.method in ("vera", "adalora") and (added or a.modules_to_save or isinstance(a.train_tokens, list)):
        problems.append(f"adapter.method: {a.method} adapters are saved without token rows or modules_to_save here; "
                        f"use method lora, dora or lora_fa with model.add_tokens / adapter.train_tokens / "
                        f"adapter.modules_to_save")
    return problems


def _placement_problems(cfg: Config) -> list[str]:
    """adapter.layers / rank_pattern / alpha_pattern / allocate: shapes and the methods that cannot take them.
    Whether a pattern matches a target needs the model: `lorafit.adapters.placement.place` checks that."""
    a, problems = cfg.adapter, []
    for key in ("rank_pattern", "alpha_pattern"):
        for pattern, value in getattr(a, key).items():
            try:
                re.compile(pattern)
            except re.error as e:
                problems.append(f"adapter.{key}: {pattern!r} is not a valid regular expression ({e})")
            if key == "rank_pattern" and value < 1:
                problems.append(f"adapter.rank_pattern: {pattern!r}: {value} is below 1; leave a module out with "
                                f"adapter.exclude, or let adapter.allocate: gradient drop it")
            if key == "alpha_pattern" and value <= 0:
                problems.append(f"adapter.alpha_pattern: {pattern!r}: alpha must be > 0 (got {value})")
    if a.layers is not None:
        if not a.layers or any(i < 0 for i in a.layers) or len(set(a.layers)) != len(a.layers):
            problems.append(f"adapter.layers: {a.layers}: give distinct layer indices >= 0, e.g. [0, 1, 2] "
                            f"(null: every layer)")
    if a.allocate != "none" and a.method in ("vera", "adalora"):
        why = "shares one rank across all layers" if a.method == "vera" else "allocates its ranks itself in training"
        problems.append(f"adapter.allocate: method {a.method} {why}; use allocate: none, or method lora / dora / "
                        f"lora_fa")
    if a.method in ("vera", "adalora"):
        for key in ("rank_pattern", "alpha_pattern"):
            if getattr(a, key):
                problems.append(f"adapter.{key}: method {a.method} has no per-module "
                                f"{'rank' if key == 'rank_pattern' else 'alpha'}; remove it")
    if a.allocate != "none" and a.from_ is not None:
        problems.append("adapter.allocate: adapter.from continues an adapter with the ranks it has; remove allocate "
                        "(or adapter.from to start a new adapter)")
    if a.allocate != "none" and cfg.train.objective != "sft":
        problems.append(f"adapter.allocate: the gradient probe scores the SFT loss, and train.objective is "
                        f"{cfg.train.objective}; probe an SFT run, or put its ranks into adapter.rank_pattern")
    if a.allocate != "none":
        for key in ("rank_pattern", "alpha_pattern"):
            if getattr(a, key):
                problems.append(f"adapter.{key}: allocate: {a.allocate} sets every module's rank and alpha; remove "
                                f"{key} or set allocate: none")
        if cfg.data.streaming:
            problems.append("adapter.allocate: the gradient probe reads data.train before training, which a stream "
                            "cannot rewind; use allocate: none with data.streaming")
    return problems


_PREFERENCE_ONLY = {"loss": ("dpo",), "label_smoothing": ("dpo", "simpo"), "gamma": ("simpo",),
                    "sft_weight": ("dpo", "simpo"), "precompute_reference": ("dpo", "kto"),
                    "desirable_weight": ("kto",), "undesirable_weight": ("kto",)}


def _preference_problems(cfg: Config) -> list[str]:
    """train.objective against the data formats and train.preference (docs/preference.md)."""
    t, d, problems = cfg.train, cfg.data, []
    p = t.preference or PreferenceConfig()
    sources = [(f"data.{part}.{i}.format", s.format) for part in ("train", "eval") for i, s in
               enumerate(getattr(d, part))]
    if t.objective == "sft":
        problems += [f"{k}: {f} data is read by a preference objective, and train.objective is sft; set "
                     f"train.objective: dpo (or simpo / orpo / kto)" for k, f in sources if f in ("preference", "unpaired")]
        if t.preference is not None:
            problems.append("train.preference: set, but train.objective is sft; remove it or set train.objective: "
                            "dpo / simpo / orpo / kto")
        return problems
    for k, f in sources:
        if f not in ("preference", "unpaired"):
            problems.append(f"{k}: {f} data cannot train objective {t.objective}, which compares answers; use format "
                            f"preference" + (" or unpaired" if t.objective == "kto" else "") + " (or objective sft)")
        elif f == "unpaired" and t.objective != "kto":
            problems.append(f"{k}: unpaired rows (one answer with a label) fit objective kto only; objective "
                            f"{t.objective} needs pairs (format preference)")
    if t.preference is not None:
        for key, allowed in _PREFERENCE_ONLY.items():
            if key in p.model_fields_set and t.objective not in allowed:
                problems.append(f"train.preference.{key}: applies to objective {' / '.join(allowed)} only "
                                f"(objective is {t.objective}); remove it")
    if p.label_smoothing and t.objective == "dpo" and p.loss not in ("sigmoid", "robust"):
        problems.append(f"train.preference.label_smoothing: applies to loss sigmoid / robust (loss is {p.loss})")
    if p.precompute_reference and d.streaming:
        problems.append("train.preference.precompute_reference: needs the whole data set before the first step, "
                        "which data.streaming does not have")
    if t.objective == "kto" and t.batch_size < 2:
        problems.append("train.batch_size: kto estimates its KL term from mismatched rows of a micro-batch, so it "
                        "needs at least 2 rows per micro-batch (a global batch of one row has no mismatched pair)")
    return problems


def _cross_field_problems(cfg: Config, origins: dict[str, str]) -> tuple[list[str], list[str]]:
    """Checks that span keys. Returns (problems, warnings) as 'dotted.key: message' lines."""
    problems: list[str] = []
    warnings: list[str] = []
    q = cfg.model.quantization
    if q is not None and q.bits == 8:
        for key in ("type", "double_quant", "compute_dtype"):
            dotted = f"model.quantization.{key}"
            # Set beside `bits: 8` it is a mistake; inherited from a 4-bit parent it simply no longer applies.
            if key in q.model_fields_set and _file_of(origins, dotted) == _file_of(origins, "model.quantization.bits"):
                problems.append(f"{dotted}: applies to 4-bit only (bits is 8); remove it or set bits: 4")
    t = cfg.train
    if t.warmup >= 1 and t.warmup != int(t.warmup):
        problems.append(f"train.warmup: {t.warmup} is >= 1, so it counts steps and must be a whole number "
                        f"(for a fraction of the run use a value below 1)")
    if t.max_steps is not None and t.warmup >= 1 and t.warmup > t.max_steps:
        problems.append(f"train.warmup: {int(t.warmup)} warmup steps exceed train.max_steps ({t.max_steps})")
    if t.max_steps is not None and "epochs" in t.model_fields_set and t.epochs != 1:
        warnings.append(f"train.epochs: {t.epochs} is ignored because train.max_steps ({t.max_steps}) is set")
    has_eval = bool(cfg.data.eval) or cfg.data.eval_fraction > 0
    if cfg.data.eval and cfg.data.eval_fraction > 0:
        problems.append("data.eval_fraction: set both data.eval and data.eval_fraction; use one or the other")
    if t.eval_every > 0 and not has_eval:
        problems.append("train.eval_every: there is no eval data; add data.eval sources or set data.eval_fraction")
    if t.precision == "fp16" and cfg.model.dtype == "bfloat16":
        problems.append("train.precision: fp16 with model.dtype bfloat16 mixes two half types; "
                        "use precision bf16, or model.dtype float16 / float32")
    if t.precision == "bf16" and cfg.model.dtype == "float16":
        problems.append("train.precision: bf16 with model.dtype float16 mixes two half types; "
                        "use precision fp16, or model.dtype bfloat16 / float32")
    if q is None and t.optimizer == "paged_adamw_8bit":
        warnings.append("train.optimizer: paged_adamw_8bit mainly helps QLoRA; adamw_8bit pages nothing and is as small")
    if cfg.adapter.method == "dora" and q is not None and q.bits == 8:
        warnings.append("adapter.method: DoRA on an 8-bit base dequantizes the weight every step (slow)")
    problems += _data_problems(cfg)
    problems += _adapter_problems(cfg)
    problems += _placement_problems(cfg)
    problems += _preference_problems(cfg)
    if cfg.data.chat_template is not None and not any(s.format == "chat" for s in cfg.data.train + cfg.data.eval):
        warnings.append("data.chat_template: set, but no data source has format: chat")
    if cfg.data.prompt_template is not None and not any(s.format == "alpaca" for s in cfg.data.train + cfg.data.eval):
        warnings.append("data.prompt_template: set, but no data source has format: alpaca")
    return problems, warnings


# Keys `adapter.from` decides: what the saved adapter is (its weights only fit layers built this way).
_FROM_KEYS = ("method", "r", "alpha", "targets", "rslora", "vera.projection_seed", "modules_to_save")


def _adapter_from(cfg: Config, origins: dict[str, str], fallback: str) -> Config:
    """`adapter.from`: the config with the adapter's method, r, alpha, targets (and VeRA seed) taken from it.

    Raises:
        ConfigError: the folder holds no adapter lorafit can continue, or a key set in the config contradicts the
            adapter (both values named).
    """
    from lorafit.adapters.peft_io import adapter_dir_of, describe_adapter
    from lorafit.errors import RunDirError

    a = cfg.adapter
    where = _origin(origins, "adapter.from", fallback)
    try:
        parent = describe_adapter(adapter_dir_of(a.from_))
    except RunDirError as e:
        raise ConfigError(f"{where}: adapter.from: {e}", source=fallback) from None
    if parent["method"] == "adalora":
        raise ConfigError(f"{where}: adapter.from: {a.from_} is an AdaLoRA adapter; lorafit continues lora, dora, "
                          f"lora_fa and vera adapters (merge it first and train a new adapter on the merged model)",
                          source=fallback)
    values = {"method": parent["method"], "r": parent["r"], "alpha": parent["alpha"],
              "targets": parent["targets"], "rslora": parent["rslora"], "modules_to_save": parent["modules_to_save"],
              "vera.projection_seed": parent.get("vera", {}).get("projection_seed")}
    problems = []
    for key in _FROM_KEYS:
        dotted, value = f"adapter.{key}", values[key]
        if value is None or not any(k == dotted or k.startswith(dotted + ".") for k in origins):
            continue
        mine = _get(a.settings(), key)
        if (sorted(mine) if isinstance(mine, list) else mine) != value:
            problems.append(f"{_origin(origins, dotted, fallback)}: {dotted}: {mine!r} contradicts adapter.from "
                            f"({a.from_} has {key} {value!r}); remove {dotted} (it is taken from the adapter) or "
                            f"set it to {value!r}")
    if "adapter.init" in origins and a.init != "default":
        problems.append(f"{_origin(origins, 'adapter.init', fallback)}: adapter.init: {a.init} contradicts "
                        f"adapter.from (the weights start as {a.from_}'s); remove adapter.init")
    if problems:
        raise ConfigError(problems, source=fallback)
    update = {k: v for k, v in values.items() if "." not in k}
    if parent["method"] == "vera":
        update["vera"] = (a.vera or VeraConfig()).model_copy(update=parent["vera"])
        update.pop("alpha")
    data = cfg.to_dict()
    data["adapter"].update({k: v.model_dump(mode="json") if isinstance(v, BaseModel) else v for k, v in update.items()})
    return Config.model_validate(data)


@dataclass
class LoadedConfig:
    """A validated config with where it came from. `warnings` are printed by the CLI, never fatal."""

    config: Config
    path: Path
    warnings: list[str] = field(default_factory=list)
    origins: dict[str, str] = field(default_factory=dict)


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> LoadedConfig:
    """Read, merge (`extends:`), override and validate a config.

    Args:
        path: the YAML file.
        overrides: `dotted.key=value` strings from the command line; they win over every file.

    Returns:
        The validated config with its warnings.

    Raises:
        ConfigError: listing every problem found, each with its file, line where known, and dotted key.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory; give a config file (e.g. configs/tiny-quickstart.yaml)")
    layer = _load_with_extends(path)
    override_problems = []
    for text in overrides:
        try:
            _apply_override(layer, *parse_override(text))
        except ConfigError as e:
            override_problems += e.problems
    if override_problems:
        raise ConfigError(override_problems, source=COMMAND_LINE)
    try:
        cfg = Config.model_validate(layer.data)
    except ValidationError as e:
        raise ConfigError(_pydantic_problems(e, layer.origins, str(path)), source=str(path)) from None
    if cfg.adapter.from_ is not None:  # before the cross-field checks, so they see the adapter's method
        cfg = _adapter_from(cfg, layer.origins, str(path))
    problems, warnings = _cross_field_problems(cfg, layer.origins)
    if problems:
        raise ConfigError([f"{_origin(layer.origins, p.split(':')[0], str(path))}: {p}" for p in problems],
                          source=str(path))
    return LoadedConfig(cfg, path, warnings, layer.origins)


def config_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts (as dumped to config.yaml), sorted."""
    keys = sorted(set(old) | set(new))
    out: list[str] = []
    for k in keys:
        a, b, dotted = old.get(k), new.get(k), f"{prefix}{k}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, dotted + ".")
        elif a != b:
            out.append(dotted)
    return out
