"""PiSSA, OLoRA and LoftQ initialisation (`lorafit.adapters.svd_init`): checked against the math (numpy's own SVD
and QR), against PEFT (the converted adapter loads there with the same logits), through the CLI (train, merge,
resume), and on 4-bit / 8-bit bases."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from conftest import build_tiny_llama
from safetensors.torch import load_file
from test_config import minimal_with, problems_of, write
from test_train import adapter_tensors, make_config, train

from lorafit.adapters import (
    attach_from_settings,
    attach_lora,
    dequantized_weight,
    find_targets,
    is_quantized,
    lora_layers,
    quantize_roundtrip,
)
from lorafit.adapters.peft_io import load_adapter, save_adapter
from lorafit.adapters.svd_init import keep_original_weights, randomized_svd
from lorafit.cli import main
from lorafit.config import AdapterConfig, ModelConfig
from lorafit.errors import LorafitError
from lorafit.merge import max_relative_difference
from lorafit.model import load_model, original_weights

R, ALPHA = 4, 12.0  # alpha != r: a conversion that lost the scale would show
NF4 = {"bits": 4, "type": "nf4", "double_quant": True, "compute_dtype": "float32"}
INT8 = {"bits": 8}


def sample_ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(5))


@torch.no_grad()
def logits(model, ids) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes: int8 inputs cast to fp16
        return model(input_ids=ids).logits.float()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return max_relative_difference([a], [b])


def settings(**adapter) -> dict:
    return AdapterConfig(**{"r": R, "alpha": ALPHA, "dropout": 0.0, **adapter}).settings()


@torch.no_grad()
def train_a_little(model, seed: int = 3) -> None:
    """Move A, B (and DoRA's magnitude) away from their initial values, as training would."""
    gen = torch.Generator().manual_seed(seed)
    for layer in lora_layers(model).values():
        for p in layer.parameters():
            if p.requires_grad:
                p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=gen))


def quantized_with_originals(model_dir, quant: dict, init: str, **adapter):
    """A 4/8-bit load of `model_dir` with the adapter attached as `lorafit train` does it (full-precision weights
    handed over first). Returns (model, {name: W})."""
    model = load_model(str(model_dir), dtype="float32", quantization=quant)
    names = [n for n in find_targets(model, "all-linear") if is_quantized(model.get_submodule(n))]
    weights = original_weights(ModelConfig(path=str(model_dir), dtype="float32"), names)
    keep_original_weights(model, weights)
    attach_from_settings(model, settings(init=init, **adapter))
    return model, weights


# ------------------------------------------------------------------------------------------------ the math


@pytest.mark.parametrize("init", ["pissa", "olora", "pissa_niter_2"])
@pytest.mark.parametrize("dora", [False, True])
def test_svd_inits_start_at_the_base_models_logits(init, dora, tiny_tokenizer):
    vocab = len(tiny_tokenizer)
    ids = sample_ids(vocab)
    original = build_tiny_llama(vocab)
    weights = {n: m.weight.detach().clone() for n, m in original.named_modules() if isinstance(m, torch.nn.Linear)}
    model = build_tiny_llama(vocab)
    attach_lora(model, "all-linear", r=R, alpha=ALPHA, dora=dora, init=init)
    assert rel(logits(model, ids), logits(original, ids)) < 1e-5  # measured ~5e-7
    for name, layer in lora_layers(model).items():
        b0a0 = layer.lora_B0 @ layer.lora_A0
        assert torch.equal(layer.lora_A.weight, layer.lora_A0) and torch.equal(layer.lora_B.weight, layer.lora_B0)
        assert torch.allclose(layer.base_layer.weight, weights[name] - layer.scale * b0a0, atol=1e-6)  # residual
        assert layer.scale * b0a0.abs().max() > 0.1 * weights[name].abs().max()  # a real part of W, not ~0


def test_pissa_factors_are_the_top_singular_part_of_the_weight(tiny_model):
    weight = tiny_model.model.layers[0].mlp.down_proj.weight.detach().clone()  # (64, 192)
    attach_lora(tiny_model, ["down_proj"], r=R, alpha=ALPHA, init="pissa")
    layer = lora_layers(tiny_model)["model.layers.0.mlp.down_proj"]
    u, s, vh = np.linalg.svd(weight.double().numpy(), full_matrices=False)  # numpy's SVD as the reference
    principal = (u[:, :R] * s[:R]) @ vh[:R]
    a, b = layer.lora_A.weight.detach().double().numpy(), layer.lora_B.weight.detach().double().numpy()
    np.testing.assert_allclose(layer.scale * b @ a, principal, atol=1e-5)
    np.testing.assert_allclose(a @ a.T, np.diag(s[:R] / layer.scale), atol=1e-5)  # A = sqrt(S/s) Vᵀ: rows orthogonal
    np.testing.assert_allclose(b.T @ b, np.diag(s[:R] / layer.scale), atol=1e-5)  # B = U sqrt(S/s)


