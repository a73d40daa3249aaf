"""One loader for eval, generate and serve: a source's model with its adapter, or its base loaded once with several
named adapters held in an `AdapterBank` (per-row selection, residency).

    load_inference_model(source)      a merged model as saved, or the base as trained with the adapter attached
    open_bank(source, {name: dir})    the base once + the source's own adapter (named after its folder) + each named
    load_bank(source, {name: dir})    the base once + each named adapter; add_adapter: one more at run time
"""

from __future__ import annotations

from pathlib import Path

import torch

from lorafit.errors import LorafitError, RunDirError
from lorafit.sources import Source, resolve_source, warn_residual_base


def _on_gpu() -> bool:
    return torch.cuda.is_available()


def load_inference_model(source: Source):
    """The model `eval` and `generate` run: a merged model as saved, or the base (as trained, quantized for QLoRA)
    with the adapter attached, in eval mode. Full-precision models go to the GPU when there is one."""
    from lorafit.adapters.peft_io import load_adapter
    from lorafit.model import load_model

    warn_residual_base(source)
    if source.adapter_dir is None:
        model = load_model(as_base(source).model)
    else:
        model = load_model(source.model)
        load_adapter(model, source.adapter_dir, dropout=0.0)
    if _on_gpu() and source.quantization is None:
        model.to("cuda")
    model.eval()
    return model


def as_base(src: Source) -> Source:
    """A model folder as the base the named adapters go on (float32 on the CPU, bfloat16 on a GPU)."""
    dtype = "bfloat16" if _on_gpu() else "float32"
    return Source(src.path, src.kind, None, src.config, src.model.model_copy(update={"dtype": dtype}))


def open_bank(src: Source, adapters: dict[str, Path]):
    """The base of `src` loaded once, with the source's own adapter (named after its folder) and each named one.

    Returns:
        (model, AdapterBank, {name: folder} in the order loaded).

    Raises:
        LorafitError: a NAME equal to the source's own adapter's name. RunDirError: an adapter of another base.
    """
    named = dict(adapters)
    if src.adapter_dir is not None:
        own = src.path.name
        if own in named:
            raise LorafitError(f"--adapter {own}=...: {own!r} names the source's own adapter ({src.path}); choose "
                               f"another name")
        named = {own: src.path, **named}
    model, bank = load_bank(src if src.adapter_dir is not None else as_base(src), named)
    return model, bank, named


def load_bank(src: Source, adapters: dict[str, Path]):
    """`src`'s base model (as trained: quantized for QLoRA; on the GPU when there is one and it is not quantized),
    loaded once, and an `AdapterBank` holding each named adapter folder on it.

    Raises:
        RunDirError: an adapter folder that is missing or holds no adapter, or one trained on another base.
    """
    from lorafit.adapters.multi import AdapterBank
    from lorafit.merge import check_same_base
    from lorafit.model import load_model

    resolved = {name: resolve_source(Path(d)) for name, d in adapters.items()}
    for other in (src, *resolved.values()):
        warn_residual_base(other)
    for name, other in resolved.items():
        try:
            check_same_base([src, other])
        except RunDirError as e:
            raise RunDirError(f"--adapter {name}={adapters[name]}: {e}") from None
    model = load_model(src.model)
    if _on_gpu() and src.quantization is None:
        model.to("cuda")
    model.eval()
    bank = AdapterBank(model)
    for name, other in resolved.items():
        add_adapter(bank, name, other.adapter_dir)
    return model, bank


def add_adapter(bank, name: str, adapter_dir: Path) -> None:
    """Load the adapter folder onto the bank's base model and hold it under `name`."""
    from lorafit.adapters.multi import take_adapter_layers
    from lorafit.adapters.peft_io import load_adapter

    if name in bank.names:
        raise RunDirError(f"adapter name {name!r} is already loaded; give each adapter its own name")
    _check_alone(bank, name, adapter_dir)
    with bank.detached() as model:
        load_adapter(model, adapter_dir, dropout=0.0)
        layers = take_adapter_layers(model)
    bank.add(name, layers)


def _check_alone(bank, name: str, adapter_dir: Path) -> None:
    """An adapter with token rows or modules_to_save changes the base itself (its embedding / head), so it can
    only be held alone; refuse it beside others (merge it instead)."""
    from lorafit.adapters.peft_io import read_adapter_config

    config = read_adapter_config(adapter_dir)
    if config.get("trainable_token_indices") or config.get("modules_to_save"):
        if bank.names:
            raise RunDirError(f"--adapter {name}={adapter_dir}: it trains token rows or modules_to_save, which change "
                              f"the base's embedding / head, so it cannot share a base with other adapters; serve it "
                              f"alone, or merge it (lorafit merge) and serve the merged model")
        bank.alone = name
    elif getattr(bank, "alone", None):
        raise RunDirError(f"--adapter {name}={adapter_dir}: {bank.alone} trains token rows or modules_to_save and is "
                          f"held alone; serve the others on their own, or merge {bank.alone} first")
