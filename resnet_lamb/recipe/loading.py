"""Reading a recipe: YAML with ``base:`` chains (:func:`load_recipe`) and the command line's
overrides applied as ``fit`` applies them (:func:`apply_overrides`, :func:`blame`)."""

import copy
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from resnet_lamb.errors import RecipeError
from resnet_lamb.recipe.schema import RECIPE_ONLY_KEYS


# ------------------------------------------------------------------------------------ YAML
class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``), as JSON does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_value(raw: str) -> Any:
    """A command-line value read as the recipe loader reads YAML (``1e-5`` is a float); text that
    is not YAML stays text."""
    try:
        return yaml.load(raw, Loader=_Loader)
    except yaml.YAMLError:
        return raw


def _collapse_whitespace(text: str) -> str:
    return " ".join(str(text).split())


def _read_yaml(path: Path, shown: str) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise RecipeError(f"{shown}: not a UTF-8 text file ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise RecipeError(f"{shown}: cannot read recipe ({err.strerror})") from None
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{shown}:{mark.line + 1}:{mark.column + 1}" if mark is not None else shown
        what = _collapse_whitespace(" ".join(s for s in (err.context, err.problem) if s))
        raise RecipeError(f"{where}: YAML syntax error: {what}; fix the recipe's YAML") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"{shown}: YAML error: {_collapse_whitespace(err)}") from None
    if data is None:
        raise RecipeError(
            f"{shown}: empty recipe; expected a YAML mapping with model, data and trainer "
            f"sections (see recipes/imagenet/table5/lamb-bs512.yaml)"
        )
    if not isinstance(data, dict):
        raise RecipeError(f"{shown}:1: expected a YAML mapping at the top level, got {type(data).__name__}")
    return data


