"""Recipes: YAML with ``base:`` chains, the optimizer/schedule specs, the derived numbers, ``plan``.

A recipe states rules (``base_lr`` at ``base_batch`` with a scaling rule, warmup epochs at
``base_batch``, ...); :func:`derive_plan` turns them into every number a run uses, for ``plan``
and for ``fit`` alike (docs/CONTRACTS.md, "Derived numbers").

``resnet-lamb plan`` reads no data and touches no model or GPU. This module imports
``resnet_lamb.optim`` (and so torch, while that package imports it eagerly) only where an optimizer
name is checked or numbers are derived: YAML, key and type errors are reported without torch.
"""

import argparse
import copy
import dataclasses
import difflib
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, get_args

import yaml

from resnet_lamb.errors import RecipeError

# What LightningCLI accepts at the top level of a config, plus the recipe's own `base` and
# `expected`. `optimizer`/`lr_scheduler` are deliberately absent: they belong in model.optimizer
# and model.schedule.
TOP_LEVEL_KEYS = ("base", "expected", "seed_everything", "trainer", "model", "data", "ckpt_path")
EXPECTED_KEYS = ("top1", "top5", "source", "note")
RECIPE_ONLY_KEYS = ("base", "expected")
# model.optimizer keys a recipe must state, and what to set (the OptimizerSpec defaults are not a recipe)
REQUIRED_OPTIMIZER_KEYS = (("name", "the optimizer, one of resnet_lamb.optim.list_optimizers()"),
                           ("base_lr", "the peak LR at model.optimizer.base_batch"))


# ------------------------------------------------------------------------------------ YAML
class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``), as JSON does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_value(raw: str) -> Any:
    """A command-line value read as the recipe loader reads YAML (``1e-5`` is a float); text that
    is not YAML stays text."""
    try:
        return yaml.load(raw, Loader=_Loader)
    except yaml.YAMLError:
        return raw


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _read_yaml(path: Path, shown: str) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise RecipeError(f"{shown}: not a UTF-8 text file ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise RecipeError(f"{shown}: cannot read recipe ({err.strerror})") from None
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{shown}:{mark.line + 1}:{mark.column + 1}" if mark is not None else shown
        what = _one_line(" ".join(s for s in (err.context, err.problem) if s))
        raise RecipeError(f"{where}: YAML syntax error: {what}; fix the recipe's YAML") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"{shown}: YAML error: {_one_line(err)}") from None
    if data is None:
        raise RecipeError(f"{shown}: empty recipe; expected a YAML mapping with model, data and trainer "
                          f"sections (see recipes/imagenet/table5/lamb-bs512.yaml)")
    if not isinstance(data, dict):
        raise RecipeError(f"{shown}:1: expected a YAML mapping at the top level, got {type(data).__name__}")
    return data


