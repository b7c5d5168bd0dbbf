"""Time to accuracy (run.target_top1): the run stops at the first validation that reaches its
target, summary.json records epochs, steps and wall time, and `report` shows them."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import lightning.pytorch as pl
import pytest
import torch

from conftest import read_csv, run_cli, tiny_recipe


def _recipe(root, epochs):
    return tiny_recipe(root, **{"model.arch": "mlp", "model.mlp_hidden": [32], "trainer.max_epochs": epochs,
                                "model.optimizer.base_lr": 0.02, "model.trust_ratio_every": 0})


def _val_top1(run) -> dict:
    """{epoch (1-based): val/top1} from the run's metrics CSV."""
    return {int(r["epoch"]) + 1: float(r["val/top1"]) for r in read_csv(run) if r.get("val/top1")}


def test_run_stops_at_the_first_validation_reaching_its_target(fit, digits_root, tmp_path):
    epochs = 8
    free = _val_top1(fit(_recipe(digits_root, epochs), name="free"))
    assert sorted(free) == list(range(1, epochs + 1))
    # a target first reached at an epoch before the last: the best top-1 so far rises there
    rises = [e for e in range(2, epochs) if free[e] > max(free[k] for k in range(1, e))]
    assert rises, f"val/top1 never rose before the last epoch: {free}"
    stop = ([e for e in rises if e >= 3] or rises)[0]
    target = free[stop]

    run = fit(_recipe(digits_root, epochs), "--run.target_top1", str(target), name="target")
    got = _val_top1(run)
    first = min(e for e, top1 in got.items() if top1 >= target)
    assert first == stop and max(got) == stop, f"stopped after epoch {max(got)}; val/top1 {got}"
    assert all(got[e] == pytest.approx(free[e]) for e in got)  # the same run up to there (seeded)
    rows = read_csv(run)
    assert max(int(r["epoch"]) for r in rows if r.get("epoch")) == stop - 1, "no later epoch ran"
    summary = json.loads((run / "summary.json").read_text())
    t = summary["time_to_target"]
    steps_per_epoch = 3  # 80 images / global batch 32
    assert summary["status"] == "complete"
    assert t["reached"] is True and t["target_top1"] == target and t["top1"] == pytest.approx(target)
    assert (t["epochs"], t["steps"]) == (stop, stop * steps_per_epoch) == (stop, summary["global_step"])
    assert 0 < t["seconds"] <= summary["fit_seconds"]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == stop - 1 and ckpt["global_step"] == stop * steps_per_epoch  # saved where it stopped

    # an unreachable target: the run goes on to its last epoch, summary says not reached
    unreachable = _recipe(digits_root, 2)
    unreachable["run"] = {"target_top1": 1.0}  # a recipe's run: section, as the MLPerf recipes set it
    never = fit(unreachable, name="never")
    assert sorted(_val_top1(never)) == [1, 2]
    t_never = json.loads((never / "summary.json").read_text())["time_to_target"]
    assert t_never["reached"] is False and t_never["epochs"] is None

    out = tmp_path / "report"
    assert run_cli("report", str(run), str(never), str(tmp_path / "runs" / "free"), "--out", str(out)) == 0
    text = (out / "report.md").read_text()
    section = text.split("## Time to target")[1].split("\n## ")[0]
    table = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| run ")]
    assert len(table) == 2, section  # the free run set no target: not in the table
    cells = {row.split(" | ")[0].strip("| "): [c.strip() for c in row.strip("|").split("|")] for row in table}
    assert cells["target"][3:8] == [f"{target:.4f}", "yes", f"{target:.4f}", str(stop), str(stop * 3)]
    assert cells["target"][8].endswith(" min)") and cells["never"][3:8] == ["1.0000", "no", "-", "-", "-"]


def test_target_out_of_range_is_one_line(fit, digits_root):
    for bad in ("0", "76"):
        fit(_recipe(digits_root, 2), "--run.target_top1", bad, name=f"bad{bad}", expect=2)


class RankOneSeesZero(pl.Callback):
    """Test-only (loaded by class path in the 2-process run): rank 1's val/top1 reads 0 before
    TimeToTarget looks at it, so only rank 0 sees the target reached."""

    def on_validation_end(self, trainer, pl_module):
        if trainer.global_rank == 1:
            trainer.callback_metrics["val/top1"] = torch.tensor(0.0)


def test_two_processes_stop_together_on_rank_zeros_decision(digits_root, tmp_path):
    """2 processes (gloo): rank 1 never sees the target, rank 0 does after epoch 1. Both stop there
    (were rank 1 to go on, it would wait forever in DDP's all-reduce and the run would time out)."""
    from conftest import REPO, write_recipe

    recipe = _recipe(digits_root, 3)
    recipe["trainer"]["callbacks"] = [{"class_path": "test_time_to_target.RankOneSeesZero"}]
    path = write_recipe(tmp_path / "ddp.yaml", recipe)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(NPROC="2", OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true", PYTHON=sys.executable,
               PYTHONPATH=f"{REPO / 'tests'}:{env.get('PYTHONPATH', '')}")
    run = tmp_path / "runs" / "ddp"
    p = subprocess.run(["bash", str(REPO / "launch" / "torchrun.sh"), str(path), "--run.root", str(tmp_path / "runs"),
                        "--run.name", "ddp", "--run.wandb", "false", "--run.target_top1", "0.01"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert sorted(_val_top1(run)) == [1], "both ranks stopped after the first validation"
    t = json.loads((run / "summary.json").read_text())["time_to_target"]
    assert t["reached"] is True and t["epochs"] == 1 and t["steps"] == 3
