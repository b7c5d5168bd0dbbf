"""The recipe's schema: its keys, and :func:`validate_recipe`, the one check of a loaded recipe (types,
ranges, names, unknown keys, ``expected`` and ``sources``) that ``plan``, ``fit``,
launch/preflight.py and launch/sweep.py all use."""

import difflib
import os
from dataclasses import dataclass, field
from typing import Any

from resnet_lamb.errors import RecipeError
from resnet_lamb.recipe.specs import (
    EPOCH_MODES,
    OPTIMIZER_KEYS,
    SCHEDULE_KEYS,
    OptimizerSpec,
    ScheduleSpec,
    _choice,
    _is_number,
    _positive_int,
)

EXPECTED_KEYS = ("top1", "top5", "source", "note")
RECIPE_ONLY_KEYS = ("base", "expected", "sources")
# model.optimizer keys a recipe must state, and what to set (the OptimizerSpec defaults are not a recipe)
REQUIRED_OPTIMIZER_KEYS = (
    ("name", "the optimizer, one of resnet_lamb.optim.list_optimizers() or an optimizer class by import path"),
    ("base_lr", "the peak LR at model.optimizer.base_batch"),
)

# ------------------------------------------------------------------------------ unknown keys
# A key tree: each key maps to None (a value, not looked into) or to the tree of its section. A
# section holding ANY_KEY accepts keys the tree does not list: they are LightningCLI's (the module's,
# the data module's and the trainer's arguments), listed by the CLI's own tree (cli_keys).
ANY_KEY = "*"
RECIPE_KEYS: dict[str, Any] = {
    "base": None,
    "expected": dict.fromkeys(EXPECTED_KEYS),
    "sources": None,
    "seed_everything": None,
    "trainer": {ANY_KEY: None},
    "model": {"optimizer": dict.fromkeys(OPTIMIZER_KEYS), "schedule": dict.fromkeys(SCHEDULE_KEYS), ANY_KEY: None},
    "data": {ANY_KEY: None},
    "ckpt_path": None,
    "weights_only": None,  # LightningCLI's, for torch.load of ckpt_path
    "run": {ANY_KEY: None},
}
TOP_LEVEL_KEYS = tuple(RECIPE_KEYS)


def check_keys(cfg: Any, tree: "dict[str, Any]" = RECIPE_KEYS, prefix: str = "") -> None:
    """The one check for unknown keys (``plan``, ``fit``, launch/preflight.py and launch/sweep.py all
    come here): the first key of ``cfg`` that ``tree`` does not list is a RecipeError
    ``"<dotted key>: unknown key (did you mean <close>?); allowed: <the section's keys>"``."""
    if not isinstance(cfg, dict):
        return  # a section that is not a mapping: validate_recipe (or LightningCLI) says so
    for key, value in cfg.items():
        if key not in tree:
            if ANY_KEY in tree:
                continue
            allowed = [k for k in tree if k != ANY_KEY]
            hint = difflib.get_close_matches(str(key), allowed, n=1)
            did = f" (did you mean {hint[0]}?)" if hint else ""
            listed = ", ".join(allowed) if len(allowed) <= 24 else "see `resnet-lamb fit --help`"
            raise RecipeError(f"{prefix}{key}: unknown key{did}; allowed: {listed}")
        if isinstance(tree[key], dict):
            check_keys(value, tree[key], f"{prefix}{key}.")


def key_tree(dotted: "list[str]", over: "dict[str, Any]" = RECIPE_KEYS) -> "dict[str, Any]":
    """The key tree of a parser's dotted option names (LightningCLI's), with ``over``'s sections
    laid over it (the recipe's own keys: ``expected``'s, the specs')."""
    tree: dict[str, Any] = {}
    for name in dotted:
        node = tree
        *parents, leaf = name.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node.setdefault(leaf, None)
    return _lay_over(tree, over)


def _lay_over(tree: "dict[str, Any]", over: "dict[str, Any]") -> "dict[str, Any]":
    for key, sub in over.items():
        if key == ANY_KEY:
            continue
        if isinstance(sub, dict):
            tree[key] = _lay_over(tree[key] if isinstance(tree.get(key), dict) else {}, sub)
        else:
            tree.setdefault(key, None)
    return tree


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
    target_top1: float | None = None  # run.target_top1: stop at the first validation reaching it


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
    check_keys(cfg)
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
    for key, what in REQUIRED_OPTIMIZER_KEYS:
        if opt.get(key) is None:
            raise RecipeError(f"model.optimizer.{key}: missing; set {what}")
    sched = model.get("schedule")
    if sched is None:
        sched = {}
    if not isinstance(sched, dict):
        raise RecipeError(f"model.schedule: expected a mapping, got {sched!r}")

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
    expected = dict(expected)
    for key in ("top1", "top5"):
        if key in expected:
            expected[key] = _expected_fraction(expected[key], f"expected.{key}")
    for key in ("source", "note"):
        if expected.get(key) is not None and not isinstance(expected[key], str):
            raise RecipeError(f"expected.{key}: expected text, got {expected[key]!r}")

    target = (cfg.get("run") or {}).get("target_top1") if isinstance(cfg.get("run"), dict) else None
    if target is not None and (not _is_number(target) or not 0.0 < target <= 1.0):
        raise RecipeError(f"run.target_top1: expected a fraction in (0, 1] or null (off), got {target!r}")
    schedule = ScheduleSpec(**sched)
    optimizer = OptimizerSpec(**opt)  # last: checking the name imports the registry (torch)
    shown_model = {k: model[k] for k in ("label_smoothing", "grad_clip_norm", "zero_init_residual") if k in model}
    # the numbers derive_plan takes from the trainer and data sections
    sizes: dict[str, Any] = {
        "global_batch": global_batch,
        "micro_batch": micro,
        "epochs": epochs,
        "train_images": train_images,
    }
    return Recipe(
        path=shown,
        optimizer=optimizer,
        schedule=schedule,
        **sizes,
        data_root=None if root is None else str(root),
        expected=expected,
        epoch_mode=epoch_mode,
        bn_batch=bn_batch,
        model=shown_model,
        sources=sources,
        target_top1=None if target is None else float(target),
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
