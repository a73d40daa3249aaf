"""Data: sources, formats, masks, the audit, packing isolation, the cache and the report."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import pytest
import torch

from lorafit import data as D
from lorafit.config import Config, DataConfig, DataSource
from lorafit.data import cache as cache_module
from lorafit.data import report as report_module
from lorafit.errors import DataError

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "count"},
    {"role": "assistant", "content": "1 2 3"},
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def cfg_for(path, fmt: str, **kw) -> DataConfig:
    return DataConfig(train=[{"path": str(path), "format": fmt}], **kw)


def trained_ids(example) -> list[int]:
    return [t for t in example.labels if t != D.IGNORE_INDEX]


def one_example(tmp_path, tok, rows, fmt, **kw):
    cfg = cfg_for(write_jsonl(tmp_path / "d.jsonl", rows), fmt, **kw)
    return D.prepare_examples(cfg, tok, seed=0, cache_dir=tmp_path / "cache").train


# ------------------------------------------------------------------------------------------------ formats


def test_alpaca_trains_response_and_eos_only(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    (e,) = one_example(tmp_path, tok, [{"instruction": "Add.", "input": "2 and 3", "output": "5"}], "alpaca")
    prompt = D.ALPACA_PROMPT.replace("{instruction}", "Add.").replace("{input}", "2 and 3")
    assert e.input_ids[0] == tok.bos_token_id
    assert tok.decode(e.input_ids, skip_special_tokens=True) == prompt + "5"
    assert trained_ids(e) == tok("5", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert e.labels[-1] == tok.eos_token_id


def test_alpaca_without_input_uses_the_short_prompt(tmp_path, tiny_tokenizer):
    (e,) = one_example(tmp_path, tiny_tokenizer, [{"instruction": "Add.", "output": "5"}], "alpaca")
    text = tiny_tokenizer.decode(e.input_ids, skip_special_tokens=True)
    assert text.startswith("Below is an instruction that describes a task. Write")
    assert "### Input" not in text


def test_custom_prompt_template_gets_empty_input(tmp_path, tiny_tokenizer):
    rows = [{"instruction": "Add.", "input": None, "output": "5"}]
    template = "Q: {instruction} [{input}] {json}\nA: "
    (e,) = one_example(tmp_path, tiny_tokenizer, rows, "alpaca", prompt_template=template)
    assert tiny_tokenizer.decode(e.input_ids, skip_special_tokens=True) == "Q: Add. [] {json}\nA: 5"


def test_train_on_prompt_trains_everything_but_the_first_token(tmp_path, tiny_tokenizer):
    (e,) = one_example(tmp_path, tiny_tokenizer, [{"prompt": "2+3=", "completion": "5"}], "completion",
                       train_on_prompt=True)
    assert e.labels[0] == D.IGNORE_INDEX
    assert e.labels[1:] == e.input_ids[1:]


def test_chat_trains_assistant_turns_with_their_end_of_turn(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    (e,) = one_example(tmp_path, tok, [{"messages": CHAT}], "chat")
    assert tok.decode(e.input_ids) == tok.apply_chat_template(CHAT, tokenize=False)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    # Two trained spans, each ending in <|im_end|>\n; nothing of the system or user turns is trained.
    spans, current = [], []
    for t, lab in zip(e.input_ids, e.labels, strict=True):
        if lab != D.IGNORE_INDEX:
            current.append(t)
        elif current:
            spans.append(current)
            current = []
    spans.append(current) if current else None
    assert [tok.decode(s) for s in spans] == ["hello<|im_end|>\n", "1 2 3<|im_end|>\n"]
    assert sum(t == im_end for t in trained_ids(e)) == 2


def test_chat_template_override_is_used(tmp_path, tiny_tokenizer):
    nl = "{{ '\\n' }}"  # a literal newline after a block tag would be trimmed by Jinja
    template = (f"{{% for m in messages %}}{{{{ m['role'] }}}}:{nl}{{{{ m['content'] }}}}"
                f"{{% if m['role'] == 'assistant' %}}</s>{{% endif %}}{nl}{{% endfor %}}"
                f"{{% if add_generation_prompt %}}assistant:{nl}{{% endif %}}")
    (e,) = one_example(tmp_path, tiny_tokenizer, [{"messages": CHAT[1:3]}], "chat", chat_template=template)
    assert tiny_tokenizer.decode(trained_ids(e)) == "hello</s>\n"


def test_text_trains_every_token_and_eos(tmp_path, tiny_tokenizer):
    (e,) = one_example(tmp_path, tiny_tokenizer, [{"text": "the quick fox"}], "text")
    assert e.input_ids[0] == tiny_tokenizer.bos_token_id and e.input_ids[-1] == tiny_tokenizer.eos_token_id
    assert e.labels[1:] == e.input_ids[1:]


def test_eos_stays_trained_when_pad_is_eos(tmp_path, tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.pad_token = tok.eos_token
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "a b c d", "completion": "e"}]
    examples = one_example(tmp_path, tok, rows, "completion")
    batch = D.collate(examples, pad_id=tok.pad_token_id)
    targets = batch["labels"][:, 1:]
    assert int((targets == tok.eos_token_id).sum()) == 2  # both EOS trained, padding (also id EOS) not
    assert int((batch["input_ids"] == tok.eos_token_id).sum()) > 2


# ------------------------------------------------------------------------------------------------ truncation, audit


def test_truncation_counts_and_drops_rows_without_trained_tokens(tmp_path, tiny_tokenizer):
    rows = [{"prompt": "short", "completion": "ok"}, {"prompt": "word " * 40, "completion": "lost"},
            {"prompt": "a", "completion": "long answer " * 20}]
    cfg = cfg_for(write_jsonl(tmp_path / "d.jsonl", rows), "completion", max_length=16)
    train, _, audit = D.build_datasets(cfg, tiny_tokenizer, seed=0, cache_dir=tmp_path / "c")
    assert (audit.rows, audit.examples, audit.truncated, audit.dropped_truncated) == (3, 2, 2, 1)
    assert audit.end_checked == 2 and audit.end_trained == 1  # the long answer lost its EOS
    assert all(len(r) <= 16 for r in train)
    assert any("end token" in w for w in audit.warnings)


def test_audit_refuses_when_every_eos_is_truncated(tmp_path, tiny_tokenizer):
    rows = [{"prompt": "a", "completion": "long answer " * 20}] * 3
    cfg = cfg_for(write_jsonl(tmp_path / "d.jsonl", rows), "completion", max_length=16)
    with pytest.raises(DataError, match="never learn to stop.*max_length"):
        D.build_datasets(cfg, tiny_tokenizer, seed=0, cache_dir=tmp_path / "c")


def test_audit_refuses_a_chat_template_without_end_of_turn(tmp_path, tiny_tokenizer):
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}" \
               "{% if add_generation_prompt %}assistant: {% endif %}"
    cfg = cfg_for(write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}]), "chat", chat_template=template)
    with pytest.raises(DataError, match="end-of-turn.*chat_template"):
        D.build_datasets(cfg, tiny_tokenizer, seed=0, cache_dir=tmp_path / "c")


def test_audit_refuses_data_with_nothing_to_train(tmp_path, tiny_tokenizer):
    cfg = cfg_for(write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT[:2]}]), "chat")
    with pytest.raises(DataError, match="no token of the training data is trained.*1 had nothing"):
        D.build_datasets(cfg, tiny_tokenizer, seed=0, cache_dir=tmp_path / "c")


def test_audit_counts_supervised_tokens(tmp_path, tiny_tokenizer):
    cfg = cfg_for(write_jsonl(tmp_path / "d.jsonl", [{"text": "abc"}, {"text": "the quick fox"}]), "text",
                  packing=False, max_length=32)
    train, _, audit = D.build_datasets(cfg, tiny_tokenizer, seed=0, cache_dir=tmp_path / "c")
    lengths = [len(r) for r in train]
    assert audit.tokens == sum(lengths) and audit.supervised == sum(lengths) - 2  # first token of each untrained
    assert audit.packing_efficiency == pytest.approx(sum(lengths) / (2 * 32))
    assert audit.end_checked == 0  # text is not a supervised format


# ------------------------------------------------------------------------------------------------ packing


def test_pack_is_deterministic_fits_and_places_each_item_once():
    lengths = [5, 9, 3, 7, 1, 8, 2, 10, 4, 6]
    bins = D.pack(lengths, 12)
    assert bins == D.pack(lengths, 12)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 12 for b in bins)
    assert len(bins) == 5  # 55 tokens need at least 5 bins of 12


def test_packed_rows_restart_positions_and_untrain_each_first_token():
    a = D.Example([1, 10, 11], [-100, 10, 11])
    b = D.Example([1, 20], [-100, 20])
    (row,) = D.make_rows([a, b], max_length=8, packing=True)
    assert row.input_ids == [1, 10, 11, 1, 20]
    assert row.position_ids == [0, 1, 2, 0, 1]
    assert row.labels == [-100, 10, 11, -100, 20]


def test_collate_pads_right_with_ignored_labels_and_restarting_positions():
    rows = [D.make_row([D.Example([1, 5, 6], [-100, 5, 6])]), D.make_row([D.Example([1, 7], [-100, 7])])]
    b = D.collate(rows, pad_id=None)
    assert b["input_ids"].tolist() == [[1, 5, 6], [1, 7, 0]]
    assert b["labels"].tolist() == [[-100, 5, 6], [-100, 7, -100]]
    assert b["position_ids"].tolist() == [[0, 1, 2], [0, 1, 0]]
    assert "attention_mask" not in b
    flat = D.collate(rows, pad_id=None, flatten=True)
    assert flat["input_ids"].tolist() == [[1, 5, 6, 1, 7]] and flat["position_ids"].tolist() == [[0, 1, 2, 0, 1]]


def test_causal_lm_loss_shifts_and_counts():
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 6)
    labels = torch.tensor([[3, -100, 2, 5]])
    loss, n = D.causal_lm_loss(logits, labels)
    lp = logits.log_softmax(-1)
    assert n == 2
    assert loss.item() == pytest.approx(-(lp[0, 1, 2] + lp[0, 2, 5]).item(), abs=1e-6)


def _per_example_losses(model, batch) -> list[float]:
    """Loss sums per packed example, read from one forward pass (examples split where positions restart)."""
    labels = batch.pop("labels")
    logits = model(**batch, use_cache=False).logits
    out = []
    for b in range(labels.shape[0]):
        starts = (batch["position_ids"][b] == 0).nonzero().flatten().tolist() + [labels.shape[1]]
        for s, e in zip(starts[:-1], starts[1:], strict=True):
            loss, n = D.causal_lm_loss(logits[b: b + 1, s:e], labels[b: b + 1, s:e])
            if n:  # padding forms a segment of its own, with nothing trained
                out.append(loss.item())
    return out


@pytest.fixture
def chat_examples(tmp_path, tiny_tokenizer):
    rows = [{"messages": [{"role": "user", "content": f"count to {i}"},
                          {"role": "assistant", "content": " ".join(str(k) for k in range(i))}]} for i in range(1, 8)]
    return one_example(tmp_path, tiny_tokenizer, rows, "chat", max_length=64)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("flatten", [False, True])
def test_packed_batch_gives_the_same_per_example_losses(chat_examples, tiny_tokenizer, attention, flatten):
    from conftest import build_tiny_llama

    model = build_tiny_llama(len(tiny_tokenizer), attn_implementation=attention)
    rows = D.make_rows(chat_examples, max_length=64, packing=True)
    assert len(rows) < len(chat_examples)  # something was packed
    with torch.no_grad():
        packed = sorted(_per_example_losses(model, D.collate(rows, flatten=flatten)))
        alone = sorted(_per_example_losses(model, D.collate([e]))[0] for e in chat_examples)
    assert packed == pytest.approx(alone, abs=1e-5)


def test_packed_isolation_comes_from_position_ids(chat_examples, tiny_tokenizer):
    from conftest import build_tiny_llama

    model = build_tiny_llama(len(tiny_tokenizer), attn_implementation="sdpa")
    rows = D.make_rows(chat_examples, max_length=64, packing=True)
    batch = D.collate(rows)
    labels = batch.pop("labels")
    with torch.no_grad():
        isolated, _ = D.causal_lm_loss(model(**batch, use_cache=False).logits, labels)
        batch["position_ids"] = torch.arange(labels.shape[1]).expand_as(labels)  # one long sequence per row
        leaking, _ = D.causal_lm_loss(model(**batch, use_cache=False).logits, labels)
    assert abs(isolated.item() - leaking.item()) > 1e-3


# ------------------------------------------------------------------------------------------------ sources


def test_folder_mixes_every_supported_file_sorted(tmp_path, monkeypatch, tiny_tokenizer):
    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    write_jsonl(folder / "a.jsonl", [{"text": "one"}, {"text": "two"}])
    (folder / "b.json").write_text(json.dumps({"data": [{"text": "three"}]}))
    with (folder / "c.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerows([["text"], ["four"]])
    (folder / "d.txt").write_text("five\n\nsix\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["seven"]}), folder / "sub" / "e.parquet")
    (folder / "notes.md").write_text("ignored")
    monkeypatch.chdir(tmp_path)  # relative paths resolve against the working directory
    source = DataSource(path="data", format="text")
    assert [row["text"] for _, row in D.read_source(source)] == ["one", "two", "three", "four", "five", "six", "seven"]
    assert D.count_rows(source) == 7


def test_columns_rename_and_sources_mix_in_order(tmp_path, tiny_tokenizer):
    write_jsonl(tmp_path / "qa.jsonl", [{"question": "Q1", "answer": "A1"}])
    write_jsonl(tmp_path / "t.jsonl", [{"text": "T1"}, {"text": "T2"}])
    cfg = DataConfig(train=[{"path": str(tmp_path / "t.jsonl"), "format": "text"},
                            {"path": str(tmp_path / "qa.jsonl"), "format": "completion",
                             "columns": {"prompt": "question", "completion": "answer"}}])
    train = D.prepare_examples(cfg, tiny_tokenizer, seed=0, cache_dir=tmp_path / "c").train
    texts = [tiny_tokenizer.decode(e.input_ids, skip_special_tokens=True) for e in train]
    assert texts == ["T1", "T2", "Q1A1"]


def test_eval_fraction_is_seeded_and_disjoint(tmp_path, tiny_tokenizer):
    cfg = cfg_for(write_jsonl(tmp_path / "d.jsonl", [{"text": f"row {i}"} for i in range(20)]), "text",
                  eval_fraction=0.25)

    def split(seed):
        p = D.prepare_examples(cfg, tiny_tokenizer, seed=seed, cache_dir=tmp_path / "c")
        return [e.row for e in p.train], [e.row for e in p.eval]

    train, held = split(1)
    assert len(held) == 5 and not set(train) & set(held) and len(train) == 15
    assert split(1) == (train, held)
    assert split(2)[1] != held


def test_eval_sources_are_used(tmp_path, tiny_tokenizer):
    cfg = DataConfig(train=[{"path": str(write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}])), "format": "text"}],
                     eval=[{"path": str(write_jsonl(tmp_path / "e.jsonl", [{"text": "b"}, {"text": "c"}])),
                            "format": "text"}])
    _, eval_rows, audit = D.build_datasets(cfg, tiny_tokenizer, seed=0, cache_dir=tmp_path / "c")
    assert audit.eval_examples == 2 and sum(r.position_ids.count(0) for r in eval_rows) == 2


def test_count_rows_is_none_for_an_unavailable_hub_dataset():
    assert D.count_rows(DataSource(path="nobody-xyz/no-such-dataset", format="text")) is None


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("content, fmt, message", [
    ('{"text": "a"}\n{"text": "b"\n', "text", r"d.jsonl:2: malformed JSON"),
    ('{"question": "q", "answer": "a"}\n', "alpaca",
     r"d.jsonl:1: format alpaca needs column\(s\) instruction, output; found: question, answer"),
    ('{"text": 5}\n', "text", r"d.jsonl:1: column 'text' must be a string \(got int 5\)"),
    ('{"prompt": "p", "completion": null}\n', "completion", r"column 'completion' must be a string \(got null\)"),
    ('{"messages": [{"role": "bot", "content": "x"}]}\n', "chat",
     r"d.jsonl:1: messages\[0\].role is 'bot'; allowed: system, user, assistant, tool"),
    ("\n\n", "text", r"no rows \(the data set is empty\)"),
])
def test_bad_rows_name_file_and_line(tmp_path, tiny_tokenizer, content, fmt, message):
    (tmp_path / "d.jsonl").write_text(content)
    with pytest.raises(DataError, match=message):
        D.build_datasets(cfg_for(tmp_path / "d.jsonl", fmt), tiny_tokenizer, seed=0, cache_dir=tmp_path / "c")


def test_missing_paths_and_empty_folders_are_named(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: no such file or folder"):
        D.count_rows(DataSource(path=str(tmp_path / "nope.jsonl"), format="text"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: folder holds no data file"):
        D.read_source(DataSource(path=str(tmp_path / "empty"), format="text"))


def test_unknown_format_is_refused():
    with pytest.raises(DataError, match="unknown format 'sharegpt'"):
        D.check_row({"text": "a"}, "sharegpt", {}, "f.jsonl:1")


def test_renamed_missing_column_names_the_data_name(tmp_path):
    with pytest.raises(DataError, match=r"prompt \(as 'question'\)"):
        D.check_row({"q": "a", "completion": "b"}, "completion", {"prompt": "question"}, "f.jsonl:1")


# ------------------------------------------------------------------------------------------------ cache


def test_second_build_reads_the_cache_until_data_or_settings_change(tmp_path, tiny_tokenizer, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "completion": "c"}])
    cfg = cfg_for(path, "completion")
    first = D.prepare_examples(cfg, tiny_tokenizer, seed=0, cache_dir=tmp_path / "c").train
    calls = []
    real = D.tokenize_rows
    monkeypatch.setattr(cache_module, "tokenize_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert D.prepare_examples(cfg, tiny_tokenizer, seed=0, cache_dir=tmp_path / "c").train == first
    assert calls == []
    D.prepare_examples(cfg_for(path, "completion", train_on_prompt=True), tiny_tokenizer, seed=0,
                       cache_dir=tmp_path / "c")
    assert calls == [1]
    write_jsonl(path, [{"prompt": "p", "completion": "changed"}])
    changed = D.prepare_examples(cfg, tiny_tokenizer, seed=0, cache_dir=tmp_path / "c").train
    assert calls == [1, 1] and changed != first


# ------------------------------------------------------------------------------------------------ report


def _config(data: DataConfig) -> Config:
    return Config(model={"path": "tiny"}, data=data, output={"dir": "run"})


def test_report_highlights_trained_tokens_and_shows_the_audit(tmp_path, tiny_tokenizer):
    from rich.console import Console

    cfg = cfg_for(write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}] * 4), "chat", max_length=128)
    console = Console(record=True, width=120, force_terminal=False)
    D.print_data_report(_config(cfg), tiny_tokenizer, console, n_examples=2, cache_dir=tmp_path / "c")
    out = console.export_text()
    assert out.count("d.jsonl row") == 2 and "label audit" in out and "end token trained" in out
    assert "4 of 4 examples" in out and "█" in out and "data ok" in out
    assert "mixture (train)" in out and "100.0%" in out and "token store:" in out and " on disk; data read in " in out
    example = D.prepare_examples(cfg, tiny_tokenizer, seed=0, cache_dir=tmp_path / "c").train[0]
    text = D.render_example(tiny_tokenizer, example)
    highlighted = [text.plain[s.start: s.end] for s in text.spans if s.style == report_module.TRAINED_STYLE]
    assert highlighted == ["hello<|im_end|>\n", "1 2 3<|im_end|>\n"]


def test_report_prints_then_refuses_bad_data(tmp_path, tiny_tokenizer):
    from rich.console import Console

    rows = [{"prompt": "a", "completion": "long answer " * 20}]
    cfg = cfg_for(write_jsonl(tmp_path / "d.jsonl", rows), "completion", max_length=16)
    console = Console(record=True, width=120)
    with pytest.raises(DataError, match="never learn to stop"):
        D.print_data_report(_config(cfg), tiny_tokenizer, console, cache_dir=tmp_path / "c")
    assert "label audit" in console.export_text()


def test_length_histogram_counts_every_example():
    lines = D.length_histogram([1, 2, 16, 16, 9], max_length=16, bins=2)
    assert [line.split()[-1] for line in lines] == ["2", "3"]


def test_whole_packed_batch_loss_never_targets_the_next_example(tmp_path, tiny_tokenizer):
    from conftest import build_tiny_llama

    rows = [{"text": "the quick brown fox " * (i % 3 + 1)} for i in range(6)]  # every token trained
    examples = one_example(tmp_path, tiny_tokenizer, rows, "text", max_length=64)
    model = build_tiny_llama(len(tiny_tokenizer))
    batch = D.collate(D.make_rows(examples, max_length=64, packing=True))
    labels = batch.pop("labels")
    with torch.no_grad():
        packed, n_packed = D.causal_lm_loss(model(**batch, use_cache=False).logits, labels)
        alone = []
        for e in examples:
            one = D.collate([e])
            one_labels = one.pop("labels")
            alone.append(D.causal_lm_loss(model(**one, use_cache=False).logits, one_labels))
    assert n_packed == sum(n for _, n in alone)
    assert packed.item() == pytest.approx(sum(loss.item() for loss, _ in alone), abs=1e-4)


def test_progress_bar_path_and_string_cache_dir(tmp_path, tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(cache_module, "_PROGRESS_ABOVE", 1)  # show the bar even for this small set
    cfg = cfg_for(write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"text": "b c"}]), "text")
    train, _, audit = D.build_datasets(cfg, tiny_tokenizer, seed=0, cache_dir=str(tmp_path / "c"))
    assert audit.examples == 2 and list((tmp_path / "c" / "data").glob("*/meta.json"))
