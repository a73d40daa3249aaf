"""How an adapter's matrices start: `adapter.init`.

    default    A Kaiming-uniform (a = sqrt(5), as nn.Linear initialises its weight), B = 0: ΔW starts at 0.
    gaussian   A ~ N(0, 1/r), B = 0 (PEFT's ``init_lora_weights="gaussian"``).

The SVD-based choices (pissa, olora, loftq) also rewrite the base weight, so that base + ΔW still equals the
original weight (or, for loftq, comes closer to it than the quantized base alone).
"""

from __future__ import annotations

import math

from torch import nn


def init_default(layer) -> None:
    """A Kaiming-uniform (a = sqrt(5), as nn.Linear does), B zero."""
    nn.init.kaiming_uniform_(layer.lora_A.weight, a=math.sqrt(5))
    nn.init.zeros_(layer.lora_B.weight)


def init_gaussian(layer) -> None:
    """A ~ N(0, 1/r) (std 1/r, as PEFT), B zero."""
    nn.init.normal_(layer.lora_A.weight, std=1 / layer.r)
    nn.init.zeros_(layer.lora_B.weight)


INITS = {"default": init_default, "gaussian": init_gaussian}


def init_lora(layer, kind: str) -> None:
    """Initialise a LoRA layer's A and B (and, for SVD-based kinds, its base weight) as `kind` says."""
    if kind not in INITS:
        from lorafit.errors import LorafitError

        raise LorafitError(f"adapter.init: {kind!r} is not one of {', '.join(INITS)}")
    INITS[kind](layer)
