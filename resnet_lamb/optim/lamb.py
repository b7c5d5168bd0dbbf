"""LAMB (You et al. 2020, "Large Batch Optimization for Deep Learning", Algorithm 2) and its
Nesterov variants N-LAMB / NN-LAMB (Algorithms 3-4, Appendix D).

Also holds :class:`LayerwiseOptimizer`, the base shared with :class:`resnet_lamb.optim.Lars`:
argument checks, named parameters, bucketing, the eager/compiled implementation switch and
``trust_ratios()``.

Two implementations of one update, selected by ``impl``:

* ``"eager"``: multi-tensor ``torch._foreach_*`` ops (norms by ``torch._foreach_norm``), a few
  whole-model passes, no compiler needed.
* ``"compiled"``: the per-tensor update under ``torch.compile(fullgraph=True)``.
  On CPU: shape-generic (``dynamic=True``) kernels on flat 1-D aliases of each tensor, compiled
  once per option set for any model; per tensor one fused loop updates m and v, writes r to a
  reusable scratch buffer and reduces both norms, then one eager ``add_`` applies
  ``x -= lr*ratio*r`` (two passes: the floor, as the update norm is needed before the update).
  On GPU: one compiled graph (static shapes) per bucket of tensors, fewer Python calls and launches
  than per-tensor kernels; whether inductor fuses across tensors is not checked here (no CUDA graphs).
  lr, step and every float hyperparameter enter as one small float32 tensor, so an LR schedule
  that changes lr every step does not recompile; dynamo's cache plus inductor's on-disk caches
  keep the one-time compile cost to a few seconds per option set.
* ``"auto"`` (default): ``"compiled"`` when a working compiler is present, else ``"eager"``
  (one warning); a compile failure at the first step also falls back to eager with a warning.

Both impls: groups with ``layer_adaptation=False`` (ratio 1 everywhere) whose update is exactly
AdamW's (plain LAMB, bias correction on) run torch's fused AdamW kernel on CPU.

State per parameter (identical for both impls, loadable across them): ``step`` (0-dim float32
CPU tensor), ``exp_avg``, ``exp_avg_sq``.
"""
from __future__ import annotations

import math
import types
import warnings
from collections import defaultdict
from typing import Any, Callable, Iterable

import torch
from torch.optim import Optimizer

_NORMS = {"l2": 2.0, "l1": 1.0, "inf": math.inf}
_IMPLS = ("auto", "eager", "compiled")

_compiler_ok: dict[str, bool] = {}
_compiler_warned = False


def compiler_available(device_type: str = "cpu") -> bool:
    """True when torch.compile (inductor) can build and run a tiny kernel on ``device_type``'s
    backend (C++/OpenMP for cpu, Triton for cuda), probed once per device type."""
    if device_type not in _compiler_ok:
        try:
            fn = torch.compile(lambda a, b: (a * b + 1.0).sum(), fullgraph=True)
            x = torch.ones(4, device=device_type)
            _compiler_ok[device_type] = bool(fn(x, x).item() == 8.0)
        except Exception:  # noqa: BLE001 - any failure means "no working compiler"
            _compiler_ok[device_type] = False
    return _compiler_ok[device_type]


def _resolve_impl(impl: str, device_type: str = "cpu") -> str:
    global _compiler_warned
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {', '.join(_IMPLS)}; got {impl!r}")
    if impl == "auto":
        if compiler_available(device_type):
            return "compiled"
        if not _compiler_warned:
            warnings.warn("torch.compile is not usable here; optimizers fall back to impl='eager'",
                          stacklevel=3)
            _compiler_warned = True
        return "eager"
    return impl


