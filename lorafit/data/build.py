"""The whole pipeline: sources → examples → eval split → rows, and the label audit that may refuse the data."""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lorafit.data.cache import load_source, tokenizer_fingerprint
from lorafit.data.formats import SourceStats, end_token_ids
from lorafit.data.packing import Rows, make_rows
from lorafit.data.store import ExampleSet
from lorafit.errors import DataError

if TYPE_CHECKING:
    from lorafit.config import DataConfig, DataSource

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
    mixture: list[MixPart] = field(default_factory=list)  # per train source: what it gives the training set
    store_bytes: int = 0  # size on disk of the token stores read
    seconds: float = 0.0  # time to read (or tokenize) the sources

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


@dataclass
class MixPart:
    """One train source's share of the training set, after the eval split and `samples` / `fraction`."""

    path: str
    available: int  # examples of the source left for training
    drawn: int  # examples in the training set (more than available when drawn with replacement)
    tokens: int
    share: float = 0.0  # of the training set's tokens


@dataclass
class Prepared:
    """Examples before packing, with what the audit needs."""

    train: ExampleSet
    eval: ExampleSet
    stats: list[SourceStats]  # per train source
    formats: list[str]  # per train source
    end_ids: list[set[int]]  # per train source: the ids that teach the model to stop
    mixture: list[MixPart] = field(default_factory=list)
    store_bytes: int = 0
    seconds: float = 0.0


def held_out_count(n_rows: int, fraction: float) -> int:
    """How many of `n_rows` train rows `data.eval_fraction` holds out for eval."""
    return math.ceil(n_rows * fraction) if fraction > 0 else 0


def split_eval(n_rows: int, fraction: float, seed: int) -> set[int]:
    """Row indices (over all train sources, in order) held out for eval: a seeded, order-independent draw."""
    if fraction <= 0:
        return set()
    order = list(range(n_rows))
    random.Random(seed).shuffle(order)
    return set(order[: held_out_count(n_rows, fraction)])


def _load_all(sources: list[DataSource], tokenizer, data_cfg: DataConfig, cache_dir: Path | None):
    fp = tokenizer_fingerprint(tokenizer)
    loaded = [load_source(s, tokenizer, data_cfg, i, cache_dir, fp, len(sources)) for i, s in enumerate(sources)]
    return ExampleSet.concat([examples for examples, _ in loaded]), [stats for _, stats in loaded]


def sample_count(source: DataSource, available: int, key: str) -> int | None:
    """How many examples `samples` / `fraction` take of a source with `available` examples; None: all of them.

    Raises:
        DataError: more than the source holds without `replace: true`.
    """
    if source.samples is None and source.fraction is None:
        return None
    if source.fraction is not None or source.samples < 1:
        fraction = source.fraction if source.fraction is not None else source.samples
        n = max(1, round(fraction * available))
    else:
        n = int(source.samples)
    if n > available and not source.replace:
        raise DataError(f"{key}.samples: {n} is more than the {available} examples {source.path} has for training; "
                        "lower it, or set replace: true to draw examples more than once")
    return n


def draw(available: int, n: int, replace: bool, seed: int) -> np.ndarray:
    """A seeded draw of `n` of `available` indices, in data order: without replacement, or (past `available`) every
    index as many whole times as fit, then a draw without replacement for the rest."""
    rng = np.random.default_rng(seed)
    whole, rest = divmod(n, available) if replace else (0, n)
    picked = np.concatenate([np.tile(np.arange(available), whole), rng.choice(available, rest, replace=False)])
    return np.sort(picked, kind="stable")


def _mix(train: ExampleSet, sources: list[DataSource], seed: int) -> tuple[ExampleSet, list[MixPart]]:
    """Apply each source's `samples` / `fraction`, keeping source order; report each source's share."""
    parts, mixture = [], []
    for i, s in enumerate(sources):
        mine = np.flatnonzero(train.src == i)
        n = sample_count(s, len(mine), f"data.train.{i}")
        if n is not None:
            mine = mine[draw(len(mine), n, s.replace, seed * 1_000_003 + i)]
        part = train[mine]
        parts.append(part)
        mixture.append(MixPart(s.path, int((train.src == i).sum()), len(part), int(part.lengths().sum())))
    mixed = ExampleSet.concat(parts) if parts else train
    total = sum(m.tokens for m in mixture)
    for m in mixture:
        m.share = m.tokens / total if total else 0.0
    return mixed, mixture


