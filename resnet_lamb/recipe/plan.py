"""The plan: every number a run derives from its recipe (:class:`Plan`, :func:`derive_plan`,
:func:`plan_recipe`; docs/CONTRACTS.md, "Derived numbers")."""

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from resnet_lamb.errors import RecipeError
from resnet_lamb.recipe.schema import Recipe
from resnet_lamb.recipe.specs import EPOCH_MODES, OptimizerSpec, ScheduleSpec, _choice, _positive_int


# ------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Plan:
    """Every number a run derives from its recipe (docs/CONTRACTS.md, "Derived numbers").

    Steps are optimizer steps. ``total_steps`` is the paper's count
    (``ceil(epochs * train_images / global_batch)``: 7038 at 16K, 3519 at 32K) and the length of
    the schedule; ``warmup_steps`` and ``milestone_steps`` are in the same units. The steps a
    run takes depend on ``epoch_mode``: ``full_batch`` cuts every global batch from one stream
    of per-pass permutations, so the run takes ``full_batch_steps = total_steps`` full steps;
    ``padded`` pads every epoch's last batch, so the run takes ``padded_steps = epochs *
    steps_per_epoch`` and :meth:`schedule_step` maps them onto the paper's count.
    ``optimizer_steps`` is the count of the run's mode. Lightning's epochs (a validation and a
    checkpoint after each) are ``steps_per_epoch`` steps long in both modes; there are
    ``run_epochs`` of them, the last one shorter in ``full_batch`` mode when ``steps_per_epoch``
    does not divide ``total_steps``. ``bn_images``: the images each BatchNorm layer normalises
    over in training (``bn_batch``, or the micro batch without ghost BatchNorm).
    """

    optimizer: str
    schedule: str
    base_lr: float
    base_batch: int
    scaling: str
    lr: float
    weight_decay: float
    global_batch: int
    micro_batch: int
    world_size: int
    accumulation: int
    train_images: int
    epochs: int
    steps_per_epoch: int
    total_steps: int
    optimizer_steps: int
    micro_batches_per_epoch_per_rank: int
    padding_per_epoch: int
    images_seen: int
    warmup_epochs_at_base: float
    warmup_scaling: str
    warmup_epochs: float
    warmup_steps: int
    power: float
    gamma: float
    milestones: tuple = ()
    milestone_steps: tuple = ()
    end_lr: float = 0.0
    epoch_mode: str = "padded"
    padded_steps: int = 0
    full_batch_steps: int = 0
    run_epochs: int = 0
    bn_batch: int | None = None
    bn_images: int = 0

    def schedule_step(self, step: int) -> int:
        """The paper's step count at optimizer step ``step`` of the run.

        ``full_batch``: ``step`` itself (every step is a full global batch of the stream).
        ``padded``: in epoch ``e`` (``step // steps_per_epoch``), batch ``i``, the images seen
        before the step are ``e * train_images + i * global_batch``; the paper's step is that
        divided by ``global_batch``, floored: ``floor(e * N / B) + i``. It equals ``step`` in the
        first epoch (and always when ``B`` divides ``N``), never decreases, and is
        ``total_steps - 1`` at the last step of the last epoch.
        """
        if self.epoch_mode == "full_batch":
            return int(step)
        e, i = divmod(int(step), self.steps_per_epoch)
        return e * self.train_images // self.global_batch + i

    def multiplier(self, step: int) -> float:
        """The schedule's LR factor at optimizer step ``step`` of the run."""
        from types import SimpleNamespace

        from resnet_lamb.optim.schedules import multiplier_fn

        spec = SimpleNamespace(name=self.schedule, power=self.power, gamma=self.gamma)
        return multiplier_fn(spec, self)(step)

    def lr_at(self, step: int) -> float:
        """The LR at optimizer step ``step`` of the run."""
        return self.lr * self.multiplier(step)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["milestones"] = list(self.milestones)
        out["milestone_steps"] = list(self.milestone_steps)
        return out


