"""The token store: a source's tokenized examples as flat integer arrays plus offsets, memory-mapped from the cache.

A store is a folder, written under a temporary name and renamed when complete (a reader never sees half of one)::

    ids.bin       int32 (n_tokens,)  every example's tokens, one example after another
    trained.bin   uint8 (n_tokens,)  1 where the token has a loss term: labels = ids there, -100 elsewhere
    offsets.bin   int64 (n + 1,)     example i is ids[offsets[i]:offsets[i + 1]]
    rows.bin      int64 (n,)         the 0-based row of the source each example came from
    supervised.bin int32 (n,)        trained tokens per example
    ends.bin      uint8 (n,)         1 when the example trains one of its end tokens (EOS / end-of-turn)
    meta.json     the source's counts (`SourceStats`); written last

Only the per-example arrays (8 + 8 + 4 + 1 bytes an example) are read to build the audit and the packing; token
pages are read when a batch needs them, so memory stays flat however large the data. `ExampleSet` is the list-like
view the rest of lorafit uses: examples of several stores, selected and reordered by index arrays.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lorafit.data.formats import IGNORE_INDEX, Example, SourceStats

_TOKEN_FILES = {"ids": np.int32, "trained": np.uint8}
_EXAMPLE_FILES = {"offsets": np.int64, "rows": np.int64, "supervised": np.int32, "ends": np.uint8}


@dataclass
class Chunk:
    """Tokenized examples of a run of rows, as arrays ready to append to a store."""

    ids: np.ndarray  # int32 (tokens,)
    trained: np.ndarray  # uint8 (tokens,)
    lengths: np.ndarray  # int64 (examples,)
    rows: np.ndarray  # int64 (examples,)
    supervised: np.ndarray  # int32 (examples,)
    ends: np.ndarray  # uint8 (examples,)
    stats: SourceStats


class StoreWriter:
    """Appends chunks to a new store in `<path>.tmp<pid>/`; `finish` renames it to `path`."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tmp = self.path.with_name(f"{self.path.name}.tmp{os.getpid()}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        names = list(_TOKEN_FILES) + ["rows", "supervised", "ends", "offsets"]
        self.files = {name: (self.tmp / f"{name}.bin").open("wb") for name in names}
        self.tokens = 0
        self.stats = SourceStats()
        self.files["offsets"].write(np.zeros(1, np.int64).tobytes())

    def append(self, chunk: Chunk) -> None:
        for name in ("ids", "trained", "rows", "supervised", "ends"):
            self.files[name].write(np.ascontiguousarray(getattr(chunk, name), dtype=_dtype(name)).tobytes())
        offsets = self.tokens + np.cumsum(chunk.lengths, dtype=np.int64)
        self.files["offsets"].write(offsets.tobytes())
        self.tokens += int(chunk.lengths.sum())
        for key, value in chunk.stats.__dict__.items():
            setattr(self.stats, key, getattr(self.stats, key) + value)

    def finish(self) -> None:
        for f in self.files.values():
            f.close()
        (self.tmp / "meta.json").write_text(json.dumps({"stats": self.stats.__dict__, "tokens": self.tokens}))
        if self.path.exists():  # another process finished first (no lock available): keep theirs
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        for f in self.files.values():
            f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _dtype(name: str):
    return _TOKEN_FILES.get(name) or _EXAMPLE_FILES[name]


def _map(path: Path, name: str) -> np.ndarray:
    file = path / f"{name}.bin"
    if file.stat().st_size == 0:  # numpy cannot map an empty file
        return np.zeros(0, dtype=_dtype(name))
    return np.memmap(file, dtype=_dtype(name), mode="r")


class TokenStore:
    """One source's examples, memory-mapped read-only from a store folder."""

    def __init__(self, path: Path):
        self.path = Path(path)
        meta = json.loads((self.path / "meta.json").read_text())
        self.stats = SourceStats(**meta["stats"])
        self.ids = _map(self.path, "ids")
        self.trained = _map(self.path, "trained")
        self.offsets = np.asarray(_map(self.path, "offsets"))
        self.rows = _map(self.path, "rows")
        self.supervised = _map(self.path, "supervised")
        self.ends = _map(self.path, "ends")

    @classmethod
    def open(cls, path: Path) -> TokenStore | None:
        """The store at `path`, or None when there is none (or only a damaged one)."""
        try:
            return cls(path)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def arrays(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, trained mask) of example i, as views into the mapped files."""
        start, end = self.offsets[i], self.offsets[i + 1]
        return self.ids[start:end], self.trained[start:end]

    def size_on_disk(self) -> int:
        return sum(f.stat().st_size for f in self.path.iterdir())


class ExampleSet(Sequence):
    """A list-like view of examples held in token stores: `len`, indexing (an `Example`), slicing, iteration.

    Args:
        stores: the stores, indexed by source number (a None entry for a source without a store).
        src: (n,) which store each example is in.
        idx: (n,) the example's index within its store.
    """

    def __init__(self, stores: list[TokenStore | None], src: np.ndarray, idx: np.ndarray):
        self.stores, self.src, self.idx = stores, np.asarray(src, np.int32), np.asarray(idx, np.int64)

    @classmethod
    def of_store(cls, store: TokenStore, source: int, n_sources: int | None = None) -> ExampleSet:
        stores: list[TokenStore | None] = [None] * max(source + 1, n_sources or 0)
        stores[source] = store
        return cls(stores, np.full(len(store), source, np.int32), np.arange(len(store)))

    @classmethod
    def concat(cls, parts: list[ExampleSet]) -> ExampleSet:
        stores: list[TokenStore | None] = [None] * max((len(p.stores) for p in parts), default=0)
        for p in parts:
            for i, s in enumerate(p.stores):
                stores[i] = stores[i] or s
        src = np.concatenate([p.src for p in parts]) if parts else np.zeros(0, np.int32)
        idx = np.concatenate([p.idx for p in parts]) if parts else np.zeros(0, np.int64)
        return cls(stores, src, idx)

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, key):
        if isinstance(key, (slice, np.ndarray, list)):
            return ExampleSet(self.stores, self.src[key], self.idx[key])
        ids, trained = self.arrays(key)
        labels = np.where(trained.astype(bool), ids, IGNORE_INDEX)
        store = self.stores[int(self.src[key])]
        return Example(ids.tolist(), labels.tolist(), int(self.src[key]), int(store.rows[self.idx[key]]))

    def __iter__(self) -> Iterator[Example]:
        return (self[i] for i in range(len(self)))

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and len(self) == len(other) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]

    def arrays(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, trained mask) of example i without building Python lists."""
        return self.stores[int(self.src[i])].arrays(int(self.idx[i]))

    def per_example(self, name: str) -> np.ndarray:
        """A per-example array (`lengths`, `rows`, `supervised`, `ends`) in this set's order."""
        out = np.zeros(len(self), dtype=np.int64)
        for s, store in enumerate(self.stores):
            if store is None:
                continue
            mine = self.src == s
            if mine.any():
                values = store.lengths if name == "lengths" else np.asarray(getattr(store, name))
                out[mine] = values[self.idx[mine]]
        return out

    def lengths(self) -> np.ndarray:
        return self.per_example("lengths")
