"""LR schedules and batch-scaling rules equal their formulas (resnet_lamb.optim.schedules)."""

import math
from pathlib import Path

import pytest

from resnet_lamb.optim.schedules import (
    LR_SCALINGS,
    SCHEDULES,
    WARMUP_SCALINGS,
    constant,
    epochs_to_steps,
    goyal,
    poly_after_warmup,
    scale_lr,
    scale_warmup_epochs,
    warmup_poly,
)
from resnet_lamb.recipe import OptimizerSpec, ScheduleSpec, derive_plan, load_recipe, plan_recipe, validate_recipe

REPO = Path(__file__).resolve().parents[1]


def bert(t, warmup, total, power=1.0):
    """BERT optimization.py: polynomial_decay(lr0, t, T, end 0, power, cycle=False), warmup t/W overriding."""
    decayed = (1.0 - min(t, total) / total) ** power
    return t / warmup if warmup and t < warmup else decayed


@pytest.mark.parametrize("power", [1.0, 2.0, 0.5])
def test_warmup_poly_formula(power):
    W, T = 100, 1000
    for t in (0, 1, W - 1, W, W + 1, T // 2, T - 1, T, T + 7):
        assert warmup_poly(t, W, T, power) == pytest.approx(bert(t, W, T, power), rel=1e-12, abs=1e-15), t
    assert warmup_poly(0, W, T, power) == 0.0                        # BERT: LR 0 at global step 0
    assert warmup_poly(W - 1, W, T, power) == pytest.approx((W - 1) / W)
    assert warmup_poly(W, W, T, power) == pytest.approx((1 - W / T) ** power)  # decay not restarted
    assert warmup_poly(T // 2, W, T, power) == pytest.approx(0.5**power)
    assert warmup_poly(T - 1, W, T, power) == pytest.approx((1 / T) ** power)
    assert warmup_poly(T, W, T, power) == 0.0
    assert warmup_poly(T + 7, W, T, power) == 0.0


def test_warmup_poly_end_lr_is_tf_polynomial_decay():
    """BERT's form with an end LR: TF's polynomial_decay(lr, t, T, end, power) = (lr - end)(1 - t/T)^p + end."""
    lr, end, W, T = 0.04, 1e-4, 10, 100
    for t in (10, 11, 50, 99, 100, 150):
        want = (lr - end) * (1 - min(t, T) / T) ** 2 + end
        assert lr * warmup_poly(t, W, T, 2.0, end / lr) == pytest.approx(want, rel=1e-12), t
    assert warmup_poly(3, W, T, 2.0, end / lr) == pytest.approx(0.3)  # the warmup still ramps from 0


def author(t, lr, W, T):
    """The LAMB author's optimization.py, literally: step*lr/W while step <= W, else (T - step)*lr/(T - W)."""
    return t * lr / W if t <= W else (T - t) * lr / (T - W)


def test_author_schedule_at_every_step_of_the_32k_recipe():
    """recipes/imagenet/table5/lamb-bs32k.yaml: the LR of every step 0..3519 is the author's
    formula with lr 0.04, W 782, T 3519; the scheduler a run steps gives the same."""
    torch = pytest.importorskip("torch")
    from resnet_lamb.optim.schedules import build_scheduler

    path = REPO / "recipes" / "imagenet" / "table5" / "lamb-bs32k.yaml"
    recipe = validate_recipe(load_recipe(path), path)
    plan = plan_recipe(recipe)
    lr, W, T = plan.lr, plan.warmup_steps, plan.total_steps
    assert (lr, W, T, plan.optimizer_steps) == (0.04, 782, 3519, 3519)
    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([w], lr=lr)
    sched = build_scheduler(opt, recipe.schedule, plan)
    for t in range(T + 1):
        want = author(t, lr, W, T)
        assert plan.lr_at(t) == pytest.approx(want, rel=1e-12, abs=1e-17), t
        assert opt.param_groups[0]["lr"] == pytest.approx(want, rel=1e-12, abs=1e-17), t
        opt.step()
        sched.step()
    assert plan.lr_at(W) == lr and plan.lr_at(T) == 0.0 and plan.lr_at(0) == 0.0
    assert plan.lr_at(W + 1) < lr and plan.lr_at(T - 1) == pytest.approx(lr / (T - W), rel=1e-12)


@pytest.mark.parametrize("power, end", [(1.0, 0.0), (2.0, 0.0), (2.0, 0.0025), (0.5, 0.01)])
def test_poly_after_warmup_formula(power, end):
    """(lr - end)(1 - (t - W)/(T - W))^p + end after a linear warmup t/W; end from T on."""
    W, T = 20, 120
    for t in range(0, T + 10):
        if t <= W:
            want = t / W
        else:
            want = (1 - end) * (1 - (min(t, T) - W) / (T - W)) ** power + end
        assert poly_after_warmup(t, W, T, power, end) == pytest.approx(want, rel=1e-12, abs=1e-15), t
    assert poly_after_warmup(W, W, T, power, end) == 1.0 and poly_after_warmup(T, W, T, power, end) == end
    assert poly_after_warmup(5, 0, 10, power, end) == pytest.approx((1 - end) * 0.5**power + end)  # no warmup
    # unlike BERT's form, the decay starts at the peak where the warmup ends
    assert warmup_poly(W, W, T, power, end) < poly_after_warmup(W, W, T, power, end)
    with pytest.raises(ValueError):
        poly_after_warmup(-1, W, T)


def test_warmup_poly_without_warmup():
    assert warmup_poly(0, 0, 10) == 1.0
    assert warmup_poly(5, 0, 10) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        warmup_poly(0, 0, 0)
    with pytest.raises(ValueError):
        warmup_poly(-1, 0, 10)


def test_goyal_warmup_and_milestones():
    W, miles, g = 50, (300, 600, 800), 0.1
    assert goyal(0, W, miles, g) == 0.0
    assert goyal(W - 1, W, miles, g) == pytest.approx((W - 1) / W)
    assert goyal(W, W, miles, g) == 1.0
    for k, m in enumerate(miles):
        assert goyal(m - 1, W, miles, g) == pytest.approx(g**k), m
        assert goyal(m, W, miles, g) == pytest.approx(g ** (k + 1)), m
        assert goyal(m + 1, W, miles, g) == pytest.approx(g ** (k + 1)), m
    assert goyal(10**6, W, miles, g) == pytest.approx(1e-3)
    # a milestone inside the warmup multiplies the warmup factor
    assert goyal(10, 20, (5,), 0.5) == pytest.approx(0.5 * 10 / 20)


def test_constant():
    assert constant(0) == 1.0 and constant(10**6) == 1.0
    assert constant(0, 10) == 0.0
    assert constant(9, 10) == pytest.approx(0.9)
    assert constant(10, 10) == 1.0


def test_scale_lr_rules():
    assert scale_lr(0.005, 512, 32768, "sqrt") == pytest.approx(0.04, rel=1e-12)
    assert scale_lr(0.005, 512, 128, "sqrt") == pytest.approx(0.0025, rel=1e-12)
    assert scale_lr(0.1, 256, 16384, "linear") == pytest.approx(6.4, rel=1e-12)
    assert scale_lr(0.1, 256, 8192, "linear") == pytest.approx(3.2, rel=1e-12)
    assert scale_lr(0.002, 16384, 32768, "none") == 0.002
    for b in (512, 1024, 2048, 4096, 8192, 16384, 32768):
        k = math.log2(32768 / b) / 2
        assert scale_lr(0.005, 512, b, "sqrt") == pytest.approx(4 / (2**k * 100), rel=1e-12)
    with pytest.raises(ValueError, match="sqrt"):
        scale_lr(0.1, 256, 512, "square")
    with pytest.raises(ValueError):
        scale_lr(0.1, 0, 512, "linear")


def test_scale_warmup_epochs():
    assert scale_warmup_epochs(0.3125, 512, 32768, "linear") == pytest.approx(20.0)
    assert scale_warmup_epochs(0.3125, 512, 16384, "linear") == pytest.approx(10.0)
    assert scale_warmup_epochs(5, 256, 16384, "none") == 5.0
    with pytest.raises(ValueError):
        scale_warmup_epochs(5, 256, 16384, "sqrt")


def test_epochs_to_steps():
    assert epochs_to_steps(20, 1281167, 32768) == round(20 * 1281167 / 32768) == 782
    assert epochs_to_steps(30, 1281167, 16384) == 2346
    assert epochs_to_steps(0, 1281167, 16384) == 0


def test_names_agree_with_recipe_literals():
    from resnet_lamb import recipe

    assert tuple(LR_SCALINGS) == recipe.LR_SCALINGS
    assert tuple(WARMUP_SCALINGS) == recipe.WARMUP_SCALINGS
    assert tuple(SCHEDULES) == recipe.SCHEDULES
    from resnet_lamb.data.sampling import EPOCH_MODES

    assert tuple(EPOCH_MODES) == recipe.EPOCH_MODES


def _plan(schedule, *, global_batch=64, train_images=1000, epochs=3, base_lr=0.1):
    opt = OptimizerSpec(name="sgd", base_lr=base_lr, base_batch=global_batch, scaling="none", weight_decay=0.0)
    return derive_plan(opt, schedule, global_batch=global_batch, micro_batch=global_batch, world_size=1,
                       train_images=train_images, epochs=epochs)


def test_schedule_step_maps_padded_epochs_onto_paper_steps():
    for b, n, e in ((16384, 1281167, 90), (32768, 1281167, 90), (64, 1000, 3), (100, 1000, 2)):
        plan = _plan(ScheduleSpec(), global_batch=b, train_images=n, epochs=e)
        steps = [plan.schedule_step(s) for s in range(plan.optimizer_steps)]
        assert steps[: plan.steps_per_epoch] == list(range(plan.steps_per_epoch))  # first epoch: identity
        assert all(b2 >= a for a, b2 in zip(steps, steps[1:]))                      # never decreases
        assert steps[-1] == plan.total_steps - 1                                    # ends on the paper's T-1
    p16 = _plan(ScheduleSpec(), global_batch=16384, train_images=1281167, epochs=90)
    assert (p16.total_steps, p16.optimizer_steps, p16.steps_per_epoch) == (7038, 7110, 79)


def test_build_scheduler_follows_the_formulas():
    torch = pytest.importorskip("torch")
    from resnet_lamb.optim.schedules import build_scheduler

    for spec in (ScheduleSpec(name="poly", warmup_epochs=0.5, warmup_scaling="none", power=1.0),
                 ScheduleSpec(name="poly", warmup_epochs=0.5, warmup_scaling="none", power=2.0, end_lr=0.001),
                 ScheduleSpec(name="poly_after_warmup", warmup_epochs=0.5, warmup_scaling="none", power=2.0,
                              end_lr=0.001),
                 ScheduleSpec(name="goyal", warmup_epochs=0.5, warmup_scaling="none", milestones=[1, 2], gamma=0.1),
                 ScheduleSpec(name="constant", warmup_epochs=0.25, warmup_scaling="none")):
        plan = _plan(spec)
        w = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([w], lr=plan.lr)
        sched = build_scheduler(opt, spec, plan)
        for step in range(plan.optimizer_steps):
            t = plan.schedule_step(step)
            end = spec.end_lr / plan.lr
            if spec.name == "poly":
                want = warmup_poly(t, plan.warmup_steps, plan.total_steps, spec.power, end)
                if not spec.end_lr:
                    assert want == pytest.approx(bert(t, plan.warmup_steps, plan.total_steps, spec.power))
            elif spec.name == "poly_after_warmup":
                want = poly_after_warmup(t, plan.warmup_steps, plan.total_steps, spec.power, end)
            elif spec.name == "goyal":
                want = goyal(t, plan.warmup_steps, plan.milestone_steps, spec.gamma)
            else:
                want = constant(t, plan.warmup_steps)
            assert opt.param_groups[0]["lr"] == pytest.approx(plan.lr * want, rel=1e-12, abs=1e-15), (spec.name, step)
            assert plan.lr_at(step) == pytest.approx(plan.lr * want, rel=1e-12, abs=1e-15)
            opt.step()
            sched.step()
        state = sched.state_dict()
        assert state["last_epoch"] == plan.optimizer_steps and state["lr_lambdas"] == [None]
