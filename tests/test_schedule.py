"""The pure pieces of the loop: LR schedule, warmup, epoch order, and how a global batch is shared out."""

import math

import pytest

from lorafit.schedule import epoch_order, lr_factor, micro_batches, steps_per_epoch, warmup_steps


def test_warmup_is_a_fraction_below_one_and_a_count_from_one():
    assert warmup_steps(0.1, 95) == 10  # ceil(9.5)
    assert warmup_steps(0.0, 95) == 0
    assert warmup_steps(7, 95) == 7


def test_warmup_rises_linearly_to_the_peak():
    factors = [lr_factor(s, 100, 4, "cosine") for s in range(4)]
    assert factors == [0.25, 0.5, 0.75, 1.0]


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_decay_starts_at_the_peak_and_ends_at_zero(kind):
    assert lr_factor(10, 110, 10, kind) == 1.0
    assert lr_factor(110, 110, 10, kind) == pytest.approx(0.0, abs=1e-12)


def test_cosine_midpoint_and_linear_midpoint():
    assert lr_factor(60, 110, 10, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(60, 110, 10, "linear") == pytest.approx(0.5)


def test_constant_stays_at_the_peak_after_warmup():
    assert [lr_factor(s, 50, 2, "constant") for s in (2, 25, 49)] == [1.0, 1.0, 1.0]


def test_epoch_order_is_a_seeded_permutation_that_changes_per_epoch():
    a, b = epoch_order(50, seed=3, epoch=0), epoch_order(50, seed=3, epoch=1)
    assert sorted(a) == list(range(50)) and a != b
    assert epoch_order(50, seed=3, epoch=0) == a  # no dependence on global RNG state
    assert epoch_order(50, seed=4, epoch=0) != a


def test_global_batch_is_the_same_rows_however_it_is_split():
    order = epoch_order(10, seed=0, epoch=0)
    one = micro_batches(order, step=1, batch_size=4, grad_accum=1, rank=0, world=1)
    accum = micro_batches(order, step=1, batch_size=1, grad_accum=4, rank=0, world=1)
    ranks = [micro_batches(order, step=1, batch_size=2, grad_accum=1, rank=r, world=2) for r in (0, 1)]
    flat = lambda mbs: [i for mb in mbs for i in mb]  # noqa: E731
    assert flat(accum) == flat(one) == flat(ranks[0]) + flat(ranks[1]) == list(order[4:8])


def test_last_partial_batch_wraps_to_the_epoch_start():
    order = list(range(10))
    assert steps_per_epoch(10, 4) == 3
    (last,) = micro_batches(order, step=2, batch_size=4, grad_accum=1, rank=0, world=1)
    assert last == [8, 9, 0, 1]
