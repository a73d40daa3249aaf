"""LoRA-FA: A frozen at its initialisation, only B trains, backward keeps the r-wide projection instead of the input;
saved as a plain PEFT LoRA adapter."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_train import adapter_tensors, assert_qlora_run_merges, make_config, straight_and_resumed, train
from torch import nn

from lorafit import checkpoint
from lorafit.adapters import attach_from_settings, lora_layers, param_groups, param_report
from lorafit.adapters.lora import LoraLinear
from lorafit.adapters.lora_fa import LoraFALinear, frozen_a_update
from lorafit.cli import main
from lorafit.config import AdapterConfig, load_config
from lorafit.errors import LorafitError
from lorafit.parallel import check_config_fits
from lorafit.plan import make_plan

FA = ("adapter.method=lora_fa",)


def settings(**kw) -> dict:
    return AdapterConfig(method="lora_fa", r=4, alpha=12, dropout=0.0, **kw).settings()


def saved_bytes(layer: nn.Module, x: torch.Tensor) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of every tensor autograd keeps for backward during `layer(x)`, parameters left out."""
    params = {p.data_ptr() for p in layer.parameters()}
    kept = []

    def pack(t):
        if t.data_ptr() not in params:
            kept.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return kept


def nbytes(kept) -> int:
    return sum(torch.Size(s).numel() * torch.empty((), dtype=d).element_size() for s, d in kept)


def test_forward_and_gradients_equal_lora_math_with_a_frozen():
    torch.manual_seed(0)
    layer = LoraFALinear(nn.Linear(32, 48), r=4, alpha=12.0)
    nn.init.normal_(layer.lora_B.weight, std=0.1)
    x = torch.randn(3, 5, 32, requires_grad=True)
    y = layer(x)
    w, b, a, bb = layer.base_layer.weight, layer.base_layer.bias, layer.lora_A.weight, layer.lora_B.weight
    x2 = x.detach().clone().requires_grad_()
    b2 = bb.detach().clone().requires_grad_()
    ref = x2 @ w.T + b + (12.0 / 4) * (x2 @ a.T) @ b2.T  # A a constant: autograd's own gradients of the LoRA formula
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bb.grad, b2.grad, rtol=1e-5, atol=1e-6)
    assert a.grad is None and not a.requires_grad


def test_backward_with_dropout_matches_numerical_gradients():
    torch.manual_seed(1)
    a = torch.randn(3, 6, dtype=torch.float64)
    x = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)

    def f(x, b):
        torch.manual_seed(123)  # the same dropout mask at every evaluation gradcheck makes
        return frozen_a_update(x, a, b, 2.5, 0.3)

    assert torch.autograd.gradcheck(f, (x, b))
    assert (f(x, b) != 0).any()


def test_keeps_only_the_rank_wide_projection_for_backward_where_lora_keeps_the_input():
    torch.manual_seed(0)
    x = torch.randn(4, 16, 128, requires_grad=True)  # (batch, positions, in)
    fa = LoraFALinear(nn.Linear(128, 256, bias=False), r=8, alpha=16).train()
    lora = LoraLinear(nn.Linear(128, 256, bias=False), r=8, alpha=16).train()
    # the frozen base keeps nothing; LoRA keeps x (for A's gradient) and x A^T; LoRA-FA only x A^T
    assert saved_bytes(fa, x) == [((4, 16, 8), torch.float32)]
    assert nbytes(saved_bytes(lora, x)) == x.numel() * 4 + 4 * 16 * 8 * 4
    fa_drop = LoraFALinear(nn.Linear(128, 256, bias=False), r=8, alpha=16, dropout=0.1).train()
    lora_drop = LoraLinear(nn.Linear(128, 256, bias=False), r=8, alpha=16, dropout=0.1).train()
    # with dropout: a one-byte mask per input element instead of float copies
    assert sorted(saved_bytes(fa_drop, x)) == [((4, 16, 8), torch.float32), ((4, 16, 128), torch.bool)]
    assert nbytes(saved_bytes(fa_drop, x)) < nbytes(saved_bytes(lora_drop, x)) / 4


def test_backward_under_bf16_autocast_gives_fp32_gradients_close_to_fp32_ones():
    torch.manual_seed(0)
    layer = LoraFALinear(nn.Linear(64, 64), r=4, alpha=8.0)
    nn.init.normal_(layer.lora_B.weight, std=0.1)
    x = torch.randn(2, 8, 64, requires_grad=True)
    layer(x).square().sum().backward()
    exact = layer.lora_B.weight.grad.clone()
    layer.lora_B.weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x).float().square().sum().backward()
    assert layer.lora_B.weight.grad.dtype == torch.float32
    torch.testing.assert_close(layer.lora_B.weight.grad, exact, rtol=5e-2, atol=5e-2 * exact.abs().max().item())


