"""Callbacks: throughput, trust ratios, a progress display that suits both terminals and CI logs.

* :class:`Throughput` logs ``train/img_per_s``: training images (all ranks, padding included)
  per wall-clock second over the optimizer steps since the epoch start or the last log.
* :class:`TrustRatios` logs ``optim/trust_ratio/<param name>`` every ``every`` optimizer steps
  from ``optimizer.trust_ratios()`` (the ratios the last step used), straight to every logger
  so the cadence does not depend on ``trainer.log_every_n_steps``.  Optimizers without
  ``trust_ratios`` are skipped.
* :class:`RunStatus` writes ``<run folder>/failed.txt`` (one line: the error) when a fit dies of
  an exception, ``interrupted.txt`` instead when Ctrl-C (KeyboardInterrupt) or SIGTERM stopped it,
  and removes them when a fit of that folder finishes, so ``report`` can tell a failed run (a
  diverged optimizer, say) from an interrupted one and from one still in progress. It also keeps
  ``summary.json``, the run's own record of how its last fit stands (``status``: running, complete,
  failed or interrupted; ``message``, ``global_step``, ``epoch``, ``fit_seconds``, ``ended``), and
  gives the run's ``plan.json`` to W&B as the config key ``plan``.
* :class:`FirstStepRow` sends the first optimizer step's ``train/*`` values of each fit to the
  loggers and flushes them, whatever ``log_every_n_steps``: a 3-step run still leaves
  ``csv/metrics.csv``, a short epoch a train row (the CLI flushes the CSV at every logged row).
* :func:`progress_bar`: Lightning's ``RichProgressBar`` on a terminal, reading the logged metrics
  every N optimizer steps rather than every micro-batch (:class:`StepRichProgressBar`: each read is
  a GPU sync); on a pipe or CI log a :class:`LineProgress` that prints one plain line every N
  optimizer steps and, inside a long accumulated step, a line at least every ``every_s`` seconds
  (rich draws nothing useful into a non-terminal until each bar finishes).
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
        self.last = {f"optim/trust_ratio/{n}": v for n, v in zip(names, values, strict=True)}
        for logger in trainer.loggers:
            logger.log_metrics(self.last, step=step - 1)


class RunStatus(Callback):
    """``failed.txt`` (an error) or ``interrupted.txt`` (Ctrl-C, SIGTERM) in the run folder while the
    last fit of it ended so; one line, the exception's type and message. ``summary.json``: how the
    last fit stands (written at its start, its end and on an exception)."""

    def __init__(self, run_dir: str):
        from pathlib import Path

        self.folder = Path(run_dir)
        self._start = time.monotonic()

    def _summary(self, trainer: pl.Trainer, status: str, message: str = "") -> None:
        import datetime
        import json

        summary = {
            "status": status,
            "message": message,
            "global_step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "fit_seconds": round(time.monotonic() - self._start, 3),
            "ended": None if status == "running" else datetime.datetime.now(datetime.UTC).isoformat(),
        }
        for callback in getattr(trainer, "callbacks", []):  # e.g. TimeToTarget's time_to_target
            fields = getattr(callback, "summary_fields", None)
            if callable(fields):
                summary.update(fields())
        try:  # replaced whole: `report` may read it while the run goes on
            tmp = self.folder / ".summary.json.tmp"
            tmp.write_text(json.dumps(summary, indent=1) + "\n")
            tmp.replace(self.folder / "summary.json")
        except OSError:  # a full or read-only disk: the run (or its error) goes on
            pass

    @rank_zero_only
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import json

        from lightning.pytorch.loggers import WandbLogger

        self._start = time.monotonic()
        self._summary(trainer, "running")
        plan = self.folder / "plan.json"
        for logger in trainer.loggers if plan.is_file() else []:  # W&B runs carry the plan `report` reads
            if isinstance(logger, WandbLogger):
                logger.log_hyperparams({"plan": json.loads(plan.read_text())})

    @rank_zero_only
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        stopped = isinstance(exception, (KeyboardInterrupt, SIGTERMException))
        message = " ".join(str(exception).split())
        line = f"{type(exception).__name__}{': ' + message if message else ''}"
        try:
            (self.folder / ("failed.txt" if stopped else "interrupted.txt")).unlink(missing_ok=True)
            (self.folder / ("interrupted.txt" if stopped else "failed.txt")).write_text(line + "\n")
        except OSError:  # a full or read-only disk: the error itself still reaches the user
            pass
        self._summary(trainer, "interrupted" if stopped else "failed", line)

    @rank_zero_only
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for name in ("failed.txt", "interrupted.txt"):
            (self.folder / name).unlink(missing_ok=True)
        self._summary(trainer, "complete")


class FirstStepRow(Callback):
    """The first optimizer step's logged ``train/*`` values, sent to every logger and flushed."""

    def __init__(self) -> None:
        self._start = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._start is None or trainer.global_step == self._start:  # not started, or accumulating
            return
        self._start = None
        every = trainer.log_every_n_steps
        if not every or trainer.global_step % every == 0:  # logging off, or Lightning logs this step itself
            return
        row = {k: float(v) for k, v in trainer.logged_metrics.items() if k.startswith("train/")}
        if not row:
            return
        row["epoch"] = trainer.current_epoch
        for logger in trainer.loggers:  # the same step index Lightning's rows carry: the step just taken
            logger.log_metrics(row, step=trainer.global_step - 1)
            logger.save()


