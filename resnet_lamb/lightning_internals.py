"""Every read or edit of Lightning's internal loop state, in one place, each checked against
Lightning :data:`CHECKED_WITH` (tests/test_private_apis.py fails, naming the attribute, when one
moves).  Everything else goes through Lightning's public hooks; the private methods the
project's subclasses override (ModelCheckpoint, LightningCLI, CSV and W&B loggers) are listed with
these in docs/CONTRACTS.md ("Private APIs").
"""

from __future__ import annotations

from typing import Any

CHECKED_WITH = "2.6.6"  # lightning.__version__ these were read against

# The fit loop's saved state in a checkpoint: checkpoint["loops"]["fit_loop"][...]
FIT_LOOP_KEY = "fit_loop"
BATCH_PROGRESS_KEY = "epoch_loop.batch_progress"  # {"current": {"ready", "started", ...}, "is_last_batch"}
LOADER_STATE_KEY = "combined_loader"  # under "state_dict": the loaders' state_dict()s, in order


def is_last_batch(trainer: Any) -> bool:
    """Whether the micro-batch just run is the epoch's last (read; Lightning sets it from its fetcher)."""
    return bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)


def skip_sigterm_broadcast(trainer: Any) -> None:
    """Edit: the training epoch loop broadcasts rank 0's SIGTERM flag before every micro-batch (a
    collective and a host sync each); :mod:`resnet_lamb.preemption` carries the flag in the step's
    exchange instead.  Absent in another Lightning: nothing to switch off."""
    loop = trainer.fit_loop.epoch_loop
    if hasattr(loop, "_broadcast_sigterm_tensor"):
        loop._broadcast_sigterm_tensor = lambda: None


def saved_epoch_progress(checkpoint: dict[str, Any]) -> tuple[dict[str, Any], list] | None:
    """Edit (of the checkpoint, before Lightning restores it): the fit loop's saved batch progress
    (its ``current`` counters are changed in place by ``LambModule._epoch_boundary``) and the saved
    loader states; None when the checkpoint has no fit loop state."""
    try:
        fit = checkpoint["loops"][FIT_LOOP_KEY]
        progress = fit[BATCH_PROGRESS_KEY]
    except (KeyError, TypeError):
        return None
    return progress, (fit.get("state_dict") or {}).get(LOADER_STATE_KEY) or []
