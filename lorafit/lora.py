"""The LoRA layer: wrap a frozen linear layer, add a trainable low-rank path, merge it back, unwrap.

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
wrapped model's adapter state dict maps 1:1 onto PEFT's files. This module takes plain numbers, never config
objects.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.errors import LorafitError, TargetNotFoundError

PEFT_PREFIX = "base_model.model."  # PEFT stores adapter tensors under this prefix
ADAPTER_KEYS = ("lora_A", "lora_B", "lora_magnitude_vector")


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


# ------------------------------------------------------------------------------------ quantized weights


def _bnb():
    import bitsandbytes  # imported lazily: optional at runtime and slow to import

    return bitsandbytes


def is_quantized(layer: nn.Module) -> bool:
    """True for bitsandbytes Linear4bit / Linear8bitLt layers."""
    name = type(layer).__name__
    return name in ("Linear4bit", "Linear8bitLt", "LinearNF4", "LinearFP4")


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The weight of a linear layer in floating point, shape (out, in), without modifying the layer.

    Args:
        layer: nn.Linear, bitsandbytes Linear4bit or Linear8bitLt.

    Returns:
        nn.Linear: the weight itself (detached). 4-bit: fp32 (or the quant state's dtype) from
        ``dequantize_4bit``. 8-bit: fp32 from the int8 codes and row scales.
    """
    weight = layer.weight
    if not is_quantized(layer):
        return weight.detach()
    functional = _bnb().functional
    if type(layer).__name__ == "Linear8bitLt":
        # The row scales live on the weight until the first forward, then bitsandbytes moves them to layer.state.
        scales = getattr(weight, "SCB", None)
        if scales is None:
            scales = getattr(getattr(layer, "state", None), "SCB", None)
        if scales is None and weight.dtype != torch.int8:  # not quantized (has_fp16_weights, or meta device)
            return weight.detach()
        return functional.int8_vectorwise_dequant(weight.data, scales)
    data, state = _unpacked_4bit(weight.data, weight.quant_state)
    return functional.dequantize_4bit(data, state)


def _unpacked_4bit(data: torch.Tensor, state):
    """The standard (packed codes, QuantState) of a 4-bit weight, undoing bitsandbytes' CPU repack on copies.

    At the first eval forward on an AVX512-BF16 CPU, bitsandbytes reorders the codes for its kernel and replaces
    the block scales by a bf16 (K/blocksize, N) table (de-nesting double quant). Its own inverse leaves that
    table transposed, so the scales are restored here: the result is the weight the CPU kernel computes with.
    """
    import copy

    if not getattr(state, "packing_format_for_cpu", False):
        return data, state
    state = copy.copy(state)  # the inverse writes into the state it is given; keep the layer's own intact
    absmax = state.absmax.T.reshape(-1).float()  # (K/bs, N) -> (N * K/bs,): blocks run along each row
    state.original_nested = False  # stop the inverse from re-quantizing the scales; they are set below
    data, state = _bnb().functional._convert_weight_packed_for_cpu_inverse(data, state)
    state.absmax, state.nested, state.state2, state.offset = absmax, False, None, None
    return data, state


def quantize_roundtrip(weight: torch.Tensor, bits: int, quant_type: str = "nf4", double_quant: bool = False,
                       blocksize: int = 64) -> torch.Tensor:
    """The weight a bitsandbytes base would see: quantize then dequantize, as loading with BitsAndBytesConfig does.

    merge uses this to reproduce, in full precision, the exact weights a QLoRA adapter was trained against.

    Args:
        weight: (out, in) floating-point weight, in the dtype the base was loaded in.
        bits: 4 or 8.
        quant_type: "nf4" or "fp4" (4-bit only).
        double_quant: quantize the 4-bit block scales too.
        blocksize: 4-bit block size (bitsandbytes' and transformers' default is 64).

    Returns:
        The dequantized weight, same shape and dtype as ``weight``.
    """
    functional = _bnb().functional
    if bits == 8:
        # Int8Params quantizes from fp16 rows with one absmax scale per row.
        codes, scales, _ = functional.int8_vectorwise_quant(weight.contiguous().to(torch.float16))
        return functional.int8_vectorwise_dequant(codes, scales).to(weight.dtype)
    if bits != 4:
        raise LorafitError(f"quantization bits must be 4 or 8 (got {bits})")
    packed, state = functional.quantize_4bit(weight.contiguous(), blocksize=blocksize,
                                             compress_statistics=double_quant, quant_type=quant_type)
    return functional.dequantize_4bit(packed, state).to(weight.dtype)


