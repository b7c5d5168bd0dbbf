"""The MLPerf LARS recipes (recipes/imagenet/mlperf): `plan` prints the RCP numbers, and the LR
of every step follows the reference schedule of mlcommons/training resnet-tf2 lars_util.py:
linear warmup from 0, then (lr - end_lr) * (1 - t'/D)^2 + end_lr, t' = steps after the warmup,
D = the decay steps (rcps_resnet.json's opt_learning_rate_decay_steps)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_cli

N = 1281167  # ILSVRC2012 train images
END_LR = 1e-4
# mlcommons/logging mlperf_logging/rcp_checker/training_4.0.0/rcps_resnet.json, copied here by hand:
# batch -> (peak LR, warmup epochs, momentum, weight decay, decay steps, model_bn_span)
RCP = {
    4096: (10.0, 5, 0.9, 2e-4, 13137, 64),
    8192: (17.0, 5, 0.9, 2e-4, 6095, 64),
    32768: (21.2, 16, 0.94, 2.5e-5, 2267, 128),
    65536: (24.699, 31, 0.951807, 1e-4, 1133, 128),
}
NAMES = {4096: "4k", 8192: "8k", 32768: "32k", 65536: "65k"}


def _path(batch: int) -> Path:
    return REPO / "recipes" / "imagenet" / "mlperf" / f"lars-bs{NAMES[batch]}.yaml"


def _reference_lr(t: int, lr: float, warmup_steps: int, decay_steps: int) -> float:
    """lars_util.PolynomialDecayWithWarmup at step t (from 0)."""
    if t <= warmup_steps:
        return lr * t / warmup_steps
    t_after = min(t - warmup_steps, decay_steps)
    return (lr - END_LR) * (1 - t_after / decay_steps) ** 2 + END_LR


@pytest.mark.parametrize("batch", sorted(RCP))
def test_lr_at_every_step_is_the_reference_schedule(batch):
    from resnet_lamb.optim.schedules import build_scheduler
    from resnet_lamb.recipe import load_recipe, plan_recipe, validate_recipe

    lr, warmup_epochs, _, _, decay_steps, _ = RCP[batch]
    recipe = validate_recipe(load_recipe(_path(batch)), _path(batch))
    plan = plan_recipe(recipe, world_size=batch // 256)  # one micro batch of 256 per device, as fit derives it
    assert plan.lr == lr and plan.epoch_mode == "padded"
    # fit's optimizer and scheduler (LambModule.configure_optimizers): peak LR, a LambdaLR stepped per optimizer step
    weight = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([weight], lr=plan.lr)
    sched = build_scheduler(opt, recipe.schedule, plan)
    steps_per_epoch = math.ceil(N / batch)
    epochs = recipe.epochs
    assert epochs % 4 == 0 and plan.optimizer_steps == epochs * steps_per_epoch  # padded: whole passes
    warmup = round(warmup_epochs * N / batch)  # the contract's epoch -> step conversion
    reached_end = False
    for s in range(plan.optimizer_steps):
        e, i = divmod(s, steps_per_epoch)
        t = math.floor(e * N / batch) + i  # the step of the images seen (padded epochs: the last batch partial)
        want = _reference_lr(t, lr, warmup, decay_steps)
        got = opt.param_groups[0]["lr"]
        assert got == pytest.approx(want, rel=1e-12, abs=1e-12), f"batch {batch}, step {s} (t={t})"
        reached_end |= t >= warmup + decay_steps
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] >= END_LR
    # the cap covers the whole decay (W + D steps) and every epoch count the RCP runs needed
    assert reached_end and epochs - 4 < (warmup + decay_steps) * batch / N <= epochs


@pytest.mark.parametrize("batch", sorted(RCP))
def test_plan_prints_the_rcp_numbers(batch, capsys):
    lr, warmup_epochs, momentum, weight_decay, decay_steps, bn_span = RCP[batch]
    assert run_cli("plan", "--config", str(_path(batch))) == 0
    rows = {}
    for line in capsys.readouterr().out.splitlines()[1:]:
        key, value = line.split()[:2]
        rows[key] = value
    assert float(rows["lr"]) == lr and float(rows["warmup_epochs"]) == warmup_epochs
    assert float(rows["momentum"]) == momentum and float(rows["weight_decay"]) == weight_decay
    assert int(rows["decay_steps"]) == decay_steps and int(rows["bn_batch"]) == bn_span
    assert float(rows["end_lr"]) == END_LR and float(rows["eps"]) == 0.0 and float(rows["trust_coefficient"]) == 0.001
    assert rows["optimizer"] == "lars_classic" and rows["param_rule"] == "timm" and rows["label_smoothing"] == "0.1"
    assert float(rows["target_top1"]) == 0.759 and int(rows["global_batch"]) == batch
    w = int(rows["warmup_steps"])
    assert rows["decay"] == f"{w}..{w + decay_steps}"


def test_decay_steps_only_with_poly_after_warmup():
    from resnet_lamb.errors import RecipeError
    from resnet_lamb.recipe import ScheduleSpec

    with pytest.raises(RecipeError, match=r"^model\.schedule\.decay_steps: used by poly_after_warmup only"):
        ScheduleSpec(name="poly", decay_steps=100)
    with pytest.raises(RecipeError, match=r"^model\.schedule\.decay_steps"):
        ScheduleSpec(name="poly_after_warmup", decay_steps=0)
