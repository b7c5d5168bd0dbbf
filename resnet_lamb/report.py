"""`resnet-lamb report RUN_DIR_OR_GLOB... [--wandb ENTITY/PROJECT] --out DIR`: the paper's tables and plots.

    resnet-lamb report runs/lamb-bs* runs/adam-goyal --out reports/
    resnet-lamb report runs --out reports/          # a folder of run folders: every run in it
    resnet-lamb report runs/tiny/wandb/offline-run-20250101_120000-abcd1234 --out reports/
    resnet-lamb report runs --wandb me/resnet-lamb --out reports/   # plus the project's W&B runs

Where each run's numbers come from (first that is usable wins):

* **Config** (optimizer, schedule, batch, epochs, ``expected``): the run folder's ``config.yaml``
  (the resolved config ``fit`` saved); without one, the config W&B recorded (the model's and
  datamodule's hyperparameters: optimizer, schedule, global batch, but no ``trainer.max_epochs``
  nor ``expected``, so such a run has no epoch count and no expected accuracy).
  LR and warmup epochs come from the saved recipe through :func:`resnet_lamb.recipe.validate_recipe`
  and :func:`resnet_lamb.recipe.plan_recipe` (from a W&B config, through the same
  ``scale_lr`` / ``scale_warmup_epochs``), so they are the numbers ``resnet-lamb plan`` prints.
* **Metrics** (val top-1/top-5 per epoch, trust ratios, last step): ``csv/metrics.csv``.  Only when
  that file is unusable (missing, empty, cut mid-line, a missing column, a bad value) and the
  folder holds W&B logs (``wandb/offline-run-*/run-*.wandb``, or ``wandb/run-*/run-*.wandb`` of
  an online run) are the metrics read from those logs instead, all of them (resumed attempts in
  time order; an attempt's rows replace the earlier attempt's from its first step on, as the
  CSV logger does); the run's status then says so.  A readable CSV is never merged with W&B.
* A W&B run folder named directly (``runs/NAME/wandb/offline-run-*``) is read from its
  ``run-*.wandb`` only, its config from ``runs/NAME/config.yaml`` when that exists.
* ``--wandb ENTITY/PROJECT``: every run of that project through the W&B API (``wandb.Api``,
  ``run.config``, ``run.scan_history``), next to the local folders; config as above from the W&B
  config; a run whose W&B state is not ``finished`` is "in progress".  No API key or no network
  is one error line (a UserError) within about :data:`API_TIMEOUT_S` seconds.

The ``.wandb`` file is W&B's transaction log: a 7-byte header (``:W&B``, 0xBEE1, version 0) then
the LevelDB log format (32 KiB blocks of CRC-32-checked chunks) around protobuf
``wandb_internal_pb2.Record`` messages.  wandb 0.31 ships the protobuf classes but no Python
reader (the ``DataStore`` of older versions is gone; wandb-core reads it), so
:func:`wandb_records` is a small reader of its own; a cut or corrupt tail (a killed run) ends it.

``DIR/report.md`` holds, in order:

Only runs on ImageNet-1k itself sit in the paper's tables (:attr:`Run.imagenet`): ResNet-50, a
backend that reads images (not ``synthetic``) and the counts ``fit`` recorded in config.yaml
(``data.train_images`` / ``val_images`` / ``num_classes``) equal to ILSVRC2012's 1,281,167 / 50,000
/ 1000.  The difference to the paper is given for complete runs only.

* **Table 5** (LAMB, poly schedule, at a batch of the paper's Table 5): one row per run with
  batch, LR, warmup epochs, validated epochs / max_epochs, final and best top-1 / top-5, the
  paper's top-1 / top-5 (``table5_lamb`` of ``resnet_lamb/reference/paper_tables.yaml``, matched by
  global batch) and the difference final - paper.
* **Table 3** (global batch 16384): one row per run whose optimizer has a Table 3 row: the key is
  the optimizer name (``sgd`` -> ``momentum``), plus ``_goyal`` when the schedule is ``goyal``
  (momentum's row already is Goyal et al.'s recipe); columns: the row, LR, final and best top-1,
  the paper's top-1 (``table3_16k``) and the difference.
* **Other runs**, one section per setting (:attr:`Run.setting`: data set, architecture, classes,
  epochs), each with a grid optimizer x global batch of final top-1 (complete runs averaged, others
  counted) and a table per optimizer x global batch with the recipe's ``expected``.
* **Incomplete runs**: folders that cannot be read (no config, a CSV cut mid-line, a missing
  metric column, and no readable W&B log to fall back on), each with the reason.  A run with
  fewer validated epochs than ``trainer.max_epochs`` that has not reached ``trainer.max_steps``
  either is "in progress"; without ``max_epochs`` (a W&B config), a run whose W&B log has no exit
  record or whose W&B state is not ``finished`` is.  A run whose last fit died of an error
  (``failed.txt``) is "failed"; one stopped by Ctrl-C or SIGTERM (``interrupted.txt``) is
  "interrupted" (both written by :class:`resnet_lamb.telemetry.RunStatus`).  The status of a run
  not read from ``config.yaml`` + ``csv/metrics.csv`` says where it was read from.

``DIR/*.png`` (matplotlib, Agg): top-1 and top-5 against epoch, one figure per global batch and one
per optimizer (a line per run), and for each run that logged ``optim/trust_ratio/<param>`` a
heatmap of the trust ratios, layers x optimizer steps (the paper's Figures 9-14).
"""
from __future__ import annotations

