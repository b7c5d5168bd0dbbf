"""What the layer-wise (trust-ratio) optimizers :class:`~resnet_lamb.optim.Lamb` and
:class:`~resnet_lamb.optim.Lars` share: argument checks, named parameters, the flat buffers their
step runs on, the eager/compiled switch and ``trust_ratios()``.

Flat buffers.  Per param group, device and dtype ("bucket"), the parameters, their gradients and
each optimizer state live in one flat buffer per kind, seen as ``[blocks, BLOCK]``: every tensor
starts on a block boundary and its last block is zero-padded.  ``p.data``, ``p.grad`` and each
state tensor are views into these buffers (same shape and strides as the parameter); the CPU
buffers ask for 2 MiB pages.  A step of a param group with layer adaptation is two passes
whatever the number of tensors:

1. phase 1, one pass: the moment update where the math allows it before the norms, and per-block
   partial norms of both tensors of the ratio, side by side (``[blocks, 2]``, a plain 2-D
   reduction, parallel over blocks);
2. phase 2: per-tensor norms as one segmented reduction of the block partials
   (``torch.segment_reduce``, deterministic on CPU and CUDA), the trust ratios, then one pass
   ``x -= lr * ratio[tensor of the block] * update``.

Compiled, that is one graph (one compiled call) where phase 1 only reads the buffers the apply
pass reads (classic LARS), else two (LAMB and paper LARS: phase 1 writes m or r, which the apply
pass reads; in one graph inductor would keep the new values in a fresh model-sized temporary).
The buckets of a step run smallest first, after every bucket's checks: on a CPU, Python run
after a model-sized pass finds its data evicted from the caches, so it runs before them where it
can.  The same functions serve every device: no device branch besides torch's fused shortcuts.

A group without adaptation (ratio 1) is one pass: torch's fused AdamW/SGD kernel on the whole
buffer where that is exactly the update, else phase 1 applies it.

Per-tensor coefficients (whether the tensor has a gradient this step, bias corrections from its
own step count) enter as a small ``[blocks, k]`` table, so tensors without a gradient are left
alone and tensors with different step counts share the buffers.

Robustness: each step checks (by data pointer) that every parameter and gradient is still the
expected view.  A parameter whose data was replaced (``module.to()``, ``p.data = ...``) is copied
back in and re-pointed if it owns its storage; one that is a view of someone else's buffer (FSDP,
tied storage) is never re-pointed: it is copied in before and out after each step.  A gradient
that is not the expected view (``zero_grad(set_to_none=True)`` then backward, DDP's
``gradient_as_bucket_view``) is copied in with one ``_foreach_copy_``; if it owns its storage, it is
replaced by the view, so the next backward accumulates straight into the buffer.  ``zero_grad()``
zeroes the gradient buffer in one op and keeps the views (see :meth:`LayerwiseOptimizer.zero_grad`).

Implementations, chosen by ``impl``: ``"compiled"`` runs the phase functions under
``torch.compile`` (inductor: C++/OpenMP loop nests on CPU, Triton kernels on CUDA, a few per
graph); ``"eager"`` runs the same functions op by op over chunks of blocks, no compiler needed; ``"auto"`` picks
``"compiled"`` where a compiler works for the parameters' device type (:func:`compiler_available`
probes that device's backend, once per type), else ``"eager"`` (one warning), and falls back to
eager if a compile fails.  lr, the step count and every float hyperparameter enter as small tensors, so an
LR schedule never recompiles.  State dicts are identical for both (per parameter: ``step``, a 0-dim
float32 CPU tensor, and the parameter-shaped state tensors).
"""

from __future__ import annotations

import ctypes
import functools
import math
import operator
import sys
import types
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.optim import Optimizer

#: elements per block of the flat buffers (a multiple of every SIMD width; ~0.5% padding on ResNet-50)
BLOCK = 1024
#: blocks the eager path processes at a time (see LayerwiseOptimizer._call)
EAGER_CHUNK_BLOCKS = 128
NORMS = ("l2", "l1", "inf")
_IMPLS = ("auto", "eager", "compiled")

_compiler_ok: dict[str, bool] = {}
_compiler_warned: set[str] = set()


