"""Optimizer registry: one name -> one constructor, all through the same param-group rule.

``build_optimizer(name, model, lr, weight_decay, param_rule="author", **kwargs)``:

========== ======================================================================================
name        optimizer (``weight_decay`` goes to the groups the rule decays; 0 to the others)
========== ======================================================================================
lamb        :class:`~resnet_lamb.optim.Lamb` (Algorithm 2; b1 0.9, b2 0.999, eps 1e-6)
nlamb       Lamb(nesterov="n"), N-LAMB, Appendix D defaults b1 0.975, b2 0.999, eps 1e-8
nnlamb      Lamb(nesterov="nn"), NN-LAMB, same defaults
lars        :class:`~resnet_lamb.optim.Lars` mode="paper" (Algorithm 1)
lars_classic Lars mode="classic" (You et al. 2017 / MLPerf reference)
adam        torch.optim.Adam (weight_decay = coupled L2)
adamw       torch.optim.AdamW (decoupled decay) plus ``l2``: coupled L2 added to the gradient
            before the Adam moments (the paper's AdamW grids tune both)
adagrad     torch.optim.Adagrad (weight_decay = coupled L2)
sgd         torch.optim.SGD with momentum (default 0.9; ``nesterov`` option)
nadam       torch.optim.NAdam (Dozat's Nadam)
========== ======================================================================================

Any other ``torch.optim.Optimizer`` subclass is named by import path (``package.module.Class``,
e.g. ``pytorch_optimizer.ScalableShampoo``): built from the same groups with ``lr`` and the recipe's
options, which must be keyword parameters of its constructor (``weight_decay`` goes to the groups,
so a nonzero one needs a constructor that takes it).

torch's optimizers run fused (CPU/CUDA, floating params) or foreach where torch allows.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from resnet_lamb.optim.names import OPTIMIZER_NAMES as _NAMES
from resnet_lamb.optim.names import check_optimizer_name, is_class_path, optimizer_class


def list_optimizers() -> list[str]:
    """Names accepted by :func:`build_optimizer`."""
    return list(_NAMES)


class AdamWL2(torch.optim.AdamW):
    """torch AdamW plus coupled L2: before the AdamW step, ``grad += l2 * param`` (in place, on
    ``p.grad``) in every group with ``l2 > 0``; decoupled ``weight_decay`` as in AdamW."""

    def __init__(self, params: Iterable, *args: Any, l2: float = 0.0, **kwargs: Any):
        if not (isinstance(l2, (int, float)) and l2 >= 0):
            raise ValueError(f"l2 must be a number >= 0; got {l2!r}")
        self._l2_default = float(l2)
        super().__init__(params, *args, **kwargs)  # add_param_group sets each group's l2

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        g = self.param_groups[-1]
        g.setdefault("l2", self._l2_default if g.get("apply_decay", True) else 0.0)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None, **kwargs: Any):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            if g.get("l2", 0.0):
                ps = [p for p in g["params"] if p.grad is not None]
                if ps:
                    torch._foreach_add_([p.grad for p in ps], ps, alpha=g["l2"])
        super().step(**kwargs)
        return loss


def _fast(params: list[dict[str, Any]], fused_devices: tuple[str, ...]) -> dict[str, Any]:
    """fused=True where torch has a fused kernel for every param (floats on ``fused_devices``),
    else foreach on accelerators, else torch's default."""
    ts = [p[1] if isinstance(p, tuple) else p for g in params for p in g["params"]]
    if ts and all(t.is_floating_point() and t.device.type in fused_devices for t in ts):
        return {"fused": True}
    return {"foreach": True} if ts and all(t.device.type != "cpu" for t in ts) else {}


# name -> (builder(groups, lr, **kw), accepted kwargs with defaults)
def _lamb(nesterov: str | None, betas=(0.9, 0.999), eps=1e-6):
    def build(groups, lr, **kw):
        from resnet_lamb.optim.lamb import Lamb

        kw.setdefault("nesterov", nesterov)
        return Lamb(groups, lr=lr, **kw)

    opts = {"betas": betas, "eps": eps, "bias_correction": True, "norm": "l2", "trust_clip": None, "impl": "auto"}
    if nesterov is None:  # plain "lamb" may still pick a variant; nlamb/nnlamb fix theirs
        opts["nesterov"] = None
    return build, opts


def _lars(mode: str):
    def build(groups, lr, **kw):
        from resnet_lamb.optim.lars import Lars

        return Lars(groups, lr=lr, mode=mode, **kw)

    opts = {"momentum": 0.9, "eps": 1e-9, "trust_coefficient": 0.001, "trust_clip": None, "impl": "auto"}
    if mode == "classic":
        opts["nesterov"] = False
    return build, opts


