"""Pure pieces of the training loop: the learning-rate schedule and the order in which rows are visited.

Both are functions of (seed, epoch, step) only, so a resumed run visits exactly the rows, in exactly the order, an
uninterrupted run would, on any number of processes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence


def warmup_steps(warmup: float, total_steps: int) -> int:
    """`train.warmup` as a number of steps: below 1 a fraction of the run, otherwise a count."""
    return int(warmup) if warmup >= 1 else math.ceil(warmup * total_steps)


def lr_factor(step: int, total_steps: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based).

    Linear warmup from lr/warmup to lr over `warmup` steps, then `constant`, `linear` decay to 0, or `cosine`
    decay to 0 at `total_steps`.
    """
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    progress = min(1.0, progress)
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@functools.lru_cache(maxsize=2)  # the loop asks every step; a permutation of millions of rows is worth keeping
def epoch_order(n_rows: int, seed: int, epoch: int) -> tuple[int, ...]:
    """A permutation of row indices for `epoch`: deterministic in (seed, epoch), independent of global RNG."""
    import torch

    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(n_rows, generator=g).tolist())


def steps_per_epoch(n_rows: int, global_batch: int) -> int:
    """Optimizer steps in one pass over `n_rows`; the last, partial global batch is filled from the epoch's start."""
    return max(1, math.ceil(n_rows / global_batch))


def micro_batches(order: Sequence[int], step: int, batch_size: int, grad_accum: int, rank: int, world: int) -> list[list[int]]:
    """Row indices for this process's `grad_accum` micro-batches of optimizer step `step` within an epoch.

    The global batch (batch_size × grad_accum × world rows) is cut into `world` contiguous shards, one per rank,
    each split into `grad_accum` micro-batches. Rows past the end wrap around to the epoch's start, so every step
    is full and every process does the same number of micro-steps.
    """
    global_batch = batch_size * grad_accum * world
    start = step * global_batch
    rows = [order[(start + i) % len(order)] for i in range(global_batch)]
    shard = rows[rank * batch_size * grad_accum: (rank + 1) * batch_size * grad_accum]
    return [shard[i * batch_size: (i + 1) * batch_size] for i in range(grad_accum)]
