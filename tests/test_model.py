"""Loading the base model and tokenizer: local folders, errors a user can cause, quantized loading, the pad
token, and k-bit training preparation."""

from __future__ import annotations

import pytest
import torch

from lorafit.adapters import attach_lora, lora_layers
from lorafit.config import ModelConfig
from lorafit.errors import ModelLoadError
from lorafit.model import (
    ADDED_PAD_TOKEN,
    ensure_pad_token,
    load_model,
    load_tokenizer,
    prepare_for_kbit_training,
)


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(0))


def test_tokenizer_pad_reuses_unk_never_eos(tiny_model_dir, tiny_tokenizer):
    tok = load_tokenizer(ModelConfig(path=str(tiny_model_dir)))
    assert tok.pad_token == "<unk>" and tok.pad_token_id != tok.eos_token_id
    assert len(tok) == len(tiny_tokenizer)  # nothing added, so the embeddings keep their size
    assert tok.chat_template == tiny_tokenizer.chat_template


def test_tokenizer_without_unk_gets_a_dedicated_pad_and_model_is_resized(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    tok.pad_token = None
    tok.unk_token = None
    vocab_before = len(tok)
    assert ensure_pad_token(tok) is True
    assert tok.pad_token == ADDED_PAD_TOKEN and len(tok) == vocab_before + 1 and tok.pad_token_id != tok.eos_token_id
    model = load_model(str(tiny_model_dir), tokenizer=tok, dtype="float32")
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert model.get_output_embeddings().weight.shape[0] == len(tok)
    assert model.config.pad_token_id == tok.pad_token_id


def test_load_model_fp32_reproduces_the_saved_model(tiny_model_dir, tiny_model):
    model = load_model(ModelConfig(path=str(tiny_model_dir), dtype="float32", attention="eager"))
    assert model.config._attn_implementation == "eager" and not model.training
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, tiny_model(ids).logits, rtol=1e-5, atol=1e-5)


def test_load_model_in_bfloat16(tiny_model_dir):
    model = load_model(str(tiny_model_dir), dtype="bfloat16")
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("path,needle", [
    ("./no/such/folder", "does not exist"),
    ("/definitely/not/here/model", "does not exist"),
    ("lorafit-test/not-a-cached-model", "HF_HUB_OFFLINE"),
])
def test_missing_model_is_one_clear_error(path, needle):
    with pytest.raises(ModelLoadError, match=needle) as err:
        load_model(path)
    assert "Traceback" not in str(err.value) and path in str(err.value)
    with pytest.raises(ModelLoadError):
        load_tokenizer(path)


def test_folder_without_config_is_a_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match=str(tmp_path)):
        load_model(str(tmp_path))


def test_bad_dtype_is_a_load_error(tiny_model_dir):
    with pytest.raises(ModelLoadError, match="dtype"):
        load_model(str(tiny_model_dir), dtype="fp32")
    with pytest.raises(ModelLoadError, match="compute_dtype"):
        load_model(str(tiny_model_dir), quantization={"bits": 4, "compute_dtype": "int8"})


@pytest.mark.parametrize("bits,qtype,double", [(4, "nf4", True), (4, "fp4", False), (8, "nf4", False)])
def test_quantized_loading_from_config(tiny_model_dir, bits, qtype, double):
    import bitsandbytes as bnb

    q = {"bits": bits, "type": qtype, "double_quant": double, "compute_dtype": "float32"} if bits == 4 else {"bits": 8}
    model = load_model(ModelConfig(path=str(tiny_model_dir), dtype="float32", quantization=q))
    layer = model.model.layers[0].mlp.up_proj
    if bits == 4:
        assert isinstance(layer, bnb.nn.Linear4bit)
        assert layer.weight.quant_state.quant_type == qtype and layer.weight.quant_state.nested == double
        assert layer.compute_dtype == torch.float32
    else:
        assert isinstance(layer, bnb.nn.Linear8bitLt)
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt)  # the head stays full precision


