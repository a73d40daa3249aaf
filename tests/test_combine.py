"""`lorafit merge A B ...`: several adapters of one base combined (sum, ties, dare, svd) into a merged model or one
PEFT adapter; the combination functions on hand-made updates; refusals."""

from __future__ import annotations

import json

import pytest
import torch
from rundirs import ALPHA, R, config_dict, randomize_adapter, run_cli, save_run
from safetensors.torch import load_file

from lorafit.adapters import attach_lora
from lorafit.combine import concat_lora, dare, ties, trim_by_magnitude, truncated_svd, weighted_sum
from lorafit.merge import CombineOptions, combine_adapters

# ----------------------------------------------------------------------------------- pure functions


def test_ties_on_hand_made_updates():
    d1 = torch.tensor([[4.0, -1.0], [2.0, 0.5]])
    d2 = torch.tensor([[-3.0, -2.0], [1.0, 3.0]])
    d3 = torch.tensor([[-2.0, 0.1], [-6.0, 0.2]])
    # density 0.5 keeps the 2 largest |entries| of each: d1 {4, 2}, d2 {-3, 3}, d3 {-2, -6}
    assert torch.equal(trim_by_magnitude(d1, 0.5), torch.tensor([[4.0, 0.0], [2.0, 0.0]]))
    # elected signs (sum of trimmed): [0,0]: 4-3-2 = -1 -> -; [1,0]: 2-6 = -4 -> -; [1,1]: 3 -> +; [0,1]: 0
    # disjoint mean of weighted agreeing entries (w = 1, 2, 0.5):
    #   [0,0]: (2·-3 + 0.5·-2) / 2 = -3.5; [1,0]: (0.5·-6) / 1 = -3; [1,1]: 2·3 / 1 = 6; [0,1]: 0
    expected = torch.tensor([[-3.5, 0.0], [-3.0, 6.0]])
    torch.testing.assert_close(ties([d1, d2, d3], [1.0, 2.0, 0.5], 0.5), expected)


def test_ties_and_dare_match_peft_merge_utils():
    from peft.utils.merge_utils import dare_linear
    from peft.utils.merge_utils import ties as peft_ties

    gen = torch.Generator().manual_seed(0)
    deltas = [torch.randn(16, 24, generator=gen) for _ in range(3)]
    weights = [0.5, 1.5, -0.7]
    torch.testing.assert_close(ties(deltas, weights, 0.3), peft_ties(deltas, torch.tensor(weights), 0.3))
    # dare with density 1 keeps everything: the weighted sum, as PEFT's
    ours = dare(deltas, weights, 1.0, torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours, dare_linear(deltas, torch.tensor(weights), 1.0))
    torch.testing.assert_close(ours, weighted_sum(deltas, weights))


def test_dare_drops_with_rescale_and_is_seeded():
    delta = torch.full((200, 200), 2.0)
    out = dare([delta], [1.0], 0.25, torch.Generator().manual_seed(7))
    kept = out != 0
    assert torch.all(out[kept] == 8.0)  # survivors scaled by 1 / density
    assert 0.23 < kept.float().mean().item() < 0.27  # 40,000 Bernoulli(0.25) draws
    assert abs(out.mean().item() - 2.0) < 0.1  # the expectation is unchanged
    again = dare([delta], [1.0], 0.25, torch.Generator().manual_seed(7))
    assert torch.equal(out, again)
    assert not torch.equal(out, dare([delta], [1.0], 0.25, torch.Generator().manual_seed(8)))


