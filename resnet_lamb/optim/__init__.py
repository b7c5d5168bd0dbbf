"""Optimizers for resnet-lamb: LAMB (+ N-/NN-LAMB), LARS (paper / classic), the registry of
baselines and the parameter-group rule."""
from resnet_lamb.optim.lamb import Lamb
from resnet_lamb.optim.lars import Lars
from resnet_lamb.optim.param_groups import param_groups
from resnet_lamb.optim.registry import build_optimizer, list_optimizers

__all__ = ["Lamb", "Lars", "build_optimizer", "list_optimizers", "param_groups"]

# ---- schedules: the schedules engineer adds their re-export here, e.g. -------------------
# from resnet_lamb.optim.schedules import ...   (and extend __all__)
# -------------------------------------------------------------------------------------------
