"""Test-only Lightning callback for tests/test_ddp_step.py, loaded by the recipe as
``trainer.callbacks: [{class_path: ddp_helpers.StepRecorder, init_args: {...}}]`` (tests/ on PYTHONPATH).

Per rank it writes ``<out>/rank<R>.json`` with:
- ``micro``: per training micro-batch, the optimizer step it belongs to (0-based), its loss sum over
  real samples and its count of real samples (label >= 0), as the rank computed them;
- ``skipped``: the module's skipped-step count after each optimizer step;
- ``weights``: a float64 sum of every trainable parameter at the end (replicas must agree);
- ``strategy``: the strategy class, DDP keyword arguments and precision the trainer runs with.
- ``skipped_files``: the data module's known-bad files at the end.
``nan_rank``/``nan_step``: on that rank only, the loss of optimizer step ``nan_step`` (1-based) gets
``+ nan`` added to its value (gradients stay finite: a constant's derivative is 0), so only that rank
sees a non-finite loss. ``signal_rank``/``signal_step``: that rank sends itself SIGUSR1 during the
first micro-batch of optimizer step ``signal_step``.
"""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import lightning.pytorch as pl


class StepRecorder(pl.Callback):
    def __init__(self, out: str, nan_rank: int = -1, nan_step: int = 0, signal_rank: int = -1,
                 signal_step: int = 0):
        self.out = Path(out)
        self.nan_rank, self.nan_step = nan_rank, nan_step
        self.signal_rank, self.signal_step = signal_rank, signal_step
        self.record: dict = {"micro": [], "skipped": []}
        self._last_step = -1

    def setup(self, trainer, pl_module, stage):
        self.out.mkdir(parents=True, exist_ok=True)
        real, rank = pl_module._loss_sum, trainer.global_rank

        def loss_sum(logits, labels):
            out = real(logits, labels)
            if pl_module.training:
                if rank == self.nan_rank and pl_module.global_step == self.nan_step - 1:
                    out = out + float("nan")
                self.record["micro"].append([pl_module.global_step, float(out), int((labels >= 0).sum())])
            return out

        pl_module._loss_sum = loss_sum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if (trainer.global_rank == self.signal_rank and trainer.global_step == self.signal_step - 1
                and batch_idx % trainer.accumulate_grad_batches == 0):
            os.kill(os.getpid(), signal.SIGUSR1)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self._last_step:
            self._last_step = trainer.global_step
            self.record["skipped"].append([trainer.global_step, pl_module.skipped_steps])

    def on_fit_end(self, trainer, pl_module):
        strategy = trainer.strategy
        self.record["strategy"] = {"class": type(strategy).__name__,
                                   "ddp_kwargs": dict(getattr(strategy, "_ddp_kwargs", {}) or {}),
                                   "precision": str(trainer.precision)}
        self.record["weights"] = {n: float(p.detach().double().sum()) for n, p in pl_module.named_parameters()}
        self.record["global_step"] = trainer.global_step
        self.record["skipped_files"] = list(trainer.datamodule.skipped)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.record))
