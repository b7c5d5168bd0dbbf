"""The optimizer names the registry builds: the one list, importable without torch (``plan`` and
the recipe checks answer before torch is loaded).  Besides these, a name with a dot is the import
path of any ``torch.optim.Optimizer`` subclass (``pytorch_optimizer.ScalableShampoo``); only such a
name imports its package (and torch)."""

from __future__ import annotations

import difflib
import importlib

OPTIMIZER_NAMES = ("lamb", "nlamb", "nnlamb", "lars", "lars_classic", "adam", "adamw", "adagrad", "sgd", "nadam")


def is_class_path(name: object) -> bool:
    """``name`` names an optimizer class by import path (``package.module.Class``)."""
    return isinstance(name, str) and "." in name


def optimizer_class(path: str, key: str | None = "model.optimizer.name") -> type:
    """The ``torch.optim.Optimizer`` subclass at import path ``path`` (``module.Class``), else
    ValueError in one line: it does not import, or it is not an optimizer class."""
    where = f"{key}: " if key else ""
    module, _, attr = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), attr) if module and attr else None
    except Exception as e:  # noqa: BLE001 - whatever the import raises, the user's path or package
        detail = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(
            f"{where}cannot import {path!r} ({type(e).__name__}: {detail}); install its package or fix the path"
        ) from None
    if cls is None:
        raise ValueError(f"{where}cannot import {path!r} (not package.module.Class); fix the path")
    import torch

    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(
            f"{where}{path!r} is not a torch.optim.Optimizer subclass; name one by its import path "
            f"or choose one of {', '.join(OPTIMIZER_NAMES)}"
        )
    return cls


def check_optimizer_name(name: object, key: str | None = "model.optimizer.name") -> str:
    """``name`` when the registry builds it or it is the import path of an optimizer class, else
    ValueError in one line naming the choices (or why the class path does not work)."""
    if isinstance(name, str) and name in OPTIMIZER_NAMES:
        return name
    if is_class_path(name):
        assert isinstance(name, str)
        optimizer_class(name, key)
        return name
    hint = difflib.get_close_matches(str(name), list(OPTIMIZER_NAMES), n=1)
    did = f" (did you mean {hint[0]!r}?)" if hint else ""
    where = f"{key}: " if key else ""
    raise ValueError(
        f"{where}unknown optimizer {name!r}{did}; choose one of {', '.join(OPTIMIZER_NAMES)} "
        "or an optimizer class by import path (package.module.Class)"
    )
