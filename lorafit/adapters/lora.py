"""LoRA, rsLoRA and DoRA: a trainable low-rank path beside a frozen linear layer.

The math. A frozen linear layer computes ``y = x W^T + b`` with W of shape (out, in). LoRA adds

    y = x W^T + b + s · (dropout(x) A^T) B^T          A: (r, in), B: (out, r)
    s = alpha / r            (alpha / sqrt(r) with rsLoRA, which keeps updates stable as r grows)

A starts Kaiming-uniform (a = sqrt(5), as nn.Linear does) and B at zero, so a fresh adapter changes nothing.
The whole update is one matrix, ``delta_weight = s · B @ A`` (out, in): merging adds it to W.

DoRA (Liu et al. 2024) splits the merged weight into a magnitude and a direction:

    W' = m · (W + s·BA) / ||W + s·BA||_row        m: (out,), initialised to ||W||_row

where ``||·||_row`` is the L2 norm over the input dim of each output row. As in the paper (section 4.3) and
PEFT, the norm is treated as a constant (detached) during training. Unmerged, the forward is rewritten around
the base output so W' never has to be built:

    y = base(x) + (m/n - 1) · (x W^T) + (m/n) · s · (dropout(x) A^T) B^T        n = ||W + s·BA||_row

Tensors are named as PEFT names them (``lora_A.weight``, ``lora_B.weight``, ``lora_magnitude_vector``) so a
wrapped model's adapter state dict maps 1:1 onto PEFT's files. How A and B start is `adapters.init`'s business.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.adapters.base import AdapterLayer
from lorafit.errors import LorafitError

# ----------------------------------------------------------------------------------------- pure formulas


def lora_scale(r: int, alpha: float, rslora: bool = False) -> float:
    """The adapter's output scale: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def delta_weight(lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """The full-rank update s · B @ A, shape (out, in). The one place this formula lives.

    Args:
        lora_a: A, shape (r, in).
        lora_b: B, shape (out, r).
        scale: alpha / r (or alpha / sqrt(r)).

    Returns:
        The update in the adapter's dtype.
    """
    return (lora_b @ lora_a) * scale


def row_norm(weight: torch.Tensor) -> torch.Tensor:
    """L2 norm over the input dim of each output row of a (out, in) weight: shape (out,)."""
    return torch.linalg.norm(weight, dim=1)


def dora_factor(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA's per-row scale m / ||W + ΔW||_row, in fp32: the merged weight is factor[:, None] · (W + ΔW).

    Args:
        weight: the base weight W, (out, in).
        delta: ``delta_weight(...)``, (out, in).
        magnitude: m, (out,).

    Returns:
        The factor, (out,). `merge` keeps it so `unmerge` can divide it out again.
    """
    return magnitude.float() / row_norm(weight.float() + delta.float())


def lora_param_count(in_features: int, out_features: int, r: int, dora: bool = False) -> int:
    """Trainable parameters one wrapped (out, in) layer adds: A and B, plus DoRA's magnitude vector."""
    return r * (in_features + out_features) + (out_features if dora else 0)


# ---------------------------------------------------------------------------------------------- the layer


