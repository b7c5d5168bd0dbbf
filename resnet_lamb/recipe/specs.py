"""The typed parts of a recipe: value checks, ``model.arch``'s names, and the optimizer and schedule
specs (:class:`OptimizerSpec`, :class:`ScheduleSpec`) with their allowed names."""

import dataclasses
import difflib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, cast, get_args

from resnet_lamb.errors import RecipeError
from resnet_lamb.optim.names import check_optimizer_name


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


_Name = TypeVar("_Name", bound=str)


def _choice(value: Any, key: str, allowed: Sequence[_Name], what: str) -> _Name:
    """``value`` when it is one of ``allowed`` (a ``Literal``'s names keep their type), else a RecipeError."""
    if not isinstance(value, str) or value not in allowed:
        hint = difflib.get_close_matches(str(value), list(allowed), n=1)
        did = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise RecipeError(f"{key}: unknown {what} {value!r}{did}; choose one of {', '.join(allowed)}")
    return cast(_Name, value)  # one of allowed


# ------------------------------------------------------------------------------ the model
# model.arch: the torchvision ResNet constructors resnet_lamb.model builds, and its MLP
ARCHS = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "wide_resnet50_2",
    "wide_resnet101_2",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "mlp",
    "small_resnet",  # resnet_lamb.small_resnet: the proxy study's tiny ResNet
)


def check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise RecipeError(f"model.arch: unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")


# ------------------------------------------------------------------------------ the specs
# The allowed names, one definition each: the Literal types of the spec fields below
# (resnet_lamb.optim.schedules implements exactly these; tests/test_recipe.py checks they agree).
LR_SCALING = Literal["sqrt", "linear", "none"]
PARAM_RULE = Literal["author", "timm", "none"]
SCHEDULE = Literal["poly", "poly_after_warmup", "goyal", "constant"]
WARMUP_SCALING = Literal["linear", "none"]
EPOCH_MODE = Literal["padded", "full_batch"]
# the optimizers of resnet_lamb.optim.registry (tests/test_recipe.py checks they agree): named here
# so that an unknown name is reported without importing torch
LR_SCALINGS = get_args(LR_SCALING)
PARAM_RULES = get_args(PARAM_RULE)
SCHEDULES = get_args(SCHEDULE)
WARMUP_SCALINGS = get_args(WARMUP_SCALING)
EPOCH_MODES = get_args(EPOCH_MODE)  # resnet_lamb.data.sampling implements exactly these
POLY_SCHEDULES = ("poly", "poly_after_warmup")  # the schedules with a power and an end LR


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
        try:
            self.name = check_optimizer_name(self.name, p + "name")
        except ValueError as e:
            raise RecipeError(str(e)) from None
        for key, owner in (
            ("lr", "base_lr, base_batch and scaling"),
            ("weight_decay", "model.optimizer.weight_decay"),
            ("params", "param_rule"),
        ):
            if key in self.kwargs:
                raise RecipeError(f"{p}kwargs.{key}: set by {owner}, not by kwargs; remove it")
        if not self.kwargs:
            return
        from resnet_lamb.optim.registry import optimizer_options  # torch: only when there are kwargs to check

        accepted = tuple(sorted(optimizer_options(self.name)))
        for key in self.kwargs:
            if key not in accepted and key not in ("lr", "weight_decay", "params"):
                hint = difflib.get_close_matches(key, list(accepted), n=1)
                did = f" (did you mean {hint[0]}?)" if hint else ""
                raise RecipeError(
                    f"{p}kwargs.{key}: unknown option for optimizer {self.name!r}{did}; allowed: {', '.join(accepted)}"
                )


@dataclass
class ScheduleSpec:
    """``model.schedule``: the per-step LR multiplier (``resnet_lamb.optim.schedules``).

    ``warmup_epochs`` is stated at ``model.optimizer.base_batch`` and scaled with the global batch
    when ``warmup_scaling`` is ``linear`` (the paper's linear-epoch warmup). ``power`` and
    ``end_lr`` (the LR the decay ends at, absolute; at most the peak LR) are used by ``poly``
    (BERT's form: decay from step 0, warmup overriding the first steps) and ``poly_after_warmup``
    (the LAMB author's form: decay from the end of warmup); ``milestones`` (epochs) and ``gamma``
    by ``goyal``.  ``decay_steps`` (``poly_after_warmup`` only; null: to the run's last step) states
    the decay's length in optimizer steps after the warmup (MLPerf's ``opt_learning_rate_decay_steps``).
    """

    name: SCHEDULE = "poly"
    warmup_epochs: float = 0.0
    warmup_scaling: WARMUP_SCALING = "linear"
    power: float = 1.0
    end_lr: float = 0.0
    milestones: list[int] = field(default_factory=lambda: [30, 60, 80])
    gamma: float = 0.1
    decay_steps: int | None = None

    def __post_init__(self) -> None:
        p = "model.schedule."
        self.name = _choice(self.name, p + "name", SCHEDULES, "schedule")
        self.warmup_epochs = _nonnegative_float(self.warmup_epochs, p + "warmup_epochs")
        self.warmup_scaling = _choice(self.warmup_scaling, p + "warmup_scaling", WARMUP_SCALINGS, "warmup scaling rule")
        self.power = _positive_float(self.power, p + "power")
        self.end_lr = _nonnegative_float(self.end_lr, p + "end_lr")
        if self.end_lr and self.name not in POLY_SCHEDULES:
            raise RecipeError(
                f"{p}end_lr: {self.end_lr:g} is used by the {' and '.join(POLY_SCHEDULES)} schedules "
                f"only, not by {self.name}; remove it or pick one of those"
            )
        if self.milestones is None:
            self.milestones = []
        if not isinstance(self.milestones, (list, tuple)):
            raise RecipeError(f"{p}milestones: expected a list of epochs, got {self.milestones!r}")
        miles = [_positive_int(m, f"{p}milestones[{i}]") for i, m in enumerate(self.milestones)]
        if any(b <= a for a, b in zip(miles, miles[1:], strict=False)):
            raise RecipeError(f"{p}milestones: expected strictly increasing epochs, got {miles}")
        self.milestones = miles
        gamma = _positive_float(self.gamma, p + "gamma")
        if gamma > 1:
            raise RecipeError(f"{p}gamma: expected a decay factor in (0, 1], got {self.gamma!r}")
        self.gamma = gamma
        if self.decay_steps is not None:
            self.decay_steps = _positive_int(self.decay_steps, p + "decay_steps")
            if self.name != "poly_after_warmup":
                raise RecipeError(f"{p}decay_steps: used by poly_after_warmup only, not by {self.name}; remove it")


OPTIMIZER_KEYS = tuple(f.name for f in dataclasses.fields(OptimizerSpec))
SCHEDULE_KEYS = tuple(f.name for f in dataclasses.fields(ScheduleSpec))
SPEC_KEYS = {"model.optimizer": OPTIMIZER_KEYS, "model.schedule": SCHEDULE_KEYS}
