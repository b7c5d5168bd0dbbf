"""Optimizers for resnet-lamb: LAMB (+ N-/NN-LAMB), LARS (paper / classic), the registry of
baselines and the parameter-group rule.

Imports are lazy (as in ``resnet_lamb.data``): ``resnet_lamb.optim.schedules`` holds the batch
rules that ``resnet-lamb plan`` and ``fit``'s start-up checks use, and importing it must not pay
for torch.
"""

from __future__ import annotations

import importlib

# The param-group rule is imported from its module (resnet_lamb.optim.param_groups.param_groups): a
# re-export here would be shadowed by the submodule of the same name once that is imported.
__all__ = ["Lamb", "Lars", "build_optimizer", "list_optimizers"]
_WHERE = {"Lamb": "lamb", "Lars": "lars", "build_optimizer": "registry", "list_optimizers": "registry"}


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f"resnet_lamb.optim.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'resnet_lamb.optim' has no attribute {name!r}")