def _phi(norm: torch.Tensor, clip: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    return norm if clip is None else torch.clamp(norm, clip[0], clip[1])


def trust_ratio(w_norm: torch.Tensor, u_norm: torch.Tensor, clip, adapt: bool) -> torch.Tensor:
    """phi(||x||)/||u|| elementwise over stacked norms; 1 where either norm is 0 or not adapting."""
    if not adapt:
        return torch.ones_like(w_norm)
    ok = (w_norm > 0) & (u_norm > 0)
    return torch.where(ok, _phi(w_norm, clip) / torch.where(ok, u_norm, 1.0), 1.0)


# --------------------------------------------------------------------------------------------
# the LAMB update of one bucket (tensors of one device/dtype/step)
# --------------------------------------------------------------------------------------------
def lamb_coefficients(lr: float, t: float, b1: float, b2: float, eps: float, wd: float,
                      lo: float, hi: float, bias_correction: bool,
                      nesterov: str | None) -> list[float]:
    """Per-step scalars (computed in double precision), shared by both impls:
    [lr, 1-b1, b2, 1-b2, c_m, c_g, c_v, c_vg, eps, wd, lo, hi] with
    m_hat = c_m*m + c_g*g and v_hat = c_v*v + c_vg*g^2."""
    if nesterov:
        c_m, c_g = b1 / (1.0 - b1 ** (t + 1)), (1.0 - b1) / (1.0 - b1 ** t)
    elif bias_correction:
        c_m, c_g = 1.0 / (1.0 - b1 ** t), 0.0
    else:
        c_m, c_g = 1.0, 0.0
    if nesterov == "nn":
        c_v, c_vg = b2 / (1.0 - b2 ** (t + 1)), (1.0 - b2) / (1.0 - b2 ** t)
    elif bias_correction or nesterov:
        c_v, c_vg = 1.0 / (1.0 - b2 ** t), 0.0
    else:
        c_v, c_vg = 1.0, 0.0
    return [lr, 1.0 - b1, b2, 1.0 - b2, c_m, c_g, c_v, c_vg, eps, wd, lo, hi]


def _lamb_bucket(params: list[torch.Tensor], grads: list[torch.Tensor],
                 exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor],
                 c: list[float], *, norm_ord: float, clip: bool, nesterov: str | None,
                 adapt: bool, has_wd: bool) -> torch.Tensor:
    """Eager multi-tensor form (``c`` from :func:`lamb_coefficients`). Returns the stacked
    trust ratios (float32, one per tensor)."""
    lr, omb1, b2, omb2, c_m, c_g, c_v, c_vg, eps, wd, lo, hi = c
    torch._foreach_lerp_(exp_avgs, grads, omb1)
    torch._foreach_mul_(exp_avg_sqs, b2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, omb2)
    if nesterov == "nn":
        den = torch._foreach_mul(exp_avg_sqs, c_v)
        torch._foreach_addcmul_(den, grads, grads, c_vg)
        torch._foreach_sqrt_(den)
    else:
        den = torch._foreach_sqrt(exp_avg_sqs)
        if c_v != 1.0:
            torch._foreach_mul_(den, math.sqrt(c_v))
    torch._foreach_add_(den, eps)
    if nesterov:
        upd = torch._foreach_mul(exp_avgs, c_m)
        torch._foreach_add_(upd, grads, alpha=c_g)
        torch._foreach_div_(upd, den)
    else:
        upd = torch._foreach_div(exp_avgs, den)
        if c_m != 1.0:
            torch._foreach_mul_(upd, c_m)
    del den
    if has_wd:
        torch._foreach_add_(upd, params, alpha=wd)
    if adapt:
        w_norm = torch.stack(torch._foreach_norm(params, norm_ord)).float()
        u_norm = torch.stack(torch._foreach_norm(upd, norm_ord)).float()
        ratio = trust_ratio(w_norm, u_norm, (lo, hi) if clip else None, True)
        scale = (ratio * -lr).to(params[0].dtype)
        torch._foreach_addcmul_(params, upd, list(scale.unbind(0)))
    else:
        ratio = torch.ones(len(params), device=params[0].device)
        torch._foreach_add_(params, upd, alpha=-lr)
    return ratio


def _norm(x: torch.Tensor, norm_ord: float) -> torch.Tensor:
    if norm_ord == 2.0:
        return torch.sqrt((x * x).sum(dtype=torch.float32))
    if norm_ord == 1.0:
        return x.abs().sum(dtype=torch.float32)
    return x.abs().amax().float()


def _lamb_tensor(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
                 scratch: torch.Tensor | None, c: torch.Tensor, *, norm_ord: float, clip: bool,
                 nesterov: str | None, adapt: bool, has_wd: bool,
                 apply: bool = True) -> torch.Tensor:
    """Per-tensor form of :func:`_lamb_bucket`, what the compiled path fuses: one loop updates
    the moments, writes r to ``scratch`` and reduces both norms; a second writes x.  ``c`` is a
    float32 tensor, so changing lr/step does not recompile.

    apply=False (CPU): r goes to ``scratch`` (written in the first loop, as m and v are) and the
    caller applies ``x -= lr*ratio*r`` with one eager ``add_``; applying it here would make
    inductor stage r in a fresh temporary (allocation + page faults on big tensors)."""
    lr, omb1, b2, omb2, c_m, c_g, c_v, c_vg, eps, wd, lo, hi = c.unbind(0)
    m.lerp_(g, omb1.to(m.dtype))
    v.mul_(b2).add_(g * g * omb2)
    if nesterov == "nn":
        den = torch.sqrt(v * c_v + g * g * c_vg) + eps
    else:
        den = torch.sqrt(v * c_v) + eps
    num = m * c_m + g * c_g if nesterov else m * c_m
    u = num / den
    if has_wd:
        u = u + wd * p
    if adapt:
        ratio = trust_ratio(_norm(p, norm_ord), _norm(u, norm_ord),
                            (lo, hi) if clip else None, True)
    else:
        ratio = torch.ones((), device=p.device)
    if apply:
        p.sub_(u * (ratio * lr).to(p.dtype))
    else:
        scratch.copy_(u)
    return ratio


