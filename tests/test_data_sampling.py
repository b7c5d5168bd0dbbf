"""epoch_plan: every image once per epoch across ranks, equal batch counts per rank, padding marked."""

import math

import numpy as np
import pytest

from resnet_lamb.data.sampling import epoch_plan, micro_batches_per_rank


@pytest.mark.parametrize("n,global_batch,micro_batch,world", [
    (1, 4, 2, 2), (7, 4, 2, 2), (21, 8, 4, 1), (50000, 1024, 128, 4), (1281167, 32768, 256, 8), (13, 12, 2, 3),
    (5, 16, 1, 2),
])
def test_every_image_once_per_epoch_across_ranks(n, global_batch, micro_batch, world):
    accum = global_batch // (micro_batch * world)
    steps = math.ceil(n / global_batch)
    for epoch in (0, 1):
        seen = []
        for rank in range(world):
            index, real = epoch_plan(n, global_batch, micro_batch, world, rank, epoch=epoch, seed=3)
            assert len(index) == len(real) == steps * accum * micro_batch  # same batch count on every rank
            assert micro_batches_per_rank(n, global_batch, micro_batch, world) * micro_batch == len(index)
            assert index.min() >= 0 and index.max() < n  # padding repeats a real image ...
            seen.append(index[real])  # ... but only real positions count
        seen = np.concatenate(seen)
        assert len(seen) == n and np.array_equal(np.sort(seen), np.arange(n))


def test_permutation_depends_on_seed_and_epoch_and_is_the_same_on_every_call():
    a0 = epoch_plan(1000, 64, 16, 2, 0, epoch=0, seed=0)[0]
    assert np.array_equal(a0, epoch_plan(1000, 64, 16, 2, 0, epoch=0, seed=0)[0])
    assert not np.array_equal(a0, epoch_plan(1000, 64, 16, 2, 0, epoch=1, seed=0)[0])
    assert not np.array_equal(a0, epoch_plan(1000, 64, 16, 2, 0, epoch=0, seed=1)[0])


def test_validation_order_is_unshuffled_and_padding_spreads_over_micro_batches():
    index, real = epoch_plan(10, 8, 4, 2, 0, shuffle=False)
    assert len(index) == 8  # 2 batches of 4 on rank 0
    # last step: 2 real images dealt round-robin over 2 micro-batches (rank 0 and rank 1), not all on one
    r1 = epoch_plan(10, 8, 4, 2, 1, shuffle=False)[1]
    assert real[4:].sum() == 1 and r1[4:].sum() == 1


def test_inexact_accumulation_is_refused():
    with pytest.raises(ValueError):
        epoch_plan(100, 10, 4, 1, 0)
