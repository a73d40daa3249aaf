"""Tokenize once: a source's examples cached on disk, keyed by its files, the tokenizer and the token settings."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorafit.data.formats import IGNORE_INDEX, Example, SourceStats, tokenize_rows
from lorafit.data.sources import load_hub, read_source, resolve_source

if TYPE_CHECKING:
    from lorafit.config import DataConfig, DataSource

_CACHE_VERSION = 1
_PROGRESS_ABOVE = 2000  # rows; smaller sets tokenize in well under a second

def tokenizer_fingerprint(tokenizer) -> str:
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
    files = resolve_source(source)
    hub = load_hub(source) if files is None else None
    tokenizer_fp = tokenizer_fp or tokenizer_fingerprint(tokenizer)
    key = cache_key(source, data_cfg, tokenizer_fp, files, getattr(hub, "_fingerprint", None))
    path = Path(cache_dir or default_cache_dir()) / "data" / f"{key}.npz"
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
