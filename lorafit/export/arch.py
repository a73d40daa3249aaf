"""What llama.cpp needs to know about a model's architecture: its GGUF name, hyperparameters, tensor names, and the
row order of q/k for the llama family.

Tensor names come from the `gguf` package's own map (`gguf.get_tensor_name_map`), written by llama.cpp's authors
for every architecture they support; lorafit keeps no table of its own. What lorafit decides is only which Hugging
Face `model_type`s it has verified against llama.cpp (`ARCHITECTURES`).

Rotary embeddings: Hugging Face's Llama applies the rotation to the two halves of each head (`rotate_half`);
llama.cpp's llama architecture rotates adjacent pairs. Both compute the same attention once the rows of q_proj and
k_proj are reordered so that row pairs (i, i + d/2) become neighbours (`permute_qk`). Qwen2 / Qwen3 run with
llama.cpp's NeoX-style rotation, which is the halves form: no reordering.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np

from lorafit.errors import LorafitError


@dataclass(frozen=True)
class Architecture:
    """One Hugging Face model_type as llama.cpp runs it."""

    gguf_arch: str  # gguf.MODEL_ARCH member name
    permute_qk: bool  # llama family: q/k rows reordered from HF's halves to llama.cpp's adjacent pairs


# Verified end to end against llama.cpp (tests/test_export.py); mistral runs as llama.cpp's llama (its converter
# registers MistralForCausalLM there too; llama.cpp's llama has no sliding window, as in that converter).
ARCHITECTURES = {
    "llama": Architecture("LLAMA", permute_qk=True),
    "mistral": Architecture("LLAMA", permute_qk=True),
    "qwen2": Architecture("QWEN2", permute_qk=False),
    "qwen3": Architecture("QWEN3", permute_qk=False),
}


def architecture(config) -> Architecture:
    """The llama.cpp architecture of a transformers config.

    Raises:
        LorafitError: the model_type is not one lorafit exports, naming the supported ones.
    """
    kind = getattr(config, "model_type", None)
    if kind not in ARCHITECTURES:
        raise LorafitError(f"export: model type {kind!r} is not supported for GGUF; supported: "
                           f"{', '.join(ARCHITECTURES)} (merge it with lorafit merge and convert it with llama.cpp's "
                           f"convert_hf_to_gguf.py, if llama.cpp supports it)")
    if getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None):
        raise LorafitError(f"export: mixture-of-experts {kind} models are not supported for GGUF; supported: dense "
                           f"{', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[kind]


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def permute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of a q or k projection (n_head·d, in) (or its bias (n_head·d,)) from HF's rotate-half order to
    llama.cpp's adjacent-pair order: within each head, row i and row i + d/2 become rows 2i and 2i + 1."""
    shape = weight.shape
    # (n_head, 2, d/2, ...) -> (n_head, d/2, 2, ...): the two halves interleaved
    return weight.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def rope_parameters(config) -> dict:
    """transformers 5 keeps rope_theta and the scaling in `rope_parameters`; older configs in rope_theta /
    rope_scaling."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None)
    if isinstance(scaling, dict):
        params = {**scaling, **params}
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def write_hparams(writer, config, file_type: int, vocab_size: int) -> np.ndarray | None:
    """Architecture metadata into `writer`. Returns the rope_freqs tensor for llama3-style rope scaling, else None.

    Raises:
        LorafitError: a rope scaling llama.cpp's converter does not write (named, with the supported ones).
    """
    import gguf

    dim = head_dim(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_key_length(dim)
    writer.add_value_length(dim)
    writer.add_rope_dimension_count(dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(vocab_size)
    writer.add_file_type(file_type)
    rope = rope_parameters(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    kind = rope["rope_type"]
    if kind == "default":
        return None
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        return None
    if kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
        return None
    if kind == "llama3":
        return llama3_rope_factors(rope, dim)
    raise LorafitError(f"export: rope scaling {kind!r} is not supported for GGUF; supported: default, linear, yarn, "
                       f"llama3")


def llama3_rope_factors(rope: dict, dim: int) -> np.ndarray:
    """Llama 3.1's frequency-dependent rope scaling as llama.cpp's rope_freqs tensor: the divisor of each of the
    d/2 rotation frequencies (1 for short wavelengths, `factor` for long ones, a smooth blend between)."""
    factor, low, high = float(rope["factor"]), float(rope.get("low_freq_factor", 1.0)), \
        float(rope.get("high_freq_factor", 4.0))
    old_context = float(rope.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (float(rope["rope_theta"]) ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            out.append(1.0)
        elif wavelen > old_context / low:
            out.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def tensor_names(gguf_arch: str, n_blocks: int):
    """The gguf package's Hugging Face -> GGUF tensor name map for this architecture."""
    import gguf

    return gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, gguf_arch), n_blocks)


def gguf_tensors(state: dict, config, arch: Architecture) -> list[tuple[str, tuple[int, ...], Callable]]:
    """(GGUF name, shape, load) for each tensor llama.cpp loads; load() gives its float32 array, q/k reordered for
    the llama family. Arrays are made one at a time as the file is written, so the export holds at most one
    converted tensor beside the model.

    A tied output head is left out: llama.cpp reads token_embd for it when output.weight is absent.

    Raises:
        LorafitError: a tensor the gguf name map does not know (named).
    """
    names = tensor_names(arch.gguf_arch, config.num_hidden_layers)
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    tied = getattr(config, "tie_word_embeddings", False)
    out = []
    for hf_name, tensor in state.items():
        if (tied and hf_name == "lm_head.weight") or hf_name.endswith("rotary_emb.inv_freq"):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise LorafitError(f"export: tensor {hf_name} has no GGUF name for llama.cpp's {arch.gguf_arch.lower()} "
                               f"architecture")
        heads = (n_head if ".attn_q." in name else n_kv if ".attn_k." in name else None) if arch.permute_qk else None
        out.append((name, tuple(tensor.shape), partial(_as_array, tensor, heads)))
    return out


def _as_array(tensor, heads: int | None) -> np.ndarray:
    data = tensor.detach().float().cpu().numpy()
    return data if heads is None else permute_qk(data, heads)
