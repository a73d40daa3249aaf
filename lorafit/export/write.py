"""Tensor types and the GGUF file itself.

The dtype rules are llama.cpp's converter's: 1-D tensors (norms, biases, rope factors) stay f32 whatever the file
type; 2-D tensors take the chosen type. q8_0 packs blocks of 32 values along a row; a tensor whose row width is not
a multiple of 32 cannot be packed and is written in f16 instead (what llama.cpp's convert_hf_to_gguf.py does when
`gguf.quants` refuses it); the report names each such tensor.
"""

from __future__ import annotations

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


def convert(data: np.ndarray, dtype: str):
    """(array, GGMLQuantizationType, fell_back_to_f16) for one float32 tensor."""
    import gguf

    if data.ndim <= 1 or dtype == "f32":
        return data.astype(np.float32, copy=False), gguf.GGMLQuantizationType.F32, False
    qtype = getattr(gguf.GGMLQuantizationType, QTYPE_NAMES[dtype])
    try:
        return gguf.quants.quantize(data, qtype), qtype, False
    except gguf.QuantError:
        return data.astype(np.float16), gguf.GGMLQuantizationType.F16, True


def write_file(writer, tensors: list[tuple[str, np.ndarray]], dtype: str, console) -> list[str]:
    """Convert each (name, float32 array) to `dtype`, add it, and write the whole file, with a progress bar.

    Returns:
        The names of the tensors kept in f16 (q8_0 only).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    kept = []
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=not console.is_terminal) as progress:
        task = progress.add_task(f"writing GGUF ({dtype})", total=len(tensors) + 1)
        for name, data in tensors:
            array, qtype, fell_back = convert(data, dtype)
            if fell_back:
                kept.append(name)
            writer.add_tensor(name, array, raw_dtype=qtype)
            progress.advance(task)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        progress.advance(task)
    return kept