import argparse
import csv
import glob
import importlib.resources
import json
import math
import os
import re
import struct
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from resnet_lamb.errors import RecipeError, UserError

TRUST_PREFIX = "optim/trust_ratio/"
REQUIRED_COLUMNS = ("epoch", "step", "val/top1", "val/top5")
WANDB_STEP = "trainer/global_step"        # Lightning's step key in W&B history (the CSV's "step")
API_TIMEOUT_S = 10                        # seconds per W&B API request
INTERRUPTS = ("KeyboardInterrupt", "SIGTERMException")  # a run stopped by Ctrl-C / SIGTERM: interrupted, not failed
STOPPED = ("failed", "interrupted", "in progress")  # not a result: counted in a grid cell, not averaged


@dataclass
class Run:
    """One run folder as the report sees it."""

    name: str
    path: Path
    status: str = "complete"               # complete | in progress | interrupted | failed | incomplete
    reason: str = ""                       # why incomplete / in progress / interrupted / failed
    optimizer: str = "?"
    arch: str = "?"
    num_classes: Optional[int] = None
    backend: str = "?"                     # data.backend: synthetic data is no data set
    data_root: str = ""                    # data.root
    train_images: Optional[int] = None     # the counts fit recorded (data.train_images, data.val_images)
    val_images: Optional[int] = None
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
    source: str = ""                       # "" = config.yaml + csv/metrics.csv; else what was read instead

    @property
    def imagenet(self) -> bool:
        """ResNet-50 trained on ImageNet-1k itself (real images, ILSVRC2012's counts, 1000 classes):
        a run the paper's ImageNet tables can be set beside."""
        from resnet_lamb.data.folder import IMAGENET

        return (self.arch == "resnet50" and self.backend not in ("synthetic", "?")
                and (self.train_images, self.val_images, self.num_classes)
                == (IMAGENET["train_images"], IMAGENET["val_images"], IMAGENET["num_classes"]))

    @property
    def data(self) -> str:
        """The data set, as the report names it: ``synthetic``, or the data root's folder name and its counts."""
        if self.backend == "synthetic":
            return "synthetic data"
        name = Path(self.data_root).name or self.data_root or "?"
        counts = "?" if self.train_images is None else f"{self.train_images} train / {self.val_images} val images"
        return f"{name} ({counts})"

    @property
    def setting(self) -> str:
        """Data set, architecture, classes and epochs: runs with different settings never share a
        cell (with the optimizer and the global batch, the recipe's identity)."""
        epochs = "? epochs" if self.max_epochs is None else f"{self.max_epochs} epochs"
        return f"{self.data}, {self.arch}, {self.num_classes} classes, {epochs}"

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


