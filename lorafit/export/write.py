"""Tensor types and the GGUF file itself.

The dtype rules are llama.cpp's converter's: 1-D tensors (norms, biases, rope factors) stay f32 whatever the file
type; 2-D tensors take the chosen type. q8_0 packs blocks of 32 values along a row; a tensor whose row width is not
a multiple of 32 cannot be packed and is written in f16 instead (what llama.cpp's convert_hf_to_gguf.py does when
`gguf.quants` refuses it); the report names each such tensor.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

QTYPE_NAMES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}
FILE_TYPE_NAMES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


def file_type(dtype: str) -> int:
    """general.file_type for a --dtype."""
    import gguf

    return int(getattr(gguf.LlamaFileType, FILE_TYPE_NAMES[dtype]))


def new_writer(path, gguf_arch: str, name: str):
    """A GGUFWriter for `path` and llama.cpp's architecture `gguf_arch`, with general.name set."""
    import gguf

    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, gguf_arch)])
    writer.add_name(name)
    return writer


def plan(shape: tuple[int, ...], dtype: str):
    """(GGMLQuantizationType, kept_in_f16) of a tensor of `shape` in a `dtype` file."""
    import gguf

    if len(shape) <= 1 or dtype == "f32":
        return gguf.GGMLQuantizationType.F32, False
    qtype = getattr(gguf.GGMLQuantizationType, QTYPE_NAMES[dtype])
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    if shape[-1] % block:  # what gguf.quants refuses; llama.cpp's converter then writes f16
        return gguf.GGMLQuantizationType.F16, True
    return qtype, False


def write_file(writer, tensors: list[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]], dtype: str,
               console) -> list[str]:
    """Write the file: metadata, then each (name, shape, load) tensor converted to `dtype` and written in turn
    (one converted tensor in memory at a time), with a progress bar.

    Returns:
        The names of the tensors kept in f16 (q8_0 only).
    """
    import gguf
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    plans = [plan(shape, dtype) for _, shape, _ in tensors]
    for (name, shape, _), (qtype, _) in zip(tensors, plans):
        nbytes = int(np.prod(gguf.quant_shape_to_byte_shape(shape, qtype)))
        writer.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=not console.is_terminal) as progress:
        task = progress.add_task(f"writing GGUF ({dtype})", total=len(tensors))
        for (_, _, load), (qtype, _) in zip(tensors, plans):
            writer.write_tensor_data(gguf.quants.quantize(load(), qtype))
            progress.advance(task)
    writer.close()
    return [name for (name, _, _), (_, kept) in zip(tensors, plans) if kept]
