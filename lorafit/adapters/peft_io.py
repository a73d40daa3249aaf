"""PEFT-format adapter I/O: `adapter_config.json` + `adapter_model.safetensors` (+ tokenizer files).

Saving is atomic: everything is written to a temporary folder beside the target and renamed into place, so a
crash never leaves a half-written adapter where a complete one is expected. Loading accepts adapters saved by
lorafit or by PEFT (LoRA and DoRA, target_modules as a list or a regex, alpha_pattern / rank_pattern).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafit.atomic import write_dir_atomically
from lorafit.errors import RunDirError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"


# ------------------------------------------------------------------------------------------------ saving


def _peft_config(wrapped: list[str], all_linear: list[str], *, base_model_name_or_path: str | None, r: int,
                 alpha: float, dropout: float, rslora: bool, dora: bool, fan_in_fan_out: bool = False,
                 experts: list[str] = (), all_experts: list[str] = ()) -> dict[str, Any]:
    """adapter_config.json as PEFT writes it (the keys its LoraConfig needs to rebuild the same layers).

    target_modules: the wrapped suffixes (q_proj, ...) when those select exactly the wrapped modules, the usual
    case; else (e.g. a regex that picked some layers only) a regex PEFT fullmatches against the exact names.
    target_parameters: the adapted fused expert weights (`experts`, parameter paths) likewise: ``experts.down_proj``
    style suffixes when they select exactly those among `all_experts`, else the full paths. PEFT cannot drop the
    inputs of a weight update, so an adapter with expert weights records lora_dropout 0 (PEFT refuses any other).
    fan_in_fan_out: the wrapped layers are Conv1D (GPT-2), whose weights PEFT must transpose when merging.
    """
    suffixes = sorted({name.rpartition(".")[2] for name in wrapped})
    covered = [n for n in all_linear if any(n == s or n.endswith("." + s) for s in suffixes)]
    targets: list[str] | str = suffixes if covered == wrapped else "(" + "|".join(map(re.escape, wrapped)) + ")"
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "revision": None, "r": r, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": targets,
        "exclude_modules": None, "use_rslora": rslora, "use_dora": dora, "bias": "none", "lora_bias": False,
        "fan_in_fan_out": fan_in_fan_out, "init_lora_weights": True, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
        "inference_mode": True,
    }
    if experts:
        short = sorted({".".join(p.split(".")[-2:]) for p in experts})  # experts.gate_up_proj
        picked = [p for p in all_experts if any(p == s or p.endswith("." + s) for s in short)]
        config["target_parameters"] = short if sorted(picked) == sorted(experts) else sorted(experts)
        config["target_modules"] = targets if wrapped else []  # [] : PEFT adds no default modules
        config["lora_dropout"] = 0.0
    return config


def _adapted(model, layers: dict) -> tuple[list[str], list[str], bool]:
    """(wrapped linear module names, adapted expert weight paths, whether the linear layers are Conv1D)."""
    from lorafit.adapters.experts import ExpertLora, expert_target_name
    from lorafit.adapters.targets import is_conv1d

    linear = [n for n, layer in layers.items() if not isinstance(layer, ExpertLora)]
    experts = [expert_target_name(n, layer) for n, layer in layers.items() if isinstance(layer, ExpertLora)]
    # A 4/8-bit base keeps the class it replaced (transformers' bitsandbytes integration sets source_cls)
    conv = [n for n in linear if is_conv1d(layers[n].base_layer)
            or getattr(getattr(layers[n].base_layer, "source_cls", None), "__name__", "") == "Conv1D"]
    return linear, experts, bool(conv) and len(conv) == len(linear)


def _all_experts(model) -> list[str]:
    """Parameter paths of every fused expert weight, adapted or not (without the adapter layers' segments)."""
    from lorafit.adapters.targets import expert_parameters

    return [re.sub(r"(\.base_layer)+$", "", path.rpartition(".")[0]) + "." + path.rpartition(".")[2]
            for path, _, _ in expert_parameters(model)]


def save_adapter(model, out_dir: str | Path, *, base_model_name_or_path: str | None, r: int, alpha: float,
                 dropout: float, targets: str | list[str], rslora: bool = False, dora: bool = False,
                 tokenizer=None, extra_files: dict[str, str] | None = None,
                 weights: dict[str, Any] | None = None, settings: dict[str, Any] | None = None) -> Path:
    """Write the model's LoRA layers as a PEFT adapter folder, atomically (an existing folder is replaced only
    once the new one is complete).

    Args:
        model: a model with LoRA layers (unwrapped from DDP / Accelerate).
        out_dir: the adapter folder to create or replace.
        base_model_name_or_path: recorded for PEFT and for `lorafit merge`.
        r, alpha, dropout, rslora, dora: the adapter's settings, recorded in adapter_config.json.
        targets: the user's target spec; only used to explain an error when nothing is wrapped.
        tokenizer: when given, its files (and chat template) are saved beside the adapter.
        extra_files: {file name: text} written into the folder in the same atomic step (e.g. lorafit.yaml).
        weights: the trainable parameters by name, gathered whole (`lorafit.parallel.trainable_state`); needed
            when the layers hold only shards (FSDP). Default: read from the layers.
        settings: the `adapter:` section as plain data (`AdapterConfig.settings()`); its method adds its own
            adapter_config.json keys (peft_type ...) and may save a converted form of its tensors (PiSSA).

    Returns:
        The adapter folder.
    """
    from safetensors.torch import save_file

    from lorafit.adapters import METHODS, adapter_tensors, lora_layers, lora_state_dict

    layers = lora_layers(model)
    wrapped = list(layers)
    if not wrapped:
        raise RunDirError(f"cannot save an adapter: the model has no LoRA layers (targets {targets!r})")
    linear, experts, conv1d = _adapted(model, layers)
    config = _peft_config(linear, _all_linear(model),
                          base_model_name_or_path=base_model_name_or_path, r=r, alpha=alpha, dropout=dropout,
                          rslora=rslora, dora=dora, fan_in_fan_out=conv1d, experts=experts,
                          all_experts=_all_experts(model) if experts else [])
    if settings is not None:
        layer_class = METHODS[settings["method"]].layer
        config.update(layer_class.peft_config(layers, settings))
        config = {k: v for k, v in config.items() if k not in layer_class.peft_config_drop}
    found = lora_state_dict(model, export=True) if weights is None else adapter_tensors(weights)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in found.items()}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)

    return write_dir_atomically(Path(out_dir), write)


