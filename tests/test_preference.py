"""Preference training end to end: config and data checks (exit 2, one message), the data shapes, the reference
(first dpo loss ln 2, kto 0.5, fresh or from a moved start), precompute_reference, accumulation and --resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from rundirs import run_cli, write_jsonl
from test_train import adapter_tensors, assert_same_training, metrics, train, write_config

from lorafit.config import load_config
from lorafit.errors import ConfigError, DataError

WORDS = ["stone", "river", "cloud", "apple", "bread", "plant", "tiger", "lemon", "glass", "water", "light", "sound"]


def pair_rows(words=WORDS) -> list[dict]:
    return [{"prompt": f"Reverse the word: {w}\n", "chosen": w[::-1], "rejected": w} for w in words]


def make_config(tmp_path: Path, model_dir: Path, objective: str = "dpo", rows=None, fmt="preference",
                name: str = "run", preference: dict | None = None, **train_keys) -> Path:
    data = write_jsonl(tmp_path / f"{name}-data.jsonl", rows if rows is not None else pair_rows())
    keys = {"objective": objective, "batch_size": 2, "grad_accum": 2, "lr": 1e-2, "max_steps": 3, "warmup": 0,
            "precision": "fp32", "gradient_checkpointing": False, "log_every": 1, "seed": 5, **train_keys}
    if preference:
        keys["preference"] = json.dumps(preference)
    return write_config(tmp_path / f"{name}.yaml", model_dir, tmp_path / name, data, fmt, keys, max_length=64)


# ------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("override,expected", [
    (["train.objective=sft"], "data.train.0.format: preference data is read by a preference objective"),
    (["train.preference.beta=0"], "train.preference.beta: input should be greater than 0"),
    (["train.preference.beta=-1"], "train.preference.beta: input should be greater than 0"),
    (["train.preference.label_smoothing=0.5"], "train.preference.label_smoothing: input should be less than 0.5"),
    (["train.objective=simpo", "train.preference.precompute_reference=true"],
     "train.preference.precompute_reference: applies to objective dpo / kto only"),
    (["train.objective=orpo", "train.preference.precompute_reference=true"],
     "train.preference.precompute_reference: applies to objective dpo / kto only"),
    (["train.objective=kto", "train.batch_size=1"], "train.batch_size: kto estimates its KL term"),
    (["train.preference.loss=ipo", "train.preference.label_smoothing=0.1"],
     "label_smoothing: applies to loss sigmoid / robust"),
    (["train.preference.lose=ipo"], "train.preference.lose: unknown key (did you mean train.preference.loss?)"),
])
def test_bad_preference_settings_are_refused_with_the_key(tmp_path, tiny_model_dir, override, expected):
    config = make_config(tmp_path, tiny_model_dir)
    with pytest.raises(ConfigError) as info:
        load_config(config, override)
    assert expected in str(info.value)


def test_objective_and_data_formats_must_fit(tmp_path, tiny_model_dir):
    sft_rows = [{"prompt": "a", "completion": "b"}]
    config = make_config(tmp_path, tiny_model_dir, rows=sft_rows, fmt="completion")
    with pytest.raises(ConfigError, match="completion data cannot train objective dpo"):
        load_config(config)
    with pytest.raises(ConfigError, match="train.preference: set, but train.objective is sft"):
        load_config(config, ["train.objective=sft", "train.preference.beta=0.2"])
    unpaired = make_config(tmp_path, tiny_model_dir, fmt="unpaired", name="u")
    with pytest.raises(ConfigError, match="unpaired rows .* fit objective kto only"):
        load_config(unpaired)
    with pytest.raises(ConfigError, match="precompute_reference: needs the whole data set"):
        load_config(config, ["train.objective=dpo", "data.train.0.format=preference", "data.streaming=true",
                             "train.preference.precompute_reference=true"])


# ------------------------------------------------------------------------------------------------ data


def _build(tmp_path, tokenizer, rows, objective="dpo", fmt="preference", max_length=64):
    from lorafit.config import DataConfig
    from lorafit.data.preference import build_preference_datasets

    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    cfg = DataConfig(train=[{"path": str(path), "format": fmt}], max_length=max_length)
    return build_preference_datasets(cfg, tokenizer, seed=0, kto=objective == "kto", kl_group=2)


@pytest.mark.parametrize("rows,fmt,expected", [
    ([{"prompt": "a", "chosen": "b"}], "preference", "rows.jsonl:1: format preference needs column(s) rejected"),
    ([pair_rows()[0], {"prompt": "a", "chosen": "same", "rejected": "same"}], "preference",
     "rows.jsonl:2: chosen and rejected are identical"),
    ([{"prompt": "a", "chosen": " ", "rejected": "b"}], "preference", "rows.jsonl:1: chosen is empty"),
    ([{"chosen": "Human: hi Assistant: yes", "rejected": "Other text"}], "preference",
     "no common beginning to take as the prompt"),
    ([{"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "yes"}],
       "rejected": [{"role": "user", "content": "no"}]}], "preference",
     "rejected[0] has role 'user'; the answer's turns must be the assistant's"),
    ([{"prompt": "a", "completion": "b", "label": "yes"}], "unpaired",
     "column 'label' must be true (desirable) or false (undesirable)"),
    ([{"prompt": "a", "completion": "b", "label": True}] * 3, "unpaired", "has only desirable rows"),
])
def test_bad_preference_rows_name_the_file_and_line(tmp_path, tiny_tokenizer, rows, fmt, expected):
    with pytest.raises(DataError) as info:
        _build(tmp_path, tiny_tokenizer, rows, objective="kto" if fmt == "unpaired" else "dpo", fmt=fmt)
    assert expected in str(info.value)


def test_strings_score_the_answer_and_its_eos_only(tmp_path, tiny_tokenizer):
    train, _, _ = _build(tmp_path, tiny_tokenizer, pair_rows()[:1])
    chosen = train[0].first
    prompt_ids = tiny_tokenizer("Reverse the word: stone\n")["input_ids"]
    answer = tiny_tokenizer("enots", add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
    assert chosen.input_ids == prompt_ids + answer and chosen.prompt == len(prompt_ids)
    assert chosen.labels == [-100] * len(prompt_ids) + answer


def test_hh_shape_takes_the_common_beginning_as_prompt(tmp_path, tiny_tokenizer):
    from lorafit.data.preference import check_preference_row

    row = check_preference_row({"chosen": "\n\nHuman: hi\n\nAssistant: the fox", "rejected":
                                "\n\nHuman: hi\n\nAssistant: the dog"}, "preference", {}, "f:1")
    assert row == {"prompt": "\n\nHuman: hi\n\nAssistant: the ", "chosen": "fox", "rejected": "dog"}
    turns = [{"role": "user", "content": "hi"}]
    row = check_preference_row({"chosen": turns + [{"role": "assistant", "content": "yes"}],
                                "rejected": turns + [{"role": "assistant", "content": "no"}]}, "preference", {}, "f:1")
    assert row["prompt"] == turns and row["chosen"] == [{"role": "assistant", "content": "yes"}]


def test_message_answers_train_their_end_of_turn_and_not_earlier_assistant_turns(tmp_path, tiny_tokenizer):
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
               {"role": "user", "content": "reverse stone"}]
    rows = [{"prompt": history, "chosen": [{"role": "assistant", "content": "enots"}],
             "rejected": [{"role": "assistant", "content": "stone"}]}]
    train, _, _ = _build(tmp_path, tiny_tokenizer, rows)
    seq = train[0].first
    scored = [t for t, lab in zip(seq.input_ids, seq.labels, strict=True) if lab != -100]
    assert tiny_tokenizer.decode(scored) == "enots<|im_end|>\n"  # the turn as format chat trains it; not "hello"


def test_kto_takes_pairs_as_desirable_and_undesirable_rows_with_mismatched_partners(tmp_path, tiny_tokenizer):
    train, _, audit = _build(tmp_path, tiny_tokenizer, pair_rows()[:2], objective="kto")
    assert [it.desirable for it in train] == [True, False, True, False] and audit.desirable == 2
    a, b = train[0], train[1]  # one group of 2: each row's partner is its prompt + the other row's completion
    assert a.second.input_ids == a.first.input_ids[: a.first.prompt] + b.first.input_ids[b.first.prompt:]


def test_prompt_that_fills_max_length_is_dropped_and_counted(tmp_path, tiny_tokenizer):
    rows = pair_rows()[:2] + [{"prompt": "x " * 80, "chosen": "a", "rejected": "b"}]
    train, _, audit = _build(tmp_path, tiny_tokenizer, rows, max_length=24)
    assert len(train) == 2 and audit.dropped_prompt == 1 and "prompt alone fills" in audit.warnings[0]


def test_bad_row_exits_2_without_traceback_and_writes_nothing(tmp_path, tiny_model_dir, capsys):
    config = make_config(tmp_path, tiny_model_dir, rows=[{"prompt": "a", "chosen": "b"}])
    assert run_cli("train", str(config)) == 2
    err = capsys.readouterr().err
    assert "run-data.jsonl:1: format preference needs column(s) rejected" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------ runs


def _first_loss(run: Path) -> float:
    return metrics(run)[0]["loss"]


@pytest.mark.slow
@pytest.mark.parametrize("objective,init,expected", [("dpo", "default", math.log(2)), ("kto", "default", 0.5),
                                                     ("dpo", "pissa", math.log(2))])
def test_first_step_loss_is_the_no_preference_value(tmp_path, learnable_model_dir, objective, init, expected):
    """The policy starts as the reference: dpo's first loss is ln 2 and kto's 0.5 exactly — also for pissa, whose
    start is not the base with the adapter off (its reference is the step-0 snapshot)."""
    config = make_config(tmp_path, learnable_model_dir, objective, max_steps=2)
    assert train(config, f"adapter.init={init}") == 0
    rows = metrics(tmp_path / "run")
    assert rows[0]["loss"] == pytest.approx(expected, rel=1e-6)
    assert rows[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert rows[1]["loss"] != pytest.approx(expected, rel=1e-4)  # and it trains
    names = {"dpo": ["rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"], "kto": ["kl"]}
    assert all(k in rows[0] for k in names[objective] + ["rewards/chosen", "rewards/rejected"])


@pytest.mark.slow
def test_grad_accumulation_gives_the_step_of_one_large_batch(tmp_path, learnable_model_dir):
    a = make_config(tmp_path, learnable_model_dir, name="a", batch_size=2, grad_accum=2, max_steps=2,
                    preference={"sft_weight": 0.5})
    b = make_config(tmp_path, learnable_model_dir, name="b", batch_size=4, grad_accum=1, max_steps=2,
                    preference={"sft_weight": 0.5})
    assert train(a) == 0 and train(b) == 0
    assert_same_training(tmp_path / "a", tmp_path / "b", rtol=1e-4)


@pytest.mark.slow
def test_precomputed_reference_trains_as_the_live_one_and_is_reused(tmp_path, learnable_model_dir, capsys):
    live = make_config(tmp_path, learnable_model_dir, name="live")
    pre = make_config(tmp_path, learnable_model_dir, name="pre", preference={"precompute_reference": True})
    assert train(live) == 0 and train(pre) == 0
    assert "precomputing the reference" in capsys.readouterr().out
    assert_same_training(tmp_path / "live", tmp_path / "pre", rtol=1e-5)
    (tmp_path / "pre2").mkdir()
    again = make_config(tmp_path, learnable_model_dir, name="pre2", preference={"precompute_reference": True})
    assert train(again) == 0
    assert "precomputing the reference" not in capsys.readouterr().out  # found with the token cache


@pytest.mark.slow
@pytest.mark.parametrize("objective,extra", [("dpo", {"precompute_reference": True}), ("orpo", None)])
def test_resume_mid_run_gives_the_uninterrupted_adapter(tmp_path, learnable_model_dir, objective, extra):
    from lorafit import runstate

    configs = [make_config(tmp_path, learnable_model_dir, objective, name=n, max_steps=4, save_every=2,
                           keep_checkpoints=3, preference=extra) for n in ("straight", "resumed")]
    assert train(configs[0]) == 0
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runstate, "save_final_adapter", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        assert train(configs[1]) == 130
    assert train(configs[1], "--resume") == 0
    a, b = adapter_tensors(tmp_path / "straight"), adapter_tensors(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_eval_pairs_are_scored_at_the_end_and_lorafit_eval_agrees(tmp_path, learnable_model_dir, capsys):
    config = make_config(tmp_path, learnable_model_dir, max_steps=3)
    assert train(config, "data.eval_fraction=0.25") == 0
    last = metrics(tmp_path / "run")[-1]
    assert {"eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_items"} <= set(last)
    assert last["eval_items"] == 3
    assert run_cli("eval", str(tmp_path / "run"), "--json", str(tmp_path / "eval.json")) == 0
    assert "reward accuracy vs the reference" in capsys.readouterr().out
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["objective"] == "dpo" and result["base"]["pairs"] == result["adapter"]["pairs"] == 3
    # `lorafit eval` loads the saved adapter afresh; its rewards are the run's own final eval figures
    assert result["adapter"]["reward_accuracy"] == pytest.approx(last["eval_rewards/accuracies"])
    assert result["adapter"]["reward_margin"] == pytest.approx(last["eval_rewards/margins"], rel=1e-4)
    assert result["adapter"]["margin"] - result["base"]["margin"] == pytest.approx(
        result["adapter"]["reward_margin"] / 0.1, rel=1e-4)  # rewards: β × the change of the pair's margin


@pytest.mark.slow
def test_continuing_an_adapter_uses_it_as_the_reference(tmp_path, learnable_model_dir, capsys):
    """adapter.from: the reference is base + the starting adapter (never the bare base), so the first dpo loss is
    ln 2 again and the rewards start at 0, although the parent's adapter is far from zero."""
    parent = make_config(tmp_path, learnable_model_dir, name="parent", max_steps=4, lr=5e-2)
    assert train(parent) == 0
    assert any(t.abs().sum() > 0 for k, t in adapter_tensors(tmp_path / "parent").items() if "lora_B" in k)
    child = make_config(tmp_path, learnable_model_dir, name="child", max_steps=2)
    child.write_text(child.read_text().replace("  r: 4\n  alpha: 12\n", f"  from: {tmp_path / 'parent'}\n"))
    assert train(child) == 0
    assert "reference: snapshot" in capsys.readouterr().out
    first = metrics(tmp_path / "child")[0]
    assert first["loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert metrics(tmp_path / "parent")[-1]["rewards/margins"] > 0.05  # the parent moved away from the base


@pytest.mark.slow
def test_two_processes_at_batch_2_equal_one_at_batch_4(tmp_path, learnable_model_dir):
    """DDP (torchrun, gloo): the global batch's mean over pairs and chosen tokens, the reference forward on each
    rank's own pairs, and an eval with fewer batches than ranks (lockstep) give one process's training."""
    from test_distributed import torchrun

    one = make_config(tmp_path, learnable_model_dir, name="one", batch_size=4, grad_accum=1, max_steps=2,
                      preference={"sft_weight": 0.5})
    two = make_config(tmp_path, learnable_model_dir, name="two", batch_size=2, grad_accum=1, max_steps=2,
                      preference={"sft_weight": 0.5})
    assert train(one, "data.eval_fraction=0.1") == 0
    torchrun(two, "data.eval_fraction=0.1")
    assert_same_training(tmp_path / "one", tmp_path / "two", rtol=1e-4)
    a, b = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    for key in ("rewards/accuracies", "rewards/margins", "nll_loss", "eval_rewards/margins"):
        x, y = [m[key] for m in a if key in m], [m[key] for m in b if key in m]
        assert x == pytest.approx(y, rel=1e-4, abs=1e-6) and x, key


def test_snapshot_reference_swaps_step_zero_weights_in_and_back(tiny_model):
    """Trainable tensors outside the adapter layers (here the embedding, as trained token rows are) make "adapter off"
    wrong, so the reference is a snapshot; inside `active` the model holds step 0's values, afterwards its own."""
    from types import SimpleNamespace

    from lorafit.adapters import attach_lora
    from lorafit.preference import Reference

    attach_lora(tiny_model, ["q_proj"], r=2, alpha=6.0)
    fresh = SimpleNamespace(adapter=SimpleNamespace(init="default", from_=None))
    assert Reference(tiny_model, fresh).mode == "adapter off"
    emb = tiny_model.get_input_embeddings().weight
    emb.requires_grad_(True)
    ref = Reference(tiny_model, fresh)
    assert ref.mode == "snapshot"
    start = emb.detach().clone()
    with torch.no_grad():
        emb.add_(1.0)  # a training step
    tiny_model.train()
    with ref.active(tiny_model) as m:
        assert torch.equal(m.get_input_embeddings().weight, start) and not m.training and not torch.is_grad_enabled()
    assert torch.equal(emb, start + 1.0) and tiny_model.training