def deep_merge(base: dict, child: dict) -> dict:
    """``child`` over ``base``: mappings merge key by key (recursively), anything else is replaced."""
    out = copy.deepcopy(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_recipe(path: "str | os.PathLike[str]") -> dict:
    """The recipe at ``path`` with its ``base:`` chain resolved, as one dict (without ``base``).

    ``base`` is a path relative to the file that names it; the base is loaded (recursively) and
    this file is deep-merged over it (this file wins; a key cannot be deleted, set it to null).
    A missing file, a cycle, a YAML syntax error or an empty file is a :class:`RecipeError`
    naming the file (and the line for syntax errors).
    """
    return _load(Path(path), ())


def _load(path: Path, chain: tuple) -> dict:
    shown = os.path.normpath(str(path))
    if not path.is_file():
        raise RecipeError(
            f"{shown}: recipe file not found"
            if not chain
            else f"{chain[-1][1]}: base: {shown} not found; fix the base path (relative to "
            f"{os.path.dirname(chain[-1][1]) or '.'})"
        )
    resolved = path.resolve()
    if any(resolved == seen for seen, _ in chain):
        cycle = " -> ".join([s for _, s in chain] + [shown])
        raise RecipeError(f"{chain[-1][1]}: base: cycle {cycle}; a recipe cannot be its own base")
    data = _read_yaml(path, shown)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base.strip():
        raise RecipeError(f"{shown}: base: expected a path to a recipe relative to this file, got {base!r}")
    parent = _load(path.parent / base, chain + ((resolved, shown),))
    return deep_merge(parent, data)


def recipe_part(cfg: dict) -> dict:
    """What :func:`validate_recipe` checks of a resolved config (``fit``'s, or a run's saved
    config.yaml): all but ``ckpt_path``, ``base`` and jsonargparse's ``config`` (the files it read),
    ``expected`` only when set.  Unknown keys stay, for the validator to name."""
    part = {k: v for k, v in cfg.items() if k not in ("ckpt_path", "base", "config")}
    if part.get("expected") is None:
        part.pop("expected", None)
    return part


# ------------------------------------------------------------------- command-line overrides
def command_line_flags(args: "list[str]") -> "Iterator[tuple[str, str]]":
    """``(dotted key, raw value)`` for each ``--key value``, ``--key=value`` or bare ``--key`` (raw
    "true") in order; ``-c FILE`` is ``--config FILE``; other words are skipped."""
    i = 0
    while i < len(args):
        a = "--config" if args[i] == "-c" else args[i]
        if not a.startswith("--"):
            i += 1
        elif "=" in a:
            key, raw = a[2:].split("=", 1)
            i += 1
            yield key, raw
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            i += 2
            yield a[2:], args[i - 1]
        else:
            i += 1
            yield a[2:], "true"


def apply_overrides(cfg: dict, args: "list[str]") -> "tuple[dict, dict[str, str]]":
    """``cfg`` with a command line's overrides applied in order, as ``fit`` (jsonargparse) applies them:
    each ``--config FILE`` (its ``base:`` chain resolved) over what came before, each
    ``--section.key value`` / ``--section.key=value`` set (read by :func:`parse_value`); a later one
    wins.  A mapping given for a section (:data:`SECTIONS`) is merged into it key by key, any other
    value (``model.optimizer.kwargs`` included) replaces the old one.  Flags ending in ``+`` (list
    appends) are skipped.

    Also returns where each key got its value: ``{dotted key: origin}``, the origin being
    ``"--key value"`` for a flag or the file's path for a ``--config`` file (see :func:`blame`).
    """
    cfg = copy.deepcopy(cfg)
    origins: dict[str, str] = {}
    for key, raw in command_line_flags(args):
        if key == "config":
            key, value, origin = "", load_recipe(raw), os.path.normpath(raw)
        elif key and not key.endswith("+"):
            value, origin = parse_value(raw), f"--{key} {raw}"
        else:
            continue
        for done in _set_as_cli(cfg, key, value):
            origins = {k: v for k, v in origins.items() if k != done and not k.startswith(done + ".")}
            origins[done] = origin
    return cfg, origins


# the config's sections (LightningCLI groups and the specs' dataclasses): a mapping given for one of
# them is merged into it; a mapping given for any other key replaces it
SECTIONS = ("", "trainer", "model", "data", "model.optimizer", "model.schedule")


def _set_as_cli(cfg: dict, key: str, value: Any) -> "list[str]":
    """``cfg[key] = value`` for a dotted ``key`` ("" = the whole config), as jsonargparse sets it;
    returns the keys whose values were replaced."""
    if key in SECTIONS and isinstance(value, dict):
        return [k for sub, item in value.items() for k in _set_as_cli(cfg, f"{key}.{sub}" if key else str(sub), item)]
    node, parts = cfg, key.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = copy.deepcopy(value)
    return [key]


def _origin(key: str, origins: "dict[str, str]") -> str | None:
    """Where ``key`` (or the mapping holding it) was set, None when in the recipe itself."""
    key = re.sub(r"\[\d+\]", "", key)
    while key:
        if key in origins:
            return origins[key]
        key = key.rpartition(".")[0]
    return None


def _is_key(text: str) -> bool:
    """``text`` is a dotted recipe key (``data.micro_batch``, ``model.schedule.milestones[1]``); the
    ``run.*`` options name themselves (an error about the run folder is not the flag's value)."""
    parts = re.sub(r"\[\d+\]", "", text).split(".")
    return parts[0] != "run" and all(p.isidentifier() for p in parts)


def _first_mention(text: str, key: str) -> int:
    """Where ``text`` first names ``key`` (or a key below it) as a whole key; -1 when it does not."""
    at = text.find(key)
    while at >= 0:
        before = text[at - 1] if at else " "
        after = text[at + len(key)] if at + len(key) < len(text) else " "
        if not (before.isalnum() or before in "_./-") and not (after.isalnum() or after == "_"):
            return at
        at = text.find(key, at + 1)
    return -1


def blame(message: str, path: "str | os.PathLike[str]", origins: "dict[str, str]") -> str:
    """A :class:`RecipeError`'s ``"<recipe>: <key>: <problem>"`` naming the command-line override or
    later ``--config`` file that set the value, not the recipe file: ``"--data.micro_batch -8:
    expected a positive integer, got -8"``, ``"extra.yaml: data.micro_batch: ..."``.  When the key
    the error is about comes from the recipe but another key it names was overridden (a global batch
    that the micro batch does not divide), the override is named beside the recipe:
    ``"recipe.yaml with --data.micro_batch 7: data.global_batch: ..."``.  The keys looked for are
    those ``origins`` holds (:func:`apply_overrides`), never guessed from the message."""
    shown = os.path.normpath(str(path))
    rest = message[len(shown) + 2 :] if message.startswith(shown + ": ") else message
    lead, sep, problem = rest.partition(": ")
    lead_origin = _origin(lead, origins) if sep and _is_key(lead) else None
    if lead_origin is not None:
        if lead_origin.startswith("--") and lead_origin.split(" ", 1)[0] == f"--{lead}":
            return f"{lead_origin}: {problem}"
        return f"{lead_origin}: {rest}"
    named = sorted((_first_mention(rest, key), key) for key in origins if _is_key(key))
    others: list[str] = []
    for at, key in named:
        if at >= 0 and origins[key] not in others:
            others.append(origins[key])
    if others:
        return f"{shown} with {', '.join(others)}: {rest}"
    return message


def to_lightning_config(cfg: dict) -> dict:
    """The part of a loaded recipe LightningCLI parses: everything but ``base`` and ``expected``."""
    return {k: copy.deepcopy(v) for k, v in cfg.items() if k not in RECIPE_ONLY_KEYS}