def _lamb_list(params, grads, exp_avgs, exp_avg_sqs, c, **kw):
    """Whole-bucket graph (GPU path): one compiled graph over the bucket's tensors."""
    return torch.stack([_lamb_tensor(p, g, m, v, None, c, **kw)
                        for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs)])


_COMPILED: dict[tuple, Callable] = {}
#: on CPU, tensors with fewer elements take the eager multi-tensor form (see _run_compiled)
SMALL_NUMEL = 16384


def get_compiled(fn: Callable, dynamic: bool, static: dict[str, Any]) -> Callable:
    """Process-wide compiled step functions, shared by every optimizer instance.

    Each (``fn``, static options) pair gets its own copy of ``fn``'s code object, so dynamo's
    per-code cache and recompile limit count only the shape variants of one configuration.
    dynamic=True (CPU): ``fn`` is the per-tensor update; shape-generic kernels on flat aliases,
    compiled once for any model (a few variants: size ranges, 1-element tensors) and called per
    tensor.  dynamic=False (GPU): ``fn`` is the whole-bucket list function, one static graph per
    bucket (launch count matters there, not Python call overhead).
    """
    key = (fn, dynamic, tuple(sorted(static.items())))
    if key not in _COMPILED:
        tag = "_".join(f"{k}{v}" for k, v in sorted(static.items())).replace(".", "p")
        tag = "".join(ch if ch.isalnum() else "_" for ch in tag)
        code = fn.__code__.replace(co_name=f"{fn.__name__}__{tag}")
        clone = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__,
                                   fn.__closure__)
        clone.__kwdefaults__ = {**(fn.__kwdefaults__ or {}), **static}
        _COMPILED[key] = torch.compile(clone, fullgraph=True, dynamic=dynamic)
    return _COMPILED[key]


