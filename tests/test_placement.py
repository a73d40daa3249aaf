"""Placement as pure functions: ranks at the budget of uniform r, within bounds, the uniform scale kept, and
pattern keys that PEFT resolves to exactly the intended module."""

from __future__ import annotations

import math
import random
import re

import pytest
import torch

from lorafit.adapters.placement import (
    allocate_ranks,
    allocation,
    compact_ranks,
    exact_key,
    filter_layers,
    layer_index,
    layer_ranges,
    pattern_value,
    saved_patterns,
    scaled_alpha,
)
from lorafit.errors import ConfigError, LorafitError

R, ALPHA = 8, 20.0


def _model_shapes(layers: int = 6) -> dict[str, tuple[int, int]]:
    """A Llama-like module list: (in, out) per projection."""
    proj = {"self_attn.q_proj": (512, 512), "self_attn.k_proj": (512, 128), "self_attn.v_proj": (512, 128),
            "self_attn.o_proj": (512, 512), "mlp.gate_proj": (512, 1376), "mlp.up_proj": (512, 1376),
            "mlp.down_proj": (1376, 512)}
    return {f"model.layers.{i}.{p}": s for i in range(layers) for p, s in proj.items()}


def _spent(ranks, shapes):
    return sum(r * (shapes[n][0] + shapes[n][1]) for n, r in ranks.items())


@pytest.mark.parametrize("seed", range(5))
def test_allocation_spends_the_uniform_budget_within_five_percent(seed):
    shapes = _model_shapes()
    rng = random.Random(seed)
    scores = {n: rng.lognormvariate(0, 1.5) for n in shapes}
    result = allocation(scores, shapes, r=R, alpha=ALPHA)
    budget = R * sum(i + o for i, o in shapes.values())
    assert abs(_spent({n: ri for n, (ri, _) in result.items()}, shapes) - budget) <= 0.05 * budget
    assert all(1 <= ri <= 4 * R for ri, _ in result.values())  # rank-0 modules are left out of the result


def test_equal_scores_give_uniform_rank():
    shapes = _model_shapes(2)
    result = allocation({n: 0.3 for n in shapes}, shapes, r=R, alpha=ALPHA)
    assert {ri for ri, _ in result.values()} == {R} and len(result) == len(shapes)


def test_ranks_follow_the_scores_and_low_scores_drop_out():
    shapes = {"a": (64, 64), "b": (64, 64), "c": (64, 64), "d": (64, 64)}
    ranks = allocate_ranks({"a": 4.0, "b": 2.0, "c": 2.0, "d": 0.01}, {n: 128 for n in shapes}, 4 * 128 * 8, 64)
    assert ranks["a"] > ranks["b"] == ranks["c"] > ranks["d"] == 0
    assert ranks["a"] == pytest.approx(2 * ranks["b"], abs=1)


def test_ranks_never_exceed_the_cap_or_the_matrix_rank():
    shapes = {"narrow": (512, 4), "wide": (512, 512), "other": (512, 512)}
    result = allocation({"narrow": 100.0, "wide": 1.0, "other": 1.0}, shapes, r=4, alpha=8.0, r_max=12)
    assert result["narrow"][0] == 4  # the (4, 512) matrix has rank 4 at most
    assert all(ri <= 12 for ri, _ in result.values())


def test_allocated_alpha_keeps_the_uniform_scale():
    shapes = _model_shapes(2)
    scores = {n: 1.0 + i for i, n in enumerate(shapes)}
    for rslora in (False, True):
        result = allocation(scores, shapes, r=R, alpha=ALPHA, rslora=rslora)
        uniform = ALPHA / (math.sqrt(R) if rslora else R)
        for ri, ai in result.values():
            assert ai / (math.sqrt(ri) if rslora else ri) == pytest.approx(uniform, rel=1e-12)


def test_lora_fa_budget_counts_b_only():
    shapes = {"a": (1000, 10), "b": (10, 1000)}
    result = allocation({"a": 1.0, "b": 1.0}, shapes, r=4, alpha=8.0, frozen_a=True)
    spent = sum(ri * shapes[n][1] for n, (ri, _) in result.items())
    assert abs(spent - 4 * 1010) <= 0.05 * 4 * 1010


def test_no_gradient_anywhere_is_an_error():
    with pytest.raises(LorafitError, match="scored every module 0"):
        allocate_ranks({"a": 0.0, "b": float("nan")}, {"a": 1, "b": 1}, 10, 4)


