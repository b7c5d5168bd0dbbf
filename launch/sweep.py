"""Run a grid of one recipe, one run after another, or print one command per run for a scheduler.

    python launch/sweep.py RECIPE --grid lr=0.001,0.002 [--grid KEY=V1,V2 ...]
    python launch/sweep.py RECIPE --paper-grid lr [--paper-grid wd] [--emit] [-- extra CLI overrides]

`--paper-grid lr` is the LAMB paper's learning-rate grid for the adaptive solvers (Figure 4 and
Appendix tables 9-20); `--paper-grid wd` its AdamW weight-decay grid. The paper's LR grids are over
the LR a run uses at its batch, so the key `lr` (in `--grid` too) is that LR: each point sets
`model.optimizer.base_lr` to it with `model.optimizer.scaling none` (no scaling from base_batch),
and the run named `lr=0.001` trains at 0.001 whatever the recipe's batch (`--grid
model.optimizer.base_lr=...` sweeps the recipe's base LR, scaled by its rule). Each run gets its
own name (`<recipe>-<key>=<value>...`), its own run folder under `--root`, and the W&B tags
`sweep:<id>` and `key=value`. `--emit` prints the commands instead of running them (one line each, to feed
`xargs`, a job array or `sbatch --wrap`); `--launcher` prefixes each command (for example
`launch/torchrun.sh` to run every grid point on all local GPUs). Every grid point's recipe is
checked first (the validator `plan` and `fit` use): a bad one is one line
`resnet-lamb: error: run <name>: ...`, exit 2, before any run starts or any command is printed.
"""

from __future__ import annotations

import argparse
import itertools
import shlex
import subprocess
import sys
from pathlib import Path


PAPER_GRIDS = {  # key in the paper's tables -> recipe key it sweeps
    "lr": ("lr_tuning_grid_adaptive", "lr"),
    "wd": ("weight_decay_grid_adamw", "model.optimizer.weight_decay"),
}
# grid key -> the overrides that set it: `lr` is the LR used at the run's batch, not a recipe key
USED_LR = "lr"


def overrides(key: str, value: str) -> list:
    if key == USED_LR:
        return ["--model.optimizer.base_lr", value, "--model.optimizer.scaling", "none"]
    return [f"--{key}", value]


def paper_grid(which: str) -> tuple[str, list[str]]:
    from resnet_lamb.report import paper_tables

    table_key, recipe_key = PAPER_GRIDS[which]
    return recipe_key, [f"{v:g}" for v in paper_tables()[table_key]]


def parse_grid(text: str) -> tuple[str, list[str]]:
    key, sep, values = text.partition("=")
    items = [v.strip() for v in values.split(",") if v.strip()]
    if not sep or not key.strip() or not items:
        raise SystemExit(f"sweep: --grid {text!r}: expected KEY=V1,V2,... (e.g. lr=0.001,0.002)")
    return key.strip(), items


def runs(recipe: str, grid: list[tuple[str, list[str]]], sweep_id: str, root: str, launcher: list[str],
         extra: list[str]) -> list[tuple[str, list[str]]]:
    """(run name, command) for every point of the grid, in a stable order."""
    stem = Path(recipe).stem
    keys = [k for k, _ in grid]
    out = []
    for values in itertools.product(*(vals for _, vals in grid)):
        point = dict(zip(keys, values))
        name = "-".join([stem, *(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in point.items())])
        # torchrun.sh takes the recipe as its first argument; `resnet-lamb fit` takes --config.
        cmd = [*launcher, recipe] if launcher else [sys.executable, "-m", "resnet_lamb", "fit", "--config", recipe]
        for k, v in point.items():
            cmd += overrides(k, v)
        tags = [f"sweep:{sweep_id}", *(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in point.items())]
        cmd += ["--run.name", name, "--run.root", root, "--run.tags", "[" + ",".join(tags) + "]", *extra]
        out.append((name, cmd))
    return out


def check_runs(recipe: str, planned: list[tuple[str, list[str]]]) -> str | None:
    """Every grid point's recipe (the recipe with the point's overrides and the extra ones) through
    the recipe's validator (:func:`resnet_lamb.recipe.validate_recipe`, as `plan` and `fit` check
    it), before any run starts: the first error as one line naming the run and the flag, else None."""
    from resnet_lamb.errors import RecipeError
    from resnet_lamb.recipe import apply_overrides, blame, load_recipe, recipe_part, validate_recipe

    try:
        base = load_recipe(recipe)
    except RecipeError as err:
        return str(err)
    for name, cmd in planned:
        args = cmd[len(cmd) - cmd[::-1].index(recipe):]  # the overrides after the recipe's path
        origins: dict[str, str] = {}
        try:
            cfg, origins = apply_overrides(base, args)
            validate_recipe(recipe_part(cfg), recipe)
        except RecipeError as err:
            return f"run {name}: {blame(str(err), recipe, origins)}"
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("recipe")
    p.add_argument("--grid", action="append", default=[], type=parse_grid,
                   help="KEY=V1,V2,...: a recipe key (model.optimizer.weight_decay=...), or lr: the LR used")
    p.add_argument("--paper-grid", action="append", default=[], choices=sorted(PAPER_GRIDS))
    p.add_argument("--id", default=None, help="sweep id for names and tags (default: the recipe's stem)")
    p.add_argument("--root", default="runs", help="folder of run folders")
    p.add_argument("--launcher", default="", help="command prefix, e.g. launch/torchrun.sh")
    p.add_argument("--emit", action="store_true", help="print one command per run instead of running")
    args = p.parse_args(argv)
    if not Path(args.recipe).is_file():
        print(f"sweep: recipe {args.recipe}: no such file", file=sys.stderr)
        return 2
    grid = [paper_grid(g) for g in args.paper_grid] + args.grid
    if not grid:
        print("sweep: give at least one --grid KEY=V1,V2 or --paper-grid lr|wd", file=sys.stderr)
        return 2
    launcher = shlex.split(args.launcher)
    plan = runs(args.recipe, grid, args.id or Path(args.recipe).stem, args.root, launcher, extra)
    error = check_runs(args.recipe, plan)
    if error is not None:
        print(f"resnet-lamb: error: {error}", file=sys.stderr)
        return 2
    if args.emit:
        for _, cmd in plan:
            print(shlex.join(cmd))
        return 0
    failed = []
    for i, (name, cmd) in enumerate(plan, 1):
        print(f"sweep: run {i}/{len(plan)}: {name}", flush=True)
        if subprocess.run(cmd).returncode != 0:
            failed.append(name)
            print(f"sweep: {name} failed; going on with the next run", file=sys.stderr)
    print(f"sweep: {len(plan) - len(failed)} of {len(plan)} runs finished" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
