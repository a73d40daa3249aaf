"""The base model and tokenizer: full precision, or 4-bit / 8-bit through bitsandbytes (QLoRA), and k-bit training
preparation.

Pad token choice: a tokenizer without one reuses its `unk` token (or, failing that, another special token that is
not EOS/BOS) so the vocabulary, and the model's embeddings, never change size. Only when no such token exists is a
dedicated ``<|pad|>`` added, and `load_model(..., tokenizer=tok)` then resizes the embeddings to match. EOS is
never the pad token: data.py masks labels by its own masks, and a pad equal to EOS would invite someone to mask
the EOS a model must learn to emit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafit.config import ModelConfig, QuantizationConfig
from lorafit.errors import ModelLoadError

DTYPES = ("float32", "bfloat16", "float16")
ATTENTION = ("auto", "sdpa", "flash_attention_2", "eager")
ADDED_PAD_TOKEN = "<|pad|>"


@dataclass(frozen=True)
class _Source:
    """Where a model comes from, checked: a local directory or a hub id."""

    path: str
    revision: str | None
    trust_remote_code: bool
    local: bool


def _source(path: str, revision: str | None, trust_remote_code: bool) -> _Source:
    """Decide local dir vs hub id; a path that looks local but does not exist is an error here, not in HF."""
    p = Path(path).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ModelLoadError(f"model.path: {path} is a file; give the model's folder (with config.json)")
        return _Source(str(p), revision, trust_remote_code, local=True)
    looks_local = path.startswith(("/", "./", "../", "~", ".\\")) or path.count("/") > 1 or "\\" in path
    if looks_local:
        raise ModelLoadError(f"model.path: {path} does not exist (a local folder was expected; "
                             f"a hub id looks like org/name)")
    return _Source(path, revision, trust_remote_code, local=False)


def _load_error(what: str, src: _Source, exc: Exception) -> ModelLoadError:
    """One message for a failed from_pretrained: what failed, why, and what to do."""
    if src.local:
        return ModelLoadError(f"model.path: cannot load the {what} from {src.path}: {_first_line(exc)}")
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    hint = ("HF_HUB_OFFLINE is set and it is not in the local cache: download it once online "
            "(hf download " + src.path + ") or point model.path at a local folder"
            if offline else "check the hub id, model.revision, your network, and access rights (hf auth login)")
    rev = f" (revision {src.revision})" if src.revision else ""
    return ModelLoadError(f"model.path: cannot load the {what} {src.path!r}{rev}: {_first_line(exc)}\n{hint}")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _as_config(cfg: ModelConfig | str, overrides: dict[str, Any]) -> ModelConfig:
    """Accept a ModelConfig or a path plus keyword values; a bad value is a ModelLoadError."""
    if isinstance(cfg, ModelConfig):
        if overrides:
            raise TypeError("pass either a ModelConfig or a path with keyword settings, not both")
        return cfg
    from pydantic import ValidationError

    try:
        return ModelConfig(path=str(cfg), **overrides)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ModelLoadError(f"model settings: {problems} (dtype: {', '.join(DTYPES)}; "
                             f"attention: {', '.join(ATTENTION)}; quantization bits: 4 or 8)") from None


# ------------------------------------------------------------------------------------------------ attention


@dataclass(frozen=True)
class AttentionChoice:
    """The attention implementation a model will be loaded with, and why."""

    implementation: str  # what transformers gets as attn_implementation
    requested: str  # model.attention as configured (auto | sdpa | flash_attention_2 | eager)
    supported: tuple[str, ...]  # what the model class declares, best first
    note: str = ""  # for auto: why the better ones were passed over

    def describe(self) -> str:
        """E.g. "sdpa attention", or "sdpa attention (auto; flash_attention_2: flash-attn is not installed)"."""
        if self.requested != "auto":
            return f"{self.implementation} attention" + (f" ({self.note})" if self.note else "")
        return f"{self.implementation} attention (auto{'; ' + self.note if self.note else ''})"


def model_class(hf_config, trust_remote_code: bool = False):
    """The causal-LM class transformers would build for `hf_config`, or None when it cannot tell."""
    from transformers import AutoModelForCausalLM

    try:
        auto_map = getattr(hf_config, "auto_map", None) or {}
        if trust_remote_code and "AutoModelForCausalLM" in auto_map:
            from transformers.dynamic_module_utils import get_class_from_dynamic_module

            return get_class_from_dynamic_module(auto_map["AutoModelForCausalLM"], hf_config._name_or_path)
        return AutoModelForCausalLM._model_mapping[type(hf_config)]
    except Exception:  # unknown architecture or remote code not at hand: transformers reports it when loading
        return None


def supported_attention(cls) -> tuple[str, ...]:
    """The attention implementations a model class declares (transformers' `_supports_*` flags), best first."""
    flash = getattr(cls, "_supports_flash_attn", False) or getattr(cls, "_supports_flash_attn_2", False)
    return tuple(name for name, ok in (("flash_attention_2", flash), ("sdpa", getattr(cls, "_supports_sdpa", False)),
                                       ("eager", True)) if ok)


def flash_attention_missing() -> str | None:
    """Why flash_attention_2 cannot run on this machine (no flash-attn package, no CUDA GPU), or None."""
    import importlib.util

    import torch

    if importlib.util.find_spec("flash_attn") is None:
        return "flash-attn is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    return None


def choose_attention(requested: str, supported: tuple[str, ...], half_precision: bool, cls_name: str,
                     flash_missing: str | None, here: bool = True) -> AttentionChoice:
    """`model.attention` resolved against what the model class supports and what this machine has.

    auto: flash_attention_2 when the class supports it, flash-attn is installed, there is a GPU and the model computes
    in bf16/fp16 (FA2 has no fp32 kernels); else sdpa when the class supports it; else eager. An explicit choice the
    model or machine cannot use is refused (before any weight is loaded); with `here` false (planning for another
    machine) what this machine lacks is only noted.

    Raises:
        ModelLoadError: an explicit choice that cannot be used, naming what the model supports.
    """
    if requested != "auto":
        if requested not in supported:
            raise ModelLoadError(f"model.attention: {cls_name} does not support {requested}; it supports "
                                 f"{', '.join(supported)} (or use auto)")
        if requested == "flash_attention_2" and flash_missing and not here:
            return AttentionChoice(requested, requested, supported, f"not on this machine: {flash_missing}")
        if requested == "flash_attention_2" and flash_missing:
            raise ModelLoadError(f"model.attention: flash_attention_2 cannot run here ({flash_missing}); use auto, "
                                 f"or one of {', '.join(s for s in supported if s != requested)}")
        return AttentionChoice(requested, requested, supported)
    passed = []
    if "flash_attention_2" in supported:
        why = flash_missing or (None if half_precision else "float32 weights")
        if why is None:
            return AttentionChoice("flash_attention_2", requested, supported)
        passed.append(f"flash_attention_2: {why}")
    if "sdpa" in supported:
        return AttentionChoice("sdpa", requested, supported, "; ".join(passed))
    passed.append(f"no sdpa in {cls_name}")
    return AttentionChoice("eager", requested, supported, "; ".join(passed))


def resolve_attention(mc: ModelConfig, hf_config, here: bool = True) -> AttentionChoice | None:
    """`choose_attention` for a model config and its transformers config; None when the class is unknown.

    Args:
        here: the model loads on this machine (refuse flash_attention_2 it cannot run); false for a plan.
    """
    cls = model_class(hf_config, mc.trust_remote_code)
    if cls is None:
        return None
    q = mc.quantization
    half = mc.dtype != "float32" and (q is None or q.bits == 8 or q.compute_dtype != "float32")
    return choose_attention(mc.attention, supported_attention(cls), half, cls.__name__, flash_attention_missing(),
                            here)


def attention_in_use(model) -> str:
    """The attention implementation a loaded model runs (what transformers settled on); looks through DDP / FSDP /
    Accelerate wrappers. flash_attention_2 needs packed batches flattened into one row (`lorafit.data.collate`)."""
    while hasattr(model, "module"):
        model = model.module
    return getattr(model.config, "_attn_implementation", None) or "eager"


def _load_hf_config(src: _Source):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(src.path, revision=src.revision, trust_remote_code=src.trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise _load_error("model config", src, e) from None


# ------------------------------------------------------------------------------------------------ tokenizer


def load_tokenizer(cfg: ModelConfig | str, **settings: Any):
    """The base model's tokenizer, with a pad token that is never EOS (see the module docstring).

    Args:
        cfg: a ModelConfig, or a hub id / local folder.
        **settings: with a path: revision, trust_remote_code.

    Returns:
        A transformers tokenizer.

    Raises:
        ModelLoadError: the path does not exist or the tokenizer cannot be loaded.
    """
    from transformers import AutoTokenizer

    mc = _as_config(cfg, settings)
    src = _source(mc.path, mc.revision, mc.trust_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(src.path, revision=src.revision, trust_remote_code=src.trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise _load_error("tokenizer", src, e) from None
    add_tokens(tok, mc.add_tokens)
    ensure_pad_token(tok)
    return tok


def add_tokens(tokenizer, tokens: list[str]) -> list[int]:
    """Add `tokens` (model.add_tokens) as special tokens; one the tokenizer already has as a special token is kept.

    Returns:
        The ids of all `tokens`.

    Raises:
        ConfigError: a token the tokenizer already has as an ordinary (non-special) token.
    """
    from lorafit.errors import ConfigError

    special = set(tokenizer.all_special_tokens) | {t.content for t in tokenizer.added_tokens_decoder.values()
                                                   if t.special}
    vocab = tokenizer.get_vocab()
    ordinary = [f"{t} (id {vocab[t]})" for t in tokens if t in vocab and t not in special]
    if ordinary:
        raise ConfigError(f"model.add_tokens: {', '.join(ordinary)} is already an ordinary token of the tokenizer; "
                          f"remove it from add_tokens (or pick a new marker)")
    new = [t for t in tokens if t not in vocab]
    if new:
        tokenizer.add_special_tokens({"extra_special_tokens": new}, replace_extra_special_tokens=False)
    return tokenizer.convert_tokens_to_ids(list(tokens))


def ensure_pad_token(tokenizer) -> bool:
    """Give `tokenizer` a pad token if it has none (or if it is EOS): its unk token, else a new ``<|pad|>``.

    Returns:
        True when a token was added to the vocabulary (the model's embeddings must then be resized).
    """
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return False
    unk = tokenizer.unk_token
    if unk is not None and unk not in (tokenizer.eos_token, tokenizer.bos_token):
        tokenizer.pad_token = unk  # unk never appears in byte-level BPE output, so padding with it is unambiguous
        return False
    tokenizer.add_special_tokens({"pad_token": ADDED_PAD_TOKEN})
    return True


def align_model_with_tokenizer(model, tokenizer) -> None:
    """Resize the input/output embeddings if the tokenizer grew, and record its pad id in the model's configs."""
    vocab, rows = len(tokenizer), model.get_input_embeddings().weight.shape[0]
    if vocab > rows:
        from lorafit.adapters.tokens import init_rows

        model.resize_token_embeddings(vocab, mean_resizing=False)
        init_rows(model, list(range(rows, vocab)))  # new rows start at the mean row, not at random
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


# ------------------------------------------------------------------------------------------------ model


def quantization_config(q: QuantizationConfig | None, storage_dtype: str | None = None):
    """transformers' BitsAndBytesConfig for a quantization section (None: full precision).

    Args:
        storage_dtype: the dtype 4-bit weights are packed into (default uint8). FSDP needs the model's dtype, so
            the packed weights can share a flat tensor with the layer norms; the values are the same either way.
    """
    if q is None:
        return None
    import torch
    from transformers import BitsAndBytesConfig

    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    storage = {"bnb_4bit_quant_storage": getattr(torch, storage_dtype)} if storage_dtype else {}
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.type,
                              bnb_4bit_use_double_quant=q.double_quant,
                              bnb_4bit_compute_dtype=getattr(torch, q.compute_dtype), **storage)


def _default_device_map(quantized: bool):
    """bitsandbytes layers must be placed at load: this process's GPU, or the CPU (which bnb >= 0.49 runs)."""
    import torch

    if not quantized:
        return None
    if torch.cuda.is_available():
        return {"": torch.cuda.current_device()}
    return "cpu"


def load_model(cfg: ModelConfig | str, device_map: Any = None, tokenizer=None, for_fsdp: bool = False,
               **settings: Any):
    """The base causal LM, frozen-ready: full precision, or 4/8-bit through bitsandbytes.

    Args:
        cfg: a ModelConfig, or a hub id / local folder.
        device_map: passed to from_pretrained; None places a quantized model on this process's GPU (or the CPU).
        tokenizer: when given, embeddings are resized to it and its pad id recorded (`align_model_with_tokenizer`).
        for_fsdp: store 4-bit weights in the model's dtype, so FSDP can shard them (`lorafit.parallel`).
        **settings: with a path: revision, dtype, attention, trust_remote_code, quantization (a dict).

    Returns:
        The model in eval mode (training code switches it to train).

    Raises:
        ModelLoadError: path not found, hub id not available (e.g. offline and not cached), bad settings.
    """
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    mc = _as_config(cfg, settings)
    src = _source(mc.path, mc.revision, mc.trust_remote_code)
    quant = quantization_config(mc.quantization, storage_dtype=mc.dtype if for_fsdp else None)
    if device_map is None:
        device_map = _default_device_map(quant is not None)
    attention = resolve_attention(mc, _load_hf_config(src))  # refuses an unusable choice before loading weights
    try:
        model = AutoModelForCausalLM.from_pretrained(
            src.path, revision=src.revision, trust_remote_code=src.trust_remote_code, dtype=getattr(torch, mc.dtype),
            attn_implementation=attention.implementation if attention else None, quantization_config=quant,
            device_map=device_map)
    except ImportError as e:  # e.g. bitsandbytes missing
        raise ModelLoadError(f"model: {_first_line(e)}") from None
    except SafetensorError as e:  # a weight file cut short or corrupted after it was written
        raise ModelLoadError(f"model.path: {src.path}: a weight file is damaged or incomplete ({_first_line(e)}); "
                             f"copy or download the model again") from None
    except (OSError, ValueError, KeyError) as e:
        raise _load_error("model", src, e) from None
    if tokenizer is not None:
        align_model_with_tokenizer(model, tokenizer)
    model.eval()
    return model


def original_weights(cfg: ModelConfig, names: list[str], tokenizer=None) -> dict[str, Any]:
    """The full-precision weights of the named linear modules, as the checkpoint holds them in `cfg.model.dtype`:
    what a 4/8-bit load quantizes, for the inits that need W itself (pissa / olora / loftq on a quantized base).

    The base is loaded once more without quantization, on the CPU, and dropped after the named weights are taken.

    Returns:
        {module name: (out, in) CPU tensor in model.dtype}.
    """
    import gc

    from lorafit.adapters.targets import is_conv1d

    model = load_model(cfg.model_copy(update={"quantization": None}), device_map="cpu", tokenizer=tokenizer)
    modules = {name: model.get_submodule(name) for name in names}
    # (out, in) as bitsandbytes holds it: a Conv1D's (in, out) weight transposed
    weights = {name: m.weight.detach().T if is_conv1d(m) else m.weight.detach() for name, m in modules.items()}
    del model
    gc.collect()
    return weights


def prepare_for_kbit_training(model, gradient_checkpointing: bool = True, upcast_norms: bool = False):
    """Make a (quantized or not) base ready for adapter training.

    Freezes every base parameter. With gradient checkpointing, turns it on non-reentrant and makes the
    embeddings' output require grad, so each checkpointed block has an input that carries grad.

    `upcast_norms` casts the small 1-D parameters a quantized base keeps unquantized (norm weights, biases) to fp32,
    as PEFT does. It is off by default: Llama-family norms already compute their statistics in fp32, and an fp32
    norm weight promotes every activation after it to fp32 (twice the activation memory) and makes a bf16 output
    head fail unless the forward runs under autocast. Turn it on only for training under autocast.

    Args:
        model: a transformers causal LM.
        gradient_checkpointing: enable activation checkpointing.
        upcast_norms: cast 1-D half-precision parameters of a quantized model to fp32.

    Returns:
        The same model.
    """
    import torch

    for p in model.parameters():
        p.requires_grad_(False)
    if upcast_norms and getattr(model, "hf_quantizer", None) is not None:
        for p in model.parameters():
            if p.ndim == 1 and p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()
    if gradient_checkpointing:
        enable_checkpointing(model)
        model.enable_input_require_grads()
        model.config.use_cache = False  # the KV cache is useless in training and warns under checkpointing
    return model


def enable_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in the backward (non-reentrant: reentrant checkpointing needs an
    input with grad and breaks with DDP), under whichever name this transformers version has."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name; the old one warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
