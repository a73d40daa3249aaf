"""Which modules an adapter wraps: `adapter.targets` / `adapter.exclude` matched against module names.

Two kinds of target:
    linear layers   nn.Linear (bitsandbytes' 4/8-bit layers subclass it) and GPT-2's Conv1D, which is a linear
                    layer storing its weight as (in, out); named by module path (``model.layers.0.self_attn.q_proj``).
    expert weights  the fused 3-D parameters transformers 5 keeps MoE experts in (``mlp.experts.gate_up_proj``,
                    (experts, out, in), or (experts, in, out) where the experts module says ``is_transposed``);
                    named by parameter path (``model.layers.0.mlp.experts.gate_up_proj``). A suffix matches the
                    parameter path or its experts module's path, so ``exclude: [experts]`` leaves them all out.

Pure: reads names and module types only, so it works on a model built on the meta device (`lorafit validate`).
Names are compared without the segments wrappers insert (FSDP units, activation checkpointing, torch.compile).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from lorafit.errors import TargetNotFoundError

# Module-path segments that wrappers insert (FSDP units, activation checkpointing, torch.compile): not part of the
# names PEFT, transformers and lorafit's own files use.
_WRAPPER_SEGMENT = re.compile(r"(^|\.)(_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)(?=\.|$)")


def bare_name(name: str) -> str:
    """A module or parameter name without wrapper segments: ``model.layers.0._fsdp_wrapped_module.mlp`` ->
    ``model.layers.0.mlp``."""
    return _WRAPPER_SEGMENT.sub("", name).lstrip(".")


def bare_named_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """named_modules under bare names; a wrapper and the module it wraps share a name, the wrapped one last."""
    return [(bare_name(name), m) for name, m in model.named_modules()]


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2, GPT, ...): a linear layer whose weight is stored transposed, (in, out).
    Checked by name so this module need not import transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def is_linear(module: nn.Module) -> bool:
    """A layer adapters wrap as a linear map: nn.Linear (and bitsandbytes' layers) or Conv1D."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear layer or Conv1D (nx inputs, nf outputs)."""
    if is_conv1d(module):
        return module.nx, module.nf
    return module.in_features, module.out_features


def linear_modules(model: nn.Module, wrapper_type: type = ()) -> list[tuple[str, nn.Module]]:
    """(name, module) of every linear layer (nn.Linear, bnb's 4/8-bit layers, Conv1D) not inside a module of
    `wrapper_type` (the adapter layers: their base layers are not targets again)."""
    wrapped = [name for name, m in bare_named_modules(model) if wrapper_type and isinstance(m, wrapper_type)]
    out = []
    for name, module in bare_named_modules(model):
        if not is_linear(module) or any(name.startswith(w + ".") for w in wrapped):
            continue
        out.append((name, module))
    return out


def is_experts_module(module: nn.Module) -> bool:
    """transformers' fused experts (Mixtral, Qwen3-MoE, OLMoE, gpt-oss ...): `use_experts_implementation` marks them
    with ``is_transposed``, which fixes the orientation of their 3-D weights; modules without it are not guessed."""
    return hasattr(module, "is_transposed") and isinstance(getattr(module, "num_experts", None), int)


def expert_shape(module: nn.Module, param_name: str) -> tuple[int, int, int]:
    """(experts, in_features, out_features) of a fused expert weight, from its layout (see the module docstring)."""
    experts, first, second = getattr(module, param_name).shape
    return (experts, first, second) if module.is_transposed else (experts, second, first)


def expert_parameters(model: nn.Module, wrapper_type: type = ()) -> list[tuple[str, nn.Module, str]]:
    """(parameter path, experts module, parameter name) of every fused 3-D expert weight, in model order; biases and
    other parameters are not linear maps. Experts inside a `wrapper_type` module are skipped, as in `linear_modules`."""
    wrapped = [name for name, m in bare_named_modules(model) if wrapper_type and isinstance(m, wrapper_type)]
    out = []
    for name, module in bare_named_modules(model):
        if not is_experts_module(module) or any(name == w or name.startswith(w + ".") for w in wrapped):
            continue
        for pname, p in module.named_parameters(recurse=False):
            if p.dim() == 3 and p.shape[0] == module.num_experts and p.is_floating_point():
                out.append((f"{name}.{pname}", module, pname))
    return out


def suffix_matches(name: str, suffix: str) -> bool:
    """PEFT's rule: the exact module name, or a name ending in ``"." + suffix``."""
    return name == suffix or name.endswith("." + suffix)


def module_kinds(names: Iterable[str]) -> str:
    """'q_proj, k_proj, ...': the last name component of each module, deduplicated, in model order."""
    return ", ".join(dict.fromkeys(n.rpartition(".")[2] for n in names)) or "(none)"


def find_targets(model: nn.Module, targets: str | list[str], exclude: Iterable[str] = (),
                 wrapper_type: type = (), experts: bool = True) -> list[str]:
    """Names of the linear modules (and fused expert weights) to wrap.

    Args:
        model: the base model.
        targets: "all-linear" (every linear layer except the output head, and every fused expert weight), a list
            of suffixes (exact name or ``name.endswith("." + suffix)``; for an expert weight, of its parameter path
            or its experts module's path), or "re:<regex>" (fullmatch on the module or parameter path).
        exclude: suffixes never wrapped (matched as `targets` are).
        wrapper_type: adapter layer class(es) whose insides are not candidates.
        experts: whether expert weights are candidates (False for methods that cannot adapt them).

    Returns:
        Module names and expert parameter paths, in model order (`is_expert_target` tells them apart).

    Raises:
        TargetNotFoundError: nothing matched, or a listed suffix matched nothing; the message lists the kinds of
            linear modules (and expert weights) the model has.
    """
    linear = linear_modules(model, wrapper_type)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    # (name, names a suffix may match): a linear layer by its own name, an expert weight by its path or its module's
    candidates = [(n, (n,)) for n, m in linear if targets != "all-linear" or m is not head]
    expert_paths = [path for path, _, _ in expert_parameters(model, wrapper_type)] if experts else []
    candidates += [(path, (path, path.rpartition(".")[0])) for path in expert_paths]
    order = {n: i for i, n in enumerate(_model_order(model))}
    candidates.sort(key=lambda c: order.get(c[0], -1))
    kinds = module_kinds([n for n, _ in linear] + expert_paths)
    if targets == "all-linear":
        chosen = [n for n, _ in candidates]
    elif isinstance(targets, str) and targets.startswith("re:"):
        pattern = re.compile(targets[3:])
        chosen = [n for n, _ in candidates if pattern.fullmatch(n)]
    elif isinstance(targets, str):
        raise TargetNotFoundError(f"adapter.targets: {targets!r} is not 'all-linear', 're:<regex>' or a list of "
                                  f"module-name suffixes (for one suffix write [{targets}])")
    else:
        missing = [t for t in targets if not any(suffix_matches(k, t) for _, keys in candidates for k in keys)]
        if missing:
            raise TargetNotFoundError(f"adapter.targets: {', '.join(map(repr, missing))} matched no linear module; "
                                      f"the model's linear modules are: {kinds}")
        chosen = [n for n, keys in candidates if any(suffix_matches(k, t) for k in keys for t in targets)]
    exclude = list(exclude)
    keys_of = dict(candidates)
    kept = [n for n in chosen if not any(suffix_matches(k, e) for k in keys_of[n] for e in exclude)]
    if not kept:
        why = f" (all {len(chosen)} matches are excluded by adapter.exclude)" if chosen else ""
        raise TargetNotFoundError(f"adapter.targets: {targets!r} matched no linear module{why}; the model's linear "
                                  f"modules are: {kinds}")
    return kept


def _model_order(model: nn.Module) -> list[str]:
    """Module names then, right after each module, its parameters' paths: the order targets are wrapped in."""
    out = []
    for name, module in bare_named_modules(model):
        out.append(name)
        out.extend(f"{name}.{p}" for p, _ in module.named_parameters(recurse=False))
    return out


def is_expert_target(model: nn.Module, name: str) -> bool:
    """True when `name` (from `find_targets`) is a fused expert weight rather than a linear module."""
    owner, _, pname = name.rpartition(".")
    try:
        module = model.get_submodule(owner)
    except AttributeError:
        return False
    while not is_experts_module(module) and isinstance(getattr(module, "base_layer", None), nn.Module):
        module = module.base_layer  # under the adapter layers already on its other weights
    return is_experts_module(module) and isinstance(getattr(module, pname, None), nn.Parameter)
