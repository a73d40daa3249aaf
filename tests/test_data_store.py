"""The token store: batched tokenization equals row-by-row, worker processes, rows as views, once per machine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_data import CHAT, cfg_for, write_jsonl

from lorafit import data as D
from lorafit.data import cache as cache_module
from lorafit.errors import DataError

ROWS = {
    "alpaca": [{"instruction": "Add.", "input": "2 and 3", "output": "5"}, {"instruction": "Say hi.", "output": "hi"},
               {"instruction": "", "input": "", "output": ""}],
    "completion": [{"prompt": "p", "completion": " c"}, {"prompt": "", "completion": "x y z"}],
    "text": [{"text": "the quick brown fox"}, {"text": ""}, {"text": "a"}],
    "chat": [{"messages": CHAT}, {"messages": CHAT[1:3]}],
}


@pytest.mark.parametrize("fmt", list(ROWS))
@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_batched_tokens_equal_row_by_row_tokens(tmp_path, tiny_tokenizer, fmt, train_on_prompt):
    cfg = cfg_for(write_jsonl(tmp_path / "d.jsonl", ROWS[fmt]), fmt, train_on_prompt=train_on_prompt)
    rows = D.read_source(cfg.train[0])
    one_by_one = [D.example_tokens(tiny_tokenizer, row, fmt, cfg) for _, row in rows]  # tokenizer(text) per row
    assert D.batch_example_tokens(tiny_tokenizer, rows, fmt, cfg) == one_by_one


def test_store_examples_are_the_truncated_row_tokens(tmp_path, tiny_tokenizer):
    rows = [{"text": "the quick brown fox " * k} for k in (1, 5, 2)]
    cfg = cfg_for(write_jsonl(tmp_path / "d.jsonl", rows), "text", max_length=12)
    train = D.prepare_examples(cfg, tiny_tokenizer, seed=0, cache_dir=tmp_path / "c").train
    assert isinstance(train, D.ExampleSet) and len(train) == 3
    for e, (_, row) in zip(train, D.read_source(cfg.train[0]), strict=True):
        ids, labels = D.example_tokens(tiny_tokenizer, row, "text", cfg)
        assert (e.input_ids, e.labels) == (ids[:12], labels[:12])
    store = train.stores[0]
    assert store.offsets[-1] == len(store.ids) == sum(len(e.input_ids) for e in train)
    assert store.ids.dtype == np.int32 and isinstance(store.ids, np.memmap)  # read from disk, not held in memory
    assert list(store.supervised) == [sum(lab != D.IGNORE_INDEX for lab in e.labels) for e in train]


def test_rows_are_views_that_slice_like_lists(tmp_path, tiny_tokenizer):
    rows = [{"text": "word " * (i % 4 + 1)} for i in range(9)]
    train = D.prepare_examples(cfg_for(write_jsonl(tmp_path / "d.jsonl", rows), "text"), tiny_tokenizer, seed=0,
                               cache_dir=tmp_path / "c").train
    packed = D.make_rows(train, max_length=24, packing=True)
    plain = D.make_rows(list(train), max_length=24, packing=True)  # the same packing from plain Examples
    assert list(packed) == list(plain)
    materialized = list(packed)
    assert list(packed[1::2]) == materialized[1::2] and packed[-1] == materialized[-1]
    # each example appears once, positions restart per example
    assert sum(r.position_ids.count(0) for r in materialized) == 9


def test_worker_processes_build_the_same_store(tmp_path, tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(cache_module, "CHUNK_ROWS", 3)  # several chunks, so the workers share the work
    rows = [{"messages": CHAT[: 3 + i % 3]} for i in range(20)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    one = D.prepare_examples(cfg_for(path, "chat", num_proc=1), tiny_tokenizer, seed=0, cache_dir=tmp_path / "a")
    two = D.prepare_examples(cfg_for(path, "chat", num_proc=2), tiny_tokenizer, seed=0, cache_dir=tmp_path / "b")
    assert list(two.train) == list(one.train) and [e.row for e in two.train] == list(range(20))
    assert two.stats == one.stats


def test_a_bad_row_in_a_worker_is_named_by_file_and_line(tmp_path, tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(cache_module, "CHUNK_ROWS", 2)
    rows = [{"messages": CHAT}] * 7 + [{"messages": [{"role": "user", "content": "boom"}]}]
    template = "{% for m in messages %}{% if m['content'] == 'boom' %}{{ raise_exception('no boom here') }}" \
               "{% endif %}{{ m['content'] }}</s>{% endfor %}"
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=r"d\.jsonl:8: cannot render this row as chat: no boom here"):
        D.prepare_examples(cfg_for(path, "chat", num_proc=2, chat_template=template), tiny_tokenizer, seed=0,
                           cache_dir=tmp_path / "c")
    assert not list((tmp_path / "c" / "data").glob("*/meta.json"))  # nothing half-built left as a store


def test_prepared_reports_the_store_size_on_disk(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "abc"}] * 3)
    prepared = D.prepare_examples(cfg_for(path, "text"), tiny_tokenizer, seed=0, cache_dir=tmp_path / "c")
    (store_dir,) = (tmp_path / "c" / "data").glob("*/meta.json")
    assert prepared.store_bytes == sum(f.stat().st_size for f in store_dir.parent.iterdir())


SCRIPT = """
import os, sys, time
import torch.distributed as dist
sys.path.insert(0, {tests!r})
from conftest import build_tokenizer
from lorafit import data as D
from lorafit.config import DataConfig
from lorafit.data import cache

dist.init_process_group("gloo")
real = cache.build_store
def counted(*args, **kwargs):
    with open({count!r}, "a") as f:
        f.write(f"{{dist.get_rank()}}\\n")
    time.sleep(1.0)  # hold the lock a while: the other rank must wait, not build its own
    return real(*args, **kwargs)
cache.build_store = counted
cfg = DataConfig(train=[{{"path": {data!r}, "format": "chat"}}])
dist.barrier()  # both ranks ask for the data at the same moment
train = D.prepare_examples(cfg, build_tokenizer(), seed=0, cache_dir={cache_dir!r}).train
with open({out!r} + str(dist.get_rank()), "w") as f:
    f.write(repr([(e.input_ids, e.labels) for e in train]))
dist.barrier()
dist.destroy_process_group()
"""


def test_two_processes_tokenize_once_and_map_the_same_store(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}] * 50)
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent), count=str(tmp_path / "count"), data=str(data),
                                    cache_dir=str(tmp_path / "cache"), out=str(tmp_path / "out")))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len((tmp_path / "count").read_text().split()) == 1  # one tokenization for the machine
    outs = [(tmp_path / f"out{rank}").read_text() for rank in (0, 1)]
    assert outs[0] == outs[1] and outs[0].count("[") > 50
    assert len(list((tmp_path / "cache" / "data").glob("*/meta.json"))) == 1
