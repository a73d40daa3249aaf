"""Examples → rows (best-fit-decreasing packing) → batches, and the token loss that suits them."""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lorafit.data.formats import IGNORE_INDEX, Example

if TYPE_CHECKING:
    import torch

@dataclass(frozen=True)
class Row:
    """One training row: one example, or several packed ones whose `position_ids` each restart at 0."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


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


def _example_arrays(examples: Sequence, i: int):
    """(ids, trained mask) of example i: views into a token store, or arrays of a plain `Example`."""
    import numpy as np

    if hasattr(examples, "arrays"):
        return examples.arrays(i)
    e = examples[i]
    return np.asarray(e.input_ids, np.int64), np.asarray(e.labels, np.int64) != IGNORE_INDEX


class Rows(Sequence):
    """Training rows as a list-like view: bin b packs examples `members[starts[b]:starts[b+1]]`.

    A row is built when asked for (from a memory-mapped token store, for `ExampleSet` examples), so holding the rows
    of a large data set costs two integer arrays, not the tokens. Slices are views too.
    """

    def __init__(self, examples: Sequence, members, starts, select=None):
        import numpy as np

        self.examples, self.members, self.starts = examples, np.asarray(members, np.int64), np.asarray(starts, np.int64)
        self.select = np.arange(len(self.starts) - 1) if select is None else np.asarray(select, np.int64)

    def __len__(self) -> int:
        return len(self.select)

    def __getitem__(self, key):
        if isinstance(key, slice):
            return Rows(self.examples, self.members, self.starts, self.select[key])
        import numpy as np

        b = int(self.select[key])
        parts = [_example_arrays(self.examples, int(i)) for i in self.members[self.starts[b]: self.starts[b + 1]]]
        ids = np.concatenate([p[0] for p in parts])
        trained = np.concatenate([p[1] for p in parts]).astype(bool)
        positions = np.concatenate([np.arange(len(p[0])) for p in parts])
        return Row(ids.tolist(), np.where(trained, ids, IGNORE_INDEX).tolist(), positions.tolist())

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and len(self) == len(other) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]


def make_rows(examples: Sequence[Example], max_length: int, packing: bool) -> Rows:
    """Training rows: packed (best-fit decreasing) or one example per row, in data order.

    Args:
        examples: `Example`s, or an `ExampleSet` (read from its token stores without building lists).
        max_length: the most tokens a packed row holds.
        packing: pack several examples into a row; false: one example per row.
    """
    import numpy as np

    n = len(examples)
    if not packing:
        return Rows(examples, np.arange(n), np.arange(n + 1))
    lengths = examples.lengths().tolist() if hasattr(examples, "lengths") else [len(e.input_ids) for e in examples]
    bins = pack(lengths, max_length)
    members = np.fromiter((i for b in bins for i in b), np.int64, n)
    starts = np.concatenate([[0], np.cumsum([len(b) for b in bins], dtype=np.int64)])
    return Rows(examples, members, starts)


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
