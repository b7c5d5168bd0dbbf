"""`resnet-lamb report RUN_DIR_OR_GLOB... [--wandb ENTITY/PROJECT] --out DIR`: the paper's tables and plots.

    resnet-lamb report runs/lamb-bs* runs/adam-goyal --out reports/
    resnet-lamb report runs --out reports/          # a folder of run folders: every run in it
    resnet-lamb report runs --wandb me/resnet-lamb --out reports/   # plus the project's W&B runs

The report reads the files ``fit`` writes in a run folder (:mod:`resnet_lamb.report.reading`):

* ``config.yaml``: optimizer, schedule, data, batch, epochs, ``expected``.
* ``plan.json``: the plan the run trained with (LR, warmup, steps; what ``resnet-lamb plan``
  prints). The report takes LR and warmup epochs from it and derives nothing again; a run from
  before plan.json shows "-" for them.
* ``csv/metrics.csv``: val top-1/top-5 per epoch, trust ratios, the last step. A missing, empty,
  cut or malformed file makes the run "incomplete", with the reason.
* ``summary.json`` (:class:`resnet_lamb.telemetry.RunStatus`): how the last fit stands: complete,
  failed or interrupted (with its message), or running, and, for a run with ``run.target_top1``,
  its time to target (:mod:`resnet_lamb.time_to_target`); runs from before it: ``failed.txt`` /
  ``interrupted.txt``. A run neither complete nor stopped is "in progress" while fewer epochs than
  ``trainer.max_epochs`` were validated and ``trainer.max_steps`` was not reached.

``--wandb ENTITY/PROJECT`` adds every run of that project through W&B's public API
(:mod:`resnet_lamb.report.wandb_runs`). ``DIR/report.md`` (:mod:`resnet_lamb.report.tables`):
Table 5 and Table 3 beside the paper's numbers for ResNet-50 runs on ImageNet-1k itself
(:attr:`Run.imagenet`), the time-to-target table (runs that set ``run.target_top1``), the other
runs grouped per setting, the incomplete runs with their reason.
``DIR/*.png`` (:mod:`resnet_lamb.report.figures`): accuracy curves and trust-ratio heatmaps.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from resnet_lamb.errors import UserError
from resnet_lamb.report.figures import write_figures
from resnet_lamb.report.reading import find_run_dirs, load_run, paper_tables, read_metrics
from resnet_lamb.report.runs import Run
from resnet_lamb.report.tables import (
    grid_table,
    mean_text,
    other_sections,
    render_report,
    spread,
    status_text,
    table3_key,
    table3_rows,
    table5_rows,
    time_to_target_rows,
)
from resnet_lamb.report.wandb_runs import read_wandb_api

__all__ = [
    "Run",
    "find_run_dirs",
    "grid_table",
    "load_run",
    "main",
    "mean_text",
    "other_sections",
    "paper_tables",
    "read_metrics",
    "read_wandb_api",
    "render_report",
    "spread",
    "status_text",
    "table3_key",
    "table3_rows",
    "table5_rows",
    "time_to_target_rows",
    "write_figures",
]


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="resnet-lamb report",
        description="Write DIR/report.md (the paper's Tables 5 and 3, other runs) and DIR/*.png "
        "(accuracy curves, trust-ratio heatmaps) from run folders' config.yaml, plan.json, "
        "csv/metrics.csv and summary.json and, with --wandb, a W&B project's runs.",
    )
    parser.add_argument(
        "runs", nargs="*", metavar="RUN_DIR_OR_GLOB", help="run folders, globs, or a folder of run folders"
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    parser.add_argument(
        "--wandb",
        metavar="ENTITY/PROJECT",
        default=None,
        help="also report this W&B project's runs, read through the W&B API (needs a key and the network)",
    )
    args = parser.parse_args(sys.argv[2:] if argv is None else argv)
    if not args.runs and not args.wandb:
        parser.error("give run folders (RUN_DIR_OR_GLOB), --wandb ENTITY/PROJECT, or both")
    dirs = find_run_dirs(args.runs)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder; choose another path")
    remote = read_wandb_api(args.wandb) if args.wandb else []
    out.mkdir(parents=True, exist_ok=True)
    runs = [load_run(d) for d in dirs] + remote
    figures = write_figures(runs, out)
    (out / "report.md").write_text(render_report(runs, paper_tables(), figures))
    for run in runs:
        if run.status != "complete":
            print(f"resnet-lamb report: {run.path}: {status_text(run)}", file=sys.stderr)
    print(f"resnet-lamb report: {len(runs)} runs -> {out / 'report.md'} and {len(figures)} figures")
    return 0
