"""Checkpoints of a run folder: how they are written, when, and what a resume may load.

* :class:`AtomicCheckpointIO` (a Lightning checkpoint IO plugin): each file written to a temp file in
  its own folder, fsynced and ``os.replace``d; a write that fails on an OSError (disk full) stops the
  run with one line (:class:`CheckpointWriteError`), the older files intact.
* :class:`Checkpoints` (a ModelCheckpoint): ``last.ckpt`` every ``run.checkpoint_every_n_epochs``
  epochs and on request (SIGUSR1/SIGTERM, :mod:`resnet_lamb.preemption`), the best by ``val/top1``
  as a hard link to it.
* Resume policy: :func:`remove_partial_checkpoints` (temp files of an interrupted write),
  :func:`resume_path` (the file ``--ckpt_path`` loads), :func:`check_resume` (the checkpoint's recipe).
* What a checkpoint carries besides Lightning's state: ``checkpoint["resnet_lamb"]["recipe"]``
  (:func:`recipe_identity`: optimizer, schedule, global batch, epochs); ``fit --ckpt_path`` refuses
  to resume with other values unless ``--run.force_resume true`` (:func:`check_resume`).  A forced
  resume keeps the weights, the step count and the data position; it starts a fresh optimizer
  state when the optimizer's name or param_rule changed, and the LR follows the new recipe from
  the restored step on (``LambModule.on_load_checkpoint``).  ``checkpoint["rng_states"]``
  (:func:`rng_state`), restored at the start of training.

Imported by the CLI after the start-up checks (:mod:`resnet_lamb.startup`): it imports torch and
Lightning.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from resnet_lamb.errors import RecipeError, UserError
from resnet_lamb.lightning_internals import is_last_batch, saved_epoch_progress
from resnet_lamb.recipe import OptimizerSpec, ScheduleSpec

# identity keys added after checkpoints were first written: a checkpoint without one was trained
# with its default
IDENTITY_DEFAULTS = {"model.schedule.end_lr": 0.0, "data.epoch_mode": "padded", "model.schedule.decay_steps": None}


def recipe_identity(
    optimizer: OptimizerSpec, schedule: ScheduleSpec, global_batch: int, epochs: int, epoch_mode: str = "padded"
) -> dict[str, Any]:
    """The recipe keys a resumed run must share with its checkpoint, flat (``section.key``), as
    plain JSON-like values.  ``kwargs.impl`` (eager / compiled: the same state dicts) is left out;
    micro batch, world size and ``model.bn_batch`` are not part of it (they change only how the
    global batch is computed, not the run's steps, schedule or data stream)."""
    out: dict[str, Any] = {}
    for prefix, spec in (("model.optimizer.", optimizer), ("model.schedule.", schedule)):
        for f in dataclasses.fields(spec):
            value = getattr(spec, f.name)
            if f.name == "kwargs":
                value = {k: v for k, v in sorted(dict(value or {}).items()) if k != "impl"}
            out[prefix + f.name] = value
    out["data.global_batch"] = int(global_batch)
    out["trainer.max_epochs"] = int(epochs)
    out["data.epoch_mode"] = str(epoch_mode)
    return json.loads(json.dumps(out, default=str))


def recipe_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The keys of two :func:`recipe_identity` dicts whose values differ, sorted (a key one of them
    lacks counts as its :data:`IDENTITY_DEFAULTS` value)."""
    return sorted(
        k
        for k in set(saved) | set(now)
        if saved.get(k, IDENTITY_DEFAULTS.get(k)) != now.get(k, IDENTITY_DEFAULTS.get(k))
    )


def rng_state() -> dict[str, Any]:
    """torch / numpy / python RNG states, as types ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved (CUDA states only where the devices are there)."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(state["cuda"])
        except Exception:  # noqa: BLE001 - fewer devices than when saved: keep the fresh seeds
            pass


def restate_epoch_progress(checkpoint: dict[str, Any], dm: Any) -> None:
    """Lightning counts an epoch's progress in micro-batches. When the run resumes with another
    accumulation (another device count or micro-batch), restate the saved count in the new one:
    a whole epoch for a checkpoint written at its end (else Lightning would finish the "rest"
    of the old epoch), the optimizer steps done times the new accumulation for one written
    mid-epoch (a SIGUSR1 save; the loader's state gives the images consumed), so the loop and
    the loader agree and every step takes a whole global batch."""
    saved = saved_epoch_progress(checkpoint)
    if dm is None:
        return
    try:
        per_epoch = int(dm.steps_per_epoch) * int(dm.accumulation)
    except (TypeError, AttributeError):
        return
    if saved is None:
        return
    prog, loaders = saved
    cur = prog.get("current", {})
    if cur.get("ready") is None:
        return
    if prog.get("is_last_batch"):
        target = per_epoch
    else:
        images = loaders[0].get("images") if loaders and isinstance(loaders[0], dict) else None
        if images is None:
            return
        target = int(images) // int(dm.global_batch) * int(dm.accumulation)
    if cur["ready"] == target:
        return
    lag = {key: cur["ready"] - cur[key] for key in ("started", "processed", "completed") if key in cur}
    cur["ready"] = target
    for key, behind in lag.items():  # keep where the save happened (e.g. before completed counted)
        cur[key] = target - behind


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (disk full, read-only folder): the run stops, older files stay."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``_atomic_save`` goes through an fsspec transaction whose temp file is made by
    ``tempfile.mkstemp()`` in the system temp dir and moved with ``shutil.move``: a copy (not
    atomic) when /tmp is another file system, and never fsynced.  Here: a temp file in the
    target's own folder, fsync, ``os.replace``, fsync of the folder.  Remote URLs fall back."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path = os.fspath(path)
        if "://" in path:
            return super().save_checkpoint(checkpoint, path, storage_options)
        folder = os.path.dirname(os.path.abspath(path))
        tmp = None
        try:
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".ckpt", dir=folder)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual file mode
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as err:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
            oserr = err if isinstance(err, OSError) else err.__cause__ or err.__context__
            if isinstance(err, Exception) and isinstance(oserr, OSError):  # disk full, read-only, quota
                # (not Ctrl-C: a KeyboardInterrupt inside torch.save may carry an OSError it handled)
                raise CheckpointWriteError(
                    f"{path}: cannot write checkpoint ({oserr.strerror or oserr}); run stopped, the "
                    f"checkpoints already in {folder} are intact; free space there and resume with "
                    "--ckpt_path last"
                ) from None
            raise
        try:
            dfd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass


