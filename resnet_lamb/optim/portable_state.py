"""Optimizer state that ``torch.load(weights_only=True)`` (how Lightning resumes) accepts.

A class-path optimizer may keep Python objects in its state (pytorch-optimizer's ScalableShampoo:
a ``PreConditioner`` and a graft per parameter).  :func:`to_plain` writes such objects as tagged
dicts of their attributes (enums as their value), so the checkpoint holds only tensors, numbers,
strings and containers; :func:`from_plain` rebuilds them, without calling any constructor, from
classes of the optimizer's own package only (a checkpoint cannot name another module to import).
"""

from __future__ import annotations

import enum
import importlib
from typing import Any

import torch

from resnet_lamb.optim.names import is_class_path

_OBJECT = "__resnet_lamb_object__"
_ENUM = "__resnet_lamb_enum__"
_PLAIN = (type(None), bool, int, float, str, torch.Size)


def _path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def to_plain(x: Any) -> Any:
    """``x`` with every object that is not a tensor, number, string or container turned into a tagged dict."""
    if torch.is_tensor(x) or isinstance(x, _PLAIN) and not isinstance(x, enum.Enum):
        return x
    if isinstance(x, enum.Enum):
        return {_ENUM: _path(type(x)), "value": x.value}
    if isinstance(x, dict):
        return {k: to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(to_plain(v) for v in x)
    if hasattr(x, "__dict__"):
        return {_OBJECT: _path(type(x)), "attrs": {k: to_plain(v) for k, v in vars(x).items()}}
    raise TypeError(f"optimizer state holds a {type(x).__name__}, which a checkpoint cannot keep")


def _class(path: str, package: str) -> Any:
    module, _, qualname = path.partition(":")
    if module.split(".")[0] != package:
        raise ValueError(f"optimizer state names {path!r}, outside the optimizer's package {package!r}")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def from_plain(x: Any, package: str) -> Any:
    """The inverse of :func:`to_plain`; classes are looked up in ``package`` (top-level name) only."""
    if isinstance(x, dict):
        if _ENUM in x:
            return _class(x[_ENUM], package)(x["value"])
        if _OBJECT in x:
            cls = _class(x[_OBJECT], package)
            obj = cls.__new__(cls)
            obj.__dict__.update(from_plain(x["attrs"], package))
            return obj
        return {k: from_plain(v, package) for k, v in x.items()}
    if isinstance(x, (list, tuple)) and not isinstance(x, torch.Size):
        return type(x)(from_plain(v, package) for v in x)
    return x


def save_optimizer_states(checkpoint: dict[str, Any], optimizer_name: str) -> None:
    """A class-path optimizer's states in ``checkpoint`` as :func:`to_plain` writes them (the
    registry's optimizers keep tensors and numbers only: left as they are)."""
    if is_class_path(optimizer_name):
        checkpoint["optimizer_states"] = to_plain(checkpoint.get("optimizer_states", []))


def load_optimizer_states(checkpoint: dict[str, Any], optimizer_name: str) -> None:
    """The inverse of :func:`save_optimizer_states`, from the optimizer's own package."""
    if is_class_path(optimizer_name) and checkpoint.get("optimizer_states"):
        checkpoint["optimizer_states"] = from_plain(checkpoint["optimizer_states"], optimizer_name.split(".")[0])
