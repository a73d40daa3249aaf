"""LoRA-FA (Zhang et al. 2023): LoRA with A frozen at its random initialisation; only B trains.

The math is LoRA's, ``y = x W^T + b + s · (dropout(x) A^T) B^T``, so the saved adapter is a plain PEFT LoRA one
(``lora_A.weight``, ``lora_B.weight``). What changes is the backward pass. With A frozen,

    dL/dB = s · g^T h          h = dropout(x) A^T, (..., r)       g = dL/dy, (..., out)
    dL/dx = s · (g B) A

so only the r-wide projection h has to be kept for backward, never the layer's (..., in) input, which plain
LoRA keeps for A's gradient. `_FrozenAProduct` is that backward written by hand; autograd would keep x because it
cannot tell that A will never need a gradient. Dropout, when on, is done inside too, keeping a boolean mask (one
byte per input element; nn.Dropout on the CPU keeps a float copy). The base layer's own saved tensors are the
base's business: a frozen nn.Linear keeps none.

A is an ``nn.Parameter`` with ``requires_grad=False``: not in the optimizer, not counted as trainable, but in the
saved adapter, and in training checkpoints as the method's state (`FrozenA`, ``method_state.pt``), so a resumed run
continues with the A it started with, whatever the random state at resume. The LoRA+ ratio (B's lr relative to
A's) means nothing without a trained A and is refused by the config.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.adapters.base import AdapterLayer, TrainingHooks
from lorafit.adapters.lora import LoraLinear
from lorafit.errors import RunDirError


class _FrozenAProduct(torch.autograd.Function):
    """s · (dropout(x) A^T) B^T for a frozen A, saving h = dropout(x) A^T (..., r) for backward instead of x."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
                p: float) -> torch.Tensor:
        mask = None
        if p > 0:  # inverted dropout with a boolean mask: 1 byte per element kept, not a float copy of x
            mask = torch.empty_like(x, dtype=torch.bool).bernoulli_(1 - p)
            x = x * mask / (1 - p)
        h = F.linear(x, lora_a)  # (..., in) -> (..., r)
        ctx.scale, ctx.p, ctx.x_dtype = scale, p, x.dtype
        keep_mask = mask if ctx.needs_input_grad[0] else None  # only x's gradient needs it
        ctx.save_for_backward(h, lora_a, lora_b, keep_mask)  # A and B are parameters: saving them copies nothing
        return F.linear(h, lora_b) * scale  # (..., r) -> (..., out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, lora_a, lora_b, mask = ctx.saved_tensors
        if ctx.needs_input_grad[1]:
            raise RuntimeError("LoRA-FA's A is frozen; its gradient needs the input, which this layer does not keep")
        dtype = h.dtype  # what the forward computed in (autocast may have made it lower than the parameters')
        grad = grad.to(dtype) * ctx.scale  # (..., out)
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ lora_b.to(dtype)) @ lora_a.to(dtype)  # (..., out) -> (..., r) -> (..., in)
            if mask is not None:
                grad_x = grad_x * mask / (1 - ctx.p)
            grad_x = grad_x.to(ctx.x_dtype)
        if ctx.needs_input_grad[2]:
            # summed over every leading (batch, position) dim: (out, N) @ (N, r) -> (out, r)
            grad_b = (grad.reshape(-1, grad.shape[-1]).T @ h.reshape(-1, h.shape[-1])).to(lora_b.dtype)
        return grad_x, None, grad_b, None, None


def frozen_a_update(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
                    dropout: float = 0.0) -> torch.Tensor:
    """s · (dropout(x) A^T) B^T, (..., out), with A frozen: backward keeps (..., r), not x (module docstring).

    Args:
        x: the adapter's input, (..., in).
        lora_a: A, (r, in); must not require grad.
        lora_b: B, (out, r).
        scale: alpha / r (or alpha / sqrt(r)).
        dropout: the probability of dropping an input element (0 in eval mode).
    """
    return _FrozenAProduct.apply(x, lora_a, lora_b, scale, dropout)


class FrozenA(TrainingHooks):
    """LoRA-FA's part of a training checkpoint: every layer's frozen A (the optimizer state covers only B)."""

    def __init__(self, layers: dict[str, AdapterLayer]):
        self.layers = layers

    def state_dict(self) -> dict:
        return {"lora_A": {name: layer.lora_A.weight.detach().cpu().clone() for name, layer in self.layers.items()}}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        saved = state.get("lora_A", {})
        if set(saved) != set(self.layers):
            raise RunDirError(f"the checkpoint's LoRA-FA state covers {len(saved)} layers and the model has "
                              f"{len(self.layers)}: it was saved by a run with other adapter.targets")
        for name, layer in self.layers.items():
            layer.lora_A.weight.copy_(saved[name])


class LoraFALinear(LoraLinear):
    """LoRA with A frozen at its initialisation (`adapter.method: lora_fa`); saved as a plain LoRA adapter."""

    method = "lora_fa"

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 dora: bool = False, dtype: torch.dtype = torch.float32, init: str = "default"):
        """As `LoraLinear` (without DoRA: its magnitude is a third trained tensor, another method), then A frozen."""
        if dora:
            raise ValueError("LoRA-FA has no DoRA variant")  # the registry never asks for one
        super().__init__(base_layer, r, alpha, dropout=dropout, rslora=rslora, dora=False, dtype=dtype, init=init)
        self.lora_A.weight.requires_grad_(False)

    @classmethod
    def param_count(cls, in_features: int, out_features: int, settings: dict) -> int:
        """B only: A is frozen."""
        return settings["r"] * out_features

    @classmethod
    def training_hooks(cls, layers: dict[str, AdapterLayer], settings: dict, total_steps: int) -> TrainingHooks:
        return FrozenA(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        p = self.lora_dropout.p if self.training and isinstance(self.lora_dropout, nn.Dropout) else 0.0
        update = frozen_a_update(x.to(self.lora_A.weight.dtype), self.lora_A.weight, self.lora_B.weight, self.scale, p)
        return self.add_update(result, update)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, scale={self.scale:.4g}, A frozen, merged={self.merged}"
