"""`lorafit eval`: base vs adapter on the run's eval data (loss, perplexity, tokens, generation metrics), the JSON
contract, the base measured with the adapter disabled on the same model, and clear errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from rundirs import ALPHA, R, config_dict, make_run, save_run, write_config

from lorafit.cli import main
from lorafit.config import load_config
from lorafit.errors import RunDirError
from lorafit.evaluate import (
    GenerationCase,
    adapter_disabled,
    evaluate_command,
    generate_texts,
    generation_cases,
    lcs_length,
    rouge_l,
    text_scores,
)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFIT_CACHE", str(tmp_path / "cache"))  # tokenized data never lands in ~/.cache


def _train_adapter_briefly(run_dir, model_dir, tokenizer, fmt="alpaca", steps=25):
    """A real (tiny) fine-tune with a plain PyTorch loop: the adapter must then beat the base on its data."""
    from transformers import AutoModelForCausalLM

    from lorafit.adapters import attach_lora
    from lorafit.data import build_datasets, causal_lm_loss, collate

    cfg = config_dict(run_dir, model_dir, fmt=fmt)
    config = load_config(write_config(run_dir, cfg)).config
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    attach_lora(model, "all-linear", r=R, alpha=ALPHA)
    train_rows, _, _ = build_datasets(config.data, tokenizer, seed=3, cache_dir=run_dir.parent / "cache")
    batch = collate(train_rows, pad_id=tokenizer.pad_token_id)
    labels = batch.pop("labels")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(0)
    model.train()
    for _ in range(steps):
        loss_sum, n = causal_lm_loss(model(**batch).logits, labels)
        (loss_sum / n).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return save_run(run_dir, model, tokenizer, cfg)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir, tiny_tokenizer):
    return _train_adapter_briefly(tmp_path_factory.mktemp("eval") / "run", tiny_model_dir, tiny_tokenizer)


def test_json_has_contract_keys_and_adapter_beats_base_after_short_run(trained_run, tmp_path, capsys):
    out = tmp_path / "results" / "eval.json"
    results = evaluate_command(trained_run, json_path=out)
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(results))
    for side in ("base", "adapter"):
        assert {"loss", "perplexity", "tokens"} <= set(written[side])
        assert math.isclose(written[side]["perplexity"], math.exp(written[side]["loss"]), rel_tol=1e-9)
    assert written["base"]["tokens"] == written["adapter"]["tokens"] > 0
    assert written["adapter"]["loss"] < written["base"]["loss"] - 0.5
    generation = written["generation"]
    assert generation["rows"] == 4 and len(generation["samples"]) == 3
    assert generation["adapter"]["rouge_l"] > generation["base"]["rouge_l"]
    assert generation["samples"][0]["reference"] == "enots"
    shown = capsys.readouterr().out
    assert "perplexity" in shown and "ROUGE-L" in shown and "enots" in shown


def test_generate_option_sets_how_many_rows_are_decoded(trained_run, tmp_path, capsys):
    from lorafit.cli import main
    from lorafit.evaluate import GENERATION_ROWS

    for rows, expected in (("2", 2), ("0", None)):
        out = tmp_path / f"eval-{rows}.json"
        with pytest.raises(SystemExit) as exit_info:
            main(["eval", str(trained_run), "--generate", rows, "--json", str(out)])
        assert exit_info.value.code == 0
        written = json.loads(out.read_text())
        assert written.get("generation", {}).get("rows") == expected
        assert written["adapter"]["tokens"] > 0  # the loss pass covers all rows either way
        assert ("ROUGE-L (2 rows)" in capsys.readouterr().out) == (expected == 2)
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--help"])
    assert f"default: {GENERATION_ROWS}" in capsys.readouterr().out.replace("\n", " ")


def test_config_file_source_uses_output_dir_adapter_and_the_adapter_option(trained_run, tmp_path, tiny_model_dir):
    config_file = trained_run / "config.yaml"
    from_config = evaluate_command(config_file)
    from_run = evaluate_command(trained_run)
    assert from_config["adapter"]["loss"] == pytest.approx(from_run["adapter"]["loss"], rel=1e-6)
    # --adapter: a zero adapter (nothing trained) on the same data measures exactly like the base.
    zero_run = make_run(tmp_path, tiny_model_dir, None, name="zero", zero=True)
    with_zero = evaluate_command(config_file, adapter_dir=zero_run / "adapter")
    assert with_zero["adapter"]["loss"] == pytest.approx(from_run["base"]["loss"], rel=1e-6)
    assert with_zero["base"]["loss"] == pytest.approx(from_run["base"]["loss"], rel=1e-6)


def test_eval_fraction_hold_out_is_used_when_no_eval_sources(tmp_path, tiny_model_dir, tiny_tokenizer):
    run = make_run(tmp_path, tiny_model_dir, tiny_tokenizer, eval_data=False)
    config_file = run / "config.yaml"
    config_file.write_text(config_file.read_text().replace("eval_fraction: 0.0", "eval_fraction: 0.5"))
    results = evaluate_command(run)
    assert 0 < results["base"]["tokens"] < 40  # two of the four rows' responses (+ EOS)


def test_adapter_disabled_gives_base_logits_and_restores_the_adapter(tiny_model, tiny_model_dir):
    from conftest import build_tiny_llama
    from rundirs import randomize_adapter

    from lorafit.adapters import attach_lora, lora_layers

    attach_lora(tiny_model, "all-linear", r=R, alpha=ALPHA)
    randomize_adapter(tiny_model)
    ids = torch.arange(3, 20)[None]
    with torch.no_grad():
        adapted = tiny_model(ids).logits
        with adapter_disabled(tiny_model):
            base = tiny_model(ids).logits
            assert not lora_layers(tiny_model)
        again = tiny_model(ids).logits
        reference = build_tiny_llama(tiny_model.config.vocab_size)(ids).logits
    torch.testing.assert_close(base, reference)
    torch.testing.assert_close(again, adapted)
    assert (adapted - base).abs().max() > 1e-2


def test_rouge_l_and_scores_on_known_pairs():
    assert lcs_length("a b c d".split(), "a x c d".split()) == 3
    assert rouge_l("the cat sat", "the cat sat") == 1.0
    assert rouge_l("", "x") == 0.0
    assert rouge_l("a b c d", "a c") == pytest.approx(2 * 0.5 * 1.0 / 1.5)  # P = 2/4, R = 2/2
    scores = text_scores(["Paris", "it is Paris.", "Lyon"], ["paris", "Paris.", "paris"])
    assert scores == {"exact_match": pytest.approx(1 / 3), "contains": pytest.approx(2 / 3),
                      "rouge_l": pytest.approx((1 + 0.5 + 0) / 3)}  # P = 1/3, R = 1 -> F = 0.5


def test_generation_cases_split_prompt_and_reference(tiny_tokenizer):
    from lorafit.data import Example

    ids = tiny_tokenizer("Q: hi A: hello")["input_ids"]
    eos = tiny_tokenizer.eos_token_id
    labels = [-100] * 5 + ids[5:] + [eos]
    cases = generation_cases([Example(ids + [eos], labels), Example(ids, [-100] + ids[1:])], tiny_tokenizer)
    assert len(cases) == 1  # the second is trained from its start: nothing to complete
    assert cases[0].prompt_ids == ids[:5] and cases[0].reference_tokens == len(ids) - 5 + 1
    assert cases[0].reference == tiny_tokenizer.decode(ids[5:]).strip()


def test_batched_left_padded_generation_equals_one_by_one(tiny_model, tiny_tokenizer):
    prompts = [tiny_tokenizer(t)["input_ids"] for t in ("The quick brown", "def add(a, b):\n", "Count")]
    cases = [GenerationCase(p, "x y z", 5) for p in prompts]
    stop = [tiny_tokenizer.eos_token_id]
    batched = generate_texts(tiny_model, tiny_tokenizer, cases, stop, batch_size=3)
    single = [generate_texts(tiny_model, tiny_tokenizer, [c], stop)[0] for c in cases]
    assert batched == single and all(batched)


def test_run_without_eval_data_says_how_to_add_it(tmp_path, tiny_model_dir, tiny_tokenizer, capsys):
    run = make_run(tmp_path, tiny_model_dir, tiny_tokenizer, eval_data=False)
    with pytest.raises(RunDirError, match="no eval data; add data.eval") as err:
        evaluate_command(run)
    assert "\n" not in str(err.value)
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(run)])
    assert exit_info.value.code == 2 and "data.eval_fraction" in capsys.readouterr().err


@pytest.mark.parametrize("case,needle", [("missing", "no such run directory"), ("no-adapter", "no adapter here"),
                                         ("not-a-run", "not a run directory")])
def test_bad_sources_are_one_clear_error_and_exit_2(tmp_path, tiny_model_dir, case, needle, capsys):
    source = tmp_path / "nope"
    if case == "no-adapter":
        source = tmp_path / "run"
        write_config(source, config_dict(source, tiny_model_dir))
    elif case == "not-a-run":
        source.mkdir()
    with pytest.raises(RunDirError, match=needle):
        evaluate_command(source)
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(source)])
    captured = capsys.readouterr()
    assert exit_info.value.code == 2 and needle in captured.err and "Traceback" not in captured.err