def _alias(t: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """A flat 1-D alias of ``t``'s dense memory that is not a view (no ``_base``): dynamo then
    guards on this tensor's own size only, not on the shape of whatever it aliases."""
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(
        t.untyped_storage(), t.storage_offset(), (t.numel() if n is None else n,), (1,))


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense (any dimension order, e.g. channels_last)."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda x: x[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def _flat(ts: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """1-D aliases of same-layout dense tensors (channels_last included); as-is otherwise."""
    p = ts[0]
    if all(t.is_contiguous() for t in ts):
        return tuple(_alias(t) for t in ts)
    if _dense(p) and all(t.stride() == p.stride() for t in ts):
        return tuple(_alias(t) for t in ts)
    return ts


# --------------------------------------------------------------------------------------------
# base class
# --------------------------------------------------------------------------------------------
def _check_common(group: dict[str, Any]) -> None:
    lr_f = LayerwiseOptimizer._lr(group)
    if not math.isfinite(lr_f) or lr_f < 0:
        raise ValueError(f"lr must be a finite number >= 0; got {group['lr']!r}")
    wd = group["weight_decay"]
    if not (isinstance(wd, (int, float)) and math.isfinite(wd) and wd >= 0):
        raise ValueError(f"weight_decay must be a finite number >= 0; got {wd!r}")
    eps = group["eps"]
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0; got {eps!r}")
    clip = group.get("trust_clip")
    if clip is not None:
        ok = (isinstance(clip, (tuple, list)) and len(clip) == 2
              and all(isinstance(c, (int, float)) and c >= 0 for c in clip) and clip[0] <= clip[1])
        if not ok:
            raise ValueError(f"trust_clip must be None or (lower, upper) with 0 <= lower <= upper; "
                             f"got {clip!r}")
    if not isinstance(group.get("layer_adaptation", True), bool):
        raise ValueError(f"layer_adaptation must be True or False; got "
                         f"{group.get('layer_adaptation')!r}")


class LayerwiseOptimizer(Optimizer):
    """Shared machinery of the layer-wise (trust-ratio) optimizers; not used directly."""

    _state_keys: tuple[str, ...] = ()
    #: use torch's fused CPU kernels where they compute exactly this update (tests switch it off
    #: to exercise the generic foreach / compiled code on CPU too)
    _fast_cpu: bool = True
    #: compiled impl on CPU tensors: take the route CUDA tensors take (one whole-bucket graph,
    #: ``fn_list``) instead of the per-tensor CPU kernels (tests switch it on)
    _bucket_graph: bool = False

    def __init__(self, params: Iterable, defaults: dict[str, Any], impl: str = "auto"):
        defaults.setdefault("layer_adaptation", True)
        self._auto = impl == "auto"
        self._last_ratios: dict[int, tuple[list[int], torch.Tensor]] = {}
        self._scratch: dict[tuple, torch.Tensor] = {}
        self._progress = 0
        super().__init__(params, defaults)
        # the compiler is probed on the backend of the parameters' device
        device = next((p.device.type for g in self.param_groups for p in g["params"]), "cpu")
        self.impl = _resolve_impl(impl, device)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):  # type: ignore[override]
        """One update of every group, bucket by bucket (:meth:`_buckets`); keeps each bucket's
        ratios (0-dim views, no sync) for :meth:`trust_ratios`."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            ctx = self._group_constants(group)
            idx_all: list[int] = []
            ratios: list[torch.Tensor] = []
            for (dev, _dt, t), idx in self._buckets(group).items():
                ratios.append(self._bucket_step(group, ctx, [group["params"][i] for i in idx], dev, t))
                idx_all.extend(idx)
            if idx_all:
                self._last_ratios[gi] = (idx_all, ratios[0] if len(ratios) == 1
                                         else torch.cat([r.to(ratios[0].device) for r in ratios]))
        return loss

    def _group_constants(self, group: dict[str, Any]) -> dict[str, Any]:  # pragma: no cover - overridden
        """What a group's buckets share; reads the lr once (a tensor lr costs a device sync)."""
        raise NotImplementedError

    def _bucket_step(self, group: dict[str, Any], ctx: dict[str, Any], ps: list[torch.Tensor],
                     dev: torch.device, t: float) -> torch.Tensor:  # pragma: no cover - overridden
        """Update the bucket's tensors ``ps`` (step ``t`` after this one); returns their ratios."""
        raise NotImplementedError

    def _check_group(self, group: dict[str, Any]) -> None:  # pragma: no cover - overridden
        _check_common(group)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._check_group(self.param_groups[-1])

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_last_ratios", {})
        self.__dict__.setdefault("impl", "eager")
        self.__dict__.setdefault("_auto", False)
        self.__dict__.setdefault("_scratch", {})
        self.__dict__.setdefault("_progress", 0)

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
        for gi, (idx, ratios) in sorted(self._last_ratios.items()):
            for j, i in enumerate(idx):
                out[names[gi][i]] = ratios[j]
        return out

    # buckets ----------------------------------------------------------------------------
    def _init_state(self, p: torch.Tensor, state: dict[str, Any]) -> None:
        state["step"] = torch.zeros((), dtype=torch.float32)
        for k in self._state_keys:
            state[k] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _buckets(self, group: dict[str, Any]):
        """Tensors with a grad, split by (device, dtype, step) so scalars are per bucket."""
        idx = []
        for i, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            state = self.state[p]
            if len(state) == 0:
                self._init_state(p, state)
            idx.append(i)
        buckets: dict[tuple, list[int]] = defaultdict(list)
        if not idx:
            return buckets
        steps = [self.state[group["params"][i]]["step"] for i in idx]
        torch._foreach_add_(steps, 1.0)
        values = torch.stack(steps).tolist() if len(steps) > 1 else [float(steps[0])]
        for i, t in zip(idx, values):
            p = group["params"][i]
            buckets[(p.device, p.dtype, t)].append(i)
        return buckets

    def _scratch_for(self, dev: torch.device, dtype: torch.dtype, n: int) -> torch.Tensor:
        key = (dev, dtype)
        buf = self._scratch.get(key)
        if buf is None or buf.numel() < n:
            buf = torch.empty(n, device=dev, dtype=dtype)
            self._scratch[key] = buf
        return buf

    def _run_bucket(self, fn_eager: Callable, fn_tensor: Callable, fn_list: Callable,
                    tensors: tuple, c: list[float], scratch: bool, split: bool = False,
                    **kw) -> torch.Tensor:
        if self.impl != "compiled":
            return fn_eager(*tensors, c, **kw)
        self._progress = 0
        try:
            return self._run_compiled(fn_eager, fn_tensor, fn_list, tensors, c, scratch, split,
                                      kw)
        except Exception as e:  # noqa: BLE001 - a compile error surfaces before its tensor's write
            if not self._auto or self._progress:  # explicit "compiled", or tensors already written
                raise
            warnings.warn(f"{type(self).__name__}: torch.compile failed ({type(e).__name__}: "
                          f"{e}); falling back to impl='eager'", stacklevel=3)
            self.impl = "eager"
            return fn_eager(*tensors, c, **kw)

    def _run_compiled(self, fn_eager: Callable, fn_tensor: Callable, fn_list: Callable,
                      tensors: tuple, c: list[float], scratch: bool, split: bool,
                      kw: dict) -> torch.Tensor:
        p0 = tensors[0][0]
        ct = torch.tensor(c, dtype=torch.float32)
        if p0.device.type != "cpu" or self._bucket_graph:
            ct = ct.to(p0.device, non_blocking=True)
            # the list functions take their options as **kw, which the clone's keyword defaults do not fill
            return get_compiled(fn_list, False, kw)(*tensors, ct, **kw)
        n = len(tensors[0])
        # tiny tensors (BatchNorm, biases): the multi-tensor eager form in one batch costs less
        # than a compiled call each; the rest: one compiled call per tensor (compiled ones
        # first, so a compile failure leaves every tensor unwritten for the eager fallback)
        small = [i for i in range(n) if tensors[0][i].numel() < SMALL_NUMEL]
        large = [i for i in range(n) if tensors[0][i].numel() >= SMALL_NUMEL]
        r_large = r_small = None
        if large:
            fn = get_compiled(fn_tensor, True, dict(kw, apply=False) if split else kw)
            cols = [[x[i] for i in large] for x in tensors if x is not None]
            rows = [_flat(row) for row in zip(*cols)]
            buf = (self._scratch_for(p0.device, p0.dtype, max(r[0].numel() for r in rows))
                   if scratch else None)
            out: list[torch.Tensor] = []
            for r in rows:
                scr = None
                if buf is not None:
                    scr = (_alias(buf, r[0].numel()) if r[0].dim() == 1
                           else buf[: r[0].numel()].view(r[0].shape))
                if len(r) == 3:
                    out.append(fn(r[0], r[1], r[2], None, scr, ct))
                else:
                    out.append(fn(r[0], r[1], r[2], r[3], scr, ct))
                if split:  # x -= lr * ratio * update, one eager pass (CPU: .item() is free)
                    r[0].add_(r[2] if scr is None else scr, alpha=-c[0] * out[-1].item())
                self._progress += 1
            r_large = torch.stack(out)
            if not small:
                return r_large
        if small:
            sub = tuple(None if x is None else [x[i] for i in small] for x in tensors)
            r_small = fn_eager(*sub, c, **kw)
            if not large:
                return r_small
        ratio = torch.empty(n, dtype=r_large.dtype)
        ratio[small] = r_small.to(ratio.dtype)
        ratio[large] = r_large
        return ratio

    @staticmethod
    def _lr(group: dict[str, Any]) -> float:
        lr = group["lr"]
        return float(lr) if not isinstance(lr, torch.Tensor) else float(lr.detach().cpu())


class Lamb(LayerwiseOptimizer):
    r"""LAMB: Algorithm 2 of You et al. (2020), decoupled weight decay inside the trust ratio.

    Per parameter tensor ("layer") ``x`` with gradient ``g`` at step ``t`` (t = 1, 2, ...)::

        m = b1*m + (1-b1)*g ;   v = b2*v + (1-b2)*g^2
        bias_correction=True : m_hat = m/(1-b1^t),  v_hat = v/(1-b2^t)
        bias_correction=False: m_hat = m,            v_hat = v          (Appendix E)
        r     = m_hat / (sqrt(v_hat) + eps) + wd*x
        ratio = phi(||x||) / ||r||,  phi(z) = z, or clamp(z, lower, upper) if trust_clip=(lower, upper)
                ratio = 1 where ||x|| = 0 or ||r|| = 0, or when the group has layer_adaptation=False
        x     = x - lr * ratio * r

    ``norm`` ("l2" | "l1" | "inf", Appendix F) is used for both ||x|| and ||r||.

    ``nesterov`` (Appendix D): the paper's extracted pseudocode of Algorithms 3-4 is garbled
    (powers of beta in place of beta, products of betas); these formulas follow Dozat's Nadam
    with a constant beta, as the paper says it does:

    * ``"n"``  (N-LAMB):  m_hat = b1*m_t/(1-b1^(t+1)) + (1-b1)*g_t/(1-b1^t);  v_hat = v_t/(1-b2^t)
    * ``"nn"`` (NN-LAMB): m_hat as N-LAMB, and
      v_hat = b2*v_t/(1-b2^(t+1)) + (1-b2)*g_t^2/(1-b2^t)

    (the Nesterov forms always bias-correct; ``bias_correction`` only affects plain LAMB.)
    The paper's N-/NN-LAMB hyperparameters (b1 0.975, b2 0.999, eps 1e-8) are the registry's
    defaults for ``nlamb``/``nnlamb``; this class keeps LAMB's defaults.

    Differences from other public LAMBs (none is reproduced by default): DeepSpeed clamps the
    ratio to [0.01, 10] (use trust_clip on ||x|| instead, which is the paper's phi); torch-optimizer
    has no bias correction and clamps ||x|| at 10 (``bias_correction=False, trust_clip=(0, 10)``);
    apex/timm skip the ratio where weight_decay is 0 (here: groups with ``layer_adaptation=False``,
    which :func:`resnet_lamb.optim.param_groups` sets).

    Every hyperparameter can be overridden per param group, plus ``layer_adaptation`` (bool).
    ``impl``: "auto" | "eager" | "compiled" (see the module docstring).
    """

    _state_keys = ("exp_avg", "exp_avg_sq")

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.01, bias_correction: bool = True,
                 norm: str = "l2", trust_clip: tuple[float, float] | None = None,
                 nesterov: str | None = None, *, layer_adaptation: bool = True,
                 impl: str = "auto"):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction, norm=norm, trust_clip=trust_clip,
                        nesterov=nesterov, layer_adaptation=layer_adaptation)
        super().__init__(params, defaults, impl)

    def _check_group(self, group: dict[str, Any]) -> None:
        _check_common(group)
        betas = group["betas"]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2
                and all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas)):
            raise ValueError(f"betas must be two numbers in [0, 1); got {betas!r}")
        if group["norm"] not in _NORMS:
            raise ValueError(f"norm must be one of l2, l1, inf; got {group['norm']!r}")
        if group["nesterov"] not in (None, "n", "nn"):
            raise ValueError(f"nesterov must be one of None, 'n', 'nn'; got {group['nesterov']!r}")
        if not isinstance(group["bias_correction"], bool):
            raise ValueError(f"bias_correction must be True or False; got "
                             f"{group['bias_correction']!r}")

    def _group_constants(self, group: dict[str, Any]) -> dict[str, Any]:
        clip = group["trust_clip"]
        return dict(lr=self._lr(group), clip=clip if clip is not None else (0.0, 0.0),
                    kw=dict(norm_ord=_NORMS[group["norm"]], clip=clip is not None, nesterov=group["nesterov"],
                            adapt=group["layer_adaptation"], has_wd=group["weight_decay"] != 0))

    def _bucket_step(self, group, ctx, ps, dev, t):
        lr, (lo, hi) = ctx["lr"], ctx["clip"]
        b1, b2 = group["betas"]
        st = [self.state[p] for p in ps]
        tensors = (ps, [p.grad for p in ps], [s["exp_avg"] for s in st], [s["exp_avg_sq"] for s in st])
        if (not group["layer_adaptation"] and group["nesterov"] is None and group["bias_correction"]
                and dev.type == "cpu" and self._fast_cpu and ps[0].is_floating_point()):
            # ratio 1 everywhere: LAMB is exactly AdamW here; torch's fused kernel
            torch._fused_adamw_(*tensors, [], [s["step"] for s in st], lr=lr, beta1=b1, beta2=b2,
                                weight_decay=group["weight_decay"], eps=group["eps"], amsgrad=False,
                                maximize=False)
            return torch.ones(len(ps), device=dev)
        c = lamb_coefficients(lr, t, b1, b2, group["eps"], group["weight_decay"], lo, hi,
                              group["bias_correction"], group["nesterov"])
        return self._run_bucket(_lamb_bucket, _lamb_tensor, _lamb_list, tensors, c, True, split=True, **ctx["kw"])