def _all_linear(model) -> list[str]:
    """Names of every linear layer, counting a LoRA wrapper under its own name, in model order."""
    from lorafit.adapters import bare_named_modules, linear_modules, lora_layers
    from lorafit.adapters.experts import ExpertLora

    names = {n for n, layer in lora_layers(model).items() if not isinstance(layer, ExpertLora)}
    names |= {n for n, _ in linear_modules(model)}
    return list(dict.fromkeys(n for n, _ in bare_named_modules(model) if n in names))


# ------------------------------------------------------------------------------------------------ loading


@dataclass
class AdapterSettings:
    """What `load_adapter` read and attached."""

    r: int
    alpha: float
    dropout: float
    rslora: bool
    dora: bool
    base_model_name_or_path: str | None
    target_modules: list[str] | str | None
    wrapped: list[str] = field(default_factory=list)


def read_adapter_config(adapter_dir: str | Path) -> dict[str, Any]:
    """adapter_config.json of a PEFT/lorafit LoRA adapter, checked for the keys lorafit needs.

    Raises:
        RunDirError: the folder or file is missing, not JSON, not a LoRA adapter, or lacks r / lora_alpha.
    """
    path = Path(adapter_dir) / CONFIG_NAME
    if not Path(adapter_dir).is_dir():
        raise RunDirError(f"{adapter_dir}: no such adapter folder")
    if not path.is_file():
        raise RunDirError(f"{adapter_dir}: not an adapter folder ({CONFIG_NAME} is missing)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunDirError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise RunDirError(f"{path}: expected a JSON object")
    from lorafit.adapters import peft_types

    peft_type = config.get("peft_type", "LORA")
    if peft_type not in peft_types():
        raise RunDirError(f"{path}: peft_type is {peft_type!r}; lorafit loads {', '.join(peft_types())} adapters "
                          f"(load this one with PEFT)")
    if peft_type != "LORA":
        return config  # the method's own loader checks its keys
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), int | float) or config[key] <= 0:
            raise RunDirError(f"{path}: {key} must be a positive number (got {config.get(key)!r})")
    unsupported = [f"{k}={config[k]!r}" for k, ok in _SUPPORTED.items() if k in config and not ok(config[k])]
    if unsupported:
        raise RunDirError(f"{path}: {', '.join(unsupported)} is not supported by lorafit (plain LoRA/DoRA on linear "
                          f"layers, no bias, no modules_to_save); load it with PEFT instead")
    return config


