"""VeRA (Kopiczko et al. 2024): frozen random projections shared by every layer, trainable scaling vectors per layer.

The math. For a frozen (out, in) layer VeRA adds

    y = x W^T + b + λ_b ⊙ ((λ_d ⊙ (dropout(x) A^T)) B^T)        ΔW = diag(λ_b) B diag(λ_d) A

with A (r, in) and B (out, r) frozen and random, and only the vectors λ_d (r,) and λ_b (out,) trained: λ_d starts at
``adapter.vera.d_initial``, λ_b at zero (so a fresh adapter changes nothing). There is no alpha / r scale.

One pair for the whole model, as PEFT does: A (r, max_in) and B (max_out, r) for the largest target dimensions, each
layer using the top-left slice ``A[:, :in]``, ``B[:out, :]``. (Separate pairs per distinct layer shape would be just
as valid, but a PEFT VERA adapter means the sliced pair, and lorafit's adapters load in PEFT.) The pair is
regenerated from ``adapter.vera.projection_seed`` exactly as PEFT's ``_init_vera_A_vera_B`` makes it: a CPU
``torch.Generator`` seeded with it draws A and then B, each Kaiming-uniform over its own fan-in (bound
sqrt(6 / fan_in)), in float32. So lorafit saves adapters with ``save_projection: false`` (the vectors only, a few
KB), and loads PEFT's with or without the saved pair.

The vectors are scales, like DoRA's magnitude: the optimizer never decays them (`wrap.GROUP_OF_SUFFIX`), and LoRA+
(a ratio between A's and B's learning rates) has nothing to act on, so the config refuses it.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.adapters.base import PEFT_PREFIX, AdapterLayer
from lorafit.errors import LorafitError

PROJECTION_KEYS = (f"{PEFT_PREFIX.removesuffix('model.')}vera_A", f"{PEFT_PREFIX.removesuffix('model.')}vera_B")
# adapter_config.json keys plain LoRA writes that PEFT's VeraConfig does not have
LORA_ONLY_KEYS = ("lora_alpha", "lora_dropout", "exclude_modules", "use_rslora", "use_dora", "lora_bias",
                  "init_lora_weights", "rank_pattern", "alpha_pattern")

# ----------------------------------------------------------------------------------------- pure formulas


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """U(-sqrt(6 / fan_in), sqrt(6 / fan_in)) for a 2-D shape (fan_in = shape[1]), float32, drawn from `generator`
    (PEFT's ``vera._kaiming_init``: gain sqrt(2), bound sqrt(3) · gain / sqrt(fan_in))."""
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    return torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)


