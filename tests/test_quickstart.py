"""The quickstart's shipped pieces: the tiny model in assets/, the task data, the config, a short run that learns."""

from __future__ import annotations

import importlib.util
import io
import json
import random
from pathlib import Path

import pytest

from lorafit.cli import main
from lorafit.config import load_config

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = REPO / "assets" / "tiny-llama"
CONFIG = REPO / "configs" / "tiny-quickstart.yaml"


def _load_script(name: str):
    """Import scripts/<name>.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_shipped_tiny_model_and_tokenizer_load_offline():
    from lorafit.model import load_model, load_tokenizer

    tok = load_tokenizer(str(MODEL_DIR))
    model = load_model(str(MODEL_DIR), dtype="float32")
    specials = [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id]
    assert None not in specials and len(set(specials)) == 4  # pad is its own token, never EOS
    assert all(len(tok(t, add_special_tokens=False)["input_ids"]) == 1 for t in ("<|im_start|>", "<|im_end|>"))
    assert tok("stone")["input_ids"][0] == tok.bos_token_id
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>assistant\n")
    cfg = model.config
    assert cfg.vocab_size == len(tok)
    assert cfg.hidden_size % 64 == 0 and cfg.intermediate_size % 64 == 0  # bnb's 4-bit CPU kernel needs this
    assert 2e6 < sum(p.numel() for p in model.parameters()) < 10e6
    assert sum(f.stat().st_size for f in MODEL_DIR.iterdir()) <= 10 * 2**20


def test_quickstart_config_validates_and_points_at_shipped_files(monkeypatch):
    monkeypatch.chdir(REPO)  # its paths are relative to the repository root, as the README runs it
    loaded = load_config(CONFIG)
    cfg = loaded.config
    assert loaded.warnings == []
    assert (REPO / cfg.model.path / "config.json").is_file()
    assert all((REPO / s.path).is_file() for s in cfg.data.train + cfg.data.eval)


def test_task_data_is_deterministic_and_eval_words_are_unseen():
    make = _load_script("make_task_data")
    first, second = make.make_task(), make.make_task()
    assert first == second
    train_words = {r["output"].split()[0] for r in first["train"]}
    eval_words = {r["output"].split()[0] for r in first["eval"]}
    assert len(train_words) == len(first["train"]) and len(eval_words) == len(first["eval"])
    assert not train_words & eval_words
    assert not set(make.pretraining_words()) & (train_words | eval_words)  # never the word of a warm-up task
    assert make.make_task(seed=8)["eval"] != first["eval"]  # the seed matters


@pytest.mark.parametrize("split", ["train", "eval"])
def test_committed_task_rows_ask_for_the_word_twice(split):
    rows = _read_jsonl(REPO / "data" / "tiny-task" / f"{split}.jsonl")
    assert rows
    for row in rows:
        word = row["instruction"].rsplit(" ", 1)[1]
        assert row["instruction"] == f"Repeat the word twice: {word}" and row["output"] == f" {word} {word}"


@pytest.mark.slow
def test_quickstart_run_learns_the_task_on_held_out_words(monkeypatch, tmp_path):
    """The README's quickstart as shipped (about 15 s of training): the adapter answers most held-out words right,
    the base none."""
    from rich.console import Console

    from lorafit.evaluate import evaluate_command

    monkeypatch.chdir(REPO)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(CONFIG), f"output.dir={run}"])
    assert exit_info.value.code == 0
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    results = evaluate_command(run, console=Console(file=io.StringIO()))
    assert results["adapter"]["tokens"] == results["base"]["tokens"] > 0
    assert results["adapter"]["loss"] < results["base"]["loss"] - 3  # measured 5.25 -> 0.11
    generation = results["generation"]
    assert generation["base"]["exact_match"] == 0
    assert generation["adapter"]["exact_match"] >= 0.6  # measured 0.94 on 32 held-out words


def _warm_up_input(build, prompt: str) -> tuple[str, list[str]]:
    """(instruction, the words it asks about) of a warm-up prompt, Alpaca or ChatML."""
    instruction = next(i for i in (*build.WORD_TASKS, *build.PAIR_TASKS) if i in prompt)
    rest = prompt.split(instruction, 1)[1]
    return instruction, rest.split("<|im_end|>")[0].split("\n")[0].split()


def test_warm_up_tasks_never_ask_about_a_task_word():
    from lorafit.model import load_tokenizer

    build = _load_script("build_tiny_model")
    tokenizer = load_tokenizer(str(MODEL_DIR))
    guard = build.TaskWordGuard(tokenizer)
    assert not guard("display") and not guard("keep")  # task words
    assert not guard("keeping") and guard("kept")  # "keeping" starts with the token of "keep"
    blocks = build.ExampleBlocks(tokenizer, block=256, seed=0)
    drawn = [blocks.example() for _ in range(3000)] + build.instruction_examples(random.Random(0), 3000)
    pair_tasks = 0
    for prompt, answer in drawn:
        instruction, words = _warm_up_input(build, prompt)
        assert all(w not in guard.words for w in words), (prompt, answer)
        if instruction in build.PAIR_TASKS:
            pair_tasks += 1
            assert len(words) == 2 and words[0] != words[1]  # "flag flag" would be the task's answer
    assert pair_tasks > 1000
    pair_rng = random.Random(1)
    for _ in range(300):  # a two-word pool makes equal pairs likely, unless they are redrawn
        prompt, _ = build.instruction_example(pair_rng, ["alpha", "beta"], lambda w: True, chat=False)
        instruction, words = _warm_up_input(build, prompt)
        assert instruction not in build.PAIR_TASKS or words[0] != words[1]
    assert all(guard(w) for p, _ in drawn[:3000] for w in _warm_up_input(build, p)[1])  # token level too
    pieces = ["dis", "play", "keep", "ord", "ered"]  # "dis" + "play" and "keep" spell task words
    rng = random.Random(0)
    glued = {build.random_word(rng, ["alpha"], guard, pieces) for _ in range(2000)}
    assert not glued & guard.words and {"alpha", "dis", "ord", "disord"} <= glued
    assert len(blocks.pieces) > 1000 and not set(blocks.pieces) & guard.words


@pytest.mark.slow
def test_build_script_makes_a_loadable_tied_model_quickly(tmp_path):
    """A few steps of the real build (the full one takes ~12 minutes): the result loads through lorafit."""
    import subprocess
    import sys

    from lorafit.model import load_model, load_tokenizer

    out = tmp_path / "tiny"
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "build_tiny_model.py"), "--steps", "3", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    stats = json.loads((out / "build_stats.json").read_text())
    assert stats["steps"] == 3 and 0 <= stats["copies_heldout_words"] <= 1
    model = load_model(str(out), dtype="float32")
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied, as saved
    assert len(load_tokenizer(str(out))) == model.config.vocab_size == stats["vocab_size"]
    assert "copies" in (out / "README.md").read_text()