_SUPPORTED = {  # adapter_config.json keys lorafit cannot honour unless they have their neutral value
    "bias": lambda v: v in (None, "none"),
    "lora_bias": lambda v: not v,
    "modules_to_save": lambda v: not v,
    "layer_replication": lambda v: not v,
    "trainable_token_indices": lambda v: not v,
}


def _read_tensors(adapter_dir: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    if (adapter_dir / WEIGHTS_NAME).is_file():
        try:
            return load_file(str(adapter_dir / WEIGHTS_NAME))
        except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
            raise RunDirError(f"{adapter_dir / WEIGHTS_NAME}: cannot be read ({e})") from None
    if (adapter_dir / LEGACY_WEIGHTS_NAME).is_file():
        return torch.load(adapter_dir / LEGACY_WEIGHTS_NAME, map_location="cpu", weights_only=True)
    raise RunDirError(f"{adapter_dir}: {WEIGHTS_NAME} is missing")


def _pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's rank/alpha_pattern lookup: the first key that matches the end of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _group_by_module(tensors: dict) -> dict[str, dict[str, Any]]:
    """{module name: {"lora_A.weight": t, "lora_B.weight": t, ...}} from PEFT-named tensors."""
    from lorafit.adapters import group_by_module
    from lorafit.errors import LorafitError

    try:
        return group_by_module(tensors)
    except LorafitError as e:
        raise RunDirError(str(e)) from None


def load_adapter(model, adapter_dir: str | Path, *, dropout: float | None = None) -> AdapterSettings:
    """Attach the LoRA layers an adapter folder describes (lorafit or PEFT format) and load their weights.

    Which modules are wrapped is read off the tensor names, so PEFT's list / regex / all-linear target_modules
    all work; each layer's rank comes from its A matrix, its alpha from alpha_pattern or lora_alpha.

    Args:
        model: the base model, without LoRA layers (full precision or quantized).
        adapter_dir: the adapter folder.
        dropout: adapter dropout for further training; default: the saved lora_dropout.

    Returns:
        The adapter's settings and the wrapped module names.

    Raises:
        RunDirError: missing or malformed files, or modules the model does not have.
        LorafitError: tensor shapes that do not fit the model.
    """
    from lorafit.adapters import load_lora_state_dict, lora_layers, wrap_module
    from lorafit.errors import LorafitError

    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    if config.get("peft_type", "LORA") != "LORA":  # VERA, ADALORA ...: the method's layer class loads it
        from lorafit.adapters import layer_for_peft_type

        return layer_for_peft_type(config["peft_type"]).load_peft(model, adapter_dir, config, _read_tensors(adapter_dir),
                                                                  dropout=dropout)
    grouped = _group_by_module(_read_tensors(adapter_dir))
    if not grouped:
        raise RunDirError(f"{adapter_dir / WEIGHTS_NAME}: holds no LoRA tensors")
    if lora_layers(model):
        raise RunDirError("the model already has LoRA layers; load an adapter into a fresh base model")
    rslora = bool(config.get("use_rslora", False))
    drop = float(config.get("lora_dropout", 0.0) or 0.0) if dropout is None else dropout
    for p in model.parameters():
        p.requires_grad_(False)  # as attach_lora: only the adapter trains
    expert_names = _wrap_experts(model, adapter_dir, config, grouped, rslora)
    modules = dict(model.named_modules())
    missing = [n for n in grouped if n not in modules and n not in expert_names]
    if missing:
        more = " ..." if len(missing) > 3 else ""
        raise RunDirError(f"{adapter_dir}: the adapter adapts {', '.join(missing[:3])}{more}, which this model "
                          f"does not have (the adapter's base: {config.get('base_model_name_or_path')})")
    for name, parts in grouped.items():
        if name in expert_names:
            continue
        if "lora_A.weight" not in parts:
            raise RunDirError(f"{adapter_dir}: no lora_A tensor for {name}")
        r = int(parts["lora_A.weight"].shape[0])  # (r, in): rank_pattern needs no lookup
        alpha = float(_pattern_value(config.get("alpha_pattern"), name, config["lora_alpha"]))
        dora = "lora_magnitude_vector" in parts
        wrap_module(model, name, method="dora" if dora else "lora", r=r, alpha=alpha, dropout=drop, rslora=rslora)
    try:
        load_lora_state_dict(model, {f"{n}.{k}": t for n, parts in grouped.items() for k, t in parts.items()})
    except LorafitError as e:
        raise RunDirError(f"{adapter_dir}: {e}") from None
    return AdapterSettings(r=int(config["r"]), alpha=float(config["lora_alpha"]), dropout=drop, rslora=rslora,
                           dora=bool(config.get("use_dora", False)),
                           base_model_name_or_path=config.get("base_model_name_or_path"),
                           target_modules=config.get("target_modules"), wrapped=list(lora_layers(model)))


def _wrap_experts(model, adapter_dir: Path, config: dict, grouped: dict, rslora: bool) -> set[str]:
    """Attach an ExpertLora to each fused expert weight the config's ``target_parameters`` select (PEFT's rule),
    each with the rank its A tensor has. Returns the adapter layers' module names (the tensors' module names)."""
    from lorafit.adapters import wrap_module
    from lorafit.adapters.experts import expert_layer_names, matching_expert_parameters
    from lorafit.adapters.targets import expert_shape

    targets = config.get("target_parameters") or []
    if isinstance(targets, str):
        targets = [targets]
    paths = matching_expert_parameters(model, targets)
    if targets and not paths:
        raise RunDirError(f"{adapter_dir}: target_parameters {targets} match no fused expert weight of this model")
    names = expert_layer_names(paths)
    for path in paths:
        owner, _, parameter = path.rpartition(".")
        experts = expert_shape(_innermost(model.get_submodule(owner)), parameter)[0]  # under layers wrapped so far
        lora_a = grouped.get(names[path], {}).get("lora_A.weight")
        if lora_a is None:
            raise RunDirError(f"{adapter_dir}: no lora_A tensor for {names[path]} ({path})")
        r = int(lora_a.shape[0]) // experts  # (r·E, in)
        alpha = float(_pattern_value(config.get("alpha_pattern"), path, config["lora_alpha"]))
        wrap_module(model, path, r=r, alpha=alpha, rslora=rslora)
    return set(names.values())


def _innermost(module):
    """The module under any adapter layers (their `base_layer` chain)."""
    while hasattr(module, "base_layer"):
        module = module.base_layer
    return module
