"""PiSSA, OLoRA and LoftQ: LoRA factors that start from the base weight's own structure.

The math, for a layer W (out, in), rank r and scale s (alpha / r, or alpha / sqrt(r) with rsLoRA):

    PiSSA   W = U S Vᵀ (top r: U_r, S_r, V_r)      A0 = sqrt(S_r / s) V_rᵀ   B0 = U_r sqrt(S_r / s)
            so s·B0 A0 = U_r S_r V_rᵀ, the principal part; the base becomes the residual W − s·B0 A0.
            With `adapter.pissa_niter: N` the top r come from a randomised SVD (N subspace iterations; PEFT's
            ``pissa_niter_N``), fast on large layers, exact enough when the spectrum decays.
    OLoRA   W = Q R                                 A0 = R[:r]               B0 = Q[:, :r]   (as PEFT)
            the base becomes W − s·B0 A0.
    LoftQ   (quantized bases) Q(W) is what the ordinary 4/8-bit load of the checkpoint holds; A0, B0 are the best
            rank-r fit of the quantization error, s·B0 A0 = SVD_r(W − Q(W)), split as in PiSSA. The base is not
            touched, so the adapter is a plain LoRA on the ordinary quantized load, saved as it is.

Base + adapter equals W at the start (PiSSA, OLoRA), or is closer to W than Q(W) is (LoftQ). Training then moves
A, B away from A0, B0. Because the base of a PiSSA / OLoRA run is W − s·B0 A0, its adapter is saved converted to
the equivalent LoRA on the *original* base (what PEFT's ``path_initial_model_for_weight_conversion`` does):

    ΔW = s·(B A − B0 A0) = s·[B | −B0] @ [A ; A0]       rank 2r, alpha doubled (× sqrt(2) with rsLoRA)

so s stays the same. A0 and B0 are kept on the layer (non-persistent buffers) for this; they are a deterministic
function of W, so a resumed run recomputes exactly the same ones. DoRA's magnitude saves unchanged: W + ΔW is the
same matrix as the residual + s·B A it was trained on.

On a 4/8-bit base the full-precision W is needed (the quantized layer no longer has it): the caller loads it and
hands it over with `keep_original_weights` before attaching. PiSSA / OLoRA then quantize the residual, computed from
W, in place of the layer's weight, exactly as the ordinary load quantizes a weight (same dtype, block size, type).
Without it they fall back to the dequantized weight (as PEFT does); LoftQ refuses. Such a run trained on
Q(W − s·B0 A0) + s·B A, which the converted adapter on the ordinary Q(W) only approximates (by about the
quantization error); `lorafit merge` rebuilds the trained base exactly from W and the saved A0, B0
(`initial_parts`, `residual_roundtrip`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lorafit.adapters.base import _bnb, is_quantized
from lorafit.errors import LorafitError

SVD_INITS = ("pissa", "olora", "loftq")  # inits computed from the weight
RESIDUAL_INITS = ("pissa", "olora")  # inits whose base becomes W − s·B0 A0 (saved converted)
ORIGINAL_WEIGHT = "lorafit_original_weight"  # attribute on a quantized base layer: its full-precision weight
RANDOMIZED_SVD_SEED = 0  # fixed: every process, and every resume, draws the same test matrix
OVERSAMPLE = 8  # extra columns of the randomised range finder (Halko et al. 2011)


# ------------------------------------------------------------------------------------------------ pure math


def randomized_svd(weight: torch.Tensor, r: int, niter: int, seed: int = RANDOMIZED_SVD_SEED):
    """Top-r singular triplets of `weight` (out, in) by a randomised range finder with `niter` power iterations.

    Returns:
        (U (out, r), S (r,), Vh (r, in)), like ``torch.linalg.svd(..., full_matrices=False)`` truncated to r.
    """
    k = min(r + OVERSAMPLE, *weight.shape)
    gen = torch.Generator(device=weight.device).manual_seed(seed)
    omega = torch.randn(weight.shape[1], k, generator=gen, device=weight.device, dtype=weight.dtype)  # (in, k)
    basis = torch.linalg.qr(weight @ omega).Q  # (out, k): an orthonormal basis of W's range, sampled
    for _ in range(niter):  # power iterations sharpen it towards the top singular directions
        basis = torch.linalg.qr(weight @ torch.linalg.qr(weight.T @ basis).Q).Q
    small_u, s, vh = torch.linalg.svd(basis.T @ weight, full_matrices=False)  # (k, in): small, exact SVD
    return (basis @ small_u)[:, :r], s[:r], vh[:r]


def _check_rank(weight: torch.Tensor, r: int, kind: str) -> None:
    if r > min(weight.shape):
        raise LorafitError(f"adapter.r: {r} is larger than the smaller dimension ({min(weight.shape)}) of a "
                           f"{tuple(weight.shape)} layer; init {kind} takes r directions of the weight, so r must be "
                           f"at most {min(weight.shape)} (lower adapter.r, or exclude that layer)")


def principal_factors(weight: torch.Tensor, r: int, scale: float, niter: int | None = None,
                      kind: str = "pissa") -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA's (A0, B0): s·B0 @ A0 = the top-r part of `weight`'s SVD (exact, or randomised with `niter`).

    Args:
        weight: (out, in), float32.
        r: rank; at most min(out, in).
        scale: the adapter's s.
        niter: None: exact SVD; N: randomised SVD with N power iterations.

    Returns:
        A0 (r, in), B0 (out, r).
    """
    _check_rank(weight, r, kind)
    if niter is None:
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:
        u, s, vh = randomized_svd(weight, r, niter)
    root = torch.sqrt(s / scale)  # (r,): half of each singular value on each factor, the scale divided out
    return root[:, None] * vh, u * root[None, :]


