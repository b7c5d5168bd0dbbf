"""Start-up checks of ``fit`` / ``validate``: everything that can be refused before torch or Lightning
is imported (this module imports neither at import time; a test checks torch is not loaded while they
run), and the state of one CLI invocation they share with the Lightning side.

* :func:`expand_recipe`: the first ``--config`` is the recipe, its ``base:`` chain merged.
* :func:`check_config`: the recipe, the data folder and its counts, the class count, the plan
  (when the world size is known) and ``--ckpt_path`` against the run folder
  (:func:`check_ckpt_path`); run on the recipe with the command line applied, and again by
  :class:`resnet_lamb.lightning_cli.RecipeCLI` on LightningCLI's parsed config.
* :func:`world_size` / :func:`known_world_size`: devices x num_nodes, checked against torchrun's.
* :func:`check_writable`, :func:`check_cadence`, :func:`format_plan`, :func:`warn_small_data`.
* :func:`quiet_libraries`: library messages that do not concern a user of this CLI, filtered before
  the libraries are imported.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Literal, overload

import yaml

from resnet_lamb.errors import RecipeError, UserError

RUN_DEFAULTS: dict[str, Any] = {"name": None, "project": "resnet-lamb", "tags": [], "root": "runs", "wandb": True}

# One CLI invocation's state, reset by resnet_lamb.train.main:
ARGV: list[str] = []  # the subcommand and its arguments (``--print_config`` taken off)
# path: the recipe; config: the recipe with the command line applied and origins: where the command
# line set keys (resnet_lamb.recipe.apply_overrides)
RECIPE: dict[str, Any] = {"path": None, "config": None, "origins": {}}
FOLDERS: dict[str, Any] = {}  # data root -> its start-up read (index or listing), once per `main` call
# ``--print_config[=flags]``: taken off the command line and answered after the plan has filled in the
# derived trainer numbers (jsonargparse's own prints the config as parsed: accumulate_grad_batches 1)
PRINT_CONFIG: dict[str, str | None] = {"flags": None}


def take_print_config(args: list[str]) -> list[str]:
    """``args`` without ``--print_config[=flags]``, the flags ("" when none) kept in PRINT_CONFIG."""
    PRINT_CONFIG["flags"] = None
    out = []
    for a in args:
        if a == "--print_config" or a.startswith("--print_config="):
            PRINT_CONFIG["flags"] = a.partition("=")[2]
        else:
            out.append(a)
    return out


def expand_recipe(args: list[str], tmpdir: str) -> tuple[list[str], dict, list[str]]:
    """Replace the first ``--config PATH`` by the recipe with its ``base:`` chain merged; returns
    (the arguments for LightningCLI, the merged recipe, the arguments but the recipe's)."""
    from resnet_lamb.recipe import load_recipe

    out, rest, merged, i, done = [], [], {}, 0, False
    while i < len(args):
        a = args[i]
        if a in ("--config", "-c") and i + 1 < len(args):
            path, i = args[i + 1], i + 2
        elif a.startswith("--config="):
            path, i = a.split("=", 1)[1], i + 1
        else:
            out.append(a)
            rest.append(a)
            i += 1
            continue
        if done:
            out += ["--config", path]
            rest += ["--config", path]
            continue
        merged = load_recipe(path)  # RecipeError naming the file when missing / bad YAML / bad base
        RECIPE["path"] = path
        tmp = Path(tmpdir) / Path(path).name
        tmp.write_text(yaml.safe_dump(merged, sort_keys=False))
        out += ["--config", str(tmp)]
        done = True
    return out, merged, rest


def check_config(cfg: dict, sub: str | None, world: int | None) -> tuple:
    """Every check ``fit``/``validate`` make before anything is built, on a config as a dict: run by
    :func:`main` on the recipe with the command line applied, before torch or Lightning is imported,
    and again on LightningCLI's parsed config.

    In order: the recipe (:func:`resnet_lamb.recipe.validate_recipe`), ``model.arch``,
    ``data.backend``; the data folder's layout and its counts against ``data.train_images``,
    ``data.val_images`` and ``data.num_classes`` (every mismatch in one line); the class count
    (``model.num_classes`` follows ``data.num_classes``); the plan, when the world size is known
    (``world``); for ``fit``, the run folder against ``ckpt_path`` (:func:`check_ckpt_path`); last,
    the optimizer's ``kwargs`` against its constructor (that imports torch).  A RecipeError names the
    command-line override or ``--config`` file that caused it (:func:`resnet_lamb.recipe.blame`).

    Returns ``(recipe, folder listing or None, plan or None, class count, train image count)``.
    """
    from resnet_lamb.recipe import blame

    path = RECIPE["path"] or "<command line>"
    try:
        return _check_config(cfg, sub, world, path)
    except RecipeError as err:
        raise RecipeError(blame(str(err), path, RECIPE["origins"])) from None


def _check_config(cfg: dict, sub: str | None, world: int | None, path: str) -> tuple:
    from resnet_lamb import recipe as R
    from resnet_lamb.data.folder import BACKENDS, IMAGENET, check_counts, require_root

    part = R.recipe_part(cfg)
    model, data = part.get("model"), part.get("data")
    opt = model.get("optimizer") if isinstance(model, dict) else None
    light = part
    if (
        isinstance(model, dict) and isinstance(opt, dict) and opt.get("kwargs")
    ):  # checked last: the optimizer registry imports torch
        light = {**part, "model": {**model, "optimizer": {**opt, "kwargs": {}}}}
        if isinstance(part.get("sources"), dict):  # their sources are checked with them
            light["sources"] = {
                k: v for k, v in part["sources"].items() if not str(k).startswith("model.optimizer.kwargs.")
            }
    recipe = R.validate_recipe(light, path)
    assert isinstance(model, dict) and isinstance(data, dict)  # validate_recipe required both sections
    if model.get("arch") is not None:
        R.check_arch(model["arch"])
    backend = data.get("backend", "auto")
    if backend not in BACKENDS:
        raise RecipeError(f"data.backend: unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    folder = None
    if backend == "synthetic":  # what the synthetic data module uses (not a root's counts)
        images = recipe.train_images or IMAGENET["train_images"]
        classes = data.get("num_classes") or IMAGENET["num_classes"]
    else:
        require_root(backend, data.get("root"))
        given: dict[str, Any] = {k: data.get(k) for k in ("train_images", "val_images", "num_classes")}
        # every layout error as one line, from the index or listings only (no image opened)
        folder = _folder(
            data["root"],
            full=bool(data.get("index_check")),
            counts_given=given["train_images"] is not None and given["num_classes"] is not None,
        )
        if folder is None:  # a rank > 0, no index, the counts given: it takes rank 0's listing in setup
            images, classes = given["train_images"], given["num_classes"]
        else:
            check_counts(folder, given, folder.root)
            images, classes = len(folder.splits["train"]), len(folder.classes)
    _check_classes(model.get("num_classes"), classes, data.get("num_classes"), backend == "synthetic")
    plan = R.plan_recipe(recipe, world_size=world, train_images=images) if world else None
    if sub == "fit":
        run = cfg.get("run") or {}
        name = run.get("name") or (Path(path).stem if RECIPE["path"] else "run")
        check_ckpt_path(
            cfg.get("ckpt_path"),
            Path(run.get("root") or RUN_DEFAULTS["root"]),
            str(name),
            bool(run.get("fresh_if_missing")),
        )
    if light is not part:
        recipe = R.validate_recipe(part, path)
    return recipe, folder, plan, classes, images


def _check_classes(model_classes: Any, classes: int, data_classes: Any, synthetic: bool) -> None:
    """``model.num_classes`` follows ``data.num_classes`` (LightningCLI links them): a recipe that still
    states it must agree, and the command line sets the data's."""
    where = RECIPE["origins"].get("model.num_classes", "")
    if where.startswith("--"):
        raise RecipeError(
            f"model.num_classes: follows data.num_classes (one class count for the data and the "
            f"model); pass --data.num_classes {model_classes} instead"
        )
    if model_classes is not None and model_classes != classes:
        if data_classes is not None:
            data, fix = f"data.num_classes is {classes}", "remove model.num_classes from the recipe"
        elif synthetic:
            data = f"the synthetic data has {classes} classes (data.num_classes: null, ImageNet's)"
            fix = f"set data.num_classes: {model_classes} instead of model.num_classes"
        else:
            data = f"data.root holds {classes} class folders (data.num_classes: null counts them)"
            fix = "remove model.num_classes from the recipe"
        raise RecipeError(
            f"model.num_classes: {model_classes}, but {data}; the model's class count follows data.num_classes: {fix}"
        )


def check_ckpt_path(ckpt_path: Any, root: Path, name: str, fresh_if_missing: bool) -> None:
    """``fit``'s ``--ckpt_path`` against the run folder ``root/name``: ``last`` needs its
    ``checkpoints/last.ckpt`` (a mistyped run name would otherwise start a long run from scratch)
    unless ``--run.fresh_if_missing true`` asks for a fresh start then; a path must be a file; and
    without ``--ckpt_path`` a folder that holds checkpoints is not trained over."""
    run_dir = root / name
    ck_dir = run_dir / "checkpoints"
    if ckpt_path == "last":
        if (ck_dir / "last.ckpt").is_file() or fresh_if_missing:
            return
        resumable = (
            sorted(d.name for d in root.iterdir() if (d / "checkpoints" / "last.ckpt").is_file())
            if root.is_dir()
            else []
        )
        import difflib

        close = difflib.get_close_matches(name, resumable, n=1)
        shown = ", ".join(resumable[:10]) + (f" and {len(resumable) - 10} more" if len(resumable) > 10 else "")
        runs = f"the runs under {root} that can resume: {shown}" if resumable else f"no run under {root} has one"
        near = f"; did you mean --run.name {close[0]}?" if close else ""
        raise UserError(
            f"ckpt_path: last, but {run_dir} has no checkpoints/last.ckpt ({runs}{near}); pass --run.name "
            f"of the run to resume, or --run.fresh_if_missing true to start {run_dir} from scratch"
        )
    if ckpt_path and ckpt_path not in ("best", "hpc", "registry") and not Path(str(ckpt_path)).is_file():
        raise UserError(
            f"ckpt_path: {ckpt_path}: no such checkpoint file; pass an existing .ckpt, or "
            "--ckpt_path last to resume the run named by --run.name"
        )
    if not ckpt_path and ck_dir.is_dir() and any(not p.name.startswith(".") for p in ck_dir.glob("*.ckpt")):
        raise RecipeError(
            f"run.name: {run_dir} already holds checkpoints; resume it with --ckpt_path last, "
            f"start a new run with --run.name NEW, or delete the folder"
        )


def _folder(root: Any, full: bool, counts_given: bool) -> Any:
    """The data root as this rank reads it at start-up (:func:`resnet_lamb.data.index.startup_folder`:
    the index, else rank 0's listing), read once per run (the start-up checks run twice and the data
    module reuses it); None on a rank that waits for rank 0's listing."""
    key = os.path.abspath(os.path.expanduser(str(root)))
    if key not in FOLDERS:
        from resnet_lamb.data.index import startup_folder

        rank0 = int(os.environ.get("RANK", "0")) == 0  # torchrun's rank; no process group yet
        FOLDERS[key] = startup_folder(root, rank0=rank0, counts_given=counts_given, full=full)
    return FOLDERS[key]


def check_writable(run_dir: Path) -> None:
    """The run folder takes config.yaml, logs and checkpoints: one line before any compute when it cannot."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as err:
        raise UserError(
            f"run.root: cannot write the run folder {run_dir} ({err.strerror or err}); pass a "
            f"writable --run.root or fix the folder's permissions"
        ) from None


def world_size(trainer_cfg: Any, configured: int | None = None) -> int:
    """devices x num_nodes as Lightning will resolve them; under torchrun they must equal its
    WORLD_SIZE (Lightning raises otherwise, once per rank, after the plan was printed)."""
    configured = _configured_world_size(trainer_cfg) if configured is None else configured
    env = os.environ.get("WORLD_SIZE")
    if env and int(env) != configured:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", env))
        raise RecipeError(
            f"trainer.devices x trainer.num_nodes = {configured} but torchrun started WORLD_SIZE={env} "
            f"processes; pass --trainer.devices {local} --trainer.num_nodes {int(env) // max(local, 1)} "
            "(launch/torchrun.sh does)"
        )
    return configured


@overload
def _configured_world_size(trainer_cfg: Any, light: Literal[False] = False) -> int: ...
@overload
def _configured_world_size(trainer_cfg: Any, light: bool) -> int | None: ...
def _configured_world_size(trainer_cfg: Any, light: bool = False) -> int | None:
    """devices x num_nodes; ``light``: without importing torch, None when that needs it (devices
    ``auto`` on a machine that may have a GPU)."""
    get = trainer_cfg.get if hasattr(trainer_cfg, "get") else lambda k, d=None: getattr(trainer_cfg, k, d)
    devices, nodes, accel = get("devices", "auto"), get("num_nodes", 1) or 1, get("accelerator", "auto")
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, int) and devices > 0:
        n = devices
    elif isinstance(devices, (list, tuple)):
        n = len(devices)
    elif isinstance(devices, str) and "," in devices:
        n = len([d for d in devices.split(",") if d.strip()])
    elif str(accel) not in ("auto", "gpu", "cuda") or (light and not _may_have_gpu()):  # "auto" / -1
        n = 1
    elif light:
        return None
    else:
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 1
    if not isinstance(nodes, int):
        nodes = int(nodes) if str(nodes).isdigit() else 1
    return max(n, 1) * nodes


def _may_have_gpu() -> bool:
    if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return False
    import shutil

    return os.path.exists("/dev/nvidiactl") or shutil.which("nvidia-smi") is not None


def known_world_size(trainer_cfg: Any) -> int | None:
    """:func:`world_size` before torch is imported, None where only torch can tell."""
    if trainer_cfg is not None and not isinstance(trainer_cfg, dict):
        return None  # not a mapping: validate_recipe says so
    configured = _configured_world_size(trainer_cfg or {}, light=True)
    return None if configured is None else world_size(trainer_cfg or {}, configured)


def check_cadence(cfg: Any) -> None:
    """Checkpoint and validation cadences, before anything is built. The last epoch must be
    validated (report reads its top-1): the validation cadence divides the epochs."""
    every, epochs = cfg.trainer.get("check_val_every_n_epoch"), cfg.trainer.get("max_epochs")
    if every is not None and epochs and (every < 1 or epochs % every):
        raise RecipeError(
            f"trainer.check_val_every_n_epoch: {every} does not divide trainer.max_epochs {epochs}; "
            "choose a divisor so that the last epoch is validated"
        )
    ckpt = cfg.run.get("checkpoint_every_n_epochs")
    if ckpt is not None and ckpt < 1:
        raise RecipeError(f"run.checkpoint_every_n_epochs: {ckpt}; must be an integer >= 1")
    bucket = cfg.run.get("ddp_bucket_mb")
    if bucket is not None and not bucket > 0:
        raise RecipeError(f"run.ddp_bucket_mb: {bucket}; must be > 0")


def warn_small_data(plan: Any) -> None:
    """One line when the global batch is larger than the data set: most of each step is padding."""
    n, batch = int(plan.train_images), int(plan.global_batch)
    if n >= batch:
        return
    computed = min(n, plan.accumulation * plan.world_size) * plan.micro_batch  # slots holding a real image
    print(
        f"resnet-lamb: warning: data.global_batch {batch} is larger than the {n} training images: each step "
        f"pads them with {batch - n} repeats labelled -1 (no gradient) and computes {computed} of the {batch} "
        "(micro-batches of padding only are skipped); a smaller data.micro_batch computes fewer",
        file=sys.stderr,
    )


def format_plan(plan: Any) -> str:
    warm = f"{plan.warmup_steps} warmup steps ({plan.warmup_epochs:g} epochs)"
    return (
        f"resnet-lamb plan: {plan.optimizer} lr {plan.lr:.6g} ({plan.base_lr:g} x ({plan.global_batch}/"
        f"{plan.base_batch}) {plan.scaling}), {plan.schedule} schedule, {warm}, {plan.total_steps} total steps "
        f"(optimizer steps {plan.optimizer_steps} = "
        + (f"{plan.epochs} epochs x {plan.steps_per_epoch}" if plan.epoch_mode == "padded" else "all full batches")
        + f"), accumulation "
        f"{plan.accumulation} (global batch {plan.global_batch} = micro {plan.micro_batch} x {plan.world_size} "
        f"devices x {plan.accumulation}), {plan.train_images} train images, {plan.epoch_mode} epochs, BatchNorm over "
        f"{plan.bn_images} images"
    )


def quiet_libraries(subcommand: str) -> None:
    """Library messages that do not concern a user of this CLI, each silenced by its own text (a
    warning filter or a logging filter on the logger that emits it, nothing blanket)."""
    for message in (
        # torch 2.14 deprecates LeafSpec, which Lightning 2.6's own _pytree still uses
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        # a resumed run writes into its own checkpoints/ (a fresh fit into a non-empty one is refused)
        r"Checkpoint directory .* exists and is not empty",
        # val/top1, val/top5, val/loss come from torchmetrics objects, already synced across ranks
        r"It is recommended to use `self\.log\('val/(top1|top5|loss)', \.\.\., sync_dist=True\)`",
        # counts micro-batches against a step interval; the first step is always logged (FirstStepRow)
        r"The number of training batches \(\d+\) is smaller than the logging interval",
    ):
        warnings.filterwarnings("ignore", message=message)
    if subcommand == "validate":  # fit's checkpoint callback is not one validate needs
        warnings.filterwarnings("ignore", message=r"Be aware that when using `ckpt_path`, callbacks used to create")

    for name, prefix in (
        # Lightning's advertisements for its cloud loggers and model registry
        ("lightning.pytorch.utilities.rank_zero", "💡 Tip:"),
        # torch found a CUDA toolkit (nvcc) on a machine without a GPU (said when torch.compile loads)
        ("torch.utils.cpp_extension", "No CUDA runtime is found"),
    ):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropPrefix) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropPrefix(prefix))


class _DropPrefix(logging.Filter):
    """Drops the log records whose message starts with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)
