"""Console script `resnet-lamb`: dispatches each subcommand to the module that owns it.

Imports are lazy so that `plan`, and `fit`'s recipe, data and run-folder errors, answer before
torch is imported (resnet_lamb.startup.check_config), and a subcommand's heavy imports (torch,
Lightning, DALI) are paid only by the subcommand that needs them.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, function taking argv list, one-line help)
COMMANDS = {
    "fit": ("resnet_lamb.train", "main", "train a recipe (LightningCLI)"),
    "validate": ("resnet_lamb.train", "main", "validate a checkpoint on a recipe's data"),
    "plan": ("resnet_lamb.recipe", "plan_main", "print every number a recipe derives, touching no data"),
    "prepare": ("resnet_lamb.data.prepare", "main", "write a data set in the ImageNet folder layout (or shards)"),
    "pack": ("resnet_lamb.data.pack", "main", "write a data folder as tar shards plus their index"),
    "index": ("resnet_lamb.data.index", "main", "write (or --check) the index of a data folder or shard set"),
    "stage": ("resnet_lamb.data.stage", "main", "copy a shard set to node-local disk (once per node)"),
    "report": ("resnet_lamb.report", "main", "turn finished runs into the paper's tables and plots"),
}


def usage() -> str:
    lines = ["usage: resnet-lamb COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "`resnet-lamb COMMAND --help` for a command's options; `resnet-lamb --version`."]
    return "\n".join(lines)


def version() -> str:
    """``resnet-lamb X.Y.Z`` and the versions of the libraries a run's numbers depend on (read from
    the installed packages' metadata: nothing heavy is imported)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    from resnet_lamb import __version__

    libs = []
    for name in ("torch", "torchvision", "lightning", "nvidia-dali-cuda130", "wandb"):
        try:
            libs.append(f"{name.split('-cuda')[0]} {installed(name)}")
        except PackageNotFoundError:
            pass
    return f"resnet-lamb {__version__}" + (f" ({', '.join(libs)})" if libs else "")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(version())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"resnet-lamb: unknown command {command!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module, function, _ = COMMANDS[command]
    from resnet_lamb.errors import UserError

    try:
        entry = getattr(importlib.import_module(module), function)
        return entry([command, *rest] if module == "resnet_lamb.train" else rest) or 0
    except UserError as err:
        print(f"resnet-lamb: error: {err}", file=sys.stderr)
        return 2