def compiler_available(device_type: str = "cpu") -> bool:
    """True when torch.compile can build and run a tiny kernel on tensors of ``device_type``
    ("cpu", "cuda", ...: inductor's backend for that device; probed once per type)."""
    if device_type not in _compiler_ok:
        try:
            fn = torch.compile(lambda a, b: (a * b + 1.0).sum(), fullgraph=True)
            x = torch.ones(4, device=device_type)
            _compiler_ok[device_type] = bool(fn(x, x).item() == 8.0)
        except Exception:  # noqa: BLE001 - any failure means "no working compiler"
            _compiler_ok[device_type] = False
    return _compiler_ok[device_type]


def _resolve_impl(impl: str, device_type: str = "cpu") -> str:
    """``impl``, with "auto" resolved for parameters on ``device_type``."""
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {', '.join(_IMPLS)}; got {impl!r}")
    if impl == "auto":
        if compiler_available(device_type):
            return "compiled"
        if device_type not in _compiler_warned:
            warnings.warn(
                f"torch.compile is not usable for {device_type} tensors here; optimizers fall back to impl='eager'",
                stacklevel=4,
            )
            _compiler_warned.add(device_type)
        return "eager"
    return impl


# --------------------------------------------------------------------------------------------
# pieces of the phase functions (traced by torch.compile, or run eagerly)
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# flat buffers
# --------------------------------------------------------------------------------------------
#: storages of the flat buffers made here (any optimizer instance), by address, while they live:
#: a tensor in one may be re-pointed (it is ours), where a view of a foreign buffer may not
_OWNED: dict[int, StorageWeakRef] = {}


def _ours(storage: torch.UntypedStorage) -> bool:
    ref = _OWNED.get(storage.data_ptr())
    return ref is not None and not ref.expired()


_HUGE_PAGE = 2 << 20


def _advise_huge_pages(buf: torch.Tensor) -> None:
    """Ask Linux to back ``buf`` (not yet touched) with 2 MiB pages (``MADV_HUGEPAGE``, honoured
    when transparent huge pages are "madvise" or "always").  The step streams through every
    buffer; with 4 KiB pages the TLB misses cost 20-25% of a pass on a VM (nested page walks)."""
    if buf.device.type != "cpu" or not sys.platform.startswith("linux"):
        return
    start, end = buf.data_ptr(), buf.data_ptr() + buf.numel() * buf.element_size()
    a0, a1 = -(-start // _HUGE_PAGE) * _HUGE_PAGE, end // _HUGE_PAGE * _HUGE_PAGE
    if a1 > a0:
        try:
            _libc().madvise(ctypes.c_void_p(a0), ctypes.c_size_t(a1 - a0), 14)
        except (OSError, AttributeError):  # no libc madvise: 4 KiB pages, only slower
            pass


@functools.lru_cache(1)
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None)


