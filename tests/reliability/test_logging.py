"""Issue 7, item 5: logging faults. The run either continues with one clear line or stops with one,
and never leaves a corrupt or half-written checkpoint.

* W&B with no API key and no network: offline, one line, no prompt, no wait (a real process with
  stdin closed and a time limit).
* W&B with a key but no route to the server: offline, one line (wandb itself would wait 90 s and
  then fail the run with a traceback).
* A read-only run folder: one line before anything is built, exit 2.
* The disk fills up while a checkpoint is written: the run stops with one line naming the file,
  the previous ``last.ckpt`` is intact and loads, no temp file is left, and the run resumes from it.
"""
from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, tiny_recipe, write_recipe

SCRIPT = Path(sys.executable).with_name("resnet-lamb")
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "resnet_lamb"]
NO_SERVER = "http://127.0.0.1:9"  # the discard port: nothing listens, a connect is refused at once
SYNC = "(sync later with `wandb sync runs/<name>/wandb/offline-run-*`)"


def _small(**over) -> dict:
    """tiny_recipe at 8 px with 2 optimizer steps an epoch: these tests are about files, not training."""
    return tiny_recipe(None, **{"trainer.enable_progress_bar": False, "data.train_images": 32, "data.val_images": 16,
                                "data.global_batch": 16, "data.micro_batch": 16, "data.image_size": 8,
                                "model.optimizer.base_batch": 16, **over})


def _one_epoch(tmp_path: Path) -> Path:
    return write_recipe(tmp_path / "r.yaml", _small(**{"trainer.max_epochs": 1}))


def test_wandb_without_key_or_network_goes_offline_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "NETRC"}
    env.update(HOME=str(tmp_path), WANDB_BASE_URL=NO_SERVER, WANDB_SILENT="true", PYTHONWARNINGS="ignore")
    recipe = _one_epoch(tmp_path)
    proc = subprocess.run([*COMMAND, "fit", "--config", str(recipe), "--run.root", str(tmp_path / "runs"),
                           "--run.name", "run"], cwd=REPO, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = [line for line in proc.stderr.splitlines() if line.startswith("resnet-lamb:")]
    assert ours == [f"resnet-lamb: no W&B API key configured; logging to W&B offline {SYNC}"]
    assert list((tmp_path / "runs" / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert (tmp_path / "runs" / "run" / "checkpoints" / "last.ckpt").is_file()


def test_wandb_key_without_network_goes_offline_in_one_line(monkeypatch, capsys):
    from resnet_lamb.run_logging import wandb_mode

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", NO_SERVER)
    assert wandb_mode() == "offline"
    assert os.environ["WANDB_MODE"] == "offline"  # what WandbLogger and wandb.init then read
    assert capsys.readouterr().err.splitlines() == [
        f"resnet-lamb: W&B server {NO_SERVER} unreachable; logging to W&B offline {SYNC}"]


def test_read_only_run_folder_stops_before_anything_is_built(tmp_path, unprivileged):
    runs = tmp_path / "runs"
    runs.mkdir()
    os.chmod(runs, 0o555)
    recipe = _one_epoch(tmp_path)
    try:
        proc = subprocess.run([*COMMAND, "fit", "--config", str(recipe), "--run.root", str(runs), "--run.name", "run",
                               "--run.wandb", "false"], cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=300, **unprivileged)
    finally:
        os.chmod(runs, 0o755)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [
        f"resnet-lamb: error: run.root: cannot write the run folder {runs / 'run'} (Permission denied); pass a "
        "writable --run.root or fix the folder's permissions"]
    assert proc.stdout == "", "refused before the plan is printed"
    assert not list(runs.iterdir())


def test_disk_full_during_checkpoint_save_keeps_the_last_checkpoint(fit, tmp_path, monkeypatch, capsys):
    """Every checkpoint write after epoch 1 fails as torch.save fails on a full disk (a partial
    file, then a RuntimeError raised while handling ENOSPC: what torch.save does on a full tmpfs)."""
    real = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("global_step", 0) > 2:
            f.write(b"PK\x03\x04" + b"\0" * 4096)
            try:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    run = fit(_small(), name="full", expect=2)
    ck = run / "checkpoints"
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("resnet-lamb: error:")]
    assert len(errors) == 1, errors
    assert re.fullmatch(
        rf"resnet-lamb: error: {re.escape(str(ck))}/(last|best-[^ ]+)\.ckpt: cannot write checkpoint \(No space left "
        rf"on device\); run stopped, the checkpoints already in {re.escape(str(ck.resolve()))} are intact; free space "
        r"there and resume with --ckpt_path last", errors[0]), errors[0]
    assert not list(ck.glob(".tmp-*")), "the partial temp file is removed"
    last = torch.load(ck / "last.ckpt", map_location="cpu", weights_only=False)
    assert (last["epoch"], last["global_step"]) == (0, 2), "the epoch-1 checkpoint, untouched"
    monkeypatch.setattr(torch, "save", real)  # space freed: resume from it
    fit(_small(), "--ckpt_path", "last", name="full")
    assert torch.load(ck / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 4


def test_ctrl_c_during_a_checkpoint_write_stays_an_interrupt(tmp_path, monkeypatch):
    """A KeyboardInterrupt inside torch.save that carries an OSError torch handled is Ctrl-C, not a
    full disk: it propagates as itself (the run is then "interrupted", not "failed"); no temp file."""
    from resnet_lamb.checkpoints import AtomicCheckpointIO, CheckpointWriteError

    def interrupted(obj, f, *args, **kwargs):
        try:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        except OSError:
            raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt) as caught:
        AtomicCheckpointIO().save_checkpoint({"global_step": 1}, tmp_path / "last.ckpt")
    assert not isinstance(caught.value, CheckpointWriteError) and not list(tmp_path.iterdir())
