"""The flat buffers of the layer-wise optimizers (:mod:`resnet_lamb.optim.layerwise`).

Per param group, device and dtype ("bucket"), the parameters, their gradients and each optimizer
state live in one flat buffer per kind, seen as ``[blocks, BLOCK]``: every tensor starts on a block
boundary and its last block is zero-padded.  ``p.data``, ``p.grad`` and each state tensor are views
into these buffers (same shape and strides as the parameter); the CPU buffers ask for 2 MiB pages.

Robustness: each step checks (by data pointer) that every parameter and gradient is still the
expected view.  A parameter whose data was replaced (``module.to()``, ``p.data = ...``) is copied
back in and re-pointed if it owns its storage; one that is a view of someone else's buffer (FSDP,
tied storage) is never re-pointed: it is copied in before and out after each step.  A gradient
that is not the expected view (``zero_grad(set_to_none=True)`` then backward, DDP's
``gradient_as_bucket_view``) is copied in with one ``_foreach_copy_``; if it owns its storage, it is
replaced by the view, so the next backward accumulates straight into the buffer.  ``zero_grad()``
zeroes the gradient buffer in one op and keeps the views (see :meth:`LayerwiseOptimizer.zero_grad`).

"""

from __future__ import annotations

import ctypes
import functools
import operator
import sys

import torch
from torch.multiprocessing.reductions import StorageWeakRef

#: elements per block of the flat buffers (a multiple of every SIMD width; ~0.5% padding on ResNet-50)
BLOCK = 1024


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