class LineProgress(ProgressBar):
    """Plain progress lines for logs that are not a terminal (rank 0 only).

    * Every ``every`` optimizer steps, the first and the last of the fit, and any step ending
      ``every_s`` seconds after the previous line: ``epoch E  step S [D/T]  loss ..  lr ..  img/s
      eta``; S is the index of the step just taken and lr the LR it used, as in the CSV's ``step``
      and ``train/lr`` columns; D/T steps done of the run's.
    * Inside an accumulated step, whenever ``every_s`` seconds passed since the last line:
      ``epoch E  step S [D/T]  micro-batch A/N  img/s  eta``, S the step in progress, A of its N
      micro-batches done.
    img/s: images of all ranks (padding included) since the previous line; eta: from the
    micro-batch rate of this fit. Counted on the host from batch shapes: no device sync per
    micro-batch (a step line reads the logged loss, one sync per line).
    """

    def __init__(self, every: int = 10, every_s: float = 30.0) -> None:
        super().__init__()
        self.every = max(int(every), 1)
        self.every_s = float(every_s)
        self._enabled = True
        self._t0 = 0.0
        self._step0 = 0  # optimizer steps done when this fit started (a resumed run)
        self._micro = 0  # micro-batches done in this fit
        self._last_print = 0.0
        self._images = 0  # images since the last line

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _print(self, msg: str) -> None:
        if self._enabled and self.trainer.is_global_zero:
            print(msg, flush=True)
            self._last_print, self._images = time.perf_counter(), 0

    def on_train_start(self, trainer, pl_module) -> None:
        self._t0 = self._last_print = time.perf_counter()
        self._step0 = trainer.global_step
        self._micro = self._images = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not (self._enabled and trainer.is_global_zero):
            return
        self._micro += 1
        self._images += _batch_rows(batch) * _world(trainer)
        accum = max(int(trainer.accumulate_grad_batches), 1)
        in_step = (batch_idx + 1) % accum  # micro-batches of the current step done; 0: a step just ended
        now = time.perf_counter()
        due = now - self._last_print >= self.every_s
        step = trainer.global_step  # optimizer steps done
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        done = f"[{step}/{total}]" if total else f"[{step}]"
        if in_step:
            if due:
                self._print(
                    "  ".join(
                        [
                            f"epoch {trainer.current_epoch}",
                            f"step {step} {done}",
                            f"micro-batch {in_step}/{accum}",
                            *self._rate_eta(now, total, accum),
                        ]
                    )
                )
            return
        if step % self.every and step != total and step != self._step0 + 1 and not due:
            return
        parts = [f"epoch {trainer.current_epoch}", f"step {step - 1} {done}"]
        metrics = trainer.callback_metrics
        if "train/loss" in metrics:
            parts.append(f"loss {float(metrics['train/loss']):.4f}")
        if "train/lr" in metrics:  # the LR this step used (the CSV's train/lr)
            parts.append(f"lr {float(metrics['train/lr']):.5g}")
        self._print("  ".join(parts + self._rate_eta(now, total, accum)))

    def _rate_eta(self, now: float, total, accum: int) -> list[str]:
        out = [f"{self._images / (now - self._last_print):.1f} img/s"] if now > self._last_print else []
        if total and self._micro and now > self._t0:  # micro-batches left of the run, at this fit's rate
            left = total * accum - (self._step0 * accum + self._micro)
            out.append(f"eta {_fmt_time((now - self._t0) / self._micro * max(left, 0))}")
        return out

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        m = trainer.callback_metrics
        vals = [f"{k} {float(m[k]):.4f}" for k in ("val/top1", "val/top5", "val/loss") if k in m]
        if vals:  # after the epoch's last step: its index, as the CSV's val row
            self._print(f"epoch {trainer.current_epoch}  step {trainer.global_step - 1}  " + "  ".join(vals))


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


def progress_bar(every: int = 10, every_s: float = 30.0) -> ProgressBar:
    """Rich bar (with the logged images/s, loss and ETA) on a terminal, plain lines otherwise."""
    if sys.stdout.isatty() and sys.stderr.isatty():
        return StepRichProgressBar(every)
    return LineProgress(every, every_s)
