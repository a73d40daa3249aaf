"""`--format gguf-lora`: the adapter alone as llama.cpp's LoRA GGUF, for `llama-cli -m BASE.gguf --lora FILE`.

llama.cpp adds `scale · B (A x)` to each adapted weight's output, where each tensor `T` of the base GGUF has its
pair `T.lora_a` (r, in) and `T.lora_b` (out, r), and scale = alpha / r from `adapter.lora.alpha` (the user's
`--lora-scaled` multiplies it). lorafit writes each layer's own scale into B (s·B), so per-layer ranks, rsLoRA and
AdaLoRA's pruned ranks all come out right, and sets alpha = r (scale 1) when every layer has the same rank, or
alpha = 0 (llama.cpp then applies the adapter unscaled) when they differ.

Which methods are a LoRA: lora and lora_fa (A and B as trained); pissa / olora (saved converted: the equivalent
rank-2r LoRA on the original weights); adalora (A' = A ⊙ E, the kept triplets: ΔW = s·B (A ⊙ E)). DoRA and VeRA
are not a low-rank update of the weight (DoRA rescales rows; VeRA's factors are shared), so they are refused.
The q/k rows of B are reordered as the base's q/k weights are for the llama family (`arch.permute_qk`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from lorafit.errors import LorafitError

REFUSED = "export --format gguf (merged) instead"


def check_method(src) -> None:
    """Refuse adapters that are not a LoRA after conversion, before anything loads.

    Raises:
        LorafitError: DoRA or VeRA (or another non-LoRA kind), named, with what to do instead.
    """
    from lorafit.adapters.peft_io import read_adapter_config

    config = read_adapter_config(src.adapter_dir)
    kind = config.get("peft_type", "LORA")
    if config.get("use_dora"):
        kind = "DORA"
    if kind not in ("LORA", "ADALORA"):
        raise LorafitError(f"--format gguf-lora: a {kind.lower()} adapter is not a LoRA llama.cpp can apply "
                           f"(supported: lora, lora_fa, pissa / olora, adalora); {REFUSED}")
    whole = [what for what, key in (("trained token rows", "trainable_token_indices"),
                                    ("modules_to_save", "modules_to_save")) if config.get(key)]
    if whole:
        raise LorafitError(f"--format gguf-lora: this adapter also carries {' and '.join(whole)} (whole embedding / "
                           f"head rows or modules, which a llama.cpp LoRA cannot hold); {REFUSED}")


@torch.no_grad()
def lora_factors(name: str, layer) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, in), B (out, r)) with B @ A = the layer's update ΔW, float32.

    Raises:
        LorafitError: a layer that is no plain low-rank update (named).
    """
    from lorafit.adapters import LoraLinear
    from lorafit.adapters.adalora import AdaLoraLinear

    if isinstance(layer, AdaLoraLinear):
        a = layer.lora_A.weight * layer.lora_E  # (r, in) ⊙ (r, 1)
        return a.detach().float(), (layer.scale * layer.lora_B.weight).detach().float()
    if isinstance(layer, LoraLinear) and not layer.dora:
        return layer.lora_A.weight.detach().float(), (layer.scale * layer.lora_B.weight).detach().float()
    raise LorafitError(f"--format gguf-lora: layer {name} is a {type(layer).__name__}, not a LoRA; {REFUSED}")


def lora_tensors(model, config, arch) -> tuple[list[tuple[str, object]], list[int]]:
    """[(GGUF name, float32 array)] of every adapted layer's lora_a / lora_b, and the layers' ranks.

    Raises:
        LorafitError: a layer with no GGUF name, or a factorization that does not reproduce the layer's update.
    """
    from lorafit.adapters import lora_layers
    from lorafit.export.arch import permute_qk, tensor_names

    names = tensor_names(arch.gguf_arch, config.num_hidden_layers)
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    out, ranks = [], []
    for module, layer in lora_layers(model).items():
        gguf_name = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if gguf_name is None:
            raise LorafitError(f"--format gguf-lora: adapted module {module} has no GGUF tensor in llama.cpp's "
                               f"{arch.gguf_arch.lower()} architecture; {REFUSED}")
        a, b = lora_factors(module, layer)
        delta = layer.delta().detach().float()
        if not torch.allclose(b @ a, delta, rtol=1e-4, atol=1e-6 * max(delta.abs().max().item(), 1e-12)):
            raise LorafitError(f"--format gguf-lora: {module}: the factors do not reproduce the layer's update "
                               f"(a lorafit bug; {REFUSED})")
        b = b.cpu().numpy()
        if arch.permute_qk and ".attn_q." in gguf_name:
            b = permute_qk(b, n_head)
        elif arch.permute_qk and ".attn_k." in gguf_name:
            b = permute_qk(b, n_kv)
        out += [(gguf_name + ".lora_a", a.cpu().numpy()), (gguf_name + ".lora_b", b)]
        ranks.append(a.shape[0])
    return out, ranks


def export_lora(src, out: Path, dtype: str, console):
    """Write the source's adapter as a LoRA GGUF into `out`."""
    import gguf

    from lorafit.adapters.peft_io import load_adapter
    from lorafit.atomic import write_dir_atomically
    from lorafit.export import ExportReport, base_config
    from lorafit.export.arch import architecture
    from lorafit.export.write import file_type, new_writer, write_file
    from lorafit.merge import load_full_precision_base

    if src.adapter_dir is None:
        raise LorafitError(f"--format gguf-lora: {src.path} is a model folder, with no adapter; give a run or "
                           f"adapter folder, or export the model with --format gguf")
    check_method(src)
    arch = architecture(base_config(src))
    if src.quantization is not None:
        console.print(f"note: this adapter trained on a {src.quantization.bits}-bit base; llama.cpp applies it to "
                      f"the base GGUF you give it, whose weights are not the ones it trained on: for the trained "
                      f"model itself, export --format gguf (merged)")
    model = load_full_precision_base(src, [])  # the original weights: the adapter's names, shapes and config
    load_adapter(model, src.adapter_dir, dropout=0.0)
    tensors, ranks = lora_tensors(model, model.config, arch)
    tensors = [(n, a.shape, lambda a=a: a) for n, a in tensors]
    name = f"{out.name}-{dtype}.gguf"
    report = ExportReport(out / name, 0, dtype, "gguf-lora")

    def write(tmp: Path) -> None:
        writer = new_writer(tmp / name, arch.gguf_arch, out.name)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(ranks[0]) if len(set(ranks)) == 1 else 0.0)
        writer.add_file_type(file_type(dtype))
        report.kept_f16 = write_file(writer, tensors, dtype, console)
        report.size = (tmp / name).stat().st_size

    write_dir_atomically(out, write)
    return report
