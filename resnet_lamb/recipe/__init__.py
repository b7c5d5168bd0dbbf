"""Recipes: YAML with ``base:`` chains, the optimizer/schedule specs, the derived numbers, ``plan``.

A recipe states rules (``base_lr`` at ``base_batch`` with a scaling rule, warmup epochs at
``base_batch``, ...); :func:`derive_plan` turns them into every number a run uses, for ``plan``
and for ``fit`` alike (docs/CONTRACTS.md, "Derived numbers").

One module per concept:

* :mod:`~resnet_lamb.recipe.loading`: YAML, ``base:`` chains, the command line's overrides.
* :mod:`~resnet_lamb.recipe.specs`: value checks, ``model.arch``'s names, the optimizer and
  schedule specs.
* :mod:`~resnet_lamb.recipe.schema`: the recipe's keys and :func:`validate_recipe`, the one
  validator (unknown keys are found by :func:`~resnet_lamb.recipe.schema.check_keys` only).
* :mod:`~resnet_lamb.recipe.plan`: :class:`Plan`, :func:`derive_plan`, :func:`plan_recipe`.
* :mod:`~resnet_lamb.recipe.table`: ``resnet-lamb plan``'s table and command.

``resnet-lamb plan`` reads no data and touches no model or GPU. This package imports no torch:
only checking an optimizer's ``kwargs`` against its constructor (``resnet_lamb.optim.registry``)
does, so ``plan`` and ``fit``'s start-up checks answer before torch is loaded.
"""

from resnet_lamb.recipe.loading import (
    SECTIONS,
    apply_overrides,
    blame,
    command_line_flags,
    deep_merge,
    load_recipe,
    parse_value,
    recipe_part,
    to_lightning_config,
)
from resnet_lamb.recipe.plan import Plan, count_train_images, derive_plan, plan_recipe
from resnet_lamb.recipe.schema import (
    EXPECTED_KEYS,
    RECIPE_KEYS,
    RECIPE_ONLY_KEYS,
    REQUIRED_OPTIMIZER_KEYS,
    TOP_LEVEL_KEYS,
    Recipe,
    check_keys,
    key_tree,
    validate_recipe,
)
from resnet_lamb.recipe.specs import (
    ARCHS,
    EPOCH_MODE,
    EPOCH_MODES,
    LR_SCALING,
    LR_SCALINGS,
    OPTIMIZER_KEYS,
    PARAM_RULE,
    PARAM_RULES,
    POLY_SCHEDULES,
    SCHEDULE,
    SCHEDULE_KEYS,
    SCHEDULES,
    SPEC_KEYS,
    WARMUP_SCALING,
    WARMUP_SCALINGS,
    OptimizerSpec,
    ScheduleSpec,
    check_arch,
)
from resnet_lamb.recipe.table import format_plan, plan_main, plan_rows

__all__ = [
    "ARCHS",
    "EPOCH_MODE",
    "EPOCH_MODES",
    "EXPECTED_KEYS",
    "LR_SCALING",
    "LR_SCALINGS",
    "OPTIMIZER_KEYS",
    "PARAM_RULE",
    "PARAM_RULES",
    "POLY_SCHEDULES",
    "RECIPE_KEYS",
    "RECIPE_ONLY_KEYS",
    "REQUIRED_OPTIMIZER_KEYS",
    "SCHEDULE",
    "SCHEDULES",
    "SCHEDULE_KEYS",
    "SECTIONS",
    "SPEC_KEYS",
    "TOP_LEVEL_KEYS",
    "WARMUP_SCALING",
    "WARMUP_SCALINGS",
    "OptimizerSpec",
    "Plan",
    "Recipe",
    "ScheduleSpec",
    "apply_overrides",
    "blame",
    "check_arch",
    "check_keys",
    "command_line_flags",
    "count_train_images",
    "deep_merge",
    "derive_plan",
    "format_plan",
    "key_tree",
    "load_recipe",
    "parse_value",
    "plan_main",
    "plan_recipe",
    "plan_rows",
    "recipe_part",
    "to_lightning_config",
    "validate_recipe",
]
