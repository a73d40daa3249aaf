"""Tokenize once per machine: a source's examples in a token store in the cache, keyed by its files, the tokenizer
and the token settings.

Rows are read a chunk at a time and tokenized in batches (with `data.num_proc` processes for large sources), and
each chunk is appended to the store on disk, so memory does not grow with the data. Processes of one machine
(torchrun, accelerate launch) share the cache: a file lock lets the first one tokenize while the others wait, then
all of them map the same store.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import os
import tempfile
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lorafit.data.formats import IGNORE_INDEX, SourceStats, check_templates, end_token_ids, tokenize_rows
from lorafit.data.sources import count_rows, iter_source, load_hub, resolve_source
from lorafit.data.store import Chunk, ExampleSet, StoreWriter, TokenStore

if TYPE_CHECKING:
    from lorafit.config import DataConfig, DataSource

_CACHE_VERSION = 2
_PROGRESS_ABOVE = 2000  # rows; smaller sets tokenize in well under a second
CHUNK_ROWS = 1000  # rows tokenized per batch call (and per task of a worker process)
POOL_ABOVE = 20_000  # rows; below this, starting worker processes costs more than it saves

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
        return [source.path, source.name, source.split, source.data_files, hub_fingerprint]
    # a save_to_disk folder is "a file" made of every file under it
    files = [p for f in files for p in (sorted(f.rglob("*")) if f.is_dir() else [f]) if p.is_file()]
    return [source.split] + [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


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


def _chunks(rows: Iterator[tuple[str, dict[str, Any]]], size: int) -> Iterator[tuple[int, list]]:
    """(first row number, up to `size` rows) runs of a row iterator."""
    for first in itertools.count(0, size):
        part = list(itertools.islice(rows, size))
        if not part:
            return
        yield first, part


def encode_chunk(rows: list[tuple[str, dict[str, Any]]], first_row: int, tokenizer, fmt: str, data_cfg: DataConfig,
                 end_ids: set[int]) -> Chunk:
    """Tokenize a run of checked rows into the arrays a token store holds."""
    examples, stats = tokenize_rows(rows, tokenizer, fmt, data_cfg, 0, None, first_row)
    lengths = np.fromiter((len(e.input_ids) for e in examples), np.int64, len(examples))
    total = int(lengths.sum())
    ids = np.fromiter(itertools.chain.from_iterable(e.input_ids for e in examples), np.int32, total)
    labels = np.fromiter(itertools.chain.from_iterable(e.labels for e in examples), np.int64, total)
    trained = labels != IGNORE_INDEX
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    if len(examples):  # every kept example has a trained token, so no segment is empty
        supervised = np.add.reduceat(trained.astype(np.int32), starts)
        ends = np.add.reduceat((trained & np.isin(ids, list(end_ids))).astype(np.int32), starts) > 0
    else:
        supervised, ends = np.zeros(0, np.int32), np.zeros(0, bool)
    rows_of = np.fromiter((e.row for e in examples), np.int64, len(examples))
    return Chunk(ids, trained.astype(np.uint8), lengths, rows_of, supervised.astype(np.int32), ends.astype(np.uint8),
                 stats)


_WORKER: tuple | None = None  # (tokenizer, fmt, data_cfg, end_ids), inherited by forked workers


def _worker_start() -> None:
    # Each worker encodes on one core: the processes are the parallelism (Rust threads in each would oversubscribe).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _encode_in_worker(rows: list, first_row: int) -> Chunk:
    return encode_chunk(rows, first_row, *_WORKER)


def _encode_all(rows: Iterator, processes: int, tokenizer, fmt: str, data_cfg: DataConfig,
                end_ids: set[int]) -> Iterator[Chunk]:
    """Chunks in row order, tokenized here or by `processes` forked workers (a few chunks in flight at most)."""
    chunks = _chunks(rows, CHUNK_ROWS)
    if processes <= 1:
        for first, part in chunks:
            yield encode_chunk(part, first, tokenizer, fmt, data_cfg, end_ids)
        return
    import multiprocessing

    global _WORKER
    _WORKER = (tokenizer, fmt, data_cfg, end_ids)
    try:
        with multiprocessing.get_context("fork").Pool(processes, initializer=_worker_start) as pool:
            pending: deque = deque()
            for first, part in chunks:
                pending.append(pool.apply_async(_encode_in_worker, (part, first)))
                if len(pending) >= 2 * processes:
                    yield pending.popleft().get()
            while pending:
                yield pending.popleft().get()
    finally:
        _WORKER = None


def _processes(num_proc: int | None, rows: int | None, tokenizer) -> int:
    """`data.num_proc`; by default one process for a fast tokenizer (its batch encoding already runs on every core)
    or a small source, else the machine's cores (at most 8)."""
    if num_proc is not None:
        return num_proc
    if getattr(tokenizer, "is_fast", False) or rows is None or rows < POOL_ABOVE:
        return 1
    return max(1, min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 8))


