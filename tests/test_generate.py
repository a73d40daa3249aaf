"""`lorafit generate`: streamed text from a run, an adapter folder and a merged model; prompts wrapped as the run
was trained (chat template, Alpaca prompt); greedy by default; clear errors."""

from __future__ import annotations

import pytest
import torch
from rundirs import make_run

from lorafit.cli import main
from lorafit.errors import LorafitError, RunDirError
from lorafit.generate import generate_command, prompt_ids
from lorafit.merge import merge_adapter
from lorafit.sources import resolve_source


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, tiny_model_dir, tiny_tokenizer):
    return make_run(tmp_path_factory.mktemp("gen"), tiny_model_dir, tiny_tokenizer, fmt="chat")


def test_run_dir_streams_greedy_text_to_stdout(chat_run, capsys):
    text = generate_command(chat_run, "Reverse the word: stone", max_new_tokens=12)
    streamed = capsys.readouterr().out
    assert text and text.strip() in streamed
    assert generate_command(chat_run, "Reverse the word: stone", max_new_tokens=12) == text  # greedy: repeatable


def test_merged_dir_generates_what_the_run_generates(chat_run, tmp_path, capsys):
    merge_adapter(chat_run, tmp_path / "merged", dtype="float32")
    capsys.readouterr()
    from_run = generate_command(chat_run, "hello, how are you?", max_new_tokens=10)
    from_merged = generate_command(tmp_path / "merged", "hello, how are you?", max_new_tokens=10)
    assert from_merged == from_run and from_merged in capsys.readouterr().out
    from_adapter = generate_command(chat_run / "adapter", "hello, how are you?", max_new_tokens=10)
    assert from_adapter == from_run


def test_sampling_uses_temperature_and_top_p(chat_run, capsys):
    torch.manual_seed(0)
    first = generate_command(chat_run, "hello", max_new_tokens=16, temperature=5.0, top_p=1.0)
    torch.manual_seed(1)
    second = generate_command(chat_run, "hello", max_new_tokens=16, temperature=5.0, top_p=1.0)
    assert first != second  # a near-flat distribution over ~390 tokens: two seeds agreeing would mean no sampling


def test_prompts_are_wrapped_as_the_run_was_trained(chat_run, tmp_path, tiny_model_dir, tiny_tokenizer):
    chat = tiny_tokenizer.decode(prompt_ids(tiny_tokenizer, resolve_source(chat_run), "hi"))
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    alpaca_run = make_run(tmp_path, tiny_model_dir, tiny_tokenizer, fmt="alpaca")
    alpaca = tiny_tokenizer.decode(prompt_ids(tiny_tokenizer, resolve_source(alpaca_run), "Add 2 and 3."))
    assert alpaca.startswith("<s>Below is an instruction") and alpaca.endswith("Add 2 and 3.\n\n### Response:\n")
    plain = resolve_source(tiny_model_dir, allow_model=True)
    assert tiny_tokenizer.decode(prompt_ids(tiny_tokenizer, plain, "abc")) == "<s>abc"


@pytest.mark.parametrize("case,needle", [("missing", "no such directory"), ("empty-dir", "holds no adapter"),
                                         ("empty-prompt", "--prompt: is empty")])
def test_bad_inputs_are_one_clear_error_and_exit_2(chat_run, tmp_path, case, needle, capsys):
    source, prompt = chat_run, "hi"
    if case == "missing":
        source = tmp_path / "nope"
    elif case == "empty-dir":
        source = tmp_path / "empty"
        source.mkdir()
    else:
        prompt = "  "
    with pytest.raises(RunDirError if case != "empty-prompt" else LorafitError, match=needle):
        generate_command(source, prompt)
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", str(source), "--prompt", prompt])
    captured = capsys.readouterr()
    assert exit_info.value.code == 2 and needle in captured.err and "Traceback" not in captured.err
