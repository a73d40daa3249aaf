"""Data: sources → rows → token ids + labels (masking) → packed rows → batches.

Modules, in the order data flows: `sources` (files, folders, hub ids → checked rows), `formats` (rows → ids and
labels), `cache` (tokenize once), `packing` (rows, batches, loss), `build` (the pipeline and the label audit),
`report` (`lorafit data`). Everything public is importable from `lorafit.data`.

The training loop uses four names::

    train_rows, eval_rows, audit = build_datasets(cfg.data, tokenizer, seed=cfg.train.seed)
    batch = collate([train_rows[i] for i in ids], pad_id=tokenizer.pad_token_id,
                    flatten=cfg.model.attention == "flash_attention_2")
    labels = batch.pop("labels")
    loss_sum, n_tokens = causal_lm_loss(model(**batch, use_cache=False).logits, labels)

- A source (`DataSource`) is a local .jsonl/.json/.csv/.parquet/.txt file, a folder of them (sorted), or a hub
  dataset id (`datasets.load_dataset(path, split=...)`). `.txt` files give one `text` row per non-empty line.
  Relative paths resolve against the current working directory.
- Each row becomes an `Example`: `input_ids` and `labels` of the same length (labels are *not* shifted; -100 marks
  tokens that are not trained). Masks are built from spans of the rendered example, never by comparing ids with the
  pad id, so an EOS that equals the pad token is still trained. `labels[0]` is always -100: no token predicts the
  first one, and inside a packed row this is what stops example k's last token from predicting example k+1's first.
- Rows (`Row`) are examples packed best-fit-decreasing into at most `max_length` tokens (or one example per row
  when `data.packing` is false). `position_ids` restart at 0 for every example.
- `collate` pads a batch on the right (labels -100, pad positions restart at 0 as a segment of their own) and
  returns `input_ids`, `labels`, `position_ids` and **no** `attention_mask`. With transformers 5.x, models built on
  `masking_utils.create_causal_mask` (Llama, Qwen2, Mistral, ...) detect packed sequences from `position_ids` when
  no 2-D mask is given and build a block-diagonal causal mask (sdpa, eager, flex). flash_attention_2 only does so
  for a batch of one row, so pass `flatten=True` there: the batch becomes one (1, total) row and transformers
  derives `cu_seqlens` from the position ids. Two things switch packed detection off, so avoid them: passing an
  `attention_mask`, and a KV cache: call the model with `use_cache=False` (transformers makes a cache by default).
- The tokenized examples are cached per source under `$LORAFIT_CACHE` (default `~/.cache/lorafit`), keyed by the
  files' size and mtime, the tokenizer and every setting that changes the tokens.
- `build_datasets` refuses (DataError) data in which no token is trained, or in which a supervised format never
  trains its end-of-sequence / end-of-turn token: a model trained that way never learns to stop.
"""

from lorafit.data.build import (
    DataAudit,
    MixPart,
    Prepared,
    build_datasets,
    check_audit,
    make_audit,
    prepare_examples,
    split_eval,
)
from lorafit.data.cache import cache_key, default_cache_dir, load_source, machine_lock, store_path, tokenizer_fingerprint
from lorafit.data.formats import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    IGNORE_INDEX,
    Example,
    SourceStats,
    alpaca_prompt,
    batch_example_tokens,
    chat_tokens,
    end_token_ids,
    example_tokens,
    labels_from_spans,
    prompt_response_tokens,
    text_tokens,
    tokenize_rows,
    truncate,
)
from lorafit.data.packing import Row, Rows, causal_lm_loss, collate, make_row, make_rows, pack
from lorafit.data.report import length_histogram, print_data_report, render_example
from lorafit.data.sources import (
    REQUIRED_COLUMNS,
    ROLES,
    SHAREGPT_ROLES,
    SUFFIXES,
    check_row,
    count_rows,
    iter_source,
    read_source,
)
from lorafit.data.store import ExampleSet, TokenStore
from lorafit.data.stream import TextStream, build_stream

__all__ = [
    "ALPACA_PROMPT", "ALPACA_PROMPT_NO_INPUT", "IGNORE_INDEX", "REQUIRED_COLUMNS", "ROLES", "SHAREGPT_ROLES", "SUFFIXES",
    "DataAudit", "Example", "ExampleSet", "MixPart", "Prepared", "Row", "Rows", "SourceStats", "TextStream", "TokenStore",
    "alpaca_prompt", "batch_example_tokens", "build_datasets", "build_stream", "cache_key", "causal_lm_loss", "chat_tokens",
    "check_audit", "check_row", "collate", "count_rows", "default_cache_dir", "end_token_ids", "example_tokens",
    "iter_source", "labels_from_spans", "length_histogram", "load_source", "machine_lock", "make_audit", "make_row",
    "make_rows", "pack", "prepare_examples", "print_data_report", "prompt_response_tokens", "read_source",
    "render_example", "split_eval", "store_path", "text_tokens", "tokenize_rows", "tokenizer_fingerprint", "truncate",
]
