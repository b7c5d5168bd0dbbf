"""`resnet-lamb report RUN_DIR_OR_GLOB... --out DIR`: the paper's tables and plots from local run folders.

    resnet-lamb report runs/lamb-bs* runs/adam-goyal --out reports/
    resnet-lamb report runs --out reports/          # a folder of run folders: every run in it

Each run folder is read from its ``config.yaml`` (the resolved config ``fit`` saved, ``expected``
included) and ``csv/metrics.csv``; nothing else (W&B files are not read in this version).
LR and warmup epochs come from the saved recipe through :func:`resnet_lamb.recipe.validate_recipe`
and :func:`resnet_lamb.recipe.plan_recipe`, so they are the numbers ``resnet-lamb plan`` prints.

``DIR/report.md`` holds, in order:

* **Table 5** (LAMB, poly schedule, at a batch of the paper's Table 5): one row per run with
  batch, LR, warmup epochs, validated epochs / max_epochs, final and best top-1 / top-5, the
  paper's top-1 / top-5 (``table5_lamb`` of ``resnet_lamb/reference/paper_tables.yaml``, matched by
  global batch) and the difference final - paper.
* **Table 3** (global batch 16384): one row per run whose optimizer has a Table 3 row: the key is
  the optimizer name (``sgd`` -> ``momentum``), plus ``_goyal`` when the schedule is ``goyal``
  (momentum's row already is Goyal et al.'s recipe); columns: the row, LR, final and best top-1,
  the paper's top-1 (``table3_16k``) and the difference.
* **Other runs**, grouped by optimizer x global batch, each with its recipe's ``expected``.
* **Incomplete runs**: folders that cannot be read (no config, a CSV cut mid-line, a missing
  metric column), each with the reason.  A run with fewer validated epochs than
  ``trainer.max_epochs`` that has not reached ``trainer.max_steps`` either is "in progress".

``DIR/*.png`` (matplotlib, Agg): top-1 and top-5 against epoch, one figure per global batch and one
per optimizer (a line per run), and for each run that logged ``optim/trust_ratio/<param>`` a
heatmap of the trust ratios, layers x optimizer steps (the paper's Figures 9-14).
"""
from __future__ import annotations

import argparse
import csv
import glob
import importlib.resources
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from resnet_lamb.errors import RecipeError, UserError

TRUST_PREFIX = "optim/trust_ratio/"
REQUIRED_COLUMNS = ("epoch", "step", "val/top1", "val/top5")


@dataclass
class Run:
    """One run folder as the report sees it."""

    name: str
    path: Path
    status: str = "complete"               # complete | in progress | incomplete
    reason: str = ""                       # why incomplete / in progress
    optimizer: str = "?"
    schedule: str = "?"
    global_batch: Optional[int] = None
    max_epochs: Optional[int] = None
    max_steps: Optional[int] = None
    lr: Optional[float] = None
    warmup_epochs: Optional[float] = None
    expected: dict = field(default_factory=dict)
    val: list = field(default_factory=list)          # [(epoch 1-based, top1, top5)]
    trust_layers: list = field(default_factory=list)  # layer names
    trust_steps: list = field(default_factory=list)   # optimizer steps
    trust_values: list = field(default_factory=list)  # one list per step, a value per layer (nan = missing)

    @property
    def final(self) -> tuple:
        return self.val[-1][1:] if self.val else (None, None)

    @property
    def best(self) -> tuple:
        if not self.val:
            return (None, None)
        return (max(v[1] for v in self.val), max(v[2] for v in self.val))


# ------------------------------------------------------------------------------ reading
def paper_tables() -> dict:
    """The paper's numbers shipped with the package."""
    text = importlib.resources.files("resnet_lamb.reference").joinpath("paper_tables.yaml").read_text()
    return yaml.safe_load(text)["imagenet_resnet50"]


def find_run_dirs(patterns: list) -> list:
    """Run folders named by paths or globs; a folder without config.yaml/csv that holds run
    folders stands for all of them. A path or glob that names nothing is a UserError."""
    found: list = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if os.path.isdir(m)]
        if not matches:
            raise UserError(f"{pattern}: no such run folder; give run folders (runs/NAME), a glob "
                            f"(\"runs/lamb-*\") or a folder of run folders (runs)")
        for m in matches:
            p = Path(m)
            if not (p / "config.yaml").exists() and not (p / "csv").exists():
                subs = sorted(d for d in p.iterdir() if (d / "config.yaml").exists() or (d / "csv").exists())
                if subs:
                    found += subs
                    continue
            found.append(p)
    unique = []
    for p in found:
        if p.resolve() not in [u.resolve() for u in unique]:
            unique.append(p)
    return unique


