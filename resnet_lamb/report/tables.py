"""``report.md``: the paper's Table 5 and Table 3 beside the runs that match them, a grid and a
table per setting for the other runs, and the runs that cannot be read.

LR and warmup epochs are the run's own plan (``plan.json``, as ``resnet-lamb plan`` prints them),
"-" for a run without one; they are never derived again here.
"""

from __future__ import annotations

from resnet_lamb.report.runs import STOPPED, Run


def table3_key(run: Run) -> str:
    """The run's row name in the paper's Table 3: sgd -> momentum; a goyal schedule adds _goyal."""
    if run.optimizer == "sgd":
        return "momentum"
    return run.optimizer + ("_goyal" if run.schedule == "goyal" else "")


def _f(x, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _diff(ours, paper) -> str:
    return "-" if ours is None or paper is None else f"{ours - paper:+.4f}"


def _lr_cell(run: Run) -> str:
    """The plan's LR as `plan` prints it; "-" without a plan.json."""
    return "-" if run.lr is None else f"{run.lr:.7g}"


def _warmup_cell(run: Run) -> str:
    """The plan's warmup epochs; "-" without a plan.json."""
    return "-" if run.warmup_epochs is None else f"{run.warmup_epochs:g}"


def _epochs(run: Run) -> str:
    return f"{len(run.val)}/{run.max_epochs if run.max_epochs is not None else '?'}"


def status_text(run: Run) -> str:
    """``complete``, or the status with its reason and where the run was read from."""
    notes = [n for n in (run.reason, run.source and f"from {run.source}") if n]
    return f"{run.status} ({'; '.join(notes)})" if notes else run.status


def _table(header: list, rows: list) -> list:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    if not rows:
        lines.append("| " + " | ".join(["(no runs)"] + [""] * (len(header) - 1)) + " |")
    return lines


def _run_header(setting: str) -> list:
    """The header of :func:`_run_cells`."""
    return ["run", "status", setting, "LR", "warmup epochs", "epochs"]


def _run_cells(run, setting) -> list:
    """The first cells of a run's row: name, status, the table's setting column, LR, warmup, epochs."""
    return [run.name, status_text(run), setting, _lr_cell(run), _warmup_cell(run), _epochs(run)]


def time_to_target_rows(runs: list) -> list:
    """Per run that set ``run.target_top1`` (``summary.json``'s ``time_to_target``): the target,
    whether a validation reached it, and the epochs, optimizer steps and wall time it took."""
    rows = []
    for run in runs:
        t = run.time_to_target
        if not t:
            continue
        reached = bool(t.get("reached"))
        seconds = t.get("seconds") if reached else None
        rows.append(
            [
                run.name,
                status_text(run),
                run.global_batch,
                _f(t.get("target_top1")),
                "yes" if reached else "no",
                _f(t.get("top1") if reached else None),
                t.get("epochs") if reached else "-",
                t.get("steps") if reached else "-",
                "-" if seconds is None else f"{seconds:.1f} s ({seconds / 60:.1f} min)",
            ]
        )
    return rows


def table5_rows(runs: list, paper: dict) -> tuple:
    by_batch = {row["batch"]: row for row in paper["table5_lamb"]}
    rows, used = [], []
    for run in runs:
        ref = by_batch.get(run.global_batch)
        if run.optimizer != "lamb" or run.schedule != "poly" or ref is None or not run.imagenet:
            continue
        (f1, f5), (b1, b5) = run.final, run.best
        done = run.status == "complete"  # an unfinished run's last epoch is not set against the paper's
        rows.append(
            [
                *_run_cells(run, run.global_batch),
                _f(f1),
                _f(f5),
                _f(b1),
                _f(b5),
                _f(ref["top1"]),
                _f(ref["top5"]),
                _diff(f1 if done else None, ref["top1"]),
                _diff(f5 if done else None, ref["top5"]),
            ]
        )
        used.append(run)
    return rows, used


def table3_rows(runs: list, paper: dict) -> tuple:
    table3 = paper["table3_16k"]
    rows, used = [], []
    for run in runs:
        key = table3_key(run)
        if run.global_batch != 16384 or key not in table3 or not run.imagenet:
            continue
        label = key.replace("_goyal", "+")
        (f1, _), (b1, _) = run.final, run.best
        rows.append(
            [
                *_run_cells(run, label),
                _f(f1),
                _f(b1),
                _f(table3[key]),
                _diff(f1 if run.status == "complete" else None, table3[key]),
            ]
        )
        used.append(run)
    return rows, used


def other_sections(runs: list) -> list:
    """Per optimizer x global batch of one setting (:attr:`Run.setting`), every run with its recipe's ``expected``."""
    groups: dict = {}
    for run in runs:
        groups.setdefault((run.optimizer, run.global_batch or 0), []).append(run)
    lines = []
    for (opt, batch), group in sorted(groups.items()):
        lines += ["", f"#### {opt}, global batch {batch}", ""]
        rows = []
        for run in group:
            (f1, f5), (b1, b5) = run.final, run.best
            ex = run.expected
            rows.append(
                [
                    *_run_cells(run, run.schedule),
                    _f(f1),
                    _f(f5),
                    _f(b1),
                    _f(b5),
                    _f(ex.get("top1")),
                    _f(ex.get("top5")),
                    _diff(f1, ex.get("top1")),
                    ex.get("source") or "-",
                ]
            )
        lines += _table(
            [
                *_run_header("schedule"),
                "final top-1",
                "final top-5",
                "best top-1",
                "best top-5",
                "expected top-1",
                "expected top-5",
                "diff top-1",
                "expected source",
            ],
            rows,
        )
    return lines


def spread(values: list) -> tuple:
    """(mean, half the range) of runs sharing a cell (seeds)."""
    return sum(values) / len(values), (max(values) - min(values)) / 2


def mean_text(values: list) -> str:
    """``0.8236`` for one run, ``0.8236 ±0.0060 (n=3)`` for several."""
    mean, half = spread(values)
    return _f(mean) if len(values) == 1 else f"{mean:.4f} ±{half:.4f} (n={len(values)})"


def grid_table(runs: list) -> list:
    """Final top-1 by optimizer (rows) x global batch (columns) of runs of one setting
    (:attr:`Run.setting`); complete runs sharing a cell (seeds) are averaged, with half their range
    and count; failed, interrupted and unfinished runs are counted, not averaged (their last
    validated top-1 is not a result)."""
    cells: dict = {}
    stopped: dict = {}
    for run in runs:
        key = (run.optimizer, run.global_batch or 0)
        values = cells.setdefault(key, [])
        if run.status in STOPPED:
            stopped.setdefault(key, []).append(run.status)
        elif run.final[0] is not None:
            values.append(run.final[0])
    batches = sorted({b for _, b in cells})
    rows = []
    for opt in sorted({o for o, _ in cells}):
        row = [opt]
        for b in batches:
            values, states = cells.get((opt, b)), stopped.get((opt, b), [])
            notes = [
                status if len(states) == 1 and not values else f"{states.count(status)} {status}"
                for status in STOPPED
                if status in states
            ]
            row.append(", ".join(([mean_text(values)] if values else []) + notes) or "-")
        rows.append(row)
    return _table(["optimizer, batch →", *map(str, batches)], rows)


def _sources(runs: list) -> str:
    """Where the runs' numbers were read from, with counts."""
    kinds = (("", "run folders (config.yaml, plan.json, csv/metrics.csv, summary.json)"), ("W&B API", "the W&B API"))
    counts = [(text, sum(r.source.startswith(key) if key else not r.source for r in runs)) for key, text in kinds]
    text = "; ".join(f"{text}: {n} runs" for i, (text, n) in enumerate(counts) if n or not i)
    unplanned = sum(r.plan is None and r.status != "incomplete" for r in runs)
    return f"Read from {text}." + (
        f" {unplanned} runs have no plan.json (older runs): their LR and warmup show as -." if unplanned else ""
    )


def render_report(runs: list, paper: dict, figures: list) -> str:
    readable = [r for r in runs if r.status != "incomplete"]
    t5, used5 = table5_rows(readable, paper)
    t3, used3 = table3_rows(readable, paper)
    others = [r for r in readable if not any(r is u for u in used5 + used3)]
    lines = [
        "# resnet-lamb report",
        "",
        f"{len(runs)} run folders: {sum(r.status == 'complete' for r in runs)} complete, "
        f"{sum(r.status == 'in progress' for r in runs)} in progress, "
        f"{sum(r.status == 'interrupted' for r in runs)} interrupted, "
        f"{sum(r.status == 'failed' for r in runs)} failed, "
        f"{sum(r.status == 'incomplete' for r in runs)} incomplete. Accuracies are fractions; "
        f"diff = final - paper. {_sources(runs)}",
        "",
        "Only ResNet-50 runs on ImageNet-1k itself (real images, 1,281,167 train / 50,000 val, 1000 "
        "classes, as fit recorded them) sit beside the paper's numbers; diff only for complete runs.",
        "",
        "## Table 5: LAMB, untuned, sqrt LR scaling, linear-epoch warmup",
        "",
    ]
    lines += _table(
        [
            *_run_header("batch"),
            "final top-1",
            "final top-5",
            "best top-1",
            "best top-5",
            "paper top-1",
            "paper top-5",
            "diff top-1",
            "diff top-5",
        ],
        t5,
    )
    lines += ["", "## Table 3: optimizers at batch 16K (+ = Goyal et al.'s recipe)", ""]
    lines += _table(
        [
            *_run_header("optimizer"),
            "final top-1",
            "best top-1",
            "paper top-1",
            "diff top-1",
        ],
        t3,
    )
    lines += ["", "## Time to target (run.target_top1: the run stops at the first validation reaching it)", ""]
    lines += _table(
        ["run", "status", "batch", "target top-1", "reached", "top-1 then", "epochs", "steps", "wall time"],
        time_to_target_rows(readable),
    )
    lines += ["", "## Other runs (optimizer x global batch, one grid per data set, architecture, classes and epochs)"]
    settings: dict = {}
    for run in others:
        settings.setdefault(run.setting, []).append(run)
    for setting, group in sorted(settings.items()):
        lines += [
            "",
            f"### {setting}",
            "",
            "Final top-1 (mean over complete runs sharing a cell, ± half their range):",
            "",
        ]
        lines += grid_table(group)
        lines += other_sections(group)
    if not others:
        lines += ["", "(none)"]
    bad = [r for r in runs if r.status == "incomplete"]
    if bad:
        lines += ["", "## Incomplete runs", ""]
        lines += _table(["run", "folder", "reason"], [[r.name, str(r.path), r.reason] for r in bad])
    if figures:
        lines += ["", "## Figures", ""]
        lines += [f"![{title}]({name})" for name, title in figures]
    return "\n".join(lines) + "\n"
