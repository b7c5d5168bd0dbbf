"""One run as the report sees it (:class:`Run`), from a run folder or the W&B API alike."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

TRUST_PREFIX = "optim/trust_ratio/"
STOPPED = ("failed", "interrupted", "in progress")  # not a result: counted in a grid cell, not averaged


@dataclass
class Run:
    """One run: its config, its plan (``plan.json``), its metrics and how it stands."""

    name: str
    path: Path
    status: str = "complete"  # complete | in progress | interrupted | failed | incomplete
    reason: str = ""  # why incomplete / in progress / interrupted / failed
    optimizer: str = "?"
    arch: str = "?"
    num_classes: int | None = None
    backend: str = "?"  # data.backend: synthetic data is no data set
    data_root: str = ""  # data.root
    train_images: int | None = None  # the counts fit recorded (data.train_images, data.val_images)
    val_images: int | None = None
    schedule: str = "?"
    global_batch: int | None = None
    max_epochs: int | None = None
    max_steps: int | None = None
    plan: dict | None = None  # the run's plan.json as fit wrote it; None: the run has none
    expected: dict = field(default_factory=dict)
    val: list = field(default_factory=list)  # [(epoch 1-based, top1, top5)]
    trust_layers: list = field(default_factory=list)  # layer names
    trust_steps: list = field(default_factory=list)  # optimizer steps
    trust_values: list = field(default_factory=list)  # one list per step, a value per layer (nan = missing)
    source: str = ""  # "" = the run folder; else where it was read from (W&B API)
    time_to_target: dict | None = None  # summary.json's time_to_target (run.target_top1 set)

    @property
    def lr(self) -> float | None:
        """The plan's peak LR (``plan.json``'s ``lr``); None without a plan."""
        return None if self.plan is None else self.plan.get("lr")

    @property
    def warmup_epochs(self) -> float | None:
        """The plan's warmup in epochs (``plan.json``'s ``warmup_epochs``); None without a plan."""
        return None if self.plan is None else self.plan.get("warmup_epochs")

    @property
    def imagenet(self) -> bool:
        """ResNet-50 trained on ImageNet-1k itself (real images, ILSVRC2012's counts, 1000 classes):
        a run the paper's ImageNet tables can be set beside."""
        from resnet_lamb.data.folder import IMAGENET

        return (
            self.arch == "resnet50"
            and self.backend not in ("synthetic", "?")
            and (self.train_images, self.val_images, self.num_classes)
            == (IMAGENET["train_images"], IMAGENET["val_images"], IMAGENET["num_classes"])
        )

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


def read_model_and_data(run: Run, model: dict, data: dict) -> None:
    """Architecture and the data the run used: fit records the counts in config.yaml (data.*) and
    the model's class count follows data.num_classes (older configs state model.num_classes)."""
    run.arch = str(model.get("arch", "?"))
    run.num_classes = data.get("num_classes") if data.get("num_classes") is not None else model.get("num_classes")
    run.backend, run.data_root = str(data.get("backend", "?")), str(data.get("root") or "")
    run.train_images, run.val_images = data.get("train_images"), data.get("val_images")
    run.optimizer = str((model.get("optimizer") or {}).get("name", "?"))
    run.schedule = str((model.get("schedule") or {}).get("name", "poly"))
    run.global_batch = data.get("global_batch")


def set_progress(run: Run, last_step: int | None, unfinished: str | None = None) -> None:
    """ "in progress" when fewer epochs than max_epochs were validated and max_steps was not reached,
    or when ``unfinished`` (a W&B run not finished) says so."""
    max_steps = run.max_steps
    stopped = isinstance(max_steps, int) and max_steps > 0 and last_step is not None and last_step >= max_steps - 1
    if run.max_epochs and len(run.val) < run.max_epochs and not stopped:
        run.status = "in progress"
        run.reason = f"{len(run.val)} of {run.max_epochs} epochs validated"
    elif unfinished and not run.max_epochs:
        run.status, run.reason = "in progress", f"{unfinished}, {len(run.val)} epochs validated"