def logical_numel(param: torch.Tensor) -> int:
    """Number of parameters a tensor stands for: 4-bit Params4bit pack two values per byte."""
    state = getattr(param, "quant_state", None)
    if state is not None and getattr(state, "shape", None) is not None:
        return math.prod(state.shape)
    return param.numel()


# ---------------------------------------------------------------------------------------------- the layer


class LoraLinear(nn.Module):
    """A frozen linear layer (nn.Linear, Linear4bit or Linear8bitLt) plus a trainable low-rank path.

    The original module is kept, unchanged, as ``base_layer``; ``unwrap_lora`` puts it back.
    """

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 dora: bool = False, dtype: torch.dtype = torch.float32):
        """Wrap `base_layer`.

        Args:
            base_layer: the layer to adapt; its parameters are frozen, not copied.
            r: rank of the update.
            alpha: scale numerator (scale = alpha / r, or alpha / sqrt(r) with rslora).
            dropout: dropout probability on the adapter's input only.
            rslora: use alpha / sqrt(r).
            dora: add DoRA's magnitude vector.
            dtype: dtype of the adapter's parameters (fp32 by default: they are small and train more stably).
        """
        super().__init__()
        if r < 1:
            raise LorafitError(f"LoRA rank r must be >= 1 (got {r})")
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.alpha, self.rslora, self.dora = r, alpha, rslora, dora
        self.scale = lora_scale(r, alpha, rslora)
        device = _device_of(base_layer)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        # Identity when p == 0: nn.Dropout(0) would still copy the input every step.
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self._dora_factor: torch.Tensor | None = None  # m / n used by merge, needed again by unmerge
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.train(base_layer.training)  # a wrapper added to an eval-mode model must not start dropping out
        self.reset_parameters()
        if dora:
            self.lora_magnitude_vector = nn.Parameter(torch.empty(self.out_features, device=device, dtype=dtype))
            self.reset_magnitude()

    def reset_parameters(self) -> None:
        """A as nn.Linear initialises its weight (Kaiming-uniform, a = sqrt(5)); B zero, so the delta starts at 0."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @torch.no_grad()
    def reset_magnitude(self) -> None:
        """DoRA: m = ||W + s·BA||_row, so the wrapped layer starts out computing exactly what the base did."""
        if self.lora_magnitude_vector.device.type == "meta":
            return
        self.lora_magnitude_vector.copy_(self._dora_norm(self._base_weight()))

    def _base_weight(self) -> torch.Tensor:
        """W in the adapter's dtype (dequantized for 4/8-bit bases), detached."""
        return dequantized_weight(self.base_layer).to(self.lora_A.weight.dtype)

    def _dora_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """n = ||W + s·BA||_row, (out,), detached: DoRA treats the norm as a constant for autograd."""
        return row_norm(weight + self.delta().detach()).detach()

    def delta(self) -> torch.Tensor:
        """This layer's s · B @ A, (out, in)."""
        return delta_weight(self.lora_A.weight, self.lora_B.weight, self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        adapter_dtype = self.lora_A.weight.dtype
        x_in = self.lora_dropout(x.to(adapter_dtype))
        if self.dora:
            return self._dora_forward(x, x_in, result)
        update = self.lora_B(self.lora_A(x_in))  # (..., in) -> (..., r) -> (..., out): two thin matmuls
        update = update.to(result.dtype)
        if result._base is None:
            # In place: nothing saved the base output for backward, so this skips one (..., out) allocation.
            return result.add_(update, alpha=self.scale)
        return result + update * self.scale  # a view (e.g. from a custom autograd Function) must not be mutated

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
        if self.merged:
            return
        weight = self._full_precision_weight("merge")
        delta = self.delta().float()
        merged = weight.float() + delta
        if self.dora:
            self._dora_factor = dora_factor(weight, delta, self.lora_magnitude_vector)
            merged = self._dora_factor[:, None] * merged
        weight.copy_(merged.to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge` (up to rounding in the base dtype). Does nothing when not merged."""
        if not self.merged:
            return
        weight = self._full_precision_weight("unmerge")
        delta = self.delta().float()
        restored = weight.float() / self._dora_factor[:, None] - delta if self.dora else weight.float() - delta
        weight.copy_(restored.to(weight.dtype))
        self._dora_factor = None
        self.merged = False

    def _full_precision_weight(self, action: str) -> torch.Tensor:
        if is_quantized(self.base_layer):
            raise LorafitError(f"cannot {action} an adapter into a quantized ({type(self.base_layer).__name__}) "
                               f"layer in place; reload the base in full precision first (lorafit merge does this)")
        return self.base_layer.weight

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, scale={self.scale:.4g}, dora={self.dora}, merged={self.merged}"


def _device_of(layer: nn.Module) -> torch.device:
    return layer.weight.device


# ------------------------------------------------------------------------------------------------ targets


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


def linear_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every unwrapped linear layer (bnb's 4/8-bit layers subclass nn.Linear); LoRA wrappers
    and their insides are skipped."""
    wrapped = [name for name, m in bare_named_modules(model) if isinstance(m, LoraLinear)]
    out = []
    for name, module in bare_named_modules(model):
        if not isinstance(module, nn.Linear) or any(name.startswith(w + ".") for w in wrapped):
            continue
        out.append((name, module))
    return out


def _suffix_matches(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def _module_kinds(names: Iterable[str]) -> str:
    """'q_proj, k_proj, ...': the last name component of each module, deduplicated, in model order."""
    return ", ".join(dict.fromkeys(n.rpartition(".")[2] for n in names)) or "(none)"


def find_targets(model: nn.Module, targets: str | list[str], exclude: Iterable[str] = ()) -> list[str]:
    """Names of the linear modules to wrap. Pure: reads names and module types only (works on the meta device).

    Args:
        model: the base model.
        targets: "all-linear" (every linear layer except the output head), a list of module-name suffixes
            (exact name or ``name.endswith("." + suffix)``), or "re:<regex>" (fullmatch on the module name).
        exclude: module-name suffixes never wrapped.

    Returns:
        Module names in model order.

    Raises:
        TargetNotFoundError: nothing matched, or a listed suffix matched no linear module; the message lists
            the kinds of linear modules the model has.
    """
    linear = linear_modules(model)
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
        missing = [t for t in targets if not any(_suffix_matches(n, t) for n, _ in linear)]
        if missing:
            raise TargetNotFoundError(f"adapter.targets: {', '.join(map(repr, missing))} matched no linear module; "
                                      f"the model's linear modules are: {_module_kinds(n for n, _ in linear)}")
        chosen = [n for n, _ in linear if any(_suffix_matches(n, t) for t in targets)]
    exclude = list(exclude)
    kept = [n for n in chosen if not any(_suffix_matches(n, e) for e in exclude)]
    if not kept:
        why = f" (all {len(chosen)} matches are excluded by adapter.exclude)" if chosen else ""
        raise TargetNotFoundError(f"adapter.targets: {targets!r} matched no linear module{why}; the model's linear "
                                  f"modules are: {_module_kinds(n for n, _ in linear)}")
    return kept


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """Every LoRA wrapper in the model, by (bare) module name."""
    return {name: m for name, m in bare_named_modules(model) if isinstance(m, LoraLinear)}


def attach_lora(model: nn.Module, targets: str | list[str], exclude: Iterable[str] = (), *, r: int, alpha: float,
                dropout: float = 0.0, rslora: bool = False, dora: bool = False,
                dtype: torch.dtype = torch.float32) -> list[str]:
    """Freeze the whole model and wrap the target linear layers in `LoraLinear`.

    Args:
        model: the base model (full precision or bitsandbytes-quantized).
        targets, exclude: see `find_targets`.
        r, alpha, dropout, rslora, dora, dtype: see `LoraLinear`.

    Returns:
        The wrapped module names.
    """
    if lora_layers(model):
        raise LorafitError("the model already has LoRA layers; call unwrap_lora(model) before attaching new ones")
    names = find_targets(model, targets, exclude)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        wrap_module(model, name, r=r, alpha=alpha, dropout=dropout, rslora=rslora, dora=dora, dtype=dtype)
    return names


def wrap_module(model: nn.Module, name: str, **lora_args) -> LoraLinear:
    """Replace the linear module `name` by a `LoraLinear` around it (keyword args: see `LoraLinear`).

    Returns:
        The new wrapper.
    """
    base = model.get_submodule(name)
    if not isinstance(base, nn.Linear):
        raise LorafitError(f"{name} is a {type(base).__name__}, not a linear layer; LoRA wraps linear layers only")
    layer = LoraLinear(base, **lora_args)
    model.set_submodule(name, layer)
    return layer


def unwrap_lora(model: nn.Module, merge: bool = False) -> nn.Module:
    """Put every original layer back (merging the adapter into it first when `merge`), so the model's
    state-dict keys are the Hugging Face checkpoint's again.

    Args:
        model: a model with LoRA layers.
        merge: fold each adapter into its base weight before dropping it (full-precision bases only).

    Returns:
        The same model object, modified in place.
    """
    for name, layer in lora_layers(model).items():
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


# ------------------------------------------------------------------------------ state dict, counts, groups


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's names: ``base_model.model.<module>.lora_A.weight`` (r, in),
    ``...lora_B.weight`` (out, r) and, with DoRA, ``...lora_magnitude_vector`` (out,). Detached, not copied."""
    out = {}
    for name, layer in lora_layers(model).items():
        prefix = f"{PEFT_PREFIX}{name}."
        out[prefix + "lora_A.weight"] = layer.lora_A.weight.detach()
        out[prefix + "lora_B.weight"] = layer.lora_B.weight.detach()
        if layer.dora:
            out[prefix + "lora_magnitude_vector"] = layer.lora_magnitude_vector.detach()
    return out


def adapter_tensors(trainable: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`lora_state_dict`'s result from a {parameter name: tensor} dict of the model's trainable parameters, as
    gathered from a sharded model whose layers hold only shards."""
    return {PEFT_PREFIX + bare_name(name): t for name, t in trainable.items()
            if name.endswith((".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector"))}


def split_adapter_key(key: str) -> tuple[str, str]:
    """``base_model.model.m.q_proj.lora_A.weight`` -> ("m.q_proj", "lora_A"). Raises LorafitError otherwise."""
    body = key.removeprefix(PEFT_PREFIX)
    for kind in ADAPTER_KEYS:
        for tail in (f".{kind}.weight", f".{kind}.default.weight", f".{kind}"):
            if body.endswith(tail):
                return body[: -len(tail)], kind
    raise LorafitError(f"adapter tensor {key!r} is not a LoRA tensor (lora_A / lora_B / lora_magnitude_vector); "
                       f"only plain LoRA and DoRA adapters on linear layers are supported")


def load_lora_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors (PEFT names) into the model's LoRA layers, checking that every layer is covered.

    Raises:
        LorafitError: a tensor names no LoRA layer, has the wrong shape, or a layer gets no A or B.
    """
    layers = lora_layers(model)
    seen: dict[str, set[str]] = {name: set() for name in layers}
    for key, tensor in state_dict.items():
        name, kind = split_adapter_key(key)
        if name not in layers:
            raise LorafitError(f"adapter tensor {key!r}: the model has no LoRA layer {name!r}")
        target = getattr(layers[name], kind, None)
        param = target if isinstance(target, nn.Parameter) else getattr(target, "weight", None)
        if param is None:
            raise LorafitError(f"adapter tensor {key!r}: layer {name!r} has no {kind} (DoRA tensor on a LoRA layer?)")
        if tuple(param.shape) != tuple(tensor.shape):
            raise LorafitError(f"adapter tensor {key!r} has shape {tuple(tensor.shape)} but the model expects "
                               f"{tuple(param.shape)}: the adapter was trained on a different base model")
        with torch.no_grad():
            param.copy_(tensor)
        seen[name].add(kind)
    for name, kinds in seen.items():
        needed = {"lora_A", "lora_B"} | ({"lora_magnitude_vector"} if layers[name].dora else set())
        if needed - kinds:
            raise LorafitError(f"adapter has no {', '.join(sorted(needed - kinds))} for layer {name!r}")


@dataclass
class ParamReport:
    """What `attach_lora` did: wrapped module names and parameter counts (4-bit weights counted logically)."""

    wrapped: list[str]
    trainable: int
    total: int

    def __str__(self) -> str:
        share = 100 * self.trainable / max(self.total, 1)
        return (f"LoRA on {len(self.wrapped)} layers ({_module_kinds(self.wrapped)}): "
                f"{self.trainable:,} trainable of {self.total:,} parameters ({share:.3f}%)")


def param_report(model: nn.Module) -> ParamReport:
    """Count trainable and total parameters and list the wrapped layers."""
    params = list(model.parameters())
    trainable = sum(logical_numel(p) for p in params if p.requires_grad)
    total = sum(logical_numel(p) for p in params)
    return ParamReport(list(lora_layers(model)), trainable, total)


def param_groups(model: nn.Module, lr: float, weight_decay: float = 0.0,
                 lora_plus_ratio: float | None = None) -> list[dict]:
    """Optimizer parameter groups, with LoRA+ when `lora_plus_ratio` is set.

    Args:
        model: a model with LoRA layers.
        lr: base learning rate (A, DoRA magnitude, any other trainable parameter).
        weight_decay: applied to A, B and other trainable weights; never to DoRA's magnitude vector.
        lora_plus_ratio: B's learning rate is lr × ratio (LoRA+, Hayou et al. 2024); None means 1.

    Returns:
        Non-empty groups, each with "params", "lr", "weight_decay" and a "name" for logging.
    """
    buckets: dict[str, list[nn.Parameter]] = {"lora_A": [], "lora_B": [], "lora_magnitude": [], "other": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        name = bare_name(name)  # FSDP puts a segment between lora_B and .weight
        if name.endswith("lora_A.weight"):
            buckets["lora_A"].append(p)
        elif name.endswith("lora_B.weight"):
            buckets["lora_B"].append(p)
        elif name.endswith("lora_magnitude_vector"):
            buckets["lora_magnitude"].append(p)
        else:
            buckets["other"].append(p)
    settings = {
        "lora_A": (lr, weight_decay),
        "lora_B": (lr * (lora_plus_ratio or 1.0), weight_decay),
        "lora_magnitude": (lr, 0.0),
        "other": (lr, weight_decay),
    }
    return [{"params": ps, "lr": settings[k][0], "weight_decay": settings[k][1], "name": k}
            for k, ps in buckets.items() if ps]
