"""The LoRA layer against hand-written references: init, gradients, merge/unmerge/unwrap, DoRA, targets, LoRA+,
and 4-bit / 8-bit bitsandbytes bases on the CPU."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny_llama
from torch import nn

from lorafit.adapters import (
    LoraLinear,
    attach_lora,
    delta_weight,
    dequantized_weight,
    find_targets,
    lora_layers,
    lora_param_count,
    lora_state_dict,
    merge_lora,
    param_groups,
    param_report,
    quantize_roundtrip,
    unmerge_lora,
    unwrap_lora,
)
from lorafit.errors import LorafitError, TargetNotFoundError
from lorafit.model import enable_checkpointing

R, ALPHA = 4, 12.0  # alpha != r, so a scale mix-up (alpha/r vs alpha vs 1) shows
LLAMA_LINEAR = "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"


def _ids(vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 10), generator=torch.Generator().manual_seed(seed))


def _randomize_b(model: nn.Module, seed: int = 3) -> None:
    """B starts at zero; give it values so the adapter actually changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.05)
            if layer.dora:  # move m off ||W|| too, so the magnitude matters
                layer.lora_magnitude_vector.mul_(1 + 0.1 * torch.rand(layer.out_features, generator=gen))


@pytest.fixture
def vocab(tiny_tokenizer) -> int:
    return len(tiny_tokenizer)


# ------------------------------------------------------------------------------------------- formulas


@pytest.mark.parametrize("rslora", [False, True])
def test_delta_weight_is_scale_times_b_at_a(rslora):
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(16, 8), r=R, alpha=ALPHA, rslora=rslora)
    nn.init.normal_(layer.lora_B.weight)
    scale = ALPHA / math.sqrt(R) if rslora else ALPHA / R
    a, b = layer.lora_A.weight, layer.lora_B.weight
    by_hand = torch.einsum("or,ri->oi", b, a) * scale
    torch.testing.assert_close(delta_weight(a, b, layer.scale), by_hand, rtol=1e-6, atol=1e-7)
    assert layer.delta().shape == (8, 16)


def test_lora_a_is_kaiming_uniform_like_nn_linear_and_b_is_zero():
    layer = LoraLinear(nn.Linear(64, 32), r=8, alpha=ALPHA)
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) on fan_in 64
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.abs().max() > 0.5 * bound
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    assert isinstance(layer.lora_dropout, nn.Identity)  # p=0: no copy of the input


def test_forward_equals_hand_written_lora_including_bias():
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    layer = LoraLinear(base, r=R, alpha=ALPHA)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 5, 16)
    a, b = layer.lora_A.weight, layer.lora_B.weight
    expected = x @ base.weight.T + base.bias + (ALPHA / R) * (x @ a.T) @ b.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_dora_forward_and_grads_match_reference_with_detached_norm():
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    layer = LoraLinear(base, r=R, alpha=ALPHA, dora=True)
    nn.init.normal_(layer.lora_B.weight, std=0.1)
    torch.testing.assert_close(layer.lora_magnitude_vector.detach(), base.weight.norm(dim=1))
    with torch.no_grad():
        layer.lora_magnitude_vector.mul_(1.3)
    x = torch.randn(4, 16)
    layer(x).square().sum().backward()
    # Reference: W' = m (W + sBA) / ||W + sBA||_row, with the norm a constant as in the DoRA paper (sec. 4.3).
    a = layer.lora_A.weight.detach().clone().requires_grad_()
    b = layer.lora_B.weight.detach().clone().requires_grad_()
    m = layer.lora_magnitude_vector.detach().clone().requires_grad_()
    combined = base.weight + (ALPHA / R) * b @ a
    w_prime = (m / combined.norm(dim=1).detach())[:, None] * combined
    ref = F.linear(x, w_prime, base.bias)
    ref.square().sum().backward()
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-6)
    for ours, theirs in [(layer.lora_A.weight, a), (layer.lora_B.weight, b), (layer.lora_magnitude_vector, m)]:
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-4, atol=1e-6)


def test_lora_param_count_matches_attached_parameters(vocab):
    for dora in (False, True):
        model = build_tiny_llama(vocab)
        names = attach_lora(model, "all-linear", r=R, alpha=ALPHA, dora=dora)
        modules = dict(model.named_modules())
        expected = sum(lora_param_count(modules[n].in_features, modules[n].out_features, R, dora) for n in names)
        assert param_report(model).trainable == expected


# ------------------------------------------------------------------------------------------- model level