def _new_flat(nb: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    for ptr in [k for k, ref in _OWNED.items() if ref.expired()]:
        del _OWNED[ptr]
    buf = torch.empty(nb, BLOCK, device=device, dtype=dtype)
    _advise_huge_pages(buf)
    buf.zero_()
    _OWNED[buf.untyped_storage().data_ptr()] = StorageWeakRef(buf.untyped_storage())
    torch._dynamo.maybe_mark_dynamic(buf, 0)
    return buf


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense (any dimension order, e.g. channels_last)."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride(), strict=True), key=lambda x: x[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, acc = [], 1
    for size in reversed(shape):
        strides.append(acc)
        acc *= max(size, 1)
    return tuple(reversed(strides))


_data_ptr = torch.Tensor.data_ptr
_grad = operator.attrgetter("grad")


def _owns_storage(t: torch.Tensor) -> bool:
    """``t`` spans its whole storage (nobody else can see part of it), or lives in a flat buffer."""
    st = t.untyped_storage()
    if _ours(st):
        return True
    return bool(t.storage_offset() == 0 and st.nbytes() == t.numel() * t.element_size() and _dense(t))


class FlatBucket:
    """The tensors of one param group on one device and dtype, with their gradients and state, in
    flat ``[blocks, BLOCK]`` buffers (see the module docstring)."""

    def __init__(
        self, idx: list[int], params: list[torch.Tensor], state_keys: tuple[str, ...], state: dict, coef_cols: int
    ):
        self.idx, self.params = idx, params
        p0 = params[0]
        dev, dt = p0.device, p0.dtype
        self.device, self.dtype, self.n = dev, dt, len(params)
        self.shapes = [p.shape for p in params]
        self.strides = [p.stride() if _dense(p) else _contiguous_strides(p.shape) for p in params]
        blocks = [max(1, -(-p.numel() // BLOCK)) for p in params]
        self.offsets, off = [], 0
        for b in blocks:
            self.offsets.append(off * BLOCK)
            off += b
        self.nb = off
        self.lengths = torch.tensor(blocks, device=dev)
        self.seg = torch.repeat_interleave(
            torch.arange(self.n, device=dev), self.lengths, output_size=self.nb
        )  # no device sync
        self.coef = torch.zeros(self.nb, coef_cols, device=dev)  # per block, see _fill_coef
        self.ones = torch.ones(self.n, device=dev)  # the ratios of a step without adaptation
        for t in (self.lengths, self.seg, self.coef):
            torch._dynamo.maybe_mark_dynamic(t, 0)
        self.p = _new_flat(self.nb, dev, dt)
        self.g = _new_flat(self.nb, dev, dt)
        self.bufs = {k: _new_flat(self.nb, dev, dt) for k in state_keys}
        self.steps = torch.zeros(self.n, dtype=torch.float32)
        self.p_views = self.views(self.p)
        self.g_views = self.views(self.g)
        self.buf_views = {k: self.views(b) for k, b in self.bufs.items()}
        self.g_ptrs = [v.data_ptr() for v in self.g_views]
        # parameters: copy in, re-point where allowed (tied storage among the params: never)
        storages = [p.untyped_storage().data_ptr() for p in params]
        shared = {
            s for s, p in zip(storages, params, strict=True) if storages.count(s) > 1 and not _ours(p.untyped_storage())
        }
        torch._foreach_copy_(self.p_views, params)
        self.p_ptrs: list[int] = []
        self.foreign: list[int] = []
        for i, p in enumerate(params):
            self._adopt(i, p, allowed=storages[i] not in shared)
        # state: whatever exists (loaded, or from earlier buffers) is copied in and re-pointed
        for i, p in enumerate(params):
            st = state.get(p)
            if st:
                self.steps[i] = float(st["step"])
                for k in state_keys:
                    self.buf_views[k][i].copy_(st[k])
                self._point_state(i, st)
        self.initialised = all(state.get(p) for p in params)
        self.all_active = [True] * self.n
        self.t: float | None = None  # the step count shared by every tensor, when known
        self.coef_row: list[float] | None = None  # what coef holds when one row fills it

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        flat1 = flat.view(-1)
        return [flat1.as_strided(s, st, o) for s, st, o in zip(self.shapes, self.strides, self.offsets, strict=True)]

    def _adopt(self, i: int, p: torch.Tensor, allowed: bool = True) -> None:
        """``p``'s values are in its region already: make p a view of it if p may be re-pointed."""
        if allowed and _owns_storage(p) and p.stride() == self.strides[i]:
            p.data = self.p_views[i]
            if i in self.foreign:
                self.foreign.remove(i)
        elif i not in self.foreign:
            self.foreign.append(i)
        ptr = p.data_ptr()
        if i < len(self.p_ptrs):
            self.p_ptrs[i] = ptr
        else:
            self.p_ptrs.append(ptr)

    def _point_state(self, i: int, st: dict) -> None:
        st["step"] = self.steps[i]
        for k, views in self.buf_views.items():
            st[k] = views[i]

    def init_state(self, active: list[bool], state: dict) -> None:
        """State entries (views, zero) for tensors stepped for the first time."""
        if self.initialised:
            return
        for i, (p, a) in enumerate(zip(self.params, active, strict=True)):
            if a and not state[p]:
                self._point_state(i, state[p])
        self.initialised = all(state[p] for p in self.params)

    def fits(self, params: list[torch.Tensor]) -> bool:
        """Same shapes, dtype, device and (dense tensors) strides as the buffers' views."""
        return all(
            p.shape == s and p.dtype == self.dtype and p.device == self.device and (p.stride() == st or not _dense(p))
            for p, s, st in zip(params, self.shapes, self.strides, strict=True)
        )

    def sync_params_in(self) -> bool:
        """Check every parameter is still the expected tensor; re-adopt the ones whose data was
        replaced; copy in the ones that are not views.  False: shapes/dtypes changed (rebuild)."""
        ptrs = list(map(_data_ptr, self.params))
        if ptrs != self.p_ptrs:
            if not self.fits(self.params):
                return False
            for i, (p, ptr) in enumerate(zip(self.params, ptrs, strict=True)):
                if ptr != self.p_ptrs[i]:
                    self.p_views[i].copy_(p)
                    self._adopt(i, p)
        if self.foreign:
            torch._foreach_copy_([self.p_views[i] for i in self.foreign], [self.params[i] for i in self.foreign])
        return True

    def sync_params_out(self) -> None:
        if self.foreign:
            torch._foreach_copy_([self.params[i] for i in self.foreign], [self.p_views[i] for i in self.foreign])

    def sync_grads(self) -> list[bool]:
        """Which tensors have a gradient; gradients that are not the buffer's views are copied
        in (one op) and, if they own their storage, replaced by the views."""
        grads = list(map(_grad, self.params))
        try:
            if list(map(_data_ptr, grads)) == self.g_ptrs:
                return self.all_active  # the usual step: every gradient is the buffer's view
        except TypeError:  # a gradient is None
            pass
        active, dst, src, idle = [], [], [], []
        for i, p in enumerate(self.params):
            g = p.grad
            if g is None:
                active.append(False)
                idle.append(self.g_views[i])
                continue
            if g.is_sparse:
                raise RuntimeError("layer-wise optimizers do not support sparse gradients")
            active.append(True)
            if g.data_ptr() != self.g_ptrs[i]:
                dst.append(self.g_views[i])
                src.append(g)
                if _owns_storage(g) and g.stride() == self.strides[i]:
                    p.grad = self.g_views[i]
        if dst:
            torch._foreach_copy_(dst, src)
        if idle and len(idle) < len(active):  # masked out; zero so no stale inf/nan meets a 0
            torch._foreach_zero_(idle)
        return active

    def grads_are_views(self) -> list[bool]:
        return [
            p.grad is not None and p.grad.data_ptr() == ptr for p, ptr in zip(self.params, self.g_ptrs, strict=True)
        ]


# --------------------------------------------------------------------------------------------
# argument checks shared by Lamb and Lars
# --------------------------------------------------------------------------------------------
def check_common(group: dict[str, Any]) -> None:
    lr_f = LayerwiseOptimizer._lr(group)
    if not math.isfinite(lr_f) or lr_f < 0:
        raise ValueError(f"lr must be a finite number >= 0; got {group['lr']!r}")
    wd = group["weight_decay"]
    if not (isinstance(wd, (int, float)) and math.isfinite(wd) and wd >= 0):
        raise ValueError(f"weight_decay must be a finite number >= 0; got {wd!r}")
    clip = group.get("trust_clip")
    if clip is not None:
        ok = (
            isinstance(clip, (tuple, list))
            and len(clip) == 2
            and all(isinstance(c, (int, float)) and c >= 0 for c in clip)
            and clip[0] <= clip[1]
        )
        if not ok:
            raise ValueError(f"trust_clip must be None or (lower, upper) with 0 <= lower <= upper; got {clip!r}")
    if not isinstance(group.get("layer_adaptation", True), bool):
        raise ValueError(f"layer_adaptation must be True or False; got {group.get('layer_adaptation')!r}")


# --------------------------------------------------------------------------------------------
# base class
# --------------------------------------------------------------------------------------------
class LayerwiseOptimizer(Optimizer):
    """Shared machinery of the layer-wise (trust-ratio) optimizers; not used directly.

    Subclasses set ``_state_keys`` and ``_coef_cols`` and implement :meth:`_group_constants`
    and :meth:`_bucket_step`."""

    _state_keys: tuple[str, ...] = ()
    #: columns of the per-tensor coefficient table (column 0: 1 if the tensor steps, else 0)
    _coef_cols: int = 1
    #: use torch's fused kernels where they compute exactly this update (tests switch it off
    #: to exercise the generic code on those groups too)
    _fast_cpu: bool = True

    def __init__(self, params: Iterable, defaults: dict[str, Any], impl: str = "auto"):
        defaults.setdefault("layer_adaptation", True)
        self._auto = impl == "auto"
        self.impl = _resolve_impl(impl) if not self._auto else impl
        self._last_ratios: dict[int, list[tuple[list[int], torch.Tensor, list[bool]]]] = {}
        self._flat: dict[int, tuple[tuple[int, ...], list[FlatBucket]]] = {}
        self._scalars: dict[tuple, torch.Tensor] = {}
        super().__init__(params, defaults)
        if self._auto:  # the compiler probed for the parameters' device, not always the CPU's
            first = next((p for g in self.param_groups for p in g["params"]), None)
            self.impl = _resolve_impl(impl, first.device.type if first is not None else "cpu")

    # step ---------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):  # type: ignore[override]
        """One update of every group, bucket by bucket; keeps the ratios (no sync) for
        :meth:`trust_ratios`.  The buckets are checked and counted first, then stepped smallest
        first: the Python of the small ones then runs before the big passes have evicted from
        the caches what it touches (on a CPU that costs more than the small passes)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []
        for gi, group in enumerate(self.param_groups):
            ctx = self._group_constants(group)
            self._last_ratios[gi] = []
            for bucket in self._buckets(gi, group):
                active = bucket.sync_grads()
                if not any(active):
                    continue
                bucket.init_state(active, self.state)
                if all(active):
                    bucket.steps.numpy()[:] += 1.0  # (numpy: no dispatcher on the hot path)
                    bucket.t = None if bucket.t is None else bucket.t + 1.0
                else:
                    bucket.steps.numpy()[:] += active
                    bucket.t = None
                work.append((bucket.nb, gi, group, ctx, bucket, active))
        for _nb, gi, group, ctx, bucket, active in sorted(work, key=operator.itemgetter(0)):
            ratio = self._bucket_step(group, ctx, bucket, active)
            bucket.sync_params_out()
            self._last_ratios[gi].append((bucket.idx, ratio, active))
        return loss

    def _buckets(self, gi: int, group: dict[str, Any]) -> list[FlatBucket]:
        """The group's buckets, built on first use and rebuilt when its parameters changed
        (list, shape, dtype or device); parameters checked and synced in."""
        key = tuple(map(id, group["params"]))
        cached = self._flat.get(gi)
        if cached is not None and cached[0] == key:
            if all(b.sync_params_in() for b in cached[1]):
                return cached[1]
        by_kind: dict[tuple, list[int]] = {}
        for i, p in enumerate(group["params"]):
            by_kind.setdefault((p.device, p.dtype), []).append(i)
        buckets = []
        for (_dev, _dt), idx in by_kind.items():
            ps = [group["params"][i] for i in idx]
            if not ps[0].is_floating_point():
                raise RuntimeError(f"{type(self).__name__} needs floating-point parameters; got {ps[0].dtype}")
            buckets.append(FlatBucket(idx, ps, self._state_keys, self.state, self._coef_cols))
        self._flat[gi] = (key, buckets)
        for b in buckets:
            b.sync_params_in()  # foreign parameters: values copied in for this step
        return buckets

    def _group_constants(self, group: dict[str, Any]) -> dict[str, Any]:  # pragma: no cover - overridden
        """What a group's buckets share; reads the lr once (a tensor lr costs a device sync)."""
        raise NotImplementedError

    def _bucket_step(
        self, group: dict[str, Any], ctx: dict[str, Any], bucket: FlatBucket, active: list[bool]
    ) -> torch.Tensor:  # pragma: no cover - overridden
        """Update the bucket's active tensors (step counts already advanced); returns the ratios."""
        raise NotImplementedError

    def _fill_coef(self, bucket: FlatBucket, active: list[bool], row: Callable[[float], list[float]]) -> bool:
        """Fill ``bucket.coef`` ([blocks, 1 + k]) with each block's tensor's row: 1 if the
        tensor steps (else 0), then ``row(t)`` for its step count t.  Returns True when every
        tensor steps at one t."""
        if bucket.t is None:
            steps = bucket.steps.tolist()
            if all(active) and min(steps) == max(steps):
                bucket.t = steps[0]
        if bucket.t is not None:
            values = [1.0, *row(bucket.t)]
            if values != bucket.coef_row:
                row_t = torch.tensor(values).to(bucket.device, non_blocking=True)
                bucket.coef.copy_(row_t.expand(bucket.nb, -1))
                bucket.coef_row = values
            return True
        # rows of idle tensors only need to be finite: they are multiplied by 0
        table = torch.tensor([[float(a), *row(max(t, 1.0))] for a, t in zip(active, steps, strict=True)])
        bucket.coef.copy_(table.to(bucket.device)[bucket.seg], non_blocking=True)
        bucket.coef_row = None
        return False

    def _call(self, fn: Callable, static: dict[str, Any], *args, chunked: int = 0):
        """``fn(*args, **static)``, compiled (impl "compiled") or eager; "auto" falls back to
        eager when compiling fails (a compile error surfaces before the phase writes anything).

        Eager, the first ``chunked`` args (all [blocks, ...]) are cut into ``EAGER_CHUNK_BLOCKS``
        blocks at a time and the outputs concatenated: the temporaries of op-by-op execution then
        stay small and in cache (a fresh buffer the size of the model costs a page fault per
        4 KiB)."""
        if self.impl == "compiled":
            try:
                return get_compiled(fn, static)(*args)
            except Exception as e:  # noqa: BLE001
                if not self._auto:
                    raise
                warnings.warn(
                    f"{type(self).__name__}: torch.compile failed ({type(e).__name__}: "
                    f"{e}); falling back to impl='eager'",
                    stacklevel=4,
                )
                self.impl = "eager"
        if not chunked:
            return fn(*args, **static)
        nb = args[0].shape[0]
        outs = []
        for a in range(0, nb, EAGER_CHUNK_BLOCKS):
            part = [x[a : a + EAGER_CHUNK_BLOCKS] if i < chunked and x is not None else x for i, x in enumerate(args)]
            outs.append(fn(*part, **static))
        if outs[0] is None:
            return None
        return torch.cat(outs)

    def _adapted_step(
        self,
        bucket: FlatBucket,
        c: torch.Tensor,
        bufs: tuple,
        phase1: Callable,
        p1kw: dict[str, Any],
        ratios: Callable,
        rkw: dict[str, Any],
        apply: Callable,
        akw: dict[str, Any],
        apply_bufs: tuple[int, ...],
        one_graph: bool,
    ) -> torch.Tensor:
        """A bucket's step with layer adaptation: ``phase1(*bufs, coef, c)`` -> block partials;
        per-tensor ratios; ``apply(*bufs[apply_bufs], coef, block_ratio, c)``.  Compiled with
        ``one_graph`` (phase 1 only reads what the apply pass reads): one graph for all of it
        (:func:`layerwise_step`); else phase 1, then :func:`ratio_then_apply`.  Eager: phase 1
        chunk by chunk, the ratios once, then the apply pass chunk by chunk.  Returns the
        ratios."""
        n = len(bufs)
        if self.impl == "compiled" and not one_graph:
            parts = self._call(phase1, p1kw, *bufs, bucket.coef, c)
            if self.impl == "compiled":
                torch._dynamo.maybe_mark_dynamic(parts, 0)
                static = dict(
                    ratios=ratios,
                    rkw=tuple(sorted(rkw.items())),
                    apply=apply,
                    akw=tuple(sorted(akw.items())),
                    n_buf=len(apply_bufs),
                )
                return self._call(
                    ratio_then_apply,
                    static,
                    *(bufs[i] for i in apply_bufs),
                    bucket.coef,
                    bucket.seg,
                    bucket.lengths,
                    c,
                    parts,
                )
            # phase 1 fell back to eager (and ran): the ratios and the apply pass, eagerly
            ratio = ratios(parts, bucket.lengths, c, **rkw)
            block_ratio = ratio[bucket.seg] * bucket.coef[:, 0]
            apply(*(bufs[i] for i in apply_bufs), bucket.coef, block_ratio, c, **akw)
            return ratio
        if self.impl == "compiled":
            static = dict(
                phase1=phase1,
                p1kw=tuple(sorted(p1kw.items())),
                ratios=ratios,
                rkw=tuple(sorted(rkw.items())),
                apply=apply,
                akw=tuple(sorted(akw.items())),
                apply_bufs=apply_bufs,
                n_buf=n,
            )
            # (should the compile fail under "auto", _call runs layerwise_step eagerly)
            return self._call(layerwise_step, static, *bufs, bucket.coef, bucket.seg, bucket.lengths, c)
        parts = self._call(phase1, p1kw, *bufs, bucket.coef, c, chunked=n + 1)
        ratio = ratios(parts, bucket.lengths, c, **rkw)
        block_ratio = ratio[bucket.seg] * bucket.coef[:, 0]
        self._call(apply, akw, *(bufs[i] for i in apply_bufs), bucket.coef, block_ratio, c, chunked=len(apply_bufs) + 2)
        return ratio

    def _group_scalars(self, values: list[float], device: torch.device) -> torch.Tensor:
        """The group's float hyperparameters as a float32 tensor on ``device``, made once per
        set of values (never written in place: an earlier step's kernels may still read it)."""
        key = (device, *values)
        c = self._scalars.get(key)
        if c is None:
            if len(self._scalars) >= 4 * len(self.param_groups):  # an lr schedule: keep it small
                self._scalars.clear()
            c = torch.tensor(values, dtype=torch.float32)
            c = c if device.type == "cpu" else c.to(device, non_blocking=True)
            self._scalars[key] = c
        return c

    # gradients ------------------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool | None = None) -> None:  # type: ignore[override]
        """Zero the gradients.

        Default (``None``): each bucket's gradient buffer is zeroed in one op and the gradients
        that are its views stay (the next backward accumulates into them, the step copies
        nothing); other gradients are set to None, as torch does.  A tensor that then gets no
        gradient in backward is stepped with a zero gradient, as torch's optimizers do after
        ``zero_grad(set_to_none=False)``.  ``True``: every gradient set to None (tensors without
        a gradient are skipped by the step; the next step copies the new gradients in).
        ``False``: every gradient zeroed in place."""
        if set_to_none:
            return super().zero_grad(set_to_none=True)
        kept: set[int] = set()
        for _key, buckets in self._flat.values():
            for b in buckets:
                views = b.grads_are_views()
                if any(views):
                    b.g.zero_()
                    kept.update(id(p) for p, v in zip(b.params, views, strict=True) if v)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or id(p) in kept:
                    continue
                if set_to_none is None:
                    p.grad = None
                else:
                    if p.grad.grad_fn is not None:
                        p.grad.detach_()
                    else:
                        p.grad.requires_grad_(False)
                    p.grad.zero_()

    # state ------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._flat = {}  # the next step copies the loaded state into fresh buffers

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._check_group(self.param_groups[-1])

    def _check_group(self, group: dict[str, Any]) -> None:  # pragma: no cover - overridden
        check_common(group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_last_ratios", {})
        self.__dict__.setdefault("impl", "eager")
        self.__dict__.setdefault("_auto", False)
        self.__dict__.setdefault("_flat", {})
        self.__dict__.setdefault("_scalars", {})

    # names ------------------------------------------------------------------------------
    def param_names(self) -> list[list[str]]:
        """Per group, the parameter names (given names, else ``g{group}.p{index}``)."""
        out = []
        for gi, group in enumerate(self.param_groups):
            names = group.get("param_names")
            out.append(list(names) if names else [f"g{gi}.p{i}" for i in range(len(group["params"]))])
        return out

    def trust_ratios(self) -> dict[str, torch.Tensor]:
        """The trust ratio each parameter used at its last step (0-dim tensors, no sync, no pass
        over parameter memory: views of the ratios the step already computed)."""
        names = self.param_names()
        out: dict[str, torch.Tensor] = {}
        for gi, done in sorted(self._last_ratios.items()):
            for idx, ratios, active in done:
                for j, (i, a) in enumerate(zip(idx, active, strict=True)):
                    if a:
                        out[names[gi][i]] = ratios[j]
        return out

    @staticmethod
    def _lr(group: dict[str, Any]) -> float:
        lr = group["lr"]
        return float(lr) if not isinstance(lr, torch.Tensor) else float(lr.detach().cpu())
