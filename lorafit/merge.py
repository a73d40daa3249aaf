"""`lorafit merge`: fold an adapter into its base model and save a plain Hugging Face model, verified.

The base is loaded in full precision and the merge is done in float32. A QLoRA adapter was trained against the
*quantized* base, so every layer bitsandbytes quantized in training first goes through the same quantize ->
dequantize round trip (`lora.quantize_roundtrip`): the merged model then computes what the trained model computed,
not what the adapter would do on weights it never saw. The delta itself (LoRA, rsLoRA, DoRA) comes from
`LoraLinear.merge`, the one merge formula in lorafit.

Verification, on a few fixed sample texts, against the adapter's own logits (adapter unmerged, on the same float32
weights; for QLoRA that is the adapter on the dequantized base, the exact math), in two steps:

1. the merged float32 model, before saving: this checks the merge itself, tightly;
2. the saved folder, reloaded from disk as users will load it: this checks what was written, with a limit set by the
   saved dtype, whose rounding of every weight moves the logits by itself.

For QLoRA the difference to the adapter on the real 4/8-bit base (bitsandbytes' kernels) is reported beside them:
on the CPU bitsandbytes repacks 4-bit weights and computes with bf16 block scales, a few 1e-3 from the exact math.
"""

from __future__ import annotations

import gc
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from lorafit.errors import DiskFullError, LorafitError, RunDirError, disk_full_reason
from lorafit.sources import LORAFIT_CONFIG, Source, is_chat_run, load_source_tokenizer, resolve_source

SAMPLE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "def add(a, b):\n    return a + b\n",
    "Question: what is 12 times 7? Answer: 84. Question: name a primary colour. Answer: red.",
)
SAMPLE_MAX_TOKENS = 64

# Max relative logit difference (see `max_relative_difference`) allowed vs the adapter. Measured on the tiny test
# Llama (LoRA, rsLoRA, DoRA, and QLoRA nf4/fp4/int8 against the exact dequantized math): the float32 merge ~7e-7
# (summation order only). Saved weights add their rounding (8 / 11 mantissa bits): bfloat16 4e-3..1.2e-2, float16
# 4e-4..1.4e-3, growing with the adapter's size and the model's depth, so those limits only catch a broken save
# (missing or misnamed tensors move the logits by ~1). QLoRA needs no looser limit: its reference uses the same
# round-tripped weights. The adapter on the real bitsandbytes base is only reported (measured 4e-3..1e-2).
MERGE_TOLERANCE = 1e-4
SAVED_TOLERANCE = {"float32": 1e-4, "bfloat16": 1e-1, "float16": 2e-2}
NOOP_EFFECT = 1e-7  # an adapter changing the logits less than this (relative) is treated as all zeros


class MergeVerificationError(LorafitError):
    """The saved merged model does not reproduce the adapter: a bug, not bad input, hence exit code 1."""

    exit_code = 1


@dataclass
class MergeReport:
    """What `merge_adapter` did and measured."""

    out: Path
    layers: int  # adapter layers folded in
    dtype: str
    max_rel_diff: float  # the float32 merge vs the adapter (on the dequantized base for QLoRA)
    saved_rel_diff: float  # the saved folder, reloaded, vs the same reference
    saved_tolerance: float
    adapter_effect: float  # adapter vs base: how much the adapter changes the logits
    kernel_rel_diff: float | None = None  # QLoRA: merged vs the adapter on the real bitsandbytes base


# ------------------------------------------------------------------------------------------------ checks


def max_relative_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """max |a - b| / max |b| over each pair of logit tensors, the largest over the pairs.

    Relative to the largest logit, not elementwise: logits near zero would make elementwise ratios meaningless.
    NaN anywhere gives NaN, which fails every tolerance check.
    """
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        x, y = x.double(), y.double()
        diff = ((x - y).abs().max() / y.abs().max().clamp_min(1e-12)).item()
        if diff != diff:  # NaN
            return float("nan")
        worst = max(worst, diff)
    return worst


