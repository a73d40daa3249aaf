"""What every adapter method shares: the frozen base layer, its (dequantized) weight, and the merge contract.

An adapter layer wraps an existing module (nn.Linear, or a bitsandbytes Linear4bit / Linear8bitLt) and keeps it,
unchanged and frozen, as ``base_layer``; unwrapping puts it back, so the model's own state-dict keys never change.
Each method defines

    delta()            the dense update ΔW (out, in) its trainable tensors stand for, in the adapter's dtype;
    forward(x)         base_layer(x) plus the method's path (never building ΔW when it can avoid it);
    adapter_state()    its tensors under PEFT's names relative to the module (``lora_A.weight`` ...).

and inherits ``merge`` / ``unmerge`` (W ± ΔW on a full-precision base), which a method overrides only when its
merged weight is not W + ΔW (DoRA). This module takes plain numbers, never config objects.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from lorafit.adapters.targets import is_conv1d, linear_features
from lorafit.errors import LorafitError

PEFT_PREFIX = "base_model.model."  # PEFT stores adapter tensors under this prefix


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


class TrainingHooks:
    """What a method adds to the training loop (AdaLoRA's regulariser and rank pruning). The default adds nothing.

    The loop calls `regularizer()` once per optimizer step (its value is added to the last micro-batch's loss),
    `after_step(step)` right after the optimizer step and before the gradients are zeroed (step counted from 1:
    the gradients of this step are still on the parameters), and saves / restores `state_dict()` with every
    checkpoint (`method_state.pt`) so a resumed run continues bit-exactly.
    """

    def regularizer(self) -> torch.Tensor | None:
        return None

    def after_step(self, step: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def state_bytes(self, trainable: int) -> int:
        """About how many bytes `state_dict()` adds to each checkpoint (for the free-disk check at start);
        by default what it holds now."""
        return sum(t.numel() * t.element_size() for t in _tensors(self.state_dict()))


def _tensors(obj):
    """Every tensor in a nested dict / list / tuple."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, list | tuple):
        for v in obj:
            yield from _tensors(v)


class AdapterLayer(nn.Module):
    """A frozen base layer plus a method's trainable path. Subclasses: see the module docstring.

    Class attributes a method sets:
        method: its name in ``adapter.method`` (and the registry).
        peft_type: the ``peft_type`` its saved adapters carry.
        tensor_kinds: the PEFT tensor names it saves, relative to the module, without ``.weight``
            (``lora_A``, ``lora_B`` ...): how saved keys are split into (module, kind).
        peft_config_drop: keys of plain LoRA's adapter_config.json its PEFT format does not have (VeRA's).
    """

    method = ""
    peft_type = "LORA"
    tensor_kinds: tuple[str, ...] = ()
    peft_config_drop: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Module, features: tuple[int, int] | None = None):
        super().__init__()
        self.base_layer = base_layer
        # GPT-2's Conv1D stores W as (in, out): PEFT's fan_in_fan_out. base_weight() and merge see it as (out, in).
        self.fan_in_fan_out = is_conv1d(base_layer)
        self.in_features, self.out_features = features or linear_features(base_layer)
        self.merged = False
        for p in base_layer.parameters():
            p.requires_grad_(False)

    def finish_init(self) -> None:
        """Call at the end of a subclass's __init__: take the base layer's train/eval mode, so a wrapper added to
        an eval-mode model does not start dropping out (modules are created in training mode)."""
        self.train(self.base_layer.training)

    @property
    def device(self) -> torch.device:
        return self.base_layer.weight.device

    # -- what a method defines

    def delta(self) -> torch.Tensor:
        """ΔW, (out, in): what merging adds to the base weight."""
        raise NotImplementedError

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """This layer's tensors under PEFT's names relative to the module (``lora_A.weight`` ...), detached."""
        raise NotImplementedError

    # -- what a method may override: how settings become layers, and what the whole model needs

    @classmethod
    def layer_args(cls, settings: dict) -> dict:
        """Constructor keyword arguments from the adapter settings (the `adapter:` section as plain data)."""
        return {"r": settings["r"], "alpha": settings["alpha"], "dropout": settings["dropout"],
                "rslora": settings.get("rslora", False)}

    @classmethod
    def prepare_model(cls, model: nn.Module, layers: dict[str, AdapterLayer], settings: dict) -> None:
        """Model-level set-up after every target is wrapped (e.g. projections shared by all layers)."""

    @classmethod
    def param_count(cls, in_features: int, out_features: int, settings: dict) -> int:
        """Trainable parameters one wrapped (out, in) layer adds (for the plan, on the meta device)."""
        raise NotImplementedError

    @classmethod
    def peft_config(cls, layers: dict[str, AdapterLayer], settings: dict) -> dict:
        """Keys of adapter_config.json that differ from plain LoRA's (peft_type, method sections ...)."""
        return {}

    @classmethod
    def training_hooks(cls, layers: dict[str, AdapterLayer], settings: dict, total_steps: int) -> TrainingHooks:
        """What this method adds to the training loop (see `TrainingHooks`)."""
        return TrainingHooks()

    @classmethod
    def load_peft(cls, model: nn.Module, adapter_dir, config: dict, tensors: dict[str, torch.Tensor],
                  dropout: float | None = None):
        """Attach and fill this method's layers from a saved adapter whose ``peft_type`` is `cls.peft_type`
        (PEFT's or lorafit's files). Only methods with their own peft_type define it (LORA-typed adapters are
        loaded by `lorafit.adapters.peft_io.load_adapter`).

        Returns:
            `lorafit.adapters.peft_io.AdapterSettings` for the loaded adapter.

        Raises:
            RunDirError: the files do not describe an adapter this model can take (named).
        """
        raise NotImplementedError

    def export_state(self) -> dict[str, torch.Tensor]:
        """The tensors the saved adapter holds for this layer (PEFT names): `adapter_state`, unless the method
        saves a converted form (PiSSA / OLoRA: the equivalent LoRA on the original base)."""
        return self.adapter_state()

    # -- shared

    def base_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W, (out, in), detached; dequantized for 4/8-bit bases; in `dtype` when given."""
        weight = dequantized_weight(self.base_layer)
        weight = weight.T if self.fan_in_fan_out else weight
        return weight if dtype is None else weight.to(dtype)

    def load_adapter_state(self, tensors: dict[str, torch.Tensor], where: str = "") -> None:
        """Copy tensors named as `adapter_state` names them into this layer, checking names and shapes.

        Raises:
            LorafitError: a name the layer does not have, a missing tensor, or a shape that does not fit.
        """
        own = self.adapter_state()
        unknown = sorted(set(tensors) - set(own))
        if unknown:
            raise LorafitError(f"adapter tensor {where}{unknown[0]}: a {self.method} layer has no such tensor "
                               f"(it has {', '.join(sorted(own))})")
        missing = sorted(set(own) - set(tensors))
        if missing:
            raise LorafitError(f"adapter has no {', '.join(missing)} for layer {where.rstrip('.')!r}")
        for key, tensor in tensors.items():
            target = own[key]  # detached, but the same storage as the parameter
            if tuple(target.shape) != tuple(tensor.shape):
                raise LorafitError(f"adapter tensor {where}{key} has shape {tuple(tensor.shape)} but the model "
                                   f"expects {tuple(target.shape)}: the adapter was trained on a different base "
                                   f"model or settings")
            with torch.no_grad():
                target.copy_(tensor)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight: W += ΔW. A second call does nothing."""
        if self.merged:
            return
        weight = self._full_precision_weight("merge")
        weight.copy_((weight.float() + self.delta().float()).to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge` (up to rounding in the base dtype). Does nothing when not merged."""
        if not self.merged:
            return
        weight = self._full_precision_weight("unmerge")
        weight.copy_((weight.float() - self.delta().float()).to(weight.dtype))
        self.merged = False

    def _full_precision_weight(self, action: str) -> torch.Tensor:
        if is_quantized(self.base_layer):
            raise LorafitError(f"cannot {action} an adapter into a quantized ({type(self.base_layer).__name__}) "
                               f"layer in place; reload the base in full precision first (lorafit merge does this)")
        weight = self.base_layer.weight
        return weight.T if self.fan_in_fan_out else weight  # a view: writes reach the (in, out) Conv1D weight

    @staticmethod
    def add_update(result: torch.Tensor, update: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """result + scale · update, in place when nothing saved `result` for backward (one (..., out) fewer)."""
        update = update.to(result.dtype)
        if result._base is None:
            return result.add_(update, alpha=scale)
        return result + update * scale  # a view (e.g. from a custom autograd Function) must not be mutated
