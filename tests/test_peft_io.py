"""Adapter files: PEFT format both ways (lorafit -> PEFT and PEFT -> lorafit, LoRA and DoRA), atomic saving,
and clear errors for broken adapter folders."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny_llama
from safetensors.torch import load_file

from lorafit.adapters import attach_lora, lora_layers
from lorafit.adapters.peft_io import load_adapter, read_adapter_config, save_adapter
from lorafit.errors import LorafitError, RunDirError

R, ALPHA = 4, 12.0


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 11), generator=torch.Generator().manual_seed(7))


def _trained_lorafit_model(vocab: int, targets, *, dora=False, rslora=False):
    """A tiny Llama with an adapter whose B (and DoRA magnitude) are nonzero, as after some training."""
    model = build_tiny_llama(vocab)
    attach_lora(model, targets, r=R, alpha=ALPHA, rslora=rslora, dora=dora)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(0, 0.05, generator=gen)
            if dora:
                layer.lora_magnitude_vector.mul_(1 + 0.1 * torch.rand(layer.out_features, generator=gen))
    return model


def _save(model, out, dora=False, rslora=False, targets="all-linear", tokenizer=None):
    return save_adapter(model, out, base_model_name_or_path="tiny-llama", r=R, alpha=ALPHA, dropout=0.05,
                        targets=targets, rslora=rslora, dora=dora, tokenizer=tokenizer)


@pytest.fixture
def vocab(tiny_tokenizer) -> int:
    return len(tiny_tokenizer)


@pytest.mark.parametrize("dora,rslora", [(False, False), (True, True)])
def test_lorafit_adapter_gives_same_logits_in_peft(tmp_path, vocab, tiny_tokenizer, dora, rslora):
    from peft import PeftModel

    model = _trained_lorafit_model(vocab, "all-linear", dora=dora, rslora=rslora)
    out = _save(model, tmp_path / "adapter", dora=dora, rslora=rslora, tokenizer=tiny_tokenizer)
    ids = _ids(vocab)
    with torch.no_grad():
        ours = model(ids).logits
        peft_model = PeftModel.from_pretrained(build_tiny_llama(vocab), out).eval()
        theirs = peft_model(ids).logits
    assert (ours - build_tiny_llama(vocab)(ids).logits).abs().max() > 1e-2
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)  # measured: max |diff| 0 to ~1e-6
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["bias"] == "none"
    assert config["r"] == R and config["lora_alpha"] == ALPHA and config["use_dora"] is dora
    assert config["use_rslora"] is rslora and config["base_model_name_or_path"] == "tiny-llama"
    assert config["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj"])
    tensors = load_file(out / "adapter_model.safetensors")
    assert tensors["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"].shape == (R, 64)
    assert tensors["base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"].shape == (192, R)
    assert ("base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector" in tensors) is dora
    assert (out / "tokenizer.json").is_file()
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out).chat_template == tiny_tokenizer.chat_template


def test_regex_picking_some_layers_is_saved_so_peft_wraps_exactly_those(tmp_path, vocab):
    from peft import PeftModel

    model = _trained_lorafit_model(vocab, r"re:model\.layers\.1\.self_attn\.(q|v)_proj")
    out = _save(model, tmp_path / "adapter", targets=r"re:model\.layers\.1\.self_attn\.(q|v)_proj")
    peft_model = PeftModel.from_pretrained(build_tiny_llama(vocab), out).eval()
    wrapped = sorted(n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                     if type(m).__name__ == "Linear" and hasattr(m, "lora_A"))
    assert wrapped == sorted(lora_layers(model))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(_ids(vocab)).logits, model(_ids(vocab)).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dora,targets", [(False, r"model\.layers\.\d+\.(self_attn\.q_proj|mlp\.down_proj)"),
                                          (True, ["k_proj", "v_proj", "up_proj"])])
def test_peft_saved_adapter_gives_same_logits_in_lorafit(tmp_path, vocab, dora, targets):
    from peft import LoraConfig, get_peft_model

    peft_config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets, use_dora=dora, use_rslora=not dora,
                             init_lora_weights=False, lora_dropout=0.1, task_type="CAUSAL_LM")
    peft_model = get_peft_model(build_tiny_llama(vocab), peft_config).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    ids = _ids(vocab)
    with torch.no_grad():
        theirs = peft_model(ids).logits
    model = build_tiny_llama(vocab)
    settings = load_adapter(model, tmp_path / "peft")
    assert settings.dora is dora and settings.rslora is (not dora) and settings.r == R and settings.alpha == ALPHA
    assert len(settings.wrapped) == (4 if not dora else 6)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    model.eval()
    with torch.no_grad():
        ours = model(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)  # measured: max |diff| 0 to ~1e-6


def test_peft_alpha_and_rank_patterns_are_honoured(tmp_path, vocab):
    from peft import LoraConfig, get_peft_model

    peft_config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj", "o_proj"], init_lora_weights=False,
                             rank_pattern={"o_proj": 2}, alpha_pattern={"o_proj": 3.0})
    peft_model = get_peft_model(build_tiny_llama(vocab), peft_config).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    model = build_tiny_llama(vocab)
    load_adapter(model, tmp_path / "peft")
    o_proj = model.model.layers[0].self_attn.o_proj
    assert o_proj.r == 2 and o_proj.scale == pytest.approx(3.0 / 2)
    with torch.no_grad():
        torch.testing.assert_close(model(_ids(vocab)).logits, peft_model(_ids(vocab)).logits, rtol=1e-5, atol=1e-5)


def test_lorafit_round_trip_restores_logits_and_settings(tmp_path, vocab):
    model = _trained_lorafit_model(vocab, ["q_proj", "down_proj"], dora=True)
    out = _save(model, tmp_path / "a", dora=True)
    fresh = build_tiny_llama(vocab)
    settings = load_adapter(fresh, out)
    assert settings.wrapped == list(lora_layers(model)) and settings.dropout == 0.05
    with torch.no_grad():
        torch.testing.assert_close(fresh(_ids(vocab)).logits, model(_ids(vocab)).logits, rtol=0, atol=0)
    assert read_adapter_config(out)["lora_alpha"] == ALPHA


# ---------------------------------------------------------------------------------------------- atomicity


class _ExplodingTokenizer:
    def save_pretrained(self, path):
        raise RuntimeError("disk full")


def test_save_is_atomic_and_replaces_only_on_success(tmp_path, vocab):
    model = _trained_lorafit_model(vocab, ["q_proj"])
    out = _save(model, tmp_path / "adapter")
    first = (out / "adapter_model.safetensors").read_bytes()
    with torch.no_grad():
        lora_layers(model)["model.layers.0.self_attn.q_proj"].lora_B.weight.add_(1.0)
    with pytest.raises(RuntimeError, match="disk full"):
        _save(model, out, tokenizer=_ExplodingTokenizer())
    assert (out / "adapter_model.safetensors").read_bytes() == first  # the old adapter is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temp or old folder left behind
    _save(model, out)
    assert (out / "adapter_model.safetensors").read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


# -------------------------------------------------------------------------------------------------- errors


def test_missing_or_malformed_adapter_folders_are_run_dir_errors(tmp_path, vocab):
    with pytest.raises(RunDirError, match="no such adapter folder"):
        read_adapter_config(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunDirError, match="adapter_config.json is missing"):
        load_adapter(build_tiny_llama(vocab), tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{not json")
    with pytest.raises(RunDirError, match="not valid JSON"):
        read_adapter_config(bad)
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3", "r": 4, "lora_alpha": 8}))
    with pytest.raises(RunDirError, match="IA3"):
        read_adapter_config(bad)
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "lora_alpha": 8}))
    with pytest.raises(RunDirError, match="r must be"):
        read_adapter_config(bad)
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    with pytest.raises(RunDirError, match="adapter_model.safetensors is missing"):
        load_adapter(build_tiny_llama(vocab), bad)


def test_adapter_for_another_model_is_refused_clearly(tmp_path, vocab):
    model = _trained_lorafit_model(vocab, ["up_proj"])
    out = _save(model, tmp_path / "a")
    wider = build_tiny_llama(vocab, intermediate_size=256)
    with pytest.raises(LorafitError, match=r"shape \(192, 4\).*\(256, 4\)"):
        load_adapter(wider, out)
    shallower = build_tiny_llama(vocab, num_hidden_layers=1)
    with pytest.raises(RunDirError, match="model.layers.1.mlp.up_proj"):
        load_adapter(shallower, out)
