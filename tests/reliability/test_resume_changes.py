"""Resume across changes (issue 7, item 6), in-process, tiny MLP runs on synthetic data (6 optimizer
steps, 3 per epoch; the first run stops at step 3 with trainer.max_steps, leaving last.ckpt):

- another optimizer + global batch (``--ckpt_path last``), or another base_lr (``--ckpt_path FILE``),
  is refused with one line naming the keys and ``--run.force_resume true``; nothing is trained,
  the checkpoint is untouched;
- another micro batch is accepted: accumulation 4 instead of 2, the run ends at step 6 and every
  logged LR equals the schedule's value at that step (the schedule position is kept);
- forced with another base_lr: from step 3 on the LRs are the new recipe's, the optimizer state is
  kept (LAMB's step counts reach 6); forced with another optimizer (SGD): a fresh optimizer state,
  the run ends at step 6.
(Another world size: tests/reliability/test_kill.py resumes a killed 2-rank torchrun job on 1
process; kill and resume with another accumulation: tests/test_train_resume.py.)
"""
from __future__ import annotations

import shutil

import pytest
import torch

from conftest import read_csv, run_cli, tiny_recipe, write_recipe


def expected_lrs(recipe: dict, steps: int, world_size: int = 1) -> list[float]:
    """The LR of optimizer steps 0..steps-1 as the recipe's plan and schedule define them."""
    from resnet_lamb.optim.schedules import multiplier_fn
    from resnet_lamb.recipe import OptimizerSpec, ScheduleSpec, derive_plan

    opt, sched = OptimizerSpec(**recipe["model"]["optimizer"]), ScheduleSpec(**recipe["model"]["schedule"])
    d = recipe["data"]
    plan = derive_plan(opt, sched, global_batch=d["global_batch"], micro_batch=d["micro_batch"],
                       world_size=world_size, train_images=d["train_images"], epochs=recipe["trainer"]["max_epochs"])
    factor = multiplier_fn(sched, plan)
    return [plan.lr * factor(s) for s in range(steps)]


def logged_lrs(run) -> dict[int, float]:
    return {int(r["step"]): float(r["train/lr"]) for r in read_csv(run) if r.get("train/lr")}


def test_resume_with_changes(tmp_path, capsys):
    recipe = tiny_recipe(None, **{"model.arch": "mlp", "model.mlp_hidden": [32]})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    runs = tmp_path / "runs"
    common = ["fit", "--config", str(path), "--run.root", str(runs), "--run.wandb", "false"]
    assert run_cli(*common, "--run.name", "a", "--trainer.max_steps", "3") == 0
    last = runs / "a" / "checkpoints" / "last.ckpt"
    step3 = tmp_path / "step3.ckpt"
    shutil.copy(last, step3)
    assert torch.load(step3, weights_only=False)["global_step"] == 3
    before = last.stat().st_mtime_ns
    capsys.readouterr()

    # refused: other optimizer and global batch; other base_lr
    sgd = ["--model.optimizer.name", "sgd", "--model.optimizer.kwargs", "{}"]
    assert run_cli(*common, "--run.name", "a", "--ckpt_path", "last", *sgd, "--data.global_batch", "16") == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert err == [f"resnet-lamb: error: ckpt_path: {last} was trained with another recipe ("
                   "data.global_batch 32 -> 16, model.optimizer.name 'lamb' -> 'sgd'); resume with the "
                   "checkpoint's values, or pass --run.force_resume true to continue with the new ones"], err
    # an explicit path as well (Lightning's CLI would have swapped in the checkpoint's model config)
    assert run_cli(*common, "--run.name", "a", "--ckpt_path", str(step3), "--model.optimizer.base_lr", "0.02") == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("resnet-lamb: error:")]
    assert len(err) == 1 and f"{step3} was trained with another recipe (model.optimizer.base_lr 0.01 -> 0.02)" in err[0]
    assert last.stat().st_mtime_ns == before

    # accepted: another micro batch (accumulation 4); the schedule position and every LR as planned
    assert run_cli(*common, "--run.name", "a", "--ckpt_path", "last", "--data.micro_batch", "8") == 0
    out = capsys.readouterr().out
    assert "accumulation 4 (global batch 32 = micro 8 x 1 devices x 4)" in out
    ckpt = torch.load(last, weights_only=False)
    assert ckpt["global_step"] == 6 and ckpt["lr_schedulers"][0]["last_epoch"] == 6
    lrs = logged_lrs(runs / "a")
    assert sorted(lrs) == list(range(6))
    assert [lrs[s] for s in range(6)] == pytest.approx(expected_lrs(recipe, 6), rel=1e-6)

    # forced: another base_lr -> the new LRs from step 3 on, LAMB's state kept
    assert run_cli(*common, "--run.name", "b", "--ckpt_path", str(step3), "--model.optimizer.base_lr", "0.02",
                   "--run.force_resume", "true") == 0
    err = capsys.readouterr().err
    assert ("resnet-lamb: resuming with another recipe (model.optimizer.base_lr): optimizer state kept, the new LR "
            "schedule from the restored step") in err
    new = dict(recipe, model=dict(recipe["model"], optimizer=dict(recipe["model"]["optimizer"], base_lr=0.02)))
    lrs = logged_lrs(runs / "b")
    assert sorted(lrs) == [3, 4, 5]
    assert [lrs[s] for s in (3, 4, 5)] == pytest.approx(expected_lrs(new, 6)[3:], rel=1e-6)
    ckpt = torch.load(runs / "b" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 6 and ckpt["lr_schedulers"][0]["base_lrs"][0] == pytest.approx(2 * 0.01)
    assert {float(s["step"]) for s in ckpt["optimizer_states"][0]["state"].values()} == {6.0}
    assert ckpt["resnet_lamb"]["recipe"]["model.optimizer.base_lr"] == 0.02

    # forced: another optimizer -> a fresh optimizer state (SGD's momentum buffers), same step count
    assert run_cli(*common, "--run.name", "c", "--ckpt_path", str(step3), *sgd, "--run.force_resume", "true") == 0
    assert "(model.optimizer.name): fresh optimizer state" in capsys.readouterr().err
    ckpt = torch.load(runs / "c" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 6
    assert all(set(s) == {"momentum_buffer"} for s in ckpt["optimizer_states"][0]["state"].values())
