"""The gradient probe: its random projection estimates the full weight gradient, it is deterministic for a seed,
and `lorafit probe` / `adapter.allocate: gradient` produce adapters PEFT loads as lorafit trained them."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import build_tiny_llama
from rundirs import run_cli
from test_train import make_config, train

from lorafit.adapters import find_targets, lora_layers
from lorafit.adapters.targets import linear_features
from lorafit.probe import gradient_scores


def _batches(vocab: int, n: int = 3, seed: int = 5) -> list[dict[str, torch.Tensor]]:
    """Random token batches, every position after the first supervised."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (2, 24), generator=gen)
        labels = ids.clone()
        labels[:, 0] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def _full_gradient_scores(model, names, batches) -> dict[str, float]:
    """The reference: autograd on each target's own weight, ||dL/dW||_F / sqrt(in · out), L the mean token loss."""
    from lorafit.loss import chunked_causal_lm_loss

    modules = dict(model.named_modules())
    model.requires_grad_(False)
    for n in names:
        modules[n].weight.requires_grad_(True)
    tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    for b in batches:
        loss, _ = chunked_causal_lm_loss(model, {"input_ids": b["input_ids"]}, b["labels"])
        (loss / tokens).backward()
    out = {}
    for n in names:
        w = modules[n].weight
        out[n] = float(w.grad.norm()) / math.sqrt(w.numel())
        w.grad = None
        w.requires_grad_(False)
    return out


def test_projection_estimates_the_full_weight_gradient(tiny_tokenizer):
    vocab = len(tiny_tokenizer)
    model = build_tiny_llama(vocab, initializer_range=0.3)
    names = find_targets(model, "all-linear")
    batches = _batches(vocab)
    reference = _full_gradient_scores(model, names, batches)
    model.requires_grad_(True)  # as it came; the probe must freeze the base itself and restore this
    estimates = [gradient_scores(model, names, batches, seed=s, rank=64)[0] for s in range(4)]
    mean = {n: sum(e[n] ** 2 for e in estimates) / len(estimates) for n in names}  # E[estimate²] = reference²
    for n in names:
        assert math.sqrt(mean[n]) == pytest.approx(reference[n], rel=0.2), n
    assert not lora_layers(model) and all(p.requires_grad and p.grad is None for p in model.parameters())


def test_probe_is_deterministic_for_a_seed(tiny_tokenizer):
    vocab = len(tiny_tokenizer)
    model = build_tiny_llama(vocab)
    names = find_targets(model, "all-linear")
    first, tokens = gradient_scores(model, names, _batches(vocab), seed=3)
    again, _ = gradient_scores(model, names, _batches(vocab), seed=3)
    other, _ = gradient_scores(model, names, _batches(vocab), seed=4)
    assert first == again and first != other
    assert tokens == 3 * 2 * 23


def test_probe_without_supervised_tokens_is_a_data_error(tiny_tokenizer):
    from lorafit.errors import DataError

    model = build_tiny_llama(len(tiny_tokenizer))
    batch = _batches(len(tiny_tokenizer), 1)[0]
    batch["labels"][:] = -100
    with pytest.raises(DataError, match="no supervised token"):
        gradient_scores(model, ["model.layers.0.mlp.up_proj"], [batch], seed=0)


def test_probe_command_prints_writes_json_and_heatmap(tmp_path, learnable_model_dir, capsys):
    config = make_config(tmp_path, learnable_model_dir)
    out = tmp_path / "probe.json"
    assert run_cli("probe", str(config), "--batches", "2", "--json", str(out),
                   "--heatmap", str(tmp_path / "h.png")) == 0
    printed = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in printed and "budget" in printed
    result = json.loads(out.read_text())
    assert (tmp_path / "h.png").stat().st_size > 1000
    from lorafit.model import load_model

    model = load_model(str(learnable_model_dir))
    names = find_targets(model, "all-linear")
    assert list(result["modules"]) == names
    spent = 0
    for n, m in result["modules"].items():
        i, o = linear_features(model.get_submodule(n))
        assert m["shape"] == [o, i] and m["score"] > 0 and 0 <= m["rank"] <= 16
        spent += m["rank"] * (i + o)
    assert result["budget"] == 4 * sum(sum(linear_features(model.get_submodule(n))) for n in names)
    assert spent == result["allocated"] and abs(spent - result["budget"]) <= 0.05 * result["budget"]
    assert result["batches"] == 2


