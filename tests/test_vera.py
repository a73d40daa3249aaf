"""VeRA: shared frozen projections regenerated as PEFT does, trainable scaling vectors, PEFT's VERA format both ways."""

from __future__ import annotations

import json

import pytest
import torch
from test_train import adapter_tensors, assert_qlora_run_merges, make_config, straight_and_resumed, train
from torch import nn

from lorafit.adapters import attach_from_settings, lora_layers, param_groups, param_report
from lorafit.adapters.peft_io import load_adapter
from lorafit.adapters.vera import VeraLinear, share_projections, vera_projections
from lorafit.cli import main
from lorafit.config import AdapterConfig, load_config
from lorafit.errors import LorafitError
from lorafit.parallel import check_config_fits
from lorafit.plan import make_plan

VERA = ("adapter.method=vera",)


def settings(r: int = 4, **kw) -> dict:
    return AdapterConfig(method="vera", r=r, dropout=0.0, **kw).settings()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def peft_vera(model_dir, tmp_path, *, save_projection: bool, seed: int = 5, targets=("q_proj", "v_proj", "down_proj"),
              r: int = 4):
    """A PEFT VeRA adapter with random vectors, saved; returns (its folder, the PEFT model)."""
    from peft import VeraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = VeraConfig(r=r, target_modules=list(targets), projection_prng_key=seed, save_projection=save_projection,
                        d_initial=0.2)
    model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vera_lambda" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
    out = tmp_path / f"peft-vera-{save_projection}"
    model.save_pretrained(out)
    return out, model.eval()


def test_projections_are_peft_s_for_the_same_seed(tiny_model, tmp_path):
    from peft import VeraConfig, get_peft_model

    peft = get_peft_model(tiny_model, VeraConfig(r=4, target_modules="all-linear", projection_prng_key=11))
    a, b = vera_projections(4, 192, 192, seed=11)  # the tiny Llama's largest in and out: the MLP's 192
    assert torch.equal(a, peft.base_model.vera_A["default"]) and torch.equal(b, peft.base_model.vera_B["default"])


def test_forward_delta_and_merge_follow_the_formula_on_sliced_projections():
    torch.manual_seed(0)
    layers = {"wide": VeraLinear(nn.Linear(40, 24), r=4, d_initial=0.1),
              "tall": VeraLinear(nn.Linear(32, 48), r=4, d_initial=0.1)}
    shared = share_projections(layers, seed=2)
    assert shared.vera_A.shape == (4, 40) and shared.vera_B.shape == (48, 4)  # one pair, the largest sizes
    layer = layers["tall"]
    with torch.no_grad():
        layer.vera_lambda_b.normal_()
        layer.vera_lambda_d.normal_()
    x = torch.randn(2, 3, 32)
    a, b = shared.vera_A[:, :32], shared.vera_B[:48, :]
    lb, ld = layer.vera_lambda_b.detach(), layer.vera_lambda_d.detach()
    expected = layer.base_layer(x) + lb * ((ld * (x @ a.T)) @ b.T)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.delta(), torch.diag(lb) @ b @ torch.diag(ld) @ a, rtol=1e-5, atol=1e-6)
        layer.merge()
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
        layer.unmerge()
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_a_fresh_adapter_changes_nothing_and_only_the_vectors_train(tiny_model):
    ids = torch.randint(3, 300, (2, 9))
    with torch.no_grad():
        before = tiny_model(ids).logits
    attach_from_settings(tiny_model, settings(vera={"d_initial": 0.3}))
    with torch.no_grad():
        torch.testing.assert_close(tiny_model(ids).logits, before, rtol=0, atol=0)
    trainable = {n.rpartition(".")[2] for n, p in tiny_model.named_parameters() if p.requires_grad}
    assert trainable == {"vera_lambda_b", "vera_lambda_d"}
    layers = lora_layers(tiny_model)
    assert all(torch.all(layer.vera_lambda_d == 0.3) for layer in layers.values())
    assert param_report(tiny_model).trainable == sum(layer.out_features + 4 for layer in layers.values())
    shared = {id(layer.vera_projections) for layer in layers.values()}
    assert len(shared) == 1  # one pair for the whole model
    groups = param_groups(tiny_model, lr=1e-3, weight_decay=0.1)
    assert [(g["name"], g["weight_decay"]) for g in groups] == [("no_decay", 0.0)]


