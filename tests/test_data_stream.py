"""data.streaming (format text): rows tokenized and packed on the fly, the position saved so resume is exact."""

from __future__ import annotations

import json
import shutil
import textwrap

import pytest
import torch
from test_data import write_jsonl
from test_train import adapter_tensors, metrics, train

from lorafit import data as D
from lorafit.config import DataConfig, load_config
from lorafit.errors import ConfigError

TEXTS = [f"the quick brown fox {' '.join(['jumps'] * (i % 5))} number {i}" for i in range(12)]


def stream_cfg(tmp_path, **kw) -> DataConfig:
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in TEXTS[:7]])
    (tmp_path / "b.txt").write_text("\n".join(TEXTS[7:]) + "\n")
    return DataConfig(train=[{"path": str(a), "format": "text"}, {"path": str(tmp_path / "b.txt"), "format": "text"}],
                      streaming=True, **{"max_length": 48, **kw})


def greedy_reference(tok, max_length: int, passes: int = 3) -> list[list[int]]:
    """Each text's ids + EOS, packed in order: a row takes texts until the next would overflow."""
    examples = [(tok(t)["input_ids"] + [tok.eos_token_id])[:max_length] for t in TEXTS] * passes
    rows, current = [], []
    for ids in examples:
        if current and sum(map(len, current)) + len(ids) > max_length:
            rows.append([t for e in current for t in e])
            current = []
        current.append(ids)
    return rows


def test_stream_packs_in_order_across_sources_and_epochs(tmp_path, tiny_tokenizer):
    stream, eval_rows, audit = D.build_datasets(stream_cfg(tmp_path), tiny_tokenizer, seed=0)
    reference = greedy_reference(tiny_tokenizer, 48)
    rows = stream.take(len(reference) - 1)  # more rows than one pass holds: the stream starts again
    assert [r.input_ids for r in rows] == reference[: len(rows)]
    assert stream.state()["epoch"] >= 1 and eval_rows == [] and audit is None
    assert all(r.labels[0] == D.IGNORE_INDEX and r.position_ids[0] == 0 for r in rows)
    # every example's first token untrained, every other token trained (text trains all)
    assert all(sum(lab == D.IGNORE_INDEX for lab in r.labels) == r.position_ids.count(0) for r in rows)


def test_seek_continues_exactly_where_the_state_was_taken(tmp_path, tiny_tokenizer):
    cfg = stream_cfg(tmp_path)
    straight = D.TextStream(cfg, tiny_tokenizer).take(9)
    first = D.TextStream(cfg, tiny_tokenizer)
    head = first.take(4)
    resumed = D.TextStream(cfg, tiny_tokenizer)
    resumed.seek(json.loads(json.dumps(first.state())))  # as saved in a checkpoint
    assert head + resumed.take(5) == straight


def test_micro_batches_shard_the_global_batch_like_the_epoch_order(tmp_path, tiny_tokenizer):
    cfg = stream_cfg(tmp_path)
    rows = D.TextStream(cfg, tiny_tokenizer).take(8)
    ranks = [D.TextStream(cfg, tiny_tokenizer).micro_batches(2, 2, rank, 2) for rank in (0, 1)]
    assert ranks == [[rows[0:2], rows[2:4]], [rows[4:6], rows[6:8]]]


def test_unpacked_stream_is_one_example_per_row(tmp_path, tiny_tokenizer):
    rows = D.TextStream(stream_cfg(tmp_path, packing=False), tiny_tokenizer).take(3)
    assert [r.input_ids for r in rows] == [tiny_tokenizer(t)["input_ids"] + [tiny_tokenizer.eos_token_id]
                                           for t in TEXTS[:3]]


def test_streaming_refuses_what_a_stream_cannot_do(tmp_path):
    base = textwrap.dedent("""
        model: {path: m}
        output: {dir: run}
        data:
          streaming: true
          train: [{path: a.jsonl, format: %s}]
    """)
    (tmp_path / "c.yaml").write_text(base % "text" + "  eval_fraction: 0.1\n")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "c.yaml")
    text = str(info.value)
    assert "data.eval_fraction: a stream cannot hold rows out; with data.streaming give the eval rows as their own " \
           "file under data.eval" in text
    assert "train.max_steps: data.streaming needs it" in text
    (tmp_path / "c.yaml").write_text(base % "alpaca" + "train: {max_steps: 3}\n")
    with pytest.raises(ConfigError, match="data.train.0.format: alpaca cannot stream; data.streaming takes format "
                                          "text only"):
        load_config(tmp_path / "c.yaml")


def test_streamed_run_resumed_from_a_checkpoint_equals_the_straight_run(tmp_path, learnable_model_dir):
    (tmp_path / "corpus.txt").write_text("\n".join(TEXTS) + "\n")
    config = tmp_path / "run.yaml"
    config.write_text(textwrap.dedent(f"""
        model: {{path: {learnable_model_dir}, dtype: float32}}
        adapter: {{r: 4, alpha: 12, dropout: 0.0}}
        data:
          train: [{{path: {tmp_path / 'corpus.txt'}, format: text}}]
          max_length: 32
          streaming: true
        train: {{batch_size: 2, grad_accum: 1, lr: 1.0e-2, max_steps: 8, warmup: 0, precision: fp32,
                 gradient_checkpointing: false, log_every: 1, seed: 7, save_every: 4, keep_checkpoints: 5}}
        output: {{dir: {tmp_path / 'run'}}}
    """))
    assert train(config) == 0
    run = tmp_path / "run"
    straight = adapter_tensors(run)
    state = json.loads((run / "checkpoints" / "step-000004" / "state.json").read_text())
    from lorafit.model import load_tokenizer

    cfg = load_config(config).config
    expected = D.TextStream(cfg.data, load_tokenizer(cfg.model))
    expected.take(8)  # the saved position is where 4 steps of 2 rows leave the stream
    assert state["data"] == expected.state() and state["data"] != {"epoch": 0, "source": 0, "row": 0}
    # drop what came after step 4, resume from it
    shutil.rmtree(run / "adapter")
    assert train(config, "--resume") == 0
    resumed = adapter_tensors(run)
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert [m["step"] for m in metrics(run) if "loss" in m] == list(range(1, 9))