def qr_factors(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """OLoRA's (A0, B0) = (R[:r], Q[:, :r]) of ``W = Q R``, as PEFT's ``olora_init``."""
    _check_rank(weight, r, "olora")
    q, rr = torch.linalg.qr(weight)  # q (out, k), rr (k, in), k = min(out, in)
    return rr[:r].contiguous(), q[:, :r].contiguous()


def loftq_factors(weight: torch.Tensor, quantized: torch.Tensor, r: int, scale: float):
    """LoftQ's (A0, B0) for a fixed quantized base: s·B0 @ A0 = the best rank-r fit of ``W − Q(W)``.

    Args:
        weight: the full-precision W (out, in), float32.
        quantized: Q(W) dequantized, what the base layer computes with, float32.

    Returns:
        A0 (r, in), B0 (out, r).
    """
    return principal_factors(weight - quantized, r, scale, kind="loftq")


# ------------------------------------------------------------------------------------------------ the layer


def keep_original_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Hand each quantized layer named in `weights` its full-precision weight, for the SVD inits to read once.

    Args:
        model: the quantized base model, before the adapter is attached.
        weights: {module name: (out, in) weight in the dtype the quantized load quantized from (a Conv1D's
            transposed, as bitsandbytes quantizes it)}.
    """
    for name, weight in weights.items():
        setattr(model.get_submodule(name), ORIGINAL_WEIGHT, weight)


def init_kind(settings: dict) -> str:
    """The layer's ``init`` argument from the adapter settings: PEFT's ``pissa_niter_N`` for a randomised PiSSA."""
    kind = settings.get("init", "default")
    niter = settings.get("pissa_niter")
    return f"pissa_niter_{niter}" if kind == "pissa" and niter is not None else kind


def _original_weight(layer, kind: str) -> torch.Tensor:
    """W in float32 on the layer's device: the kept full-precision weight of a quantized base, else the base's."""
    base = layer.base_layer
    kept = getattr(base, ORIGINAL_WEIGHT, None)
    if kept is not None:
        return kept.to(layer.device, torch.float32)
    if is_quantized(base) and kind == "loftq":
        raise LorafitError("adapter.init: loftq needs the full-precision weights of the quantized layers (lorafit "
                           "train loads them); this layer has only its quantized weight")
    return layer.base_weight(torch.float32)  # (out, in), also for a Conv1D's (in, out) storage


@torch.no_grad()
def init_from_weight(layer, kind: str) -> None:
    """Set the layer's A, B (and, for pissa / olora, its base weight and kept A0, B0) as `kind` says.

    Args:
        layer: a LoraLinear (r, scale, lora_A, lora_B, base_layer).
        kind: "pissa", "pissa_niter_N", "olora" or "loftq".
    """
    if layer.lora_A.weight.device.type == "meta":  # a plan on the meta device: nothing to decompose
        return
    weight = _original_weight(layer, kind)
    if kind == "olora":
        a0, b0 = qr_factors(weight, layer.r)
    elif kind == "loftq":
        a0, b0 = loftq_factors(weight, layer.base_weight(torch.float32), layer.r, layer.scale)
    else:
        niter = int(kind.removeprefix("pissa_niter_")) if kind.startswith("pissa_niter_") else None
        a0, b0 = principal_factors(weight, layer.r, layer.scale, niter)
    layer.lora_A.weight.copy_(a0)
    layer.lora_B.weight.copy_(b0)
    if kind != "loftq":
        a0, b0 = layer.lora_A.weight.detach().clone(), layer.lora_B.weight.detach().clone()  # in the adapter dtype
        layer.register_buffer("lora_A0", a0, persistent=False)
        layer.register_buffer("lora_B0", b0, persistent=False)
        _set_base_weight(layer, weight - layer.scale * (b0.float() @ a0.float()))
    if hasattr(layer.base_layer, ORIGINAL_WEIGHT):
        delattr(layer.base_layer, ORIGINAL_WEIGHT)  # read once; the memory goes back


def _set_base_weight(layer, residual: torch.Tensor) -> None:
    """Put the residual (float32, (out, in)) in the base layer's place: cast to its dtype, or quantized as the
    ordinary 4/8-bit load quantizes a weight (from the dtype the original weight was loaded in)."""
    base = layer.base_layer
    kept = getattr(base, ORIGINAL_WEIGHT, None)
    if not is_quantized(base):
        stored = residual.T.contiguous() if getattr(layer, "fan_in_fan_out", False) else residual  # Conv1D: (in, out)
        base.weight.data = stored.to(base.weight.dtype)  # a new tensor: the checkpoint's storage is not written
        return
    source = residual.to(kept.dtype if kept is not None else torch.float32)
    bnb, old, device = _bnb(), base.weight, base.weight.device
    if type(base).__name__ == "Linear8bitLt":
        new = bnb.nn.Int8Params(source.cpu(), requires_grad=False, has_fp16_weights=False).to(device)
        base.state.CB, base.state.SCB = None, None  # bitsandbytes moves the new codes here at the next forward
    else:
        new = bnb.nn.Params4bit(source, requires_grad=False, blocksize=old.blocksize,
                                compress_statistics=old.compress_statistics, quant_type=old.quant_type,
                                quant_storage=old.quant_storage, module=base).to(device)
    base.weight = new


# ------------------------------------------------------------------------------------------------ saving


def on_original_base(layer, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` (the layer's PEFT-named tensors) converted for the original base when the layer's base holds the
    residual (PiSSA / OLoRA): A' = [A ; A0] (2r, in), B' = [B | −B0] (out, 2r). Other layers: `state` as is."""
    a0, b0 = getattr(layer, "lora_A0", None), getattr(layer, "lora_B0", None)
    if a0 is None:
        return state
    out = dict(state)
    out["lora_A.weight"] = torch.cat([state["lora_A.weight"], a0.to(state["lora_A.weight"].dtype)], dim=0)
    out["lora_B.weight"] = torch.cat([state["lora_B.weight"], -b0.to(state["lora_B.weight"].dtype)], dim=1)
    return out


def converted_config(layers: dict, settings: dict) -> dict:
    """adapter_config.json keys for a converted (rank 2r) adapter: r doubled and alpha adjusted so alpha/r (or
    alpha/sqrt(r) with rsLoRA) is unchanged, and ``init_lora_weights: true`` (PEFT must not re-run PiSSA)."""
    if not any(getattr(layer, "lora_A0", None) is not None for layer in layers.values()):
        return {}
    alpha = settings["alpha"] * (math.sqrt(2) if settings.get("rslora") else 2)
    return {"r": 2 * settings["r"], "lora_alpha": alpha, "init_lora_weights": True}


def initial_parts(tensors: dict[str, torch.Tensor], r: int, scale: float) -> dict[str, torch.Tensor]:
    """{module name: s·B0 @ A0} read back from a converted adapter's PEFT-named tensors (A' = [A ; A0],
    B' = [B | −B0]), computed as the init computed it.

    A run on a 4/8-bit base trained on Q(W − s·B0 A0) + s·B A; merge rebuilds that base from W and these parts
    (`residual_roundtrip`), so the merged model is the trained one rather than Q(W) plus the converted adapter.
    """
    from lorafit.adapters.wrap import group_by_module

    parts = {}
    for name, group in group_by_module(tensors).items():
        a, b = group["lora_A.weight"], group["lora_B.weight"]
        if a.shape[0] == 2 * r:
            parts[name] = scale * ((-b[:, r:]).float() @ a[r:].float())
    return parts


def residual_roundtrip(weight: torch.Tensor, part: torch.Tensor, roundtrip) -> torch.Tensor:
    """The weight a PiSSA / OLoRA layer on a quantized base computed with, plus its initial part:
    roundtrip(W − s·B0 A0) + s·B0 A0, float32.

    Args:
        weight: W in the dtype the base was loaded in for quantizing (model.dtype).
        part: s·B0 @ A0 (`initial_parts`).
        roundtrip: quantize -> dequantize of a weight in that dtype (`base.quantize_roundtrip` with the run's
            settings).
    """
    residual = (weight.float() - part).to(weight.dtype)  # as `_set_base_weight` casts it before quantizing
    return roundtrip(residual).float() + part

