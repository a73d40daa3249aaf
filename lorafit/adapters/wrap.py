"""Whole-model operations: attach adapter layers, unwrap them, merge them, and read / write their tensors under
PEFT's names; the optimizer's parameter groups and the trainable-parameter report.

Which layer class a method uses comes from `registry.METHODS`; everything here works for any of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from lorafit.adapters.base import PEFT_PREFIX, AdapterLayer, logical_numel
from lorafit.adapters.placement import place
from lorafit.adapters.registry import METHODS, tensor_kinds
from lorafit.adapters.targets import bare_name, bare_named_modules, find_targets, is_expert_target, is_linear, module_kinds
from lorafit.errors import LorafitError


def lora_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """Every adapter layer in the model (any method), by (bare) module name."""
    return {name: m for name, m in bare_named_modules(model) if isinstance(m, AdapterLayer)}


def attach_adapter(model: nn.Module, targets: str | list[str], exclude: Iterable[str] = (), *,
                   method: str = "lora", placement: Callable[[list[str]], dict[str, dict]] | None = None,
                   **layer_args) -> list[str]:
    """Freeze the whole model and wrap the target linear layers in `method`'s layer class.

    Args:
        model: the base model (full precision or bitsandbytes-quantized).
        targets, exclude: see `targets.find_targets`.
        method: a key of `registry.METHODS`.
        placement: candidates -> {kept module: its own layer arguments (r, alpha)} (`placement.place`);
            default: every candidate, with `layer_args`.
        layer_args: the layer class's keyword arguments (r, alpha, dropout, ...).

    Returns:
        The wrapped module names.
    """
    if lora_layers(model):
        raise LorafitError("the model already has adapter layers; call unwrap_lora(model) before attaching new ones")
    names = find_targets(model, targets, exclude, wrapper_type=AdapterLayer)
    chosen = placement(names) if placement is not None else {n: {} for n in names}
    for p in model.parameters():
        p.requires_grad_(False)
    for name, own in chosen.items():
        wrap_module(model, name, method=method, **{**layer_args, **own})
    return list(chosen)


def attach_lora(model: nn.Module, targets: str | list[str], exclude: Iterable[str] = (), *, r: int, alpha: float,
                dropout: float = 0.0, rslora: bool = False, dora: bool = False,
                dtype: torch.dtype = torch.float32, **layer_args) -> list[str]:
    """`attach_adapter` for LoRA (and DoRA when `dora`): see `lora.LoraLinear` for the arguments."""
    return attach_adapter(model, targets, exclude, method="dora" if dora else "lora", r=r, alpha=alpha,
                          dropout=dropout, rslora=rslora, dtype=dtype, **layer_args)


def attach_from_settings(model: nn.Module, settings: dict, dtype: torch.dtype = torch.float32) -> list[str]:
    """Attach the adapter the `adapter:` settings describe (plain data: ``cfg.adapter.model_dump()``).

    Returns:
        The wrapped module names.
    """
    spec = METHODS[settings["method"]]
    args = spec.layer.layer_args(settings)
    names = attach_adapter(model, settings["targets"], settings.get("exclude", ()), method=settings["method"],
                           placement=partial(place, settings=settings), dtype=dtype, **args)
    spec.layer.prepare_model(model, lora_layers(model), settings)
    return names


def training_hooks(model: nn.Module, settings: dict, total_steps: int):
    """The method's additions to the training loop (`base.TrainingHooks`), bound to the model's layers."""
    return METHODS[settings["method"]].layer.training_hooks(lora_layers(model), settings, total_steps)


def method_param_count(in_features: int, out_features: int, settings: dict) -> int:
    """Trainable parameters the configured method adds to one (out, in) layer."""
    return METHODS[settings["method"]].layer.param_count(in_features, out_features, settings)


def wrap_module(model: nn.Module, name: str, method: str = "lora", **layer_args) -> AdapterLayer:
    """Replace the linear module `name` by `method`'s adapter layer around it.

    Returns:
        The new wrapper.
    """
    if is_expert_target(model, name):  # a fused MoE expert weight: its own layer (adapters.experts)
        from lorafit.adapters.experts import wrap_expert_parameter

        return wrap_expert_parameter(model, name, method, **layer_args)
    base = model.get_submodule(name)
    if not is_linear(base):
        raise LorafitError(f"{name} is a {type(base).__name__}, not a linear layer; adapters wrap linear layers only")
    spec = METHODS[method]
    args = {**layer_args, **spec.fixed}
    layer = spec.layer(base, **args)
    model.set_submodule(name, layer)
    return layer


def unwrap_lora(model: nn.Module, merge: bool = False) -> nn.Module:
    """Put every original layer back (merging the adapter into it first when `merge`), so the model's
    state-dict keys are the Hugging Face checkpoint's again.

    Args:
        model: a model with adapter layers.
        merge: fold each adapter into its base weight before dropping it (full-precision bases only).

    Returns:
        The same model object, modified in place.
    """
    for name, layer in reversed(lora_layers(model).items()):  # innermost first: expert layers nest
        if merge:
            layer.merge()
        model.set_submodule(name, layer.base_layer)
    return model


def merge_lora(model: nn.Module) -> None:
    """Merge every adapter into its base weight (idempotent)."""
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Undo `merge_lora` (idempotent)."""
    for layer in lora_layers(model).values():
        layer.unmerge()


# ------------------------------------------------------------------------------------- tensors, PEFT names