@pytest.mark.parametrize("upcast_norms", [False, True])
def test_prepare_for_kbit_training_then_lora_trains_with_checkpointing(tiny_model_dir, upcast_norms):
    q = {"bits": 4, "type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"}
    model = load_model(ModelConfig(path=str(tiny_model_dir), dtype="bfloat16", quantization=q))
    prepare_for_kbit_training(model, gradient_checkpointing=True, upcast_norms=upcast_norms)
    assert not any(p.requires_grad for p in model.parameters())
    norm = model.model.layers[0].input_layernorm.weight
    assert norm.dtype == (torch.float32 if upcast_norms else torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16  # large params untouched
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    assert model.config.use_cache is False
    attach_lora(model, "all-linear", r=4, alpha=8)
    model.train()
    ids = _ids(model.config.vocab_size)
    # fp32 norms need autocast (as train.precision bf16 gives); bf16 norms run as they are.
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=upcast_norms):
        loss = model(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(m.lora_A.weight.grad is not None and m.lora_B.weight.grad.abs().sum() > 0
               for m in lora_layers(model).values())
    assert not any(p.grad is not None for n, p in model.named_parameters() if "lora_" not in n)


# ------------------------------------------------------------------------------------------------ attention


@pytest.fixture(scope="module")
def tiny_gemma2_dir(tmp_path_factory, tiny_tokenizer):
    """A 2-layer Gemma 2 (logit soft-capping: transformers declares no sdpa support for it), fp32, saved."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)
    path = tmp_path_factory.mktemp("tiny-gemma2")
    Gemma2ForCausalLM(cfg).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def _no_weight_loading(monkeypatch):
    from transformers import AutoModelForCausalLM

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the attention choice was checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


def test_auto_attention_is_sdpa_for_llama_and_eager_for_gemma2(tiny_model_dir, tiny_gemma2_dir, tiny_tokenizer,
                                                               monkeypatch):
    from transformers import AutoModelForCausalLM

    import lorafit.model

    monkeypatch.setattr(lorafit.model, "flash_attention_missing", lambda: "flash-attn is not installed")  # any machine

    llama = load_model(str(tiny_model_dir))  # the default: model.attention auto
    assert ModelConfig(path="x").attention == "auto"
    assert llama.config._attn_implementation == "sdpa"
    gemma = load_model(str(tiny_gemma2_dir), dtype="float32")
    assert gemma.config._attn_implementation == "eager"
    # the same logits as transformers' own eager model: auto changed the implementation, not the math
    reference = AutoModelForCausalLM.from_pretrained(str(tiny_gemma2_dir), attn_implementation="eager").eval()
    ids = _ids(len(tiny_tokenizer))
    with torch.no_grad():
        torch.testing.assert_close(gemma(input_ids=ids).logits, reference(input_ids=ids).logits)


@pytest.mark.parametrize("choice,needle", [
    ("sdpa", "Gemma2ForCausalLM does not support sdpa; it supports flash_attention_2, eager (or use auto)"),
    ("flash_attention_2", "flash_attention_2 cannot run here"),
])
def test_explicit_attention_the_model_cannot_use_is_refused_before_loading_weights(tiny_gemma2_dir, monkeypatch,
                                                                                    choice, needle):
    import lorafit.model

    monkeypatch.setattr(lorafit.model, "flash_attention_missing", lambda: "no CUDA GPU")
    _no_weight_loading(monkeypatch)
    with pytest.raises(ModelLoadError, match="model.attention: ") as err:
        load_model(str(tiny_gemma2_dir), attention=choice)
    assert needle in str(err.value)


def test_attention_choice_prefers_flash_then_sdpa_then_eager():
    from transformers import Gemma2ForCausalLM, LlamaForCausalLM

    from lorafit.model import choose_attention, supported_attention

    llama, gemma = supported_attention(LlamaForCausalLM), supported_attention(Gemma2ForCausalLM)
    assert llama == ("flash_attention_2", "sdpa", "eager") and gemma == ("flash_attention_2", "eager")
    pick = lambda sup, half=True, missing=None: choose_attention("auto", sup, half, "M", missing).implementation  # noqa: E731
    assert pick(llama) == "flash_attention_2"  # installed, on a GPU, bf16
    assert pick(llama, half=False) == "sdpa"  # FA2 has no fp32 kernels
    assert pick(llama, missing="no CUDA GPU") == "sdpa"
    assert pick(gemma, missing="flash-attn is not installed") == "eager"
    assert pick(gemma) == "flash_attention_2"
    choice = choose_attention("auto", gemma, True, "Gemma2ForCausalLM", "flash-attn is not installed")
    assert choice.describe() == ("eager attention (auto; flash_attention_2: flash-attn is not installed; "
                                 "no sdpa in Gemma2ForCausalLM)")
    assert choose_attention("eager", llama, True, "M", "no CUDA GPU").describe() == "eager attention"
    # a plan for another machine (validate on a laptop, train on a GPU) notes what this one lacks instead of refusing
    planned = choose_attention("flash_attention_2", llama, True, "M", "no CUDA GPU", here=False)
    assert planned.describe() == "flash_attention_2 attention (not on this machine: no CUDA GPU)"
    with pytest.raises(ModelLoadError, match="does not support sdpa"):
        choose_attention("sdpa", gemma, True, "Gemma2ForCausalLM", None, here=False)  # the model itself cannot


def test_validate_shows_the_attention_auto_picks_and_refuses_an_unusable_one(tmp_path, tiny_gemma2_dir, capsys,
                                                                             monkeypatch):
    import lorafit.model
    from lorafit.cli import main

    monkeypatch.setattr(lorafit.model, "flash_attention_missing", lambda: "flash-attn is not installed")

    data = tmp_path / "train.jsonl"
    data.write_text('{"instruction": "Say hi.", "output": "hi"}\n')
    config = tmp_path / "gemma.yaml"
    config.write_text(f"model: {{path: {tiny_gemma2_dir}}}\ndata: {{train: [{{path: {data}, format: alpaca}}]}}\n"
                      f"output: {{dir: {tmp_path / 'run'}}}\n")
    with pytest.raises(SystemExit) as info:
        main(["validate", str(config)])
    out = " ".join(capsys.readouterr().out.split())  # the plan table may wrap long lines
    assert info.value.code == 0 and "eager attention (auto;" in out and "no sdpa in Gemma2ForCausalLM" in out
    with pytest.raises(SystemExit) as info:
        main(["validate", str(config), "model.attention=sdpa"])
    err = " ".join(capsys.readouterr().err.split())
    assert info.value.code == 2 and "does not support sdpa; it supports flash_attention_2, eager" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()