def test_truncated_svd_error_and_concat_exactness():
    gen = torch.Generator().manual_seed(2)
    parts = [(torch.randn(3, 20, generator=gen), torch.randn(12, 3, generator=gen), 0.7),
             (torch.randn(2, 20, generator=gen), torch.randn(12, 2, generator=gen), -1.3)]
    target = sum(c * b @ a for a, b, c in parts)  # rank 5
    low = concat_lora(parts, rank=7)
    assert low.lora_a.shape == (7, 20) and low.lora_b.shape == (12, 7)
    torch.testing.assert_close(low.lora_b @ low.lora_a, target)
    exact = truncated_svd(target, 5)
    torch.testing.assert_close(exact.lora_b @ exact.lora_a, target, rtol=1e-4, atol=1e-4)
    assert exact.error < 1e-5
    cut = truncated_svd(target, 2)
    s = torch.linalg.svdvals(target)
    assert cut.error == pytest.approx((s[2:].norm() / s.norm()).item(), rel=1e-4)
    residual = (target - cut.lora_b @ cut.lora_a).norm() / target.norm()
    assert residual.item() == pytest.approx(cut.error, rel=1e-3)


# ----------------------------------------------------------------------------------- on models


def _run(tmp_path, model_dir, tokenizer, name, seed, **options):
    from transformers import AutoModelForCausalLM

    run = tmp_path / name
    run.mkdir(parents=True)
    cfg = config_dict(run, model_dir, **options)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    torch.manual_seed(seed)
    a = cfg["adapter"]
    attach_lora(model, a["targets"], r=R, alpha=ALPHA, rslora=a["rslora"], dora=a["method"] == "dora")
    randomize_adapter(model, seed=seed, dora=a["method"] == "dora")
    return save_run(run, model, tokenizer, cfg)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, tiny_tokenizer):
    tmp = tmp_path_factory.mktemp("combine")
    return [_run(tmp, tiny_model_dir, tiny_tokenizer, "a", 1),
            _run(tmp, tiny_model_dir, tiny_tokenizer, "b", 2, rslora=True, targets=["q_proj", "v_proj", "up_proj"])]


