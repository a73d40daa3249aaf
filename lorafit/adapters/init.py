"""How an adapter's matrices start: `adapter.init`.

    default    A Kaiming-uniform (a = sqrt(5), as nn.Linear initialises its weight), B = 0: ΔW starts at 0.
    gaussian   A ~ N(0, 1/r), B = 0 (PEFT's ``init_lora_weights="gaussian"``).
    pissa      A, B from the weight's top-r SVD; the base keeps the rest (`svd_init`). ``pissa_niter_N``:
               the same from a randomised SVD with N power iterations (`adapter.pissa_niter`).
    olora      A, B from the weight's QR decomposition; the base keeps W − s·B A.
    loftq      quantized bases: s·B A = the best rank-r fit of the quantization error W − Q(W).

pissa and olora rewrite the base weight, so that base + ΔW still equals the original weight; loftq leaves it and
brings base + ΔW closer to the full-precision weight than the quantized base alone. See `svd_init`.
"""

from __future__ import annotations

import math
from functools import partial

from torch import nn

from lorafit.adapters.svd_init import init_from_weight


def init_default(layer) -> None:
    """A Kaiming-uniform (a = sqrt(5), as nn.Linear does), B zero."""
    nn.init.kaiming_uniform_(layer.lora_A.weight, a=math.sqrt(5))
    nn.init.zeros_(layer.lora_B.weight)


def init_gaussian(layer) -> None:
    """A ~ N(0, 1/r) (std 1/r, as PEFT), B zero."""
    nn.init.normal_(layer.lora_A.weight, std=1 / layer.r)
    nn.init.zeros_(layer.lora_B.weight)


INITS = {"default": init_default, "gaussian": init_gaussian, "pissa": partial(init_from_weight, kind="pissa"),
         "olora": partial(init_from_weight, kind="olora"), "loftq": partial(init_from_weight, kind="loftq")}


def init_lora(layer, kind: str) -> None:
    """Initialise a LoRA layer's A and B (and, for pissa / olora, its base weight) as `kind` says
    (a key of `INITS`, or ``pissa_niter_N``)."""
    if kind.startswith("pissa_niter_") and kind.removeprefix("pissa_niter_").isdigit():
        init_from_weight(layer, kind)
        return
    if kind not in INITS:
        from lorafit.errors import LorafitError

        raise LorafitError(f"adapter.init: {kind!r} is not one of {', '.join(INITS)}")
    INITS[kind](layer)
