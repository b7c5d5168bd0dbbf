"""The optimizer names the registry builds: the one list, importable without torch (``plan`` and
the recipe checks answer before torch is loaded)."""

from __future__ import annotations

import difflib

OPTIMIZER_NAMES = ("lamb", "nlamb", "nnlamb", "lars", "lars_classic", "adam", "adamw", "adagrad", "sgd", "nadam")


def check_optimizer_name(name: object, key: str | None = "model.optimizer.name") -> str:
    """``name`` when the registry builds it, else ValueError in one line naming the choices."""
    if isinstance(name, str) and name in OPTIMIZER_NAMES:
        return name
    hint = difflib.get_close_matches(str(name), list(OPTIMIZER_NAMES), n=1)
    did = f" (did you mean {hint[0]!r}?)" if hint else ""
    where = f"{key}: " if key else ""
    raise ValueError(f"{where}unknown optimizer {name!r}{did}; choose one of {', '.join(OPTIMIZER_NAMES)}")