def _deltas(adapter_dir, scale):
    """{module: s·B@A} straight from the saved file (the formula, not lorafit's code)."""
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    out = {}
    for key, a in tensors.items():
        if key.endswith("lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            out[module] = scale * tensors[key.replace("lora_A", "lora_B")] @ a
    return out


def _formula_model(model_dir, updates):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        for module, delta in updates.items():
            model.get_submodule(module).weight.add_(delta)
    return model


def _logits(model, tokenizer):
    ids = torch.tensor([tokenizer("Reverse the word: stone -> enots. def add(a, b):")["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _sum_updates(runs, weights):
    scales = [ALPHA / R, ALPHA / R ** 0.5]  # run b is rsLoRA
    total: dict[str, torch.Tensor] = {}
    for run, w, s in zip(runs, weights, scales, strict=True):
        for module, delta in _deltas(run / "adapter", s).items():
            total[module] = total.get(module, 0) + w * delta
    return total


def test_weighted_sum_merged_model_equals_base_plus_weighted_deltas(runs, tmp_path, tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    weights = [0.7, -1.5]
    report = combine_adapters(runs, tmp_path / "merged", CombineOptions(weights=weights), dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    expected = _logits(_formula_model(tiny_model_dir, _sum_updates(runs, weights)), tiny_tokenizer)
    torch.testing.assert_close(_logits(merged, tiny_tokenizer), expected, rtol=1e-5, atol=1e-5)
    assert report.exact and report.max_rel_diff < 1e-5 and report.layers == 14


def test_sum_as_adapter_is_exact_concatenation_loadable_by_peft(runs, tmp_path, tiny_model_dir, tiny_tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    weights = [1.0, 0.5]
    out = tmp_path / "combined"
    assert run_cli("merge", str(runs[0]), str(runs[1]), "--weights", "1,0.5", "--as-adapter", "--out", str(out)) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 2 * R and config["lora_alpha"] == 2 * R and not config["use_rslora"]
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(base, str(out)).eval()
    expected = _logits(_formula_model(tiny_model_dir, _sum_updates(runs, weights)), tiny_tokenizer)
    torch.testing.assert_close(_logits(peft_model, tiny_tokenizer), expected, rtol=1e-5, atol=1e-5)


def test_ties_merged_model_applies_ties_of_the_dense_updates(runs, tmp_path, tiny_model_dir, tiny_tokenizer):
    from peft.utils.merge_utils import ties as peft_ties
    from transformers import AutoModelForCausalLM

    options = CombineOptions(weights=[1.0, 0.8], how="ties", density=0.4)
    combine_adapters(runs, tmp_path / "ties", options, dtype="float32")
    per_run = [_deltas(runs[0] / "adapter", ALPHA / R), _deltas(runs[1] / "adapter", ALPHA / R ** 0.5)]
    updates = {}
    for module in per_run[0]:
        have = [(d[module], w) for d, w in zip(per_run, [1.0, 0.8], strict=True) if module in d]
        updates[module] = peft_ties([h[0] for h in have], torch.tensor([h[1] for h in have]), 0.4)
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ties"), dtype=torch.float32).eval()
    expected = _logits(_formula_model(tiny_model_dir, updates), tiny_tokenizer)
    torch.testing.assert_close(_logits(merged, tiny_tokenizer), expected, rtol=1e-5, atol=1e-5)


def test_svd_as_adapter_reports_its_error_and_is_exact_at_full_rank(runs, tmp_path, tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from lorafit.adapters.peft_io import load_adapter

    low = combine_adapters(runs, tmp_path / "low", CombineOptions(how="svd", rank=2, as_adapter=True))
    full = combine_adapters(runs, tmp_path / "full", CombineOptions(how="svd", rank=2 * R, as_adapter=True))
    assert 0.05 < low.svd_error < 1 and low.max_rel_diff > 1e-3  # rank 2 of a rank-8 sum: a real approximation
    assert full.svd_error < 1e-4 and full.max_rel_diff < 1e-4
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    load_adapter(model, tmp_path / "full", dropout=0.0)
    expected = _logits(_formula_model(tiny_model_dir, _sum_updates(runs, [1.0, 1.0])), tiny_tokenizer)
    torch.testing.assert_close(_logits(model, tiny_tokenizer), expected, rtol=1e-4, atol=1e-4)


def test_dare_is_repeatable_with_its_seed(runs, tmp_path):
    from safetensors.torch import load_file as load

    for name, seed in (("d1", 3), ("d2", 3), ("d3", 4)):
        combine_adapters(runs, tmp_path / name, CombineOptions(how="dare", density=0.5, seed=seed, rank=4,
                                                               as_adapter=True))
    t = [load(str(tmp_path / n / "adapter_model.safetensors")) for n in ("d1", "d2", "d3")]
    key = next(k for k in t[0] if k.endswith("q_proj.lora_B.weight"))
    assert torch.equal(t[0][key], t[1][key]) and not torch.equal(t[0][key], t[2][key])



@pytest.mark.parametrize("case,needle", [
    ("weights", "--weights: 3 weight(s) for 2 source(s)"),
    ("bases", "do not share one base"),
    ("ties-no-rank", "--combine ties --as-adapter: needs --rank"),
    ("svd-no-rank", "--combine svd: needs --rank"),
    ("bad-weight", "--weights 1,x: give numbers"),
    ("dora-concat", "a DoRA adapter; --as-adapter with --combine sum"),
])
def test_bad_combinations_exit_2_with_one_message_and_write_nothing(runs, tmp_path, learnable_model_dir,
                                                                   tiny_model_dir, tiny_tokenizer, case, needle,
                                                                   capsys):
    sources = [str(r) for r in runs]
    extra = {"weights": ["--weights", "1,2,3"], "ties-no-rank": ["--combine", "ties", "--as-adapter"],
             "svd-no-rank": ["--combine", "svd"], "bad-weight": ["--weights", "1,x"],
             "dora-concat": ["--as-adapter"]}.get(case, [])
    if case == "bases":
        sources[1] = str(_run(tmp_path, learnable_model_dir, tiny_tokenizer, "other", 5))
    if case == "dora-concat":
        sources[1] = str(_run(tmp_path, tiny_model_dir, tiny_tokenizer, "dora", 5, dora=True))
    out = tmp_path / "out"
    assert run_cli("merge", *sources, "--out", str(out), *extra) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    if case == "bases":
        assert str(runs[0]) in err and sources[1] in err
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))