class LoraLinear(AdapterLayer):
    """A frozen linear layer (nn.Linear, Linear4bit or Linear8bitLt) plus a trainable low-rank path (and DoRA's
    magnitude vector when `dora`). The original module is kept, unchanged, as ``base_layer``."""

    method = "lora"
    tensor_kinds = ("lora_A", "lora_B", "lora_magnitude_vector")

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 dora: bool = False, dtype: torch.dtype = torch.float32, init: str = "default"):
        """Wrap `base_layer`.

        Args:
            base_layer: the layer to adapt; its parameters are frozen, not copied.
            r: rank of the update.
            alpha: scale numerator (scale = alpha / r, or alpha / sqrt(r) with rslora).
            dropout: dropout probability on the adapter's input only.
            rslora: use alpha / sqrt(r).
            dora: add DoRA's magnitude vector.
            dtype: dtype of the adapter's parameters (fp32 by default: they are small and train more stably).
            init: how A and B start (`lorafit.adapters.init`); every choice but the SVD-based ones starts at ΔW = 0.
        """
        super().__init__(base_layer)
        if r < 1:
            raise LorafitError(f"LoRA rank r must be >= 1 (got {r})")
        self.r, self.alpha, self.rslora, self.dora = r, alpha, rslora, dora
        self.scale = lora_scale(r, alpha, rslora)
        device = self.device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        # Identity when p == 0: nn.Dropout(0) would still copy the input every step.
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._dora_factor: torch.Tensor | None = None  # m / n used by merge, needed again by unmerge
        self.init = init
        self.reset_parameters()
        if dora:
            self.lora_magnitude_vector = nn.Parameter(torch.empty(self.out_features, device=device, dtype=dtype))
            self.reset_magnitude()
        self.finish_init()

    @classmethod
    def layer_args(cls, settings: dict) -> dict:
        from lorafit.adapters.svd_init import init_kind

        return {**super().layer_args(settings), "init": init_kind(settings)}

    @classmethod
    def peft_config(cls, layers: dict, settings: dict) -> dict:
        """PiSSA / OLoRA layers save as a rank-2r LoRA on the original base (`svd_init.converted_config`)."""
        from lorafit.adapters.svd_init import converted_config

        return converted_config(layers, settings)

    @classmethod
    def param_count(cls, in_features: int, out_features: int, settings: dict) -> int:
        return lora_param_count(in_features, out_features, settings["r"], settings["method"] == "dora")

    def reset_parameters(self) -> None:
        """A and B as `init` says (default: A Kaiming-uniform as nn.Linear, B zero, so the delta starts at 0)."""
        from lorafit.adapters.init import init_lora

        init_lora(self, self.init)

    @torch.no_grad()
    def reset_magnitude(self) -> None:
        """DoRA: m = ||W + s·BA||_row, so the wrapped layer starts out computing exactly what the base did."""
        if self.lora_magnitude_vector.device.type == "meta":
            return
        self.lora_magnitude_vector.copy_(self._dora_norm(self._base_weight()))

    def _base_weight(self) -> torch.Tensor:
        """W in the adapter's dtype (dequantized for 4/8-bit bases), detached."""
        return self.base_weight(self.lora_A.weight.dtype)

    def _dora_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """n = ||W + s·BA||_row, (out,), detached: DoRA treats the norm as a constant for autograd."""
        return row_norm(weight + self.delta().detach()).detach()

    def delta(self) -> torch.Tensor:
        """This layer's s · B @ A, (out, in)."""
        return delta_weight(self.lora_A.weight, self.lora_B.weight, self.scale)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        state = {"lora_A.weight": self.lora_A.weight.detach(), "lora_B.weight": self.lora_B.weight.detach()}
        if self.dora:
            state["lora_magnitude_vector"] = self.lora_magnitude_vector.detach()
        return state

    def export_state(self) -> dict[str, torch.Tensor]:
        """`adapter_state`, converted to the equivalent LoRA on the original base when the base holds a PiSSA /
        OLoRA residual (`svd_init.on_original_base`)."""
        from lorafit.adapters.svd_init import on_original_base

        return on_original_base(self, self.adapter_state())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        adapter_dtype = self.lora_A.weight.dtype
        x_in = self.lora_dropout(x.to(adapter_dtype))
        if self.dora:
            return self._dora_forward(x, x_in, result)
        update = self.lora_B(self.lora_A(x_in))  # (..., in) -> (..., r) -> (..., out): two thin matmuls
        return self.add_update(result, update, self.scale)

    def _dora_forward(self, x: torch.Tensor, x_in: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """y = base(x) + (m/n - 1)·(x W^T) + (m/n)·s·B(A(dropout(x))), n = ||W + s·BA||_row detached."""
        weight = self._base_weight()  # (out, in)
        factor = (self.lora_magnitude_vector / self._dora_norm(weight)).view(1, -1)  # (1, out), broadcasts
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            bias = self.base_layer.bias
            base_out = result.to(factor.dtype) if bias is None else (result - bias).to(factor.dtype)
        else:
            base_out = F.linear(x_in, weight)  # dropout changed the input, so x W^T must be recomputed on it
        lora_out = self.lora_B(self.lora_A(x_in)) * self.scale
        extra = (factor - 1) * base_out + factor * lora_out
        return result + extra.to(result.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight (W += s·BA, or DoRA's W'). A second call does nothing."""
        if self.merged or not self.dora:
            return super().merge()
        weight = self._full_precision_weight("merge")
        delta = self.delta().float()
        self._dora_factor = dora_factor(weight, delta, self.lora_magnitude_vector)
        weight.copy_((self._dora_factor[:, None] * (weight.float() + delta)).to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge` (up to rounding in the base dtype). Does nothing when not merged."""
        if not self.merged or not self.dora:
            return super().unmerge()
        weight = self._full_precision_weight("unmerge")
        restored = weight.float() / self._dora_factor[:, None] - self.delta().float()
        weight.copy_(restored.to(weight.dtype))
        self._dora_factor = None
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, scale={self.scale:.4g}, dora={self.dora}, merged={self.merged}"
