"""The plan `lorafit validate` (and `train --dry-run`) shows: what will be built and trained, and a memory estimate.

Nothing here loads weights. Parameters are counted on a model built on the meta device from the model's
`config.json` (a local directory, the Hugging Face cache, or a config bundled with lorafit for well-known models),
so the plan is available offline and in seconds even for 70B models.

The memory estimate is a first-order model (see `estimate_memory`); `lorafit train` reports measured peaks to
compare with.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafit.config import Config, LoadedConfig

BUNDLED_MODEL_CONFIGS = Path(__file__).parent / "model_configs"
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
PRECISION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
GiB = 1024**3
FIT_FRACTION = 0.9  # of a device's memory the estimate may fill before gradient_checkpointing: auto turns it on


@dataclass
class ModelShape:
    """What the plan needs to know about the base model, read off a meta-device instance."""

    source: str  # where config.json came from
    total_params: int
    quantizable_params: int  # weights of linear layers bitsandbytes would quantize (all but the output head)
    hidden: int
    intermediate: int
    kv_dim: int
    layers: int
    vocab: int
    targets: list[str]  # module names (and fused expert weight paths) the adapter wraps
    adapter_params: int
    model_type: str = ""
    expert_weights: int = 0  # parameters in fused 3-D MoE expert weights (never quantized by bitsandbytes)
    expert_targets: list[str] = field(default_factory=list)  # the adapted ones, among `targets`
    expert_adapter_params: int = 0  # trainable parameters the adapter adds to them
    experts: int = 0  # experts per fused weight
    ranks: dict[str, int] = field(default_factory=dict)  # each target's rank (adapter.layers / rank_pattern)


@dataclass
class DataCount:
    path: str
    format: str
    rows: int | None  # None: could not count (hub dataset offline)
    note: str = ""


@dataclass
class Plan:
    model: ModelShape | None
    model_note: str  # why the model could not be counted, if it could not
    train_data: list[DataCount]
    eval_data: list[DataCount]
    world_size: int
    fsdp: bool
    steps_per_epoch: int | None
    total_steps: int | None
    memory: dict[str, float] = field(default_factory=dict)  # bytes per device, by part
    attention: Any = None  # lorafit.model.AttentionChoice on this machine; None when the model class is unknown


# ------------------------------------------------------------------------------------------------ model


def _find_model_config(cfg: Config) -> tuple[Any, str] | tuple[None, str]:
    """transformers' config for model.path: local dir, HF cache, or a bundled copy. Returns (config, source)."""
    from transformers import AutoConfig

    path = cfg.model.path
    kwargs = dict(revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code)
    if Path(path).is_dir():
        if not (Path(path) / "config.json").is_file():
            return None, f"{path} is a directory without config.json (not a Hugging Face model folder)"
        return AutoConfig.from_pretrained(path, **kwargs), f"{path}/config.json"
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True, **kwargs), "Hugging Face cache"
    except (OSError, ValueError):
        pass
    bundled = BUNDLED_MODEL_CONFIGS / (path.replace("/", "--") + ".json")
    if bundled.is_file():
        data = json.loads(bundled.read_text())
        return AutoConfig.for_model(**data), "lorafit's bundled config (architecture only)"
    return None, (f"{path!r} is not a local directory and its config is not cached; parameters and memory are not "
                  f"counted offline (download it once, or point model.path at a local folder)")


def _vocab_params(cfg: Config, model) -> int:
    """Trainable parameters beside the adapter: modules_to_save whole (refused when a name matches nothing), and
    the added tokens' rows (embedding, and the untied head). Untrained special tokens found in the data at the start
    of training add their rows too; those are not known here."""
    from lorafit.adapters.tokens import find_modules, heads_tied

    whole = find_modules(model, cfg.adapter.modules_to_save) if cfg.adapter.modules_to_save else {}
    params = sum(p.numel() for m in whole.values() for p in m.parameters())
    if cfg.model.add_tokens:
        dim = model.get_input_embeddings().weight.shape[1]
        params += len(cfg.model.add_tokens) * dim * (1 if heads_tied(model) else 2)
    return params


