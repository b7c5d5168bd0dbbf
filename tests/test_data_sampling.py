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


# ------------------------------------------------------------------------------ full_batch
def _stream_of_run(n, global_batch, micro_batch, world, epochs, seed=3):
    """What a full_batch run reads: per optimizer step, the indices over all ranks and accumulation
    steps in stream order (position j of a step is sample j // k of slot j % k, slot = a * world +
    rank, k = accumulation * world), Lightning epoch by Lightning epoch, cut at ceil(epochs * n / B)."""
    accum = global_batch // (micro_batch * world)
    total = math.ceil(epochs * n / global_batch)
    per_epoch = math.ceil(n / global_batch)
    steps = []
    for lepoch in range(math.ceil(total / per_epoch)):
        shards = []
        for rank in range(world):
            index, real = epoch_plan(n, global_batch, micro_batch, world, rank, epoch=lepoch, seed=seed,
                                     mode="full_batch")
            assert real.all()  # no padding
            assert len(index) == micro_batches_per_rank(n, global_batch, micro_batch, world) * micro_batch
            shards.append(index.reshape(per_epoch, accum, micro_batch))
        for s in range(per_epoch):
            slots = np.stack([shards[r][s][a] for a in range(accum) for r in range(world)])  # (k, micro)
            steps.append(slots.T.reshape(-1))
    return steps[:total], total


@pytest.mark.parametrize("n, global_batch, micro_batch, world, epochs", [
    (10, 4, 4, 1, 3),       # issue 12: N=10, B=4, 3 epochs
    (10, 4, 2, 1, 3),
    (1000, 64, 16, 2, 3),   # issue 12: N=1000 on 2 ranks with accumulation 2
    (1000, 96, 24, 2, 2),
    (7, 16, 4, 2, 5),       # a batch larger than the data: a step spans passes
])
def test_full_batch_stream_steps_passes_and_ranks(n, global_batch, micro_batch, world, epochs):
    steps, total = _stream_of_run(n, global_batch, micro_batch, world, epochs)
    assert total == math.ceil(epochs * n / global_batch) and len(steps) == total
    assert all(len(step) == global_batch for step in steps)  # every step a full batch
    stream = np.concatenate(steps)
    for p in range(len(stream) // n):  # each pass over the stream is a permutation
        assert np.array_equal(np.sort(stream[p * n:(p + 1) * n]), np.arange(n)), p
    # the union of what the ranks read in a step is the single-process global batch
    single, _ = _stream_of_run(n, global_batch, global_batch, 1, epochs)
    for s, (multi, one) in enumerate(zip(steps, single)):
        assert np.array_equal(np.sort(multi), np.sort(one)), s
        assert np.array_equal(multi, one), s  # even position by position
    # and the single-process stream is the per-pass permutations (those padded mode uses), concatenated
    perms = np.concatenate([epoch_plan(n, n, n, 1, 0, epoch=p, seed=3)[0] for p in range(len(stream) // n + 1)])
    assert np.array_equal(np.concatenate(single), perms[:len(stream)])


def test_full_batch_n10_b4_three_epochs():
    """8 steps = ceil(30 / 4); Lightning epochs of 3 steps (the third one ends the run after 2);
    the last 2 positions come from the 4th pass, every pass a permutation, no padding."""
    steps, total = _stream_of_run(10, 4, 4, 1, 3)
    assert total == 8 and math.ceil(10 / 4) == 3
    stream = np.concatenate(steps)
    assert len(stream) == 32 and len(stream) - 3 * 10 == 2
    assert [np.array_equal(np.sort(stream[p * 10:(p + 1) * 10]), np.arange(10)) for p in range(3)] == [True] * 3
    # Lightning epoch 1 starts at stream position 12 (global step 3): derivable from the step alone
    assert np.array_equal(epoch_plan(10, 4, 4, 1, 0, epoch=1, seed=3, mode="full_batch")[0], stream[12:24])


def test_unknown_epoch_mode_is_refused():
    with pytest.raises(ValueError, match="unknown epoch mode 'full'"):
        epoch_plan(10, 4, 4, 1, 0, mode="full")