def _is_run_dir(p: Path) -> bool:
    return (p / "config.yaml").exists() or (p / "csv").exists() or bool(wandb_logs(p))


def find_run_dirs(patterns: list) -> list:
    """Run folders named by paths or globs (a W&B run folder ``wandb/offline-run-*`` is one too); a
    folder that is none of these but holds some stands for all of them (``runs``, ``runs/NAME/wandb``).
    A path or glob that names nothing is a UserError."""
    found: list = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if os.path.isdir(m)]
        if not matches:
            raise UserError(f"{pattern}: no such run folder; give run folders (runs/NAME), a glob "
                            f"(\"runs/lamb-*\") or a folder of run folders (runs)")
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
    """Optimizer, batch, epochs, expected and the plan's LR / warmup from config.yaml."""
    from resnet_lamb import recipe as R

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
    _read_data(run, model, data)
    run.global_batch = data.get("global_batch")
    run.max_epochs = trainer.get("max_epochs")
    run.expected = cfg.get("expected") or {}
    try:
        recipe = R.validate_recipe(R.recipe_part(cfg), path)
        # LR and warmup epochs do not depend on the image count; do not count 1.28M files for them
        plan = R.plan_recipe(recipe, world_size=1, micro_batch=recipe.micro_batch or recipe.global_batch,
                             train_images=recipe.train_images or recipe.global_batch)
    except RecipeError as err:
        raise ValueError(f"config.yaml: {err}") from None
    run.lr, run.warmup_epochs = plan.lr, plan.warmup_epochs
    run.max_steps = trainer.get("max_steps")


def _read_data(run: Run, model: dict, data: dict) -> None:
    """Architecture and the data the run used: fit records the counts in config.yaml (data.*) and
    the model's class count follows data.num_classes (older configs state model.num_classes)."""
    run.arch = str(model.get("arch", "?"))
    run.num_classes = data.get("num_classes") if data.get("num_classes") is not None else model.get("num_classes")
    run.backend, run.data_root = str(data.get("backend", "?")), str(data.get("root") or "")
    run.train_images, run.val_images = data.get("train_images"), data.get("val_images")


