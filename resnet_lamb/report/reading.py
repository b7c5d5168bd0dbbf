"""Reading a run folder: the files ``fit`` writes there, and nothing else.

``config.yaml`` (the resolved config), ``plan.json`` (the plan the run trained with: LR, warmup,
steps), ``csv/metrics.csv`` (the metrics) and ``summary.json`` (how the last fit stands, written by
:class:`resnet_lamb.telemetry.RunStatus`); ``failed.txt`` / ``interrupted.txt`` for runs from before
``summary.json``.
"""

from __future__ import annotations

import csv
import glob
import importlib.resources
import json
import math
import os
from pathlib import Path

import yaml

from resnet_lamb.errors import UserError
from resnet_lamb.report.runs import TRUST_PREFIX, Run, read_model_and_data, set_progress

REQUIRED_COLUMNS = ("epoch", "step", "val/top1", "val/top5")
INTERRUPTS = ("KeyboardInterrupt", "SIGTERMException")  # a run stopped by Ctrl-C / SIGTERM: interrupted, not failed
RUN_FILES = ("config.yaml", "plan.json", "csv")


def paper_tables() -> dict:
    """The paper's numbers shipped with the package."""
    text = importlib.resources.files("resnet_lamb.reference").joinpath("paper_tables.yaml").read_text()
    return yaml.safe_load(text)["imagenet_resnet50"]


def _is_run_dir(p: Path) -> bool:
    return any((p / name).exists() for name in RUN_FILES)


def find_run_dirs(patterns: list) -> list:
    """Run folders named by paths or globs; a folder that is none but holds some stands for all of
    them (``runs``). A path or glob that names nothing is a UserError."""
    found: list = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if os.path.isdir(m)]
        if not matches:
            raise UserError(
                f"{pattern}: no such run folder; give run folders (runs/NAME), a glob "
                f'("runs/lamb-*") or a folder of run folders (runs)'
            )
        for m in matches:
            p = Path(m)
            if not _is_run_dir(p):
                subs = sorted(d for d in p.iterdir() if d.is_dir() and not d.is_symlink() and _is_run_dir(d))
                if subs:
                    found += subs
                    continue
            found.append(p)
    unique, seen = [], set()
    for p in found:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            unique.append(p)
    return unique


def read_config(run: Run, path: Path) -> None:
    """Optimizer, schedule, data, batch, epochs and expected from config.yaml."""
    if not path.is_file():
        raise ValueError("no config.yaml")
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"config.yaml is not valid YAML ({' '.join(str(err).split())[:120]})") from None
    if not isinstance(cfg, dict):
        raise ValueError("config.yaml is not a mapping")
    trainer, model, data = cfg.get("trainer") or {}, cfg.get("model") or {}, cfg.get("data") or {}
    read_model_and_data(run, model, data)
    run.max_epochs, run.max_steps = trainer.get("max_epochs"), trainer.get("max_steps")
    run.expected = cfg.get("expected") or {}


def _json_object(path: Path) -> dict | None:
    """A JSON file holding an object; None when there is no such file; ValueError naming what is wrong."""
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path.name} is not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path.name} is not a JSON object")
    return value


def read_plan(run: Run, path: Path) -> None:
    """The plan fit wrote (``plan.json``: LR, warmup, steps, as ``resnet-lamb plan`` prints them);
    a run from before plan.json has none, and the report shows "-" for its plan's numbers."""
    run.plan = _json_object(path)
    for key in ("lr", "warmup_epochs"):
        if run.plan is not None and run.plan.get(key) is not None:
            run.plan[key] = _number(run.plan[key], "plan.json", key)