@pytest.mark.parametrize("dora", [False, True])
def test_zero_init_adapter_leaves_logits_unchanged(vocab, dora):
    model = build_tiny_llama(vocab)
    ids = _ids(vocab)
    with torch.no_grad():
        before = model(ids).logits
        attach_lora(model, "all-linear", r=R, alpha=ALPHA, dora=dora)
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dora", [False, True])
def test_gradients_reach_only_adapter_parameters(vocab, dora):
    model = build_tiny_llama(vocab)
    attach_lora(model, ["q_proj", "down_proj"], r=R, alpha=ALPHA, dropout=0.1, dora=dora)
    _randomize_b(model)
    model.train()
    ids = _ids(vocab)
    model(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        is_adapter = any(k in name for k in ("lora_A", "lora_B", "lora_magnitude_vector"))
        assert p.requires_grad == is_adapter, name
        if is_adapter:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


@pytest.mark.parametrize("rslora,dora", [(False, False), (True, False), (False, True), (True, True)])
def test_merged_forward_equals_adapter_forward(vocab, rslora, dora):
    model = build_tiny_llama(vocab)
    attach_lora(model, "all-linear", r=R, alpha=ALPHA, rslora=rslora, dora=dora)
    _randomize_b(model)
    ids = _ids(vocab)
    with torch.no_grad():
        adapter_out = model(ids).logits
        base_out = build_tiny_llama(vocab)(ids).logits
        merge_lora(model)
        merged_out = model(ids).logits
    assert (adapter_out - base_out).abs().max() > 1e-2  # the adapter really does something
    torch.testing.assert_close(merged_out, adapter_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dora", [False, True])
def test_merge_twice_equals_merge_once_and_unmerge_restores(vocab, dora):
    model = build_tiny_llama(vocab)
    attach_lora(model, "all-linear", r=R, alpha=ALPHA, dora=dora)
    _randomize_b(model)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    merge_lora(model)
    once = {k: v.clone() for k, v in model.state_dict().items()}
    merge_lora(model)
    assert all(torch.equal(once[k], v) for k, v in model.state_dict().items())
    assert any(not torch.equal(original[k], once[k]) for k in original if "base_layer" in k)
    unmerge_lora(model)
    unmerge_lora(model)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, original[k], rtol=1e-5, atol=1e-6, msg=k)


def test_unwrap_restores_modules_and_hf_state_dict_keys(vocab):
    reference = build_tiny_llama(vocab)
    model = build_tiny_llama(vocab)
    types_before = {n: type(m) for n, m in model.named_modules()}
    attach_lora(model, "all-linear", r=R, alpha=ALPHA)
    assert "model.layers.0.self_attn.q_proj.base_layer.weight" in model.state_dict()
    unwrap_lora(model)
    assert {n: type(m) for n, m in model.named_modules()} == types_before
    assert list(model.state_dict()) == list(reference.state_dict())
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in model.state_dict().items())


def test_unwrap_with_merge_keeps_the_adapted_logits(vocab):
    model = build_tiny_llama(vocab)
    attach_lora(model, ["v_proj", "up_proj"], r=R, alpha=ALPHA, dora=True)
    _randomize_b(model)
    ids = _ids(vocab)
    with torch.no_grad():
        adapted = model(ids).logits
        unwrap_lora(model, merge=True)
        assert not lora_layers(model)
        torch.testing.assert_close(model(ids).logits, adapted, rtol=1e-5, atol=1e-5)


