"""Streaming (`data.streaming: true`, format text): rows read, tokenized and packed on the fly, for corpora larger
than memory or disk cache (continued pre-training).

Rows are visited in source order (no shuffle: a stream cannot be shuffled without holding it) and packed greedily:
each packed row takes examples until the next one would not fit in `max_length`. Where the stream stands is
`{"epoch", "source", "row"}`: the first source row of the next packed row. Packing from a row boundary is
deterministic, so a run resumed from a saved position sees exactly the rows an uninterrupted run would. After the
last source the stream starts again (epoch + 1); `train.max_steps` says when to stop.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import TYPE_CHECKING

from lorafit.data.formats import batch_example_tokens, check_templates, truncate
from lorafit.data.packing import Row
from lorafit.data.sources import iter_source, load_hub, resolve_source
from lorafit.errors import DataError

if TYPE_CHECKING:
    from lorafit.config import DataConfig

STREAM_CHUNK = 256  # rows tokenized per batch call


class TextStream:
    """Packed training rows of `data.train`, made on the fly. `take(n)` returns the next n rows."""

    streaming = True

    def __init__(self, data_cfg: DataConfig, tokenizer):
        for s in data_cfg.train:
            check_templates(tokenizer, s.format, data_cfg)
        self.cfg, self.tokenizer = data_cfg, tokenizer
        self.position = {"epoch": 0, "source": 0, "row": 0}
        self._examples: Iterator | None = None
        self._next = None  # the example read ahead: the first of the next row

    def state(self) -> dict[str, int]:
        """Where the stream stands (saved in checkpoints)."""
        return dict(self.position)

    def seek(self, position: dict[str, int]) -> None:
        """Continue from a saved `state()`."""
        self.position = {"epoch": 0, "source": 0, "row": 0, **(position or {})}
        self._examples, self._next = None, None

    def _source_examples(self, source: int, skip: int) -> Iterator[tuple[int, int, list[int], list[int]]]:
        spec = self.cfg.train[source]
        hub = load_hub(spec, streaming=True) if resolve_source(spec) is None else None
        rows = itertools.islice(iter_source(spec, hub), skip, None)
        for first in itertools.count(skip, STREAM_CHUNK):
            chunk = list(itertools.islice(rows, STREAM_CHUNK))
            if not chunk:
                return
            for i, (ids, labels) in enumerate(batch_example_tokens(self.tokenizer, chunk, "text", self.cfg)):
                ids, labels, _ = truncate(ids, labels, self.cfg.max_length)
                yield source, first + i, ids, labels

    def _all_examples(self) -> Iterator[tuple[int, int, int, list[int], list[int]]]:
        epoch, source, row = self.position["epoch"], self.position["source"], self.position["row"]
        while True:
            seen = False
            for s in range(source, len(self.cfg.train)):
                for ex in self._source_examples(s, row if s == source else 0):
                    seen = True
                    yield (epoch, *ex)
            if not seen and source == 0 and row == 0:
                raise DataError("data.train: the stream holds no rows")
            epoch, source, row = epoch + 1, 0, 0

    def _peek(self):
        if self._next is None:
            if self._examples is None:
                self._examples = self._all_examples()
            self._next = next(self._examples)
        return self._next

    def take(self, n: int) -> list[Row]:
        """The next `n` packed rows; advances the position past them."""
        rows: list[Row] = []
        current: list[tuple] = []
        while len(rows) < n:
            ex = self._peek()
            if current and (not self.cfg.packing or sum(len(e[3]) for e in current) + len(ex[3]) > self.cfg.max_length):
                rows.append(_row(current))
                current = []
                continue
            current.append(ex)
            self._next = None
        epoch, source, row = self._peek()[:3]  # the first example of the next row (read ahead, not consumed)
        self.position = {"epoch": epoch, "source": source, "row": row}
        return rows


    def micro_batches(self, batch_size: int, grad_accum: int, rank: int, world: int) -> list[list[Row]]:
        """This process's micro-batches of the next optimizer step: the stream's next global batch (every process
        reads the same stream), cut into `world` contiguous shards of `grad_accum` micro-batches, as
        `schedule.micro_batches` cuts an epoch's order."""
        per_rank = batch_size * grad_accum
        mine = self.take(per_rank * world)[rank * per_rank: (rank + 1) * per_rank]
        return [mine[i * batch_size: (i + 1) * batch_size] for i in range(grad_accum)]


def _row(examples: list[tuple]) -> Row:
    ids = [t for e in examples for t in e[3]]
    labels = [t for e in examples for t in e[4]]
    return Row(ids, labels, [p for e in examples for p in range(len(e[3]))])


def build_stream(data_cfg: DataConfig, tokenizer, *, seed: int, cache_dir=None):
    """(stream of train rows, eval rows from `data.eval`, None: a stream has no audit before it is read).

    Raises:
        DataError: a bad source or row (named by file and line, when the stream reaches it).
    """
    from lorafit.data.build import _load_all
    from lorafit.data.packing import make_rows

    eval_rows = []
    if data_cfg.eval:
        examples, _ = _load_all(data_cfg.eval, tokenizer, data_cfg, cache_dir)
        eval_rows = make_rows(examples, data_cfg.max_length, data_cfg.packing)
    stream = TextStream(data_cfg, tokenizer)
    stream.take(0)  # reads the first rows now: a missing file or bad first row fails before the model loads
    return stream, eval_rows, None