def test_olora_factors_are_the_leading_part_of_the_qr_decomposition(tiny_model):
    weight = tiny_model.model.layers[1].self_attn.q_proj.weight.detach().clone()  # (64, 64)
    attach_lora(tiny_model, ["q_proj"], r=R, alpha=ALPHA, init="olora")
    layer = lora_layers(tiny_model)["model.layers.1.self_attn.q_proj"]
    a, b = layer.lora_A.weight.detach().double().numpy(), layer.lora_B.weight.detach().double().numpy()
    q, rr = np.linalg.qr(weight.double().numpy())
    np.testing.assert_allclose(np.abs(b), np.abs(q[:, :R]), atol=1e-5)  # Q's columns, up to sign
    np.testing.assert_allclose(b.T @ b, np.eye(R), atol=1e-5)
    np.testing.assert_allclose(np.tril(a[:, :R], -1), 0, atol=1e-6)  # R is upper triangular
    # W = QR and R's lower rows vanish on the first r columns: B A reproduces W's first r columns exactly
    np.testing.assert_allclose(b @ a[:, :R], weight.double().numpy()[:, :R], atol=1e-5)


def test_randomized_svd_finds_the_top_singular_part_and_is_deterministic():
    gen = torch.Generator().manual_seed(0)
    low = torch.randn(96, 6, generator=gen) @ torch.randn(6, 160, generator=gen) * torch.linspace(3, 1, 160)
    weight = low + 0.01 * torch.randn(96, 160, generator=gen)  # a decaying spectrum, as trained weights have
    u, s, vh = randomized_svd(weight, 4, niter=2)
    ref_u, ref_s, ref_vh = torch.linalg.svd(weight.double(), full_matrices=False)
    torch.testing.assert_close(s.double(), ref_s[:4], rtol=1e-4, atol=0)
    top = (ref_u[:, :4] * ref_s[:4]) @ ref_vh[:4]
    assert ((u * s) @ vh - top).norm() / top.norm() < 1e-4
    again = randomized_svd(weight, 4, niter=2)
    assert all(torch.equal(x, y) for x, y in zip((u, s, vh), again))  # resume recomputes the same factors


def test_a_rank_larger_than_the_layer_is_refused_naming_adapter_r(tiny_model):
    with pytest.raises(LorafitError, match=r"adapter\.r: 65 is larger than the smaller dimension \(64\)"):
        attach_lora(tiny_model, ["q_proj"], r=65, alpha=ALPHA, init="pissa")


# ------------------------------------------------------------------------------------------------ saving


@pytest.mark.parametrize("init,extra", [("pissa", {}), ("olora", {}), ("pissa", {"method": "dora"}),
                                        ("pissa", {"rslora": True}), ("olora", {"method": "dora", "rslora": True})])
def test_saved_adapter_is_a_rank_2r_lora_on_the_original_base_in_lorafit_and_peft(init, extra, tmp_path,
                                                                                   tiny_tokenizer):
    from peft import PeftModel

    vocab = len(tiny_tokenizer)
    ids = sample_ids(vocab)
    model = build_tiny_llama(vocab)
    s = settings(init=init, **extra)
    attach_from_settings(model, s)
    train_a_little(model)
    trained = logits(model, ids)
    assert rel(trained, logits(build_tiny_llama(vocab), ids)) > 1e-3  # the adapter does change the model
    out = save_adapter(model, tmp_path / "adapter", base_model_name_or_path="tiny", r=R, alpha=ALPHA, dropout=0.0,
                       targets="all-linear", rslora=s["rslora"], dora=s["method"] == "dora", settings=s)
    config = json.loads((out / "adapter_config.json").read_text())
    scale = ALPHA / (R ** 0.5 if s["rslora"] else R)
    assert config["r"] == 2 * R and config["init_lora_weights"] is True
    assert config["lora_alpha"] / ((2 * R) ** 0.5 if s["rslora"] else 2 * R) == pytest.approx(scale)
    tensors = load_file(out / "adapter_model.safetensors")
    assert all(t.shape[0] == 2 * R for k, t in tensors.items() if "lora_A" in k)

    ours = build_tiny_llama(vocab)  # the original base, untouched
    load_adapter(ours, out)
    assert rel(logits(ours, ids), trained) < 1e-5
    theirs = PeftModel.from_pretrained(build_tiny_llama(vocab), str(out)).eval()
    assert rel(logits(theirs, ids), trained) < 1e-5