def _model_shape(cfg: Config, hf_config: Any, source: str) -> ModelShape:
    import torch
    from transformers import AutoModelForCausalLM

    from lorafit.adapters import find_targets, method_param_count
    from lorafit.adapters.experts import check_expert_method, expert_param_count
    from lorafit.adapters.targets import expert_parameters, expert_shape, is_linear, linear_features

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=cfg.model.trust_remote_code)
    a = cfg.adapter
    settings = a.settings()
    placed = _placement(find_targets(model, a.targets, a.exclude), settings)
    targets = list(placed)
    modules = dict(model.named_modules())
    experts = {path: expert_shape(m, name) for path, m, name in expert_parameters(model)}  # (E, in, out)
    expert_targets = [n for n in targets if n in experts]
    if expert_targets:
        check_expert_method(a.method, where=f" ({len(expert_targets)} fused weights, e.g. {expert_targets[0]})")
    expert_adapter = sum(expert_param_count(*experts[n], placed[n].get("r", a.r)) for n in expert_targets)
    adapter_params = expert_adapter + sum(method_param_count(*linear_features(modules[n]), {**settings, **placed[n]})
                                          for n in targets if n not in experts)
    adapter_params += _vocab_params(cfg, model)
    head = model.get_output_embeddings()
    # bitsandbytes quantizes nn.Linear and Conv1D layers, never the fused 3-D expert weights
    quantizable = sum(m.weight.numel() for m in modules.values() if is_linear(m) and m is not head)
    text_cfg = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    heads = getattr(text_cfg, "num_attention_heads", 1)
    head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // heads
    return ModelShape(
        source=source,
        total_params=sum(p.numel() for p in model.parameters()),
        quantizable_params=quantizable,
        hidden=text_cfg.hidden_size,
        intermediate=getattr(text_cfg, "intermediate_size", 4 * text_cfg.hidden_size),
        kv_dim=getattr(text_cfg, "num_key_value_heads", heads) * head_dim,
        layers=text_cfg.num_hidden_layers,
        vocab=text_cfg.vocab_size,
        targets=targets,
        adapter_params=adapter_params,
        model_type=getattr(hf_config, "model_type", ""),
        expert_weights=sum(math.prod(model.get_parameter(p).shape) for p in experts),
        expert_targets=expert_targets,
        expert_adapter_params=expert_adapter,
        experts=next(iter(experts.values()))[0] if experts else 0,
        ranks={n: placed[n].get("r", a.r) for n in targets},
    )


def _placement(candidates: list[str], settings: dict) -> dict[str, dict]:
    """The targets the plan counts, with their own r / alpha (`adapters.placement.place`). Under allocate:
    gradient the ranks are not known before the probe: the plan counts uniform r, which is the budget."""
    from lorafit.adapters.placement import filter_layers, place

    if settings["allocate"] != "none":
        return {n: {} for n in filter_layers(candidates, settings["layers"])}
    return place(candidates, settings)


# ------------------------------------------------------------------------------------------------ memory


def estimate_memory(cfg: Config, shape: ModelShape, shards: int = 1,
                    checkpointing: bool | None = None) -> dict[str, float]:
    """Bytes per device for weights, adapter (+ grads + optimizer state), activations and logits.

    With FSDP over `shards` processes, each holds 1/shards of the weights and of the adapter's state, plus the
    whole weights of the decoder layer being computed and of the next one (gathered ahead). `checkpointing`
    overrides train.gradient_checkpointing; "auto" counts as off (what auto picks when it fits).

    Activations per token per decoder layer (Llama-style block, `a` bytes per activation): the two RMSNorm inputs
    (kept in fp32 too), the attention projections' inputs and outputs (6h + 3·kv), and the MLP's gate, up and
    product (3·intermediate). Gradient checkpointing keeps only each layer's input (h) plus one layer's full set.
    Logits: the output projection in `a` bytes plus fp32 copies for the loss and its gradient — for every position,
    or, where `lorafit.loss` scores supervised positions in chunks, for one chunk only.
    """
    q = cfg.model.quantization
    weight_bytes = DTYPE_BYTES[cfg.model.dtype]
    other = shape.total_params - shape.quantizable_params
    if q is None:
        weights = shape.total_params * weight_bytes
    elif q.bits == 4:
        # 0.5 byte per weight; absmax per 64-weight block: fp32 (4 B), or with double quant 8-bit + fp32 per 256 blocks
        per_weight = 0.5 + (1 / 64 + 4 / (64 * 256) if q.double_quant else 4 / 64)
        weights = shape.quantizable_params * per_weight + other * weight_bytes
    else:
        weights = shape.quantizable_params * 1.0 + other * weight_bytes
    t = cfg.train
    optimizer_bytes = 8 if t.optimizer == "adamw" else 2  # two fp32 moments, or two 8-bit ones
    adapter = shape.adapter_params * (4 + 4 + optimizer_bytes)  # fp32 weights, fp32 grads, optimizer state
    if shards > 1:
        weights = weights / shards + 2 * (weights - other * weight_bytes) / max(shape.layers, 1)
        adapter /= shards
    a = PRECISION_BYTES[t.precision]
    # Preference objectives run two sequences per item (chosen + rejected, or kto's row + its mismatched pair) in one
    # forward; the reference's no-grad forward keeps no activations, so it adds only one layer's working set.
    tokens = t.batch_size * cfg.data.max_length * (1 if t.objective == "sft" else 2)
    h, kv, i = shape.hidden, shape.kv_dim, shape.intermediate
    per_layer = tokens * (2 * h * (a + 4) + a * (6 * h + 3 * kv) + 3 * i * a)
    if checkpointing is None:
        checkpointing = t.gradient_checkpointing is True
    if checkpointing:
        activations = shape.layers * tokens * h * a + per_layer
    else:
        activations = shape.layers * per_layer
    from lorafit.loss import CHUNK_LOGITS, SUPPORTED_MODEL_TYPES

    if shape.model_type in SUPPORTED_MODEL_TYPES:  # chunked loss: one chunk of logits, plus fp32 grads of hidden
        logits = min(tokens * shape.vocab, CHUNK_LOGITS) * (a + 8) + tokens * h * 4
    else:
        logits = tokens * shape.vocab * (a + 8)
    return {"weights": weights, "adapter + grads + optimizer": adapter, "activations": activations, "logits": logits}


