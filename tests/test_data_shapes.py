"""Data in the shapes users bring: ShareGPT rows, OpenAI tool calls, saved datasets and .arrow files, mixing."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_data import CHAT, cfg_for, write_jsonl

from lorafit import data as D
from lorafit.config import DataConfig, DataSource, load_config
from lorafit.errors import ConfigError, DataError

SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt", "tool": "tool"}

# A template that renders OpenAI tool calls (arguments as an object) and tool results, ChatML style.
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\ntools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{% for c in m.get('tool_calls', []) %}call {{ c['function']['name'] }} {{ c['function']['arguments'] | tojson }}"
    "{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def examples(tmp_path, tok, cfg):
    return list(D.prepare_examples(cfg, tok, seed=0, cache_dir=tmp_path / "cache").train)


def as_lists(exs):
    return [(e.input_ids, e.labels) for e in exs]


# ------------------------------------------------------------------------------------------------ ShareGPT


def test_sharegpt_rows_train_exactly_as_the_same_messages(tmp_path, tiny_tokenizer):
    share = [{"conversations": [{"from": SHAREGPT_ROLE[m["role"]], "value": m["content"]} for m in CHAT]}]
    openai = [{"messages": CHAT}]
    a = examples(tmp_path, tiny_tokenizer, cfg_for(write_jsonl(tmp_path / "s.jsonl", share), "chat"))
    b = examples(tmp_path, tiny_tokenizer, cfg_for(write_jsonl(tmp_path / "o.jsonl", openai), "chat"))
    assert as_lists(a) == as_lists(b)
    # and both are the tokenizer's own rendering of the conversation
    assert a[0].input_ids == tiny_tokenizer.apply_chat_template(CHAT, tokenize=True, return_dict=False)


def test_sharegpt_unknown_role_names_file_line_and_the_roles_allowed(tmp_path, tiny_tokenizer):
    rows = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
            {"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "yo"}]}]
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    with pytest.raises(DataError, match=r"s\.jsonl:2: conversations\[1\]\.from is 'bot'; allowed: human, gpt, "
                                        r"system, tool"):
        D.build_datasets(cfg_for(path, "chat"), tiny_tokenizer, seed=0, cache_dir=tmp_path / "c")


# ------------------------------------------------------------------------------------------------ tool calls


def test_tool_calls_are_rendered_by_the_template_and_the_calling_turn_is_trained(tmp_path, tiny_tokenizer):
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    messages = [
        {"role": "user", "content": "2+3?"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
        {"role": "tool", "content": "5", "tool_call_id": "c1"},
        {"role": "assistant", "content": "5"},
    ]
    path = write_jsonl(tmp_path / "t.jsonl", [{"messages": messages, "tools": tools}])
    (e,) = examples(tmp_path, tiny_tokenizer, cfg_for(path, "chat", chat_template=TOOL_TEMPLATE))
    # the reference: the template given the arguments as an object, as transformers documents
    reference = json.loads(json.dumps(messages))
    reference[1]["content"] = ""
    reference[1]["tool_calls"][0]["function"]["arguments"] = {"a": 2, "b": 3}
    reference[2] = {"role": "tool", "content": "5", "tool_call_id": "c1"}
    text = tiny_tokenizer.apply_chat_template(reference, tools=tools, chat_template=TOOL_TEMPLATE, tokenize=False)
    assert e.input_ids == tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    trained = tiny_tokenizer.decode([t for t in e.labels if t != D.IGNORE_INDEX])
    assert trained == 'call add {"a": 2, "b": 3}<|im_end|>\n5<|im_end|>\n'  # both assistant turns, not the tool's


def test_bad_tool_call_arguments_name_the_line(tmp_path, tiny_tokenizer):
    bad = [{"role": "user", "content": "x"},
           {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{not json"}}]}]
    path = write_jsonl(tmp_path / "t.jsonl", [{"messages": CHAT}, {"messages": bad}])
    with pytest.raises(DataError, match=r"t\.jsonl:2: messages\[1\]\.tool_calls\[0\]\.function\.arguments is not "
                                        "valid JSON"):
        D.read_source(DataSource(path=str(path), format="chat"))


# ------------------------------------------------------------------------------------------------ saved datasets


ALPACA = [{"instruction": f"Say {i}.", "input": "" if i % 2 else f"n={i}", "output": f"{i}"} for i in range(6)]


def test_save_to_disk_folder_and_arrow_files_read_like_jsonl(tmp_path, tiny_tokenizer):
    import datasets
    import pyarrow as pa

    reference = examples(tmp_path, tiny_tokenizer, cfg_for(write_jsonl(tmp_path / "a.jsonl", ALPACA), "alpaca"))
    datasets.Dataset.from_list(ALPACA).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ALPACA[:2]),
                          "test": datasets.Dataset.from_list(ALPACA)}).save_to_disk(str(tmp_path / "dict"))
    table = pa.Table.from_pylist(ALPACA)
    with pa.OSFile(str(tmp_path / "stream.arrow"), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
        w.write_table(table, max_chunksize=4)  # two record batches
    with pa.OSFile(str(tmp_path / "file.arrow"), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table)
    for path, split in [("saved", "train"), ("dict", "test"), ("stream.arrow", "train"), ("file.arrow", "train")]:
        cfg = DataConfig(train=[{"path": str(tmp_path / path), "format": "alpaca", "split": split}])
        assert as_lists(examples(tmp_path, tiny_tokenizer, cfg)) == as_lists(reference), path
        assert D.count_rows(cfg.train[0]) == 6


def test_saved_dataset_without_the_columns_is_refused_naming_the_folder(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"question": "q", "answer": "a"}]).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DataError, match=r"saved: format alpaca needs column\(s\) instruction, output; the data has "
                                        "question, answer"):
        D.read_source(DataSource(path=str(tmp_path / "saved"), format="alpaca"))
    with pytest.raises(DataError, match="no split 'validation'; it has train"):
        datasets.DatasetDict({"train": datasets.Dataset.from_list(ALPACA)}).save_to_disk(str(tmp_path / "d"))
        D.read_source(DataSource(path=str(tmp_path / "d"), format="alpaca", split="validation"))


# ------------------------------------------------------------------------------------------------ mixing


def mix_config(tmp_path, **first) -> DataConfig:
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(10)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"b{i}"} for i in range(4)])
    return DataConfig(train=[{"path": str(a), "format": "text", **first}, {"path": str(b), "format": "text"}])


def texts(tmp_path, tok, cfg, seed=0):
    prepared = D.prepare_examples(cfg, tok, seed=seed, cache_dir=tmp_path / "cache")
    return [tok.decode(e.input_ids, skip_special_tokens=True) for e in prepared.train], prepared


def test_samples_takes_a_seeded_subset_in_data_order_and_reports_the_mixture(tmp_path, tiny_tokenizer):
    got, prepared = texts(tmp_path, tiny_tokenizer, mix_config(tmp_path, samples=3))
    a = [t for t in got if t.startswith("a")]
    assert len(a) == 3 and len(set(a)) == 3 and a == sorted(a, key=lambda t: int(t[1:]))
    assert got[3:] == ["b0", "b1", "b2", "b3"]  # the other source whole, sources in order
    assert texts(tmp_path, tiny_tokenizer, mix_config(tmp_path, samples=3))[0] == got  # seeded
    assert texts(tmp_path, tiny_tokenizer, mix_config(tmp_path, samples=3), seed=5)[0] != got
    mix = prepared.mixture
    assert [(m.available, m.drawn) for m in mix] == [(10, 3), (4, 4)]
    tokens = [sum(len(e.input_ids) for e in prepared.train if e.source == i) for i in range(2)]
    assert [m.tokens for m in mix] == tokens and mix[0].share == pytest.approx(tokens[0] / sum(tokens))


def test_fraction_and_samples_below_one_are_fractions_of_the_source(tmp_path, tiny_tokenizer):
    for key in ("fraction", "samples"):
        got, _ = texts(tmp_path, tiny_tokenizer, mix_config(tmp_path, **{key: 0.5}))
        assert sum(t.startswith("a") for t in got) == 5


def test_replace_draws_every_row_whole_times_then_the_rest(tmp_path, tiny_tokenizer):
    got, prepared = texts(tmp_path, tiny_tokenizer, mix_config(tmp_path, samples=25, replace=True))
    counts = {f"a{i}": got.count(f"a{i}") for i in range(10)}
    assert sum(counts.values()) == 25 and sorted(counts.values()) == [2] * 5 + [3] * 5
    assert prepared.mixture[0].drawn == 25


def test_more_samples_than_the_source_is_refused_without_replace(tmp_path, tiny_tokenizer):
    with pytest.raises(DataError, match=r"data\.train\.0\.samples: 11 is more than the 10 examples .*a\.jsonl has "
                                        "for training; lower it, or set replace: true"):
        D.prepare_examples(mix_config(tmp_path, samples=11), tiny_tokenizer, seed=0, cache_dir=tmp_path / "c")


def test_mixing_keys_that_do_not_add_up_are_refused_at_load(tmp_path):
    base = "model: {path: m}\noutput: {dir: run}\ndata:\n  train:\n    - {path: a.jsonl, format: text, %s}\n"
    cases = {"samples: 3, fraction: 0.5": "data.train.0.fraction: set both samples and fraction",
             "fraction: 1.5": r"data.train.0.fraction: 1.5 is more than the whole source; set replace: true",
             "samples: 2.5": r"data.train.0.samples: 2.5 is >= 1, so it counts rows and must be a whole number"}
    for keys, message in cases.items():
        (tmp_path / "c.yaml").write_text(base % keys)
        with pytest.raises(ConfigError, match=message):
            load_config(tmp_path / "c.yaml")
    (tmp_path / "c.yaml").write_text(base % "fraction: 1.5, replace: true")
    assert load_config(tmp_path / "c.yaml").config.data.train[0].fraction == 1.5


def test_draw_without_replacement_is_a_sorted_subset():
    picked = D.build.draw(100, 30, replace=False, seed=1)
    assert len(set(picked.tolist())) == 30 and np.all(np.diff(picked) > 0)
