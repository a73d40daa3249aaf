"""LoRA on MoE experts stored as fused 3-D parameters (transformers 5: ``mlp.experts.gate_up_proj`` ...).

The math. An experts module holds E linear maps in one parameter, W of shape (E, out, in) (or (E, in, out) where the
module says ``is_transposed``, e.g. gpt-oss). Each expert e gets its own low-rank update

    W'_e = W_e + s · B_e @ A_e          A_e: (r, in), B_e: (out, r), s = alpha / r (alpha / sqrt(r) with rsLoRA)

The factors are stored as PEFT's ``ParamWrapper`` stores them, so the files map 1:1 onto PEFT's
``target_parameters`` adapters: ``lora_A.weight`` (r·E, in), expert-major (rows e·r .. e·r+r-1 are A_e), and
``lora_B.weight`` (out, r·E), expert-minor (column j·E + e is column j of B_e).

The experts' forward is transformers' own (eager loop, grouped_mm or batched_mm, whatever the model runs): the layer
calls it with W + ΔW in place of W (`torch.func.functional_call`), so one update formula (`expert_delta`) serves
training, eval, merge and export, and every experts implementation is covered without copying it. There is no
adapter dropout: an update folded into the weight cannot drop the inputs of one path (PEFT refuses it likewise).

Several weights of one experts module are adapted by nested layers, the first-declared innermost, exactly as PEFT
nests them, so tensor names agree (``...mlp.experts.base_layer.lora_A.weight`` is gate_up_proj's when down_proj is
adapted too).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call

from lorafit.adapters.base import AdapterLayer
from lorafit.adapters.lora import lora_scale
from lorafit.adapters.targets import expert_parameters, expert_shape
from lorafit.errors import LorafitError

EXPERT_METHODS = ("lora",)  # methods whose update can be written per expert (PEFT: plain LoRA / rsLoRA only)
EXPERT_INITS = ("default", "gaussian")


def expert_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, experts: int,
                 transposed: bool = False) -> torch.Tensor:
    """s · B_e @ A_e for every expert, in the fused parameter's layout. The one place this formula lives.

    Args:
        lora_a: (r·E, in), expert-major.
        lora_b: (out, r·E), expert-minor.
        scale: alpha / r (or alpha / sqrt(r)).
        experts: E.
        transposed: the parameter is stored (E, in, out).

    Returns:
        (E, out, in), or (E, in, out) when `transposed`, in the factors' dtype.
    """
    a = lora_a.reshape(experts, -1, lora_a.shape[-1])  # (E, r, in)
    b = lora_b.reshape(lora_b.shape[0], -1, experts).permute(2, 0, 1)  # (out, r, E) -> (E, out, r)
    delta = torch.bmm(b, a) * scale  # (E, out, in)
    return delta.transpose(1, 2) if transposed else delta


def expert_param_count(experts: int, in_features: int, out_features: int, r: int) -> int:
    """Trainable parameters the adapter adds to one fused expert weight: A and B of every expert."""
    return experts * r * (in_features + out_features)


class ExpertLora(AdapterLayer):
    """A per-expert low-rank update of one fused expert weight of `base_layer` (an experts module, or another
    ExpertLora around it). The experts module is kept, unchanged and frozen."""

    method = "lora"
    tensor_kinds = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Module, parameter_name: str, r: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False, dtype: torch.dtype = torch.float32, init: str = "default"):
        """Wrap `base_layer`'s (or, through nested ExpertLora layers, its experts module's) `parameter_name`.

        Args:
            base_layer: the experts module, or an ExpertLora around it (another of its weights).
            parameter_name: the fused weight, e.g. "gate_up_proj".
            r, alpha, rslora: as for LoRA, per expert.
            dropout: ignored (see the module docstring); accepted so LoRA's settings apply unchanged.
            dtype: dtype of A and B.
            init: "default" (A Kaiming-uniform, B zero) or "gaussian".
        """
        experts_module = _experts_of(base_layer)
        experts, in_features, out_features = expert_shape(experts_module, parameter_name)
        trainable = [p for p in base_layer.parameters() if p.requires_grad]  # an inner ExpertLora's A and B
        super().__init__(base_layer, features=(in_features, out_features))
        for p in trainable:
            p.requires_grad_(True)
        if r < 1:
            raise LorafitError(f"LoRA rank r must be >= 1 (got {r})")
        if init not in EXPERT_INITS:
            raise LorafitError(f"adapter.init: {init!r} cannot start MoE expert weights ({parameter_name}); use "
                               f"{' or '.join(EXPERT_INITS)}, or add experts to adapter.exclude")
        self.parameter_name, self.experts, self.transposed = parameter_name, experts, bool(experts_module.is_transposed)
        self.r, self.alpha, self.rslora, self.init = r, alpha, rslora, init
        self.scale = lora_scale(r, alpha, rslora)
        device = self.device
        self.lora_A = nn.Linear(in_features, r * experts, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r * experts, out_features, bias=False, device=device, dtype=dtype)
        self.reset_parameters()
        self.finish_init()

    # -- the wrapped parameter

    def _path(self) -> str:
        """The wrapped weight's path relative to `base_layer` (through nested ExpertLora layers)."""
        depth, module = 0, self.base_layer
        while isinstance(module, ExpertLora):
            depth, module = depth + 1, module.base_layer
        return "base_layer." * depth + self.parameter_name

    def _param(self) -> nn.Parameter:
        return getattr(_experts_of(self.base_layer), self.parameter_name)

    @property
    def device(self) -> torch.device:
        return self._param().device

    def base_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W in the parameter's own layout, (E, out, in) or (E, in, out), detached."""
        weight = self._param().detach()
        return weight if dtype is None else weight.to(dtype)

    def _full_precision_weight(self, action: str) -> torch.Tensor:
        return self._param()

    # -- the method

    @classmethod
    def layer_args(cls, settings: dict) -> dict:
        return {"r": settings["r"], "alpha": settings["alpha"], "rslora": settings.get("rslora", False),
                "init": settings.get("init", "default")}

    def reset_parameters(self) -> None:
        """A Kaiming-uniform over the whole (r·E, in) matrix (as PEFT), or N(0, 1/r) for gaussian; B zero."""
        if self.init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """ΔW of every expert in the parameter's layout; the factors are cast to `dtype` first when given."""
        a, b = self.lora_A.weight, self.lora_B.weight
        if dtype is not None:
            a, b = a.to(dtype), b.to(dtype)
        return expert_delta(a, b, self.scale, self.experts, self.transposed)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return {"lora_A.weight": self.lora_A.weight.detach(), "lora_B.weight": self.lora_B.weight.detach()}

    def forward(self, *args, **kwargs):
        if self.merged:
            return self.base_layer(*args, **kwargs)
        weight = self._param()
        # W + ΔW, built in W's dtype (a bf16 copy of the stack, not an fp32 one), in W's place for this call only
        updated = weight + self.delta(weight.dtype)
        return functional_call(self.base_layer, {self._path(): updated}, args, kwargs)

    def extra_repr(self) -> str:
        return (f"parameter={self.parameter_name}, experts={self.experts}, r={self.r}, alpha={self.alpha:g}, "
                f"scale={self.scale:.4g}, merged={self.merged}")


