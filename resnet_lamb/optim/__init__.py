"""Optimizers for resnet-lamb: LAMB (+ N-/NN-LAMB), LARS (paper / classic), the registry of
baselines and the parameter-group rule.

Imports are lazy (as in ``resnet_lamb.data``): ``resnet_lamb.optim.schedules`` holds the batch
rules that ``resnet-lamb plan`` and ``fit``'s start-up checks use, and importing it must not pay
for torch.
"""
from __future__ import annotations

import importlib
import sys
import types

__all__ = ["Lamb", "Lars", "build_optimizer", "list_optimizers", "param_groups"]
_WHERE = {"Lamb": "lamb", "Lars": "lars", "build_optimizer": "registry", "list_optimizers": "registry",
          "param_groups": "param_groups"}

# ---- schedules: the schedules engineer adds their re-export here, e.g. -------------------
# from resnet_lamb.optim.schedules import ...   (and extend __all__)
# -------------------------------------------------------------------------------------------


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f"resnet_lamb.optim.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'resnet_lamb.optim' has no attribute {name!r}")


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        # importing a submodule binds it on its package: the module param_groups would hide the
        # function param_groups exported here (the eager import used to rebind it)
        if name in _WHERE and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