def test_validate_counts_the_vectors_only(tmp_path, learnable_model_dir, capsys, tiny_model):
    config = make_config(tmp_path, learnable_model_dir)
    plan = make_plan(load_config(config, VERA).config, processes=1, fsdp=False)
    attach_from_settings(tiny_model, settings())
    assert plan.model.adapter_params == param_report(tiny_model).trainable == 1280 + 14 * 4
    with pytest.raises(SystemExit) as info:
        main(["validate", str(config), *VERA])
    assert info.value.code == 0 and "1.34K trainable" in capsys.readouterr().out


def test_a_rank_larger_than_a_target_trains_and_round_trips_through_peft(tmp_path, learnable_model_dir):
    """VeRA's rank may exceed a layer's dimensions (the paper: r = 1024 on 768-wide layers): k_proj is 64 in × 32 out
    and r = 96; PEFT slices its shared projections the same way."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = make_config(tmp_path, learnable_model_dir, max_steps=2)
    assert train(config, *VERA, "adapter.r=96") == 0
    run = tmp_path / "run"
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["r"] == 96
    ids = torch.randint(3, 300, (2, 12))
    ours = AutoModelForCausalLM.from_pretrained(learnable_model_dir, dtype=torch.float32).eval()
    load_adapter(ours, run / "adapter")
    base = AutoModelForCausalLM.from_pretrained(learnable_model_dir, dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, str(run / "adapter")).eval()
    with torch.no_grad():
        want = peft(ids).logits
        assert rel(ours(ids).logits, want) <= 1e-5
        bare = AutoModelForCausalLM.from_pretrained(learnable_model_dir, dtype=torch.float32).eval()
        assert rel(bare(ids).logits, want) > 1e-4  # trained: the adapter changes the model
    folder, peft = peft_vera(learnable_model_dir, tmp_path, save_projection=False, r=96)
    theirs = AutoModelForCausalLM.from_pretrained(learnable_model_dir, dtype=torch.float32).eval()
    load_adapter(theirs, folder)
    with torch.no_grad():
        assert rel(theirs(ids).logits, peft(ids).logits) <= 1e-5


def test_lora_plus_rslora_and_fsdp_are_refused(tmp_path, learnable_model_dir, capsys):
    config = make_config(tmp_path, learnable_model_dir, lora_plus_ratio=16)
    assert train(config, *VERA, "adapter.rslora=true") == 2
    err = capsys.readouterr().err
    assert "train.lora_plus_ratio" in err and "adapter.rslora" in err
    cfg = load_config(make_config(tmp_path, learnable_model_dir, name="fsdp"), VERA).config
    with pytest.raises(LorafitError, match=r"adapter\.method: vera is not supported under FSDP"):
        check_config_fits(cfg)


def test_trains_through_the_cli_saves_peft_vera_and_merges(tmp_path, learnable_model_dir, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = make_config(tmp_path, learnable_model_dir, max_steps=4)
    config.write_text(config.read_text().replace("  packing: false", "  packing: false\n  eval_fraction: 0.1"))
    assert train(config, *VERA, "adapter.vera.projection_seed=9") == 0
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        main(["eval", str(run), "--json", str(tmp_path / "eval.json")])
    scores = json.loads((tmp_path / "eval.json").read_text())
    assert info.value.code == 0 and scores["adapter"]["loss"] < scores["base"]["loss"]
    saved = adapter_tensors(run)
    assert {k.rpartition(".")[2] for k in saved} == {"vera_lambda_b", "vera_lambda_d"}
    assert all(saved[k].abs().sum() > 0 for k in saved if k.endswith("vera_lambda_b"))  # b started at 0: it learned
    cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["projection_prng_key"], cfg["save_projection"], cfg["r"]) == ("VERA", 9, False, 4)
    assert "lora_alpha" not in cfg and "use_dora" not in cfg
    ids = torch.randint(3, 300, (2, 12))
    ours = AutoModelForCausalLM.from_pretrained(learnable_model_dir, dtype=torch.float32).eval()
    load_adapter(ours, run / "adapter")
    base = AutoModelForCausalLM.from_pretrained(learnable_model_dir, dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, str(run / "adapter")).eval()
    with torch.no_grad():
        assert rel(ours(ids).logits, peft(ids).logits) <= 1e-5
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["merge", str(run), "--out", str(tmp_path / "merged")])
    assert info.value.code == 0, capsys.readouterr().err  # merge verifies the merged logits itself


@pytest.mark.parametrize("save_projection", [True, False])
def test_peft_saved_adapters_load_with_equal_logits_and_merge(tmp_path, learnable_model_dir, capsys,
                                                              save_projection):
    from transformers import AutoModelForCausalLM

    folder, peft = peft_vera(learnable_model_dir, tmp_path, save_projection=save_projection)
    if save_projection:  # the saved pair wins over the key (a key that would regenerate other projections)
        path = folder / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "projection_prng_key": 1234}))
    ids = torch.randint(3, 300, (2, 12))
    ours = AutoModelForCausalLM.from_pretrained(learnable_model_dir, dtype=torch.float32).eval()
    loaded = load_adapter(ours, folder)
    assert len(loaded.wrapped) == 6 and loaded.r == 4
    with torch.no_grad():
        assert rel(ours(ids).logits, peft(ids).logits) <= 1e-5
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["merge", str(folder), "--out", str(tmp_path / "merged")])
    assert info.value.code == 0, capsys.readouterr().err


def test_resume_equals_a_straight_run(tmp_path, learnable_model_dir):
    straight, resumed = straight_and_resumed(tmp_path, learnable_model_dir, *VERA)
    a, b = adapter_tensors(straight), adapter_tensors(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_qlora_base_trains_and_merges(tmp_path, learnable_model_dir, capsys):
    assert_qlora_run_merges(tmp_path, learnable_model_dir, capsys, *VERA)


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path, learnable_model_dir):
    from test_distributed import one_and_two_processes
    from test_train import metrics

    one, two = one_and_two_processes(tmp_path, learnable_model_dir, "vera")
    for x, y in zip(metrics(one), metrics(two), strict=True):
        for key in ("loss", "grad_norm"):
            assert abs(x[key] - y[key]) <= 1e-4 * abs(x[key]), (x["step"], key)
    a, b = adapter_tensors(one), adapter_tensors(two)
    assert a.keys() == b.keys() and any(a[k].abs().sum() > 0 for k in a if k.endswith("vera_lambda_b"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-4 * a[k].abs().max().item())


def test_several_adapters_per_row_each_see_their_own_projections(tmp_path, learnable_model_dir):
    from transformers import AutoModelForCausalLM

    from lorafit.adapters.multi import AdapterBank, take_adapter_layers

    folders = {"a": peft_vera(learnable_model_dir, tmp_path, save_projection=False, seed=5)[0],
               "b": peft_vera(learnable_model_dir, tmp_path / "b", save_projection=True, seed=6,
                              targets=("k_proj", "up_proj"))[0]}
    ids = torch.randint(3, 300, (3, 10))
    alone = {}
    for name, folder in folders.items():
        model = AutoModelForCausalLM.from_pretrained(learnable_model_dir, dtype=torch.float32).eval()
        load_adapter(model, folder)
        with torch.no_grad():
            alone[name] = model(ids).logits
    model = AutoModelForCausalLM.from_pretrained(learnable_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        base = model(ids).logits
    bank = AdapterBank(model)
    for name, folder in folders.items():
        with bank.detached() as bare:
            load_adapter(bare, folder)
            layers = take_adapter_layers(bare)
        bank.add(name, layers)
    with bank.rows(["b", None, "a"]) as mixed, torch.no_grad():
        out = mixed(ids).logits
    for row, want in enumerate([alone["b"], base, alone["a"]]):
        torch.testing.assert_close(out[row], want[row], rtol=1e-5, atol=1e-5)
