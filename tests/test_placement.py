"""Placement as pure functions: ranks at the budget of uniform r, within bounds, the uniform scale kept, and
pattern keys that PEFT resolves to exactly the intended module."""

from __future__ import annotations

import math
import random
import re

import pytest

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
