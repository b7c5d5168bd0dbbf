"""The functions a layer-wise step is made of (:mod:`resnet_lamb.optim.layerwise`): the trust
ratio, block partials of the norms, their segmented reduction, the apply pass, the whole step as
one graph, and the process-wide cache of their compiled versions.  They run eagerly or under
``torch.compile``; buffers are ``[blocks, BLOCK]`` (:mod:`resnet_lamb.optim.flat`)."""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch

NORMS = ("l2", "l1", "inf")


def phi(w_norm: torch.Tensor, lo, hi, clip: bool) -> torch.Tensor:
    """The paper's scaling function: phi(z) = z, or min(max(z, lower), upper) with a trust clip."""
    return torch.clamp(w_norm, lo, hi) if clip else w_norm


def trust_ratio(w_norm: torch.Tensor, u_norm: torch.Tensor, lo, hi, clip: bool) -> torch.Tensor:
    """phi(||x||)/||u|| per tensor; 1 only where phi(||x||) = 0 or ||u|| = 0.  With a clip whose
    lower bound is > 0, an all-zero tensor gets lower/||u||."""
    num = phi(w_norm, lo, hi, clip)
    ok = (num > 0) & (u_norm > 0)
    return torch.where(ok, num / torch.where(ok, u_norm, 1.0), 1.0)


def block_partials(x: torch.Tensor, norm: str) -> torch.Tensor:
    """Per block of ``x`` ([blocks, BLOCK]): sum of squares (l2), sum of |x| (l1) or max |x| (inf),
    in float32."""
    x = x.float()  # no-op for float32; bf16/fp16 squared in float32
    if norm == "l2":
        return (x * x).sum(1)
    if norm == "l1":
        return x.abs().sum(1)
    return x.abs().amax(1)


def pair_partials(x: torch.Tensor, u: torch.Tensor, norm: str) -> torch.Tensor:
    """The block partials of ``x`` and ``u`` side by side, [blocks, 2]: one segmented reduction
    then gives both norms of every tensor."""
    return torch.stack((block_partials(x, norm), block_partials(u, norm)), 1)


def apply_update(p, u, coef, block_ratio, c) -> None:
    """Phase 2 of Lamb and Lars (paper): x -= lr * ratio * u, block by block (c[0] = lr;
    ``block_ratio`` is 0 on the blocks of tensors that do not step)."""
    p.sub_(u * (block_ratio * c[0]).unsqueeze(1))


def layerwise_step(
    *args,
    phase1: Callable,
    p1kw: tuple,
    ratios: Callable,
    rkw: tuple,
    apply: Callable,
    akw: tuple,
    apply_bufs: tuple[int, ...],
    n_buf: int,
) -> torch.Tensor:
    """A bucket's whole adapted step as one graph (compiled path; one compiled call, so one set
    of guards and wrappers per step).  ``args`` = the bucket's buffers (``n_buf``), then coef,
    seg, lengths and c: ``phase1(*buffers, coef, c)`` gives the block partials, ``ratios`` the
    per-tensor ratios, spread over the blocks (0 where a tensor does not step), then
    ``apply(*buffers[apply_bufs], coef, block_ratio, c)``.  Inductor emits the two passes as two
    loop nests with the segmented reduction between them."""
    bufs, (coef, seg, lengths, c) = args[:n_buf], args[n_buf:]
    parts = phase1(*bufs, coef, c, **dict(p1kw))
    ratio = ratios(parts, lengths, c, **dict(rkw))
    block_ratio = ratio[seg] * coef[:, 0]
    apply(*(bufs[i] for i in apply_bufs), coef, block_ratio, c, **dict(akw))
    return ratio


def ratio_then_apply(*args, ratios: Callable, rkw: tuple, apply: Callable, akw: tuple, n_buf: int) -> torch.Tensor:
    """Phase 2 as one graph, for a phase 1 that wrote a buffer the apply pass reads (compiled in
    one graph with phase 1, inductor would keep that buffer's new value in a fresh
    model-sized temporary and copy it back in the apply pass).  ``args`` = apply's buffers
    (``n_buf``), then coef, seg, lengths, c and the block partials ([blocks, 2])."""
    bufs, (coef, seg, lengths, c, parts) = args[:n_buf], args[n_buf:]
    ratio = ratios(parts, lengths, c, **dict(rkw))
    block_ratio = ratio[seg] * coef[:, 0]
    apply(*bufs, coef, block_ratio, c, **dict(akw))
    return ratio


def segment_norms(partials: torch.Tensor, lengths: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-tensor norms from block partials ([blocks] or [blocks, k] -> [tensors] or
    [tensors, k]); ``lengths`` = blocks per tensor."""
    if norm == "inf":
        return torch.segment_reduce(partials, "max", lengths=lengths)
    total = torch.segment_reduce(partials, "sum", lengths=lengths)
    return total.sqrt() if norm == "l2" else total


# --------------------------------------------------------------------------------------------
# compiled functions
# --------------------------------------------------------------------------------------------
_COMPILED: dict[tuple, Callable] = {}


def get_compiled(fn: Callable, static: dict[str, Any]) -> Callable:
    """Process-wide compiled phase functions, shared by every optimizer instance.

    Each (``fn``, static options, thread count) gets its own copy of ``fn``'s code object, so
    dynamo's per-code cache and recompile limit count only the variants of one configuration
    (inductor bakes the OpenMP thread count into CPU kernels, hence the thread count in the key).
    The block dimension of the buffers is marked dynamic, so one graph serves every model size.
    """
    key = (fn, tuple(sorted(static.items())), torch.get_num_threads())
    if key not in _COMPILED:
        tag = "_".join(f"{k}{getattr(v, '__name__', v)}" for k, v in sorted(static.items()))
        tag = "".join(ch if ch.isalnum() else "_" for ch in tag) + f"_t{key[2]}"
        code = fn.__code__.replace(co_name=f"{fn.__name__}__{tag}")
        clone = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
        clone.__kwdefaults__ = {**(fn.__kwdefaults__ or {}), **static}
        _COMPILED[key] = torch.compile(clone, fullgraph=True)
    return _COMPILED[key]
