"""Which modules an adapter wraps: `adapter.targets` / `adapter.exclude` matched against module names.

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


def linear_modules(model: nn.Module, wrapper_type: type = ()) -> list[tuple[str, nn.Module]]:
    """(name, module) of every linear layer (bnb's 4/8-bit layers subclass nn.Linear) not inside a module of
    `wrapper_type` (the adapter layers: their base layers are not targets again)."""
    wrapped = [name for name, m in bare_named_modules(model) if wrapper_type and isinstance(m, wrapper_type)]
    out = []
    for name, module in bare_named_modules(model):
        if not isinstance(module, nn.Linear) or any(name.startswith(w + ".") for w in wrapped):
            continue
        out.append((name, module))
    return out


def suffix_matches(name: str, suffix: str) -> bool:
    """PEFT's rule: the exact module name, or a name ending in ``"." + suffix``."""
    return name == suffix or name.endswith("." + suffix)


def module_kinds(names: Iterable[str]) -> str:
    """'q_proj, k_proj, ...': the last name component of each module, deduplicated, in model order."""
    return ", ".join(dict.fromkeys(n.rpartition(".")[2] for n in names)) or "(none)"


def find_targets(model: nn.Module, targets: str | list[str], exclude: Iterable[str] = (),
                 wrapper_type: type = ()) -> list[str]:
    """Names of the linear modules to wrap.

    Args:
        model: the base model.
        targets: "all-linear" (every linear layer except the output head), a list of module-name suffixes
            (exact name or ``name.endswith("." + suffix)``), or "re:<regex>" (fullmatch on the module name).
        exclude: module-name suffixes never wrapped.
        wrapper_type: adapter layer class(es) whose insides are not candidates.

    Returns:
        Module names in model order.

    Raises:
        TargetNotFoundError: nothing matched, or a listed suffix matched no linear module; the message lists
            the kinds of linear modules the model has.
    """
    linear = linear_modules(model, wrapper_type)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if targets == "all-linear":
        chosen = [n for n, m in linear if m is not head]
    elif isinstance(targets, str) and targets.startswith("re:"):
        pattern = re.compile(targets[3:])
        chosen = [n for n, _ in linear if pattern.fullmatch(n)]
    elif isinstance(targets, str):
        raise TargetNotFoundError(f"adapter.targets: {targets!r} is not 'all-linear', 're:<regex>' or a list of "
                                  f"module-name suffixes (for one suffix write [{targets}])")
    else:
        missing = [t for t in targets if not any(suffix_matches(n, t) for n, _ in linear)]
        if missing:
            raise TargetNotFoundError(f"adapter.targets: {', '.join(map(repr, missing))} matched no linear module; "
                                      f"the model's linear modules are: {module_kinds(n for n, _ in linear)}")
        chosen = [n for n, _ in linear if any(suffix_matches(n, t) for t in targets)]
    exclude = list(exclude)
    kept = [n for n in chosen if not any(suffix_matches(n, e) for e in exclude)]
    if not kept:
        why = f" (all {len(chosen)} matches are excluded by adapter.exclude)" if chosen else ""
        raise TargetNotFoundError(f"adapter.targets: {targets!r} matched no linear module{why}; the model's linear "
                                  f"modules are: {module_kinds(n for n, _ in linear)}")
    return kept
