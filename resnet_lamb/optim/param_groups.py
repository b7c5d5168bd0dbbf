"""The one rule deciding, per parameter, weight decay and layer adaptation (trust ratio).

``param_groups(model, weight_decay, rule)`` returns optimizer param groups whose ``params`` are
``(name, tensor)`` pairs (so optimizers that accept named parameters, torch >= 2.6, key their
state and ``trust_ratios()`` by the module's parameter names).  Each group also carries
``weight_decay``, ``layer_adaptation`` (read by Lamb/Lars; ignored by torch's optimizers) and
``apply_decay`` (whether the rule decays this group; used for the AdamW ``l2`` option).

Rules:

* ``"author"``: the LAMB author's ResNet-50 code: normalization
  layers' weights and biases (BatchNorm, found by module type: every ``_NormBase`` subclass,
  GroupNorm, LayerNorm) get no weight decay and no trust ratio (``layer_adaptation=False``:
  "no trust ratio where there is no decay"); every other tensor, including conv/linear weights
  and the fc bias, gets decay and adaptation.
* ``"timm"``: timm's ``param_groups_weight_decay`` convention combined with timm's Lamb/Lars
  default of skipping the trust ratio where weight decay is 0: every tensor with ``ndim <= 1``
  (norm weights/biases, all biases) gets no decay and no adaptation; the rest gets both. For a
  ResNet this is also the MLPerf LARS reference's skip list (batch_normalization, bias: the fc bias too).
* ``"none"``: one group, everything decayed and adapted (the plain optimizer of the paper's
  pseudocode, as torch-optimizer's and DeepSpeed's LAMB apply it).

Parameters with ``requires_grad=False`` are left out; empty groups are dropped.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

RULES = ("author", "timm", "none")
_NORM_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def _norm_param_ids(model: nn.Module) -> set[int]:
    ids: set[int] = set()
    for _, mod in model.named_modules():
        if isinstance(mod, _NORM_TYPES):
            ids.update(id(p) for p in mod.parameters(recurse=False))
    return ids


def param_groups(model: nn.Module | Iterable, weight_decay: float, rule: str = "author") -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters into a decayed+adapted group and an undecayed,
    unadapted group according to ``rule`` ("author" | "timm" | "none"); see the module doc.

    ``model`` may also be an iterable of tensors or ``(name, tensor)`` pairs (unnamed ones are
    called ``p<i>``); then only "timm" and "none" apply, since "author" finds norms by module type.
    """
    if rule not in RULES:
        raise ValueError(f"param_rule must be one of {', '.join(RULES)}; got {rule!r}")
    if isinstance(model, nn.Module):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    elif rule == "author":
        raise ValueError(
            "param_rule 'author' needs an nn.Module (BatchNorm is found by "
            "module type); pass the model or use param_rule 'timm' / 'none'"
        )
    else:
        named = [p if isinstance(p, tuple) else (f"p{i}", p) for i, p in enumerate(model)]
    if rule == "none":
        skip: set[int] = set()
    elif rule == "author":
        assert isinstance(model, nn.Module)  # other models were refused above
        skip = _norm_param_ids(model)
    else:  # timm
        skip = {id(p) for _, p in named if p.ndim <= 1}
    decay = [(n, p) for n, p in named if id(p) not in skip]
    plain = [(n, p) for n, p in named if id(p) in skip]
    groups = []
    if decay:
        groups.append(
            {"params": decay, "weight_decay": float(weight_decay), "layer_adaptation": True, "apply_decay": True}
        )
    if plain:
        groups.append({"params": plain, "weight_decay": 0.0, "layer_adaptation": False, "apply_decay": False})
    return groups
