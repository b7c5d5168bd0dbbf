"""Time to accuracy (MLPerf's metric): ``run.target_top1`` stops a run at the first validation
whose ``val/top1`` is at or above the target.

:class:`TimeToTarget` records the epochs, optimizer steps and wall time (seconds from the start of
``fit``; a resumed run adds the time before its checkpoint) it took, for ``summary.json``
(:class:`resnet_lamb.telemetry.RunStatus` writes :meth:`TimeToTarget.summary_fields`), the console
and the W&B run summary.  ``val/top1`` is a torchmetrics value synced across ranks; rank 0's
decision is broadcast anyway, so every rank stops after the same validation.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback


class TimeToTarget(Callback):
    """Stop at the first validation with ``val/top1 >= target``; record when that was."""

    def __init__(self, target: float):
        self.target = float(target)
        self.reached: dict[str, Any] | None = None  # epochs, steps, seconds when reached
        self._offset = 0.0  # wall seconds of the fits before a resume
        self._start = time.monotonic()

    def _elapsed(self) -> float:
        return self._offset + time.monotonic() - self._start

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.monotonic()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.reached is not None:  # resumed from a run that had already reached its target
            trainer.should_stop = True

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.reached is not None or trainer.state.fn != "fit":
            return
        top1 = trainer.callback_metrics.get("val/top1")
        record = None
        if top1 is not None and float(top1) >= self.target:
            record = {
                "top1": round(float(top1), 6),
                "epochs": trainer.current_epoch + 1,
                "steps": trainer.global_step,
                "seconds": round(self._elapsed(), 3),
            }
        record = trainer.strategy.broadcast(record, src=0)  # one decision, rank 0's, on every rank
        if record is None:
            return
        self.reached = record
        trainer.should_stop = True
        if trainer.is_global_zero:
            print(
                f"resnet-lamb: val/top1 {record['top1']:.4f} reached run.target_top1 {self.target} after "
                f"{record['epochs']} epochs, {record['steps']} optimizer steps, {record['seconds']:.1f} s; "
                "run stopped",
                file=sys.stderr,
                flush=True,
            )
            from lightning.pytorch.loggers import WandbLogger

            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.experiment.summary.update({f"time_to_target/{k}": v for k, v in record.items()})

    def summary_fields(self) -> dict[str, Any]:
        """``summary.json``'s ``time_to_target``: the target, whether it was reached and when."""
        out: dict[str, Any] = {"target_top1": self.target, "reached": self.reached is not None}
        out.update(self.reached or {"top1": None, "epochs": None, "steps": None, "seconds": None})
        return {"time_to_target": out}

    def state_dict(self) -> dict[str, Any]:
        return {"target": self.target, "reached": self.reached, "seconds": self._elapsed()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._offset = float(state_dict.get("seconds", 0.0))
        if state_dict.get("target") == self.target:
            self.reached = state_dict.get("reached")