def _torch(cls: type, fused_devices: tuple[str, ...], **defaults: Any):
    def build(groups, lr, **kw):
        if kw.get("fused") is None and kw.get("foreach") is None:
            kw.pop("fused", None)
            kw.pop("foreach", None)
            kw.update(_fast(groups, fused_devices))
        return cls(groups, lr=lr, **kw)

    return build, dict(defaults, foreach=None, fused=None) if fused_devices else dict(defaults, foreach=None)


_REGISTRY: dict[str, tuple[Callable, dict[str, Any]]] = {
    "lamb": _lamb(None),
    "nlamb": _lamb("n", betas=(0.975, 0.999), eps=1e-8),
    "nnlamb": _lamb("nn", betas=(0.975, 0.999), eps=1e-8),
    "lars": _lars("paper"),
    "lars_classic": _lars("classic"),
    "adam": _torch(torch.optim.Adam, ("cpu", "cuda"), betas=(0.9, 0.999), eps=1e-8, amsgrad=False),
    "adamw": _torch(AdamWL2, ("cpu", "cuda"), betas=(0.9, 0.999), eps=1e-8, amsgrad=False, l2=0.0),
    "adagrad": _torch(torch.optim.Adagrad, ("cpu",), lr_decay=0.0, eps=1e-10, initial_accumulator_value=0.0),
    "sgd": _torch(torch.optim.SGD, ("cpu", "cuda"), momentum=0.9, nesterov=False, dampening=0.0),
    "nadam": _torch(
        torch.optim.NAdam, (), betas=(0.9, 0.999), eps=1e-8, momentum_decay=4e-3, decoupled_weight_decay=False
    ),
}


#: a constructor parameter without a default (build_optimizer refuses to go without it)
REQUIRED = "(required)"
#: what build_optimizer passes itself: the groups, lr, and weight_decay inside the groups
_SET_BY_US = ("params", "lr", "weight_decay")


def _class_options(cls: type) -> dict[str, Any]:
    """The keyword parameters of ``cls``'s constructor besides params/lr/weight_decay, with their
    defaults (``**kwargs`` catch-alls are not options: a misspelt option is refused)."""
    sig = inspect.signature(cls)
    named = [p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return {
        p.name: REQUIRED if p.default is p.empty else p.default
        for i, p in enumerate(named)
        if i > 0 and p.name not in _SET_BY_US  # the first one takes the parameters
    }


def optimizer_options(name: str) -> dict[str, Any]:
    """The extra keyword arguments ``name`` accepts, with their defaults."""
    check_optimizer_name(name, None)
    if is_class_path(name):
        return _class_options(optimizer_class(name, None))
    return dict(_REGISTRY[name][1])


def _build_class(
    name: str,
    accepted: dict[str, Any],
    groups: list[dict[str, Any]],
    lr: float,
    weight_decay: float,
    kwargs: dict[str, Any],
) -> torch.optim.Optimizer:
    cls = optimizer_class(name, None)
    takes_wd = "weight_decay" in inspect.signature(cls).parameters
    if weight_decay and not takes_wd:
        raise ValueError(f"{name} takes no weight_decay; set weight_decay 0")
    missing = [k for k, v in accepted.items() if v is REQUIRED and k not in kwargs]
    if missing:
        raise ValueError(f"optimizer {name!r} needs option {missing[0]!r}; set it in the optimizer's kwargs")
    if not takes_wd:
        groups = [{k: v for k, v in g.items() if k != "weight_decay"} for g in groups]
    return cls(groups, lr=lr, **kwargs)


def build_optimizer(
    name: str, model: nn.Module | Iterable, lr: float, weight_decay: float, param_rule: str = "author", **kwargs: Any
) -> torch.optim.Optimizer:
    """Build optimizer ``name`` over ``model``'s parameters grouped by ``param_rule``.

    ``model``: an ``nn.Module`` (named parameters are passed, so state and ``trust_ratios()`` are
    keyed by the module's parameter names), or an iterable of tensors / ``(name, tensor)`` pairs
    (then only ``param_rule="none"`` or ``"timm"`` apply: "author" needs module types).
    ``kwargs``: the optimizer's own options (see :func:`optimizer_options`); unknown ones raise
    ValueError naming them and the accepted ones.
    """
    from resnet_lamb.optim.param_groups import param_groups

    check_optimizer_name(name, None)
    build, accepted = (None, optimizer_options(name)) if is_class_path(name) else _REGISTRY[name]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(
            f"unknown option {unknown[0]!r} for optimizer {name!r}; accepted: {', '.join(sorted(accepted))}"
        )
    groups = param_groups(model, weight_decay, param_rule)
    if build is None:
        return _build_class(name, accepted, groups, lr, weight_decay, kwargs)
    opts = {k: v for k, v in kwargs.items()}
    if name == "lamb" or name.endswith("lamb"):
        opts.setdefault("betas", accepted["betas"])
        opts.setdefault("eps", accepted["eps"])
    if name == "sgd":
        opts.setdefault("momentum", accepted["momentum"])
    return build(groups, lr, **opts)
