"""Several adapters on one base: the multi-adapter layer (whole batch and per row), the shared decode loop, and
`lorafit eval` / `lorafit generate` with `--adapter NAME=DIR` repeated."""

from __future__ import annotations

import json

import pytest
import torch
from rundirs import base_model, make_run, run_cli, with_adapter

from lorafit.adapters.multi import AdapterBank
from lorafit.evaluate import add_adapter, evaluate_command
from lorafit.generate import Sampling, decode, generate_command


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, tiny_tokenizer):
    tmp = tmp_path_factory.mktemp("compare")
    torch.manual_seed(1)
    a = make_run(tmp, tiny_model_dir, tiny_tokenizer, name="a")
    torch.manual_seed(2)
    b = make_run(tmp, tiny_model_dir, tiny_tokenizer, name="b", dora=True, targets=["q_proj", "v_proj", "down_proj"])
    return {"a": a, "b": b}




def test_per_row_adapters_in_one_batch_equal_each_adapterwith_adapter(runs, tiny_model_dir):
    model = base_model(tiny_model_dir)
    bank = AdapterBank(model)
    for name, run in runs.items():
        add_adapter(bank, name, run / "adapter")
    ids = torch.arange(5, 29).view(4, 6)  # (B, T)
    with torch.no_grad():
        with bank.rows(["a", None, "b", "a"]):
            mixed = model(input_ids=ids).logits
        with bank.use("b"):
            whole_b = model(input_ids=ids).logits
        expected = {"a": with_adapter(tiny_model_dir, runs["a"])(input_ids=ids).logits,
                    "b": with_adapter(tiny_model_dir, runs["b"])(input_ids=ids).logits,
                    None: base_model(tiny_model_dir)(input_ids=ids).logits}
    for row, name in enumerate(["a", None, "b", "a"]):
        torch.testing.assert_close(mixed[row], expected[name][row], rtol=1e-5, atol=1e-5)
    assert torch.equal(whole_b, expected["b"])  # the whole-batch path is the adapter's own forward, bit for bit
    assert (expected["a"] - expected[None]).abs().max() > 1e-2 and (expected["b"] - expected[None]).abs().max() > 1e-2
    bank.remove("a")
    with pytest.raises(Exception, match="no adapter named 'a'"):
        bank.use("a").__enter__()


def test_decode_greedy_matches_transformers_generate_and_padding_does_not_change_a_row(tiny_model_dir, tiny_tokenizer):
    from transformers import GenerationConfig

    model = base_model(tiny_model_dir)
    prompts = [tiny_tokenizer(t)["input_ids"] for t in ("Reverse the word: stone", "def add(a, b):", "hello")]
    greedy = Sampling(max_new_tokens=12)
    batch = decode(model, tiny_tokenizer, prompts, [greedy] * 3, stop_ids=[])
    config = GenerationConfig(max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    for prompt, completion in zip(prompts, batch, strict=True):
        ids = torch.tensor([prompt])
        reference = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
        assert completion.token_ids == reference[0, len(prompt):].tolist()
        assert completion.finish_reason == "length" and completion.prompt_tokens == len(prompt)
        alone = decode(model, tiny_tokenizer, [prompt], [greedy], stop_ids=[])[0]
        assert alone.token_ids == completion.token_ids


def test_decode_stops_at_stop_strings_and_streams_exactly_the_text(tiny_model_dir, tiny_tokenizer):
    model = base_model(tiny_model_dir)
    prompt = tiny_tokenizer("The quick brown fox")["input_ids"]
    full = decode(model, tiny_tokenizer, [prompt], [Sampling(max_new_tokens=20)], stop_ids=[])[0].text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    assert stop.strip()
    streamed: list[str] = []
    cut = decode(model, tiny_tokenizer, [prompt], [Sampling(max_new_tokens=20, stop=[stop])], stop_ids=[],
                 on_text=lambda _, t: streamed.append(t))[0]
    assert cut.text == full[: full.find(stop)] and cut.finish_reason == "stop"
    assert "".join(streamed) == cut.text
    seeded = [decode(model, tiny_tokenizer, [prompt], [Sampling(max_new_tokens=16, temperature=5.0, seed=s)],
                     stop_ids=[])[0].token_ids for s in (1, 1, 2)]
    assert seeded[0] == seeded[1] != seeded[2]


def test_eval_with_named_adapters_has_one_column_and_json_entry_each(runs, tmp_path, capsys):
    out = tmp_path / "eval.json"
    code = run_cli("eval", str(runs["a"]), "--adapter", f"a={runs['a']}", "--adapter", f"bee={runs['b']}",
                   "--generate", "2", "--json", str(out))
    assert code == 0
    written = json.loads(out.read_text())
    assert set(written["adapters"]) == {"a", "bee"} and "adapter" not in written
    single_a = evaluate_command(runs["a"], generate_rows=2)
    single_b = evaluate_command(runs["a"], adapter_dir=runs["b"] / "adapter", generate_rows=2)
    assert written["adapters"]["a"]["loss"] == pytest.approx(single_a["adapter"]["loss"], rel=1e-6)
    assert written["adapters"]["bee"]["loss"] == pytest.approx(single_b["adapter"]["loss"], rel=1e-6)
    assert written["base"]["loss"] == pytest.approx(single_a["base"]["loss"], rel=1e-6)
    assert written["adapters"]["a"]["loss"] != pytest.approx(written["adapters"]["bee"]["loss"], rel=1e-3)
    generation = written["generation"]
    assert set(generation["adapters"]) == {"a", "bee"}
    assert generation["samples"][0]["adapters"]["a"] == single_a["generation"]["samples"][0]["adapter"]
    shown = capsys.readouterr().out
    assert "bee" in shown and "base vs 2 adapter(s)" in shown
    one = evaluate_command(runs["a"], adapters={"only": runs["b"]}, generate_rows=0)
    assert one["adapter"] == one["adapters"]["only"]


def test_generate_with_named_adapters_answers_each_aswith_adapter(runs, capsys):
    replies = generate_command(runs["a"], "Reverse the word: stone", max_new_tokens=10, adapters={"bee": runs["b"]})
    assert list(replies) == ["base", "a", "bee"]
    assert replies["a"] == generate_command(runs["a"], "Reverse the word: stone", max_new_tokens=10)
    assert replies["bee"] == generate_command(runs["b"], "Reverse the word: stone", max_new_tokens=10)
    assert "── bee ──" in capsys.readouterr().out



@pytest.mark.parametrize("case,needle", [
    ("duplicate", "the name 'x' is given twice"),
    ("no-equals", "give NAME=DIR"),
    ("other-base", "do not share one base"),
])
def test_bad_adapter_options_exit_2(runs, tmp_path, learnable_model_dir, tiny_tokenizer, case, needle, capsys):
    if case == "duplicate":
        extra = ["--adapter", f"x={runs['a']}", "--adapter", f"x={runs['b']}"]
    elif case == "no-equals":
        extra = ["--adapter", str(runs["a"]), "--adapter", str(runs["b"])]
    else:
        other = make_run(tmp_path, learnable_model_dir, tiny_tokenizer, name="other")
        extra = ["--adapter", f"x={other}"]
    for command in (["eval", str(runs["a"])], ["generate", str(runs["a"]), "--prompt", "hi"]):
        assert run_cli(*command, *extra) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err
