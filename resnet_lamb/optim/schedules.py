"""Learning-rate schedules, per optimizer step, as multipliers of the peak LR.

Every schedule here is a pure function ``f(step, ...) -> float`` returning the factor by which
the peak learning rate (``Plan.lr``, already scaled for the global batch) is multiplied at
global step ``step`` (the number of optimizer steps taken so far, counted from 0, as BERT's
``global_step``). :func:`build_scheduler` wraps them in a ``torch.optim.lr_scheduler.LambdaLR``
whose ``lr_lambda`` receives the optimizer-step count; Lightning should step it once per
optimizer step (``interval: "step"``), i.e. after gradient accumulation.

The batch-size rules (:func:`scale_lr`, :func:`scale_warmup_epochs`) live here as well, so that
``resnet_lamb.recipe.derive_plan`` and the schedules use one definition.

This module imports no torch at import time (``resnet-lamb plan`` must stay fast); only
:func:`build_scheduler` imports it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

LR_SCALINGS = ("sqrt", "linear", "none")
WARMUP_SCALINGS = ("linear", "none")
SCHEDULES = ("poly", "poly_after_warmup", "goyal", "constant")

_EXPONENT = {"sqrt": 0.5, "linear": 1.0, "none": 0.0}


def scale_lr(base_lr: float, base_batch: int, global_batch: int, rule: str) -> float:
    """LR for ``global_batch`` from ``base_lr`` tuned at ``base_batch``.

    ``sqrt``: ``base_lr * sqrt(global/base)`` (the LAMB paper, Section 4 and Tables 4-5:
    0.005 at 512 gives 0.04 at 32K); ``linear``: ``base_lr * global/base`` (Goyal et al. 2017:
    0.1 per 256 images); ``none``: ``base_lr`` whatever the batch.
    """
    if rule not in _EXPONENT:
        raise ValueError(f"unknown LR scaling rule {rule!r}; choose one of {', '.join(LR_SCALINGS)}")
    if base_batch <= 0 or global_batch <= 0:
        raise ValueError(f"batch sizes must be positive, got base_batch={base_batch}, global_batch={global_batch}")
    ratio = global_batch / base_batch
    if rule == "none":
        return float(base_lr)
    if rule == "linear":
        return float(base_lr) * ratio
    return float(base_lr) * math.sqrt(ratio)


def scale_warmup_epochs(warmup_epochs: float, base_batch: int, global_batch: int, rule: str) -> float:
    """Warmup length in epochs for ``global_batch``, from ``warmup_epochs`` stated at ``base_batch``.

    ``linear`` is the paper's "linear-epoch warmup" (Table 5: 0.3125 epochs at 512 -> 20 at 32K):
    the number of warmup *steps* stays the same while each step holds more images. ``none``
    keeps the epochs (Goyal et al.'s 5 epochs at any batch).
    """
    if rule not in WARMUP_SCALINGS:
        raise ValueError(f"unknown warmup scaling rule {rule!r}; choose one of {', '.join(WARMUP_SCALINGS)}")
    if base_batch <= 0 or global_batch <= 0:
        raise ValueError(f"batch sizes must be positive, got base_batch={base_batch}, global_batch={global_batch}")
    if rule == "none":
        return float(warmup_epochs)
    return float(warmup_epochs) * global_batch / base_batch


def epochs_to_steps(epochs: float, train_images: int, global_batch: int) -> int:
    """The contract's epoch -> step conversion: ``round(epochs * train_images / global_batch)``."""
    return int(round(epochs * train_images / global_batch))


def _warmup(step: int, warmup_steps: int) -> float:
    """Linear warmup factor ``step / warmup_steps`` while ``step < warmup_steps``, else 1."""
    if warmup_steps > 0 and step < warmup_steps:
        return step / warmup_steps
    return 1.0


def warmup_poly(step: int, warmup_steps: int, total_steps: int, power: float = 1.0, end: float = 0.0) -> float:
    """``poly``: polynomial decay from step 0, a linear warmup overriding the first steps (BERT's form).

    As in BERT's ``optimization.py`` (``create_optimizer``), with global step ``t`` counted
    from 0, ``T = total_steps`` and ``end`` the end LR as a fraction of the peak:

    * decay: TF's ``polynomial_decay(lr0, t, T, end_learning_rate, power, cycle=False)``,
      i.e. ``(1 - end) * (1 - min(t, T) / T) ** power + end`` (``end`` from ``t = T`` on);
    * warmup: for ``t < warmup_steps`` the factor is ``t / warmup_steps`` instead
      (BERT's ``is_warmup`` blend), so step 0 has LR 0 and the decay is *not* restarted at the
      end of warmup: at ``t = warmup_steps`` the factor is already ``(1 - W/T) ** power``
      (at ``end`` 0).

    The LAMB paper's text states this with power 1: ``eta_t = eta_0 * (1 - t/T)`` (Section 4).
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if warmup_steps > 0 and step < warmup_steps:
        return step / warmup_steps
    t = min(step, total_steps)
    return (1.0 - end) * (1.0 - t / total_steps) ** power + end


def poly_after_warmup(step: int, warmup_steps: int, total_steps: int, power: float = 1.0, end: float = 0.0) -> float:
    """``poly_after_warmup``: linear warmup to the peak, then polynomial decay measured from the
    end of the warmup (the LAMB author's ResNet-50 form).

    With ``t`` the global step from 0, ``W = warmup_steps``, ``T = total_steps`` and ``end`` the
    end LR as a fraction of the peak:

    * ``t / W`` for ``t <= W`` (0 at step 0, the peak at ``t = W``);
    * ``(1 - end) * ((T - t) / (T - W)) ** power + end`` for ``W < t <= T``, i.e.
      ``(1 - end) * (1 - (t - W) / (T - W)) ** power + end``; ``end`` from ``T`` on.

    At power 1 and ``end`` 0 this is the author's ``optimization.py``
    (fastalgo/imagenet_resnet50_lamb): ``step*lr/W`` while ``step <= W``, else
    ``(T - step)*lr/(T - W)``. Power 2 with an end LR of 1e-4 and ``T = W + D`` (``decay_steps``
    D stated) is the MLPerf LARS reference (mlcommons/training resnet-tf2 ``lars_util.py``:
    ``lr*t/W`` for ``t <= W``, then ``(lr - end_lr)*(1 - min(t - W, D)/D)**2 + end_lr``).
    Unlike :func:`warmup_poly` the whole decay happens after the warmup.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if warmup_steps > 0 and step <= warmup_steps:
        return step / warmup_steps
    if step >= total_steps:
        return float(end)
    return (1.0 - end) * ((total_steps - step) / (total_steps - warmup_steps)) ** power + end


def goyal(step: int, warmup_steps: int, milestone_steps: Sequence[int], gamma: float = 0.1) -> float:
    """Goyal et al. (2017), "Accurate, large minibatch SGD": gradual warmup, then step decay.

    Linear warmup ``t / warmup_steps`` for ``t < warmup_steps`` (5 epochs in the paper, given here
    in steps), then the LR is multiplied by ``gamma`` (0.1) at each milestone step (epochs 30, 60
    and 80, converted with :func:`epochs_to_steps`): the factor is ``gamma ** k`` with ``k`` the
    number of milestones ``<= t``. Should a milestone fall inside the warmup, both apply
    (product). The warmup ramps from 0, as the LAMB paper's TF code and BERT do; Goyal et al.
    ramped from the small-batch LR (``1/k`` of the peak), a difference of at most ``1/k`` of the
    peak during the first 5 epochs.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    k = sum(1 for m in milestone_steps if step >= m)
    return _warmup(step, warmup_steps) * gamma**k


def constant(step: int, warmup_steps: int = 0) -> float:
    """Constant LR, after an optional linear warmup ``t / warmup_steps`` (t counted from 0)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return _warmup(step, warmup_steps)


def multiplier_fn(spec: Any, plan: Any) -> Callable[[int], float]:
    """``step -> factor`` for a ``ScheduleSpec`` and a ``Plan`` (``resnet_lamb.recipe``).

    ``step`` is the optimizer-step count of the run. It is first mapped to the paper's step
    count with ``plan.schedule_step``: the identity in ``full_batch`` epoch mode (every step a
    full batch, ``total_steps`` of them); in ``padded`` mode the loader pads each epoch's last
    batch, so a run takes ``epochs * steps_per_epoch`` optimizer steps while the paper's schedule
    spans ``total_steps = ceil(epochs * N / B)``; the mapping keeps the LR a function of the
    images seen, ending at ``total_steps - 1`` on the last step of the last epoch.
    """
    name = spec.name
    if name in ("poly", "poly_after_warmup"):
        form = warmup_poly if name == "poly" else poly_after_warmup
        warm, total, power = plan.warmup_steps, plan.total_steps, float(spec.power)
        if getattr(spec, "decay_steps", None) is not None:  # poly_after_warmup with a stated decay length
            total = warm + int(spec.decay_steps)
        end = float(getattr(plan, "end_lr", 0.0)) / plan.lr
        return lambda step: form(plan.schedule_step(step), warm, total, power, end)
    if name == "goyal":
        warm, miles, gamma = plan.warmup_steps, tuple(plan.milestone_steps), float(spec.gamma)
        return lambda step: goyal(plan.schedule_step(step), warm, miles, gamma)
    if name == "constant":
        warm = plan.warmup_steps
        return lambda step: constant(plan.schedule_step(step), warm)
    raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")


def build_scheduler(optimizer: torch.optim.Optimizer, spec: Any, plan: Any) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` over ``optimizer`` following ``spec`` (``ScheduleSpec``) and ``plan`` (``Plan``).

    Build the optimizer with ``lr=plan.lr`` (the peak); LambdaLR multiplies each param group's
    initial LR by the factor, so the first step runs at ``factor(0)`` (0 with a warmup, as BERT).
    Step it once per optimizer step. The lambda is a plain closure, so the scheduler's
    ``state_dict`` holds only counters (safe with ``torch.load(weights_only=True)``) and resuming
    rebuilds the same closure from the recipe.
    """
    from torch.optim.lr_scheduler import LambdaLR

    return LambdaLR(optimizer, multiplier_fn(spec, plan))
