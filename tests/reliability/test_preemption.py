"""SIGUSR1 / SIGTERM (issue 14, item 4): the run saves last.ckpt after the optimizer step during which
the signal came, mid-epoch, stops without validating and exits 0 with one line; `--ckpt_path last`
then continues from the next batch of the same epoch and ends with weights, optimizer state and
schedule bit-identical to a run never stopped, with one CSV row per step.

Tiny recipe: 240 images, global batch 32 = micro 16 x accumulation 2: 8 steps per epoch, 2 epochs.
The signal is sent to the process itself during the first micro-batch of step 12 (epoch 1, its 4th
step), as SLURM's ``--signal=USR1@120`` would arrive.
"""
from __future__ import annotations

import os
import signal

import pytest
import torch

import resnet_lamb.model as model_mod
from conftest import read_csv, run_cli, tiny_recipe, write_recipe
from resnet_lamb.data import dali as dali_backend


def _signal_at(monkeypatch, step: int, sig: int):
    """Send ``sig`` to this process in the first micro-batch of optimizer step ``step`` (1-based)."""
    real = model_mod.LambModule.training_step

    def training_step(self, batch, batch_idx):
        if self.global_step == step - 1 and batch_idx % 2 == 0:
            os.kill(os.getpid(), sig)
        return real(self, batch, batch_idx)

    monkeypatch.setattr(model_mod.LambModule, "training_step", training_step)
    return real


def _load(run):
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


@pytest.mark.parametrize(("backend", "sig"), [("torchvision", signal.SIGUSR1), ("dali", signal.SIGUSR1),
                                              ("synthetic", signal.SIGTERM)])
def test_signal_saves_mid_epoch_and_resume_is_bit_identical(tmp_path, digits_root_large, monkeypatch, capsys,
                                                             one_thread, backend, sig):
    if backend == "dali" and not dali_backend.available():
        pytest.skip("nvidia-dali not installed")
    recipe = tiny_recipe(None if backend == "synthetic" else digits_root_large,
                         **{"data.backend": backend, "trainer.enable_progress_bar": False})
    if backend == "synthetic":
        recipe["data"].update(train_images=240, val_images=40)
    path = write_recipe(tmp_path / "r.yaml", recipe)
    common = ["fit", "--config", str(path), "--run.root", str(tmp_path / "runs"), "--run.wandb", "false"]
    runs = tmp_path / "runs"

    real = _signal_at(monkeypatch, 12, sig)
    assert run_cli(*common, "--run.name", "stopped") == 0
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("resnet-lamb:")]
    last = runs / "stopped" / "checkpoints" / "last.ckpt"
    assert err == [f"resnet-lamb: {signal.Signals(sig).name}: stopped after optimizer step 12 (epoch 1), "
                   f"checkpoint {last}; resume with --ckpt_path last"], err
    saved = _load(runs / "stopped")
    assert saved["global_step"] == 12 and saved["epoch"] == 1
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "images": 4 * 32}]
    assert signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler), "handlers restored after fit"
    val_rows = [r for r in read_csv(runs / "stopped") if r.get("val/top1")]
    assert len(val_rows) == 1, "validated after epoch 0 only: no validation on the way out"

    monkeypatch.setattr(model_mod.LambModule, "training_step", real)
    assert run_cli(*common, "--run.name", "stopped", "--ckpt_path", "last") == 0
    assert run_cli(*common, "--run.name", "straight") == 0
    a, b = _load(runs / "stopped"), _load(runs / "straight")
    assert a["global_step"] == b["global_step"] == 16
    for k, v in b["state_dict"].items():
        assert torch.equal(a["state_dict"][k], v), k
    for pid, state in b["optimizer_states"][0]["state"].items():
        for name, t in state.items():
            assert torch.equal(a["optimizer_states"][0]["state"][pid][name], t), (pid, name)
    assert a["lr_schedulers"] == b["lr_schedulers"]
    steps = [int(r["step"]) for r in read_csv(runs / "stopped") if r.get("train/loss")]
    assert steps == list(range(16)), steps
    straight = {int(r["step"]): r["train/loss"] for r in read_csv(runs / "straight") if r.get("train/loss")}
    resumed = {int(r["step"]): r["train/loss"] for r in read_csv(runs / "stopped") if r.get("train/loss")}
    assert resumed == straight


def test_mid_epoch_checkpoint_resumes_with_another_accumulation(tmp_path, monkeypatch, capsys, one_thread):
    """Stopped at step 12 with accumulation 2, resumed with micro batch 8 (accumulation 4): the last 4
    steps of epoch 1 are taken, each on a whole global batch (4 micro-batches of 8), the schedule and
    the CSV continue; weights are not compared (BatchNorm sees micro-batches of another size)."""
    recipe = tiny_recipe(None, **{"data.train_images": 240, "data.val_images": 40,
                                  "trainer.enable_progress_bar": False})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    common = ["fit", "--config", str(path), "--run.root", str(tmp_path / "runs"), "--run.wandb", "false"]
    real = _signal_at(monkeypatch, 12, signal.SIGUSR1)
    assert run_cli(*common, "--run.name", "stopped") == 0
    seen = []

    def counting(self, batch, batch_idx):
        seen.append((self.current_epoch, self.global_step, batch_idx, len(batch[1])))
        return real(self, batch, batch_idx)

    monkeypatch.setattr(model_mod.LambModule, "training_step", counting)
    assert run_cli(*common, "--run.name", "stopped", "--ckpt_path", "last", "--data.micro_batch", "8") == 0
    resumed = [s for s in seen if s[0] == 1]
    assert [(step, idx) for _, step, idx, _ in resumed] == [(12 + i // 4, 16 + i) for i in range(16)], resumed
    assert all(n == 8 for *_, n in resumed)
    a = _load(tmp_path / "runs" / "stopped")
    assert a["global_step"] == 16 and a["lr_schedulers"][0]["last_epoch"] == 16
    steps = [int(r["step"]) for r in read_csv(tmp_path / "runs" / "stopped") if r.get("train/loss")]
    assert steps == list(range(16)), steps