def vera_projections(r: int, max_in: int, max_out: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared pair (A (r, max_in), B (max_out, r)) for `seed`, on the CPU, as PEFT generates it."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    a = kaiming_uniform((r, max_in), generator)
    return a, kaiming_uniform((max_out, r), generator)  # B second, from the same generator


def vera_delta(a: torch.Tensor, b: torch.Tensor, lambda_b: torch.Tensor, lambda_d: torch.Tensor) -> torch.Tensor:
    """ΔW = diag(λ_b) B diag(λ_d) A, (out, in), from the layer's slices A (r, in) and B (out, r)."""
    return (lambda_b[:, None] * b) @ (lambda_d[:, None] * a)


# ---------------------------------------------------------------------------------------------- the layer


class VeraProjections(nn.Module):
    """The frozen pair, one module every layer refers to: moved with the model, never in its state dict."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.register_buffer("vera_A", a, persistent=False)  # (r, max_in)
        self.register_buffer("vera_B", b, persistent=False)  # (max_out, r)


class VeraLinear(AdapterLayer):
    """A frozen linear layer plus VeRA's scaled path; `share_projections` gives every layer the same pair."""

    method = "vera"
    peft_type = "VERA"
    tensor_kinds = ("vera_lambda_b", "vera_lambda_d")

    def __init__(self, base_layer: nn.Linear, r: int, dropout: float = 0.0, d_initial: float = 0.1,
                 dtype: torch.dtype = torch.float32):
        """Wrap `base_layer`; λ_b = 0, λ_d = d_initial. The projections come later (`share_projections`)."""
        super().__init__(base_layer)
        if r < 1:
            raise LorafitError(f"VeRA rank r must be >= 1 (got {r})")
        self.r, self.d_initial = r, d_initial
        device = self.device
        self.vera_lambda_b = nn.Parameter(torch.zeros(self.out_features, device=device, dtype=dtype))
        self.vera_lambda_d = nn.Parameter(torch.full((r,), float(d_initial), device=device, dtype=dtype))
        self.vera_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.vera_projections: VeraProjections | None = None
        self.finish_init()

    # -- hooks (see AdapterLayer)

    @classmethod
    def layer_args(cls, settings: dict) -> dict:
        return {"r": settings["r"], "dropout": settings["dropout"], "d_initial": settings["vera"]["d_initial"]}

    @classmethod
    def prepare_model(cls, model: nn.Module, layers: dict[str, AdapterLayer], settings: dict) -> None:
        share_projections(layers, settings["vera"]["projection_seed"])

    @classmethod
    def param_count(cls, in_features: int, out_features: int, settings: dict) -> int:
        """λ_b (out) and λ_d (r); the shared projections are frozen. Any r fits any layer: the layer's slices of
        A (r, in) and B (out, r) exist for every r (VeRA's paper uses r = 1024 on 768-wide layers)."""
        return out_features + settings["r"]

    @classmethod
    def peft_config(cls, layers: dict[str, AdapterLayer], settings: dict) -> dict:
        return {"peft_type": "VERA", "projection_prng_key": settings["vera"]["projection_seed"],
                "save_projection": False, "vera_dropout": settings["dropout"],
                "d_initial": settings["vera"]["d_initial"], "init_weights": True}

    peft_config_drop = LORA_ONLY_KEYS

    @classmethod
    def load_peft(cls, model: nn.Module, adapter_dir, config: dict, tensors: dict[str, torch.Tensor],
                  dropout: float | None = None):
        return load_vera(model, Path(adapter_dir), config, tensors, dropout)

    # -- the method

    def _slices(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's A (r, in) and B (out, r): the top-left corners of the shared pair."""
        if self.vera_projections is None:
            raise LorafitError("a VeRA layer has no projections yet; attach it with attach_from_settings")
        a, b = self.vera_projections.vera_A, self.vera_projections.vera_B
        dtype = self.vera_lambda_d.dtype
        return a[:, : self.in_features].to(device, dtype), b[: self.out_features, :].to(device, dtype)

    def delta(self) -> torch.Tensor:
        """diag(λ_b) B diag(λ_d) A, (out, in)."""
        a, b = self._slices(self.vera_lambda_d.device)
        return vera_delta(a, b, self.vera_lambda_b, self.vera_lambda_d)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return {"vera_lambda_b": self.vera_lambda_b.detach(), "vera_lambda_d": self.vera_lambda_d.detach()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        a, b = self._slices(x.device)
        x_in = self.vera_dropout(x.to(self.vera_lambda_d.dtype))
        h = F.linear(x_in, a) * self.vera_lambda_d  # (..., in) -> (..., r), scaled by λ_d
        return self.add_update(result, F.linear(h, b) * self.vera_lambda_b)  # (..., r) -> (..., out), by λ_b

    def extra_repr(self) -> str:
        return f"r={self.r}, d_initial={self.d_initial:g}, merged={self.merged}"


def share_projections(layers: dict[str, AdapterLayer], seed: int,
                      saved: tuple[torch.Tensor, torch.Tensor] | None = None) -> VeraProjections:
    """Give every VeRA layer the same frozen pair: `saved` (PEFT's ``save_projection``) or regenerated from `seed`
    for the largest target dimensions.

    Raises:
        LorafitError: the layers' ranks differ, or a saved pair is too small for them.
    """
    ranks = {layer.r for layer in layers.values()}
    if len(ranks) != 1:
        raise LorafitError(f"VeRA layers share one pair of projections, so one rank (got ranks {sorted(ranks)})")
    r = ranks.pop()
    max_in = max(layer.in_features for layer in layers.values())
    max_out = max(layer.out_features for layer in layers.values())
    a, b = saved if saved is not None else vera_projections(r, max_in, max_out, seed)
    if a.shape[0] != r or a.shape[1] < max_in or b.shape[1] != r or b.shape[0] < max_out:
        raise LorafitError(f"the saved VeRA projections vera_A {tuple(a.shape)} and vera_B {tuple(b.shape)} do not "
                           f"cover rank {r} and the targets' largest dimensions ({max_out} out, {max_in} in)")
    device = next(iter(layers.values())).device
    shared = VeraProjections(a.float().to(device), b.float().to(device))
    for layer in layers.values():
        layer.vera_projections = shared  # the same module in every layer: moved once, stored once
    return shared


# ------------------------------------------------------------------------------------------------ loading


def load_vera(model: nn.Module, adapter_dir: Path, config: dict, tensors: dict[str, torch.Tensor],
              dropout: float | None = None):
    """Attach and fill the VeRA layers a PEFT VERA adapter folder describes (`VeraLinear.load_peft`).

    Which modules are wrapped is read off the tensor names; the projections are the saved ones when the file has
    them (``save_projection: true``, PEFT's default), else regenerated from ``projection_prng_key``.

    Returns:
        `lorafit.adapters.peft_io.AdapterSettings` (alpha = r: VeRA's update has no extra scale).

    Raises:
        RunDirError: a malformed config, settings lorafit cannot honour, or tensors that do not fit the model.
    """
    from lorafit.adapters.peft_io import CONFIG_NAME, AdapterSettings
    from lorafit.adapters.wrap import load_lora_state_dict, lora_layers, split_adapter_key, wrap_module
    from lorafit.errors import RunDirError

    where = adapter_dir / CONFIG_NAME
    r, seed = config.get("r"), config.get("projection_prng_key", 0)
    for key, value in (("r", r), ("projection_prng_key", seed)):
        if not isinstance(value, int) or isinstance(value, bool) or (key == "r" and value < 1):
            raise RunDirError(f"{where}: {key} must be a {'positive ' if key == 'r' else ''}whole number (got {value!r})")
    unsupported = [f"{k}={config[k]!r}" for k in ("bias", "modules_to_save") if config.get(k) not in ("none", None, [])]
    if unsupported:
        raise RunDirError(f"{where}: {', '.join(unsupported)} is not supported by lorafit's VeRA (no bias, no "
                          f"modules_to_save); load it with PEFT instead")
    saved = [tensors.pop(k, None) for k in PROJECTION_KEYS]
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    try:
        for key, tensor in tensors.items():
            name, rel = split_adapter_key(key)
            grouped.setdefault(name, {})[rel] = tensor
    except LorafitError as e:
        raise RunDirError(f"{adapter_dir}: {e}") from None
    if not grouped:
        raise RunDirError(f"{adapter_dir}: holds no VeRA tensors (vera_lambda_b / vera_lambda_d)")
    if lora_layers(model):
        raise RunDirError("the model already has adapter layers; load an adapter into a fresh base model")
    modules = dict(model.named_modules())
    missing = [n for n in grouped if n not in modules]
    if missing:
        raise RunDirError(f"{adapter_dir}: the adapter adapts {missing[0]}, which this model does not have (the "
                          f"adapter's base: {config.get('base_model_name_or_path')})")
    drop = float(config.get("vera_dropout", 0.0) or 0.0) if dropout is None else dropout
    for p in model.parameters():
        p.requires_grad_(False)  # as attaching does: only the adapter trains
    try:
        for name in grouped:
            wrap_module(model, name, method="vera", r=r, dropout=drop, d_initial=float(config.get("d_initial", 0.1)))
        pair = None if saved[0] is None or saved[1] is None else (saved[0], saved[1])
        share_projections(lora_layers(model), seed, saved=pair)
        load_lora_state_dict(model, {f"{PEFT_PREFIX}{n}.{k}": t for n, parts in grouped.items() for k, t in parts.items()})
    except LorafitError as e:
        raise RunDirError(f"{adapter_dir}: {e}") from None
    return AdapterSettings(r=r, alpha=float(r), dropout=drop, rslora=False, dora=False,
                           base_model_name_or_path=config.get("base_model_name_or_path"),
                           target_modules=config.get("target_modules"), wrapped=list(lora_layers(model)))