def _number(value, where: str, column: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {column} = {value!r} is not a number") from None


class History:
    """What the report keeps of a metrics history, fed one row at a time (a dict of the CSV's
    column names: ``epoch``, ``step``, ``val/top1``, ``val/top5``, ``optim/trust_ratio/<param>``;
    absent = not logged in that row), from csv/metrics.csv or the W&B API alike."""

    def __init__(self) -> None:
        self.by_epoch: dict = {}  # epoch (1-based) -> (step, top1, top5)
        self.trust: list = []  # (step, {layer: value})
        self.last_step: int | None = None

    def add(self, row: dict, where: str) -> None:
        step = int(_number(row["step"], where, "step")) if row.get("step") is not None else None
        if step is not None:
            self.last_step = step
        if row.get("val/top1") is not None or row.get("val/top5") is not None:
            epoch = int(_number(row.get("epoch"), where, "epoch"))
            self.by_epoch[epoch + 1] = (
                step,
                _number(row.get("val/top1"), where, "val/top1"),
                _number(row.get("val/top5"), where, "val/top5"),
            )
        trust = {
            k[len(TRUST_PREFIX) :]: _number(v, where, k)
            for k, v in row.items()
            if k.startswith(TRUST_PREFIX) and v is not None
        }
        if trust:
            self.trust.append((int(_number(row.get("step"), where, "step")), trust))

    def finish(self, run: Run, layers: list | None = None) -> int | None:
        """Fill ``run``'s val / trust fields (layers: the CSV's column order, else sorted); the last step."""
        run.val = [(e, *self.by_epoch[e][1:]) for e in sorted(self.by_epoch)]
        run.trust_layers = list(layers) if layers is not None else sorted({k for _, d in self.trust for k in d})
        run.trust_steps = [step for step, _ in self.trust]
        run.trust_values = [[d.get(k, math.nan) for k in run.trust_layers] for _, d in self.trust]
        return self.last_step


def read_metrics(run: Run) -> int | None:
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
    history = History()
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise ValueError(f"csv/metrics.csv has no {', '.join(missing)} column")
        for row in reader:
            line = reader.line_num
            if len(row) != len(header):
                raise ValueError(f"csv/metrics.csv line {line} has {len(row)} fields, the header {len(header)}")
            history.add(
                {name: value for name, value in zip(header, row, strict=True) if value}, f"csv/metrics.csv line {line}"
            )
    return history.finish(run, [name[len(TRUST_PREFIX) :] for name in header if name.startswith(TRUST_PREFIX)])


def _ended_status(path: Path, summary: dict | None) -> tuple | None:
    """(status, message) of a last fit that failed or was interrupted, from summary.json; for a run
    from before summary.json, from failed.txt / interrupted.txt. None otherwise."""
    if summary is not None or (path / "summary.json").exists():
        fields = summary or {}
        status = fields.get("status")
        return (status, str(fields.get("message") or status)) if status in ("failed", "interrupted") else None
    for status in ("failed", "interrupted"):
        marker = path / f"{status}.txt"
        if marker.is_file():
            message = " ".join(marker.read_text(errors="replace").split())
            # written as failed.txt before interrupted.txt existed
            return ("interrupted" if message.startswith(INTERRUPTS) else status), message
    return None


def load_run(path: Path) -> Run:
    """A :class:`Run` from a run folder; never raises: what cannot be read makes it "incomplete".

    Status: failed or interrupted when the last fit ended so (summary.json), also with no
    validated epoch; complete when it finished (summary.json "complete"); otherwise (still
    running, killed, or a run from before summary.json) "in progress" while fewer epochs than
    ``trainer.max_epochs`` were validated and ``trainer.max_steps`` was not reached."""
    run = Run(name=path.name, path=path)
    summary = None
    try:
        read_config(run, path / "config.yaml")
        summary = _json_object(path / "summary.json")
        target = (summary or {}).get("time_to_target")
        run.time_to_target = target if isinstance(target, dict) else None
        read_plan(run, path / "plan.json")
        last_step = read_metrics(run)
    except (ValueError, OSError, csv.Error, StopIteration) as err:
        run.status, run.reason = "incomplete", str(err) or type(err).__name__
    else:
        if summary is None or summary.get("status") != "complete":
            set_progress(run, last_step)
    ended = _ended_status(path, summary) if run.optimizer != "?" else None
    if ended is not None:
        run.status, run.reason = ended
    return run
