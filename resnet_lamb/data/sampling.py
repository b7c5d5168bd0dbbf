"""Which image each rank reads at each position of an epoch.

One function, :func:`epoch_plan`, used by every backend. Two epoch modes (``data.epoch_mode``):

``padded`` (the proxies and small data):
- every epoch each image appears exactly once across all ranks (a true permutation, seeded by
  ``(seed, epoch)``, identical on every rank, sharded by global rank);
- the epoch is padded to whole global batches; padding samples repeat an image of the epoch but
  carry label -1, which the loss and metrics ignore.

``full_batch`` (the paper's count of steps: ``ceil(epochs * n / global_batch)``, 3519 at 32K):
- the training data is one endless stream: the permutation of pass 0, then that of pass 1, ...
  (pass ``p`` is seeded by ``(seed, p)``: the same permutations ``padded`` uses for its epochs),
  so every image is seen once in each pass of ``n`` consecutive positions;
- global step ``s`` is the ``global_batch`` stream positions ``[s*G, (s+1)*G)``, all real: no
  padding, every step a full batch, a step may straddle two passes;
- Lightning's epoch ``e`` (a validation and a checkpoint after it) is the
  ``steps = ceil(n / global_batch)`` global steps from step ``e * steps``, so the stream position
  at any epoch boundary follows from the global step alone (a resumed run reads on where the
  killed one stopped). The run ends after its ``total_steps`` (the trainer's ``max_steps``),
  inside its last Lightning epoch when ``steps`` does not divide them.

In both modes every rank yields the same number of micro-batches per epoch,
``ceil(n / global_batch) * accumulation``. The G positions of a step are dealt round-robin over
the ``accumulation * world_size`` micro-batches of that step (so the padding of a padded last step
spreads over all of them instead of filling whole ones). Micro-batch ``a`` of rank ``r`` in a step
is slot ``k = a * world_size + r``: the union over ranks and accumulation of what a step reads is
the same global batch whatever the world size. Validation is always ``padded`` in file order
(every image exactly once across ranks).
"""

from __future__ import annotations

import math

import numpy as np

EPOCH_MODES = ("padded", "full_batch")


def _permutation(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int64)


def stream(n: int, start: int, stop: int, seed: int = 0, shuffle: bool = True) -> np.ndarray:
    """Positions ``[start, stop)`` of the full-batch stream: pass ``p`` covers positions
    ``[p*n, (p+1)*n)`` with the permutation seeded by ``(seed, p)``."""
    first, last = start // n, max(stop - 1, start) // n
    passes = np.concatenate([_permutation(n, seed, p, shuffle) for p in range(first, last + 1)])
    return passes[start - first * n : stop - first * n]


def epoch_plan(
    n: int,
    global_batch: int,
    micro_batch: int,
    world_size: int,
    rank: int,
    epoch: int = 0,
    seed: int = 0,
    shuffle: bool = True,
    mode: str = "padded",
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(index, real)`` for ``rank``: file index per position and a mask of real samples.

    Both have length ``steps * accumulation * micro_batch`` with ``steps = ceil(n / global_batch)``
    and ``accumulation = global_batch / (micro_batch * world_size)``. ``padded``: positions where
    ``real`` is False are padding (their ``index`` is a valid image, to be labelled -1).
    ``full_batch``: every position is real; ``epoch`` is Lightning's epoch, steps
    ``[epoch*steps, (epoch+1)*steps)`` of the stream (see the module doc).
    """
    if n <= 0:
        raise ValueError("epoch_plan: no images")
    if mode not in EPOCH_MODES:
        raise ValueError(f"epoch_plan: unknown epoch mode {mode!r}; choose one of {', '.join(EPOCH_MODES)}")
    slots = micro_batch * world_size
    if global_batch % slots:
        raise ValueError(f"global_batch {global_batch} is not a multiple of micro_batch*world_size {slots}")
    accum = global_batch // slots
    steps = math.ceil(n / global_batch)
    total = steps * global_batch
    index: np.ndarray  # both 1-D here, reshaped per step and slot below
    real: np.ndarray
    if mode == "full_batch":
        index = stream(n, epoch * total, (epoch + 1) * total, seed, shuffle)
        real = np.ones(total, dtype=bool)
    else:
        order = _permutation(n, seed, epoch, shuffle)
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


def plan_kwargs(
    train: bool, global_batch: int, micro_batch: int, world_size: int, rank: int, seed: int, epoch_mode: str = "padded"
) -> dict:
    """:func:`epoch_plan`'s arguments for a split: training steps the global batch over shuffled
    permutations in ``epoch_mode``; validation takes one micro-batch per rank at a time, in file
    order, padded (every image exactly once)."""
    return dict(
        global_batch=global_batch if train else micro_batch * world_size,
        micro_batch=micro_batch,
        world_size=world_size,
        rank=rank,
        seed=seed,
        shuffle=train,
        mode=epoch_mode if train else "padded",
    )


def micro_batches_per_rank(n: int, global_batch: int, micro_batch: int, world_size: int, **_) -> int:
    """Micro-batches each rank yields per epoch: ``ceil(n / global_batch) * accumulation`` (the
    length of :func:`epoch_plan` / ``micro_batch``, in both modes); extra keywords (rank, seed,
    mode, ...) are ignored."""
    return math.ceil(n / global_batch) * (global_batch // (micro_batch * world_size))