def read_config(run: Run) -> None:
    """Optimizer, batch, epochs, expected and the plan's LR / warmup from config.yaml."""
    from resnet_lamb import recipe as R

    path = run.path / "config.yaml"
    if not path.is_file():
        raise ValueError("no config.yaml")
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"config.yaml is not valid YAML ({' '.join(str(err).split())[:120]})") from None
    if not isinstance(cfg, dict):
        raise ValueError("config.yaml is not a mapping")
    trainer, model, data = cfg.get("trainer") or {}, cfg.get("model") or {}, cfg.get("data") or {}
    run.optimizer = str((model.get("optimizer") or {}).get("name", "?"))
    run.schedule = str((model.get("schedule") or {}).get("name", "poly"))
    run.global_batch = data.get("global_batch")
    run.max_epochs = trainer.get("max_epochs")
    run.expected = cfg.get("expected") or {}
    recipe_cfg = {k: v for k, v in cfg.items() if k in R.TOP_LEVEL_KEYS and k not in ("ckpt_path", "base")}
    if recipe_cfg.get("expected") is None:
        recipe_cfg.pop("expected", None)
    try:
        recipe = R.validate_recipe(recipe_cfg, path)
        # LR and warmup epochs do not depend on the image count; do not count 1.28M files for them
        plan = R.plan_recipe(recipe, world_size=1, micro_batch=recipe.micro_batch or recipe.global_batch,
                             train_images=recipe.train_images or recipe.global_batch)
    except RecipeError as err:
        raise ValueError(f"config.yaml: {err}") from None
    run.lr, run.warmup_epochs = plan.lr, plan.warmup_epochs
    run.max_steps = trainer.get("max_steps")


def _number(text: str, line: int, column: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"csv/metrics.csv line {line}: {column} = {text!r} is not a number") from None


def read_metrics(run: Run) -> Optional[int]:
    """Validation accuracies and trust ratios from csv/metrics.csv, streamed (a 90-epoch run has
    225K rows); returns the last logged step. ValueError names what is wrong with the file."""
    path = run.path / "csv" / "metrics.csv"
    if not path.is_file():
        raise ValueError("no csv/metrics.csv")
    size = path.stat().st_size
    if size == 0:
        raise ValueError("csv/metrics.csv is empty")
    with open(path, "rb") as f:
        f.seek(size - 1)
        if f.read(1) != b"\n":
            raise ValueError(f"csv/metrics.csv is truncated: its last line is cut off (at byte {size})")
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise ValueError(f"csv/metrics.csv has no {', '.join(missing)} column")
        col = {name: i for i, name in enumerate(header)}
        trust = [(name[len(TRUST_PREFIX):], i) for i, name in enumerate(header) if name.startswith(TRUST_PREFIX)]
        run.trust_layers = [name for name, _ in trust]
        by_epoch: dict = {}
        last_step = None
        for row in reader:
            line = reader.line_num
            if len(row) != len(header):
                raise ValueError(f"csv/metrics.csv line {line} has {len(row)} fields, the header {len(header)}")
            if row[col["step"]]:
                last_step = int(_number(row[col["step"]], line, "step"))
            if row[col["val/top1"]] or row[col["val/top5"]]:
                epoch = int(_number(row[col["epoch"]], line, "epoch"))
                by_epoch[epoch + 1] = (_number(row[col["val/top1"]], line, "val/top1"),
                                       _number(row[col["val/top5"]], line, "val/top5"))
            if trust and any(row[i] for _, i in trust):
                run.trust_steps.append(int(_number(row[col["step"]], line, "step")))
                run.trust_values.append([_number(row[i], line, header[i]) if row[i] else math.nan for _, i in trust])
    run.val = [(e, *by_epoch[e]) for e in sorted(by_epoch)]
    return last_step


def load_run(path: Path) -> Run:
    """A :class:`Run` from a folder; never raises: what cannot be read makes it "incomplete"."""
    run = Run(name=path.name, path=path)
    try:
        read_config(run)
        last_step = read_metrics(run)
    except (ValueError, OSError, csv.Error, StopIteration) as err:
        run.status, run.reason = "incomplete", str(err) or type(err).__name__
        return run
    max_steps = run.max_steps
    stopped = isinstance(max_steps, int) and max_steps > 0 and last_step is not None and last_step >= max_steps - 1
    if run.max_epochs and len(run.val) < run.max_epochs and not stopped:
        run.status = "in progress"
        run.reason = f"{len(run.val)} of {run.max_epochs} epochs validated"
    return run