def test_loftq_adapter_saves_unconverted(tmp_path, tiny_model_dir):
    model, _ = quantized_with_originals(tiny_model_dir, NF4, "loftq")
    s = settings(init="loftq")
    out = save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(tiny_model_dir), r=R, alpha=ALPHA,
                       dropout=0.0, targets="all-linear", settings=s)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == R and config["lora_alpha"] == ALPHA
    saved = load_file(out / "adapter_model.safetensors")
    for name, layer in lora_layers(model).items():
        assert torch.equal(saved[f"base_model.model.{name}.lora_A.weight"], layer.lora_A.weight)


# ------------------------------------------------------------------------------------------------ quantized bases


@pytest.mark.parametrize("quant", [NF4, INT8], ids=["nf4", "int8"])
def test_on_a_quantized_base_the_residual_is_what_is_quantized(quant, tiny_model_dir):
    model, weights = quantized_with_originals(tiny_model_dir, quant, "pissa")
    ordinary = load_model(str(tiny_model_dir), dtype="float32", quantization=quant)
    for name, layer in lora_layers(model).items():  # before any forward (the CPU kernel repacks 4-bit weights)
        residual = weights[name] - layer.scale * (layer.lora_B0 @ layer.lora_A0)
        expected = quantize_roundtrip(residual, quant["bits"], quant.get("type", "nf4"), quant.get("double_quant", False))
        assert torch.equal(dequantized_weight(layer.base_layer).float(), expected.float()), name
        assert not torch.equal(expected, dequantized_weight(ordinary.get_submodule(name)).float())
    full = load_model(str(tiny_model_dir), dtype="float32")
    ids = sample_ids(full.config.vocab_size)
    exact, quantized = logits(full, ids), logits(ordinary, ids)
    # The principal part stays in full precision: only the smaller residual loses bits (QPiSSA)
    assert rel(logits(model, ids), exact) < rel(quantized, exact)


@pytest.mark.parametrize("quant", [NF4, INT8], ids=["nf4", "int8"])
def test_loftq_brings_the_quantized_model_closer_to_full_precision(quant, tiny_model_dir):
    full = load_model(str(tiny_model_dir), dtype="float32")
    ordinary = load_model(str(tiny_model_dir), dtype="float32", quantization=quant)
    model, weights = quantized_with_originals(tiny_model_dir, quant, "loftq", r=8, alpha=16)
    for name, layer in lora_layers(model).items():
        base = dequantized_weight(layer.base_layer).float()
        assert torch.equal(base, dequantized_weight(ordinary.get_submodule(name)).float())  # the ordinary load
        error = (weights[name] - base).double()
        tail = torch.linalg.svdvals(error)[8:]  # Eckart–Young: the best rank-8 fit leaves exactly this
        left = (error - layer.delta().detach().double()).norm()
        assert left == pytest.approx(tail.norm().item(), rel=1e-4) and left < 0.9 * error.norm()
    ids = sample_ids(full.config.vocab_size)
    exact = logits(full, ids)
    before, after = rel(logits(ordinary, ids), exact), rel(logits(model, ids), exact)
    assert after < before  # measured nf4: 1.20e-1 -> 8.5e-2; int8: 9.1e-3 -> 8.7e-3
    if quant["bits"] == 4:
        assert after < 0.85 * before


def test_loftq_honours_layers_and_rank_and_alpha_patterns(tmp_path, tiny_model_dir):
    """Each module gets its own rank and alpha from the patterns, and its factors are the best fit of the
    quantization error at *that* rank; the saved adapter reads back to the same model."""
    patterns = dict(layers=[1], rank_pattern={"q_proj": 6, "mlp\\.down_proj": 2}, alpha_pattern={"q_proj": 3.0})
    model, weights = quantized_with_originals(tiny_model_dir, NF4, "loftq", **patterns)
    layers = lora_layers(model)
    assert layers and all(n.startswith("model.layers.1.") for n in layers)
    expected_r = {"self_attn.q_proj": 6, "mlp.down_proj": 2}
    for name, layer in layers.items():
        r = expected_r.get(name.removeprefix("model.layers.1."), R)
        assert layer.r == r and layer.scale == pytest.approx((3.0 if name.endswith("q_proj") else ALPHA) / r), name
        error = (weights[name] - dequantized_weight(layer.base_layer).float()).double()
        tail = torch.linalg.svdvals(error)[r:]  # Eckart–Young at the module's own rank
        assert (error - layer.delta().detach().double()).norm() == pytest.approx(tail.norm().item(), rel=1e-4), name
    s = settings(init="loftq", **patterns)
    out = save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(tiny_model_dir), r=R, alpha=ALPHA,
                       dropout=0.0, targets="all-linear", settings=s)
    config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(config["rank_pattern"].values()) == [2, 6] and list(config["alpha_pattern"].values()) == [3.0]
    ids = sample_ids(model.config.vocab_size)
    again = load_model(str(tiny_model_dir), dtype="float32", quantization=NF4)
    load_adapter(again, out)
    assert {n: m.r for n, m in lora_layers(again).items()} == {n: m.r for n, m in layers.items()}
    torch.testing.assert_close(logits(again, ids), logits(model, ids), rtol=0, atol=0)