def test_probe_with_nothing_supervised_exits_2(tmp_path, learnable_model_dir, capsys):
    config = make_config(tmp_path, learnable_model_dir)
    data = tmp_path / "long.jsonl"  # every answer cut off by max_length: nothing left to supervise
    data.write_text((json.dumps({"instruction": "repeat the word " * 40, "output": "stone stone"}) + "\n") * 4)
    assert run_cli("probe", str(config), f"data.train.0.path={data}", "data.max_length=16") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and ("supervised" in err or "trained" in err), err


@pytest.mark.slow
def test_allocated_run_loads_in_peft_with_the_merged_models_logits(tmp_path, tiny_model_dir, capsys):
    from peft import PeftModel

    from lorafit.merge import merge_adapter
    from lorafit.model import load_model

    config = make_config(tmp_path, tiny_model_dir, max_steps=3)
    assert train(config, "adapter.allocate=gradient", "adapter.allocate_batches=2") == 0
    assert "placement: gradient probe of 2 batches" in capsys.readouterr().out
    run = tmp_path / "run"
    saved = json.loads((run / "adapter" / "adapter_config.json").read_text())
    allocation = json.loads((run / "allocation.json").read_text())["modules"]
    assert saved["rank_pattern"] and saved["alpha_pattern"]  # the ranks differ by module
    merge_adapter(run, tmp_path / "merged", dtype="float32")
    merged = load_model(str(tmp_path / "merged"), dtype="float32")
    peft_model = PeftModel.from_pretrained(load_model(str(tiny_model_dir), dtype="float32"), run / "adapter")
    for name, m in allocation.items():
        layer = peft_model.base_model.model.get_submodule(name)
        if m["rank"] == 0:
            assert not hasattr(layer, "lora_A")
            continue
        assert layer.r["default"] == m["rank"]
        assert layer.scaling["default"] == pytest.approx(12 / 4)  # uniform r's scale, alpha / r, kept
    ids = torch.randint(3, 300, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(peft_model.eval()(ids).logits, merged.eval()(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_resume_reuses_the_saved_allocation_without_probing(tmp_path, learnable_model_dir, capsys, monkeypatch):
    from lorafit import probe, runstate

    config = make_config(tmp_path, learnable_model_dir, max_steps=4, save_every=2)
    args = ("adapter.allocate=gradient", "adapter.allocate_batches=2")
    with monkeypatch.context() as patch:
        patch.setattr(runstate, "save_final_adapter", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        assert train(config, *args) == 130
    first = json.loads((tmp_path / "run" / "allocation.json").read_text())
    monkeypatch.setattr(probe, "gradient_scores", lambda *a, **k: pytest.fail("probed again on --resume"))
    assert train(config, *args, "--resume") == 0
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    from lorafit.adapters.placement import exact_key

    for name, m in first["modules"].items():
        assert saved["rank_pattern"].get(exact_key(name), saved["r"]) == m["rank"] or m["rank"] == 0


@pytest.mark.slow
def test_two_processes_allocate_as_one_does(tmp_path, learnable_model_dir):
    """Under DDP each process probes its share of the batches and the gradients are summed: the same scores, so
    the same ranks, as one process probing the whole batches."""
    from test_distributed import torchrun

    args = ("adapter.allocate=gradient", "adapter.allocate_batches=2")
    one = make_config(tmp_path, learnable_model_dir, name="one", batch_size=4, max_steps=1)
    two = make_config(tmp_path, learnable_model_dir, name="two", batch_size=2, max_steps=1)
    assert train(one, *args) == 0
    torchrun(two, *args)
    a, b = (json.loads((tmp_path / n / "allocation.json").read_text())["modules"] for n in ("one", "two"))
    assert [m["rank"] for m in a.values()] == [m["rank"] for m in b.values()]
    for name in a:
        assert b[name]["score"] == pytest.approx(a[name]["score"], rel=1e-4)