def check_out_dir(out: Path, source: Path) -> None:
    """Refuse an output folder that is the input, lies inside it, or already holds files.

    Raises:
        RunDirError: with what to do instead.
    """
    out_abs, src_abs = out.resolve(), source.resolve()
    if out_abs == src_abs:
        raise RunDirError(f"--out {out}: is the input folder itself; give a new folder, e.g. --out {out}-merged")
    if src_abs in out_abs.parents:
        raise RunDirError(f"--out {out}: lies inside the input folder {source}; give a folder outside it")
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out}: is a file; give a new folder")
    if out.is_dir() and any(out.iterdir()):
        raise RunDirError(f"--out {out}: exists and is not empty; give a new folder (lorafit never overwrites one)")


# ------------------------------------------------------------------------------------------------ models


def sample_inputs(tokenizer) -> list[torch.Tensor]:
    """Token ids (1, T) of the fixed sample texts, at most SAMPLE_MAX_TOKENS each."""
    out = []
    for text in SAMPLE_TEXTS:
        ids = tokenizer(text)["input_ids"][:SAMPLE_MAX_TOKENS]
        if len(ids) >= 2:
            out.append(torch.tensor([ids], dtype=torch.long))
    return out


@torch.no_grad()
def logits_of(model, samples: list[torch.Tensor]) -> list[torch.Tensor]:
    """The model's float32 logits (1, T, V) for each sample, on the CPU."""
    device = next(model.parameters()).device
    return [model(input_ids=ids.to(device), use_cache=False).logits.float().cpu() for ids in samples]