def test_loftq_without_the_full_precision_weights_is_refused(tiny_model_dir):
    model = load_model(str(tiny_model_dir), dtype="float32", quantization=NF4)
    with pytest.raises(LorafitError, match="loftq needs the full-precision weights"):
        attach_from_settings(model, settings(init="loftq"))


# ------------------------------------------------------------------------------------------------ the CLI


def _pissa_trained_model(model_dir, adapter_dir, s):
    """The model as training left it, rebuilt independently: a fresh base, the same (deterministic) PiSSA init, and
    the trained A, B read off the first r rows / columns of the converted adapter."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    attach_from_settings(model, s)
    saved = load_file(adapter_dir / "adapter_model.safetensors")
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            a, b = saved[f"base_model.model.{name}.lora_A.weight"], saved[f"base_model.model.{name}.lora_B.weight"]
            assert torch.equal(a[R:], layer.lora_A0) and torch.equal(b[:, R:], -layer.lora_B0)  # the same SVD again
            layer.lora_A.weight.copy_(a[:R])
            layer.lora_B.weight.copy_(b[:, :R])
    return model


def test_cli_pissa_run_merges_into_the_trained_model(tmp_path, learnable_model_dir, capsys):
    from transformers import AutoModelForCausalLM

    config = make_config(tmp_path, learnable_model_dir, max_steps=4)
    assert train(config, "adapter.init=pissa") == 0
    run = tmp_path / "run"
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["r"] == 2 * R
    with pytest.raises(SystemExit) as info:
        main(["merge", str(run), "--out", str(tmp_path / "merged"), "--dtype", "float32"])
    assert info.value.code == 0, capsys.readouterr().err
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    trained = _pissa_trained_model(learnable_model_dir, run / "adapter",
                                   settings(init="pissa", alpha=12, r=4, dropout=0.0))
    ids = sample_ids(merged.config.vocab_size)
    base = AutoModelForCausalLM.from_pretrained(str(learnable_model_dir), dtype=torch.float32).eval()
    assert rel(logits(trained, ids), logits(base, ids)) > 1e-3  # it trained
    assert rel(logits(merged, ids), logits(trained, ids)) < 1e-5


@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "nf4"])
def test_pissa_resume_gives_a_bit_identical_adapter(quantized, tmp_path, learnable_model_dir):
    config = make_config(tmp_path, learnable_model_dir, max_steps=4, save_every=2, keep_checkpoints=10)
    extra = ["adapter.init=pissa", "adapter.dropout=0.1"]  # dropout: the resumed RNG must match too
    if quantized:
        extra += ["model.quantization.bits=4", "model.quantization.compute_dtype=float32"]
    assert train(config, *extra) == 0
    run = tmp_path / "run"
    straight = adapter_tensors(run)
    shutil.rmtree(run / "adapter")  # back to the state after step 2's checkpoint
    assert [p.name for p in (run / "checkpoints").glob("step-*")] == ["step-000002"]
    assert train(config, *extra, "--resume") == 0
    resumed = adapter_tensors(run)
    assert straight.keys() == resumed.keys()
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k


def test_cli_loftq_run_trains_on_the_ordinary_4bit_base_and_merges(tmp_path, learnable_model_dir, capsys):
    config = make_config(tmp_path, learnable_model_dir, max_steps=2)
    assert train(config, "adapter.init=loftq", "model.quantization.bits=4",
                 "model.quantization.compute_dtype=float32") == 0
    run = tmp_path / "run"
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["r"] == R
    with pytest.raises(SystemExit) as info:
        main(["merge", str(run), "--out", str(tmp_path / "merged"), "--dtype", "float32"])
    assert info.value.code == 0, capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("snippet,message", [
    ("adapter:\n  init: olora\n  pissa_niter: 4\n", "adapter.pissa_niter: applies to init pissa only"),
    ("adapter:\n  init: pissa\n  method: vera\n", "adapter.init: pissa sets LoRA's A and B from the weight; method vera"),
    ("adapter:\n  init: loftq\n  init_iters: 3\nmodel:\n  path: m\n  quantization: {bits: 4}\n",
     "adapter.init_iters: 3; lorafit's loftq keeps the ordinary quantized load"),
])
def test_inits_that_cannot_apply_are_refused_naming_the_key(snippet, message, tmp_path):
    path = write(tmp_path / "c.yaml", minimal_with(snippet))
    assert any(message in p for p in problems_of(path)), problems_of(path)


def test_pissa_niter_is_accepted_with_pissa(tmp_path):
    from lorafit.config import load_config

    path = write(tmp_path / "c.yaml", minimal_with("adapter:\n  init: pissa\n  pissa_niter: 4\n"))
    s = load_config(path).config.adapter.settings()
    assert s["pissa_niter"] == 4 and AdapterConfig().pissa_niter is None


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_residual_inits_are_refused_under_fsdp(init):
    from lorafit import parallel

    with pytest.raises(LorafitError, match=f"adapter.init: {init} is not supported under FSDP"):
        parallel.check_sharding_fits(quant_bits=None, dora=False, precision="bf16", optimizer="adamw", init=init)


def test_cli_4bit_pissa_run_merges_into_the_model_it_trained(tmp_path, learnable_model_dir, capsys):
    """The run trained on Q(W − s·B0 A0) + s·B A; merge rebuilds exactly that, not Q(W) + the converted adapter."""
    from transformers import AutoModelForCausalLM

    config = make_config(tmp_path, learnable_model_dir, max_steps=3)
    quant = {"bits": 4, "type": "nf4", "double_quant": True, "compute_dtype": "float32"}
    assert train(config, "adapter.init=pissa", "model.quantization.bits=4",
                 "model.quantization.compute_dtype=float32") == 0
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        main(["merge", str(run), "--out", str(tmp_path / "merged"), "--dtype", "float32"])
    assert info.value.code == 0, capsys.readouterr().err
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()

    # The trained model in exact math, rebuilt independently: the same init on a fresh 4-bit load (before any forward,
    # so its weights dequantize exactly), those weights in a float32 model, and the trained A, B on top.
    quantized, _ = quantized_with_originals(learnable_model_dir, quant, "pissa")
    saved = load_file(run / "adapter" / "adapter_model.safetensors")
    exact = AutoModelForCausalLM.from_pretrained(str(learnable_model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, layer in lora_layers(quantized).items():
            exact.get_submodule(name).weight.copy_(dequantized_weight(layer.base_layer).float())
    attach_lora(exact, "all-linear", r=R, alpha=ALPHA)
    with torch.no_grad():
        for name, layer in lora_layers(exact).items():
            layer.lora_A.weight.copy_(saved[f"base_model.model.{name}.lora_A.weight"][:R])
            layer.lora_B.weight.copy_(saved[f"base_model.model.{name}.lora_B.weight"][:, :R])
    ids = sample_ids(merged.config.vocab_size)
    assert rel(logits(merged, ids), logits(exact, ids)) < 1e-5

    naive = load_model(str(learnable_model_dir), dtype="float32", quantization=quant)  # the ordinary 4-bit load
    load_adapter(naive, run / "adapter")
    assert rel(logits(naive, ids), logits(exact, ids)) > 0.1  # why merge must not use Q(W): measured ~1

    # eval and generate run that ordinary load: they say so and point to the merged model; the merged folder is quiet
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["generate", str(run), "--prompt", "hello", "--max-new-tokens", "2"])
    assert info.value.code == 0
    assert "quantized residual" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["generate", str(tmp_path / "merged"), "--prompt", "hello", "--max-new-tokens", "2"])
    assert info.value.code == 0 and "quantized residual" not in capsys.readouterr().err


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_svd_inits_on_gpt2_conv1d_layers_start_at_the_base_and_save_for_peft(init, tmp_path):
    from peft import PeftModel
    from test_conv1d import build_gpt2, ids

    model = build_gpt2()
    attach_from_settings(model, settings(init=init, targets=["c_attn", "c_fc"]))
    assert rel(logits(model, ids()), logits(build_gpt2(), ids())) < 1e-5
    train_a_little(model)
    trained = logits(model, ids())
    out = save_adapter(model, tmp_path / "a", base_model_name_or_path="gpt2", r=R, alpha=ALPHA, dropout=0.0,
                       targets=["c_attn", "c_fc"], settings=settings(init=init))
    theirs = PeftModel.from_pretrained(build_gpt2(), str(out)).eval()
    assert rel(logits(theirs, ids()), trained) < 1e-5
