"""Several processes: plain data parallel (DDP, through Accelerate) by default, or FSDP when the launch asks for it.

FSDP is requested the way Accelerate users already know: ``accelerate launch --config_file
configs/accelerate/fsdp.yaml`` (which sets ``ACCELERATE_USE_FSDP=true`` and ``FSDP_*``), or that variable under
torchrun. lorafit then shards the model itself with PyTorch's FSDP (`shard_model`), instead of letting Accelerate
do it, for three reasons:

- one code path on GPUs and on the CPU: Accelerate enables FSDP only on accelerators, so its path could not be
  tested in CI, while torch's FSDP runs on the CPU with gloo;
- the wrap policy LoRA needs: one FSDP unit per decoder layer (frozen, same dtype as the base) and one per adapter
  matrix (trainable fp32). FSDP flattens each unit's parameters into one tensor, which must have a single dtype;
- bitsandbytes 4-bit weights: FSDP1 keeps a layer's quantization state on the module (bitsandbytes restores it
  after FSDP swaps the parameter), while FSDP2 shards the packed 4-bit bytes into DTensors and loses it (measured:
  the two ranks disagree at the first loss). So this is FSDP1 (``FullyShardedDataParallel``,
  ``use_orig_params=True``), with the 4-bit storage dtype set to the model's dtype (`fsdp_storage_dtype`).

Checkpoints and adapters are always saved whole (gathered on rank 0), in the same files as a one-process run.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorafit.adapters import bare_name
from lorafit.errors import LorafitError, RunDirError

# Accelerate writes the strategy by name (or, in old configs, by FSDP's enum number).
SHARDING_STRATEGIES = {"1": "FULL_SHARD", "2": "SHARD_GRAD_OP", "3": "NO_SHARD", "4": "HYBRID_SHARD"}


@dataclass(frozen=True)
class Sharding:
    """The FSDP settings lorafit honours, read from the launch environment."""

    strategy: str = "FULL_SHARD"  # FULL_SHARD | SHARD_GRAD_OP | HYBRID_SHARD
    offload_params: bool = False  # keep parameter shards in CPU memory between uses


def _flag(environ: Mapping[str, str], name: str) -> bool:
    return environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def requested_sharding(environ: Mapping[str, str] | None = None) -> Sharding | None:
    """The FSDP settings the launcher asked for, or None for plain data parallel.

    Raises:
        LorafitError: DeepSpeed, FSDP version 2, or an unknown sharding strategy.
    """
    env = os.environ if environ is None else environ
    if _flag(env, "ACCELERATE_USE_DEEPSPEED"):
        raise LorafitError("the launch config asks for DeepSpeed, which lorafit does not support yet; for sharding "
                           "use accelerate launch --config_file configs/accelerate/fsdp.yaml, for plain data "
                           "parallel configs/accelerate/ddp.yaml or torchrun --nproc_per_node N -m lorafit train")
    if not _flag(env, "ACCELERATE_USE_FSDP"):
        return None
    version = env.get("FSDP_VERSION", "1").strip()
    if version != "1":
        raise LorafitError(f"FSDP: fsdp_version {version} is not supported; lorafit shards with FSDP version 1, "
                           f"the one that can shard bitsandbytes 4-bit weights (set fsdp_version: 1 in the "
                           f"accelerate config, as configs/accelerate/fsdp.yaml does)")
    raw = env.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD").strip().upper()
    strategy = SHARDING_STRATEGIES.get(raw, raw)
    if strategy == "NO_SHARD":
        raise LorafitError("FSDP: fsdp_sharding_strategy NO_SHARD shards nothing: it is data parallel; launch with "
                           "configs/accelerate/ddp.yaml (or torchrun) instead")
    if strategy not in SHARDING_STRATEGIES.values():
        raise LorafitError(f"FSDP: fsdp_sharding_strategy {raw!r} is not one of FULL_SHARD, SHARD_GRAD_OP or "
                           f"HYBRID_SHARD")
    return Sharding(strategy=strategy, offload_params=_flag(env, "FSDP_OFFLOAD_PARAMS"))


def check_sharding_fits(*, quant_bits: int | None, dora: bool, precision: str, optimizer: str,
                        init: str = "default", method: str = "lora") -> None:
    """Refuse the combinations FSDP cannot run, naming the key to change.

    Raises:
        LorafitError: 8-bit base weights, DoRA, fp16 or an 8-bit optimizer under FSDP.
    """
    problems = []
    if quant_bits == 8:
        problems.append("model.quantization.bits: 8-bit weights cannot be sharded by FSDP (int8 cannot share a "
                        "flat tensor with the model's other weights); use bits: 4, or data parallel (DDP)")
    if dora:
        problems.append("adapter.method: dora is not supported under FSDP (its magnitude vector lives in the "
                        "decoder layers' frozen units); use lora, or data parallel (DDP)")
    if method == "lora_fa":
        problems.append("adapter.method: lora_fa is not supported under FSDP (FSDP gathers trainable tensors only, "
                        "and LoRA-FA's frozen A must be saved too); use lora, or data parallel (DDP)")
    if method == "vera":
        problems.append("adapter.method: vera is not supported under FSDP (its frozen projections are shared by "
                        "layers in different FSDP units); use data parallel (DDP): VeRA's vectors are tiny anyway")
    if method == "adalora":
        problems.append("adapter.method: adalora is not supported under FSDP (its rank allocator scores and prunes "
                        "whole singular-value triplets from every layer's weights and gradients, which FSDP holds "
                        "in shards); use lora, or data parallel (DDP)")
    if init in ("pissa", "olora"):
        problems.append(f"adapter.init: {init} is not supported under FSDP (its adapter is saved converted against "
                        f"the initial factors, which FSDP's shards do not hold whole); use init default or loftq, or "
                        f"data parallel (DDP)")
    if precision == "fp16":
        problems.append("train.precision: fp16 under FSDP needs a sharded loss scaler lorafit does not have; "
                        "use bf16")
    if optimizer != "adamw":
        problems.append(f"train.optimizer: {optimizer} keeps block-quantized state that FSDP cannot gather into a "
                        f"checkpoint; use adamw (FSDP shards the adapter's optimizer state anyway)")
    if problems:
        raise LorafitError("FSDP: " + "; ".join(problems))


def check_config_fits(cfg) -> None:
    """`check_sharding_fits` for a lorafit Config (train and validate refuse the same things)."""
    q = cfg.model.quantization
    check_sharding_fits(quant_bits=q.bits if q else None, dora=cfg.adapter.method == "dora",
                        precision=cfg.train.precision, optimizer=cfg.train.optimizer, init=cfg.adapter.init,
                        method=cfg.adapter.method)
    vocab = [k for k, on in (("model.add_tokens", cfg.model.add_tokens), ("adapter.modules_to_save",
                                                                           cfg.adapter.modules_to_save),
                             ("adapter.train_tokens", isinstance(cfg.adapter.train_tokens, list))) if on]
    if vocab:
        raise LorafitError(f"FSDP: {', '.join(vocab)} train embedding / head rows or whole modules, which lorafit does "
                           f"not shard; train with data parallel (torchrun, or the DDP launch config)")


def take_fsdp_request_from_environment() -> None:
    """Remove ``ACCELERATE_USE_FSDP`` from this process's environment once lorafit has read it.

    Accelerate (and transformers' loading) would otherwise shard or meta-load the model in their own way, on top of
    `shard_model`; lorafit has read the settings it needs with `requested_sharding`.
    """
    os.environ.pop("ACCELERATE_USE_FSDP", None)


# ------------------------------------------------------------------------------------------------ wrapping


def _decoder_layer_classes(model: nn.Module) -> tuple[type, ...]:
    names = set(getattr(model, "_no_split_modules", None) or [])
    classes = tuple({type(m) for m in model.modules() if type(m).__name__ in names})
    if not classes:
        raise LorafitError(f"FSDP: cannot tell the decoder layers of {type(model).__name__} (no _no_split_modules); "
                           f"train it with data parallel (DDP) instead")
    return classes


def _is_adapter_matrix(module: nn.Module) -> bool:
    """A LoRA A or B matrix: a linear layer whose weight trains (every base weight is frozen)."""
    return isinstance(module, nn.Linear) and module.weight.requires_grad


def _keep_4bit_layout(model: nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU kernel at the first eval forward.

    The repack replaces the weight's data and marks the (module-held) quantization state as repacked; FSDP then
    gathers the original layout again at the next forward, which the marked state would misread.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def shard_model(model: nn.Module, sharding: Sharding, device: torch.device) -> nn.Module:
    """Wrap `model` (LoRA already attached) in FSDP: a unit per decoder layer and per adapter matrix, the rest in
    the root unit. Every process must hold the same weights, adapter included (see `train._build_model`).

    Returns:
        The FSDP-wrapped model; build the optimizer over its parameters afterwards.
    """
    from torch.distributed.fsdp import CPUOffload, ShardingStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    layers = _decoder_layer_classes(model)

    def policy(module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
        return True if recurse else isinstance(module, layers) or _is_adapter_matrix(module)

    _keep_4bit_layout(model)
    if device.type == "cpu":
        device = torch.device("cpu")  # Accelerate says cpu:0 on a multi-process CPU run; FSDP compares with "cpu"
    return FSDP(model, auto_wrap_policy=policy, sharding_strategy=getattr(ShardingStrategy, sharding.strategy),
                cpu_offload=CPUOffload(offload_params=sharding.offload_params), device_id=device,
                use_orig_params=True, limit_all_gathers=True, sync_module_states=False)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return isinstance(model, FSDP)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP or FSDP root wrapper. FSDP's inner units stay; `adapters.bare_name` drops their
    segments from names."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


# ------------------------------------------------------------------------------------------------ state
# Whole tensors under the bare model's names (`adapters.bare_name`), on every launch, so checkpoints are the same files.


def _state_options(device: torch.device, **more: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # cpu_offload gathers onto rank 0's CPU only; on a CPU run (gloo) it crashes, and the tensors are there anyway
    return StateDictOptions(full_state_dict=True, cpu_offload=device.type != "cpu", **more)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters, whole, on the CPU, under the bare model's names ({} on ranks other than 0 may
    happen under FSDP). Every process must call this: under FSDP it gathers the shards."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = get_model_state_dict(model, options=_state_options(model.compute_device, ignore_frozen_params=True))
        return {bare_name(k): v.detach().cpu().contiguous() for k, v in state.items()}
    return {n: p.detach().cpu().contiguous() for n, p in unwrap(model).named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, weights: dict[str, torch.Tensor], where: str) -> None:
    """Copy saved trainable parameters into the model (every process calls this with the same `weights`).

    Raises:
        RunDirError: a saved name the model does not have.
    """
    params = {bare_name(n): p for n, p in unwrap(model).named_parameters()}
    missing = sorted(set(weights) - set(params))
    if missing:
        raise RunDirError(f"{where}: checkpoint weights do not fit this model (e.g. {missing[0]})")
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, weights, options=_state_options(model.compute_device, strict=False))
        return
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


def optimizer_state(model: nn.Module, optimizer) -> dict[str, Any]:
    """The optimizer's state dict, whole (every process calls this; under FSDP rank 0 receives it)."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=_state_options(model.compute_device))
    return optimizer.state_dict()


def load_optimizer_state(model: nn.Module, optimizer, state: dict[str, Any]) -> None:
    """Restore what `optimizer_state` returned (every process calls this with the same `state`)."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=_state_options(model.compute_device))
        return
    optimizer.load_state_dict(state)


def clip_grad_norm(model: nn.Module, accelerator, max_norm: float | None) -> torch.Tensor:
    """Clip the gradients to `max_norm` (None or 0: no clipping) and return their total norm across processes."""
    if is_sharded(model):  # each process holds a shard of every gradient: FSDP reduces the norm itself
        return model.clip_grad_norm_(max_norm or float("inf"))
    if max_norm:
        return accelerator.clip_grad_norm_(model.parameters(), max_norm)
    grads = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(grads))
