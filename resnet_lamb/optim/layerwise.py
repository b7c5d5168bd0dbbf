"""What the layer-wise (trust-ratio) optimizers :class:`~resnet_lamb.optim.Lamb` and
:class:`~resnet_lamb.optim.Lars` share: argument checks, named parameters, the flat buffers their
step runs on, the eager/compiled switch and ``trust_ratios()``.

The step runs on flat buffers (:mod:`resnet_lamb.optim.flat`: per param group, device and dtype,
one ``[blocks, BLOCK]`` buffer per kind, the tensors views into them).  A step of a param group
with layer adaptation is two passes whatever the number of tensors:

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

The functions a step is made of are :mod:`resnet_lamb.optim.kernels`.

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

import math
import operator
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from resnet_lamb.optim.flat import FlatBucket
from resnet_lamb.optim.kernels import get_compiled, layerwise_step, ratio_then_apply

#: blocks the eager path processes at a time (see LayerwiseOptimizer._call)
EAGER_CHUNK_BLOCKS = 128
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
# argument checks shared by Lamb and Lars
# --------------------------------------------------------------------------------------------
def group_defaults(init_locals: dict[str, Any]) -> dict[str, Any]:
    """A subclass constructor's ``locals()``: its hyperparameters (every argument but ``params``
    and ``impl``), the param groups' defaults."""
    return {k: v for k, v in init_locals.items() if k not in ("self", "params", "impl", "__class__")}


def check_common(group: dict[str, Any]) -> None:
    lr_f = LayerwiseOptimizer._lr_as_float(group)
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

    def _fused_update(self, group: dict[str, Any], bucket: FlatBucket) -> tuple[Callable, list, dict[str, Any]] | None:
        """The torch fused kernel that computes exactly the group's update with ratio 1, its
        state lists (after ``[params], [grads]``) and its options (besides lr, weight_decay and
        maximize); None where there is none."""
        return None

    def _fused_step(self, group: dict[str, Any], ctx: dict[str, Any], bucket: FlatBucket, uniform: bool) -> bool:
        """Ratio 1 everywhere (no adaptation, every tensor at one step count) and a fused kernel
        that is exactly the update (:meth:`_fused_update`): that kernel over the whole flat buffer.
        False where it does not apply (then the phase functions step)."""
        if not (uniform and not group["layer_adaptation"] and self._fast_cpu and bucket.device.type in ("cpu", "cuda")):
            return False
        fused = self._fused_update(group, bucket)
        if fused is None:
            return False
        kernel, state, options = fused
        wd = group["weight_decay"]
        kernel([bucket.p], [bucket.g], *state, lr=ctx["lr"], weight_decay=wd, maximize=False, **options)
        return True

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
    def _lr_as_float(group: dict[str, Any]) -> float:
        lr = group["lr"]
        return float(lr) if not isinstance(lr, torch.Tensor) else float(lr.detach().cpu())
