"""LAMB (You et al. 2020, "Large Batch Optimization for Deep Learning", Algorithm 2) and its
Nesterov variants N-LAMB / NN-LAMB (Algorithms 3-4, Appendix D).

The step runs on flat buffers in two passes (:mod:`resnet_lamb.optim.layerwise`): phase 1 updates
m and v, computes the update r, the per-block partials of ||x|| and ||r||, and writes r over the
gradient (whose last use this is); phase 2 applies ``x -= lr * ratio * r``.  Two passes are the
floor: the ratio needs ||r|| before x can be written (about 40 bytes moved per parameter where
fused AdamW moves 28).  Groups with ``layer_adaptation=False`` (ratio 1) take one pass, and when
that update is exactly AdamW's (plain LAMB, bias correction on) torch's fused AdamW kernel runs on
the whole flat buffer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from resnet_lamb.optim.flat import FlatBucket
from resnet_lamb.optim.kernels import NORMS, apply_update, pair_partials, segment_norms, trust_ratio
from resnet_lamb.optim.layerwise import LayerwiseOptimizer, check_common, group_defaults


def lamb_coefficients(t: float, b1: float, b2: float, bias_correction: bool, nesterov: str | None) -> list[float]:
    """Per-tensor scalars at step t (double precision): [c_m, c_g, c_v, c_vg] with
    m_hat = c_m*m + c_g*g and v_hat = c_v*v + c_vg*g^2."""
    if nesterov:
        c_m, c_g = b1 / (1.0 - b1 ** (t + 1)), (1.0 - b1) / (1.0 - b1**t)
    elif bias_correction:
        c_m, c_g = 1.0 / (1.0 - b1**t), 0.0
    else:
        c_m, c_g = 1.0, 0.0
    if nesterov == "nn":
        c_v, c_vg = b2 / (1.0 - b2 ** (t + 1)), (1.0 - b2) / (1.0 - b2**t)
    elif bias_correction or nesterov:
        c_v, c_vg = 1.0 / (1.0 - b2**t), 0.0
    else:
        c_v, c_vg = 1.0, 0.0
    return [c_m, c_g, c_v, c_vg]


# The phase functions run eagerly or under torch.compile.  Buffers are [blocks, BLOCK];
# coef = per-block rows [steps (1/0), c_m, c_g, c_v, c_vg] (the rows of the block's tensor);
# c = [lr, b1, 1-b1, b2, 1-b2, eps, wd, lower, upper] (float32).
def lamb_update(p, g, m, v, coef, c, *, nesterov: str | None, has_wd: bool) -> torch.Tensor:
    """r = m_hat / (sqrt(v_hat) + eps) + wd*x."""
    eps, wd = c[5], c[6]
    c_m, c_g, c_v, c_vg = coef[:, 1:2], coef[:, 2:3], coef[:, 3:4], coef[:, 4:5]
    if nesterov == "nn":
        den = torch.sqrt(v * c_v + g * g * c_vg) + eps
    else:
        den = torch.sqrt(v * c_v) + eps
    r = (m * c_m + g * c_g if nesterov else m * c_m) / den
    return r + wd * p if has_wd else r


def lamb_phase1(p, g, m, v, coef, c, *, norm: str, nesterov: str | None, has_wd: bool, adapt: bool):
    """m and v; then with adapt, the block partials of ||x|| and ||r||, and r written over the
    gradient (its last use: the write costs no extra read, where a fresh buffer would); without,
    ``x -= lr * r`` here (ratio 1: one pass)."""
    steps = coef[:, 0:1]  # 0 for tensors without a gradient: nothing of theirs changes
    m.mul_(torch.where(steps > 0, c[1], 1.0)).add_(g * (c[2] * steps))
    v.mul_(torch.where(steps > 0, c[3], 1.0)).add_(g * g * (c[4] * steps))
    r = lamb_update(p, g, m, v, coef, c, nesterov=nesterov, has_wd=has_wd)
    if not adapt:
        p.sub_(r * (c[0] * steps))
        return None
    parts = pair_partials(p, r, norm)
    g.copy_(r)
    return parts


def lamb_ratios(parts, lengths, c, *, norm: str, clip: bool) -> torch.Tensor:
    """Per-tensor trust ratios from the block partials of x and r ([blocks, 2])."""
    norms = segment_norms(parts, lengths, norm)
    return trust_ratio(norms[:, 0], norms[:, 1], c[7], c[8], clip)


class Lamb(LayerwiseOptimizer):
    r"""LAMB: Algorithm 2 of You et al. (2020), decoupled weight decay inside the trust ratio.

    Per parameter tensor ("layer") ``x`` with gradient ``g`` at step ``t`` (t = 1, 2, ...)::

        m = b1*m + (1-b1)*g ;   v = b2*v + (1-b2)*g^2
        bias_correction=True : m_hat = m/(1-b1^t),  v_hat = v/(1-b2^t)
        bias_correction=False: m_hat = m,            v_hat = v          (Appendix E)
        r     = m_hat / (sqrt(v_hat) + eps) + wd*x
        ratio = phi(||x||) / ||r||,  phi(z) = z, or min(max(z, lower), upper) if trust_clip=(lower, upper)
                ratio = 1 where phi(||x||) = 0 or ||r|| = 0, or when the group has layer_adaptation=False
                (so with lower > 0 an all-zero tensor, e.g. a zero-initialised BN gamma, gets lower/||r||)
        x     = x - lr * ratio * r

    ``norm`` ("l2" | "l1" | "inf", Appendix F) is used for both ||x|| and ||r||.  ``eps`` must be
    > 0, as Algorithm 2 states (it also keeps the buffers' zero padding at r = 0).

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
    ``impl``: "auto" | "eager" | "compiled" (see :mod:`resnet_lamb.optim.layerwise`).

    ``step()`` consumes the gradients of adapted groups: afterwards ``p.grad`` holds r (phase 1
    writes r over the gradient buffer, which costs no extra memory traffic).  Read gradients
    before the step.
    """

    _state_keys = ("exp_avg", "exp_avg_sq")
    _coef_cols = 5

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        bias_correction: bool = True,
        norm: str = "l2",
        trust_clip: tuple[float, float] | None = None,
        nesterov: str | None = None,
        *,
        layer_adaptation: bool = True,
        impl: str = "auto",
    ):
        super().__init__(params, group_defaults(locals()), impl)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_common(group)
        eps = group["eps"]
        if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
            raise ValueError(f"eps must be a finite number > 0 (Algorithm 2); got {eps!r}")
        betas = group["betas"]
        if not (
            isinstance(betas, (tuple, list))
            and len(betas) == 2
            and all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas)
        ):
            raise ValueError(f"betas must be two numbers in [0, 1); got {betas!r}")
        if group["norm"] not in NORMS:
            raise ValueError(f"norm must be one of l2, l1, inf; got {group['norm']!r}")
        if group["nesterov"] not in (None, "n", "nn"):
            raise ValueError(f"nesterov must be one of None, 'n', 'nn'; got {group['nesterov']!r}")
        if not isinstance(group["bias_correction"], bool):
            raise ValueError(f"bias_correction must be True or False; got {group['bias_correction']!r}")

    def _group_constants(self, group: dict[str, Any]) -> dict[str, Any]:
        b1, b2 = group["betas"]
        lo, hi = group["trust_clip"] or (0.0, 0.0)
        lr = self._lr_as_float(group)
        return dict(
            lr=lr,
            scalars=[lr, b1, 1.0 - b1, b2, 1.0 - b2, group["eps"], group["weight_decay"], lo, hi],
            kw=dict(norm=group["norm"], nesterov=group["nesterov"], has_wd=group["weight_decay"] != 0),
        )

    def _fused_update(self, group: dict[str, Any], bucket: FlatBucket) -> tuple[Callable, list, dict[str, Any]] | None:
        """Ratio 1 in plain LAMB with bias correction: exactly AdamW."""
        if group["nesterov"] is not None or not group["bias_correction"]:
            return None
        b1, b2 = group["betas"]
        step = torch.tensor(bucket.t, device=bucket.device)
        state = [[bucket.bufs["exp_avg"]], [bucket.bufs["exp_avg_sq"]], [], [step]]
        return torch._fused_adamw_, state, dict(beta1=b1, beta2=b2, eps=group["eps"], amsgrad=False)

    def _bucket_step(
        self, group: dict[str, Any], ctx: dict[str, Any], bucket: FlatBucket, active: list[bool]
    ) -> torch.Tensor:
        b1, b2 = group["betas"]
        bc, nesterov, adapt = group["bias_correction"], group["nesterov"], group["layer_adaptation"]
        uniform = self._fill_coef(bucket, active, lambda t: lamb_coefficients(t, b1, b2, bc, nesterov))
        if self._fused_step(group, ctx, bucket, uniform):
            return bucket.ones
        dev = bucket.device
        m, v = bucket.bufs["exp_avg"], bucket.bufs["exp_avg_sq"]
        c = self._group_scalars(ctx["scalars"], dev)
        kw = ctx["kw"]
        if not adapt:  # ratio 1: phase 1 applies
            self._call(lamb_phase1, dict(kw, adapt=False), bucket.p, bucket.g, m, v, bucket.coef, c, chunked=5)
            return bucket.ones
        # phase 1 leaves r in the gradient buffer; the apply pass reads it from there
        return self._adapted_step(
            bucket,
            c,
            (bucket.p, bucket.g, m, v),
            lamb_phase1,
            dict(kw, adapt=True),
            lamb_ratios,
            dict(norm=kw["norm"], clip=group["trust_clip"] is not None),
            apply_update,
            {},
            (0, 1),
            one_graph=False,
        )
