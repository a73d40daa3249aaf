"""`lorafit export`: a run, adapter or model as GGUF for llama.cpp, Ollama and LM Studio.

    arch.py       llama.cpp's name and hyperparameters for a transformers config; q/k row order; tensor names
                  (from the gguf package's own map)
    vocab.py      the tokenizer as GGUF metadata; the pre-tokenizer type read off tokenizer.json
    lora.py       an adapter alone as llama.cpp's LoRA GGUF (`--format gguf-lora`)
    modelfile.py  the Ollama Modelfile written beside the model
    write.py      tensor dtypes (f32 / f16 / bf16 / q8_0), the file written atomically with a progress bar

`--format gguf` writes the merged model: a run or adapter is merged on the fly exactly as `lorafit merge` merges it
(float32, a QLoRA adapter onto the dequantized base it trained on, checked against the adapter's own logits), then
converted tensor by tensor. Nothing half-written is left: the files are written into a temporary folder beside
`--out`, renamed into place at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lorafit.errors import LorafitError, RunDirError

FORMATS = ("gguf", "gguf-lora")
DTYPES = ("f32", "f16", "bf16", "q8_0")
DEFAULT_DTYPE = "f16"  # as llama.cpp's converters


@dataclass
class ExportReport:
    """What `export` wrote."""

    file: Path
    size: int  # bytes
    dtype: str
    fmt: str
    kept_f16: list[str] = field(default_factory=list)  # q8_0: tensors whose width is not a multiple of 32
    merge_rel_diff: float | None = None  # the in-memory merge vs the adapter (max relative logit difference)
    modelfile: Path | None = None


def export(source: Path, out: Path, fmt: str = "gguf", dtype: str = DEFAULT_DTYPE, console=None) -> ExportReport:
    """Export `source` (a run, adapter or model folder) into the new folder `out`.

    Args:
        source: a run directory, an adapter directory (lorafit or PEFT) or a Hugging Face model directory.
        out: a new (or empty) folder for the .gguf file (and, for `gguf`, the Ollama Modelfile).
        fmt: "gguf" (the merged model) or "gguf-lora" (the adapter alone, for llama.cpp's --lora).
        dtype: the tensors' type: f32, f16, bf16 or q8_0 (1-D tensors and norms stay f32, as llama.cpp does).
        console: a rich Console for progress and the closing line (default: stdout).

    Returns:
        The report.

    Raises:
        LorafitError / RunDirError: bad arguments or input, unsupported architecture / tokenizer / method (exit 2).
    """
    from rich.console import Console

    from lorafit.merge import check_out_dir
    from lorafit.sources import resolve_source

    console = console or Console(highlight=False)
    if fmt not in FORMATS:
        raise LorafitError(f"--format {fmt}: must be one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise LorafitError(f"--dtype {dtype}: must be one of {', '.join(DTYPES)}")
    source, out = Path(source), Path(out)
    src = resolve_source(source, allow_model=fmt == "gguf")
    check_out_dir(out, source)
    if fmt == "gguf-lora":
        from lorafit.export.lora import export_lora

        report = export_lora(src, out, dtype, console)
    else:
        report = export_merged(src, out, dtype, console)
    print_report(console, report)
    return report


def base_config(src):
    """The transformers config of the source's base model, read before any weights load."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(src.model.path, revision=src.model.revision,
                                          trust_remote_code=src.model.trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise RunDirError(f"{src.model.path}: cannot read the base model's config ({e})") from None


def export_merged(src, out: Path, dtype: str, console) -> ExportReport:
    """The merged model as one GGUF file plus an Ollama Modelfile in `out`."""
    from lorafit.atomic import write_dir_atomically
    from lorafit.export.arch import architecture, gguf_tensors, write_hparams
    from lorafit.export.modelfile import modelfile_text
    from lorafit.export.vocab import build_vocab, write_vocab
    from lorafit.export.write import file_type, new_writer, write_file
    from lorafit.sources import load_source_tokenizer

    arch = architecture(base_config(src))  # refuse before loading any weights
    tokenizer = load_source_tokenizer(src)
    stops = stop_tokens(src, tokenizer)
    model, merge_diff = merged_model(src, tokenizer, console)
    config = model.config
    vocab = build_vocab(tokenizer, model.get_input_embeddings().weight.shape[0], stops, tokenizer.chat_template)
    name = f"{out.name}-{dtype}.gguf"
    report = ExportReport(out / name, 0, dtype, "gguf", merge_rel_diff=merge_diff, modelfile=out / "Modelfile")

    def write(tmp: Path) -> None:
        writer = new_writer(tmp / name, arch.gguf_arch, out.name)
        rope_freqs = write_hparams(writer, config, file_type(dtype), len(vocab.tokens))
        write_vocab(writer, vocab)
        tensors = gguf_tensors(model.state_dict(), config, arch)
        if rope_freqs is not None:
            tensors.append(("rope_freqs.weight", rope_freqs.shape, lambda: rope_freqs))
        report.kept_f16 = write_file(writer, tensors, dtype, console)
        (tmp / "Modelfile").write_text(modelfile_text(name, src, tokenizer, stops))
        report.size = (tmp / name).stat().st_size

    write_dir_atomically(out, write)
    return report


def stop_tokens(src, tokenizer) -> list[int]:
    """Where answers end: EOS, plus the end-of-turn tokens of the chat template for chat runs and for models and
    PEFT adapters that carry a chat template (lorafit's alpaca / completion runs were trained to stop at EOS)."""
    from lorafit.data import end_token_ids
    from lorafit.sources import stop_token_ids

    if src.config is not None:
        return stop_token_ids(tokenizer, src)
    return sorted(end_token_ids(tokenizer, None, chat=bool(tokenizer.chat_template)))


def merged_model(src, tokenizer, console):
    """The float32 model to export, on the CPU: the base with the adapter folded in (as `lorafit merge` does it),
    or a model folder as it is. Returns (model, the merge's max relative logit difference vs the adapter or None).

    Raises:
        MergeVerificationError: the merged model does not reproduce the adapter (a bug, exit 1).
    """
    from lorafit.merge import (
        MERGE_TOLERANCE,
        MergeVerificationError,
        fold_source_adapter,
        load_full_precision_base,
        quantized_layer_names,
        sample_inputs,
    )
    from lorafit.model import align_model_with_tokenizer

    if src.adapter_dir is None:
        return load_full_precision_base(src, []), None
    samples = sample_inputs(tokenizer)
    names = quantized_layer_names(src, samples)[0] if src.quantization else []
    console.print(f"merging {src.adapter_dir} into {src.model.path} (float32)")
    model = load_full_precision_base(src, names)
    align_model_with_tokenizer(model, tokenizer)  # the GGUF's vocabulary is the tokenizer's: rows for all of it
    diff = fold_source_adapter(model, src, samples)[2]
    if not diff <= MERGE_TOLERANCE:
        raise MergeVerificationError(f"export: the merged model's logits differ from the adapter's by {diff:.3g} "
                                     f"(max relative), above {MERGE_TOLERANCE:g}; nothing was written. This is a "
                                     f"lorafit bug: run again with --debug and report it")
    return model, diff


def human_size(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"


def print_report(console, report: ExportReport) -> None:
    """The notes, then one closing line: file, size, dtype, and the command that runs it."""
    if report.kept_f16:
        console.print(f"note: {len(report.kept_f16)} tensor(s) kept in f16, their width not a multiple of q8_0's "
                      f"32-value block (as llama.cpp's converter does): {', '.join(report.kept_f16)}")
    if report.merge_rel_diff is not None:
        console.print(f"merged and checked: max relative logit difference {report.merge_rel_diff:.2e} vs the adapter")
    if report.fmt == "gguf":
        run = (f"llama-cli -m {report.file} -cnv  (Ollama: ollama create NAME -f {report.modelfile})")
    else:
        run = f"llama-cli -m BASE.gguf --lora {report.file}"
    console.print(f"wrote {report.file} ({human_size(report.size)}, {report.dtype}); run it: {run}", soft_wrap=True)