def deep_merge(base: dict, child: dict) -> dict:
    """``child`` over ``base``: mappings merge key by key (recursively), anything else is replaced."""
    out = copy.deepcopy(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_recipe(path: "str | os.PathLike[str]") -> dict:
    """The recipe at ``path`` with its ``base:`` chain resolved, as one dict (without ``base``).

    ``base`` is a path relative to the file that names it; the base is loaded (recursively) and
    this file is deep-merged over it (this file wins; a key cannot be deleted, set it to null).
    A missing file, a cycle, a YAML syntax error or an empty file is a :class:`RecipeError`
    naming the file (and the line for syntax errors).
    """
    return _load(Path(path), ())


def _load(path: Path, chain: tuple) -> dict:
    shown = os.path.normpath(str(path))
    if not path.is_file():
        raise RecipeError(f"{shown}: recipe file not found" if not chain else
                          f"{chain[-1][1]}: base: {shown} not found; fix the base path (relative to "
                          f"{os.path.dirname(chain[-1][1]) or '.'})")
    resolved = path.resolve()
    if any(resolved == seen for seen, _ in chain):
        cycle = " -> ".join([s for _, s in chain] + [shown])
        raise RecipeError(f"{chain[-1][1]}: base: cycle {cycle}; a recipe cannot be its own base")
    data = _read_yaml(path, shown)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base.strip():
        raise RecipeError(f"{shown}: base: expected a path to a recipe relative to this file, got {base!r}")
    parent = _load(path.parent / base, chain + ((resolved, shown),))
    return deep_merge(parent, data)


def recipe_part(cfg: dict) -> dict:
    """What :func:`validate_recipe` checks of a resolved config (``fit``'s, or a run's saved
    config.yaml): the recipe's top-level keys, without ``ckpt_path`` or ``base``, and ``expected``
    only when set."""
    part = {k: v for k, v in cfg.items() if k in TOP_LEVEL_KEYS and k not in ("ckpt_path", "base")}
    if part.get("expected") is None:
        part.pop("expected", None)
    return part


def to_lightning_config(cfg: dict) -> dict:
    """The part of a loaded recipe LightningCLI parses: everything but ``base`` and ``expected``."""
    return {k: copy.deepcopy(v) for k, v in cfg.items() if k not in RECIPE_ONLY_KEYS}


# --------------------------------------------------------------------------- value checks
def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise RecipeError(f"{key}: expected a positive integer, got {value!r}")
    return int(value)


def _positive_float(value: Any, key: str) -> float:
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise RecipeError(f"{key}: expected a positive finite number, got {value!r}")
    return float(value)


def _nonnegative_float(value: Any, key: str) -> float:
    if not _is_number(value) or not math.isfinite(value) or value < 0:
        raise RecipeError(f"{key}: expected a finite number >= 0, got {value!r}")
    return float(value)


def _choice(value: Any, key: str, allowed: "tuple[str, ...] | list[str]", what: str) -> str:
    if not isinstance(value, str) or value not in allowed:
        hint = difflib.get_close_matches(str(value), list(allowed), n=1)
        did = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise RecipeError(f"{key}: unknown {what} {value!r}{did}; choose one of {', '.join(allowed)}")
    return value


def _unknown_keys(mapping: dict, allowed: "tuple[str, ...]", prefix: str, what: str = "key") -> None:
    for key in mapping:
        if key not in allowed:
            hint = difflib.get_close_matches(str(key), list(allowed), n=1)
            did = f" (did you mean {hint[0]}?)" if hint else ""
            raise RecipeError(f"{prefix}{key}: unknown {what}{did}; allowed: {', '.join(allowed)}")


# ------------------------------------------------------------------------------ the specs
# The allowed names, one definition each: the Literal types of the spec fields below
# (resnet_lamb.optim.schedules implements exactly these; tests/test_recipe.py checks they agree).
LR_SCALING = Literal["sqrt", "linear", "none"]
PARAM_RULE = Literal["author", "timm", "none"]
SCHEDULE = Literal["poly", "goyal", "constant"]
WARMUP_SCALING = Literal["linear", "none"]
LR_SCALINGS = get_args(LR_SCALING)
PARAM_RULES = get_args(PARAM_RULE)
SCHEDULES = get_args(SCHEDULE)
WARMUP_SCALINGS = get_args(WARMUP_SCALING)


@dataclass
class OptimizerSpec:
    """``model.optimizer``: which optimizer and the LR rule (defaults: Table 5's LAMB).

    The LR of a run is ``base_lr * (global_batch / base_batch) ** {sqrt: 1/2, linear: 1, none: 0}``;
    ``weight_decay`` is the optimizer's (decoupled for LAMB/AdamW, L2 for SGD/Adam/Adagrad, as
    each optimizer defines it) and ``param_rule`` decides which tensors get it
    (``resnet_lamb.optim.param_groups``); ``kwargs`` go to the optimizer's constructor.
    """

    name: str = "lamb"
    base_lr: float = 0.005
    base_batch: int = 512
    scaling: LR_SCALING = "sqrt"
    weight_decay: float = 0.01
    param_rule: PARAM_RULE = "author"
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        p = "model.optimizer."

        self.base_lr = _positive_float(self.base_lr, p + "base_lr")
        self.base_batch = _positive_int(self.base_batch, p + "base_batch")
        self.scaling = _choice(self.scaling, p + "scaling", LR_SCALINGS, "LR scaling rule")
        self.weight_decay = _nonnegative_float(self.weight_decay, p + "weight_decay")
        self.param_rule = _choice(self.param_rule, p + "param_rule", PARAM_RULES, "parameter rule")
        if self.kwargs is None:
            self.kwargs = {}
        if not isinstance(self.kwargs, dict) or not all(isinstance(k, str) for k in self.kwargs):
            raise RecipeError(f"{p}kwargs: expected a mapping of optimizer keyword arguments, got {self.kwargs!r}")
        from resnet_lamb.optim.registry import list_optimizers  # lazy (torch): after the plain checks

        self.name = _choice(self.name, p + "name", tuple(list_optimizers()), "optimizer")
        from resnet_lamb.optim.registry import optimizer_options

        accepted = tuple(sorted(optimizer_options(self.name)))
        for key in self.kwargs:
            if key not in accepted and key not in ("lr", "weight_decay", "params"):
                hint = difflib.get_close_matches(key, list(accepted), n=1)
                did = f" (did you mean {hint[0]}?)" if hint else ""
                raise RecipeError(f"{p}kwargs.{key}: unknown option for optimizer {self.name!r}{did}; "
                                  f"allowed: {', '.join(accepted)}")
        for key, owner in (("lr", "base_lr, base_batch and scaling"), ("weight_decay", "model.optimizer.weight_decay"),
                           ("params", "param_rule")):
            if key in self.kwargs:
                raise RecipeError(f"{p}kwargs.{key}: set by {owner}, not by kwargs; remove it")


@dataclass
class ScheduleSpec:
    """``model.schedule``: the per-step LR multiplier (``resnet_lamb.optim.schedules``).

    ``warmup_epochs`` is stated at ``model.optimizer.base_batch`` and scaled with the global batch
    when ``warmup_scaling`` is ``linear`` (the paper's linear-epoch warmup). ``power`` is used
    by ``poly``; ``milestones`` (epochs) and ``gamma`` by ``goyal``.
    """

    name: SCHEDULE = "poly"
    warmup_epochs: float = 0.0
    warmup_scaling: WARMUP_SCALING = "linear"
    power: float = 1.0
    milestones: list[int] = field(default_factory=lambda: [30, 60, 80])
    gamma: float = 0.1

    def __post_init__(self) -> None:
        p = "model.schedule."
        self.name = _choice(self.name, p + "name", SCHEDULES, "schedule")
        self.warmup_epochs = _nonnegative_float(self.warmup_epochs, p + "warmup_epochs")
        self.warmup_scaling = _choice(self.warmup_scaling, p + "warmup_scaling", WARMUP_SCALINGS,
                                      "warmup scaling rule")
        self.power = _positive_float(self.power, p + "power")
        if self.milestones is None:
            self.milestones = []
        if not isinstance(self.milestones, (list, tuple)):
            raise RecipeError(f"{p}milestones: expected a list of epochs, got {self.milestones!r}")
        miles = [_positive_int(m, f"{p}milestones[{i}]") for i, m in enumerate(self.milestones)]
        if any(b <= a for a, b in zip(miles, miles[1:])):
            raise RecipeError(f"{p}milestones: expected strictly increasing epochs, got {miles}")
        self.milestones = miles
        gamma = _positive_float(self.gamma, p + "gamma")
        if gamma > 1:
            raise RecipeError(f"{p}gamma: expected a decay factor in (0, 1], got {self.gamma!r}")
        self.gamma = gamma


OPTIMIZER_KEYS = tuple(f.name for f in dataclasses.fields(OptimizerSpec))
SCHEDULE_KEYS = tuple(f.name for f in dataclasses.fields(ScheduleSpec))
SPEC_KEYS = {"model.optimizer": OPTIMIZER_KEYS, "model.schedule": SCHEDULE_KEYS}


def check_spec_keys(cfg: Any) -> None:
    """Unknown keys in ``model.optimizer`` / ``model.schedule``, named with their section."""
    model = cfg.get("model") if isinstance(cfg, dict) else None
    for section, allowed in SPEC_KEYS.items():
        spec = model.get(section.split(".")[1]) if isinstance(model, dict) else None
        if isinstance(spec, dict):
            _unknown_keys(spec, allowed, section + ".")


# ------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Plan:
    """Every number a run derives from its recipe (docs/CONTRACTS.md, "Derived numbers").

    Steps are optimizer steps. ``total_steps`` is the paper's count
    (``ceil(epochs * train_images / global_batch)``: 7038 at 16K, 3519 at 32K) and the length of
    the schedule; ``warmup_steps`` and ``milestone_steps`` are in the same units. Since every
    epoch's last batch is padded, a run takes ``optimizer_steps = epochs * steps_per_epoch``
    optimizer steps; :meth:`schedule_step` maps them onto the paper's count.
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

    def schedule_step(self, step: int) -> int:
        """The paper's step count at optimizer step ``step`` of a run with padded epochs.

        In epoch ``e`` (``step // steps_per_epoch``), batch ``i``, the images seen before the
        step are ``e * train_images + i * global_batch``; the paper's step is that divided by
        ``global_batch``, floored: ``floor(e * N / B) + i``. It equals ``step`` in the first
        epoch (and always when ``B`` divides ``N``), never decreases, and is
        ``total_steps - 1`` at the last step of the last epoch.
        """
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
        return f"none: data.global_batch {global_batch} is not divisible by world size {world_size}; use a world size that divides it"
    per_rank = global_batch // world_size
    divisors = [d for d in range(1, per_rank + 1) if per_rank % d == 0] if per_rank <= 1 << 20 else [per_rank]
    return ", ".join(str(d) for d in divisors[-limit:])


def derive_plan(optimizer: OptimizerSpec, schedule: ScheduleSpec, *, global_batch: int, micro_batch: int,
                world_size: int, train_images: int, epochs: int) -> Plan:
    """Every number of docs/CONTRACTS.md "Derived numbers"; a :class:`RecipeError` on bad input.

    accumulation = global / (micro * world); lr = base_lr * (global/base_batch)^{1/2|1|0};
    warmup_epochs scaled linearly from base_batch (or not); steps_per_epoch = ceil(N / B);
    total_steps = ceil(epochs * N / B); epochs -> steps: round(e * N / B);
    images_seen = total_steps * B.
    """
    from resnet_lamb.optim.schedules import epochs_to_steps, scale_lr, scale_warmup_epochs

    global_batch = _positive_int(global_batch, "data.global_batch")
    micro_batch = _positive_int(micro_batch, "data.micro_batch")
    world_size = _positive_int(world_size, "world size (--world-size, or trainer.devices x trainer.num_nodes)")
    train_images = _positive_int(train_images, "data.train_images")
    epochs = _positive_int(epochs, "trainer.max_epochs")
    if micro_batch > global_batch:
        raise RecipeError(f"data.micro_batch: {micro_batch} is larger than data.global_batch {global_batch}; "
                          f"valid data.micro_batch values for world size {world_size}: "
                          f"{_valid_micro_batches(global_batch, world_size)}")
    if global_batch % (micro_batch * world_size):
        raise RecipeError(
            f"data.global_batch: {global_batch} is not divisible by data.micro_batch {micro_batch} x world size "
            f"{world_size} = {micro_batch * world_size}; valid data.micro_batch values for world size {world_size}: "
            f"{_valid_micro_batches(global_batch, world_size)}")
    accumulation = global_batch // (micro_batch * world_size)

    lr = scale_lr(optimizer.base_lr, optimizer.base_batch, global_batch, optimizer.scaling)
    warmup_epochs = scale_warmup_epochs(schedule.warmup_epochs, optimizer.base_batch, global_batch,
                                        schedule.warmup_scaling)
    if warmup_epochs > epochs:
        how = (f"{schedule.warmup_epochs:g} epochs at model.optimizer.base_batch {optimizer.base_batch} scale "
               f"linearly to {warmup_epochs:g} epochs at data.global_batch {global_batch}"
               if schedule.warmup_scaling == "linear" else f"{warmup_epochs:g} epochs")
        raise RecipeError(f"model.schedule.warmup_epochs: {how}, longer than training (trainer.max_epochs "
                          f"{epochs}); shorten the warmup or train longer")
    steps_per_epoch = -(-train_images // global_batch)
    total_steps = -(-epochs * train_images // global_batch)
    warmup_steps = epochs_to_steps(warmup_epochs, train_images, global_batch)
    if schedule.name == "goyal":
        milestones = tuple(schedule.milestones)
        milestone_steps = tuple(epochs_to_steps(m, train_images, global_batch) for m in milestones)
    else:
        milestones, milestone_steps = (), ()
    return Plan(
        optimizer=optimizer.name, schedule=schedule.name, base_lr=optimizer.base_lr,
        base_batch=optimizer.base_batch, scaling=optimizer.scaling, lr=lr, weight_decay=optimizer.weight_decay,
        global_batch=global_batch, micro_batch=micro_batch, world_size=world_size, accumulation=accumulation,
        train_images=train_images, epochs=epochs, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
        optimizer_steps=epochs * steps_per_epoch,
        micro_batches_per_epoch_per_rank=steps_per_epoch * accumulation,
        padding_per_epoch=steps_per_epoch * global_batch - train_images,
        images_seen=total_steps * global_batch,
        warmup_epochs_at_base=schedule.warmup_epochs, warmup_scaling=schedule.warmup_scaling,
        warmup_epochs=warmup_epochs, warmup_steps=warmup_steps, power=schedule.power, gamma=schedule.gamma,
        milestones=milestones, milestone_steps=milestone_steps,
    )


# ----------------------------------------------------------------------------- validation
@dataclass(frozen=True)
class Recipe:
    """What :func:`validate_recipe` found in a loaded recipe: the specs and the numbers plan needs."""

    path: str
    optimizer: OptimizerSpec
    schedule: ScheduleSpec
    global_batch: int
    micro_batch: Optional[int]
    epochs: int
    train_images: Optional[int]
    data_root: Optional[str]
    expected: dict = field(default_factory=dict)


def _section(cfg: dict, key: str, required: bool) -> Optional[dict]:
    value = cfg.get(key)
    if value is None:
        if required:
            raise RecipeError(f"{key}: missing section; see docs/CONTRACTS.md for the recipe layout")
        return None
    if not isinstance(value, dict):
        raise RecipeError(f"{key}: expected a mapping, got {value!r}")
    return value


def _expected_fraction(value: Any, key: str) -> Optional[float]:
    if value is None:
        return None
    if not _is_number(value) or not 0.0 <= value <= 1.0:
        hint = f" (accuracies are fractions: write {value / 100:g})" if _is_number(value) and 1 < value <= 100 else ""
        raise RecipeError(f"{key}: expected a fraction in [0, 1], got {value!r}{hint}")
    return float(value)


def validate_recipe(cfg: dict, path: "str | os.PathLike[str]") -> Recipe:
    """Strict check of what ``plan`` needs in a loaded recipe; RecipeError ``"<path>: <key>: ..."``.

    Checks the top-level keys, ``model.optimizer`` and ``model.schedule`` (unknown keys, types,
    ranges; ``name`` and ``base_lr`` must be stated), ``data.global_batch``,
    ``data.micro_batch``, ``data.train_images``, ``data.root``, ``trainer.max_epochs`` and
    ``expected``. Other keys of ``model``/``data``/``trainer`` are LightningCLI's to check.
    """
    shown = os.path.normpath(str(path))
    try:
        return _validate(cfg, shown)
    except RecipeError as err:
        raise RecipeError(f"{shown}: {err}") from None


def _validate(cfg: dict, shown: str) -> Recipe:
    if not isinstance(cfg, dict):
        raise RecipeError(f"expected a mapping at the top level, got {type(cfg).__name__}")
    for key in cfg:
        if key in ("optimizer", "lr_scheduler"):
            raise RecipeError(f"{key}: not a recipe key; the optimizer and its schedule go under "
                              f"model.optimizer and model.schedule")
    _unknown_keys(cfg, TOP_LEVEL_KEYS, "", "top-level key")
    seed = cfg.get("seed_everything")
    if seed is not None and not isinstance(seed, (bool, int)):
        raise RecipeError(f"seed_everything: expected an integer, true/false or null, got {seed!r}")
    ckpt = cfg.get("ckpt_path")
    if ckpt is not None and not isinstance(ckpt, str):
        raise RecipeError(f"ckpt_path: expected a path or null, got {ckpt!r}")

    trainer = _section(cfg, "trainer", required=True)
    if trainer.get("max_epochs") is None:
        raise RecipeError("trainer.max_epochs: missing; set the number of epochs (the paper's is 90)")
    epochs = _positive_int(trainer["max_epochs"], "trainer.max_epochs")

    model = _section(cfg, "model", required=True)
    opt = model.get("optimizer")
    if not isinstance(opt, dict):
        raise RecipeError("model.optimizer: missing; set at least model.optimizer.name and model.optimizer.base_lr"
                          if opt is None else f"model.optimizer: expected a mapping, got {opt!r}")
    _unknown_keys(opt, OPTIMIZER_KEYS, "model.optimizer.")
    for key, what in REQUIRED_OPTIMIZER_KEYS:
        if opt.get(key) is None:
            raise RecipeError(f"model.optimizer.{key}: missing; set {what}")
    sched = model.get("schedule")
    if sched is None:
        sched = {}
    if not isinstance(sched, dict):
        raise RecipeError(f"model.schedule: expected a mapping, got {sched!r}")
    _unknown_keys(sched, SCHEDULE_KEYS, "model.schedule.")

    data = _section(cfg, "data", required=True)
    if data.get("global_batch") is None:
        raise RecipeError("data.global_batch: missing; set the global batch (the paper's batch size)")
    global_batch = _positive_int(data["global_batch"], "data.global_batch")
    micro = data.get("micro_batch")
    micro = None if micro is None else _positive_int(micro, "data.micro_batch")
    train_images = data.get("train_images")
    train_images = None if train_images is None else _positive_int(train_images, "data.train_images")
    root = data.get("root")
    if root is not None and not isinstance(root, (str, os.PathLike)):
        raise RecipeError(f"data.root: expected a folder path, got {root!r}")

    expected = cfg.get("expected") or {}
    if not isinstance(expected, dict):
        raise RecipeError(f"expected: expected a mapping like {{top1: 0.7696, top5: 0.9335, source: ...}}, got {expected!r}")
    _unknown_keys(expected, EXPECTED_KEYS, "expected.")
    expected = dict(expected)
    for key in ("top1", "top5"):
        if key in expected:
            expected[key] = _expected_fraction(expected[key], f"expected.{key}")
    for key in ("source", "note"):
        if expected.get(key) is not None and not isinstance(expected[key], str):
            raise RecipeError(f"expected.{key}: expected text, got {expected[key]!r}")

    schedule = ScheduleSpec(**sched)
    optimizer = OptimizerSpec(**opt)  # last: checking the name imports the registry (torch)
    return Recipe(path=shown, optimizer=optimizer, schedule=schedule, global_batch=global_batch,
                  micro_batch=micro, epochs=epochs, train_images=train_images,
                  data_root=None if root is None else str(root), expected=expected)


def count_train_images(root: "str | os.PathLike[str]") -> int:
    """Number of training images under ``root/train``, counted as the data module counts them: the
    root's index when it has one, else a listing (:func:`resnet_lamb.data.folder.validate_root`:
    hidden files skipped; nothing is opened)."""
    from resnet_lamb.data.index import count_images

    return count_images(root, "train")


def plan_recipe(recipe: Recipe, *, world_size: int = 1, micro_batch: Optional[int] = None,
                train_images: Optional[int] = None) -> Plan:
    """:func:`derive_plan` for a validated recipe, with ``plan``'s overrides.

    ``train_images``: the argument, else ``data.train_images``, else the files counted under
    ``data.root/train``, else a RecipeError.
    """
    micro = micro_batch if micro_batch is not None else recipe.micro_batch
    if micro is None:
        raise RecipeError(f"{recipe.path}: data.micro_batch: missing; set the per-device batch in the recipe "
                          f"or pass --micro-batch")
    images = train_images if train_images is not None else recipe.train_images
    if images is None:
        root = recipe.data_root
        if root is None or not (Path(root) / "train").is_dir():
            where = f"{root}/train does not exist" if root is not None else "data.root is not set"
            raise RecipeError(f"{recipe.path}: data.train_images: null and {where}; set data.train_images in the "
                              f"recipe or pass --train-images")
        images = count_train_images(root)  # DataError naming the folder when train/ is empty
    try:
        return derive_plan(recipe.optimizer, recipe.schedule, global_batch=recipe.global_batch,
                           micro_batch=micro, world_size=world_size, train_images=images, epochs=recipe.epochs)
    except RecipeError as err:
        raise RecipeError(f"{recipe.path}: {err}") from None


# ---------------------------------------------------------------------------------- plan
def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.7g}"
    return str(x)


def format_plan(plan: Plan, recipe: Optional[Recipe] = None) -> str:
    """``plan`` as an aligned text table: key, value, and how the value was derived."""
    p = plan
    rows = [
        ("optimizer", p.optimizer, f"weight_decay {_fmt(p.weight_decay)}"),
        ("schedule", p.schedule, {"poly": f"(1 - t/T)^{_fmt(p.power)} after linear warmup (BERT)",
                                  "goyal": f"linear warmup, x{_fmt(p.gamma)} at each milestone",
                                  "constant": "constant after linear warmup"}[p.schedule]),
        ("lr", _fmt(p.lr), f"{_fmt(p.base_lr)} x ({p.global_batch}/{p.base_batch})^"
                           f"{ {'sqrt': '1/2', 'linear': '1', 'none': '0'}[p.scaling]}  [{p.scaling}]"),
        ("global_batch", p.global_batch, "data.global_batch"),
        ("micro_batch", p.micro_batch, "per device, per forward"),
        ("world_size", p.world_size, "devices x nodes"),
        ("accumulation", p.accumulation, f"{p.global_batch} / ({p.micro_batch} x {p.world_size})"),
        ("train_images", p.train_images, ""),
        ("epochs", p.epochs, "trainer.max_epochs"),
        ("steps_per_epoch", p.steps_per_epoch, f"ceil({p.train_images} / {p.global_batch}), last batch padded"),
        ("total_steps", p.total_steps, f"ceil({p.epochs} x {p.train_images} / {p.global_batch}), the schedule's T"),
        ("optimizer_steps", p.optimizer_steps, f"{p.epochs} x {p.steps_per_epoch}, steps the run takes"),
        ("micro_batches_per_epoch_per_rank", p.micro_batches_per_epoch_per_rank,
         f"{p.steps_per_epoch} x {p.accumulation}"),
        ("padding_per_epoch", p.padding_per_epoch, f"{p.steps_per_epoch} x {p.global_batch} - {p.train_images}"),
        ("images_seen", p.images_seen, f"{p.total_steps} x {p.global_batch}"),
        ("warmup_epochs", _fmt(p.warmup_epochs),
         f"{_fmt(p.warmup_epochs_at_base)} x {p.global_batch}/{p.base_batch}  [linear]"
         if p.warmup_scaling == "linear" else "[not scaled]"),
        ("warmup_steps", p.warmup_steps, f"round({_fmt(p.warmup_epochs)} x {p.train_images} / {p.global_batch})"),
    ]
    if p.schedule == "goyal":
        rows.append(("milestones", ", ".join(map(str, p.milestones)) or "-", "epochs"))
        rows.append(("milestone_steps", ", ".join(map(str, p.milestone_steps)) or "-",
                     f"round(e x {p.train_images} / {p.global_batch})"))
    if recipe is not None and recipe.expected:
        ex = recipe.expected
        got = " / ".join("-" if ex.get(k) is None else f"{ex[k]:.4f}" for k in ("top1", "top5"))
        rows.append(("expected top1 / top5", got, ex.get("source") or ""))
    width = max(len(r[0]) for r in rows)
    vwidth = max(len(str(r[1])) for r in rows)
    head = f"resnet-lamb plan: {recipe.path}" if recipe is not None else "resnet-lamb plan"
    lines = [head] + [f"  {k:<{width}}  {str(v):>{vwidth}}  {how}".rstrip() for k, v, how in rows]
    return "\n".join(lines)


def plan_main(argv: Optional[list] = None) -> int:
    """``resnet-lamb plan --config RECIPE [--world-size N] [--micro-batch M] [--train-images N] [--json]``."""
    parser = argparse.ArgumentParser(
        prog="resnet-lamb plan",
        description="Print every number a recipe derives (LR, warmup, steps, accumulation, images seen), "
                    "touching no data, model or GPU.")
    parser.add_argument("--config", "-c", required=True, metavar="RECIPE", help="recipe YAML")
    parser.add_argument("--world-size", type=int, default=1, metavar="N", help="devices x nodes (default 1)")
    parser.add_argument("--micro-batch", type=int, default=None, metavar="M", help="override data.micro_batch")
    parser.add_argument("--train-images", type=int, default=None, metavar="N", help="override data.train_images")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = parser.parse_args(sys.argv[2:] if argv is None else argv)
    for flag, value in (("--world-size", args.world_size), ("--micro-batch", args.micro_batch),
                        ("--train-images", args.train_images)):
        if value is not None and value <= 0:
            raise RecipeError(f"{flag}: expected a positive integer, got {value}")
    recipe = validate_recipe(load_recipe(args.config), args.config)
    plan = plan_recipe(recipe, world_size=args.world_size, micro_batch=args.micro_batch,
                       train_images=args.train_images)
    if args.json:
        out = {"recipe": recipe.path, **plan.to_dict(), "expected": recipe.expected}
        print(json.dumps(out, indent=2))
    else:
        print(format_plan(plan, recipe))
    return 0