def test_lora_state_dict_uses_peft_names_and_shapes(vocab):
    model = build_tiny_llama(vocab)
    attach_lora(model, ["q_proj", "down_proj"], r=R, alpha=ALPHA, dora=True)
    sd = lora_state_dict(model)
    assert sd["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].shape == (R, 64)
    assert sd["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"].shape == (64, R)
    assert sd["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape == (R, 192)
    assert sd["base_model.model.model.layers.0.mlp.down_proj.lora_magnitude_vector"].shape == (64,)
    assert len(sd) == 2 * 2 * 3


def test_wrapper_follows_the_models_train_or_eval_mode(vocab):
    model = build_tiny_llama(vocab)  # in eval mode
    attach_lora(model, ["q_proj"], r=R, alpha=ALPHA, dropout=0.5)
    assert not any(m.training for m in lora_layers(model).values())


def test_dropout_applies_in_training_only():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(32, 32), r=R, alpha=ALPHA, dropout=0.5)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(8, 32)
    layer.eval()
    eval_out = layer(x)
    layer.train()
    assert not torch.allclose(layer(x), eval_out)
    layer.eval()
    torch.testing.assert_close(layer(x), eval_out)


def test_gradient_checkpointing_gives_same_gradients(vocab):
    grads = []
    for checkpointing in (False, True):
        model = build_tiny_llama(vocab)
        attach_lora(model, "all-linear", r=R, alpha=ALPHA)
        _randomize_b(model)
        if checkpointing:
            enable_checkpointing(model)
        model.train()
        ids = _ids(vocab)
        model(ids, labels=ids).loss.backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    for g0, g1 in zip(*grads, strict=True):
        torch.testing.assert_close(g0, g1, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------- targets


def test_all_linear_skips_the_output_head(vocab):
    model = build_tiny_llama(vocab)
    names = find_targets(model, "all-linear")
    assert len(names) == 2 * 7 and "lm_head" not in names
    assert names[0] == "model.layers.0.self_attn.q_proj"


def test_suffix_regex_and_exclude_matching(vocab):
    model = build_tiny_llama(vocab)
    assert find_targets(model, ["q_proj", "v_proj"]) == [
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert find_targets(model, ["model.layers.1.mlp.up_proj"]) == ["model.layers.1.mlp.up_proj"]
    assert find_targets(model, r"re:.*\.1\.self_attn\.[qk]_proj") == [
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"]
    with pytest.raises(TargetNotFoundError):
        find_targets(model, "re:q_proj")  # fullmatch: a bare "q_proj" matches no full module name
    kept = find_targets(model, "all-linear", exclude=["down_proj", "self_attn.o_proj"])
    assert len(kept) == 2 * 5 and not any(n.endswith(("down_proj", "o_proj")) for n in kept)
    assert find_targets(model, ["lm_head"]) == ["lm_head"]  # named explicitly, the head may be wrapped


def test_no_match_error_lists_the_models_linear_modules(vocab):
    model = build_tiny_llama(vocab)
    with pytest.raises(TargetNotFoundError) as err:
        find_targets(model, ["c_attn"])
    assert "'c_attn'" in str(err.value) and LLAMA_LINEAR in str(err.value)
    with pytest.raises(TargetNotFoundError, match="qproj"):
        find_targets(model, ["q_proj", "qproj"])  # one typo among good names is not silently ignored
    with pytest.raises(TargetNotFoundError, match="excluded"):
        find_targets(model, ["q_proj"], exclude=["q_proj"])


def test_find_targets_on_meta_device_model(vocab):
    with torch.device("meta"):
        model = build_tiny_llama(vocab)
    assert next(model.parameters()).is_meta
    assert len(find_targets(model, "all-linear")) == 14


def test_attach_twice_is_refused(vocab):
    model = build_tiny_llama(vocab)
    attach_lora(model, ["q_proj"], r=R, alpha=ALPHA)
    with pytest.raises(LorafitError, match="already has adapter layers"):
        attach_lora(model, ["v_proj"], r=R, alpha=ALPHA)


# ----------------------------------------------------------------------------------------------- LoRA+


def test_lora_plus_groups_carry_the_right_learning_rates(vocab):
    model = build_tiny_llama(vocab)
    attach_lora(model, ["q_proj", "v_proj"], r=R, alpha=ALPHA, dora=True)
    groups = {g["name"]: g for g in param_groups(model, lr=2e-4, weight_decay=0.1, lora_plus_ratio=16)}
    assert set(groups) == {"lora_A", "lora_B", "no_decay"}
    assert groups["lora_A"]["lr"] == 2e-4 and groups["lora_A"]["weight_decay"] == 0.1
    assert groups["lora_B"]["lr"] == pytest.approx(16 * 2e-4) and groups["lora_B"]["weight_decay"] == 0.1
    assert groups["no_decay"]["lr"] == 2e-4 and groups["no_decay"]["weight_decay"] == 0.0
    layers = lora_layers(model).values()
    assert {id(p) for p in groups["lora_B"]["params"]} == {id(m.lora_B.weight) for m in layers}
    assert sum(len(g["params"]) for g in groups.values()) == 3 * 4
    plain = param_groups(model, lr=1e-3)
    assert {g["name"]: g["lr"] for g in plain}["lora_B"] == 1e-3
    torch.optim.AdamW(param_groups(model, lr=1e-3, lora_plus_ratio=4))  # the groups are valid optimizer input


# ------------------------------------------------------------------------------------------ quantized bases


QUANT_CASES = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "nf4-double": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "int8": dict(load_in_8bit=True),
}


def _load_quantized(model_dir, case: str):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = dict(QUANT_CASES[case])
    if "load_in_4bit" in kwargs:
        kwargs["bnb_4bit_compute_dtype"] = torch.float32
    return AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=BitsAndBytesConfig(**kwargs),
                                                device_map="cpu", dtype=torch.float32)


@pytest.mark.parametrize("case", list(QUANT_CASES))
def test_quantized_base_trains_adapter_on_cpu(tiny_model_dir, vocab, case):
    model = _load_quantized(tiny_model_dir, case)
    names = attach_lora(model, "all-linear", r=R, alpha=ALPHA)
    assert all(type(m.base_layer).__name__ in ("Linear4bit", "Linear8bitLt") for m in lora_layers(model).values())
    _randomize_b(model)
    model.train()
    ids = _ids(vocab)
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    for layer in lora_layers(model).values():
        assert layer.lora_A.weight.grad.abs().sum() > 0 and layer.lora_B.weight.grad.abs().sum() > 0
    report = param_report(model)
    assert report.wrapped == names
    # 4-bit weights are packed two per byte; the report counts logical parameters, like the fp32 model.
    full = sum(p.numel() for p in build_tiny_llama(vocab).parameters())
    assert report.total == full + report.trainable


@pytest.mark.parametrize("case", list(QUANT_CASES))
def test_dequantized_weight_equals_quantize_roundtrip_of_the_original(tiny_model_dir, vocab, case):
    original = build_tiny_llama(vocab).model.layers[1].mlp.down_proj.weight.detach()
    model = _load_quantized(tiny_model_dir, case)
    layer = model.model.layers[1].mlp.down_proj
    opts = QUANT_CASES[case]
    bits = 4 if "load_in_4bit" in opts else 8
    roundtrip = quantize_roundtrip(original, bits, opts.get("bnb_4bit_quant_type", "nf4"),
                                   opts.get("bnb_4bit_use_double_quant", False))
    torch.testing.assert_close(dequantized_weight(layer).float(), roundtrip, rtol=0, atol=0)
    assert 0 < (roundtrip - original).abs().max() < 0.2 * original.abs().max()
    model.eval()
    with torch.no_grad():
        model(_ids(vocab))  # on AVX512-BF16 CPUs bitsandbytes repacks 4-bit weights here, scales rounded to bf16
    packed_before = layer.weight.data.clone()
    bf16_scale_error = 2**-8 * original.abs().max()  # measured: ~2e-4 of max |W| 0.08
    torch.testing.assert_close(dequantized_weight(layer).float(), roundtrip, rtol=0, atol=bf16_scale_error)
    assert torch.equal(layer.weight.data, packed_before)  # reading the weight left the layer untouched


@pytest.mark.parametrize("case", ["nf4", "int8"])
def test_quantized_adapter_output_matches_dequantized_reference(tiny_model_dir, vocab, case):
    """bitsandbytes' CPU kernels differ from dequantize-then-matmul by a few 1e-3 (relative); the adapter path
    itself must add exactly s·B(A x). Measured: 4-bit ~5e-3, 8-bit ~5e-3 (fp16 activation rounding) of max |y|."""
    model = _load_quantized(tiny_model_dir, case)
    attach_lora(model, ["o_proj"], r=R, alpha=ALPHA)
    _randomize_b(model)
    layer = model.model.layers[0].self_attn.o_proj
    x = torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = layer(x)
        base_only = layer.base_layer(x)
    reference = F.linear(x, dequantized_weight(layer.base_layer).float() + layer.delta())
    torch.testing.assert_close(ours - base_only, F.linear(x, layer.delta()), rtol=1e-5, atol=1e-6)
    assert (ours - reference).abs().max() <= 1e-2 * reference.abs().max()


def test_dora_on_4bit_base_trains_and_merge_is_refused(tiny_model_dir, vocab):
    model = _load_quantized(tiny_model_dir, "nf4-double")
    attach_lora(model, ["q_proj", "up_proj"], r=R, alpha=ALPHA, dora=True)
    layer = model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(layer.lora_magnitude_vector.detach(), dequantized_weight(layer.base_layer).norm(dim=1))
    model.train()
    ids = _ids(vocab)
    model(ids, labels=ids).loss.backward()
    assert layer.lora_magnitude_vector.grad.abs().sum() > 0
    with pytest.raises(LorafitError, match="full precision"):
        layer.merge()
