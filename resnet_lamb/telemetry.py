"""Callbacks: throughput, trust ratios, a progress display that suits both terminals and CI logs.

* :class:`Throughput` logs ``train/img_per_s``: training images (all ranks, padding included)
  per wall-clock second over the optimizer steps since the epoch start or the last log.
* :class:`TrustRatios` logs ``optim/trust_ratio/<param name>`` every ``every`` optimizer steps
  from ``optimizer.trust_ratios()`` (the ratios the last step used), straight to every logger
  so the cadence does not depend on ``trainer.log_every_n_steps``.  Optimizers without
  ``trust_ratios`` are skipped.
* :class:`RunStatus` writes ``<run folder>/failed.txt`` (one line: the error) when a fit dies of
  an exception, and removes it when a fit of that folder finishes, so ``report`` can tell a
  failed run (a diverged optimizer, say) from one still in progress.
* :func:`progress_bar`: Lightning's ``RichProgressBar`` on a terminal, reading the logged metrics
  every N optimizer steps rather than every micro-batch (:class:`StepRichProgressBar`: each read is
  a GPU sync); on a pipe or CI log a :class:`LineProgress` that prints one plain line every N
  optimizer steps (rich draws nothing useful into a non-terminal until each bar finishes).
"""
from __future__ import annotations

import math
import sys
import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ProgressBar, RichProgressBar
from lightning.pytorch.utilities import rank_zero_only


def _world(trainer: pl.Trainer) -> int:
    return max(int(trainer.world_size), 1)


def _batch_rows(batch: Any) -> int:
    if isinstance(batch, (list, tuple)) and len(batch) >= 2 and hasattr(batch[1], "shape"):
        return int(batch[1].shape[0])
    if isinstance(batch, (list, tuple)) and batch and hasattr(batch[0], "shape"):
        return int(batch[0].shape[0])
    return 0


class Throughput(Callback):
    """``train/img_per_s`` over a window of optimizer steps (reset at each epoch start)."""

    def __init__(self) -> None:
        self._t0 = 0.0
        self._images = 0
        self._last_step = -1
        self.rate = float("nan")

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()
        self._images = 0
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._images += _batch_rows(batch) * _world(trainer)
        step = trainer.global_step
        if step == self._last_step:  # accumulating: no optimizer step yet
            return
        self._last_step = step
        now = time.perf_counter()
        if now > self._t0:
            self.rate = self._images / (now - self._t0)
            pl_module.log("train/img_per_s", self.rate, on_step=True, on_epoch=False, prog_bar=True)
        if step % max(trainer.log_every_n_steps, 1) == 0:  # new window after each logged value
            self._t0, self._images = now, 0


class TrustRatios(Callback):
    """``optim/trust_ratio/<param>`` every ``every`` optimizer steps (0 = off)."""

    def __init__(self, every: int = 100) -> None:
        self.every = int(every)
        self._last_step = -1
        self.last: dict[str, float] = {}  # what was logged last (tests compare it)

    @rank_zero_only
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every <= 0 or step == self._last_step or step == 0:
            return
        self._last_step = step
        if step % self.every:
            return
        # the ratios the optimizer step just taken used; that step's 0-based index is step - 1,
        # the same x-axis as train/lr (logged with the index of the step it is used by)
        fn = getattr(trainer.optimizers[0], "trust_ratios", None) if trainer.optimizers else None
        if fn is None:
            return
        ratios = fn()
        if not ratios:
            return
        names = list(ratios)
        values = torch.stack([torch.as_tensor(ratios[n]).float().reshape(()) for n in names]).cpu().tolist()
        self.last = {f"optim/trust_ratio/{n}": v for n, v in zip(names, values)}
        for logger in trainer.loggers:
            logger.log_metrics(self.last, step=step - 1)


class RunStatus(Callback):
    """``failed.txt`` in the run folder while the last fit of it ended in an exception."""

    def __init__(self, run_dir: str):
        from pathlib import Path

        self.path = Path(run_dir) / "failed.txt"

    @rank_zero_only
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        message = " ".join(str(exception).split()) or type(exception).__name__
        try:
            self.path.write_text(f"{type(exception).__name__}: {message}\n")
        except OSError:  # a full or read-only disk: the error itself still reaches the user
            pass

    @rank_zero_only
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.path.unlink(missing_ok=True)


class LineProgress(ProgressBar):
    """Plain progress lines for logs that are not a terminal: step, loss, lr, images/s, ETA."""

    def __init__(self, every: int = 10) -> None:
        super().__init__()
        self.every = max(int(every), 1)
        self._enabled = True
        self._t0 = None
        self._step0 = 0
        self._last_step = -1

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _print(self, msg: str) -> None:
        if self._enabled and self.trainer.is_global_zero:
            print(msg, flush=True)

    def on_train_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()
        self._step0 = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._last_step:
            return
        self._last_step = step
        if step == 0:
            return
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        if step % self.every and step != total:
            return
        m = self.get_metrics(trainer, pl_module)
        parts = [f"epoch {trainer.current_epoch}", f"step {step}" + (f"/{total}" if total else "")]
        for key, fmt in (("train/loss", "loss {:.4f}"), ("train/img_per_s", "{:.1f} img/s")):
            if key in m:
                parts.append(fmt.format(float(m[key])))
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else None
        if lr is not None:
            parts.append(f"lr {lr:.5g}")
        done = step - self._step0
        if total and done > 0 and self._t0 is not None:
            eta = (time.perf_counter() - self._t0) / done * (total - step)
            parts.append(f"eta {_fmt_time(eta)}")
        self._print("  ".join(parts))

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        m = trainer.callback_metrics
        vals = [f"{k} {float(m[k]):.4f}" for k in ("val/top1", "val/top5", "val/loss") if k in m]
        if vals:
            self._print(f"epoch {trainer.current_epoch}  step {trainer.global_step}  " + "  ".join(vals))


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class StepRichProgressBar(RichProgressBar):
    """Lightning's rich bar, whose metrics are read after an optimizer step every ``every`` steps
    (and kept in between): Lightning's bar reads them after every micro-batch, and reading copies
    each logged device tensor to the host, a GPU sync per micro-batch."""

    def __init__(self, every: int = 10) -> None:
        super().__init__(leave=True)
        self.every = max(int(every), 1)
        self._shown: dict = {}
        self._read_at = -1

    def get_metrics(self, trainer, pl_module):
        step = trainer.global_step
        if self._read_at < 0 or (step != self._read_at and step % self.every == 0):
            self._read_at = step
            self._shown = super().get_metrics(trainer, pl_module)
        return self._shown


def progress_bar(every: int = 10) -> ProgressBar:
    """Rich bar (with the logged images/s, loss and ETA) on a terminal, plain lines otherwise."""
    if sys.stdout.isatty() and sys.stderr.isatty():
        return StepRichProgressBar(every)
    return LineProgress(every)
