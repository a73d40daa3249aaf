"""Data: sources → rows → token ids + labels (masking) → packed rows → batches.

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

from __future__ import annotations

import bisect
import csv
import hashlib
import json
import math
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorafit.errors import DataError

if TYPE_CHECKING:
    import torch

    from lorafit.config import Config, DataConfig, DataSource

IGNORE_INDEX = -100
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")
ROLES = ("system", "user", "assistant", "tool")
REQUIRED_COLUMNS = {"alpaca": ("instruction", "output"), "chat": ("messages",), "completion": ("prompt", "completion"),
                    "text": ("text",)}
OPTIONAL_COLUMNS = {"alpaca": ("input",)}
_CACHE_VERSION = 1
_PROGRESS_ABOVE = 2000  # rows; smaller sets tokenize in well under a second

# The Stanford Alpaca prompts; rows without (or with an empty) input use the shorter one.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass(frozen=True)
class Example:
    """One tokenized row. `labels` has -100 where no loss is taken; `source`/`row` say where it came from."""

    input_ids: list[int]
    labels: list[int]
    source: int = 0  # index into the list of sources it was read from
    row: int = 0  # 0-based row within that source


@dataclass(frozen=True)
class Row:
    """One training row: one example, or several packed ones whose `position_ids` each restart at 0."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class SourceStats:
    """What happened to one source's rows on the way to examples."""

    rows: int = 0  # rows read
    truncated: int = 0  # rows longer than max_length (kept or dropped)
    dropped_truncated: int = 0  # rows whose trained tokens all lay past max_length
    dropped_unsupervised: int = 0  # rows with nothing to train (e.g. a chat without an assistant turn)


@dataclass
class DataAudit:
    """The label audit of the training set, printed before training and by `lorafit data`."""

    rows: int  # rows read from the train sources (before the eval split)
    examples: int  # training examples kept
    eval_examples: int
    tokens: int  # real tokens in the training examples
    supervised: int  # tokens with a label (a loss term)
    truncated: int
    dropped_truncated: int
    dropped_unsupervised: int
    end_checked: int  # examples of supervised formats (alpaca, completion, chat): their end token must be trained
    end_trained: int  # ... of which the EOS / end-of-turn token is trained at least once
    packed_rows: int  # rows after packing (== examples without packing)
    slots: int  # packed_rows × max_length: the token slots the rows occupy
    max_length: int
    warnings: list[str] = field(default_factory=list)

    @property
    def supervised_fraction(self) -> float:
        return self.supervised / self.tokens if self.tokens else 0.0

    @property
    def packing_efficiency(self) -> float:
        """Real tokens per slot of max_length in the rows: 1.0 means no padding at all."""
        return self.tokens / self.slots if self.slots else 0.0

    def __str__(self) -> str:
        dropped = self.dropped_truncated + self.dropped_unsupervised
        end = f", end token trained in {self.end_trained}/{self.end_checked}" if self.end_checked else ""
        return (f"{self.examples:,} train / {self.eval_examples:,} eval examples, {self.tokens:,} tokens, "
                f"{self.supervised_fraction:.1%} supervised, {self.truncated:,} truncated, {dropped:,} dropped"
                f"{end}, {self.packed_rows:,} rows ({self.packing_efficiency:.1%} full)")


# ------------------------------------------------------------------------------------------------ sources


def _looks_like_path(path: str) -> bool:
    return path.startswith((".", "/", "~")) or path.lower().endswith(SUFFIXES)


def _local_files(path: Path) -> list[Path]:
    """The supported files of `path` (itself, or those under a folder, sorted)."""
    if path.is_file():
        if path.suffix.lower() not in SUFFIXES:
            raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(SUFFIXES)}")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
    if not files:
        raise DataError(f"{path}: folder holds no data file ({', '.join(SUFFIXES)})")
    return files


def _resolve(source: DataSource) -> list[Path] | None:
    """Local files of a source, or None for a hub dataset id. Raises when a path-like source does not exist."""
    path = Path(source.path).expanduser()
    if path.exists():
        return _local_files(path)
    if _looks_like_path(source.path):
        raise DataError(f"{source.path}: no such file or folder (relative paths start at {Path.cwd()})")
    return None


def _read_jsonl(file: Path) -> Iterator[tuple[str, Any]]:
    with file.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{file}:{n}", json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{file}:{n}: malformed JSON ({e.msg} at column {e.colno})") from None


def _read_json(file: Path) -> Iterator[tuple[str, Any]]:
    text = file.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("{") and e.msg == "Extra data":  # JSON Lines saved as .json
            yield from _read_jsonl(file)
            return
        raise DataError(f"{file}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if isinstance(data, dict):  # {"data": [...]}: one list of rows under a single key
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{file}: expected a list of rows (or one key holding one); found an object with keys "
                            f"{', '.join(map(str, data))}")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"{file}: expected a list of rows, found {type(data).__name__}")
    for i, item in enumerate(data):
        yield f"{file} row {i + 1}", item


