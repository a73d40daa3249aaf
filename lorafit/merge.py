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
    from lorafit.checkpoint import load_adapter
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
def apply_quantization_roundtrip(model, names: list[str], quant, weight_dtype: torch.dtype) -> None:
    """Replace each named layer's float32 weight by its quantize -> dequantize round trip.

    Args:
        model: the full-precision base.
        names: the layers bitsandbytes quantized in training.
        quant: the run's QuantizationConfig (bits, type, double_quant).
        weight_dtype: the dtype the base was loaded in before quantizing (model.dtype of the run).
    """
    from lorafit.adapters import quantize_roundtrip

    for name in names:
        weight = model.get_submodule(name).weight
        restored = quantize_roundtrip(weight.to(weight_dtype), quant.bits, quant.type, quant.double_quant)
        weight.copy_(restored.float())


def load_full_precision_base(source: Source, quantized_names: list[str]):
    """The base in float32 on the CPU; QLoRA bases with their trained-on (round-tripped) weights."""
    from lorafit.model import load_model

    model = load_model(source.model.model_copy(update={"dtype": "float32", "quantization": None}), device_map="cpu")
    quant = source.quantization
    if quant is not None:
        apply_quantization_roundtrip(model, quantized_names, quant, getattr(torch, source.model.dtype))
    return model


def fold_adapter(model) -> int:
    """Merge every LoRA layer into its base weight and put the plain layers back. Returns the layer count."""
    from lorafit.adapters import lora_layers, unwrap_lora

    count = len(lora_layers(model))
    unwrap_lora(model, merge=True)
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

    from lorafit.checkpoint import load_adapter

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

    console.print(f"merging {src.adapter_dir} into {src.model.path} (float32)")
    model = load_full_precision_base(src, names)
    base_logits = logits_of(model, samples)
    load_adapter(model, src.adapter_dir, dropout=0.0)
    reference = logits_of(model, samples)
    effect = max_relative_difference(reference, base_logits)
    if effect <= NOOP_EFFECT:
        warn.print("[yellow]warning:[/] the adapter does not change the model (all its lora_B weights are zero, e.g. "
                   "saved before any training step): the merged model equals the base model")
    layers = fold_adapter(model)
    report = MergeReport(out, layers, dtype, max_relative_difference(logits_of(model, samples), reference),
                         float("nan"), SAVED_TOLERANCE[dtype], effect)
    _check(report.max_rel_diff, MERGE_TOLERANCE, "the merged float32 model", out)
    holder = [model]  # the write step takes the only reference, so the float32 model is freed before the reload
    del model
    merged = _write_and_verify(holder, tokenizer, src, out, report, samples, reference, max_shard_size)
    if kernel_logits is not None:
        report.kernel_rel_diff = max_relative_difference(merged, kernel_logits)
    _print_report(console, src, report)
    return report


def _write_and_verify(holder: list, tokenizer, src: Source, out: Path, report: MergeReport, samples, reference,
                      max_shard_size) -> list[torch.Tensor]:
    """Save the model (taken out of `holder`) into a temporary folder beside `out`, check the saved copy against
    `reference`, and only then rename it into place (`write_dir_atomically`): a failed check leaves nothing.

    Returns:
        The saved model's logits on `samples`.
    """
    from lorafit.checkpoint import write_dir_atomically

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
