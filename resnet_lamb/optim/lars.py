"""LARS in two forms: Algorithm 1 of You et al. (2020) and the classic You et al. (2017) /
MLPerf form.  Same machinery (eager foreach / compiled, trust_ratios()) as
:mod:`resnet_lamb.optim.lamb`.  State per parameter: ``step`` and ``momentum_buffer``.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch

from resnet_lamb.optim.lamb import LayerwiseOptimizer, _check_common, trust_ratio

_MODES = ("paper", "classic")


def local_lr(w_norm: torch.Tensor, g_norm: torch.Tensor, tc, wd, eps, cl) -> torch.Tensor:
    """Classic LARS's local lr, ``tc * phi(||x||) / (||g|| + wd*||x|| + eps)``, 1 where a norm is 0;
    ``cl`` = (lower, upper) clamps ||x|| (phi) or is None. Vectors (a bucket) or 0-dim tensors."""
    num = w_norm if cl is None else torch.clamp(w_norm, *cl)
    return torch.where((w_norm > 0) & (g_norm > 0), tc * num / (g_norm + wd * w_norm + eps), 1.0)


def _lars_bucket(params, grads, bufs, _unused, c: list[float], *, mode: str,
                 nesterov: bool, clip: bool, adapt: bool, has_wd: bool) -> torch.Tensor:
    """Eager multi-tensor form. ``c`` = [lr, momentum, 1-momentum, tc, eps, wd, lo, hi]."""
    lr, mom, omm, tc, eps, wd, lo, hi = c
    cl = (lo, hi) if clip else None
    if mode == "paper":
        d = torch._foreach_add(grads, params, alpha=wd) if has_wd else grads
        torch._foreach_lerp_(bufs, d, omm)
        del d
        if adapt:
            w_norm = torch.stack(torch._foreach_norm(params)).float()
            m_norm = torch.stack(torch._foreach_norm(bufs)).float()
            ratio = trust_ratio(w_norm, m_norm, cl, True)
            torch._foreach_addcmul_(params, bufs, list((ratio * -lr).to(params[0].dtype).unbind(0)))
        else:
            ratio = torch.ones(len(params), device=params[0].device)
            torch._foreach_add_(params, bufs, alpha=-lr)
        return ratio
    # classic (You et al. 2017 / MLPerf): trust ratio on the gradient, momentum after scaling
    if adapt:
        w_norm = torch.stack(torch._foreach_norm(params)).float()
        g_norm = torch.stack(torch._foreach_norm(grads)).float()
        ratio = local_lr(w_norm, g_norm, tc, wd, eps, cl)
    else:
        ratio = torch.ones(len(params), device=params[0].device)
    scale = list(ratio.to(params[0].dtype).unbind(0))
    if has_wd:
        d = torch._foreach_add(grads, params, alpha=wd)
        if adapt:
            torch._foreach_mul_(d, scale)
    else:  # never scale the caller's grads in place
        d = torch._foreach_mul(grads, scale) if adapt else torch._foreach_mul(grads, 1.0)
    torch._foreach_mul_(bufs, mom)
    torch._foreach_add_(bufs, d)
    if nesterov:
        torch._foreach_add_(d, bufs, alpha=mom)
        torch._foreach_add_(params, d, alpha=-lr)
    else:
        torch._foreach_add_(params, bufs, alpha=-lr)
    return ratio


def _lars_tensor(p, g, buf, _unused, _scratch, c: torch.Tensor, *, mode: str, nesterov: bool,
                 clip: bool, adapt: bool, has_wd: bool, apply: bool = True) -> torch.Tensor:
    """Per-tensor form (what the compiled path fuses); ``c`` is a float32 tensor.

    apply=False (paper mode, CPU): only the momentum buffer and the ratio; the caller applies
    ``x -= lr*ratio*m`` with one eager ``add_`` (inductor would otherwise stage m in a temporary
    and copy it back, one extra pass)."""
    lr, mom, omm, tc, eps, wd, lo, hi = c.unbind(0)
    cl = (lo, hi) if clip else None
    d = g + wd * p if has_wd else g
    if mode == "paper":
        b_new = buf * mom + d * omm
        buf.copy_(b_new)
        if adapt:
            wn, mn = torch.sqrt((p * p).sum()).float(), torch.sqrt((b_new * b_new).sum()).float()
            ratio = trust_ratio(wn, mn, cl, True).float()
        else:
            ratio = torch.ones((), device=p.device)
        if apply:
            p.sub_(b_new * (ratio * lr).to(p.dtype))
        return ratio
    if adapt:
        wn, gn = torch.sqrt((p * p).sum()).float(), torch.sqrt((g * g).sum()).float()
        ratio = local_lr(wn, gn, tc, wd, eps, cl).float()
        d = d * ratio.to(p.dtype)
    else:
        ratio = torch.ones((), device=p.device)
    b_new = buf * mom + d
    buf.copy_(b_new)
    if nesterov:
        p.sub_((d + mom * b_new) * lr)
    else:
        p.sub_(b_new * lr)
    return ratio


def _classic_cpu(params, grads, bufs, c: list[float], *, nesterov: bool, clip: bool
                 ) -> torch.Tensor:
    """Classic LARS on CPU without a compiler at full speed: both norms by ``_foreach_norm``,
    then torch's fused SGD kernel per tensor with ``grad_scale = 1/local_lr`` and
    ``weight_decay = wd*local_lr``, i.e. ``d = local_lr*(g + wd*x)``.  Like GradScaler's fused
    unscale, this leaves ``p.grad`` multiplied by the local lr."""
    lr, mom, _omm, tc, eps, wd, lo, hi = c
    w_norm = torch.stack(torch._foreach_norm(params)).float()
    g_norm = torch.stack(torch._foreach_norm(grads)).float()
    ratio = local_lr(w_norm, g_norm, tc, wd, eps, (lo, hi) if clip else None)
    for p, g, b, r in zip(params, grads, bufs, ratio.tolist()):
        torch._fused_sgd_([p], [g], [b], weight_decay=wd * r, momentum=mom, lr=lr,
                          dampening=0.0, nesterov=nesterov, maximize=False, is_first_step=False,
                          grad_scale=None if r == 1.0 else torch.tensor(1.0 / r))
    return ratio


def _lars_list(params, grads, bufs, _unused, c, **kw):
    """Whole-bucket graph (GPU path)."""
    return torch.stack([_lars_tensor(p, g, b, None, None, c, **kw)
                        for p, g, b in zip(params, grads, bufs)])


class Lars(LayerwiseOptimizer):
    r"""LARS, layer-wise adaptive rate scaling on top of heavy-ball momentum.

    ``mode="paper"`` reproduces Algorithm 1 of You et al. (2020, the LAMB paper); per tensor x::

        m = momentum*m + (1-momentum)*(g + wd*x)
        x = x - lr * phi(||x||)/||m|| * m        (ratio 1 where a norm is 0)

    ``trust_coefficient`` and ``eps`` are not used in this mode (phi is the identity or the
    ``trust_clip`` clamp); ``nesterov`` is not defined for it.

    ``mode="classic"`` reproduces You, Gitman & Ginsburg (2017) as in the MLPerf ResNet-50
    reference (and timm's ``Lars`` without its trust clipping)::

        local_lr = trust_coefficient * phi(||x||) / (||g|| + wd*||x|| + eps)   (1 where ||x|| or ||g|| is 0)
        d = (g + wd*x) * local_lr
        m = momentum*m + d
        x = x - lr * m                 (nesterov=True: x = x - lr * (d + momentum*m))

    (MLPerf's TF code multiplies lr into the buffer instead; identical for a constant lr.)
    Groups with ``layer_adaptation=False`` use ratio / local_lr 1 (plain momentum SGD). In the
    MLPerf setup BatchNorm and bias tensors are excluded from both weight decay and adaptation;
    that is the param rule's job (:func:`resnet_lamb.optim.param_groups`), not the optimizer's.

    On CPU the classic mode runs torch's fused SGD kernel per tensor (both impls), which leaves
    ``p.grad`` multiplied by the local lr after ``step()`` (as GradScaler's fused unscale does).

    ``trust_ratios()`` reports phi(||x||)/||m|| (paper) or local_lr (classic).
    ``impl``: "auto" | "eager" | "compiled".  Every hyperparameter can be set per group.
    """

    _state_keys = ("momentum_buffer",)

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9,
                 weight_decay: float = 0.0, eps: float = 1e-9, trust_coefficient: float = 0.001,
                 mode: str = "paper", nesterov: bool = False,
                 trust_clip: tuple[float, float] | None = None, *, layer_adaptation: bool = True,
                 impl: str = "auto"):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eps=eps,
                        trust_coefficient=trust_coefficient, mode=mode, nesterov=nesterov,
                        trust_clip=trust_clip, layer_adaptation=layer_adaptation)
        super().__init__(params, defaults, impl)

    def _check_group(self, group: dict[str, Any]) -> None:
        _check_common(group)
        mom = group["momentum"]
        if not (isinstance(mom, (int, float)) and 0.0 <= mom < 1.0):
            raise ValueError(f"momentum must be a number in [0, 1); got {mom!r}")
        tc = group["trust_coefficient"]
        if not (isinstance(tc, (int, float)) and math.isfinite(tc) and tc > 0):
            raise ValueError(f"trust_coefficient must be a finite number > 0; got {tc!r}")
        if group["mode"] not in _MODES:
            raise ValueError(f"mode must be one of paper, classic; got {group['mode']!r}")
        if not isinstance(group["nesterov"], bool):
            raise ValueError(f"nesterov must be True or False; got {group['nesterov']!r}")
        if group["nesterov"] and group["mode"] != "classic":
            raise ValueError("nesterov=True needs mode='classic' (Algorithm 1 has no Nesterov form)")

    def _group_constants(self, group: dict[str, Any]) -> dict[str, Any]:
        clip = group["trust_clip"]
        lo, hi = clip if clip is not None else (0.0, 0.0)
        lr, mom = self._lr(group), group["momentum"]
        return dict(lr=lr, c=[lr, mom, 1.0 - mom, group["trust_coefficient"], group["eps"], group["weight_decay"],
                              lo, hi],
                    kw=dict(mode=group["mode"], nesterov=group["nesterov"], clip=clip is not None,
                            adapt=group["layer_adaptation"], has_wd=group["weight_decay"] != 0))

    def _bucket_step(self, group, ctx, ps, dev, t):
        c, kw = ctx["c"], ctx["kw"]
        tensors = (ps, [p.grad for p in ps], [self.state[p]["momentum_buffer"] for p in ps], None)
        if not group["layer_adaptation"] and dev.type in ("cpu", "cuda") and ps[0].is_floating_point():
            # local lr 1 everywhere: momentum SGD; torch's fused kernel
            mom = group["momentum"]
            torch._fused_sgd_(*tensors[:3], weight_decay=group["weight_decay"], momentum=mom, lr=ctx["lr"],
                              dampening=mom if group["mode"] == "paper" else 0.0, nesterov=group["nesterov"],
                              maximize=False, is_first_step=False)
            return torch.ones(len(ps), device=dev)
        if group["mode"] == "classic" and self._fast_cpu and dev.type == "cpu" and ps[0].is_floating_point():
            return _classic_cpu(*tensors[:3], c, nesterov=group["nesterov"], clip=kw["clip"])
        return self._run_bucket(_lars_bucket, _lars_tensor, _lars_list, tensors, c, False,
                                split=group["mode"] == "paper", **kw)
