"""SIGUSR1 / SIGTERM: save a checkpoint at the next optimizer step and stop, so that a run cut by a
scheduler's time limit (SLURM sends SIGUSR1 ``--signal=USR1@120`` before it, and SIGTERM at it) or a
preemption resumes exactly where it stopped (``--ckpt_path last``).

The signal handler only records the signal. At every optimizer step each rank adds "was I
signalled" to the step's one exchange of flags (:meth:`resnet_lamb.model.LambModule._exchange`,
summed over the ranks), so every rank learns of a signal any rank got at the same step. After that
step, :class:`Preemption` writes ``last.ckpt`` (mid-epoch: Lightning's loop counters, and the
loaders' position through Lightning's stateful-loader protocol) on every rank at once, skips the
end-of-epoch validation and stops the fit; the CLI prints one line and exits 0 (torchrun then ends
instead of restarting the workers; ``launch/slurm.sbatch`` requeues the job once it has).

Why not Lightning's own mechanisms: its SLURM auto-requeue (``SLURMEnvironment(auto_requeue=True)``)
saves ``hpc_ckpt_N.ckpt`` inside the signal handler, wherever each rank happens to be (mid
accumulation, or inside a collective on another rank), and is not active under torchrun (Lightning
picks TorchElasticEnvironment there). Its SIGTERM handling raises on every rank at the next batch
without a checkpoint, after broadcasting rank 0's flag with a host sync on every micro-batch; while
training, the handler here replaces it (the per-batch broadcast is switched off: the per-step
exchange carries the flag instead).
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

from lightning.pytorch.callbacks import Callback

from resnet_lamb.lightning_internals import skip_sigterm_broadcast

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
_requested: list[int] = []  # signals received since the handlers were installed


def stop_requested() -> bool:
    """Whether this process was asked to stop (read at every optimizer step)."""
    return bool(_requested)


def _handler(signum, frame) -> None:  # noqa: ARG001 - the signal module's signature
    _requested.append(signum)


class Preemption(Callback):
    """Installs the handlers while training; after the step at which any rank was signalled, saves
    ``last.ckpt`` and stops the fit (no validation)."""

    def __init__(self) -> None:
        # what signal.getsignal returns and signal.signal takes back
        self._previous: dict[int, Callable[[int, FrameType | None], Any] | int | None] = {}
        self.stopped_at: tuple[int, int, str] | None = None  # (step, epoch, signal name)

    def on_train_start(self, trainer, pl_module) -> None:
        _requested.clear()
        for sig in SIGNALS:  # Lightning installed its SIGTERM handler before this hook: replace it
            self._previous.setdefault(sig, signal.getsignal(sig))
            signal.signal(sig, _handler)
        skip_sigterm_broadcast(trainer)  # Lightning's: a broadcast and a sync per batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not getattr(pl_module, "stop_requested", False) or self.stopped_at is not None:
            return
        name = signal.Signals(_requested[0]).name if _requested else "a stop signal on another rank"
        self.stopped_at = (trainer.global_step, trainer.current_epoch, name)
        ckpt = trainer.checkpoint_callback
        path = None
        if ckpt is not None and hasattr(ckpt, "save_last_now"):
            path = ckpt.save_last_now(trainer)
        trainer.limit_val_batches = 0  # no end-of-epoch validation: stop now
        trainer.should_stop = True
        if trainer.is_global_zero:
            where = f"checkpoint {path}; resume with --ckpt_path last" if path else "no checkpoint (checkpointing off)"
            print(
                f"resnet-lamb: {name}: stopped after optimizer step {trainer.global_step} (epoch "
                f"{trainer.current_epoch}), {where}",
                file=sys.stderr,
                flush=True,
            )

    # the handlers before on_train_start come back when training ends (Lightning then restores the
    # ones from before the fit in its teardown)
    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