def lora_state_dict(model: nn.Module, export: bool = False) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's names: ``base_model.model.<module>.lora_A.weight`` (r, in),
    ``...lora_B.weight`` (out, r) and so on for each method. Detached, not copied.

    Args:
        export: the form saved adapters hold (`AdapterLayer.export_state`), not the training form.
    """
    return {f"{PEFT_PREFIX}{name}.{key}": t for name, layer in lora_layers(model).items()
            for key, t in (layer.export_state() if export else layer.adapter_state()).items()}


def adapter_tensors(trainable: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`lora_state_dict`'s result from a {parameter name: tensor} dict of the model's trainable parameters, as
    gathered from a sharded model whose layers hold only shards."""
    out = {}
    for name, t in trainable.items():
        bare = bare_name(name)
        try:
            split_adapter_key(bare)
        except LorafitError:
            continue
        out[PEFT_PREFIX + bare] = t
    return out


def split_adapter_key(key: str) -> tuple[str, str]:
    """``base_model.model.m.q_proj.lora_A.weight`` -> ("m.q_proj", "lora_A.weight"): the module and the tensor's
    name relative to it, as the layer's `adapter_state` names it. PEFT's ``.default`` adapter segment is dropped.

    Raises:
        LorafitError: the key names no tensor any registered method saves.
    """
    body = key.removeprefix(PEFT_PREFIX)
    for kind in tensor_kinds():
        for tail, rel in ((f".{kind}.weight", f"{kind}.weight"), (f".{kind}.default.weight", f"{kind}.weight"),
                          (f".{kind}.default", kind), (f".{kind}", kind)):
            if body.endswith(tail):
                return body[: -len(tail)], rel
    raise LorafitError(f"adapter tensor {key!r} is not a tensor of any adapter method lorafit knows "
                       f"({', '.join(sorted(METHODS))})")


def group_by_module(state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{module name: {relative tensor name: tensor}} from PEFT-named tensors."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        name, rel = split_adapter_key(key)
        grouped.setdefault(name, {})[rel] = tensor
    return grouped


def load_lora_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors (PEFT names) into the model's adapter layers, checking that every layer is covered.

    Raises:
        LorafitError: a tensor names no adapter layer, has the wrong shape, or a layer misses a tensor.
    """
    layers = lora_layers(model)
    grouped = group_by_module(state_dict)
    for name in grouped:
        if name not in layers:
            raise LorafitError(f"adapter tensor {PEFT_PREFIX}{name}...: the model has no adapter layer {name!r}")
    for name, layer in layers.items():
        layer.load_adapter_state(grouped.get(name, {}), where=f"{name}.")


# ------------------------------------------------------------------------------------ counts and groups


@dataclass
class ParamReport:
    """What attaching did: wrapped module names and parameter counts (4-bit weights counted logically)."""

    wrapped: list[str]
    trainable: int
    total: int

    def __str__(self) -> str:
        share = 100 * self.trainable / max(self.total, 1)
        return (f"adapter on {len(self.wrapped)} layers ({module_kinds(self.wrapped)}): "
                f"{self.trainable:,} trainable of {self.total:,} parameters ({share:.3f}%)")


def param_report(model: nn.Module) -> ParamReport:
    """Count trainable and total parameters and list the wrapped layers."""
    params = list(model.parameters())
    trainable = sum(logical_numel(p) for p in params if p.requires_grad)
    total = sum(logical_numel(p) for p in params)
    from lorafit.adapters.experts import ExpertLora, expert_target_name

    wrapped = [expert_target_name(n, layer) if isinstance(layer, ExpertLora) else n  # experts by weight, not module
               for n, layer in lora_layers(model).items()]
    return ParamReport(wrapped, trainable, total)


# Which optimizer group a trainable tensor joins, by the end of its bare name. "lora_B" gets LoRA+'s ratio;
# "no_decay" tensors (magnitudes, scaling vectors) never get weight decay.
GROUP_OF_SUFFIX = {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B", "lora_magnitude_vector": "no_decay",
                   "vera_lambda_b": "no_decay", "vera_lambda_d": "no_decay"}


def param_groups(model: nn.Module, lr: float, weight_decay: float = 0.0,
                 lora_plus_ratio: float | None = None) -> list[dict]:
    """Optimizer parameter groups, with LoRA+ when `lora_plus_ratio` is set.

    Args:
        model: a model with adapter layers.
        lr: base learning rate (A, DoRA magnitude, any other trainable parameter).
        weight_decay: applied to A, B and other trainable weights; never to "no_decay" tensors (DoRA's magnitude).
        lora_plus_ratio: B's learning rate is lr × ratio (LoRA+, Hayou et al. 2024); None means 1.

    Returns:
        Non-empty groups, each with "params", "lr", "weight_decay" and a "name" for logging.
    """
    buckets: dict[str, list[nn.Parameter]] = {"lora_A": [], "lora_B": [], "no_decay": [], "other": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        name = bare_name(name)  # FSDP puts a segment between lora_B and .weight
        group = next((g for suffix, g in GROUP_OF_SUFFIX.items() if name.endswith(suffix)), "other")
        buckets[group].append(p)
    settings = {
        "lora_A": (lr, weight_decay),
        "lora_B": (lr * (lora_plus_ratio or 1.0), weight_decay),
        "no_decay": (lr, 0.0),
        "other": (lr, weight_decay),
    }
    return [{"params": ps, "lr": settings[k][0], "weight_decay": settings[k][1], "name": k}
            for k, ps in buckets.items() if ps]
