"""Adapter layers: LoRA and its family, wrapped around a frozen base model's linear layers.

    base.py      the shared layer (frozen base, dequantized weight, merge contract) and quantized-weight helpers
    targets.py   which modules `adapter.targets` / `adapter.exclude` select
    lora.py      LoRA, rsLoRA and DoRA
    lora_fa.py   LoRA-FA: A frozen, backward keeps only the r-wide projection
    vera.py      VeRA: shared frozen projections, trained scaling vectors (PEFT's VERA format)
    adalora.py   AdaLoRA: SVD-form updates, importance scores and rank pruning during training (PEFT's ADALORA)
    experts.py   MoE models' fused 3-D expert weights: a low-rank update per expert (PEFT's target_parameters)
    init.py      how A and B start (`adapter.init`): default, gaussian; svd_init.py: pissa, olora, loftq
    registry.py  `adapter.method` -> layer class
    wrap.py      whole-model operations: attach, unwrap, merge, PEFT-named tensors, optimizer groups
    multi.py     several named adapters on one base, chosen per batch or per row (eval, generate, serve)
    peft_io.py   PEFT-format folders: adapter_config.json and tensors read and written, `AdapterSettings`

Everything public is importable from `lorafit.adapters`.
"""

from lorafit.adapters.base import (
    PEFT_PREFIX,
    AdapterLayer,
    TrainingHooks,
    dequantized_weight,
    is_quantized,
    logical_numel,
    quantize_roundtrip,
)
from lorafit.adapters.lora import LoraLinear, delta_weight, dora_factor, lora_param_count, lora_scale, row_norm
from lorafit.adapters.registry import METHODS, Method, layer_for_peft_type, peft_types
from lorafit.adapters.targets import bare_name, bare_named_modules, find_targets, linear_modules, module_kinds
from lorafit.adapters.wrap import (
    ParamReport,
    adapter_tensors,
    attach_adapter,
    attach_from_settings,
    attach_lora,
    group_by_module,
    load_lora_state_dict,
    lora_layers,
    lora_state_dict,
    merge_lora,
    method_param_count,
    param_groups,
    param_report,
    split_adapter_key,
    training_hooks,
    unmerge_lora,
    unwrap_lora,
    wrap_module,
)

__all__ = [
    "AdapterLayer", "LoraLinear", "METHODS", "Method", "PEFT_PREFIX", "ParamReport", "TrainingHooks",
    "adapter_tensors", "attach_adapter", "attach_from_settings", "attach_lora", "bare_name", "bare_named_modules",
    "delta_weight", "dequantized_weight", "dora_factor", "find_targets", "group_by_module", "is_quantized",
    "layer_for_peft_type", "linear_modules", "load_lora_state_dict", "logical_numel", "lora_layers",
    "lora_param_count", "lora_scale", "lora_state_dict", "merge_lora", "method_param_count", "module_kinds",
    "param_groups", "param_report", "peft_types", "quantize_roundtrip", "row_norm", "split_adapter_key",
    "training_hooks", "unmerge_lora", "unwrap_lora", "wrap_module",
]