def _experts_of(module: nn.Module) -> nn.Module:
    """The experts module under any ExpertLora layers."""
    while isinstance(module, ExpertLora):
        module = module.base_layer
    return module


def check_expert_method(settings_method: str, dora: bool = False, where: str = "") -> None:
    """Refuse a method that cannot adapt fused expert weights, naming the fix.

    Raises:
        LorafitError: for any method but plain LoRA (rsLoRA included).
    """
    method = "dora" if dora else settings_method
    if method not in EXPERT_METHODS:
        raise LorafitError(f"adapter.method: {method} cannot adapt MoE expert weights{where} (only "
                           f"{', '.join(EXPERT_METHODS)} can, as in PEFT's target_parameters); add experts to "
                           f"adapter.exclude to adapt the other layers only")


def wrap_expert_parameter(model: nn.Module, name: str, method: str = "lora", **layer_args) -> ExpertLora:
    """Wrap the fused expert weight `name` (``<experts module path>.<parameter>``) in an ExpertLora, around the
    experts module or around the ExpertLora layers already on it.

    Returns:
        The new layer.
    """
    check_expert_method(method, bool(layer_args.get("dora")), f" ({name})")
    owner, _, parameter = name.rpartition(".")
    args = {k: v for k, v in layer_args.items() if k in ("r", "alpha", "dropout", "rslora", "dtype", "init")}
    layer = ExpertLora(model.get_submodule(owner), parameter, **args)
    model.set_submodule(owner, layer)
    return layer


def expert_target_name(layer_name: str, layer: ExpertLora) -> str:
    """``model.layers.0.mlp.experts.base_layer`` -> ``model.layers.0.mlp.experts.gate_up_proj``: the parameter
    path (PEFT's target_parameters entry) of the weight an ExpertLora adapts, from the layer's module name."""
    owner = layer_name
    while owner.endswith(".base_layer"):
        owner = owner.removesuffix(".base_layer")
    return f"{owner}.{layer.parameter_name}"


def matching_expert_parameters(model: nn.Module, target_parameters: list[str]) -> list[str]:
    """Paths of the fused expert weights PEFT's ``target_parameters`` select (exact path or ``endswith("." + t)``),
    in model order."""
    return [path for path, _, _ in expert_parameters(model)
            if any(path == t or path.endswith("." + t) for t in target_parameters)]




def expert_layer_names(paths: list[str]) -> dict[str, str]:
    """{parameter path: module name of its ExpertLora} once every weight in `paths` (model order) is wrapped:
    weights of one experts module nest, the first innermost (``...experts.base_layer`` when two are adapted)."""
    by_owner: dict[str, list[str]] = {}
    for path in paths:
        by_owner.setdefault(path.rpartition(".")[0], []).append(path)
    return {path: owner + ".base_layer" * (len(group) - 1 - i)
            for owner, group in by_owner.items() for i, path in enumerate(group)}


__all__ = ["EXPERT_METHODS", "ExpertLora", "check_expert_method", "expert_delta", "expert_layer_names",
           "expert_param_count", "expert_target_name", "matching_expert_parameters", "wrap_expert_parameter"]