class Checkpoints(ModelCheckpoint):
    """``last.ckpt`` at the end of every ``every_n_epochs``-th epoch and of the last one, after that
    epoch's validation when it has one; the best by ``val/top1`` (``best-epoch...``) whenever a
    validation improves it; ``last.ckpt`` mid-epoch when :class:`resnet_lamb.preemption.Preemption`
    asks (:meth:`save_last_now`).

    One write per save: a new best is written to ``last.ckpt`` and the best file is a hard link to
    it (the next ``last.ckpt`` is a new file, so the link keeps its contents; where the file system
    has no hard links the best is written a second time). Lightning 2.6's ModelCheckpoint writes
    the two as separate full files, and refreshes ``last.ckpt`` only when a best was written at the
    same step (a run killed after an epoch that did not improve would resume from an older one)."""

    def __init__(self, dirpath: str, every_n_epochs: int = 1):
        super().__init__(
            dirpath=dirpath,
            monitor="val/top1",
            mode="max",
            save_last=True,
            save_top_k=1,
            filename="best-epoch{epoch:03d}-top1{val/top1:.4f}",
            auto_insert_metric_name=False,
            every_n_epochs=every_n_epochs,
            save_on_train_epoch_end=False,
            enable_version_counter=False,
        )
        self._last_written_step = -1
        self._step_seen = -1

    @property
    def last_path(self) -> str:
        assert self.dirpath is not None  # set in __init__ (Lightning fills it in only when None)
        return os.path.join(self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)

    def _due(self, trainer) -> bool:
        epoch = trainer.current_epoch + 1
        return epoch % self._every_n_epochs == 0 or epoch >= (trainer.max_epochs or 0)

    # Saved at the end of an epoch's validation, or, for an epoch without one, after its last
    # optimizer step (on_train_batch_end): the two points Lightning resumes from correctly when
    # max_steps is set (from on_train_epoch_end it would count the finished epoch twice).
    def on_validation_end(self, trainer, pl_module):
        if self._should_skip_saving_checkpoint(trainer):
            return
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        # trainer.should_stop: a run stopped at its target (TimeToTarget, a callback that runs before this one)
        if self._due(trainer) or trainer.should_stop or 0 < (trainer.max_steps or 0) <= trainer.global_step:
            self._save_last_checkpoint(trainer, candidates)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self._step_seen:  # accumulating: no optimizer step yet
            return
        self._step_seen = trainer.global_step
        last_batch = is_last_batch(trainer)
        validates = (
            last_batch
            and trainer.enable_validation
            and (trainer.current_epoch + 1) % (trainer.check_val_every_n_epoch or 1) == 0
        )
        stop = 0 < (trainer.max_steps or 0) <= trainer.global_step
        if validates or not ((last_batch and self._due(trainer)) or stop):
            return
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def save_last_now(self, trainer) -> str:
        """``last.ckpt`` at this step, mid-epoch (every rank calls this at the same step)."""
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        return self.last_path

    def _save_checkpoint(self, trainer, filepath):
        last = self.last_path
        if filepath == last:
            if self._last_written_step != trainer.global_step:  # not already written with a new best
                super()._save_checkpoint(trainer, last)
                self._last_written_step = trainer.global_step
            return
        self.last_model_path = last  # part of the state written below
        super()._save_checkpoint(trainer, last)
        self._last_written_step = trainer.global_step
        linked = False
        if trainer.is_global_zero:
            tmp = os.path.join(os.path.dirname(filepath), f".tmp-link-{os.getpid()}.ckpt")
            try:
                os.link(last, tmp)
                os.replace(tmp, filepath)
                linked = True
            except OSError:  # no hard links here (some network file systems)
                if os.path.exists(tmp):
                    os.unlink(tmp)
        if not trainer.strategy.broadcast(linked, src=0):
            super()._save_checkpoint(trainer, filepath)
        self._last_checkpoint_saved = filepath


