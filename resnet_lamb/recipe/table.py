"""``resnet-lamb plan``: the plan as a table of values, how each is derived and its source."""

import argparse
import json
import sys
from typing import Any

from resnet_lamb.errors import RecipeError
from resnet_lamb.recipe.loading import load_recipe
from resnet_lamb.recipe.plan import Plan, plan_recipe
from resnet_lamb.recipe.schema import Recipe, validate_recipe
from resnet_lamb.recipe.specs import POLY_SCHEDULES


# ---------------------------------------------------------------------------------- plan
def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.7g}"
    return str(x)


_SCHEDULE_FORMS = {
    "poly": "BERT's form: (1 - t/T)^power from step 0, linear warmup overriding steps < W",
    "poly_after_warmup": "linear warmup t/W, then (1 - (t-W)/(T-W))^power: decay from the end of warmup",
    "goyal": "linear warmup, x gamma at each milestone",
    "constant": "constant after linear warmup",
}
_HIDDEN_OPTIONS = ("impl", "foreach", "fused")  # how the update runs, not what it computes


def _value(x: Any) -> str:
    """A plan value as one token (the text table splits on whitespace)."""
    if isinstance(x, (list, tuple)):
        return ",".join(_value(v) for v in x)
    if x is None:
        return "none"
    if isinstance(x, bool):
        return str(x).lower()
    return _fmt(x)


def _decay(p: Plan, decay_steps: int | None = None) -> tuple[str, str]:
    end = f"{_fmt(p.end_lr)}" if p.end_lr else "0"
    power = "linear" if p.power == 1 else f"power {_fmt(p.power)}"
    if p.schedule == "poly_after_warmup":
        last = p.total_steps if decay_steps is None else p.warmup_steps + decay_steps
        how = f"{power} from step {p.warmup_steps} (the peak LR) to {end} at step {last}"
        if p.power == 1 and not p.end_lr:
            how += ": (T - t)*lr/(T - W)"
        return f"{p.warmup_steps}..{last}", how
    return f"0..{p.total_steps}", (
        f"{power} from step 0 to {end} at step {p.total_steps}, the warmup overriding steps < {p.warmup_steps}"
    )


def plan_rows(plan: Plan, recipe: Recipe | None = None) -> list[tuple[str, Any, str, str]]:
    """``plan``'s rows: ``(key, value, how it is derived, source)``. The source is what the recipe's
    ``sources`` says of the key the row comes from (empty where it says nothing)."""
    p = plan
    sources = recipe.sources if recipe is not None else {}
    scale = {"sqrt": "1/2", "linear": "1", "none": "0"}[p.scaling]
    rows: list[tuple[str, Any, str, str]] = []

    def row(key: str, value: Any, how: str, source_key: str | None = None, default: str = "") -> None:
        rows.append((key, _value(value), how, sources.get(source_key or "", default)))

    row("optimizer", p.optimizer, "", "model.optimizer.name")
    row("weight_decay", p.weight_decay, "decoupled or L2, as the optimizer defines it", "model.optimizer.weight_decay")
    if recipe is not None:
        from resnet_lamb.optim.registry import optimizer_options

        row(
            "param_rule",
            recipe.optimizer.param_rule,
            "which tensors get weight decay and the trust ratio",
            "model.optimizer.param_rule",
        )
        stated = recipe.optimizer.kwargs
        for name, default in optimizer_options(p.optimizer).items():
            if name not in _HIDDEN_OPTIONS:
                where = f"model.optimizer.kwargs.{name}"
                row(
                    name,
                    stated.get(name, default),
                    where if name in stated else f"{p.optimizer}'s default",
                    where,
                    "" if name in stated else "the optimizer's default",
                )
    row("schedule", p.schedule, _SCHEDULE_FORMS[p.schedule], "model.schedule.name")
    row(
        "lr",
        p.lr,
        f"{_fmt(p.base_lr)} x ({p.global_batch}/{p.base_batch})^{scale}  [{p.scaling}]",
        "model.optimizer.base_lr",
    )
    row(
        "warmup_epochs",
        p.warmup_epochs,
        f"{_fmt(p.warmup_epochs_at_base)} x {p.global_batch}/{p.base_batch}  [linear]"
        if p.warmup_scaling == "linear"
        else "[not scaled]",
        "model.schedule.warmup_epochs",
    )
    row(
        "warmup_steps",
        p.warmup_steps,
        f"round({_fmt(p.warmup_epochs)} x {p.train_images} / {p.global_batch}), LR t*lr/W up to W",
        "model.schedule.warmup_epochs",
    )
    if p.schedule in POLY_SCHEDULES:
        decay_steps = recipe.schedule.decay_steps if recipe is not None else None
        value, how = _decay(p, decay_steps)
        row("decay", value, how, "model.schedule.name")
        if decay_steps is not None:
            row("decay_steps", decay_steps, "D: the decay's steps after the warmup", "model.schedule.decay_steps")
        row("end_lr", p.end_lr, "model.schedule.end_lr, the LR the decay ends at", "model.schedule.end_lr")
    if p.schedule == "goyal":
        row("milestones", ", ".join(map(str, p.milestones)) or "-", "epochs", "model.schedule.milestones")
        row(
            "milestone_steps",
            ", ".join(map(str, p.milestone_steps)) or "-",
            f"round(e x {p.train_images} / {p.global_batch})",
            "model.schedule.milestones",
        )
    row("global_batch", p.global_batch, "data.global_batch", "data.global_batch")
    row("micro_batch", p.micro_batch, "per device, per forward", "data.micro_batch")
    row("world_size", p.world_size, "devices x nodes")
    row("accumulation", p.accumulation, f"{p.global_batch} / ({p.micro_batch} x {p.world_size})")
    row(
        "bn_batch",
        p.bn_images,
        f"images per BatchNorm group: model.bn_batch (ghost BatchNorm) of micro batch {p.micro_batch}"
        if p.bn_batch
        else "images per BatchNorm group: the micro batch (model.bn_batch not set)",
        "model.bn_batch" if p.bn_batch else "data.micro_batch",
    )
    if recipe is not None:
        for key, what in (
            ("label_smoothing", "cross-entropy label smoothing"),
            ("grad_clip_norm", "global gradient-norm clipping (none = off)"),
            ("zero_init_residual", "last BatchNorm gamma of each residual block starts at 0"),
        ):
            if key in recipe.model:
                row(key, recipe.model[key], what, f"model.{key}")
    row("train_images", p.train_images, "data.train_images or counted under data.root/train", "data.train_images")
    row("epochs", p.epochs, "trainer.max_epochs", "trainer.max_epochs")
    row(
        "epoch_mode",
        p.epoch_mode,
        "full-batch steps cut from one stream of per-pass permutations"
        if p.epoch_mode == "full_batch"
        else "each epoch's last batch padded (label -1)",
        "data.epoch_mode",
    )
    row("steps_per_epoch", p.steps_per_epoch, f"ceil({p.train_images} / {p.global_batch}), steps per Lightning epoch")
    row(
        "total_steps",
        p.total_steps,
        f"ceil({p.epochs} x {p.train_images} / {p.global_batch}), the schedule's T",
        "trainer.max_epochs",
    )
    other = (
        f"padded mode would take {p.epochs} x {p.steps_per_epoch} = {p.padded_steps}"
        if p.epoch_mode == "full_batch"
        else f"full_batch mode would take {p.full_batch_steps}"
    )
    row("optimizer_steps", p.optimizer_steps, f"steps the run takes ({p.epoch_mode}); {other}", "data.epoch_mode")
    last = p.optimizer_steps - (p.run_epochs - 1) * p.steps_per_epoch
    row(
        "run_epochs",
        p.run_epochs,
        f"Lightning epochs of {p.steps_per_epoch} steps, validation + checkpoint after "
        f"each" + (f" (the last {last} steps)" if last != p.steps_per_epoch else ""),
    )
    row(
        "micro_batches_per_epoch_per_rank",
        p.micro_batches_per_epoch_per_rank,
        f"{p.steps_per_epoch} x {p.accumulation}",
    )
    row(
        "padding_per_epoch",
        p.padding_per_epoch,
        "none: every step a full batch"
        if p.epoch_mode == "full_batch"
        else f"{p.steps_per_epoch} x {p.global_batch} - {p.train_images}",
    )
    row("images_seen", p.images_seen, f"{p.total_steps} x {p.global_batch}")
    if recipe is not None and recipe.target_top1 is not None:
        how = "the run stops at the first validation at or above it"
        row("target_top1", recipe.target_top1, how, "run.target_top1")
    return rows


