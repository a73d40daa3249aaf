"""adapter.from: continue a trained adapter (lorafit's or PEFT's) — its weights and settings, a fresh optimizer,
the whole adapter saved with its lineage; contradicting keys and folders that are no adapter refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import build_tiny_llama
from rundirs import ALPHA, R, base_model, config_dict, make_run, run_cli
from safetensors.torch import load_file

from lorafit.adapters.peft_io import LINEAGE_NAME, load_adapter, tensors_sha256

LR = 1e-3


def child_config(tmp_path: Path, model_dir: Path, parent: Path, name: str = "child", **adapter) -> Path:
    """A one-step run continuing `parent` (constant lr, no warmup or decay: Adam's first step is ±lr per value)."""
    run = tmp_path / name
    cfg = config_dict(run, model_dir, eval_data=False)
    cfg["adapter"] = {"from": str(parent), "dropout": 0.0, **adapter}
    cfg["train"].update(max_steps=1, lr=LR, scheduler="constant", warmup=0, weight_decay=0.0, batch_size=4,
                        grad_accum=1, gradient_checkpointing=False)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def assert_one_fresh_adam_step_from(parent: dict, child: dict) -> None:
    """Every value moved by ~lr from the parent's: a fresh AdamW's first step is lr·g/(|g|+eps) ≈ ±lr. A run that
    started from zeros, or with moments carried over, would move the values by other amounts."""
    assert sorted(parent) == sorted(child)
    steps = torch.cat([(child[k] - parent[k]).abs().flatten() for k in parent])
    assert steps.max() <= LR * (1 + 1e-4)
    assert (steps > 0.9 * LR).float().mean() > 0.95


def test_continued_run_starts_from_the_parent_with_a_fresh_optimizer(tmp_path, tiny_model_dir, tiny_tokenizer):
    parent = make_run(tmp_path, tiny_model_dir, tiny_tokenizer, name="parent")
    assert run_cli("train", str(child_config(tmp_path, tiny_model_dir, parent))) == 0
    before = load_file(parent / "adapter" / "adapter_model.safetensors")
    after = load_file(tmp_path / "child" / "adapter" / "adapter_model.safetensors")
    assert_one_fresh_adam_step_from(before, after)
    saved = json.loads((tmp_path / "child" / "adapter" / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"]) == (R, ALPHA)
    record = json.loads((tmp_path / "child" / "adapter" / LINEAGE_NAME).read_text())["lineage"]
    assert record == [{"path": str((parent / "adapter").resolve()), "sha256": tensors_sha256(parent / "adapter")}]


def test_continuing_a_continued_adapter_keeps_the_whole_lineage(tmp_path, tiny_model_dir, tiny_tokenizer):
    parent = make_run(tmp_path, tiny_model_dir, tiny_tokenizer, name="parent")
    assert run_cli("train", str(child_config(tmp_path, tiny_model_dir, parent, "child"))) == 0
    assert run_cli("train", str(child_config(tmp_path, tiny_model_dir, tmp_path / "child", "grandchild"))) == 0
    record = json.loads((tmp_path / "grandchild" / "adapter" / LINEAGE_NAME).read_text())["lineage"]
    assert [Path(r["path"]).parent.name for r in record] == ["child", "parent"]


def test_a_key_contradicting_the_adapter_is_refused_naming_both_values(tmp_path, tiny_model_dir, tiny_tokenizer,
                                                                        capsys):
    parent = make_run(tmp_path, tiny_model_dir, tiny_tokenizer, name="parent")
    config = child_config(tmp_path, tiny_model_dir, parent, r=8)
    capsys.readouterr()
    assert run_cli("train", str(config)) == 2
    err = capsys.readouterr().err
    assert "adapter.r: 8 contradicts adapter.from" in err and f"has r {R}" in err and "Traceback" not in err
    assert not (tmp_path / "child").exists()
    # the same value as the adapter's is no contradiction
    assert run_cli("validate", str(child_config(tmp_path, tiny_model_dir, parent, r=R, alpha=ALPHA))) == 0


def test_a_folder_that_is_no_adapter_is_refused(tmp_path, tiny_model_dir, capsys):
    (tmp_path / "empty").mkdir()
    assert run_cli("train", str(child_config(tmp_path, tiny_model_dir, tmp_path / "empty"))) == 2
    err = capsys.readouterr().err
    assert "adapter.from" in err and "not an adapter" in err and "Traceback" not in err
    assert not (tmp_path / "child").exists()


def test_an_adapter_of_another_base_is_refused_naming_both(tmp_path, tiny_model_dir, tiny_tokenizer, capsys):
    parent = make_run(tmp_path, tiny_model_dir, tiny_tokenizer, name="parent")
    wider = tmp_path / "wider-llama"
    build_tiny_llama(len(tiny_tokenizer), hidden_size=128, intermediate_size=256).save_pretrained(wider)
    tiny_tokenizer.save_pretrained(wider)
    capsys.readouterr()
    assert run_cli("train", str(child_config(tmp_path, wider, parent))) == 2
    err = capsys.readouterr().err
    assert str(tiny_model_dir) in err and str(wider) in err and "Traceback" not in err
    assert not (tmp_path / "child").exists()


def _peft_parent(tmp_path: Path, model_dir: Path) -> Path:
    """A PEFT-made adapter with per-module ranks and alphas on some layers only (rank_pattern, alpha_pattern,
    layers_to_transform), nonzero B."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0,
                        rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 5.0}, layers_to_transform=[1],
                        layers_pattern="layers")
    model = get_peft_model(base_model(model_dir), config)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=gen)
    model.save_pretrained(tmp_path / "peft-parent")
    return tmp_path / "peft-parent"


def test_a_peft_made_adapter_with_patterns_continues_and_round_trips(tmp_path, tiny_model_dir):
    from peft import PeftModel

    parent = _peft_parent(tmp_path, tiny_model_dir)
    assert run_cli("train", str(child_config(tmp_path, tiny_model_dir, parent))) == 0
    child = tmp_path / "child" / "adapter"
    assert_one_fresh_adam_step_from(load_file(parent / "adapter_model.safetensors"),
                                    load_file(child / "adapter_model.safetensors"))
    ids = torch.randint(5, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    ours = base_model(tiny_model_dir)
    load_adapter(ours, child, dropout=0.0)
    peft = PeftModel.from_pretrained(base_model(tiny_model_dir), str(child)).eval()
    with torch.no_grad():
        want, got = peft(ids).logits, ours.eval()(ids).logits
    assert (got - want).norm() / want.norm() <= 1e-5


@pytest.mark.parametrize("method", ["vera", "dora"])
def test_other_methods_continue_from_their_own_adapters(tmp_path, tiny_model_dir, method):
    first = config_dict(tmp_path / "first", tiny_model_dir, eval_data=False)
    first["adapter"].update(method=method, r=R)
    first["train"].update(max_steps=1, lr=0.05)
    (tmp_path / "first.yaml").write_text(yaml.safe_dump(first, sort_keys=False))
    assert run_cli("train", str(tmp_path / "first.yaml")) == 0
    assert run_cli("train", str(child_config(tmp_path, tiny_model_dir, tmp_path / "first"))) == 0
    before = load_file(tmp_path / "first" / "adapter" / "adapter_model.safetensors")
    after = load_file(tmp_path / "child" / "adapter" / "adapter_model.safetensors")
    trained = [k for k in before if not torch.equal(before[k], after[k])]
    assert trained and sorted(before) == sorted(after)
    assert yaml.safe_load((tmp_path / "child" / "config.yaml").read_text())["adapter"]["method"] == method