def remove_partial_checkpoints(ck_dir: Path) -> None:
    """Temp files of a checkpoint write that a kill interrupted (``.tmp-*.ckpt``, never loaded:
    Lightning's ``last`` lookup and the checks here skip dot files) are removed at the next start."""
    for p in sorted(ck_dir.glob(".tmp-*.ckpt")):
        try:
            p.unlink()
            print(f"resnet-lamb: removed {p}, a checkpoint write that was interrupted", file=sys.stderr)
        except OSError:
            pass


def resume_path(ckpt_path: Any, run_dir: Path) -> Path | None:
    """The file ``fit --ckpt_path`` will load (``last``: the run folder's last.ckpt), None if none."""
    if not ckpt_path or ckpt_path in ("best", "hpc", "registry"):
        return None
    path = run_dir / "checkpoints" / "last.ckpt" if ckpt_path == "last" else Path(str(ckpt_path))
    return path if path.is_file() else None


def check_resume(ckpt: Path, recipe: Any, plan: Any, force: bool = False) -> None:
    """Resuming continues the checkpoint's run: the optimizer (name, LR rule, weight decay, param
    rule, kwargs but ``impl``), the schedule, the global batch, the epoch count and mode must be the
    checkpoint's (``recipe_identity`` of the recipe's specs and the run's ``plan``:
    its global batch, epochs and epoch mode); a different world size or micro batch only changes the
    accumulation.  Otherwise one line naming the keys, unless ``force``."""
    try:
        ckpt_dict = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)
        saved = (ckpt_dict.get("resnet_lamb") or {}).get("recipe")
    except Exception as err:  # noqa: BLE001 - truncated or not a checkpoint: say which file
        raise UserError(
            f"ckpt_path: {ckpt} does not load as a checkpoint ({type(err).__name__}: "
            f"{str(err)[:120]}); pass an intact one with --ckpt_path PATH"
        ) from None
    if not saved:
        return  # written before checkpoints recorded their recipe
    now = recipe_identity(recipe.optimizer, recipe.schedule, plan.global_batch, plan.epochs, plan.epoch_mode)
    diff = recipe_changes(saved, now)
    if diff and not force:
        shown = ", ".join(f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in diff)
        raise RecipeError(
            f"ckpt_path: {ckpt} was trained with another recipe ({shown}); resume with the "
            "checkpoint's values, or pass --run.force_resume true to continue with the new ones"
        )