def format_plan(plan: Plan, recipe: Recipe | None = None) -> str:
    """``plan`` as an aligned text table: key, value, how the value was derived, and its source
    (the recipe's ``sources``), then the recipe's expected accuracy."""
    rows = plan_rows(plan, recipe)
    if recipe is not None and recipe.expected:
        ex = recipe.expected
        got = " / ".join("-" if ex.get(k) is None else f"{ex[k]:.4f}" for k in ("top1", "top5"))
        rows.append(("expected top1 / top5", got, "", ex.get("source") or ""))
    width = max(len(r[0]) for r in rows)
    vwidth = max(len(str(r[1])) for r in rows)
    hwidth = min(max(len(r[2]) for r in rows), 64)  # a longer "how" pushes its own source right
    head = f"resnet-lamb plan: {recipe.path}" if recipe is not None else "resnet-lamb plan"
    lines = [head] + [
        f"  {k:<{width}}  {str(v):>{vwidth}}  {how:<{hwidth}}  {'| ' + src if src else ''}".rstrip()
        for k, v, how, src in rows
    ]
    return "\n".join(lines)


def plan_main(argv: list | None = None) -> int:
    """``resnet-lamb plan --config RECIPE [--world-size N] [--micro-batch M] [--train-images N] [--json]``."""
    parser = argparse.ArgumentParser(
        prog="resnet-lamb plan",
        description="Print every number a recipe derives (LR, warmup, steps, accumulation, images seen), "
        "touching no data, model or GPU.",
    )
    parser.add_argument("--config", "-c", required=True, metavar="RECIPE", help="recipe YAML")
    parser.add_argument("--world-size", type=int, default=1, metavar="N", help="devices x nodes (default 1)")
    parser.add_argument("--micro-batch", type=int, default=None, metavar="M", help="override data.micro_batch")
    parser.add_argument("--train-images", type=int, default=None, metavar="N", help="override data.train_images")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = parser.parse_args(sys.argv[2:] if argv is None else argv)
    for flag, value in (
        ("--world-size", args.world_size),
        ("--micro-batch", args.micro_batch),
        ("--train-images", args.train_images),
    ):
        if value is not None and value <= 0:
            raise RecipeError(f"{flag}: expected a positive integer, got {value}")
    recipe = validate_recipe(load_recipe(args.config), args.config)
    plan = plan_recipe(recipe, world_size=args.world_size, micro_batch=args.micro_batch, train_images=args.train_images)
    if args.json:
        sources = {key: src for key, _, _, src in plan_rows(plan, recipe) if src}
        out = {"recipe": recipe.path, **plan.to_dict(), "expected": recipe.expected, "target_top1": recipe.target_top1}
        out["sources"] = sources
        print(json.dumps(out, indent=2))
    else:
        print(format_plan(plan, recipe))
    return 0
