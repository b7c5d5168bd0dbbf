"""Recipes: YAML with ``base:`` chains, the optimizer/schedule specs, the derived numbers, ``plan``.

A recipe states rules (``base_lr`` at ``base_batch`` with a scaling rule, warmup epochs at
``base_batch``, ...); :func:`derive_plan` turns them into every number a run uses, for ``plan``
and for ``fit`` alike (docs/CONTRACTS.md, "Derived numbers").

``resnet-lamb plan`` reads no data and touches no model or GPU. This module imports no torch:
only checking an optimizer's ``kwargs`` against its constructor (``resnet_lamb.optim.registry``)
does, so ``plan`` and ``fit``'s start-up checks (:func:`apply_overrides`, :func:`blame`) answer
before torch is loaded.
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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, cast, get_args

import yaml

from resnet_lamb.errors import RecipeError
from resnet_lamb.optim.names import check_optimizer_name

# What LightningCLI accepts at the top level of a config, plus the recipe's own `base` and
# `expected`. `optimizer`/`lr_scheduler` are deliberately absent: they belong in model.optimizer
# and model.schedule.
TOP_LEVEL_KEYS = ("base", "expected", "sources", "seed_everything", "trainer", "model", "data", "ckpt_path")
EXPECTED_KEYS = ("top1", "top5", "source", "note")
RECIPE_ONLY_KEYS = ("base", "expected", "sources")
# model.optimizer keys a recipe must state, and what to set (the OptimizerSpec defaults are not a recipe)
REQUIRED_OPTIMIZER_KEYS = (
    ("name", "the optimizer, one of resnet_lamb.optim.list_optimizers()"),
    ("base_lr", "the peak LR at model.optimizer.base_batch"),
)


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
        raise RecipeError(
            f"{shown}: empty recipe; expected a YAML mapping with model, data and trainer "
            f"sections (see recipes/imagenet/table5/lamb-bs512.yaml)"
        )
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
        raise RecipeError(
            f"{shown}: recipe file not found"
            if not chain
            else f"{chain[-1][1]}: base: {shown} not found; fix the base path (relative to "
            f"{os.path.dirname(chain[-1][1]) or '.'})"
        )
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


# ------------------------------------------------------------------- command-line overrides
def command_line_flags(args: "list[str]") -> "Iterator[tuple[str, str]]":
    """``(dotted key, raw value)`` for each ``--key value``, ``--key=value`` or bare ``--key`` (raw
    "true") in order; ``-c FILE`` is ``--config FILE``; other words are skipped."""
    i = 0
    while i < len(args):
        a = "--config" if args[i] == "-c" else args[i]
        if not a.startswith("--"):
            i += 1
        elif "=" in a:
            key, raw = a[2:].split("=", 1)
            i += 1
            yield key, raw
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            i += 2
            yield a[2:], args[i - 1]
        else:
            i += 1
            yield a[2:], "true"


def apply_overrides(cfg: dict, args: "list[str]") -> "tuple[dict, dict[str, str]]":
    """``cfg`` with a command line's overrides applied in order, as ``fit`` (jsonargparse) applies them:
    each ``--config FILE`` (its ``base:`` chain resolved) over what came before, each
    ``--section.key value`` / ``--section.key=value`` set (read by :func:`parse_value`); a later one
    wins.  A mapping given for a section (:data:`SECTIONS`) is merged into it key by key, any other
    value (``model.optimizer.kwargs`` included) replaces the old one.  Flags ending in ``+`` (list
    appends) are skipped.

    Also returns where each key got its value: ``{dotted key: origin}``, the origin being
    ``"--key value"`` for a flag or the file's path for a ``--config`` file (see :func:`blame`).
    """
    cfg = copy.deepcopy(cfg)
    origins: dict[str, str] = {}
    for key, raw in command_line_flags(args):
        if key == "config":
            key, value, origin = "", load_recipe(raw), os.path.normpath(raw)
        elif key and not key.endswith("+"):
            value, origin = parse_value(raw), f"--{key} {raw}"
        else:
            continue
        for done in _set_as_cli(cfg, key, value):
            origins = {k: v for k, v in origins.items() if k != done and not k.startswith(done + ".")}
            origins[done] = origin
    return cfg, origins


# the config's sections (LightningCLI groups and the specs' dataclasses): a mapping given for one of
# them is merged into it; a mapping given for any other key replaces it
SECTIONS = ("", "trainer", "model", "data", "model.optimizer", "model.schedule")


def _set_as_cli(cfg: dict, key: str, value: Any) -> "list[str]":
    """``cfg[key] = value`` for a dotted ``key`` ("" = the whole config), as jsonargparse sets it;
    returns the keys whose values were replaced."""
    if key in SECTIONS and isinstance(value, dict):
        return [k for sub, item in value.items() for k in _set_as_cli(cfg, f"{key}.{sub}" if key else str(sub), item)]
    node, parts = cfg, key.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = copy.deepcopy(value)
    return [key]


def _origin(key: str, origins: "dict[str, str]") -> str | None:
    """Where ``key`` (or the mapping holding it) was set, None when in the recipe itself."""
    key = re.sub(r"\[\d+\]", "", key)
    while key:
        if key in origins:
            return origins[key]
        key = key.rpartition(".")[0]
    return None


_KEY = re.compile(r"(?<![\w./-])((?:model|data|trainer)(?:\.[A-Za-z_]\w*)+|seed_everything|ckpt_path)\b")


def blame(message: str, path: "str | os.PathLike[str]", origins: "dict[str, str]") -> str:
    """A :class:`RecipeError`'s ``"<recipe>: <key>: <problem>"`` naming the command-line override or
    later ``--config`` file that set the value, not the recipe file: ``"--data.micro_batch -8:
    expected a positive integer, got -8"``, ``"extra.yaml: data.micro_batch: ..."``.  When the key
    the error is about comes from the recipe but another key it names was overridden (a global batch
    that the micro batch does not divide), the override is named beside the recipe:
    ``"recipe.yaml with --data.micro_batch 7: data.global_batch: ..."``."""
    shown = os.path.normpath(str(path))
    rest = message[len(shown) + 2 :] if message.startswith(shown + ": ") else message
    lead, sep, problem = rest.partition(": ")
    lead_origin = _origin(lead, origins) if sep and _KEY.fullmatch(re.sub(r"\[\d+\]", "", lead)) else None
    if lead_origin is not None:
        if lead_origin.startswith("--") and lead_origin.split(" ", 1)[0] == f"--{lead}":
            return f"{lead_origin}: {problem}"
        return f"{lead_origin}: {rest}"
    others = []
    for key in _KEY.findall(rest):
        where = _origin(key, origins)
        if where is not None and where not in others:
            others.append(where)
    if others:
        return f"{shown} with {', '.join(others)}: {rest}"
    return message


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


_Name = TypeVar("_Name", bound=str)


def _choice(value: Any, key: str, allowed: Sequence[_Name], what: str) -> _Name:
    """``value`` when it is one of ``allowed`` (a ``Literal``'s names keep their type), else a RecipeError."""
    if not isinstance(value, str) or value not in allowed:
        hint = difflib.get_close_matches(str(value), list(allowed), n=1)
        did = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise RecipeError(f"{key}: unknown {what} {value!r}{did}; choose one of {', '.join(allowed)}")
    return cast(_Name, value)  # one of allowed


def _unknown_keys(mapping: dict, allowed: "tuple[str, ...]", prefix: str, what: str = "key") -> None:
    for key in mapping:
        if key not in allowed:
            hint = difflib.get_close_matches(str(key), list(allowed), n=1)
            did = f" (did you mean {hint[0]}?)" if hint else ""
            raise RecipeError(f"{prefix}{key}: unknown {what}{did}; allowed: {', '.join(allowed)}")


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
    by ``goyal``.
    """

    name: SCHEDULE = "poly"
    warmup_epochs: float = 0.0
    warmup_scaling: WARMUP_SCALING = "linear"
    power: float = 1.0
    end_lr: float = 0.0
    milestones: list[int] = field(default_factory=lambda: [30, 60, 80])
    gamma: float = 0.1

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


# ----------------------------------------------------------------------------- validation
@dataclass(frozen=True)
class Recipe:
    """What :func:`validate_recipe` found in a loaded recipe: the specs and the numbers plan needs."""

    path: str
    optimizer: OptimizerSpec
    schedule: ScheduleSpec
    global_batch: int
    micro_batch: int | None
    epochs: int
    train_images: int | None
    data_root: str | None
    expected: dict = field(default_factory=dict)
    epoch_mode: str = "padded"
    bn_batch: int | None = None
    model: dict = field(default_factory=dict)  # model.* keys shown by `plan` (label_smoothing, grad_clip_norm...)
    sources: dict = field(default_factory=dict)  # dotted recipe key -> where its value comes from


def _section(cfg: dict, key: str) -> dict:
    """The required section ``cfg[key]``."""
    value = cfg.get(key)
    if value is None:
        raise RecipeError(f"{key}: missing section; see docs/CONTRACTS.md for the recipe layout")
    if not isinstance(value, dict):
        raise RecipeError(f"{key}: expected a mapping, got {value!r}")
    return value


def _expected_fraction(value: Any, key: str) -> float | None:
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
    ``data.micro_batch``, ``data.train_images``, ``data.root``, ``data.epoch_mode``,
    ``model.bn_batch``, ``trainer.max_epochs``, ``expected`` and ``sources``. Other keys of
    ``model``/``data``/``trainer`` are LightningCLI's to check.
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
            raise RecipeError(
                f"{key}: not a recipe key; the optimizer and its schedule go under model.optimizer and model.schedule"
            )
    _unknown_keys(cfg, TOP_LEVEL_KEYS, "", "top-level key")
    seed = cfg.get("seed_everything")
    if seed is not None and not isinstance(seed, (bool, int)):
        raise RecipeError(f"seed_everything: expected an integer, true/false or null, got {seed!r}")
    ckpt = cfg.get("ckpt_path")
    if ckpt is not None and not isinstance(ckpt, str):
        raise RecipeError(f"ckpt_path: expected a path or null, got {ckpt!r}")

    trainer = _section(cfg, "trainer")
    if trainer.get("max_epochs") is None:
        raise RecipeError("trainer.max_epochs: missing; set the number of epochs (the paper's is 90)")
    epochs = _positive_int(trainer["max_epochs"], "trainer.max_epochs")

    model = _section(cfg, "model")
    opt = model.get("optimizer")
    if not isinstance(opt, dict):
        raise RecipeError(
            "model.optimizer: missing; set at least model.optimizer.name and model.optimizer.base_lr"
            if opt is None
            else f"model.optimizer: expected a mapping, got {opt!r}"
        )
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

    data = _section(cfg, "data")
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

    epoch_mode = _choice(data.get("epoch_mode", "padded"), "data.epoch_mode", EPOCH_MODES, "epoch mode")
    bn_batch = model.get("bn_batch")
    bn_batch = None if bn_batch is None else _positive_int(bn_batch, "model.bn_batch")
    sources = _sources(cfg)

    expected = cfg.get("expected") or {}
    if not isinstance(expected, dict):
        raise RecipeError(
            f"expected: expected a mapping like {{top1: 0.7696, top5: 0.9335, source: ...}}, got {expected!r}"
        )
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
    shown_model = {k: model[k] for k in ("label_smoothing", "grad_clip_norm", "zero_init_residual") if k in model}
    return Recipe(
        path=shown,
        optimizer=optimizer,
        schedule=schedule,
        global_batch=global_batch,
        micro_batch=micro,
        epochs=epochs,
        train_images=train_images,
        data_root=None if root is None else str(root),
        expected=expected,
        epoch_mode=epoch_mode,
        bn_batch=bn_batch,
        model=shown_model,
        sources=sources,
    )


_MISSING = object()


def _lookup(cfg: Any, dotted: str) -> Any:
    """``cfg[a][b]...`` for ``"a.b..."``; ``_MISSING`` where a key is absent."""
    for part in dotted.split("."):
        if not isinstance(cfg, dict) or part not in cfg:
            return _MISSING
        cfg = cfg[part]
    return cfg


def _sources(cfg: dict) -> dict:
    """``sources``: a mapping from a recipe key (dotted, e.g. ``model.optimizer.base_lr``) to where
    its value comes from (a paper section or table, a run's log, a reference implementation, or
    "our choice" and why). Every key must name a key the recipe sets (a typo would hide a source)."""
    sources = cfg.get("sources")
    if sources is None:
        return {}
    if not isinstance(sources, dict):
        raise RecipeError(f"sources: expected a mapping of recipe keys to their sources, got {sources!r}")
    for key, text in sources.items():
        if not isinstance(text, str) or not text.strip():
            raise RecipeError(f"sources.{key}: expected the source as text, got {text!r}")
        if not isinstance(key, str) or key.split(".")[0] in RECIPE_ONLY_KEYS or _lookup(cfg, key) is _MISSING:
            raise RecipeError(
                f"sources.{key}: names no key this recipe sets; write the dotted key of a setting "
                f"(e.g. model.optimizer.base_lr) or set that key in the recipe"
            )
    return dict(sources)


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


def _decay(p: Plan) -> tuple[str, str]:
    end = f"{_fmt(p.end_lr)}" if p.end_lr else "0"
    power = "linear" if p.power == 1 else f"power {_fmt(p.power)}"
    if p.schedule == "poly_after_warmup":
        how = f"{power} from step {p.warmup_steps} (the peak LR) to {end} at step {p.total_steps}"
        if p.power == 1 and not p.end_lr:
            how += ": (T - t)*lr/(T - W)"
        return f"{p.warmup_steps}..{p.total_steps}", how
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
        value, how = _decay(p)
        row("decay", value, how, "model.schedule.name")
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
        out = {"recipe": recipe.path, **plan.to_dict(), "expected": recipe.expected, "sources": sources}
        print(json.dumps(out, indent=2))
    else:
        print(format_plan(plan, recipe))
    return 0