def _number(value, where: str, column: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {column} = {value!r} is not a number") from None


class _History:
    """What the report keeps of a metrics history, fed one row at a time (a dict of the CSV's
    column names: ``epoch``, ``step``, ``val/top1``, ``val/top5``, ``optim/trust_ratio/<param>``;
    absent = not logged in that row), from csv/metrics.csv, a .wandb log or the W&B API alike."""

    def __init__(self) -> None:
        self.by_epoch: dict = {}   # epoch (1-based) -> (step, top1, top5)
        self.trust: list = []      # (step, {layer: value})
        self.last_step: Optional[int] = None

    def restart_at(self, step: int) -> None:
        """A resumed attempt logs again from ``step`` on: drop what the earlier attempt logged there."""
        self.by_epoch = {e: v for e, v in self.by_epoch.items() if v[0] is None or v[0] < step}
        self.trust = [t for t in self.trust if t[0] < step]

    def add(self, row: dict, where: str) -> None:
        step = int(_number(row["step"], where, "step")) if row.get("step") is not None else None
        if step is not None:
            self.last_step = step
        if row.get("val/top1") is not None or row.get("val/top5") is not None:
            epoch = int(_number(row.get("epoch"), where, "epoch"))
            self.by_epoch[epoch + 1] = (step, _number(row.get("val/top1"), where, "val/top1"),
                                        _number(row.get("val/top5"), where, "val/top5"))
        trust = {k[len(TRUST_PREFIX):]: _number(v, where, k) for k, v in row.items()
                 if k.startswith(TRUST_PREFIX) and v is not None}
        if trust:
            self.trust.append((int(_number(row.get("step"), where, "step")), trust))

    def finish(self, run: Run, layers: Optional[list] = None) -> Optional[int]:
        """Fill ``run``'s val / trust fields (layers: the CSV's column order, else sorted); the last step."""
        run.val = [(e, *self.by_epoch[e][1:]) for e in sorted(self.by_epoch)]
        run.trust_layers = list(layers) if layers is not None else sorted({k for _, d in self.trust for k in d})
        run.trust_steps = [step for step, _ in self.trust]
        run.trust_values = [[d.get(k, math.nan) for k in run.trust_layers] for _, d in self.trust]
        return self.last_step


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
    history = _History()
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
            history.add({name: value for name, value in zip(header, row) if value}, f"csv/metrics.csv line {line}")
    return history.finish(run, [name[len(TRUST_PREFIX):] for name in header if name.startswith(TRUST_PREFIX)])


# ------------------------------------------------------------------------------ W&B
_LOG_HEADER, _LOG_BLOCK = 7, 32768  # LevelDB log format: chunk header (crc32, length, type), block size


def wandb_records(path: Path):
    """The ``wandb_internal_pb2.Record`` messages of a ``run-*.wandb`` transaction log, in order.
    A file that is not a W&B log is a ValueError; a cut or corrupt tail just ends the records."""
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        head = f.read(_LOG_HEADER)
        ident, magic, version = struct.unpack("<4sHB", head) if len(head) == _LOG_HEADER else (b"", 0, 0)
        if ident != b":W&B" or magic != 0xBEE1 or version != 0:
            raise ValueError(f"{path.name} is not a W&B transaction log (version 0)")
        pending, block, offset = b"", head + f.read(_LOG_BLOCK - _LOG_HEADER), _LOG_HEADER
        while block:
            while offset + _LOG_HEADER <= len(block):
                crc, length, kind = struct.unpack_from("<IHB", block, offset)
                if kind == 0 and length == 0:  # zero padding at a block's end
                    break
                chunk = block[offset + _LOG_HEADER:offset + _LOG_HEADER + length]
                if len(chunk) < length or zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != crc:
                    return  # a cut or corrupt tail
                offset += _LOG_HEADER + length
                if kind in (1, 2):      # FULL, FIRST
                    pending = chunk
                elif kind in (3, 4):    # MIDDLE, LAST
                    pending += chunk
                else:
                    return
                if kind in (1, 4):
                    record = wandb_internal_pb2.Record()
                    try:
                        record.ParseFromString(pending)
                    except Exception:  # noqa: BLE001 - protobuf's DecodeError: a damaged record ends the log
                        return
                    yield record
                    pending = b""
            if len(block) < _LOG_BLOCK:
                return
            block, offset = f.read(_LOG_BLOCK), 0


def wandb_logs(folder: Path) -> list:
    """The ``run-*.wandb`` files of a W&B run folder named directly, else of ``folder/wandb/*run-*/``
    (offline and online runs, resumed attempts included), oldest attempt first."""
    direct = sorted(folder.glob("run-*.wandb"))
    if direct:
        return direct
    files = [f for f in folder.glob("wandb/*run-*/run-*.wandb") if not f.parent.is_symlink()]
    return sorted(files, key=lambda f: f.parent.name.split("run-", 1)[-1])  # run-<time>-<id>


def _wandb_row(item: dict) -> dict:
    """A W&B history row (keys as logged) as a CSV-style row: Lightning's trainer/global_step is the
    CSV's ``step``; W&B's own ``_step``, ``_runtime``, ``_timestamp`` are dropped."""
    row = {k: v for k, v in item.items() if not k.startswith("_") and k != WANDB_STEP and v is not None}
    if item.get(WANDB_STEP) is not None:
        row["step"] = item[WANDB_STEP]
    return row


def read_wandb_logs(files: list) -> tuple:
    """(history, config, W&B's name of the run, whether the last attempt ended with an exit record)
    from a run's .wandb files, oldest attempt first."""
    history, cfg, name, ended = _History(), {}, None, False
    for n, path in enumerate(files):
        first, ended = True, False
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                item = {(i.key or ".".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
                row = _wandb_row(item)
                if first and n and row.get("step") is not None:
                    history.restart_at(int(_number(row["step"], path.name, "step")))
                first = first and row.get("step") is None
                history.add(row, f"{path.parent.name}/{path.name} history step {record.history.step.num}")
            elif kind == "config":
                cfg.update({u.key or ".".join(u.nested_key): json.loads(u.value_json) for u in record.config.update})
            elif kind == "run":
                name = record.run.display_name or name
                cfg.update({u.key: json.loads(u.value_json) for u in record.run.config.update if u.key})
            elif kind == "exit":
                ended = True
    return history, cfg, name, ended


def _wandb_metrics(run: Run, history: _History, files: list) -> Optional[int]:
    if not history.by_epoch and not history.trust and history.last_step is None:
        raise ValueError(f"{files[-1].parent.name}/{files[-1].name} holds no metrics history")
    return history.finish(run)


def config_from_wandb(run: Run, cfg: dict) -> None:
    """Optimizer, schedule, batch and the plan's LR / warmup from the config W&B recorded: Lightning
    logs the model's and datamodule's hyperparameters flat (``optimizer``, ``schedule``,
    ``global_batch``, ...); ``model`` / ``data`` / ``trainer`` / ``expected`` sections are used when
    present (a full config logged by hand). LR and warmup come from the recipe's own rules."""
    from resnet_lamb import recipe as R
    from resnet_lamb.optim.schedules import scale_lr, scale_warmup_epochs

    model = cfg["model"] if isinstance(cfg.get("model"), dict) else cfg
    data = cfg["data"] if isinstance(cfg.get("data"), dict) else cfg
    trainer = cfg["trainer"] if isinstance(cfg.get("trainer"), dict) else {}
    opt, sched = model.get("optimizer"), model.get("schedule")
    if not isinstance(opt, dict) or not isinstance(data.get("global_batch"), int):
        raise ValueError("the W&B config has no optimizer or global_batch (not a resnet-lamb run?)")
    try:
        optimizer = R.OptimizerSpec(**{k: v for k, v in opt.items() if k in R.OPTIMIZER_KEYS})
        schedule = R.ScheduleSpec(**{k: v for k, v in (sched or {}).items() if k in R.SCHEDULE_KEYS})
    except RecipeError as err:
        raise ValueError(f"W&B config: {err}") from None
    run.optimizer, run.schedule, run.global_batch = optimizer.name, schedule.name, data["global_batch"]
    _read_data(run, model, data)
    run.max_epochs, run.max_steps = trainer.get("max_epochs"), trainer.get("max_steps")
    run.expected = cfg.get("expected") if isinstance(cfg.get("expected"), dict) else {}
    run.lr = scale_lr(optimizer.base_lr, optimizer.base_batch, run.global_batch, optimizer.scaling)
    run.warmup_epochs = scale_warmup_epochs(schedule.warmup_epochs, optimizer.base_batch, run.global_batch,
                                            schedule.warmup_scaling)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:300] or type(err).__name__


def wandb_api(project: str):
    """``wandb.Api`` with a short timeout; a UserError (one line: the problem and the fix) when no
    API key is configured or the server does not answer. Never prompts for a key."""
    fix = "run `wandb login` or set WANDB_API_KEY, or report local folders only (drop --wandb)"
    try:
        import wandb
    except ImportError as err:
        raise UserError(f"--wandb {project}: the wandb package cannot be imported ({_one_line(err)}); "
                        f"`pip install wandb`, or report local folders only (drop --wandb)") from None
    base = os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"
    try:  # wandb 0.31's own lookup (env, netrc, settings) without its interactive prompt
        from wandb.sdk.lib import wbauth
    except ImportError:  # another wandb layout: wandb.Api() decides (and may prompt on a terminal)
        wbauth = None
    if wbauth is not None:
        try:
            auth = wbauth.authenticate_session(host=base, source="resnet-lamb report", no_offline=True,
                                               prompt=False, update_session=False)
        except Exception as err:  # noqa: BLE001 - a malformed key or netrc
            raise UserError(f"--wandb {project}: cannot use the W&B credentials for {base} "
                            f"({_one_line(err)}); {fix}") from None
        if auth is None:
            raise UserError(f"--wandb {project}: no W&B API key configured for {base}; {fix}")
    try:
        return wandb.Api(timeout=API_TIMEOUT_S)
    except Exception as err:  # noqa: BLE001 - wandb's CommError, AuthenticationError, ...
        raise UserError(f"--wandb {project}: the W&B API at {base} did not answer ({_one_line(err)}); check the "
                        f"network and the key, {fix}") from None


def read_wandb_api(project: str, api=None) -> list:
    """Every run of W&B project ENTITY/PROJECT as a :class:`Run`: config from ``run.config``,
    validation rows and trust-ratio rows from ``run.scan_history`` (two scans: it returns only the
    rows holding every key asked for), status from ``run.state``. A network or API failure is a
    UserError naming the project."""
    if project.count("/") != 1 or not all(project.split("/")):
        raise UserError(f"--wandb {project}: expected ENTITY/PROJECT, e.g. --wandb my-team/resnet-lamb")
    api = wandb_api(project) if api is None else api
    fetched = []
    try:  # the network part: plain data out of the API first
        for r in api.runs(project):
            summary = r.summary  # the last value of every key logged: which trust ratios exist
            keys = list(summary.keys())
            trust_keys = sorted(k for k in keys if k.startswith(TRUST_PREFIX))
            last = summary[WANDB_STEP] if WANDB_STEP in keys else None
            val = list(r.scan_history(keys=["epoch", WANDB_STEP, "val/top1", "val/top5"]))
            trust = list(r.scan_history(keys=[WANDB_STEP, *trust_keys])) if trust_keys else []
            fetched.append((r.name or r.id, r.id, r.state, dict(r.config), last, val + trust))
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - wandb's CommError, requests', ...
        raise UserError(f"--wandb {project}: reading the runs failed ({_one_line(err)}); check the project name, "
                        "the network and `wandb login` / WANDB_API_KEY, or report local folders only "
                        "(drop --wandb)") from None
    runs = []
    for name, run_id, state, cfg, last, rows in fetched:
        run = Run(name=name, path=Path(f"wandb:{project}/{run_id}"), source=f"W&B API {project}")
        try:
            config_from_wandb(run, cfg)
            history = _History()
            for row in sorted((_wandb_row(item) for item in rows), key=lambda row: row.get("step", -1)):
                history.add(row, f"W&B run {project}/{run_id}")
            last_step = history.finish(run)
        except ValueError as err:
            run.status, run.reason = "incomplete", str(err)
        else:
            _set_progress(run, int(last) if isinstance(last, (int, float)) else last_step,
                          None if state == "finished" else f"W&B state {state}")
        runs.append(run)
    return runs


def _set_progress(run: Run, last_step: Optional[int], unfinished: Optional[str] = None) -> None:
    """"in progress" when fewer epochs than max_epochs were validated and max_steps was not reached,
    or when ``unfinished`` (a W&B run not finished) says so."""
    max_steps = run.max_steps
    stopped = isinstance(max_steps, int) and max_steps > 0 and last_step is not None and last_step >= max_steps - 1
    if run.max_epochs and len(run.val) < run.max_epochs and not stopped:
        run.status = "in progress"
        run.reason = f"{len(run.val)} of {run.max_epochs} epochs validated"
    elif unfinished and not run.max_epochs:
        run.status, run.reason = "in progress", f"{unfinished}, {len(run.val)} epochs validated"


def load_run(path: Path) -> Run:
    """A :class:`Run` from a folder (a run folder, or a W&B run folder named directly); never raises:
    what cannot be read makes it "incomplete". Precedence: the module docstring."""
    logs = wandb_logs(path)
    direct = bool(logs) and logs[0].parent == path
    home = path.parent.parent if direct and path.parent.name == "wandb" else path
    run = Run(name=path.name, path=path)
    errors = (ValueError, OSError, csv.Error, StopIteration)
    wandb, ended = None, True
    try:
        has_config = (home / "config.yaml").is_file()
        if has_config or not logs:
            read_config(run, home / "config.yaml")
        if direct:
            wandb = read_wandb_logs(logs)
            last_step, run.source = _wandb_metrics(run, wandb[0], logs), "W&B log"
            # NAME:ID (the W&B run id), apart from the run folder's own row
            run.name = f"{home.name if home is not path else wandb[2] or path.name}:{path.name.rsplit('-', 1)[-1]}"
        else:
            try:
                last_step = read_metrics(run)
            except errors as err:
                if not logs:
                    raise
                try:
                    wandb = read_wandb_logs(logs)
                    last_step = _wandb_metrics(run, wandb[0], logs)
                except errors as wandb_err:
                    raise ValueError(f"{_one_line(err)}; W&B log: {_one_line(wandb_err)}") from None
                run.source = f"W&B log ({_one_line(err)})"
        if not has_config:
            wandb = wandb or read_wandb_logs(logs)
            config_from_wandb(run, wandb[1])
            run.source = run.source or "W&B config (no config.yaml)"
        ended = wandb is None or wandb[3]
    except errors as err:
        run.status, run.reason = "incomplete", str(err) or type(err).__name__
    else:
        _set_progress(run, last_step, None if ended else "no W&B exit record (killed, or still running)")
    # written by fit when it died of an error / was stopped by Ctrl-C or SIGTERM (resnet_lamb.telemetry.RunStatus)
    for status in ("failed", "interrupted"):
        marker = home / f"{status}.txt"
        if marker.is_file() and run.optimizer != "?":  # such a run with no validated epoch is so too
            run.status, run.reason = status, " ".join(marker.read_text(errors="replace").split())
            if run.reason.startswith(INTERRUPTS):  # written as failed.txt before interrupted.txt existed
                run.status = "interrupted"
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
    notes = [n for n in (run.reason, run.source and f"from {run.source}") if n]
    return f"{run.status} ({'; '.join(notes)})" if notes else run.status


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
        if run.optimizer != "lamb" or run.schedule != "poly" or ref is None or not run.imagenet:
            continue
        (f1, f5), (b1, b5) = run.final, run.best
        done = run.status == "complete"  # an unfinished run's last epoch is not set against the paper's
        rows.append([run.name, _status(run), run.global_batch, _lr(run), _warm(run), _epochs(run), _f(f1), _f(f5),
                     _f(b1), _f(b5), _f(ref["top1"]), _f(ref["top5"]), _diff(f1 if done else None, ref["top1"]),
                     _diff(f5 if done else None, ref["top5"])])
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
        rows.append([run.name, _status(run), label, _lr(run), _warm(run), _epochs(run), _f(f1), _f(b1),
                     _f(table3[key]), _diff(f1 if run.status == "complete" else None, table3[key])])
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
            rows.append([run.name, _status(run), run.schedule, _lr(run), _warm(run), _epochs(run), _f(f1), _f(f5),
                         _f(b1), _f(b5), _f(ex.get("top1")), _f(ex.get("top5")), _diff(f1, ex.get("top1")),
                         ex.get("source") or "-"])
        lines += _table(["run", "status", "schedule", "LR", "warmup epochs", "epochs", "final top-1", "final top-5",
                         "best top-1", "best top-5", "expected top-1", "expected top-5", "diff top-1",
                         "expected source"], rows)
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
            notes = [status if len(states) == 1 and not values else f"{states.count(status)} {status}"
                     for status in STOPPED if status in states]
            row.append(", ".join(([mean_text(values)] if values else []) + notes) or "-")
        rows.append(row)
    return _table(["optimizer, batch →", *map(str, batches)], rows)


def _sources(runs: list) -> str:
    """Where the runs' numbers were read from, with counts (see the module docstring)."""
    kinds = (("", "local CSV logs (csv/metrics.csv) and config.yaml"),
             ("W&B config", "csv/metrics.csv and, without config.yaml, the config W&B recorded"),
             ("W&B log", "W&B run logs (run-*.wandb)"), ("W&B API", "the W&B API"))
    counts = [(text, sum(r.source.startswith(key) if key else not r.source for r in runs)) for key, text in kinds]
    return "Read from " + "; ".join(f"{text}: {n} runs" for i, (text, n) in enumerate(counts) if n or not i) + "."


def render_report(runs: list, paper: dict, figures: list) -> str:
    readable = [r for r in runs if r.status != "incomplete"]
    t5, used5 = table5_rows(readable, paper)
    t3, used3 = table3_rows(readable, paper)
    others = [r for r in readable if not any(r is u for u in used5 + used3)]
    lines = ["# resnet-lamb report", "",
             f"{len(runs)} run folders: {sum(r.status == 'complete' for r in runs)} complete, "
             f"{sum(r.status == 'in progress' for r in runs)} in progress, "
             f"{sum(r.status == 'interrupted' for r in runs)} interrupted, "
             f"{sum(r.status == 'failed' for r in runs)} failed, "
             f"{sum(r.status == 'incomplete' for r in runs)} incomplete. Accuracies are fractions; "
             f"diff = final - paper. {_sources(runs)}", "",
             "Only ResNet-50 runs on ImageNet-1k itself (real images, 1,281,167 train / 50,000 val, 1000 "
             "classes, as fit recorded them) sit beside the paper's numbers; diff only for complete runs.", "",
             "## Table 5: LAMB, untuned, sqrt LR scaling, linear-epoch warmup", ""]
    lines += _table(["run", "status", "batch", "LR", "warmup epochs", "epochs", "final top-1", "final top-5",
                     "best top-1", "best top-5", "paper top-1", "paper top-5", "diff top-1", "diff top-5"], t5)
    lines += ["", "## Table 3: optimizers at batch 16K (+ = Goyal et al.'s recipe)", ""]
    lines += _table(["run", "status", "optimizer", "LR", "warmup epochs", "epochs", "final top-1", "best top-1",
                     "paper top-1", "diff top-1"], t3)
    lines += ["", "## Other runs (optimizer x global batch, one grid per data set, architecture, classes and epochs)"]
    settings: dict = {}
    for run in others:
        settings.setdefault(run.setting, []).append(run)
    for setting, group in sorted(settings.items()):
        lines += ["", f"### {setting}", "",
                  "Final top-1 (mean over complete runs sharing a cell, ± half their range):", ""]
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
                    "(accuracy curves, trust-ratio heatmaps) from run folders' csv/metrics.csv and config.yaml "
                    "(their W&B logs where the CSV is unusable) and, with --wandb, a W&B project's runs.")
    parser.add_argument("runs", nargs="*", metavar="RUN_DIR_OR_GLOB",
                        help="run folders, globs, a folder of runs, or W&B run folders (wandb/offline-run-*)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", default=None,
                        help="also report this W&B project's runs, read through the W&B API (needs a key and "
                             "the network)")
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
        if run.status != "complete" or run.source.startswith("W&B log ("):
            print(f"resnet-lamb report: {run.path}: {_status(run)}", file=sys.stderr)
    print(f"resnet-lamb report: {len(runs)} runs -> {out / 'report.md'} and {len(figures)} figures")
    return 0
