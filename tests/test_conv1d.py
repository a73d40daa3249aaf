"""GPT-2's Conv1D layers (weight stored (in, out)): targeted by all-linear and by suffix, wrapped with PEFT's
fan_in_fan_out semantics, merged transposed, exchanged with PEFT, and quantize-round-tripped the way bitsandbytes
quantized them."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from rundirs import ALPHA, R

from lorafit.adapters import attach_lora, find_targets, lora_layers, unwrap_lora
from lorafit.adapters.peft_io import load_adapter, save_adapter

VOCAB = 128


def build_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
                        eos_token_id=2)
    return GPT2LMHeadModel(config).eval()


def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))


def randomize(model, seed: int = 4) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(0, 0.1, generator=gen)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_all_linear_and_suffixes_select_the_conv1d_layers_not_the_tied_head():
    model = build_gpt2()
    names = find_targets(model, "all-linear")
    assert {n.rpartition(".")[2] for n in names} == {"c_attn", "c_proj", "c_fc"}
    assert len(names) == 8 and "lm_head" not in names  # 4 per block; the head (tied to wte) is never wrapped
    assert find_targets(model, ["c_attn"]) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert "transformer.h.0.mlp.c_proj" not in find_targets(model, "all-linear", exclude=["mlp.c_proj"])


def test_conv1d_layer_computes_x_w_plus_low_rank_update_and_merges_transposed():
    model = build_gpt2()
    attach_lora(model, ["c_fc"], r=R, alpha=ALPHA)
    randomize(model)
    layer = lora_layers(model)["transformer.h.0.mlp.c_fc"]
    conv = layer.base_layer
    assert (layer.in_features, layer.out_features) == (64, 256) and tuple(conv.weight.shape) == (64, 256)
    torch.testing.assert_close(layer.base_weight(), conv.weight.T)  # (out, in) for the math
    x = torch.randn(3, 64)
    a, b = layer.lora_A.weight, layer.lora_B.weight
    expected = x @ conv.weight + conv.bias + (ALPHA / R) * (x @ a.T) @ b.T  # plain PyTorch reference
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    before = conv.weight.detach().clone()
    layer.merge()
    torch.testing.assert_close(conv.weight, before + (ALPHA / R) * (b @ a).T)  # ΔW (out, in) lands transposed
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    layer.unmerge()
    torch.testing.assert_close(conv.weight, before, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dora", [False, True])
def test_lorafit_gpt2_adapter_loads_in_peft_with_equal_logits(tmp_path, dora):
    from peft import PeftModel

    model = build_gpt2()
    attach_lora(model, "all-linear", r=R, alpha=ALPHA, dora=dora)
    randomize(model)
    with torch.no_grad():
        ours = model(ids()).logits
        plain = build_gpt2()(ids()).logits
    save_adapter(model, tmp_path / "a", base_model_name_or_path=None, r=R, alpha=ALPHA, dropout=0.0,
                 targets="all-linear", dora=dora)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and config["target_modules"] == ["c_attn", "c_fc", "c_proj"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # PEFT warns when fan_in_fan_out does not fit the layers
        theirs = PeftModel.from_pretrained(build_gpt2(), tmp_path / "a").eval()
    with torch.no_grad():
        assert rel(theirs(ids()).logits, ours) <= 1e-5
    assert rel(ours, plain) > 1e-3  # the adapter does change the model


def test_peft_gpt2_adapter_loads_in_lorafit_and_merges(tmp_path):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                        init_lora_weights=False)
    peft_model = get_peft_model(build_gpt2(), config).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        theirs = peft_model(ids()).logits
    model = build_gpt2()
    load_adapter(model, tmp_path / "peft")  # fan_in_fan_out: true is read, not refused
    assert len(lora_layers(model)) == 8
    with torch.no_grad():
        assert rel(model(ids()).logits, theirs) <= 1e-5
        unwrap_lora(model, merge=True)
        assert rel(model(ids()).logits, theirs) <= 1e-5


def test_merge_round_trips_conv1d_weights_as_bitsandbytes_quantized_them(tmp_path):
    """merge reproduces a QLoRA GPT-2's trained-on weights: bitsandbytes quantizes Conv1D's weight transposed."""
    from transformers import AutoModelForCausalLM

    from lorafit.adapters import dequantized_weight, is_quantized
    from lorafit.config import QuantizationConfig
    from lorafit.merge import apply_quantization_roundtrip
    from lorafit.model import quantization_config

    build_gpt2().save_pretrained(tmp_path / "gpt2")
    quant = QuantizationConfig(bits=4, type="nf4", double_quant=False, compute_dtype="float32")
    q_model = AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2", dtype=torch.float32,
                                                   quantization_config=quantization_config(quant))
    names = [n for n, m in q_model.named_modules() if is_quantized(m)]
    assert "transformer.h.0.attn.c_attn" in names
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2", dtype=torch.float32)
    original = full.get_submodule("transformer.h.0.attn.c_attn").weight.detach().clone()
    apply_quantization_roundtrip(full, names, quant, torch.float32)
    for name in names:
        expected = dequantized_weight(q_model.get_submodule(name)).float()  # (out, in)
        torch.testing.assert_close(full.get_submodule(name).weight.T, expected, rtol=0, atol=1e-6)
    assert (full.get_submodule("transformer.h.0.attn.c_attn").weight - original).abs().max() > 0
