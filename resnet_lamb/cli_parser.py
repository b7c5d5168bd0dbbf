"""The command line of ``fit`` / ``validate`` as a user sees it: one-line parse errors, a short
``--help`` and ``--print_config`` with the plan's numbers.

* :class:`OneLineParser`: LightningCLI's parser reporting any parse error as one line
  ``resnet-lamb: error: <key>: <problem>; <fix>`` and exit status 2 (:func:`one_line_parse_error`).
* :class:`ShortHelpFormatter` / :func:`shrink_help`: ``--help`` without the options of
  :data:`UNLISTED_OPTIONS` (still accepted) and with short texts for Lightning's page-long ones.
* :func:`print_config`: the resolved config as the run will use it.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any

import yaml
from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.cli import LightningArgumentParser


def one_line_parse_error(message: str) -> str:
    """jsonargparse's multi-line messages about a value of LightningCLI's own options (a recipe
    key's value and any unknown key were refused by :mod:`resnet_lamb.recipe`'s validator before
    jsonargparse parsed) -> one line ``<key>: <problem>; <fix>``."""
    msg = " ".join(str(message).split())
    bad = re.search(r'(?:Parser key|Key) "([^"]+)":?\s*(.*)', msg)
    if bad:
        rest = bad.group(2)
        got = re.search(r"(?:Given|Got) value:\s*(.*?)(?:\s+Given value type:.*)?$", rest)
        key = bad.group(1)
        types = []
        found = re.findall(r"Expected an? (<class '[^']+'>|typing\.Literal\[[^\]]*\]|\S+?)\.?(?=\s|$)", rest)
        for t in found:
            t = re.sub(r"<class '([^']+)'>", r"\1", t)
            t = re.sub(r"typing\.Literal\[(.*)\]", r"one of \1", t)
            t = {"NoneType": "null"}.get(t, t)
            if t not in types:
                types.append(t)
        if types:
            value = got.group(1) if got else "?"
            return f"{key}: expected {' or '.join(types)}, got {value!r}; fix the value"
        return f"{key}: {rest}"[:300]
    return msg[:300]


class ShortHelpFormatter(DefaultHelpFormatter):
    """``--help`` without the options of :data:`UNLISTED_OPTIONS` (they are still accepted)."""

    def add_argument(self, action) -> None:
        if not _unlisted(action):
            super().add_argument(action)


class OneLineParser(LightningArgumentParser):
    """Reports any parse error as one line and exit status 2 (the CLI's contract)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", ShortHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None):  # type: ignore[override]
        if os.environ.get("RESNET_LAMB_DEBUG_PARSER"):
            print(repr(message), file=sys.stderr)
        print(f"resnet-lamb: error: {one_line_parse_error(message)}", file=sys.stderr)
        sys.exit(2)


# schedule keys the named schedule does not read (resnet_lamb.optim.schedules); --print_config leaves them out
_UNUSED_SCHEDULE_KEYS = {
    "poly": ("milestones", "gamma"),
    "goyal": ("power",),
    "constant": ("power", "milestones", "gamma"),
}


def print_config(parser: Any, cfg: Any, flags: str) -> None:
    """The resolved config as the run will use it: the plan's max_steps and accumulation, the chosen
    precision, and only the schedule keys its schedule reads."""
    flags_ = flags.split(",")
    text = parser.dump(
        cfg, skip_unset="skip_unset" in flags_, skip_default="skip_default" in flags_, skip_validation=True
    )
    data = yaml.safe_load(text) or {}
    schedule = (data.get("model") or {}).get("schedule")
    if isinstance(schedule, dict):
        for key in _UNUSED_SCHEDULE_KEYS.get(schedule.get("name") or "", ()):
            schedule.pop(key, None)
    print(yaml.safe_dump(data, sort_keys=False), end="", flush=True)


# Trainer options `fit --help` does not list (they stay accepted): set by this CLI (the plan's
# accumulation, the run folder, its loggers), or for features this harness does not use (test and
# predict loops, debugging shortcuts, Lightning's model registry)
UNLISTED_OPTIONS = (
    "trainer.accumulate_grad_batches",
    "trainer.default_root_dir",
    "trainer.logger",
    "trainer.fast_dev_run",
    "trainer.limit_test_batches",
    "trainer.limit_predict_batches",
    "trainer.overfit_batches",
    "trainer.inference_mode",
    "trainer.use_distributed_sampler",
    "trainer.barebones",
    "trainer.model_registry",
    "trainer.enable_autolog_hparams",
    "trainer.reload_dataloaders_every_n_epochs",
    "trainer.min_epochs",
    "trainer.min_steps",
    "trainer.detect_anomaly",
    "weights_only",
)
_SHORT_HELP = {
    "ckpt_path": "fit: resume from `last` (the run folder's checkpoints/last.ckpt) or a checkpoint's path; "
    "validate: the checkpoint to validate",
    "trainer.callbacks": "more Lightning callbacks (class_path, init_args); the CLI adds its progress, "
    "throughput, trust-ratio, first-row and checkpoint callbacks itself",
    "trainer.plugins": "Lightning plugins (class_path, init_args); the CLI adds its atomic checkpoint writer",
}


def _unlisted(action: Any) -> bool:
    names = [opt.lstrip("-") for opt in action.option_strings]
    return any(n == o or n.startswith(o + ".") for n in names for o in UNLISTED_OPTIONS)


def shrink_help(parser: Any) -> None:
    """Shorter texts for Lightning's page-long ``ckpt_path``, ``callbacks`` and ``plugins`` help
    (the options of :data:`UNLISTED_OPTIONS` are left out by the parser's help formatter; hiding
    them with argparse's SUPPRESS would also drop them from the saved config.yaml)."""
    for action in parser._actions:
        for opt in action.option_strings:
            if opt.lstrip("-") in _SHORT_HELP:
                action.help = _SHORT_HELP[opt.lstrip("-")]
