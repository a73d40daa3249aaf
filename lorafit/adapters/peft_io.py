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

from lorafit.adapters.placement import pattern_value
from lorafit.atomic import write_dir_atomically
from lorafit.errors import LorafitError, RunDirError

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
                 weights: dict[str, Any] | None = None, settings: dict[str, Any] | None = None,
                 modules_to_save: list[str] = ()) -> Path:
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
        modules_to_save: module names trained whole (`tokens.train_whole`): saved whole under their own names.
            Token-row layers (`tokens.TokenRows`) are saved as PEFT's trainable_token_indices.

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
    config.update(_saved_patterns(layers, config, r, alpha))
    found = lora_state_dict(model, export=True) if weights is None else adapter_tensors(weights)
    extra, extra_config = _extra_trainables(model, list(modules_to_save))
    config.update(extra_config)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in {**found, **extra}.items()}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)

    return write_dir_atomically(Path(out_dir), write)


def _extra_trainables(model, modules_to_save: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Token rows and whole modules: (their tensors under PEFT's names, their adapter_config.json keys).

    trainable_token_indices is keyed by module name, the embedding's and (untied) the head's; a tied head shares
    the embedding's rows and is not listed (PEFT ties it again on load).
    """
    from lorafit.adapters import PEFT_PREFIX
    from lorafit.adapters.tokens import find_modules, token_row_layers, token_row_tensors, whole_module_tensors

    rows = {n: layer.token_indices for n, layer in token_row_layers(model).items() if not layer.tied}
    tensors = {PEFT_PREFIX + k: v for k, v in token_row_tensors(model).items()}
    whole = list(find_modules(model, list(modules_to_save))) if modules_to_save else []
    tensors.update({PEFT_PREFIX + k: v for k, v in whole_module_tensors(model, whole).items()})
    config = {"trainable_token_indices": rows or None, "modules_to_save": list(modules_to_save) or None}
    return tensors, {k: v for k, v in config.items() if v is not None}  # other methods' formats lack the keys


def _saved_patterns(layers: dict, config: dict, r: int, alpha: float) -> dict[str, Any]:
    """rank_pattern / alpha_pattern for the layers whose rank or alpha differ from the adapter-wide ones (adapter.layers,
    rank_pattern, allocate), with exact keys (`placement.saved_patterns`). A saved form that rescales r and alpha
    (PiSSA's rank-2r conversion) rescales every layer alike. Other peft_types keep their own patterns."""
    from lorafit.adapters.experts import ExpertLora, expert_target_name
    from lorafit.adapters.placement import saved_patterns

    if config.get("peft_type") != "LORA" or config.get("rank_pattern"):
        return {}
    k_r, k_alpha = config["r"] / r, config["lora_alpha"] / alpha
    own = {(expert_target_name(n, layer) if isinstance(layer, ExpertLora) else n):
           (round(layer.r * k_r), layer.alpha * k_alpha) for n, layer in layers.items()}
    ranks, alphas = saved_patterns(own, config["r"], config["lora_alpha"])
    return {"rank_pattern": ranks, "alpha_pattern": alphas}


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
                          f"layers, no bias); load it with PEFT instead")
    return config


_SUPPORTED = {  # adapter_config.json keys lorafit cannot honour unless they have their neutral value
    "bias": lambda v: v in (None, "none"),
    "lora_bias": lambda v: not v,
    "layer_replication": lambda v: not v,
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


def _group_by_module(tensors: dict) -> dict[str, dict[str, Any]]:
    """{module name: {"lora_A.weight": t, "lora_B.weight": t, ...}} from PEFT-named tensors."""
    from lorafit.adapters import group_by_module
    from lorafit.errors import LorafitError

    try:
        return group_by_module(tensors)
    except LorafitError as e:
        raise RunDirError(str(e)) from None


def load_adapter(model, adapter_dir: str | Path, *, dropout: float | None = None,
                 method: str | None = None) -> AdapterSettings:
    """Attach the LoRA layers an adapter folder describes (lorafit or PEFT format) and load their weights.

    Which modules are wrapped is read off the tensor names, so PEFT's list / regex / all-linear target_modules
    all work; each layer's rank comes from its A matrix, its alpha from alpha_pattern or lora_alpha.

    Args:
        model: the base model, without LoRA layers (full precision or quantized).
        adapter_dir: the adapter folder.
        dropout: adapter dropout for further training; default: the saved lora_dropout.
        method: "lora_fa" to continue a LoRA-FA adapter (saved as peft_type LORA) with A frozen; default: LoRA,
            or DoRA when the adapter has magnitude vectors.

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
    tensors = _read_tensors(adapter_dir)
    resize_for_adapter(model, adapter_dir, config, tensors)
    extras = _take_extra_trainables(model, adapter_dir, config, tensors)  # removes them from `tensors`
    grouped = _group_by_module(tensors)
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
        this = getattr(getattr(model, "config", None), "_name_or_path", None) or "this model"
        raise RunDirError(f"{adapter_dir}: the adapter adapts {', '.join(missing[:3])}{more}, which {this} "
                          f"does not have (the adapter's base: {config.get('base_model_name_or_path')})")
    for name, parts in grouped.items():
        if name in expert_names:
            continue
        if "lora_A.weight" not in parts:
            raise RunDirError(f"{adapter_dir}: no lora_A tensor for {name}")
        r = int(parts["lora_A.weight"].shape[0])  # (r, in): rank_pattern needs no lookup
        alpha = float(pattern_value(config.get("alpha_pattern"), name, config["lora_alpha"]))
        dora = "lora_magnitude_vector" in parts
        kind = "dora" if dora else "lora_fa" if method == "lora_fa" else "lora"
        wrap_module(model, name, method=kind, r=r, alpha=alpha, dropout=drop, rslora=rslora)
    extras()
    try:
        load_lora_state_dict(model, {f"{n}.{k}": t for n, parts in grouped.items() for k, t in parts.items()})
    except LorafitError as e:
        this = getattr(getattr(model, "config", None), "_name_or_path", None) or "this model"
        raise RunDirError(f"{adapter_dir}: {e} (the adapter's base: {config.get('base_model_name_or_path')}; "
                          f"the model: {this})") from None
    return AdapterSettings(r=int(config["r"]), alpha=float(config["lora_alpha"]), dropout=drop, rslora=rslora,
                           dora=bool(config.get("use_dora", False)),
                           base_model_name_or_path=config.get("base_model_name_or_path"),
                           target_modules=config.get("target_modules"), wrapped=list(lora_layers(model)))


def resize_for_adapter(model, adapter_dir: Path, config: dict, tensors: dict) -> None:
    """Grow the model's embedding (and head) to the vocabulary the adapter was trained with: the tokenizer saved
    beside it, at least every token row it trains (new rows start at the mean row, as in training)."""
    from lorafit.adapters import PEFT_PREFIX
    from lorafit.adapters.tokens import DELTA

    indices = config.get("trainable_token_indices") or []
    ids = [i for v in (indices.values() if isinstance(indices, dict) else [indices]) for i in v]
    embed = model.get_input_embeddings()
    needed = max(ids, default=-1) + 1
    whole = [t.shape[0] for k, t in tensors.items() if DELTA not in k and t.dim() == 2 and k.startswith(PEFT_PREFIX)
             and k[len(PEFT_PREFIX):].rpartition(".")[0] in _whole_names(model, config)]
    needed = max([needed, *whole])
    if needed == 0 or needed <= embed.weight.shape[0]:
        return
    if (adapter_dir / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        needed = max(needed, len(AutoTokenizer.from_pretrained(str(adapter_dir))))
    from lorafit.adapters.tokens import init_rows

    rows = embed.weight.shape[0]
    model.resize_token_embeddings(needed, mean_resizing=False)
    init_rows(model, list(range(rows, needed)))


def grow_for_adapter(model, adapter_dir: str | Path) -> None:
    """`resize_for_adapter` from the folder alone: the base grown to the vocabulary the adapter's token rows /
    whole embedding modules need (nothing for an adapter without them)."""
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    if config.get("trainable_token_indices") or config.get("modules_to_save"):
        resize_for_adapter(model, adapter_dir, config, _read_tensors(adapter_dir))


def _whole_names(model, config: dict) -> list[str]:
    from lorafit.adapters.tokens import find_modules

    names = config.get("modules_to_save") or []
    try:
        return list(find_modules(model, names)) if names else []
    except LorafitError as e:
        raise RunDirError(str(e).replace("adapter.modules_to_save", "the adapter's modules_to_save")) from None


def _take_extra_trainables(model, adapter_dir: Path, config: dict, tensors: dict):
    """Take the token rows and whole modules out of `tensors`; returns a function that attaches them (called once
    the LoRA layers are in place), trainable, with their saved values."""
    import torch

    from lorafit.adapters import PEFT_PREFIX
    from lorafit.adapters.tokens import DELTA, TOKEN_ADAPTER, attach_token_rows, train_whole

    rows = {k[len(PEFT_PREFIX):].removesuffix(f".{TOKEN_ADAPTER}.{DELTA}"): tensors.pop(k)
            for k in [k for k in tensors if k.endswith(f".{TOKEN_ADAPTER}.{DELTA}")]}
    whole_names = _whole_names(model, config)
    whole = {k[len(PEFT_PREFIX):]: tensors.pop(k) for k in [k for k in tensors if k.startswith(PEFT_PREFIX)
             and k[len(PEFT_PREFIX):].rpartition(".")[0] in whole_names]}
    indices = config.get("trainable_token_indices") or []
    if rows and not indices:
        raise RunDirError(f"{adapter_dir}: token rows are saved but trainable_token_indices is missing")
    layers = _embedding_layers(model, tensors)

    def attach() -> None:
        for module, value in layers.items():
            if module.weight.shape != value.shape:
                raise RunDirError(f"{adapter_dir}: a saved embedding layer {tuple(value.shape)} does not fit the "
                                  f"model's {tuple(module.weight.shape)}")
            with torch.no_grad():
                module.weight.copy_(value)
        if whole_names:
            train_whole(model, whole_names)
            params = dict(model.named_parameters())
            for key, value in whole.items():
                if key not in params or params[key].shape != value.shape:
                    raise RunDirError(f"{adapter_dir}: modules_to_save tensor {key} {tuple(value.shape)} does not fit "
                                      f"the model")
                with torch.no_grad():
                    params[key].copy_(value)
        if not rows:
            return
        embed_name = next(n for n, m in model.named_modules() if m is model.get_input_embeddings())
        ids = indices if isinstance(indices, list) else next(
            (v for k, v in indices.items() if embed_name == k or embed_name.endswith("." + k)), [])
        if not ids:
            raise RunDirError(f"{adapter_dir}: trainable_token_indices {indices} names no input embedding")
        attach_token_rows(model, ids)
        _fill_token_rows(model, adapter_dir, rows)

    return attach


def _embedding_layers(model, tensors: dict) -> dict:
    """Take out whole embedding / head weights PEFT saved beside the adapter (it does when the vocabulary was
    resized: ``<module>.weight`` or ``<module>.token_adapter.base_layer.weight``): {module: weight}."""
    from lorafit.adapters import PEFT_PREFIX

    modules = {n: m for n, m in model.named_modules() if m is model.get_input_embeddings()
               or m is model.get_output_embeddings()}
    found = {}
    for key in list(tensors):
        path = key[len(PEFT_PREFIX):].replace(".token_adapter.base_layer.", ".") if key.startswith(PEFT_PREFIX) \
            else key
        name, _, param = path.rpartition(".")
        if name in modules and param == "weight":
            found[modules[name]] = tensors.pop(key)
    return found


def _fill_token_rows(model, adapter_dir: Path, rows: dict) -> None:
    """Copy saved token-row blocks into the attached layers; a missing untied head block keeps the base rows (a
    PEFT adapter that trained the embedding's rows only)."""
    import torch

    from lorafit.adapters.tokens import token_row_layers

    layers = token_row_layers(model)
    for name, value in rows.items():
        match = next((layer for n, layer in layers.items() if n == name or n.endswith("." + name)), None)
        if match is None or match.delta.shape != value.shape:
            raise RunDirError(f"{adapter_dir}: token rows for {name} {tuple(value.shape)} do not fit the model")
        with torch.no_grad():
            match.delta.copy_(value)


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
        alpha = float(pattern_value(config.get("alpha_pattern"), path, config["lora_alpha"]))
        wrap_module(model, path, r=r, alpha=alpha, rslora=rslora)
    return set(names.values())


def _innermost(module):
    """The module under any adapter layers (their `base_layer` chain)."""
    while hasattr(module, "base_layer"):
        module = module.base_layer
    return module


# ------------------------------------------------------------------------------------------ continuing one

LINEAGE_NAME = "lorafit.json"  # lorafit's own metadata beside the PEFT files: where the adapter came from


def adapter_dir_of(path: str | Path) -> Path:
    """The adapter folder `path` names: a run folder (its `adapter/`) or an adapter folder itself.

    Raises:
        RunDirError: neither holds an adapter_config.json (both places named).
    """
    path = Path(path)
    for candidate in (path, path / "adapter"):
        if (candidate / CONFIG_NAME).is_file():
            return candidate
    if not path.exists():
        raise RunDirError(f"{path}: no such run or adapter folder")
    raise RunDirError(f"{path}: not an adapter (no {CONFIG_NAME} in it or in {path / 'adapter'}); give a run folder "
                      f"or an adapter folder")


def describe_adapter(adapter_dir: str | Path) -> dict[str, Any]:
    """What a saved adapter is, in `adapter:` terms (plain data): method, r, alpha, rslora, targets, the VeRA
    projection seed, and the base it was trained on. Reads adapter_config.json (and lorafit.yaml, which tells a
    LoRA-FA adapter from a LoRA one: both save as peft_type LORA).

    Raises:
        RunDirError: not an adapter lorafit can load (`read_adapter_config`).
    """
    import yaml

    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    peft_type = config.get("peft_type", "LORA")
    lorafit_yaml = adapter_dir / "lorafit.yaml"
    saved = (yaml.safe_load(lorafit_yaml.read_text()) or {}).get("adapter", {}) if lorafit_yaml.is_file() else {}
    targets = config.get("target_modules")
    if isinstance(targets, str) and targets != "all-linear":
        targets = "re:" + targets  # PEFT fullmatches a string against module names, as lorafit's re: does
    out: dict[str, Any] = {"r": int(config["r"]), "targets": sorted(targets) if isinstance(targets, list) else targets,
                           "base": config.get("base_model_name_or_path"), "rslora": bool(config.get("use_rslora")),
                           "modules_to_save": sorted(config.get("modules_to_save") or [])}
    if peft_type == "VERA":
        out.update(method="vera", alpha=float(config["r"]), vera={"projection_seed": int(config.get("projection_prng_key", 0))})
    elif peft_type == "ADALORA":
        out.update(method="adalora", alpha=float(config["lora_alpha"]))
    else:
        method = "dora" if config.get("use_dora") else "lora_fa" if saved.get("method") == "lora_fa" else "lora"
        out.update(method=method, alpha=float(config["lora_alpha"]))
    return out


def tensors_sha256(adapter_dir: str | Path) -> str:
    """SHA-256 over an adapter's tensors (names, dtypes, shapes and bytes, in name order): the same for the same
    weights whichever file format holds them."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(_read_tensors(Path(adapter_dir)).items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # raw bytes: bf16 has no numpy type
    return digest.hexdigest()


def lineage(parent_dir: str | Path) -> list[dict[str, str]]:
    """The lineage a continued adapter records: its parent (absolute path, `tensors_sha256`) first, then the
    parent's own lineage (when the parent was itself continued)."""
    parent_dir = Path(parent_dir).resolve()
    record = [{"path": str(parent_dir), "sha256": tensors_sha256(parent_dir)}]
    meta = parent_dir / LINEAGE_NAME
    if meta.is_file():
        try:
            record += json.loads(meta.read_text()).get("lineage", [])
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            pass  # a damaged record of the grandparents does not stop a run; the parent is recorded
    return record