def _read_csv(file: Path) -> Iterator[tuple[str, Any]]:
    with file.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        for item in reader:
            yield f"{file}:{reader.line_num}", item


def _read_parquet(file: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    for i, item in enumerate(pq.read_table(file).to_pylist()):
        yield f"{file} row {i + 1}", item


def _read_txt(file: Path) -> Iterator[tuple[str, Any]]:
    with file.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                yield f"{file}:{n}", {"text": line.rstrip("\n")}


_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet, ".txt": _read_txt}


def _load_hub(source: DataSource):
    import datasets

    try:
        return datasets.load_dataset(source.path, split=source.split)
    except Exception as e:  # noqa: BLE001 - any failure here means "cannot use this id"; say why
        raise DataError(f"{source.path}: not a local file or folder, and loading it as a hub dataset "
                        f"(split {source.split!r}) failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                        ) from None


def _raw_rows(source: DataSource, hub=None) -> Iterator[tuple[str, Any]]:
    files = _resolve(source) if hub is None else None
    if files is None:
        for i, item in enumerate(hub if hub is not None else _load_hub(source)):
            yield f"{source.path}[{source.split}] row {i + 1}", item
        return
    for file in files:
        yield from _READERS[file.suffix.lower()](file)


def _check_string(value: Any, where: str, name: str) -> str:
    if not isinstance(value, str):
        shown = "null" if value is None else f"{type(value).__name__} {value!r}"[:80]
        raise DataError(f"{where}: column {name!r} must be a string (got {shown})")
    return value


def _check_messages(value: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: column 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: messages[{i}] must be an object with 'role' and 'content' (got {m!r:.80})")
        role = _check_string(m["role"], where, f"messages[{i}].role")
        if role not in ROLES:
            raise DataError(f"{where}: messages[{i}].role is {role!r}; allowed: {', '.join(ROLES)}")
        out.append({"role": role, "content": _check_string(m["content"], where, f"messages[{i}].content")})
    return out


def check_row(item: Any, fmt: str, columns: dict[str, str], where: str) -> dict[str, Any]:
    """One raw row as the columns its format needs: renamed, type-checked, optional ones filled in.

    Args:
        item: the row as read (a dict for every supported file type).
        fmt: the source's format.
        columns: the source's renames, {expected_name: name_in_data}.
        where: "file:line" (or "file row N") for messages.

    Returns:
        {column: value} with exactly the format's columns.

    Raises:
        DataError: unknown format, a missing column (expected and found names listed), or a value of the wrong type.
    """
    if fmt not in REQUIRED_COLUMNS:
        raise DataError(f"{where}: unknown format {fmt!r}; use one of {', '.join(REQUIRED_COLUMNS)}")
    if not isinstance(item, dict):
        raise DataError(f"{where}: a row must be an object with named columns (got {type(item).__name__})")
    required, optional = REQUIRED_COLUMNS[fmt], OPTIONAL_COLUMNS.get(fmt, ())
    renamed = {want: columns.get(want, want) for want in required + optional}
    missing = [f"{want}" + (f" (as {have!r})" if have != want else "") for want, have in renamed.items()
               if want in required and have not in item]
    if missing:
        raise DataError(f"{where}: format {fmt} needs column(s) {', '.join(missing)}; found: "
                        f"{', '.join(map(str, item)) or 'none'}. Map other names with the source's `columns:` "
                        f"(e.g. columns: {{{required[0]}: your_column}})")
    row = {}
    for want, have in renamed.items():
        value = item.get(have)
        if want == "messages":
            row[want] = _check_messages(value, where)
        elif want in optional and value is None:
            row[want] = ""
        else:
            row[want] = _check_string(value, where, have)
    return row


def read_source(source: DataSource, hub=None) -> list[tuple[str, dict[str, Any]]]:
    """All rows of a source as (where, {column: value}), checked against its format.

    Args:
        source: the source.
        hub: the already loaded hub dataset of a hub source (loaded here when None).

    Raises:
        DataError: missing file or folder, malformed JSON, bad columns or values, or no rows at all.
    """
    rows = [(where, check_row(item, source.format, source.columns, where)) for where, item in _raw_rows(source, hub)]
    if not rows:
        raise DataError(f"{source.path}: no rows (the data set is empty)")
    return rows


def count_rows(source: DataSource) -> int | None:
    """Rows in a source without tokenizing it; None for a hub dataset whose size is not known offline.

    Raises:
        DataError: a local path that does not exist or holds no data file.
    """
    files = _resolve(source)
    if files is None:
        try:
            import datasets

            info = datasets.load_dataset_builder(source.path).info
            return int(info.splits[source.split].num_examples)
        except Exception:  # noqa: BLE001 - offline, unknown id, no split info: "not counted" is the honest answer
            return None
    total = 0
    for file in files:
        if file.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            total += pq.ParquetFile(file).metadata.num_rows
        elif file.suffix.lower() in (".jsonl", ".txt"):
            with file.open("rb") as f:
                total += sum(1 for line in f if line.strip())
        else:
            total += sum(1 for _ in _READERS[file.suffix.lower()](file))
    return total


# ------------------------------------------------------------------------------------------------ masking


def labels_from_spans(input_ids: list[int], spans: list[tuple[int, int]]) -> list[int]:
    """Labels that train exactly the tokens inside `spans` ([start, end) index pairs).

    `labels[0]` is always -100: nothing predicts the first token, and in a packed row this keeps the previous
    example's last token from being trained to predict it.
    """
    labels = [IGNORE_INDEX] * len(input_ids)
    for start, end in spans:
        labels[start:end] = input_ids[start:end]
    if labels:
        labels[0] = IGNORE_INDEX
    return labels


def truncate(input_ids: list[int], labels: list[int], max_length: int) -> tuple[list[int], list[int], bool]:
    """Cut on the right to `max_length` tokens. Returns (input_ids, labels, whether anything was cut)."""
    return input_ids[:max_length], labels[:max_length], len(input_ids) > max_length


def _encode(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _eos(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token, so the model could not learn to stop; use a tokenizer "
                        "that defines eos_token")
    return tokenizer.eos_token_id


def alpaca_prompt(instruction: str, input_text: str, template: str | None = None) -> str:
    """The Alpaca prompt for one row. A custom `template` gets `{input}` replaced by "" when the row has no input."""
    if template is None:
        template = ALPACA_PROMPT if input_text.strip() else ALPACA_PROMPT_NO_INPUT
    # str.replace, not str.format: user templates may hold other braces (JSON examples, code).
    return template.replace("{instruction}", instruction).replace("{input}", input_text)


def prompt_response_tokens(tokenizer, prompt: str, response: str, train_on_prompt: bool) -> tuple[list[int], list[int]]:
    """Tokens and labels of prompt + response + EOS; the response and its EOS are always trained.

    The two parts are tokenized separately (prompt with the tokenizer's BOS) so the prompt's tokens are exactly
    those the model sees at inference.
    """
    prompt_ids = _encode(tokenizer, prompt, special=True)
    ids = prompt_ids + _encode(tokenizer, response, special=False) + [_eos(tokenizer)]
    start = 0 if train_on_prompt else len(prompt_ids)
    return ids, labels_from_spans(ids, [(start, len(ids))])


def text_tokens(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """Tokens and labels of a plain text + EOS: every token trained."""
    ids = _encode(tokenizer, text, special=True) + [_eos(tokenizer)]
    return ids, labels_from_spans(ids, [(0, len(ids))])


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _render(tokenizer, messages: list[dict[str, str]], template: str | None, generation_prompt: bool) -> list[int]:
    if not messages:
        return []
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                         chat_template=template)
    # Chat templates write their own special tokens (BOS included), so the tokenizer must not add any.
    return _encode(tokenizer, text, special=False)


def chat_tokens(tokenizer, messages: list[dict[str, str]], template: str | None,
                train_on_prompt: bool) -> tuple[list[int], list[int]]:
    """Tokens and labels of a conversation: assistant turns trained, each with its end-of-turn token(s).

    Assistant spans are found by rendering prefixes of the conversation and diffing token ids: turn i starts where
    `messages[:i]` + generation prompt ends and stops where `messages[:i+1]` ends, so whatever the template writes
    after the content (`<|im_end|>`, `<|eot_id|>`, `</s>`) is inside the span. This needs no `{% generation %}`
    support. Templates that rewrite earlier turns (e.g. dropping old reasoning) are handled by taking the common
    prefix with the full rendering.
    """
    ids = _render(tokenizer, messages, template, generation_prompt=False)
    if train_on_prompt:
        return ids, labels_from_spans(ids, [(0, len(ids))])
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = _common_prefix(ids, _render(tokenizer, messages[:i], template, generation_prompt=True))
        end = _common_prefix(ids, _render(tokenizer, messages[: i + 1], template, generation_prompt=False))
        if end > start:
            spans.append((start, end))
    return ids, labels_from_spans(ids, spans)


def end_token_ids(tokenizer, template: str | None = None, chat: bool = False) -> set[int]:
    """Ids whose training teaches the model to stop: EOS, plus for chat the special tokens closing an assistant turn."""
    ids = {tokenizer.eos_token_id} - {None}
    if chat:
        probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
        try:
            tokens, labels = chat_tokens(tokenizer, probe, template, train_on_prompt=False)
        except Exception:  # noqa: BLE001 - a template that rejects the probe: fall back to EOS
            return ids
        special = set(tokenizer.all_special_ids)
        ids |= {t for t, lab in zip(tokens, labels, strict=True) if lab != IGNORE_INDEX and t in special}
    return ids


def example_tokens(tokenizer, row: dict[str, Any], fmt: str, data_cfg: DataConfig) -> tuple[list[int], list[int]]:
    """Tokens and labels (not yet truncated) of one checked row in format `fmt`."""
    if fmt == "alpaca":
        prompt = alpaca_prompt(row["instruction"], row["input"], data_cfg.prompt_template)
        return prompt_response_tokens(tokenizer, prompt, row["output"], data_cfg.train_on_prompt)
    if fmt == "completion":
        return prompt_response_tokens(tokenizer, row["prompt"], row["completion"], data_cfg.train_on_prompt)
    if fmt == "chat":
        return chat_tokens(tokenizer, row["messages"], data_cfg.chat_template, data_cfg.train_on_prompt)
    if fmt == "text":
        return text_tokens(tokenizer, row["text"])
    raise DataError(f"unknown format {fmt!r}; use one of {', '.join(REQUIRED_COLUMNS)}")


# ------------------------------------------------------------------------------------------------ tokenizing


def _check_templates(tokenizer, fmt: str, data_cfg: DataConfig) -> None:
    if fmt == "alpaca" and data_cfg.prompt_template is not None and "{instruction}" not in data_cfg.prompt_template:
        raise DataError("data.prompt_template: must contain {instruction} (and usually {input}); "
                        f"got {data_cfg.prompt_template!r}")
    if fmt == "chat" and data_cfg.chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise DataError("format chat: the tokenizer has no chat template; set data.chat_template "
                        "(a Jinja template over `messages`)")


def tokenize_rows(rows: list[tuple[str, dict[str, Any]]], tokenizer, fmt: str, data_cfg: DataConfig,
                  source: int = 0, progress=None) -> tuple[list[Example], SourceStats]:
    """Checked rows of one source → truncated examples, dropping rows left with nothing to train.

    Args:
        rows: (where, row) pairs from `read_source`.
        tokenizer: a Hugging Face tokenizer.
        fmt: the source's format.
        data_cfg: for max_length, train_on_prompt and the templates.
        source: index stored in each example.
        progress: an optional callable advanced by one per row.

    Returns:
        The examples and the counts of rows read, truncated and dropped.
    """
    _check_templates(tokenizer, fmt, data_cfg)
    stats = SourceStats(rows=len(rows))
    examples = []
    for i, (where, row) in enumerate(rows):
        try:
            ids, labels = example_tokens(tokenizer, row, fmt, data_cfg)
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - chat templates raise their own errors ("roles must alternate")
            raise DataError(f"{where}: cannot render this row as {fmt}: {e}") from None
        trained_before = any(lab != IGNORE_INDEX for lab in labels)
        ids, labels, cut = truncate(ids, labels, data_cfg.max_length)
        stats.truncated += cut
        if not any(lab != IGNORE_INDEX for lab in labels):
            stats.dropped_truncated += trained_before
            stats.dropped_unsupervised += not trained_before
        else:
            examples.append(Example(ids, labels, source, i))
        if progress is not None:
            progress()
    return examples, stats


def _tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    specials = {k: str(v) for k, v in tokenizer.special_tokens_map.items()}
    h.update(json.dumps([specials, getattr(tokenizer, "chat_template", None)], sort_keys=True, default=str).encode())
    return h.hexdigest()


def _source_fingerprint(source: DataSource, files: list[Path] | None, hub_fingerprint: str | None) -> list[Any]:
    if files is None:
        return [source.path, source.split, hub_fingerprint]
    return [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def cache_key(source: DataSource, data_cfg: DataConfig, tokenizer_fp: str, files: list[Path] | None,
              hub_fingerprint: str | None = None) -> str:
    """The cache file name of a source's examples: changes with the data, the tokenizer and every token setting."""
    settings = [_CACHE_VERSION, source.format, sorted(source.columns.items()), data_cfg.max_length,
                data_cfg.train_on_prompt, data_cfg.prompt_template, data_cfg.chat_template, tokenizer_fp,
                _source_fingerprint(source, files, hub_fingerprint)]
    return hashlib.sha256(json.dumps(settings, default=str).encode()).hexdigest()[:32]


def default_cache_dir() -> Path:
    """`$LORAFIT_CACHE`, else ~/.cache/lorafit."""
    return Path(os.environ.get("LORAFIT_CACHE") or Path.home() / ".cache" / "lorafit")


def _save_cache(path: Path, examples: list[Example], stats: SourceStats) -> None:
    import numpy as np

    lengths = np.array([len(e.input_ids) for e in examples], dtype=np.int64)
    ids = np.array([t for e in examples for t in e.input_ids], dtype=np.int64)
    trained = np.array([lab != IGNORE_INDEX for e in examples for lab in e.labels], dtype=bool)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez(tmp, lengths=lengths, ids=ids, trained=trained, rows=np.array([e.row for e in examples], dtype=np.int64),
             stats=np.array(json.dumps(stats.__dict__)))
    os.replace(tmp, path)  # atomic: concurrent ranks never read half a file


def _load_cache(path: Path, source: int) -> tuple[list[Example], SourceStats] | None:
    import numpy as np

    try:
        with np.load(path) as z:
            lengths, ids, trained, rows = z["lengths"], z["ids"].tolist(), z["trained"].tolist(), z["rows"].tolist()
            stats = SourceStats(**json.loads(str(z["stats"])))
    except (OSError, ValueError, KeyError):
        return None
    examples, start = [], 0
    for n, row in zip(lengths.tolist(), rows, strict=True):
        chunk = ids[start: start + n]
        labels = [t if keep else IGNORE_INDEX for t, keep in zip(chunk, trained[start: start + n], strict=True)]
        examples.append(Example(chunk, labels, source, row))
        start += n
    return examples, stats


def _progress_bar(total: int, label: str):
    """A rich progress bar for large sets (a no-op context for small ones). Yields an `advance()` callable."""
    from contextlib import contextmanager

    @contextmanager
    def bar():
        if total < _PROGRESS_ABOVE:
            yield None
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn(), transient=True) as p:
            task = p.add_task(label, total=total)
            yield lambda: p.advance(task)

    return bar()


def load_source(source: DataSource, tokenizer, data_cfg: DataConfig, index: int = 0,
                cache_dir: Path | None = None, tokenizer_fp: str | None = None) -> tuple[list[Example], SourceStats]:
    """Read and tokenize one source, or load its examples from the cache.

    Args:
        source: the source.
        tokenizer: a Hugging Face tokenizer.
        data_cfg: the data section (max_length, train_on_prompt, templates).
        index: the source's position, stored in its examples.
        cache_dir: where tokenized sources are kept; default `default_cache_dir()`.
        tokenizer_fp: the tokenizer's fingerprint, when already computed.

    Returns:
        The source's examples and its counts.
    """
    files = _resolve(source)
    hub = _load_hub(source) if files is None else None
    tokenizer_fp = tokenizer_fp or _tokenizer_fingerprint(tokenizer)
    key = cache_key(source, data_cfg, tokenizer_fp, files, getattr(hub, "_fingerprint", None))
    path = (cache_dir or default_cache_dir()) / "data" / f"{key}.npz"
    if path.exists() and (cached := _load_cache(path, index)) is not None:
        return cached
    rows = read_source(source, hub)
    with _progress_bar(len(rows), f"tokenizing {source.path}") as advance:
        examples, stats = tokenize_rows(rows, tokenizer, source.format, data_cfg, index, advance)
    try:
        _save_cache(path, examples, stats)
    except OSError:
        pass  # a read-only cache directory only costs the next run the tokenizing time
    return examples, stats


# ------------------------------------------------------------------------------------------------ packing


def pack(lengths: list[int], max_length: int) -> list[list[int]]:
    """Group items into bins of at most `max_length` tokens, best-fit decreasing.

    Longest first, each into the fullest bin it still fits (ties: the earliest bin), so the result depends only
    on the lengths. Bins are few and full: at most 11/9 of the optimum plus one.

    Args:
        lengths: token count of each item, each at most `max_length`.
        max_length: capacity of a bin.

    Returns:
        Item indices per bin, bins in creation order.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    free: list[tuple[int, int]] = []  # (room left, bin), sorted: bisect finds the tightest bin that fits
    bins: list[list[int]] = []
    for i in order:
        n = lengths[i]
        if n > max_length:
            raise ValueError(f"item {i} has {n} tokens, more than max_length {max_length}; truncate first")
        j = bisect.bisect_left(free, (n, -1))
        if j == len(free):
            bins.append([i])
            room, b = max_length - n, len(bins) - 1
        else:
            room, b = free.pop(j)
            bins[b].append(i)
            room -= n
        if room > 0:
            bisect.insort(free, (room, b))
    return bins


def make_row(examples: list[Example]) -> Row:
    """Concatenate examples into one row; each example's positions restart at 0."""
    ids = [t for e in examples for t in e.input_ids]
    labels = [t for e in examples for t in e.labels]
    positions = [p for e in examples for p in range(len(e.input_ids))]
    return Row(ids, labels, positions)


def make_rows(examples: list[Example], max_length: int, packing: bool) -> list[Row]:
    """Training rows: packed (best-fit decreasing) or one example per row, in data order."""
    if not packing:
        return [make_row([e]) for e in examples]
    bins = pack([len(e.input_ids) for e in examples], max_length)
    return [make_row([examples[i] for i in b]) for b in bins]


# ------------------------------------------------------------------------------------------------ batches


def collate(rows: list[Row], pad_id: int | None = None, flatten: bool = False) -> dict[str, torch.Tensor]:
    """Tensors for one micro-batch of rows.

    Args:
        rows: `Row`s (or `Example`s, treated as one-example rows).
        pad_id: id written in padding (any id works: padding is never attended to by real tokens and never
            trained); None (tokenizers without a pad token) uses 0.
        flatten: concatenate the rows into one (1, total) row without padding; needed by flash_attention_2, which
            splits packed sequences by position ids only for a batch of one.

    Returns:
        {"input_ids", "labels", "position_ids"}, each (B, T) int64; labels -100 on padding. There is deliberately
        no attention_mask: with one, transformers stops reading packed sequences from position_ids. Call the
        model with use_cache=False for the same reason.
    """
    import torch

    rows = [r if isinstance(r, Row) else make_row([r]) for r in rows]
    if flatten:
        rows = [Row([t for r in rows for t in r.input_ids], [t for r in rows for t in r.labels],
                    [p for r in rows for p in r.position_ids])]
    width = max(len(r) for r in rows)
    pad = 0 if pad_id is None else pad_id
    ids, labels, positions = [], [], []
    for r in rows:
        n = width - len(r)
        ids.append(r.input_ids + [pad] * n)
        labels.append(r.labels + [IGNORE_INDEX] * n)  # by length, never by comparing with pad_id (pad may be EOS)
        # Padding restarts at 0: transformers sees it as one more packed sequence, which no real token attends to.
        positions.append(r.position_ids + list(range(n)))
    return {"input_ids": torch.tensor(ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long),
            "position_ids": torch.tensor(positions, dtype=torch.long)}


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy and the number of trained tokens (divide the first by the second).

    Position t predicts token t+1. Each example's first label is -100 (`labels_from_spans`), so in packed rows
    no example is trained to predict the next example's first token.

    Args:
        logits: (B, T, V) model outputs.
        labels: (B, T) token ids, -100 where no loss is taken (unshifted, aligned with input_ids).

    Returns:
        (loss summed over trained tokens as a float32 scalar, number of trained tokens).
    """
    import torch.nn.functional as F

    targets = labels[:, 1:]  # (B, T-1): the token each position must predict
    scores = logits[:, :-1, :].float()  # (B, T-1, V)
    loss = F.cross_entropy(scores.reshape(-1, scores.size(-1)), targets.reshape(-1),  # (B·(T-1), V), (B·(T-1),)
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((targets != IGNORE_INDEX).sum())


# ------------------------------------------------------------------------------------------------ building


@dataclass
class Prepared:
    """Examples before packing, with what the audit needs."""

    train: list[Example]
    eval: list[Example]
    stats: list[SourceStats]  # per train source
    formats: list[str]  # per train source
    end_ids: list[set[int]]  # per train source: the ids that teach the model to stop


def split_eval(n_rows: int, fraction: float, seed: int) -> set[int]:
    """Row indices (over all train sources, in order) held out for eval: a seeded, order-independent draw."""
    if fraction <= 0:
        return set()
    order = list(range(n_rows))
    random.Random(seed).shuffle(order)
    return set(order[: math.ceil(n_rows * fraction)])


def _load_all(sources: list[DataSource], tokenizer, data_cfg: DataConfig, cache_dir: Path | None):
    fp = _tokenizer_fingerprint(tokenizer)
    loaded = [load_source(s, tokenizer, data_cfg, i, cache_dir, fp) for i, s in enumerate(sources)]
    return [e for examples, _ in loaded for e in examples], [stats for _, stats in loaded]


def prepare_examples(data_cfg: DataConfig, tokenizer, *, seed: int, cache_dir: Path | None = None) -> Prepared:
    """Tokenized train and eval examples (no packing, no refusal): what `build_datasets` and the report share."""
    train, stats = _load_all(data_cfg.train, tokenizer, data_cfg, cache_dir)
    eval_examples: list[Example] = []
    if data_cfg.eval:
        eval_examples, _ = _load_all(data_cfg.eval, tokenizer, data_cfg, cache_dir)
    elif data_cfg.eval_fraction > 0:
        offsets = [sum(s.rows for s in stats[:i]) for i in range(len(stats))]
        n_rows = sum(s.rows for s in stats)
        held = split_eval(n_rows, data_cfg.eval_fraction, seed)
        if len(held) >= n_rows:
            raise DataError(f"data.eval_fraction: {data_cfg.eval_fraction} of {n_rows} rows leaves no training row")
        eval_examples = [e for e in train if offsets[e.source] + e.row in held]
        train = [e for e in train if offsets[e.source] + e.row not in held]
    formats = [s.format for s in data_cfg.train]
    end_ids = [end_token_ids(tokenizer, data_cfg.chat_template, chat=f == "chat") for f in formats]
    return Prepared(train, eval_examples, stats, formats, end_ids)


def make_audit(prepared: Prepared, rows: list[Row], max_length: int) -> DataAudit:
    """Count tokens, trained tokens, truncation, drops and trained end tokens of the training set."""
    end_checked = end_trained = 0
    for e in prepared.train:
        if prepared.formats[e.source] == "text":
            continue
        end_checked += 1
        stop = prepared.end_ids[e.source]
        end_trained += any(lab in stop for lab in e.labels)
    s = prepared.stats
    return DataAudit(
        rows=sum(x.rows for x in s), examples=len(prepared.train), eval_examples=len(prepared.eval),
        tokens=sum(len(e.input_ids) for e in prepared.train),
        supervised=sum(lab != IGNORE_INDEX for e in prepared.train for lab in e.labels),
        truncated=sum(x.truncated for x in s), dropped_truncated=sum(x.dropped_truncated for x in s),
        dropped_unsupervised=sum(x.dropped_unsupervised for x in s), end_checked=end_checked,
        end_trained=end_trained, packed_rows=len(rows), slots=len(rows) * max_length, max_length=max_length,
        warnings=_audit_warnings(end_checked, end_trained, s, max_length))


def _audit_warnings(end_checked: int, end_trained: int, stats: list[SourceStats], max_length: int) -> list[str]:
    out = []
    dropped_cut = sum(x.dropped_truncated for x in stats)
    if dropped_cut:
        out.append(f"{dropped_cut} row(s) dropped: their whole response lay past data.max_length ({max_length})")
    empty = sum(x.dropped_unsupervised for x in stats)
    if empty:
        out.append(f"{empty} row(s) dropped: nothing to train (e.g. a conversation without an assistant turn)")
    if 0 < end_trained < end_checked:
        out.append(f"{end_checked - end_trained} example(s) lose their end token to truncation at data.max_length "
                   f"({max_length}); those teach the model not to stop")
    return out


def check_audit(audit: DataAudit, max_length: int) -> None:
    """Refuse data that would train a broken model.

    Raises:
        DataError: no token is trained, or no example of a supervised format trains its EOS / end-of-turn token.
    """
    if audit.supervised == 0:
        raise DataError(
            f"no token of the training data is trained ({audit.rows} rows read: {audit.dropped_truncated} lost their "
            f"response to truncation at data.max_length {max_length}, {audit.dropped_unsupervised} had nothing to "
            "train). Raise data.max_length, check the columns, or give chat rows an assistant turn; inspect with "
            "`lorafit data CONFIG`")
    if audit.end_checked and audit.end_trained == 0:
        raise DataError(
            f"the end-of-sequence / end-of-turn token is trained in none of {audit.end_checked} examples, so the "
            "model would never learn to stop. Either every response is cut at data.max_length "
            f"({max_length}; raise it) or data.chat_template ends assistant turns without a special token (end them "
            "with the tokenizer's EOS or end-of-turn token); inspect with `lorafit data CONFIG`")


def build_datasets(data_cfg: DataConfig, tokenizer, *, seed: int,
                   cache_dir: Path | None = None) -> tuple[list[Row], list[Row], DataAudit]:
    """Train and eval rows ready for `collate`, and the label audit of the training set.

    Args:
        data_cfg: the config's data section.
        tokenizer: the model's tokenizer.
        seed: seeds the `eval_fraction` split.
        cache_dir: where tokenized sources are cached; default `$LORAFIT_CACHE` or ~/.cache/lorafit.

    Returns:
        (train rows, eval rows (empty without eval data), audit).

    Raises:
        DataError: bad sources or rows, or data that fails the audit (see `check_audit`).
    """
    prepared = prepare_examples(data_cfg, tokenizer, seed=seed, cache_dir=cache_dir)
    train = make_rows(prepared.train, data_cfg.max_length, data_cfg.packing)
    audit = make_audit(prepared, train, data_cfg.max_length)
    check_audit(audit, data_cfg.max_length)
    if (data_cfg.eval or data_cfg.eval_fraction > 0) and not any(
            lab != IGNORE_INDEX for e in prepared.eval for lab in e.labels):
        raise DataError("the eval data has no trained token (every eval row was dropped or is empty); check data.eval "
                        "or raise data.eval_fraction")
    return train, make_rows(prepared.eval, data_cfg.max_length, data_cfg.packing), audit


# ------------------------------------------------------------------------------------------------ report

_TRAINED_STYLE = "bold black on green"
_PROMPT_STYLE = "dim"


def render_example(tokenizer, example: Example):
    """The example's text as a rich `Text`: trained tokens highlighted, the rest dimmed.

    Consecutive tokens with the same status are decoded together, so multi-byte characters split across byte-level
    tokens still read correctly.
    """
    from rich.text import Text

    text = Text()
    trained = [lab != IGNORE_INDEX for lab in example.labels]
    start = 0
    for i in range(1, len(trained) + 1):
        if i == len(trained) or trained[i] != trained[start]:
            piece = tokenizer.decode(example.input_ids[start:i], skip_special_tokens=False)
            text.append(piece, style=_TRAINED_STYLE if trained[start] else _PROMPT_STYLE)
            start = i
    return text


def length_histogram(lengths: list[int], max_length: int, bins: int = 8, width: int = 40) -> list[str]:
    """Text bars of the token-length distribution, one line per bin of equal width up to `max_length`."""
    if not lengths:
        return []
    size = max(1, math.ceil(max_length / bins))
    counts = [0] * math.ceil(max_length / size)
    for n in lengths:
        counts[min((n - 1) // size, len(counts) - 1)] += 1
    top = max(counts)
    lines = []
    for b, c in enumerate(counts):
        bar = "█" * math.ceil(width * c / top) if c else ""
        lines.append(f"{b * size + 1:>6}–{min((b + 1) * size, max_length):<6} {bar} {c}")
    return lines


def _audit_table(audit: DataAudit):
    from rich.table import Table

    table = Table(title="label audit", show_header=False, title_justify="left")
    dropped = audit.dropped_truncated + audit.dropped_unsupervised
    table.add_row("rows read", f"{audit.rows:,}")
    table.add_row("examples", f"{audit.examples:,} train, {audit.eval_examples:,} eval")
    table.add_row("tokens", f"{audit.tokens:,}, of which {audit.supervised:,} trained "
                  f"({audit.supervised_fraction:.1%})")
    table.add_row("truncated", f"{audit.truncated:,} (dropped {dropped:,}: {audit.dropped_truncated:,} cut, "
                  f"{audit.dropped_unsupervised:,} nothing to train)")
    if audit.end_checked:
        table.add_row("end token trained", f"{audit.end_trained:,} of {audit.end_checked:,} examples")
    table.add_row("rows", f"{audit.packed_rows:,} of ≤ {audit.max_length:,} tokens, "
                  f"{audit.packing_efficiency:.1%} of slots hold real tokens")
    return table


def print_data_report(cfg: Config, tokenizer, console, n_examples: int = 3, cache_dir: Path | None = None) -> None:
    """What `lorafit data CONFIG` shows: examples with trained tokens highlighted, lengths, packing, the audit.

    Args:
        cfg: the resolved config.
        tokenizer: the model's tokenizer.
        console: a rich Console to print on.
        n_examples: how many training examples to render.
        cache_dir: the tokenized-data cache; default `$LORAFIT_CACHE` or ~/.cache/lorafit.

    Raises:
        DataError: as `build_datasets`, after printing, so a refused data set can still be inspected.
    """
    from rich.panel import Panel

    d = cfg.data
    prepared = prepare_examples(d, tokenizer, seed=cfg.train.seed, cache_dir=cache_dir)
    rows = make_rows(prepared.train, d.max_length, d.packing)
    audit = make_audit(prepared, rows, d.max_length)
    for e in prepared.train[:n_examples]:
        n_trained = sum(lab != IGNORE_INDEX for lab in e.labels)
        title = f"{d.train[e.source].path} row {e.row + 1}: {len(e.input_ids)} tokens, {n_trained} trained"
        console.print(Panel(render_example(tokenizer, e), title=title, title_align="left"))
    console.print(f"[{_TRAINED_STYLE}]trained[/] [{_PROMPT_STYLE}]not trained[/]")
    console.print("token lengths (examples):")
    for line in length_histogram([len(e.input_ids) for e in prepared.train], d.max_length):
        console.print(line, highlight=False)
    console.print(_audit_table(audit))
    for w in audit.warnings:
        console.print(f"[yellow]warning:[/] {w}")
    check_audit(audit, d.max_length)
    console.print("[green]data ok[/]")