# ------------------------------------------------------------------------------------------------ data


def checkpointing_needed(cfg: Config, shape: ModelShape, capacity: float, shards: int = 1) -> bool:
    """For ``train.gradient_checkpointing: auto``: True when the estimate without checkpointing would fill more than
    `FIT_FRACTION` of a device's `capacity` bytes (recomputing activations costs about 30% more compute)."""
    return sum(estimate_memory(cfg, shape, shards, checkpointing=False).values()) > FIT_FRACTION * capacity


def device_capacity(device) -> int:
    """Bytes of memory on `device`: the GPU's total, or the machine's physical memory for the CPU."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def model_shape(cfg: Config) -> ModelShape | None:
    """The model's shape for the memory estimate, or None when its config.json cannot be found offline."""
    hf_config, source = _find_model_config(cfg)
    return _model_shape(cfg, hf_config, source) if hf_config is not None else None


def _count(sources: list[Any]) -> list[DataCount]:
    from lorafit.data import count_rows

    out = []
    for s in sources:
        rows = count_rows(s)
        note = "" if rows is not None else "not counted (hub dataset, not available offline)"
        out.append(DataCount(s.path, s.format, rows, note))
    return out


def _steps(cfg: Config, train_rows: int | None, world: int) -> tuple[int | None, int | None]:
    """Optimizer steps per epoch (an upper bound with packing, which merges rows) and in total."""
    from lorafit.data.build import held_out_count
    from lorafit.schedule import steps_per_epoch

    t = cfg.train
    per_epoch = None
    if train_rows is not None:
        kept = train_rows - (0 if cfg.data.eval else held_out_count(train_rows, cfg.data.eval_fraction))
        per_epoch = steps_per_epoch(kept, t.batch_size * t.grad_accum * world)
    total = t.max_steps if t.max_steps is not None else (per_epoch * t.epochs if per_epoch else None)
    return per_epoch, total


def make_plan(cfg: Config, processes: int | None = None, fsdp: bool | None = None) -> Plan:
    """Everything `validate` shows, computed without loading weights or tokenizing data.

    Args:
        cfg: the validated config.
        processes: data-parallel processes to plan for; default: torchrun's WORLD_SIZE, or 1.
        fsdp: plan for FSDP sharding; default: whether the launch asks for it (`lorafit.parallel`).

    Raises:
        LorafitError: under FSDP, a setting FSDP cannot shard (as `lorafit train` would refuse it).
    """
    from lorafit import parallel

    if fsdp is None:
        fsdp = parallel.requested_sharding() is not None
    if fsdp:
        parallel.check_config_fits(cfg)
    from lorafit.model import resolve_attention

    hf_config, source = _find_model_config(cfg)
    # refuses what the model cannot run; what this machine lacks (flash-attn, a GPU) is only noted
    attention = resolve_attention(cfg.model, hf_config, here=False) if hf_config is not None else None
    shape = _model_shape(cfg, hf_config, source) if hf_config is not None else None
    train_data, eval_data = _count(cfg.data.train), _count(cfg.data.eval)
    world = processes or int(os.environ.get("WORLD_SIZE", "1"))
    rows = [d.rows for d in train_data]
    per_epoch, total = _steps(cfg, None if None in rows else sum(rows), world)
    memory = estimate_memory(cfg, shape, shards=world if fsdp else 1) if shape is not None else {}
    return Plan(shape, "" if shape else source, train_data, eval_data, world, fsdp, per_epoch, total, memory,
                attention)


