"""Ghost BatchNorm: training-mode statistics over groups of ``ghost_batch`` samples.

Plain BatchNorm normalises over the per-device micro batch, so the same recipe normalises over 256
images on 8 GPUs and over 32 on 1024 of them. :class:`GhostBatchNorm2d` (``model.bn_batch: K``)
splits each micro batch into consecutive groups of K samples and applies BatchNorm to each group
on its own, so the statistics no longer depend on the device layout: one process with micro batch
8 and K = 4 computes what two processes with micro batch 4 and plain BatchNorm compute (the LAMB
author's TPU run normalised over the 128 images of each core).

* Training forward: ``torch.cat([F.batch_norm(group) for group in x.split(K)])`` with the layer's
  weight and bias: exactly BatchNorm applied group by group, forward and backward (one fused
  kernel call per group; a micro batch of K is plain BatchNorm).
* Running statistics: updated once per forward, with the mean over the groups of what each group's
  BatchNorm would do: ``running = (1 - m) * running + m * mean_g(stat_g)`` (batch mean, and the
  unbiased variance, as BatchNorm keeps them; ``num_batches_tracked`` + 1). Why the mean and not
  each group in sequence: the moving average then spans the same number of forwards whatever K
  (in sequence, G groups would make the momentum ``1 - (1 - m)^G``), and it is what averaging the
  running statistics of G devices running plain BatchNorm on those groups would give.
* Eval: BatchNorm's own forward with the running statistics (unchanged).
* A training micro batch that K does not divide raises (``resnet_lamb.recipe.derive_plan``
  refuses such a recipe before anything is built).
* Samples labelled -1 (padding of a ``padded`` epoch's last step, skipped corrupt images) still
  pass through the network: they are real images (a repeat, or a grey placeholder) and count in
  their group's statistics, so they shift the normalisation of the real samples of that group
  (their own loss is masked). Plain BatchNorm does the same over the whole micro batch.
  ``full_batch`` epochs have no padding.

The layer is a ``BatchNorm2d`` subclass with the same parameters and buffers: state dicts load
either way, and the parameter rule (``param_rule: author``) finds it as a BatchNorm layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GhostBatchNorm2d(nn.BatchNorm2d):
    def __init__(self, num_features: int, *args, ghost_batch: int | None = None, **kwargs) -> None:
        super().__init__(num_features, *args, **kwargs)
        if ghost_batch is not None and (not isinstance(ghost_batch, int) or ghost_batch < 1):
            raise ValueError(f"ghost_batch must be a positive integer or None, got {ghost_batch!r}")
        self.ghost_batch = ghost_batch

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ghost_batch={self.ghost_batch}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.ghost_batch
        if not self.training or k is None or x.shape[0] == k:
            return super().forward(x)
        if x.shape[0] % k:
            raise ValueError(
                f"model.bn_batch: {k} does not divide the micro batch of {x.shape[0]} samples "
                f"(data.micro_batch); set model.bn_batch to a divisor of it"
            )
        self._check_input_dim(x)
        running: tuple[torch.Tensor, torch.Tensor] | None = None  # (mean, var) when tracked
        if self.track_running_stats and self.running_mean is not None:
            assert self.running_var is not None and self.num_batches_tracked is not None  # registered together
            running = (self.running_mean, self.running_var)
            self.num_batches_tracked.add_(1)
            momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        else:
            momentum = 0.0
        outs, means, vars_ = [], [], []
        for group in x.split(k):
            rm, rv = (running[0].clone(), running[1].clone()) if running is not None else (None, None)
            outs.append(F.batch_norm(group, rm, rv, self.weight, self.bias, True, momentum, self.eps))
            if rm is not None and rv is not None:
                means.append(rm)
                vars_.append(rv)
        if running is not None:
            with torch.no_grad():
                running[0].copy_(torch.stack(means).mean(0))
                running[1].copy_(torch.stack(vars_).mean(0))
        return torch.cat(outs)