def _valid_micro_batches(global_batch: int, world_size: int, limit: int = 10) -> str:
    if global_batch % world_size:
        return (
            f"none: data.global_batch {global_batch} is not divisible by world size {world_size}; "
            "use a world size that divides it"
        )
    per_rank = global_batch // world_size
    divisors = [d for d in range(1, per_rank + 1) if per_rank % d == 0] if per_rank <= 1 << 20 else [per_rank]
    return ", ".join(str(d) for d in divisors[-limit:])


def _divisors(n: int, limit: int = 8) -> str:
    return ", ".join(str(d) for d in [d for d in range(1, n + 1) if n % d == 0][-limit:])


def derive_plan(
    optimizer: OptimizerSpec,
    schedule: ScheduleSpec,
    *,
    global_batch: int,
    micro_batch: int,
    world_size: int,
    train_images: int,
    epochs: int,
    epoch_mode: str = "padded",
    bn_batch: int | None = None,
) -> Plan:
    """Every number of docs/CONTRACTS.md "Derived numbers"; a :class:`RecipeError` on bad input.

    accumulation = global / (micro * world); lr = base_lr * (global/base_batch)^{1/2|1|0};
    warmup_epochs scaled linearly from base_batch (or not); steps_per_epoch = ceil(N / B);
    total_steps = ceil(epochs * N / B); epochs -> steps: round(e * N / B);
    images_seen = total_steps * B; the run's steps by ``epoch_mode``; ``bn_batch`` must divide
    the micro batch; ``schedule.end_lr`` must not exceed the peak LR.
    """
    from resnet_lamb.optim.schedules import epochs_to_steps, scale_lr, scale_warmup_epochs

    global_batch = _positive_int(global_batch, "data.global_batch")
    micro_batch = _positive_int(micro_batch, "data.micro_batch")
    world_size = _positive_int(world_size, "world size (--world-size, or trainer.devices x trainer.num_nodes)")
    train_images = _positive_int(train_images, "data.train_images")
    epochs = _positive_int(epochs, "trainer.max_epochs")
    epoch_mode = _choice(epoch_mode, "data.epoch_mode", EPOCH_MODES, "epoch mode")
    if micro_batch > global_batch:
        raise RecipeError(
            f"data.micro_batch: {micro_batch} is larger than data.global_batch {global_batch}; "
            f"valid data.micro_batch values for world size {world_size}: "
            f"{_valid_micro_batches(global_batch, world_size)}"
        )
    if global_batch % (micro_batch * world_size):
        raise RecipeError(
            f"data.global_batch: {global_batch} is not divisible by data.micro_batch {micro_batch} x world size "
            f"{world_size} = {micro_batch * world_size}; valid data.micro_batch values for world size {world_size}: "
            f"{_valid_micro_batches(global_batch, world_size)}"
        )
    if bn_batch is not None:
        bn_batch = _positive_int(bn_batch, "model.bn_batch")
        if micro_batch % bn_batch:
            raise RecipeError(
                f"model.bn_batch: {bn_batch} does not divide data.micro_batch {micro_batch} (ghost BatchNorm "
                f"normalises over groups of model.bn_batch samples of each micro batch); set model.bn_batch to one of "
                f"{_divisors(micro_batch)} or data.micro_batch to a multiple of {bn_batch}"
            )
    accumulation = global_batch // (micro_batch * world_size)

    lr = scale_lr(optimizer.base_lr, optimizer.base_batch, global_batch, optimizer.scaling)
    if schedule.end_lr > lr:
        rule = {"sqrt": "1/2", "linear": "1", "none": "0"}[optimizer.scaling]
        raise RecipeError(
            f"model.schedule.end_lr: {schedule.end_lr:g} is above the peak LR {lr:.6g} "
            f"(model.optimizer.base_lr {optimizer.base_lr:g} x ({global_batch}/{optimizer.base_batch})^"
            f"{rule}); set model.schedule.end_lr to at most {lr:.6g}"
        )
    warmup_epochs = scale_warmup_epochs(
        schedule.warmup_epochs, optimizer.base_batch, global_batch, schedule.warmup_scaling
    )
    if warmup_epochs > epochs:
        how = (
            f"{schedule.warmup_epochs:g} epochs at model.optimizer.base_batch {optimizer.base_batch} scale "
            f"linearly to {warmup_epochs:g} epochs at data.global_batch {global_batch}"
            if schedule.warmup_scaling == "linear"
            else f"{warmup_epochs:g} epochs"
        )
        raise RecipeError(
            f"model.schedule.warmup_epochs: {how}, longer than training (trainer.max_epochs "
            f"{epochs}); shorten the warmup or train longer"
        )
    steps_per_epoch = -(-train_images // global_batch)
    total_steps = -(-epochs * train_images // global_batch)
    padded_steps = epochs * steps_per_epoch
    optimizer_steps = total_steps if epoch_mode == "full_batch" else padded_steps
    warmup_steps = epochs_to_steps(warmup_epochs, train_images, global_batch)
    if schedule.name == "goyal":
        milestones = tuple(schedule.milestones)
        milestone_steps = tuple(epochs_to_steps(m, train_images, global_batch) for m in milestones)
    else:
        milestones, milestone_steps = (), ()
    return Plan(
        optimizer=optimizer.name,
        schedule=schedule.name,
        base_lr=optimizer.base_lr,
        base_batch=optimizer.base_batch,
        scaling=optimizer.scaling,
        lr=lr,
        weight_decay=optimizer.weight_decay,
        global_batch=global_batch,
        micro_batch=micro_batch,
        world_size=world_size,
        accumulation=accumulation,
        train_images=train_images,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        optimizer_steps=optimizer_steps,
        micro_batches_per_epoch_per_rank=steps_per_epoch * accumulation,
        padding_per_epoch=0 if epoch_mode == "full_batch" else steps_per_epoch * global_batch - train_images,
        images_seen=total_steps * global_batch,
        warmup_epochs_at_base=schedule.warmup_epochs,
        warmup_scaling=schedule.warmup_scaling,
        warmup_epochs=warmup_epochs,
        warmup_steps=warmup_steps,
        power=schedule.power,
        gamma=schedule.gamma,
        milestones=milestones,
        milestone_steps=milestone_steps,
        end_lr=schedule.end_lr,
        epoch_mode=epoch_mode,
        padded_steps=padded_steps,
        full_batch_steps=total_steps,
        run_epochs=-(-optimizer_steps // steps_per_epoch),
        bn_batch=bn_batch,
        bn_images=bn_batch or micro_batch,
    )


def count_train_images(root: "str | os.PathLike[str]") -> int:
    """Number of training images under ``root/train``, counted as the data module counts them: the
    root's index when it has one, else a listing (:func:`resnet_lamb.data.folder.validate_root`:
    hidden files skipped; nothing is opened)."""
    from resnet_lamb.data.index import count_images

    return count_images(root, "train")


def plan_recipe(
    recipe: Recipe, *, world_size: int = 1, micro_batch: int | None = None, train_images: int | None = None
) -> Plan:
    """:func:`derive_plan` for a validated recipe, with ``plan``'s overrides.

    ``train_images``: the argument, else ``data.train_images``, else the files counted under
    ``data.root/train``, else a RecipeError.
    """
    micro = micro_batch if micro_batch is not None else recipe.micro_batch
    if micro is None:
        raise RecipeError(
            f"{recipe.path}: data.micro_batch: missing; set the per-device batch in the recipe or pass --micro-batch"
        )
    images = train_images if train_images is not None else recipe.train_images
    if images is None:
        root = recipe.data_root
        if root is None or not (Path(root) / "train").is_dir():
            where = f"{root}/train does not exist" if root is not None else "data.root is not set"
            raise RecipeError(
                f"{recipe.path}: data.train_images: null and {where}; set data.train_images in the "
                f"recipe or pass --train-images"
            )
        images = count_train_images(root)  # DataError naming the folder when train/ is empty
    try:
        return derive_plan(
            recipe.optimizer,
            recipe.schedule,
            global_batch=recipe.global_batch,
            micro_batch=micro,
            world_size=world_size,
            train_images=images,
            epochs=recipe.epochs,
            epoch_mode=recipe.epoch_mode,
            bn_batch=recipe.bn_batch,
        )
    except RecipeError as err:
        raise RecipeError(f"{recipe.path}: {err}") from None