def build_store(path: Path, source: DataSource, hub, tokenizer, data_cfg: DataConfig) -> None:
    """Read, check and tokenize a source into a new token store at `path`.

    Raises:
        DataError: bad rows (named by file and line), templates or sources; nothing is left at `path`.
    """
    check_templates(tokenizer, source.format, data_cfg)
    end_ids = end_token_ids(tokenizer, data_cfg.chat_template, chat=source.format == "chat")
    total = len(hub) if hub is not None and hasattr(hub, "__len__") else (count_rows(source) if hub is None else None)
    writer = StoreWriter(path)
    try:
        with _progress_bar(total or 0, f"tokenizing {source.path}") as advance:
            for chunk in _encode_all(iter_source(source, hub), _processes(data_cfg.num_proc, total, tokenizer), tokenizer,
                                     source.format, data_cfg, end_ids):
                writer.append(chunk)
                if advance is not None:
                    advance(chunk.stats.rows)
        writer.finish()
    except BaseException:
        writer.abort()
        raise


@contextmanager
def machine_lock(path: Path):
    """Hold an exclusive lock on `<path>.lock`: one process of the machine builds a store, the others wait."""
    lock = path.with_name(path.name + ".lock")
    with lock.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _progress_bar(total: int, label: str):
    """A rich progress bar for large sets (a no-op context for small ones). Yields an `advance(n)` callable."""
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
            yield lambda n=1: p.advance(task, n)

    return bar()


def store_path(source: DataSource, tokenizer, data_cfg: DataConfig, cache_dir: Path | None = None,
               tokenizer_fp: str | None = None, hub=None) -> Path:
    """Where the token store of `source` lives (or will live) in the cache."""
    files = resolve_source(source)
    tokenizer_fp = tokenizer_fp or tokenizer_fingerprint(tokenizer)
    key = cache_key(source, data_cfg, tokenizer_fp, files, getattr(hub, "_fingerprint", None))
    return Path(cache_dir or default_cache_dir()) / "data" / key


def _writable(folder: Path) -> Path:
    """`folder`, created; or a temporary folder when it cannot be written (the next run tokenizes again)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe{os.getpid()}"
        probe.touch()
        probe.unlink()
        return folder
    except OSError:
        return Path(tempfile.mkdtemp(prefix="lorafit-data-"))


def load_source(source: DataSource, tokenizer, data_cfg: DataConfig, index: int = 0,
                cache_dir: Path | None = None, tokenizer_fp: str | None = None,
                n_sources: int | None = None) -> tuple[ExampleSet, SourceStats]:
    """A source's examples from its token store, tokenizing it first when the cache has none.

    Args:
        source: the source.
        tokenizer: a Hugging Face tokenizer.
        data_cfg: the data section (max_length, train_on_prompt, templates, num_proc).
        index: the source's position, stored in its examples.
        cache_dir: where token stores are kept; default `default_cache_dir()`.
        tokenizer_fp: the tokenizer's fingerprint, when already computed.
        n_sources: how many sources the examples' set should have room for.

    Returns:
        The source's examples (memory-mapped) and its counts.
    """
    files = resolve_source(source)
    hub = load_hub(source) if files is None else None
    path = store_path(source, tokenizer, data_cfg, cache_dir, tokenizer_fp, hub)
    store = TokenStore.open(path)
    if store is None:
        path = _writable(path.parent) / path.name
        with machine_lock(path):
            store = TokenStore.open(path)  # another process may have built it while this one waited
            if store is None:
                build_store(path, source, hub, tokenizer, data_cfg)
                store = TokenStore.open(path)
    return ExampleSet.of_store(store, index, n_sources), store.stats