def quantized_layer_names(source: Source, samples: list[torch.Tensor]) -> tuple[list[str], list[torch.Tensor]]:
    """Load the base as it was trained (4/8-bit) with the adapter: which layers bitsandbytes quantized, and the
    adapter's logits computed by bitsandbytes' kernels (reported beside the exact-math check).

    Loading the real quantized model, instead of guessing transformers' skip list, names exactly the layers whose
    weights the adapter saw quantized.
    """
    from lorafit.adapters import is_quantized
    from lorafit.adapters.peft_io import load_adapter
    from lorafit.model import load_model

    model = load_model(source.model)
    names = [n for n, m in model.named_modules() if is_quantized(m)]
    load_adapter(model, source.adapter_dir, dropout=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes warns once per 8-bit layer about casting inputs to fp16
        logits = logits_of(model, samples)
    del model
    gc.collect()
    return names, logits


@torch.no_grad()
def apply_quantization_roundtrip(model, names: list[str], quant, weight_dtype: torch.dtype,
                                 initial: dict[str, torch.Tensor] | None = None) -> None:
    """Replace each named layer's float32 weight by its quantize -> dequantize round trip.

    Args:
        model: the full-precision base.
        names: the layers bitsandbytes quantized in training.
        quant: the run's QuantizationConfig (bits, type, double_quant).
        weight_dtype: the dtype the base was loaded in before quantizing (model.dtype of the run).
        initial: PiSSA / OLoRA runs: {layer: s·B0 A0}; those layers trained on the round trip of W − s·B0 A0, and
            get it plus s·B0 A0, so the converted adapter on top is the trained model (`svd_init.residual_roundtrip`).
    """
    from lorafit.adapters import quantize_roundtrip
    from lorafit.adapters.svd_init import residual_roundtrip
    from lorafit.adapters.targets import is_conv1d

    def roundtrip(w: torch.Tensor) -> torch.Tensor:
        return quantize_roundtrip(w, quant.bits, quant.type, quant.double_quant)

    for name in names:
        layer = model.get_submodule(name)
        # bitsandbytes quantized a Conv1D's (in, out) weight transposed, as the (out, in) of the layer it became
        weight = layer.weight.T if is_conv1d(layer) else layer.weight
        part = (initial or {}).get(name)
        restored = roundtrip(weight.to(weight_dtype)) if part is None else \
            residual_roundtrip(weight.to(weight_dtype), part, roundtrip)
        weight.copy_(restored.float())


def load_full_precision_base(source: Source, quantized_names: list[str]):
    """The base in float32 on the CPU; QLoRA bases with their trained-on (round-tripped) weights."""
    from lorafit.model import load_model

    model = load_model(source.model.model_copy(update={"dtype": "float32", "quantization": None}), device_map="cpu")
    quant = source.quantization
    if quant is not None:
        apply_quantization_roundtrip(model, quantized_names, quant, getattr(torch, source.model.dtype),
                                     initial=_initial_parts(source))
    return model


def _initial_parts(source: Source) -> dict[str, torch.Tensor]:
    """A PiSSA / OLoRA run's {layer: s·B0 A0}, read off its converted adapter (`svd_init.initial_parts`); else {}."""
    from lorafit.adapters import lora_scale
    from lorafit.adapters.peft_io import _read_tensors
    from lorafit.adapters.svd_init import RESIDUAL_INITS, initial_parts

    a = source.config.adapter if source.config is not None else None
    if a is None or a.init not in RESIDUAL_INITS:
        return {}
    return initial_parts(_read_tensors(source.adapter_dir), a.r, lora_scale(a.r, a.alpha, a.rslora))


def fold_adapter(model) -> int:
    """Merge every LoRA layer into its base weight and put the plain layers back. Returns the layer count."""
    from lorafit.adapters import lora_layers, unwrap_lora
    from lorafit.adapters.tokens import unwrap_token_rows

    count = len(lora_layers(model))
    unwrap_lora(model, merge=True)
    unwrap_token_rows(model, merge=True)  # trained token rows written into the embedding / head
    return count


# ------------------------------------------------------------------------------------------------ saving


def save_merged(model, tokenizer, source: Source, folder: Path, dtype: str, max_shard_size: str | int) -> None:
    """Weights (safetensors, sharded), config, generation config, tokenizer and chat template into `folder`."""
    from lorafit.data import end_token_ids

    model.to(getattr(torch, dtype))
    vocab = model.get_input_embeddings().weight.shape[0]
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id < vocab:
        model.config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if is_chat_run(source):
        # A chat model must stop at the end of its turn, not only at EOS: plain `generate` reads this.
        template = source.config.data.chat_template
        model.generation_config.eos_token_id = sorted(end_token_ids(tokenizer, template, chat=True))
    model.save_pretrained(str(folder), max_shard_size=max_shard_size)
    tokenizer.save_pretrained(str(folder))
    if source.config is not None:  # generate reads the run's data format (chat / alpaca) from it
        (folder / LORAFIT_CONFIG).write_text(source.config.to_yaml())


def reload_logits(folder: Path, samples: list[torch.Tensor]) -> list[torch.Tensor]:
    """Logits of the saved model, loaded back the way users will load it, computed in float32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    model.eval()
    logits = logits_of(model, samples)
    del model
    gc.collect()
    return logits


# ------------------------------------------------------------------------------------------------ command


def saved_dtype(src: Source) -> str:
    """The dtype a merge saves by default: the run's model.dtype; for an adapter without lorafit's config, the dtype
    its base model's config.json records (float32 when it records none)."""
    if src.config is not None:
        return src.config.model.dtype
    from transformers import AutoConfig

    try:
        hf_config = AutoConfig.from_pretrained(src.model.path, revision=src.model.revision,
                                               trust_remote_code=src.model.trust_remote_code)
    except (OSError, ValueError, KeyError):
        return "float32"  # the base load below reports what is wrong with it
    dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    name = str(dtype).removeprefix("torch.") if dtype is not None else "float32"
    return name if name in SAVED_TOLERANCE else "float32"


def merge_adapter(source: Path, out: Path, dtype: str | None = None, max_shard_size: str | int = "5GB",
                  console=None) -> MergeReport:
    """Fold the adapter of a run (or adapter) folder into its base model and save the result in `out`.

    Args:
        source: a run directory or an adapter directory (lorafit or PEFT).
        out: a new (or empty) folder; written through a temporary folder beside it and renamed at the end.
        dtype: dtype of the saved weights: float32, bfloat16 or float16; default `saved_dtype` (the run's).
        max_shard_size: largest safetensors shard, as `save_pretrained` takes it.
        console: a rich Console for the report (default: stdout; warnings go to stderr).

    Returns:
        The report: layers merged and the measured logit differences.

    Raises:
        RunDirError: missing or unusable input, or an `out` that is the input, inside it, or not empty (exit 2).
        MergeVerificationError: the saved model does not reproduce the adapter (exit 1, nothing left in `out`).
    """
    from rich.console import Console

    console = console or Console(highlight=False)
    warn = Console(stderr=True, highlight=False)
    if dtype is not None and dtype not in SAVED_TOLERANCE:
        raise LorafitError(f"--dtype {dtype}: must be one of {', '.join(SAVED_TOLERANCE)}")
    source, out = Path(source), Path(out)
    src = resolve_source(source)
    check_out_dir(out, source)
    dtype = dtype or saved_dtype(src)
    tokenizer = load_source_tokenizer(src)
    samples = sample_inputs(tokenizer)
    names, kernel_logits = quantized_layer_names(src, samples) if src.quantization else ([], None)
    if src.config is not None and src.config.adapter.init in ("pissa", "olora"):
        kernel_logits = None  # the run's base was the quantized residual, not this ordinary load: nothing to compare

    console.print(f"merging {src.adapter_dir} into {src.model.path} (float32)")
    model = load_full_precision_base(src, names)
    layers, reference, diff, effect = fold_source_adapter(model, src, samples)
    if effect <= NOOP_EFFECT:
        warn.print("[yellow]warning:[/] the adapter does not change the model (all its lora_B weights are zero, e.g. "
                   "saved before any training step): the merged model equals the base model")
    report = MergeReport(out, layers, dtype, diff, float("nan"), SAVED_TOLERANCE[dtype], effect)
    _check(report.max_rel_diff, MERGE_TOLERANCE, "the merged float32 model", out)
    holder = [model]  # the write step takes the only reference, so the float32 model is freed before the reload
    del model
    merged = _write_and_verify(holder, tokenizer, src, out, report, samples, reference, max_shard_size)
    if kernel_logits is not None:
        report.kernel_rel_diff = max_relative_difference(merged, kernel_logits)
    _print_report(console, src, report)
    return report


def fold_source_adapter(model, src: Source, samples) -> tuple[list, list, float, float]:
    """Attach `src`'s adapter to `model` (its float32 base, grown first to what the adapter's token rows need) and
    fold it in: the one merge sequence `merge` and `export` share.

    Returns:
        (the folded layers, the adapter's logits on `samples`, the merged model's max relative difference from them,
        the adapter's effect: the same measure between the adapter's logits and the base's).
    """
    from lorafit.adapters.peft_io import grow_for_adapter, load_adapter

    grow_for_adapter(model, src.adapter_dir)  # a run that added tokens: the base grown to its tokenizer
    base_logits = logits_of(model, samples)
    load_adapter(model, src.adapter_dir, dropout=0.0)
    reference = logits_of(model, samples)
    layers = fold_adapter(model)
    diff = max_relative_difference(logits_of(model, samples), reference)
    return layers, reference, diff, max_relative_difference(reference, base_logits)


def _write_and_verify(holder: list, tokenizer, src: Source, out: Path, report: MergeReport, samples, reference,
                      max_shard_size) -> list[torch.Tensor]:
    """Save the model (taken out of `holder`) into a temporary folder beside `out`, check the saved copy against
    `reference`, and only then rename it into place (`write_dir_atomically`): a failed check leaves nothing.

    Returns:
        The saved model's logits on `samples`.
    """
    from lorafit.atomic import write_dir_atomically

    merged: list[torch.Tensor] = []
    size = sum(p.numel() for p in holder[0].parameters()) * torch.finfo(getattr(torch, report.dtype)).bits // 8

    def write(tmp: Path) -> None:
        save_merged(holder.pop(), tokenizer, src, tmp, report.dtype, max_shard_size)
        gc.collect()  # the in-memory model can be most of the memory; the check reloads the saved copy
        merged.extend(reload_logits(tmp, samples))
        report.saved_rel_diff = max_relative_difference(merged, reference)
        _check(report.saved_rel_diff, report.saved_tolerance, f"the saved {report.dtype} model", out)

    try:
        write_dir_atomically(out, write)  # an empty `out` is replaced too; a failed write leaves nothing
    except Exception as e:
        reason = disk_full_reason(e)
        if reason is None:
            raise
        raise DiskFullError(f"{reason} while writing the merged model to {out}; nothing half-written was kept: free "
                            f"space (the merged model needs about {size / 1024**3:.2f} GiB) and run the merge again") \
            from None
    return merged


def _check(diff: float, tolerance: float, what: str, out: Path) -> None:
    """Raise MergeVerificationError when `diff` is above `tolerance` (or NaN)."""
    if not diff <= tolerance:
        raise MergeVerificationError(
            f"merge verification failed: {what}'s logits differ from the adapter's by {diff:.3g} (max relative), "
            f"above the tolerance {tolerance:g}; nothing was written to {out}. If --dtype float32 fails too, this is "
            f"a lorafit bug: run again with --debug and report it")


def _print_report(console, src: Source, report: MergeReport) -> None:
    console.print(f"merged {report.layers} LoRA layers; saved {report.dtype} weights to {report.out}")
    what = "the adapter on the dequantized base (exact math)" if src.quantization else "the adapter"
    console.print(f"verified vs {what}: max relative logit difference {report.max_rel_diff:.2e} for the float32 "
                  f"merge (tolerance {MERGE_TOLERANCE:g}), {report.saved_rel_diff:.2e} for the saved {report.dtype} "
                  f"model (tolerance {report.saved_tolerance:g})")
    if report.kernel_rel_diff is not None:
        console.print(f"          {report.kernel_rel_diff:.2e} vs the adapter on the {src.quantization.bits}-bit "
                      f"base as trained (bitsandbytes kernels; differs from exact math by design)")
    console.print(f"the adapter changes the base model's logits by {report.adapter_effect:.2e} (max relative)")
    console.print(f"load it with AutoModelForCausalLM.from_pretrained({str(report.out)!r}) or "
                  f"lorafit generate {report.out} --prompt ...")


# ------------------------------------------------------------------------------------------ several sources


@dataclass
class CombineOptions:
    """How `combine_adapters` combines its sources (see `lorafit.combine`)."""

    weights: list[float] | None = None  # one per source; default 1 each
    how: str = "sum"  # sum | ties | dare | svd
    density: float = 0.5  # ties / dare: the share of each update kept
    rank: int | None = None  # svd, and ties / dare written --as-adapter: the rank of the result
    as_adapter: bool = False  # write one PEFT LoRA adapter instead of a merged model
    seed: int = 0  # dare's random drop


@dataclass
class CombineReport:
    """What `combine_adapters` did and measured."""

    out: Path
    sources: int
    layers: int  # modules any source adapts
    how: str
    rank: int | None  # the written adapter's rank (--as-adapter) or the truncation rank (svd)
    max_rel_diff: float  # the result vs its reference (see `combine_adapters`)
    exact: bool  # the result is the combination itself (sum, ties and dare merged), not a rank-R approximation
    svd_error: float = 0.0  # largest per-layer ||ΔW - BA||_F / ||ΔW||_F of the truncation
    saved_rel_diff: float | None = None  # merged model: the saved folder vs the in-memory merge


def check_combine_options(sources: list[Path], options: CombineOptions, dtype: str | None) -> list[float]:
    """Refuse contradictory options before anything loads. Returns the weights (default 1 per source).

    Raises:
        LorafitError: named option and what is allowed (exit 2).
    """
    from lorafit.combine import COMBINES

    how, n = options.how, len(sources)
    if how not in COMBINES:
        raise LorafitError(f"--combine {how}: must be one of {', '.join(COMBINES)}")
    weights = options.weights if options.weights is not None else [1.0] * n
    if len(weights) != n:
        raise LorafitError(f"--weights: {len(weights)} weight(s) for {n} source(s); give one weight per source, "
                           f"in the order of the sources")
    if how in ("ties", "dare") and not 0 < options.density <= 1:
        raise LorafitError(f"--density {options.density:g}: must be in (0, 1] (the share of each update kept)")
    if options.rank is not None and options.rank < 1:
        raise LorafitError(f"--rank {options.rank}: must be >= 1")
    if how == "svd" and options.rank is None:
        raise LorafitError("--combine svd: needs --rank R (the rank of the truncated SVD)")
    if options.as_adapter and how != "sum" and options.rank is None:
        raise LorafitError(f"--combine {how} --as-adapter: needs --rank R (the combined update is written as its "
                           f"rank-R truncated SVD; only sum is exact by concatenation)")
    if options.as_adapter and dtype is not None:
        raise LorafitError("--dtype: applies to a merged model; --as-adapter writes float32 adapter tensors")
    if len({s.resolve() for s in sources}) != n:
        raise LorafitError("SOURCE: the same folder is given twice; give each source once (use --weights to "
                           "weigh one more)")
    return list(weights)


def _base_key(src: Source) -> tuple:
    model = src.model
    path = Path(model.path).expanduser()
    where = str(path.resolve()) if path.exists() else model.path
    quant = src.quantization.model_dump() if src.quantization is not None else None
    return where, model.revision, quant, model.dtype if quant else None


def _describe_base(src: Source) -> str:
    q = src.quantization
    bits = f"{q.bits}-bit{' ' + q.type if q.bits == 4 else ''}" if q is not None else "full precision"
    return f"{src.path} (base {src.model.path}, {bits})"


def check_same_base(srcs: list[Source]) -> None:
    """Refuse sources trained on different bases (path, revision, quantization), naming the two that differ.

    Architecture and shapes follow from the path; an adapter whose tensors do not fit is refused when it loads.
    """
    first = srcs[0]
    for other in srcs[1:]:
        if _base_key(other) != _base_key(first):
            raise RunDirError(f"the sources do not share one base: {_describe_base(first)} vs "
                              f"{_describe_base(other)}; combine adapters trained on the same base model")


@torch.no_grad()
def effective_delta(layer) -> torch.Tensor:
    """What merging `layer` adds to its (full-precision) base weight, float32 (out, in): s·BA for LoRA, W' - W for
    DoRA and any method whose merged weight is not W + delta(). The base weight is restored bit-exactly."""
    weight = layer.base_layer.weight
    before = weight.detach().clone()
    layer.merge()
    delta = weight.float() - before.float()
    layer.unmerge()
    weight.copy_(before)
    return delta


def detach_adapter_layers(model) -> dict:
    """Remove the model's adapter layers without merging them (the base layers go back) and return them: each
    still wraps the model's own base layer, so several adapters can be held on one loaded base."""
    from lorafit.adapters import lora_layers

    layers = lora_layers(model)
    for name, layer in layers.items():
        model.set_submodule(name, layer.base_layer)
    return layers


class _Combined(torch.nn.Module):
    """A reference layer for checks: base(x) + Σ wᵢ·(adapterᵢ(x) - base(x)) through each adapter's own forward
    (sum), or base(x) + x ΔWᵀ for a given dense update (ties, dare)."""

    def __init__(self, base_layer, parts: list, weights: list[float], delta: torch.Tensor | None = None):
        super().__init__()
        self.base_layer, self.parts, self.weights, self.dense = base_layer, parts, weights, delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer(x)
        if self.dense is not None:
            return base + torch.nn.functional.linear(x.float(), self.dense).to(base.dtype)
        return base + sum(w * (layer(x) - base) for layer, w in zip(self.parts, self.weights, strict=True))


def _reference_logits(model, per_source: list[dict], weights, dense: dict | None, samples) -> list[torch.Tensor]:
    names = dict.fromkeys(n for layers in per_source for n in layers)
    for name in names:
        parts = [(layers[name], w) for layers, w in zip(per_source, weights, strict=True) if name in layers]
        base_layer = parts[0][0].base_layer
        wrapper = _Combined(base_layer, [p[0] for p in parts], [p[1] for p in parts],
                            None if dense is None else dense[name])
        model.set_submodule(name, wrapper)
    try:
        return logits_of(model, samples)
    finally:
        for name in names:
            model.set_submodule(name, model.get_submodule(name).base_layer)


def _is_plain_lora(layer) -> bool:
    from lorafit.adapters import LoraLinear

    return type(layer) is LoraLinear and not layer.dora


def combine_adapters(sources: list[Path], out: Path, options: CombineOptions, dtype: str | None = None,
                     max_shard_size: str | int = "5GB", console=None) -> CombineReport:
    """Combine several adapters of one base into a merged model, or (`options.as_adapter`) into one LoRA adapter.

    The base is loaded once in float32 (QLoRA: with the quantize -> dequantize round trip of its training); every
    source's adapter layers are held on it together, each one's dense update ΔWᵢ is what merging it would add, and
    each layer's updates are combined by `lorafit.combine`. Checked on the merge sample texts' logits:

    - sum: against base + Σ wᵢ·(adapterᵢ(x) - base(x)), each adapter running its own forward (the formula, not the
      dense updates), within MERGE_TOLERANCE;
    - ties / dare: against the base with the combined dense update applied in the forward, within MERGE_TOLERANCE;
    - svd and --as-adapter ties / dare: the rank-R result is an approximation; its difference to the full
      combination is reported with each layer's SVD error.

    Raises:
        LorafitError / RunDirError: bad options, different bases, unusable sources (exit 2; nothing written).
        MergeVerificationError: an exact result does not reproduce its reference (exit 1; nothing written).
    """
    from rich.console import Console

    from lorafit.adapters.peft_io import load_adapter

    console = console or Console(highlight=False)
    sources, out = [Path(s) for s in sources], Path(out)
    weights = check_combine_options(sources, options, dtype)
    srcs = [resolve_source(s) for s in sources]
    check_same_base(srcs)
    for s in sources:
        check_out_dir(out, s)
    first = srcs[0]
    dtype = None if options.as_adapter else (dtype or saved_dtype(first))
    tokenizer = load_source_tokenizer(first)
    samples = sample_inputs(tokenizer)
    names = quantized_layer_names(first, samples)[0] if first.quantization else []
    console.print(f"combining {len(srcs)} adapters ({options.how}, weights "
                  f"{', '.join(f'{w:g}' for w in weights)}) on {first.model.path} (float32)")
    model = load_full_precision_base(first, names)
    per_source = []
    for src in srcs:
        load_adapter(model, src.adapter_dir, dropout=0.0)
        per_source.append(detach_adapter_layers(model))
    if options.as_adapter and options.how == "sum":
        _check_concatenable(srcs, per_source)
    dense = _combined_updates(per_source, weights, options)
    exact_dense = None if options.how == "sum" else dense
    reference = _reference_logits(model, per_source, weights, exact_dense, samples)
    result = _lowrank_result(per_source, weights, dense, options)
    if options.as_adapter:
        report = _write_adapter(model, first, tokenizer, result, out, samples, reference, options)
    else:
        report = _write_model(model, first, tokenizer, dense, result, out, samples, reference, options, dtype,
                              max_shard_size)
    report.sources = len(srcs)
    _print_combine_report(console, report, weights)
    return report


def _check_concatenable(srcs: list[Source], per_source: list[dict]) -> None:
    for src, layers in zip(srcs, per_source, strict=True):
        odd = next((layer for layer in layers.values() if not _is_plain_lora(layer)), None)
        if odd is not None:
            kind = "DoRA" if getattr(odd, "dora", False) else odd.method or type(odd).__name__
            raise LorafitError(f"{src.path}: a {kind} adapter; --as-adapter with --combine sum concatenates LoRA "
                               f"factors, exact only for plain LoRA: use --combine svd --rank R (a rank-R "
                               f"approximation) or merge into a model (no --as-adapter)")


def _combined_updates(per_source: list[dict], weights: list[float], options: CombineOptions) -> dict:
    """{module: combined dense update (out, in), float32} over every module any source adapts."""
    from lorafit.combine import combine_deltas

    generator = torch.Generator().manual_seed(options.seed)
    out = {}
    for name in dict.fromkeys(n for layers in per_source for n in layers):
        have = [(layers[name], w) for layers, w in zip(per_source, weights, strict=True) if name in layers]
        deltas = [effective_delta(layer) for layer, _ in have]
        out[name] = combine_deltas(deltas, [w for _, w in have], options.how, options.density, generator)
    return out


def _lowrank_result(per_source: list[dict], weights: list[float], dense: dict, options: CombineOptions):
    """{module: LowRank} when the result is factored (--as-adapter, or svd), else None (the dense updates)."""
    from lorafit.combine import concat_lora, truncated_svd

    if options.as_adapter and options.how == "sum":
        parts = {name: [(layers[name].lora_A.weight, layers[name].lora_B.weight, w * layers[name].scale)
                        for layers, w in zip(per_source, weights, strict=True) if name in layers] for name in dense}
        rank = max(sum(p[0].shape[0] for p in ps) for ps in parts.values())
        return {name: concat_lora(ps, rank) for name, ps in parts.items()}
    if options.how == "svd" or options.as_adapter:
        return {name: truncated_svd(delta, options.rank) for name, delta in dense.items()}
    return None


@torch.no_grad()
def _write_model(model, src: Source, tokenizer, dense: dict, result, out: Path, samples, reference, options,
                 dtype: str, max_shard_size) -> CombineReport:
    """Fold the combined updates (or their rank-R form) into the base, check, save, check the saved copy."""
    for name, delta in dense.items():
        update = delta if result is None else result[name].lora_b @ result[name].lora_a  # (out, in)
        weight = model.get_submodule(name).weight
        weight.copy_((weight.float() + update).to(weight.dtype))
    merged = logits_of(model, samples)
    report = CombineReport(out, 0, len(dense), options.how, options.rank if result else None,
                           max_relative_difference(merged, reference), result is None,
                           max((r.error for r in result.values()), default=0.0) if result else 0.0)
    if report.exact:
        _check(report.max_rel_diff, MERGE_TOLERANCE, "the combined float32 model", out)
    single = MergeReport(out, len(dense), dtype, 0.0, float("nan"), SAVED_TOLERANCE[dtype], 0.0)
    holder = [model]
    del model
    _write_and_verify(holder, tokenizer, src, out, single, samples, merged, max_shard_size)
    report.saved_rel_diff = single.saved_rel_diff
    return report


def _write_adapter(model, src: Source, tokenizer, result: dict, out: Path, samples, reference,
                   options: CombineOptions) -> CombineReport:
    """Write `result` as one PEFT LoRA adapter (scale 1: lora_alpha = r), reload it onto the base and check it."""
    from lorafit.adapters import wrap_module
    from lorafit.adapters.peft_io import load_adapter, read_adapter_config, save_adapter
    from lorafit.atomic import write_dir_atomically

    rank = next(iter(result.values())).lora_a.shape[0]
    for name, low in result.items():
        layer = wrap_module(model, name, r=rank, alpha=float(rank), dropout=0.0)
        with torch.no_grad():
            layer.lora_A.weight.copy_(low.lora_a)
            layer.lora_B.weight.copy_(low.lora_b)
    base_name = read_adapter_config(src.adapter_dir).get("base_model_name_or_path") or src.model.path
    extra = {}
    if src.config is not None:
        adapter = src.config.adapter.model_copy(update={"method": "lora", "init": "default", "r": rank,
                                                        "alpha": float(rank), "rslora": False})
        extra[LORAFIT_CONFIG] = src.config.model_copy(update={"adapter": adapter}).to_yaml()
    exact = options.how == "sum"
    report = CombineReport(out, 0, len(result), options.how, rank, float("nan"), exact,
                           max(r.error for r in result.values()))

    def write(tmp: Path) -> None:
        save_adapter(model, tmp, base_model_name_or_path=base_name, r=rank, alpha=float(rank), dropout=0.0,
                     targets=sorted({n.rpartition(".")[2] for n in result}), tokenizer=tokenizer, extra_files=extra)
        detach_adapter_layers(model)
        load_adapter(model, tmp, dropout=0.0)  # the written files, as users will load them
        report.max_rel_diff = max_relative_difference(logits_of(model, samples), reference)
        if exact:
            _check(report.max_rel_diff, MERGE_TOLERANCE, "the combined adapter", out)

    try:
        write_dir_atomically(out, write)
    except Exception as e:
        reason = disk_full_reason(e)
        if reason is None:
            raise
        raise DiskFullError(f"{reason} while writing the combined adapter to {out}; nothing half-written was kept: "
                            f"free space and run the merge again") from None
    return report


def _print_combine_report(console, report: CombineReport, weights: list[float]) -> None:
    what = "one LoRA adapter" if report.saved_rel_diff is None else "a merged model"
    console.print(f"combined {report.sources} adapters ({report.how}) over {report.layers} layers into {what}: "
                  f"{report.out}")
    if report.exact:
        console.print(f"verified: max relative logit difference {report.max_rel_diff:.2e} vs base + Σ wᵢ·ΔWᵢ "
                      f"(tolerance {MERGE_TOLERANCE:g})" if report.how == "sum" else
                      f"verified: max relative logit difference {report.max_rel_diff:.2e} vs the base with the "
                      f"combined {report.how} update (tolerance {MERGE_TOLERANCE:g})")
    else:
        console.print(f"rank-{report.rank} truncated SVD: largest per-layer error ||ΔW - BA||/||ΔW|| "
                      f"{report.svd_error:.2e}; max relative logit difference {report.max_rel_diff:.2e} vs the "
                      f"full {report.how if report.how != 'svd' else 'sum'} combination")
    if report.saved_rel_diff is not None:
        console.print(f"saved copy reloaded: max relative logit difference {report.saved_rel_diff:.2e} vs the "
                      f"in-memory merge")
    if report.saved_rel_diff is None:
        console.print(f"use it as any adapter: lorafit generate {report.out} --prompt ...; vLLM: --enable-lora "
                      f"--lora-modules combined={report.out}")
