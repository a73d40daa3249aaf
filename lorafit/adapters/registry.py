"""`adapter.method` -> the layer class that implements it, and the keyword arguments that select it.

A new method is one module defining an `AdapterLayer` subclass plus one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lorafit.adapters.adalora import AdaLoraLinear
from lorafit.adapters.base import AdapterLayer
from lorafit.adapters.lora import LoraLinear
from lorafit.adapters.lora_fa import LoraFALinear
from lorafit.adapters.vera import VeraLinear


@dataclass(frozen=True)
class Method:
    """One `adapter.method`: its layer class and the fixed arguments that make it this method."""

    layer: type[AdapterLayer]
    fixed: dict[str, Any] = field(default_factory=dict)


METHODS: dict[str, Method] = {
    "lora": Method(LoraLinear, {"dora": False}),
    "dora": Method(LoraLinear, {"dora": True}),
    "adalora": Method(AdaLoraLinear),
    "lora_fa": Method(LoraFALinear, {"dora": False}),
    "vera": Method(VeraLinear),
}


def layer_classes() -> tuple[type[AdapterLayer], ...]:
    """Every registered layer class (for isinstance checks over a model)."""
    return tuple(dict.fromkeys(m.layer for m in METHODS.values()))


def tensor_kinds() -> tuple[str, ...]:
    """Every PEFT tensor kind a registered method saves (``lora_A``, ``lora_B`` ...), longest first."""
    kinds = {k for cls in layer_classes() for k in cls.tensor_kinds}
    return tuple(sorted(kinds, key=len, reverse=True))


def peft_types() -> tuple[str, ...]:
    """The ``peft_type`` values of adapters lorafit can load (LORA first)."""
    return tuple(dict.fromkeys(["LORA", *(cls.peft_type for cls in layer_classes())]))


def layer_for_peft_type(peft_type: str) -> type[AdapterLayer]:
    """The layer class that loads a saved adapter of this ``peft_type`` (not LORA: `checkpoint.load_adapter`)."""
    return next(cls for cls in layer_classes() if cls.peft_type == peft_type)
