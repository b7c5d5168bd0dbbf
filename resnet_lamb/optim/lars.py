"""LARS in two forms: Algorithm 1 of You et al. (2020) and the classic You et al. (2017) /
MLPerf form, on the flat buffers of :mod:`resnet_lamb.optim.layerwise` (as
:class:`~resnet_lamb.optim.Lamb`).  State per parameter: ``step`` and ``momentum_buffer``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from resnet_lamb.optim.flat import FlatBucket
from resnet_lamb.optim.kernels import apply_update, pair_partials, phi, segment_norms, trust_ratio
from resnet_lamb.optim.layerwise import LayerwiseOptimizer, check_common, group_defaults

_MODES = ("paper", "classic")


def local_lr(w_norm: torch.Tensor, g_norm: torch.Tensor, tc, wd, eps, lo, hi, clip: bool) -> torch.Tensor:
    """Classic LARS's local lr, ``tc * phi(||x||) / (||g|| + wd*||x|| + eps)``; 1 where
    phi(||x||) = 0 or ||g|| = 0."""
    num = phi(w_norm, lo, hi, clip)
    return torch.where((num > 0) & (g_norm > 0), tc * num / (g_norm + wd * w_norm + eps), 1.0)


# Phase functions (eager or compiled), buffers [blocks, BLOCK]; coef = per-block rows
# [steps (1/0)]; c = [lr, momentum, 1-momentum, trust_coefficient, eps, wd, lower, upper] (float32).
def paper_phase1(p, g, buf, coef, c, *, has_wd: bool, adapt: bool):
    """m = momentum*m + (1-momentum)*(g + wd*x); with adapt, the block partials of ||x||, ||m||;
    without, ``x -= lr * m`` here (ratio 1: one pass)."""
    steps = coef[:, 0:1]
    d = g + c[5] * p if has_wd else g
    buf.mul_(torch.where(steps > 0, c[1], 1.0)).add_(d * (c[2] * steps))
    if not adapt:
        p.sub_(buf * (c[0] * steps))
        return None
    return pair_partials(p, buf, "l2")


def paper_ratios(parts, lengths, c, *, clip: bool) -> torch.Tensor:
    norms = segment_norms(parts, lengths, "l2")
    return trust_ratio(norms[:, 0], norms[:, 1], c[6], c[7], clip)


def classic_phase1(p, g, buf, coef, c):
    """The block partials of ||x|| and ||g|| (m is updated in phase 2, with the local lr)."""
    return pair_partials(p, g, "l2")


def classic_ratios(parts, lengths, c, *, clip: bool) -> torch.Tensor:
    norms = segment_norms(parts, lengths, "l2")
    return local_lr(norms[:, 0], norms[:, 1], c[3], c[5], c[4], c[6], c[7], clip)


def classic_phase2(p, g, buf, coef, block_ratio, c, *, nesterov: bool, has_wd: bool) -> None:
    """d = local_lr*(g + wd*x); m = momentum*m + d; x -= lr*m (nesterov: lr*(d + momentum*m))."""
    lr, mom, wd = c[0], c[1], c[5]
    steps = coef[:, 0:1]
    d = (g + wd * p if has_wd else g) * block_ratio.unsqueeze(1)
    buf.mul_(torch.where(steps > 0, mom, 1.0)).add_(d)
    p.sub_((d + mom * buf if nesterov else buf) * (lr * steps))


class Lars(LayerwiseOptimizer):
    r"""LARS, layer-wise adaptive rate scaling on top of heavy-ball momentum.

    ``mode="paper"`` reproduces Algorithm 1 of You et al. (2020, the LAMB paper); per tensor x::

        m = momentum*m + (1-momentum)*(g + wd*x)
        x = x - lr * phi(||x||)/||m|| * m        (ratio 1 where phi(||x||) = 0 or ||m|| = 0)

    ``trust_coefficient`` and ``eps`` are not used in this mode (phi is the identity or the
    ``trust_clip`` clamp); ``nesterov`` is not defined for it.

    ``mode="classic"`` reproduces You, Gitman & Ginsburg (2017) as in the MLPerf ResNet-50
    reference (and timm's ``Lars`` without its trust clipping)::

        local_lr = trust_coefficient * phi(||x||) / (||g|| + wd*||x|| + eps)   (1 where phi(||x||) or ||g|| is 0)
        d = (g + wd*x) * local_lr
        m = momentum*m + d
        x = x - lr * m                 (nesterov=True: x = x - lr * (d + momentum*m))

    (MLPerf's TF code multiplies lr into the buffer instead; identical for a constant lr.)
    Groups with ``layer_adaptation=False`` use ratio / local_lr 1 (plain momentum SGD). In the
    MLPerf setup BatchNorm and bias tensors are excluded from both weight decay and adaptation;
    that is the param rule's job (:func:`resnet_lamb.optim.param_groups`), not the optimizer's.

    The step runs on flat buffers (:mod:`resnet_lamb.optim.layerwise`) in two passes: paper mode
    updates m and reduces ||x||, ||m|| in the first and applies in the second; classic mode reduces
    ||x||, ||g|| in the first and updates m and x in the second (about 28 bytes moved per
    parameter where fused SGD moves 20).  Groups with ``layer_adaptation=False`` run torch's fused
    SGD kernel on the whole flat buffer.

    ``trust_ratios()`` reports phi(||x||)/||m|| (paper) or local_lr (classic).
    ``impl``: "auto" | "eager" | "compiled".  Every hyperparameter can be set per group.
    """

    _state_keys = ("momentum_buffer",)

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eps: float = 1e-9,
        trust_coefficient: float = 0.001,
        mode: str = "paper",
        nesterov: bool = False,
        trust_clip: tuple[float, float] | None = None,
        *,
        layer_adaptation: bool = True,
        impl: str = "auto",
    ):
        super().__init__(params, group_defaults(locals()), impl)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_common(group)
        eps = group["eps"]
        if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
            raise ValueError(f"eps must be a finite number >= 0; got {eps!r}")
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
        lo, hi = group["trust_clip"] or (0.0, 0.0)
        lr, mom = self._lr_as_float(group), group["momentum"]
        return dict(
            lr=lr, scalars=[lr, mom, 1.0 - mom, group["trust_coefficient"], group["eps"], group["weight_decay"], lo, hi]
        )

    def _fused_update(self, group: dict[str, Any], bucket: FlatBucket) -> tuple[Callable, list, dict[str, Any]]:
        """Local lr 1: momentum SGD (dampening = momentum in paper mode)."""
        mom = group["momentum"]
        dampening = mom if group["mode"] == "paper" else 0.0
        options = dict(momentum=mom, dampening=dampening, nesterov=group["nesterov"], is_first_step=False)
        return torch._fused_sgd_, [[bucket.bufs["momentum_buffer"]]], options

    def _bucket_step(
        self, group: dict[str, Any], ctx: dict[str, Any], bucket: FlatBucket, active: list[bool]
    ) -> torch.Tensor:
        uniform = self._fill_coef(bucket, active, lambda t: [])
        if self._fused_step(group, ctx, bucket, uniform):
            return bucket.ones
        dev, buf = bucket.device, bucket.bufs["momentum_buffer"]
        mode, adapt = group["mode"], group["layer_adaptation"]
        c = self._group_scalars(ctx["scalars"], dev)
        has_wd, clip = group["weight_decay"] != 0, group["trust_clip"] is not None
        classic = dict(nesterov=group["nesterov"], has_wd=has_wd)
        if mode == "paper" and adapt:
            return self._adapted_step(
                bucket,
                c,
                (bucket.p, bucket.g, buf),
                paper_phase1,
                dict(has_wd=has_wd, adapt=True),
                paper_ratios,
                dict(clip=clip),
                apply_update,
                {},
                (0, 2),
                one_graph=False,
            )
        if mode == "paper":  # ratio 1 (the fused shortcut switched off): phase 1 applies
            self._call(
                paper_phase1, dict(has_wd=has_wd, adapt=False), bucket.p, bucket.g, buf, bucket.coef, c, chunked=4
            )
        elif adapt:
            return self._adapted_step(
                bucket,
                c,
                (bucket.p, bucket.g, buf),
                classic_phase1,
                {},
                classic_ratios,
                dict(clip=clip),
                classic_phase2,
                classic,
                (0, 1, 2),
                one_graph=True,
            )
        else:  # local lr 1 (the fused shortcut switched off): the steps column is the ratio
            block_ratio = bucket.coef[:, 0]
            torch._dynamo.maybe_mark_dynamic(block_ratio, 0)
            self._call(classic_phase2, classic, bucket.p, bucket.g, buf, bucket.coef, block_ratio, c, chunked=5)
        return bucket.ones