# ------------------------------------------------------------------------------ tables
def table3_key(run: Run) -> str:
    """The run's row name in the paper's Table 3: sgd -> momentum; a goyal schedule adds _goyal."""
    if run.optimizer == "sgd":
        return "momentum"
    return run.optimizer + ("_goyal" if run.schedule == "goyal" else "")


def _f(x, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _diff(ours, paper) -> str:
    return "-" if ours is None or paper is None else f"{ours - paper:+.4f}"


def _lr(run: Run) -> str:
    return "-" if run.lr is None else f"{run.lr:.7g}"  # as `plan` prints it


def _warm(run: Run) -> str:
    return "-" if run.warmup_epochs is None else f"{run.warmup_epochs:g}"


def _epochs(run: Run) -> str:
    return f"{len(run.val)}/{run.max_epochs if run.max_epochs is not None else '?'}"


def _status(run: Run) -> str:
    return run.status if not run.reason else f"{run.status} ({run.reason})"


def _table(header: list, rows: list) -> list:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    if not rows:
        lines.append("| " + " | ".join(["(no runs)"] + [""] * (len(header) - 1)) + " |")
    return lines


def table5_rows(runs: list, paper: dict) -> tuple:
    by_batch = {row["batch"]: row for row in paper["table5_lamb"]}
    rows, used = [], []
    for run in runs:
        ref = by_batch.get(run.global_batch)
        if run.optimizer != "lamb" or run.schedule != "poly" or ref is None:
            continue
        (f1, f5), (b1, b5) = run.final, run.best
        rows.append([run.name, _status(run), run.global_batch, _lr(run), _warm(run), _epochs(run), _f(f1), _f(f5),
                     _f(b1), _f(b5), _f(ref["top1"]), _f(ref["top5"]), _diff(f1, ref["top1"]), _diff(f5, ref["top5"])])
        used.append(run)
    return rows, used


def table3_rows(runs: list, paper: dict) -> tuple:
    table3 = paper["table3_16k"]
    rows, used = [], []
    for run in runs:
        key = table3_key(run)
        if run.global_batch != 16384 or key not in table3:
            continue
        label = key.replace("_goyal", "+")
        (f1, _), (b1, _) = run.final, run.best
        rows.append([run.name, _status(run), label, _lr(run), _warm(run), _epochs(run), _f(f1), _f(b1),
                     _f(table3[key]), _diff(f1, table3[key])])
        used.append(run)
    return rows, used


def other_sections(runs: list) -> list:
    groups: dict = {}
    for run in runs:
        groups.setdefault((run.optimizer, run.global_batch or 0), []).append(run)
    lines = []
    for (opt, batch), group in sorted(groups.items()):
        lines += ["", f"### {opt}, global batch {batch}", ""]
        rows = []
        for run in group:
            (f1, f5), (b1, b5) = run.final, run.best
            ex = run.expected
            rows.append([run.name, _status(run), run.schedule, _lr(run), _warm(run), _epochs(run), _f(f1), _f(f5),
                         _f(b1), _f(b5), _f(ex.get("top1")), _f(ex.get("top5")), _diff(f1, ex.get("top1")),
                         ex.get("source") or "-"])
        lines += _table(["run", "status", "schedule", "LR", "warmup epochs", "epochs", "final top-1", "final top-5",
                         "best top-1", "best top-5", "expected top-1", "expected top-5", "diff top-1",
                         "expected source"], rows)
    return lines


def render_report(runs: list, paper: dict, figures: list) -> str:
    readable = [r for r in runs if r.status != "incomplete"]
    t5, used5 = table5_rows(readable, paper)
    t3, used3 = table3_rows(readable, paper)
    others = [r for r in readable if not any(r is u for u in used5 + used3)]
    lines = ["# resnet-lamb report", "",
             f"{len(runs)} run folders: {sum(r.status == 'complete' for r in runs)} complete, "
             f"{sum(r.status == 'in progress' for r in runs)} in progress, "
             f"{sum(r.status == 'incomplete' for r in runs)} incomplete. Accuracies are fractions; "
             "diff = final - paper. Read from local CSV logs (csv/metrics.csv) and config.yaml.", "",
             "## Table 5: LAMB, untuned, sqrt LR scaling, linear-epoch warmup", ""]
    lines += _table(["run", "status", "batch", "LR", "warmup epochs", "epochs", "final top-1", "final top-5",
                     "best top-1", "best top-5", "paper top-1", "paper top-5", "diff top-1", "diff top-5"], t5)
    lines += ["", "## Table 3: optimizers at batch 16K (+ = Goyal et al.'s recipe)", ""]
    lines += _table(["run", "status", "optimizer", "LR", "warmup epochs", "epochs", "final top-1", "best top-1",
                     "paper top-1", "diff top-1"], t3)
    lines += ["", "## Other runs (optimizer x global batch)"]
    lines += other_sections(others) if others else ["", "(none)"]
    bad = [r for r in runs if r.status == "incomplete"]
    if bad:
        lines += ["", "## Incomplete runs", ""]
        lines += _table(["run", "folder", "reason"], [[r.name, str(r.path), r.reason] for r in bad])
    if figures:
        lines += ["", "## Figures", ""]
        lines += [f"![{title}]({name})" for name, title in figures]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ figures
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("_") or "run"


def plot_accuracy(runs: list, title: str, path: Path) -> None:
    """Top-1 and top-5 against epoch, a line per run."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for ax, idx, metric in ((axes[0], 1, "top-1"), (axes[1], 2, "top-5")):
        for run in runs:
            ax.plot([v[0] for v in run.val], [v[idx] for v in run.val], marker="o", markersize=3,
                    label=run.name + (" (in progress)" if run.status == "in progress" else ""))
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"val {metric}")
        ax.set_title(f"{title}: {metric}")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_trust_ratios(run: Run, path: Path) -> None:
    """Heatmap of the logged trust ratios: a row per layer, a column per logged optimizer step."""
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LogNorm

    values = np.array(run.trust_values, dtype=float).T  # layers x steps
    finite = values[np.isfinite(values)]
    norm = LogNorm(vmin=finite.min(), vmax=finite.max()) if finite.size and finite.min() > 0 else None
    height = max(4.0, 0.12 * len(run.trust_layers) + 1.5)
    fig, ax = plt.subplots(figsize=(10, height), constrained_layout=True)
    steps = run.trust_steps
    extent = (steps[0] - 0.5, steps[-1] + 0.5, len(run.trust_layers) - 0.5, -0.5)
    image = ax.imshow(values, aspect="auto", interpolation="nearest", cmap="viridis", norm=norm, extent=extent)
    ax.set_yticks(range(len(run.trust_layers)))
    ax.set_yticklabels(run.trust_layers, fontsize=max(3, min(8, 400 // max(len(run.trust_layers), 1))))
    ax.set_xlabel("optimizer step")
    ax.set_title(f"{run.name}: trust ratio per layer ({run.optimizer}, batch {run.global_batch})")
    fig.colorbar(image, ax=ax, label="trust ratio")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_figures(runs: list, out: Path) -> list:
    """All PNGs; returns [(file name, title)]."""
    import matplotlib

    matplotlib.use("Agg")
    figures = []
    plotted = [r for r in runs if r.status != "incomplete" and r.val]
    for key, prefix, what in ((lambda r: r.global_batch, "accuracy_batch", "global batch"),
                              (lambda r: r.optimizer, "accuracy_optimizer", "optimizer")):
        groups: dict = {}
        for run in plotted:
            groups.setdefault(key(run), []).append(run)
        for value, group in sorted(groups.items()):
            name = f"{prefix}_{_slug(value)}.png"
            plot_accuracy(group, f"{what} {value}", out / name)
            figures.append((name, f"top-1 / top-5, {what} {value}"))
    for run in runs:
        if run.status != "incomplete" and run.trust_steps:
            name = f"trust_ratio_{_slug(run.name)}.png"
            plot_trust_ratios(run, out / name)
            figures.append((name, f"trust ratios, {run.name}"))
    return figures


# ------------------------------------------------------------------------------ CLI
def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="resnet-lamb report",
        description="Write DIR/report.md (the paper's Tables 5 and 3, other runs) and DIR/*.png "
                    "(accuracy curves, trust-ratio heatmaps) from run folders' csv/metrics.csv and config.yaml.")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR_OR_GLOB", help="run folders, globs or a folder of runs")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", default=None,
                        help="not read in this version: only local CSV logs are")
    args = parser.parse_args(sys.argv[2:] if argv is None else argv)
    if args.wandb:
        print(f"resnet-lamb report: --wandb {args.wandb}: only local CSV logs are read in this version; "
              "continuing with them", file=sys.stderr)
    dirs = find_run_dirs(args.runs)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder; choose another path")
    out.mkdir(parents=True, exist_ok=True)
    runs = [load_run(d) for d in dirs]
    figures = write_figures(runs, out)
    (out / "report.md").write_text(render_report(runs, paper_tables(), figures))
    for run in runs:
        if run.status != "complete":
            print(f"resnet-lamb report: {run.path}: {_status(run)}", file=sys.stderr)
    print(f"resnet-lamb report: {len(runs)} runs -> {out / 'report.md'} and {len(figures)} figures")
    return 0