def test_only_b_trains_and_the_plan_counts_b_only(tiny_model, tmp_path, learnable_model_dir):
    attach_from_settings(tiny_model, settings())
    trainable = [n for n, p in tiny_model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith("lora_B.weight") for n in trainable)
    layers = lora_layers(tiny_model)
    assert param_report(tiny_model).trainable == sum(4 * layer.out_features for layer in layers.values())
    groups = param_groups(tiny_model, lr=1e-3)
    assert [g["name"] for g in groups] == ["lora_B"]
    config = make_config(tmp_path, learnable_model_dir)
    plan = make_plan(load_config(config, FA).config, processes=1, fsdp=False)
    assert plan.model.adapter_params == param_report(tiny_model).trainable  # the same architecture


def test_validate_shows_the_b_only_count(tmp_path, learnable_model_dir, capsys):
    config = make_config(tmp_path, learnable_model_dir)
    with pytest.raises(SystemExit) as info:
        main(["validate", str(config), *FA])
    assert info.value.code == 0
    assert "5.12K trainable" in capsys.readouterr().out  # 4 × (64+32+32+64+192+192+64) outputs × 2 layers


def test_trains_through_the_cli_keeps_a_and_loads_in_peft_and_merges(tmp_path, learnable_model_dir, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = make_config(tmp_path, learnable_model_dir, max_steps=4)
    assert train(config, *FA) == 0
    run = tmp_path / "run"
    saved = adapter_tensors(run)
    cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 12
    # A is what the run initialised (train seeds torch with train.seed right before attaching), B has learned
    fresh = AutoModelForCausalLM.from_pretrained(learnable_model_dir, dtype=torch.float32)
    torch.manual_seed(7)
    attach_from_settings(fresh, settings())
    for name, layer in lora_layers(fresh).items():
        assert torch.equal(saved[f"base_model.model.{name}.lora_A.weight"], layer.lora_A.weight)
    assert all(saved[k].abs().sum() > 0 for k in saved if "lora_B" in k)
    # PEFT reads it as the LoRA it is: the same logits as lorafit's own load
    from lorafit.adapters.peft_io import load_adapter

    ids = torch.randint(3, 300, (2, 12))
    ours = AutoModelForCausalLM.from_pretrained(learnable_model_dir, dtype=torch.float32).eval()
    load_adapter(ours, run / "adapter")
    base = AutoModelForCausalLM.from_pretrained(learnable_model_dir, dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, str(run / "adapter")).eval()
    with torch.no_grad():
        a, b = ours(ids).logits, peft(ids).logits
    assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-5
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["merge", str(run), "--out", str(tmp_path / "merged")])
    assert info.value.code == 0, capsys.readouterr().err  # merge verifies the merged logits itself


def test_resume_restores_a_from_the_checkpoint_and_equals_a_straight_run(tmp_path, learnable_model_dir):
    straight, resumed = straight_and_resumed(tmp_path, learnable_model_dir, *FA)
    ckpt = resumed / "checkpoints" / "step-000004"
    state = torch.load(ckpt / checkpoint.METHOD_STATE, weights_only=True)["lora_A"]
    assert len(state) == 14 and "lora_A.weight" not in "".join(load_file(ckpt / "trainable.safetensors"))
    a, b = adapter_tensors(straight), adapter_tensors(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for name, tensor in state.items():
        assert torch.equal(b[f"base_model.model.{name}.lora_A.weight"], tensor)


def test_qlora_base_trains_and_merges(tmp_path, learnable_model_dir, capsys):
    assert_qlora_run_merges(tmp_path, learnable_model_dir, capsys, *FA)


def test_lora_plus_and_fsdp_are_refused_naming_the_key(tmp_path, learnable_model_dir, capsys):
    config = make_config(tmp_path, learnable_model_dir, lora_plus_ratio=16)
    assert train(config, *FA) == 2
    err = capsys.readouterr().err
    assert "train.lora_plus_ratio" in err and "lora_fa" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
    cfg = load_config(make_config(tmp_path, learnable_model_dir, name="fsdp"), FA).config
    with pytest.raises(LorafitError, match=r"adapter\.method: lora_fa is not supported under FSDP"):
        check_config_fits(cfg)


@pytest.mark.slow
def test_two_processes_equal_one_with_a_frozen(tmp_path, learnable_model_dir):
    from test_distributed import one_and_two_processes
    from test_train import assert_same_training

    one, two = one_and_two_processes(tmp_path, learnable_model_dir, "lora_fa")
    assert_same_training(one, two, rtol=1e-4)
    a, b = adapter_tensors(one), adapter_tensors(two)
    assert all(torch.equal(a[k], b[k]) for k in a if "lora_A" in k)  # every process started from the same A


def test_with_an_olora_start_a_stays_frozen_and_the_converted_adapter_merges(tmp_path, learnable_model_dir, capsys):
    config = make_config(tmp_path, learnable_model_dir, max_steps=3)
    assert train(config, *FA, "adapter.init=olora") == 0
    assert "5,120 trainable" in capsys.readouterr().out  # B only, as with the random start
    cfg = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 8  # saved as the equivalent rank-2r LoRA on the original base
    with pytest.raises(SystemExit) as info:
        main(["merge", str(tmp_path / "run"), "--out", str(tmp_path / "merged")])
    assert info.value.code == 0, capsys.readouterr().err