def _split_held_out(train: ExampleSet, stats: list[SourceStats], fraction: float, seed: int):
    """(train, eval) after holding out `fraction` of all train rows (see `split_eval`)."""
    offsets = np.cumsum([0] + [s.rows for s in stats])
    n_rows = int(offsets[-1])
    held = split_eval(n_rows, fraction, seed)
    if len(held) >= n_rows:
        raise DataError(f"data.eval_fraction: {fraction} of {n_rows} rows leaves no training row")
    mask = np.zeros(n_rows, bool)
    mask[list(held)] = True
    is_held = mask[offsets[train.src] + train.per_example("rows")]
    return train[~is_held], train[is_held]


def prepare_examples(data_cfg: DataConfig, tokenizer, *, seed: int, cache_dir: Path | None = None) -> Prepared:
    """Tokenized train and eval examples (no packing, no refusal): what `build_datasets` and the report share."""
    started = time.perf_counter()
    train, stats = _load_all(data_cfg.train, tokenizer, data_cfg, cache_dir)
    eval_examples = ExampleSet([], np.zeros(0), np.zeros(0))
    if data_cfg.eval:
        eval_examples, _ = _load_all(data_cfg.eval, tokenizer, data_cfg, cache_dir)
    elif data_cfg.eval_fraction > 0:
        train, eval_examples = _split_held_out(train, stats, data_cfg.eval_fraction, seed)
    train, mixture = _mix(train, data_cfg.train, seed)
    formats = [s.format for s in data_cfg.train]
    end_ids = [end_token_ids(tokenizer, data_cfg.chat_template, chat=f == "chat") for f in formats]
    stores = {id(s): s for s in train.stores + eval_examples.stores if s is not None}
    return Prepared(train, eval_examples, stats, formats, end_ids, mixture,
                    sum(s.size_on_disk() for s in stores.values()), time.perf_counter() - started)


def make_audit(prepared: Prepared, rows: Rows, max_length: int) -> DataAudit:
    """Count tokens, trained tokens, truncation, drops and trained end tokens of the training set.

    Reads only per-example counts of the token stores (trained tokens, whether an end token is trained).
    """
    train = prepared.train
    supervised_format = np.array([f != "text" for f in prepared.formats], bool)
    checked = supervised_format[train.src] if len(train) else np.zeros(0, bool)
    end_checked = int(checked.sum())
    end_trained = int((train.per_example("ends").astype(bool) & checked).sum())
    s = prepared.stats
    return DataAudit(
        rows=sum(x.rows for x in s), examples=len(train), eval_examples=len(prepared.eval),
        tokens=int(train.lengths().sum()), supervised=int(train.per_example("supervised").sum()),
        truncated=sum(x.truncated for x in s), dropped_truncated=sum(x.dropped_truncated for x in s),
        dropped_unsupervised=sum(x.dropped_unsupervised for x in s), end_checked=end_checked,
        end_trained=end_trained, packed_rows=len(rows), slots=len(rows) * max_length, max_length=max_length,
        warnings=_audit_warnings(end_checked, end_trained, s, max_length), mixture=prepared.mixture,
        store_bytes=prepared.store_bytes, seconds=prepared.seconds)


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
                   cache_dir: Path | None = None) -> tuple[Rows, Rows, DataAudit]:
    """Train and eval rows ready for `collate`, and the label audit of the training set.

    Args:
        data_cfg: the config's data section.
        tokenizer: the model's tokenizer.
        seed: seeds the `eval_fraction` split.
        cache_dir: where tokenized sources are cached; default `$LORAFIT_CACHE` or ~/.cache/lorafit.

    Returns:
        (train rows, eval rows (empty without eval data), audit). Rows are list-like views over memory-mapped
        token stores: `len`, indexing (a `Row`), slicing. With `data.streaming`: a `TextStream` (its
        `micro_batches` give each step's rows), the eval rows, and no audit (None).

    Raises:
        DataError: bad sources or rows, or data that fails the audit (see `check_audit`).
    """
    if data_cfg.streaming:
        from lorafit.data.stream import build_stream

        return build_stream(data_cfg, tokenizer, seed=seed, cache_dir=cache_dir)
    prepared = prepare_examples(data_cfg, tokenizer, seed=seed, cache_dir=cache_dir)
    train = make_rows(prepared.train, data_cfg.max_length, data_cfg.packing)
    audit = make_audit(prepared, train, data_cfg.max_length)
    check_audit(audit, data_cfg.max_length)
    if (data_cfg.eval or data_cfg.eval_fraction > 0) and not prepared.eval.per_example("supervised").any():
        raise DataError("the eval data has no trained token (every eval row was dropped or is empty); check data.eval "
                        "or raise data.eval_fraction")
    return train, make_rows(prepared.eval, data_cfg.max_length, data_cfg.packing), audit