def test_exact_keys_pick_one_module_under_peft_matching():
    from peft.utils.other import get_pattern_key

    names = ["model.layers.1.mlp.up_proj", "model.layers.11.mlp.up_proj", "x.model.layers.1.mlp.up_proj",
             "model.layers.1.mlp.up_proj_extra"]
    patterns = {exact_key(n): i for i, n in enumerate(names[:2])}
    for name in names:
        want = {names[0]: 0, names[1]: 1}.get(name)
        key = get_pattern_key(list(patterns), name)  # PEFT's own lookup
        assert patterns.get(key) == want
        assert pattern_value(patterns, name, None) == want


def test_saved_patterns_hold_only_what_differs_from_the_defaults():
    settings = {"m.layers.0.q": (8, 20.0), "m.layers.0.v": (4, 10.0), "m.layers.1.q": (8, 21.0)}
    ranks, alphas = saved_patterns(settings, 8, 20.0)
    assert ranks == {exact_key("m.layers.0.v"): 4}
    assert alphas == {exact_key("m.layers.0.v"): 10.0, exact_key("m.layers.1.q"): 21.0}
    assert all(re.compile(k) for k in (*ranks, *alphas))


def test_layer_index_and_filter_follow_the_first_numbered_component():
    assert layer_index("model.layers.3.mlp.experts.7.up_proj") == 3
    assert layer_index("transformer.h.10.attn.c_attn") == 10
    assert layer_index("lm_head") is None
    names = [f"model.layers.{i}.mlp.up_proj" for i in range(4)]
    assert filter_layers(names, [0, 2]) == [names[0], names[2]]
    assert filter_layers(names, None) == names
    with pytest.raises(ConfigError, match=r"\[4\] out of range; the model's layers are 0-3"):
        filter_layers(names, [1, 4])
    with pytest.raises(ConfigError, match="no numbered layers"):
        filter_layers(["fc1", "fc2"], [0])


