"""Which image each rank reads at each position of an epoch.

One function, :func:`epoch_plan`, used by every backend, so that:
- every epoch each image appears exactly once across all ranks (a true permutation, seeded by
  ``seed + epoch``, identical on every rank, sharded by global rank);
- the epoch is padded to whole global batches; padding samples repeat an image of the epoch but
  carry label -1, which the loss and metrics ignore;
- every rank yields the same number of micro-batches: ``ceil(n / global_batch) * accumulation``.

Global step ``s`` covers positions ``[s*G, (s+1)*G)`` of the padded permutation. Those G positions
are dealt round-robin over the ``accumulation * world_size`` micro-batches of that step, so the
padding of the last step spreads over all micro-batches instead of filling whole ones.
Micro-batch ``a`` of rank ``r`` in a step is slot ``k = a * world_size + r``.
"""

from __future__ import annotations

import math

import numpy as np


def epoch_plan(n: int, global_batch: int, micro_batch: int, world_size: int, rank: int,
               epoch: int = 0, seed: int = 0, shuffle: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(index, real)`` for ``rank``: file index per position and a mask of real samples.

    Both have length ``steps * accumulation * micro_batch`` with ``steps = ceil(n / global_batch)``
    and ``accumulation = global_batch / (micro_batch * world_size)``; positions where ``real`` is
    False are padding (their ``index`` is a valid image, to be labelled -1).
    """
    if n <= 0:
        raise ValueError("epoch_plan: no images")
    slots = micro_batch * world_size
    if global_batch % slots:
        raise ValueError(f"global_batch {global_batch} is not a multiple of micro_batch*world_size {slots}")
    accum = global_batch // slots
    steps = math.ceil(n / global_batch)
    total = steps * global_batch
    order = (np.random.default_rng([seed, epoch]).permutation(n) if shuffle
             else np.arange(n)).astype(np.int64)
    index = np.concatenate([order, order[np.arange(total - n) % n]])
    real = np.arange(total) < n
    k = accum * world_size
    # (steps, micro_batch, k) -> (steps, k, micro_batch): position j of a step goes to slot j % k
    index = index.reshape(steps, micro_batch, k).transpose(0, 2, 1)
    real = real.reshape(steps, micro_batch, k).transpose(0, 2, 1)
    # slot k = a*world_size + r  ->  (steps, accum, world_size, micro_batch)
    index = index.reshape(steps, accum, world_size, micro_batch)[:, :, rank]
    real = real.reshape(steps, accum, world_size, micro_batch)[:, :, rank]
    return index.reshape(-1).copy(), real.reshape(-1).copy()


def plan_kwargs(train: bool, global_batch: int, micro_batch: int, world_size: int, rank: int, seed: int) -> dict:
    """:func:`epoch_plan`'s arguments for a split: training steps the global batch over a shuffled
    permutation; validation takes one micro-batch per rank at a time, in file order."""
    return dict(global_batch=global_batch if train else micro_batch * world_size, micro_batch=micro_batch,
                world_size=world_size, rank=rank, seed=seed, shuffle=train)


def micro_batches_per_rank(n: int, global_batch: int, micro_batch: int, world_size: int, **_) -> int:
    """Micro-batches each rank yields per epoch: ``ceil(n / global_batch) * accumulation`` (the
    length of :func:`epoch_plan` / ``micro_batch``); extra keywords (rank, seed, ...) are ignored."""
    return math.ceil(n / global_batch) * (global_batch // (micro_batch * world_size))