# ------------------------------------------------------------------------------------------------ printing


def _num(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def _targets_summary(targets: list[str]) -> str:
    suffixes: dict[str, int] = {}
    for name in targets:
        leaf = name.rsplit(".", 1)[-1]
        suffixes[leaf] = suffixes.get(leaf, 0) + 1
    return ", ".join(f"{k} ×{v}" for k, v in suffixes.items())


def print_plan(console: Any, loaded: LoadedConfig, plan: Plan, show_config: bool) -> None:
    """Print the resolved config (optionally) and the plan as a table."""
    from rich.syntax import Syntax
    from rich.table import Table

    cfg = loaded.config
    if show_config:
        console.print(f"[bold]Resolved config[/] ({loaded.path})")
        console.print(Syntax(cfg.to_yaml(), "yaml", theme="ansi_dark", background_color="default"))
    table = Table(title="Plan", show_header=False, title_justify="left", box=None, padding=(0, 2))
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for key, value in _plan_rows(cfg, plan):
        table.add_row(key, value)
    console.print(table)
    if plan.model is None:
        console.print(f"[yellow]note:[/] {plan.model_note}")
    launch = (f"accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes {plan.world_size} -m "
              if plan.fsdp else "")
    console.print(f"Config OK. Next: {launch}lorafit train {loaded.path}")


def _checkpointing_text(cfg: Config, plan: Plan) -> str:
    setting = cfg.train.gradient_checkpointing
    if setting != "auto":
        return "on" if setting else "off"
    if not plan.memory:
        return "auto (on: memory not estimated)"
    need = sum(plan.memory.values()) / FIT_FRACTION / GiB
    return f"auto: off on devices of ≥ {need:.1f} GiB, on below (memory below is without it)"


def _plan_rows(cfg: Config, plan: Plan) -> list[tuple[str, str]]:
    q = cfg.model.quantization
    a, t = cfg.adapter, cfg.train
    base = "full precision" if q is None else (
        f"4-bit {q.type}{' + double quant' if q.double_quant else ''}, compute {q.compute_dtype}"
        if q.bits == 4 else "8-bit (LLM.int8)")
    settings = a.settings()
    rank = settings["adalora"]["init_r"] if a.method == "adalora" else a.r  # AdaLoRA divides by init_r
    scale = a.alpha / math.sqrt(rank) if a.rslora else a.alpha / rank
    adapter = f"{a.method} r={a.r} alpha={a.alpha:g} scale={scale:.4g}{' (rsLoRA)' if a.rslora else ''}"
    if a.method == "vera":  # no alpha: the trained vectors carry the scale
        adapter = f"vera r={a.r} (shared projections, seed {settings['vera']['projection_seed']}), " \
                  f"d_initial={settings['vera']['d_initial']:g}"
    elif a.method == "adalora":
        adapter = f"adalora rank {rank} -> average {a.r}, alpha={a.alpha:g} scale={scale:.4g}"
    if a.init != "default":
        adapter += f", init {a.init}"
    rows = [
        ("model", f"{cfg.model.path} ({cfg.model.dtype}, "
                  f"{plan.attention.describe() if plan.attention else cfg.model.attention + ' attention'})"),
        ("base weights", base),
        ("adapter", f"{adapter} dropout={a.dropout:g}"),
        ("precision", f"{t.precision}, gradient checkpointing {_checkpointing_text(cfg, plan)}"),
    ]
    m = plan.model
    if m is not None:
        rows += [
            ("model config", m.source),
            ("targets", f"{len(m.targets)} modules: {_targets_summary(m.targets)}"),
            ("parameters", f"{_num(m.adapter_params)} trainable / {_num(m.total_params)} total "
                           f"({100 * m.adapter_params / max(m.total_params, 1):.3f}%)"),
        ]
        rows += _expert_rows(cfg, m)
        rows += _placement_rows(cfg, m)
    for label, counts in (("train data", plan.train_data), ("eval data", plan.eval_data)):
        for d in counts:
            rows.append((label, f"{d.path} ({d.format}): {d.rows if d.rows is not None else '?'} rows {d.note}"))
    if cfg.data.eval_fraction:
        rows.append(("eval data", f"{cfg.data.eval_fraction:.1%} of train, held out (seed {t.seed})"))
    global_batch = t.batch_size * t.grad_accum * plan.world_size
    if plan.world_size > 1 or plan.fsdp:
        rows.append(("processes", f"{plan.world_size}, " + ("FSDP: weights and adapter state sharded across them"
                                                             if plan.fsdp else "data parallel (DDP): a full copy each")))
    unit = 'packed rows' if cfg.data.packing else 'examples'
    if t.objective != "sft":
        unit = ("rows (+ a mismatched row each)" if t.objective == "kto" else "pairs (2 sequences each)") + \
            f" for {t.objective}"
    rows.append(("batch", f"{t.batch_size} per device × {t.grad_accum} accumulation × {plan.world_size} process(es) "
                          f"= {global_batch} {unit} of ≤ {cfg.data.max_length} tokens"))
    packs = cfg.data.packing and t.objective == "sft"  # preference items are never packed
    if plan.steps_per_epoch is not None:
        bound = "≤ " if packs else ""
        rows.append(("steps", f"{bound}{plan.steps_per_epoch} per epoch"
                              + (" (packing merges rows: fewer)" if packs else "")))
    if plan.total_steps is not None:
        why = "train.max_steps" if t.max_steps is not None else f"{t.epochs} epoch(s)"
        rows.append(("total steps", f"{'≤ ' if packs and t.max_steps is None else ''}"
                                    f"{plan.total_steps} ({why})"))
    if plan.memory:
        parts = ", ".join(f"{k} {v / GiB:.2f}" for k, v in plan.memory.items())
        rows.append(("memory (est.)", f"{sum(plan.memory.values()) / GiB:.2f} GiB per device = {parts} GiB"))
    rows.append(("output", cfg.output.dir))
    return rows


def _placement_rows(cfg: Config, m: ModelShape) -> list[tuple[str, str]]:
    """Per-module ranks, compactly (one line per projection and rank, with layer ranges), when they differ by
    module; under allocate: gradient, what the probe will do."""
    from lorafit.adapters.placement import compact_ranks

    a = cfg.adapter
    rows = []
    if a.allocate != "none":
        rows.append(("placement", f"{a.allocate} probe at train start: {a.allocate_batches} batches of data.train, "
                                  f"ranks 0-{4 * a.r} at the budget of uniform r={a.r} ({_num(m.adapter_params)}); "
                                  f"see them with lorafit probe CONFIG"))
    elif a.layers is not None or a.rank_pattern or a.alpha_pattern:
        rows += [("ranks" if i == 0 else "", line) for i, line in enumerate(compact_ranks(m.ranks))]
    return rows


def experts_quantization_note(bits: int, dtype: str, expert_weights: int, total: int) -> str:
    """What a 4/8-bit base does to fused MoE expert weights: nothing (bitsandbytes quantizes linear layers only)."""
    share = 100 * expert_weights / max(total, 1)
    size = expert_weights * DTYPE_BYTES[dtype] / GiB
    return (f"{bits}-bit quantizes linear layers only: the fused expert weights ({_num(expert_weights)}, {share:.0f}% "
            f"of the model) stay {dtype}, {size:.2f} GiB (counted so in the memory estimate)")


def _expert_rows(cfg: Config, m: ModelShape) -> list[tuple[str, str]]:
    """Plan rows for MoE models: which fused expert weights are adapted, and what quantization leaves of them."""
    if not m.expert_weights:
        return []
    if m.expert_targets:
        adapted = (f"{len(m.expert_targets)} fused weights × {m.experts} experts ({_targets_summary(m.expert_targets)}):"
                   f" {_num(m.expert_adapter_params)} trainable, a rank-{cfg.adapter.r} update per expert, no dropout")
    else:
        adapted = "not adapted (adapter.targets / adapter.exclude leave the fused expert weights out)"
    rows = [("experts", adapted)]
    q = cfg.model.quantization
    if q is not None:
        rows.append(("experts", experts_quantization_note(q.bits, cfg.model.dtype, m.expert_weights, m.total_params)))
    return rows


def experts_header_note(cfg: Config, model: Any) -> str | None:
    """The run header's line for a quantized MoE base (see `experts_quantization_note`), from the loaded model."""
    from lorafit.adapters import logical_numel
    from lorafit.adapters.targets import expert_parameters

    q = cfg.model.quantization
    weights = sum(getattr(m, name).numel() for _, m, name in expert_parameters(model)) if q is not None else 0
    if not weights:
        return None
    total = sum(logical_numel(p) for p in model.parameters())
    return "experts: " + experts_quantization_note(q.bits, cfg.model.dtype, weights, total)