def test_compact_display_groups_layers_into_ranges():
    assert layer_ranges([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8"
    ranks = {f"model.layers.{i}.mlp.up_proj": (4 if i in (2, 3) else 8) for i in range(6)}
    lines = compact_ranks(ranks)
    assert any(re.search(r"mlp\.up_proj\s+r=8\s+layers 0-1, 4-5", line) for line in lines)
    assert any(re.search(r"mlp\.up_proj\s+r=4\s+layers 2-3", line) for line in lines)


def test_scaled_alpha_is_the_identity_at_r():
    assert scaled_alpha(ALPHA, R, R) == ALPHA and scaled_alpha(ALPHA, R, R, rslora=True) == ALPHA


# ------------------------------------------------------------------------------ config, attach, files, PEFT


def _config_problems(tmp_path, **adapter) -> list[str]:
    import yaml
    from test_config import minimal_with, problems_of, write

    return problems_of(write(tmp_path / "c.yaml", minimal_with(yaml.safe_dump({"adapter": adapter}))))


@pytest.mark.parametrize("adapter, expected", [
    ({"method": "vera", "allocate": "gradient"}, "adapter.allocate: method vera shares one rank"),
    ({"method": "adalora", "allocate": "gradient"}, "adapter.allocate: method adalora allocates its ranks itself"),
    ({"allocate_batches": 0}, "adapter.allocate_batches: input should be greater than or equal to 1"),
    ({"rank_pattern": {"q_proj": 0}}, "leave a module out with adapter.exclude, or let adapter.allocate"),
    ({"rank_pattern": {"q_proj[": 4}}, "adapter.rank_pattern: 'q_proj[' is not a valid regular expression"),
    ({"alpha_pattern": {"(": 4}}, "adapter.alpha_pattern: '(' is not a valid regular expression"),
    ({"layers": [0, -1]}, "adapter.layers: [0, -1]: give distinct layer indices >= 0"),
    ({"allocate": "gradient", "rank_pattern": {"q_proj": 4}}, "allocate: gradient sets every module's rank"),
    ({"allocate": "gradients"}, "did you mean 'gradient'"),
])
def test_bad_placement_keys_are_refused_at_load(tmp_path, adapter, expected):
    assert any(expected in p for p in _config_problems(tmp_path, **adapter)), _config_problems(tmp_path, **adapter)


def _cli_validate(tmp_path, model_dir, *overrides):
    from rundirs import config_dict, run_cli, write_config

    config = write_config(tmp_path / "cfg", config_dict(tmp_path / "run", model_dir, eval_data=False))
    return run_cli("validate", str(config), *overrides)


def test_validate_shows_per_module_ranks_as_layer_ranges(tmp_path, tiny_model_dir, capsys):
    assert _cli_validate(tmp_path, tiny_model_dir, "adapter.rank_pattern={'layers\\.1\\.mlp\\.up_proj': 2}",
                         "adapter.targets=[up_proj, q_proj]") == 0
    out = capsys.readouterr().out
    assert re.search(r"mlp\.up_proj\s+r=4\s+layers 0\b", out) and re.search(r"mlp\.up_proj\s+r=2\s+layers 1\b", out)
    assert re.search(r"self_attn\.q_proj\s+r=4\s+layers 0-1", out)
    # trainable parameters counted per module: 3 layers at r=4 and one at r=2 (up_proj 64 -> 192, q_proj 64 -> 64)
    assert f"{(4 * 256 + 2 * 256 + 2 * 4 * 128) / 1000:.2f}K trainable" in out


@pytest.mark.parametrize("overrides, expected", [
    (["adapter.rank_pattern={nope_proj: 2}"], "adapter.rank_pattern: 'nope_proj' matches no adapter target"),
    (["adapter.layers=[0, 5]"], "adapter.layers: [5] out of range; the model's layers are 0-1"),
])
def test_placement_that_fits_no_target_exits_2_with_the_targets_listed(tmp_path, tiny_model_dir, capsys, overrides,
                                                                        expected):
    assert _cli_validate(tmp_path, tiny_model_dir, *overrides) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    if "rank_pattern" in expected:
        assert "model.layers.0.self_attn.q_proj" in err  # the targets are listed


@pytest.mark.parametrize("method, init", [("lora", "default"), ("dora", "default"), ("lora_fa", "default"),
                                          ("lora", "pissa"), ("lora", "olora")])
def test_every_ranked_method_honours_patterns_and_layers_and_peft_reads_it(tmp_path, tiny_tokenizer, method, init):
    from conftest import build_tiny_llama
    from peft import PeftModel
    from rundirs import randomize_adapter

    from lorafit.adapters import attach_from_settings, lora_layers
    from lorafit.adapters.peft_io import save_adapter
    from lorafit.config import AdapterConfig

    vocab = len(tiny_tokenizer)
    a = AdapterConfig(method=method, init=init, r=4, alpha=12, dropout=0.0, layers=[1],
                      rank_pattern={"mlp\\.down_proj": 2, "q_proj": 6}, alpha_pattern={"q_proj": 3.0})
    model = build_tiny_llama(vocab)
    attach_from_settings(model, a.settings())
    layers = lora_layers(model)
    assert all(n.startswith("model.layers.1.") for n in layers) and len(layers) == 7
    assert layers["model.layers.1.mlp.down_proj"].r == 2 and layers["model.layers.1.mlp.down_proj"].alpha == 12
    assert layers["model.layers.1.self_attn.q_proj"].r == 6 and layers["model.layers.1.self_attn.q_proj"].alpha == 3
    randomize_adapter(model, dora=method == "dora")
    save_adapter(model, tmp_path / "a", base_model_name_or_path="tiny", r=a.r, alpha=a.alpha, dropout=0.0,
                 targets=a.targets, dora=method == "dora", settings=a.settings())
    ids = torch.randint(3, vocab, (2, 13), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model.eval()(ids).logits
        theirs = PeftModel.from_pretrained(build_tiny_llama(vocab), tmp_path / "a").eval()(ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_peft_adapter_with_layers_to_transform_and_patterns_loads_exactly(tmp_path, tiny_tokenizer):
    from conftest import build_tiny_llama
    from peft import LoraConfig, get_peft_model

    from lorafit.adapters import lora_layers
    from lorafit.adapters.peft_io import load_adapter

    vocab = len(tiny_tokenizer)
    config = LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"], layers_to_transform=[1],
                        rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 5.0}, init_lora_weights=False)
    peft_model = get_peft_model(build_tiny_llama(vocab), config).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    model = build_tiny_llama(vocab)
    load_adapter(model, tmp_path / "peft")
    layers = lora_layers(model)
    assert sorted(layers) == ["model.layers.1.mlp.down_proj", "model.layers.1.self_attn.q_proj",
                              "model.layers.1.self_attn.v_proj"]
    assert layers["model.layers.1.self_attn.v_proj"].r == 2 and layers["model.layers.1.mlp.down_proj"].scale == 5 / 4
    ids = torch.randint(3, vocab, (2, 13), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, peft_model(ids).logits, rtol=1e-5, atol=1e-5)


def test_validate_under_allocate_names_the_probe_and_the_budget(tmp_path, tiny_model_dir, capsys):
    assert _cli_validate(tmp_path, tiny_model_dir, "adapter.allocate=gradient", "adapter.allocate_batches=3") == 0
    assert re.search(r"placement\s+gradient probe at train start: 3 batches of data.train, ranks 0-16 at the budget "
                     r"of uniform r=4", capsys.readouterr().out)
