"""`resnet-lamb fit|validate`: LightningCLI over :class:`resnet_lamb.model.LambModule` and
:class:`resnet_lamb.data.ImageDataModule`.

    resnet-lamb fit --config RECIPE [--config OVERRIDE.yaml] [--section.key value ...]
    resnet-lamb fit --config RECIPE --run.name NAME --ckpt_path last      # resume
    resnet-lamb validate --config RECIPE --ckpt_path runs/NAME/checkpoints/last.ckpt

What happens, in order:
1. The first ``--config`` is the recipe: its ``base:`` chain is merged by
   :func:`resnet_lamb.recipe.load_recipe` and the merged file handed to jsonargparse; later
   ``--config`` files and ``--key value`` flags override it.  ``expected`` is accepted.
2. Before torch or Lightning is imported, :func:`check_config` checks the recipe with the command
   line applied (:func:`resnet_lamb.recipe.apply_overrides`): the recipe, the data folder and its
   counts (every mismatch in one line), the class count, the plan (when the world size is known
   without torch) and ``--ckpt_path`` against the run folder; an error a flag or a later
   ``--config`` file caused names it (:func:`resnet_lamb.recipe.blame`).  Not for ``--help`` /
   ``--print_config``.
3. Any parse error (unknown key, wrong type) is one line ``resnet-lamb: error: ...`` naming the
   key, exit 2, before anything is built.  ``model.num_classes`` is linked to ``data.num_classes``
   (counted from the folder when null).
4. The parsed config goes through :func:`check_config` again and the plan is derived by
   :func:`resnet_lamb.recipe.derive_plan` with the world size (``WORLD_SIZE`` from torchrun,
   else devices x num_nodes); ``trainer.max_steps`` and ``trainer.accumulate_grad_batches`` come
   from the plan (an inexact accumulation is an error here), the plan is printed (not again under
   launch/torchrun.sh, which printed it); the counts used are recorded in ``config.yaml``.
   ``--print_config`` prints the config with these numbers (and only the schedule keys its
   schedule reads) and exits, writing nothing.
5. Precision: bf16-mixed on GPUs with bf16, 16-mixed on older ones, 32-true on CPU, and cuDNN's
   autotuner on GPUs, unless the recipe says otherwise (:func:`device_defaults`); DDPStrategy with
   gradient buckets as views for ``ddp`` or several devices (:func:`ddp_strategy`).
6. Run folder ``<run.root>/<run.name>/`` (name defaults to the recipe's file stem):
   ``config.yaml`` (the full resolved config), ``csv/metrics.csv`` (always), ``wandb/`` (W&B;
   offline when ``WANDB_MODE=offline``, when no API key is configured or when the server does not
   answer a 5 s connection check, made through ``HTTPS_PROXY`` unless ``NO_PROXY`` exempts the
   host), ``checkpoints/`` (``last.ckpt`` every ``run.checkpoint_every_n_epochs`` epochs, after a
   SIGUSR1/SIGTERM mid-epoch, and the best by ``val/top1`` as a hard link to it; each written to a
   temp file in the same folder, fsynced and ``os.replace``d; a write that fails on an OSError (disk
   full) stops the run with one line, the older files intact). A run folder that
   cannot be written is one line before anything is built.
7. ``fit`` start-up: temp files of an interrupted checkpoint write (``checkpoints/.tmp-*.ckpt``)
   are removed; ``--ckpt_path last`` for a run folder without ``last.ckpt`` is refused with one
   line naming the runs that can resume, unless ``--run.fresh_if_missing true`` (then it starts
   from scratch); ``--ckpt_path`` resuming with another recipe (optimizer, schedule, global batch or
   epochs, :func:`check_resume`) is refused with one line naming the keys unless
   ``--run.force_resume true``; another world size or micro batch is fine (same global batch).
"""
from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import yaml

from resnet_lamb.errors import RecipeError, UserError

RUN_DEFAULTS = {"name": None, "project": "resnet-lamb", "tags": [], "root": "runs", "wandb": True}


# ------------------------------------------------------------------------------------ errors
_ARGV: list[str] = []


def _qualify(key: str, value: Any = None) -> str:
    """jsonargparse names a bad field of a nested dataclass without its section; add it back
    (``value``, the rejected value, tells ``model.schedule.name`` from ``model.optimizer.name``)."""
    if "." in key:
        return key
    for a in _ARGV:
        flag = a.split("=", 1)[0]
        if flag.startswith("--") and flag.endswith(f".{key}"):
            return flag[2:]
    from resnet_lamb.recipe import SPEC_KEYS

    owners = [sec for sec, fields in SPEC_KEYS.items() if key in fields]
    if len(owners) > 1:  # `name`: the section the command line mentions, else the recipe's section
        # holding the rejected value, else the optimizer
        flagged = [sec for sec in owners if any(a.startswith(f"--{sec}.{key}") for a in _ARGV)]
        stated = [sec for sec in owners if value is not None and any(
            str(_stated(cfg, f"{sec}.{key}")) == str(value) for cfg in _RECIPE.get("stated", []))]
        owners = flagged or stated or owners
    return f"{owners[0]}.{key}" if owners else key


def _one_line(message: str) -> str:
    """jsonargparse's multi-line messages -> one line ``<key>: <problem>; <fix>``."""
    msg = " ".join(str(message).split())
    unknown = (re.search(r"does not accept option '([^']+)'", msg)
               or re.search(r"Option '([^']+)' is not accepted", msg)
               or re.search(r"No action for key \"([^\"]+)\"", msg)
               or re.search(r"unrecognized arguments: --?([^\s=]+)", msg, re.I))
    if unknown:
        key = _qualify(unknown.group(1))
        section = key.rsplit(".", 1)[0] if "." in key else "the recipe's top level"
        return f"{key}: unknown key (not an option of {section}); check its spelling " \
               f"(`resnet-lamb fit --help` lists the options)"
    bad = re.search(r'(?:Parser key|Key) "([^"]+)":?\s*(.*)', msg)
    if bad:
        rest = bad.group(2)
        got = re.search(r"(?:Given|Got) value:\s*(.*?)(?:\s+Given value type:.*)?$", rest)
        key = _qualify(bad.group(1), got.group(1) if got else None)
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


def _parser_class():
    from jsonargparse import DefaultHelpFormatter
    from lightning.pytorch.cli import LightningArgumentParser

    class ShortHelpFormatter(DefaultHelpFormatter):
        """``--help`` without the options of :data:`_UNLISTED_OPTIONS` (they are still accepted)."""

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
            if getattr(self, "_raise_errors", False):
                raise RecipeError(_one_line(message))
            print(f"resnet-lamb: error: {_one_line(message)}", file=sys.stderr)
            sys.exit(2)

    return OneLineParser


# ------------------------------------------------------------------------------------ recipe
# path: the recipe; stated: the --config files as written (merged); origins: where the command line set
# keys (resnet_lamb.recipe.apply_overrides)
_RECIPE: dict[str, Any] = {"path": None, "stated": [], "origins": {}}
_FOLDERS: dict[str, Any] = {}  # data root -> its start-up read (index or listing), once per `main` call


def _stated(cfg: Any, dotted: str) -> Any:
    """``cfg[a][b]...`` for ``"a.b..."``, None where absent."""
    for part in dotted.split("."):
        cfg = cfg.get(part) if isinstance(cfg, dict) else None
    return cfg


def _expand_recipe(args: list[str], tmpdir: str) -> tuple[list[str], dict, list[str]]:
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
            if Path(path).is_file():
                extra = load_recipe(path)
                _check_spec_keys(extra, path)
                _RECIPE["stated"].append(extra)
            out += ["--config", path]
            rest += ["--config", path]
            continue
        merged = load_recipe(path)  # RecipeError naming the file when missing / bad YAML / bad base
        _check_spec_keys(merged, path)
        _RECIPE["stated"].append(merged)
        _RECIPE["path"] = path
        tmp = Path(tmpdir) / Path(path).name
        tmp.write_text(yaml.safe_dump(merged, sort_keys=False))
        out += ["--config", str(tmp)]
        done = True
    return out, merged, rest


def _check_spec_keys(cfg: dict, path: str) -> None:
    """Unknown keys in model.optimizer / model.schedule, named in full (jsonargparse drops the section)."""
    from resnet_lamb.recipe import check_spec_keys

    try:
        check_spec_keys(cfg)
    except RecipeError as err:
        raise RecipeError(f"{path}: {err}") from None


def check_config(cfg: dict, sub: str, world: Optional[int]) -> tuple:
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

    path = _RECIPE["path"] or "<command line>"
    try:
        return _check_config(cfg, sub, world, path)
    except RecipeError as err:
        raise RecipeError(blame(str(err), path, _RECIPE["origins"])) from None


def _check_config(cfg: dict, sub: str, world: Optional[int], path: str) -> tuple:
    from resnet_lamb import recipe as R
    from resnet_lamb.data.folder import BACKENDS, IMAGENET, check_counts, require_root

    part = R.recipe_part(cfg)
    model, data = part.get("model"), part.get("data")
    opt = model.get("optimizer") if isinstance(model, dict) else None
    light = part
    if isinstance(opt, dict) and opt.get("kwargs"):  # checked last: the optimizer registry imports torch
        light = {**part, "model": {**model, "optimizer": {**opt, "kwargs": {}}}}
        if isinstance(part.get("sources"), dict):  # their sources are checked with them
            light["sources"] = {k: v for k, v in part["sources"].items()
                                if not str(k).startswith("model.optimizer.kwargs.")}
    recipe = R.validate_recipe(light, path)
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
        given = {k: data.get(k) for k in ("train_images", "val_images", "num_classes")}
        # every layout error as one line, from the index or listings only (no image opened)
        folder = _folder(data["root"], full=bool(data.get("index_check")),
                         counts_given=given["train_images"] is not None and given["num_classes"] is not None)
        if folder is None:  # a rank > 0, no index, the counts given: it takes rank 0's listing in setup
            images, classes = given["train_images"], given["num_classes"]
        else:
            check_counts(folder, given, folder.root)
            images, classes = len(folder.splits["train"]), len(folder.classes)
    _check_classes(model.get("num_classes"), classes, data.get("num_classes"), backend == "synthetic")
    plan = R.plan_recipe(recipe, world_size=world, train_images=images) if world else None
    if sub == "fit":
        run = cfg.get("run") or {}
        name = run.get("name") or (Path(path).stem if _RECIPE["path"] else "run")
        check_ckpt_path(cfg.get("ckpt_path"), Path(run.get("root") or RUN_DEFAULTS["root"]), str(name),
                        bool(run.get("fresh_if_missing")))
    if light is not part:
        recipe = R.validate_recipe(part, path)
    return recipe, folder, plan, classes, images


def _check_classes(model_classes: Any, classes: int, data_classes: Any, synthetic: bool) -> None:
    """``model.num_classes`` follows ``data.num_classes`` (LightningCLI links them): a recipe that still
    states it must agree, and the command line sets the data's."""
    where = _RECIPE["origins"].get("model.num_classes", "")
    if where.startswith("--"):
        raise RecipeError(f"model.num_classes: follows data.num_classes (one class count for the data and the "
                          f"model); pass --data.num_classes {model_classes} instead")
    if model_classes is not None and model_classes != classes:
        if data_classes is not None:
            data, fix = f"data.num_classes is {classes}", "remove model.num_classes from the recipe"
        elif synthetic:
            data = f"the synthetic data has {classes} classes (data.num_classes: null, ImageNet's)"
            fix = f"set data.num_classes: {model_classes} instead of model.num_classes"
        else:
            data = f"data.root holds {classes} class folders (data.num_classes: null counts them)"
            fix = "remove model.num_classes from the recipe"
        raise RecipeError(f"model.num_classes: {model_classes}, but {data}; the model's class count follows "
                          f"data.num_classes: {fix}")


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
        resumable = sorted(d.name for d in root.iterdir() if (d / "checkpoints" / "last.ckpt").is_file()) \
            if root.is_dir() else []
        import difflib

        near = difflib.get_close_matches(name, resumable, n=1)
        shown = ", ".join(resumable[:10]) + (f" and {len(resumable) - 10} more" if len(resumable) > 10 else "")
        runs = f"the runs under {root} that can resume: {shown}" if resumable else f"no run under {root} has one"
        near = f"; did you mean --run.name {near[0]}?" if near else ""
        raise UserError(f"ckpt_path: last, but {run_dir} has no checkpoints/last.ckpt ({runs}{near}); pass --run.name "
                        f"of the run to resume, or --run.fresh_if_missing true to start {run_dir} from scratch")
    if ckpt_path and ckpt_path not in ("best", "hpc", "registry") and not Path(str(ckpt_path)).is_file():
        raise UserError(f"ckpt_path: {ckpt_path}: no such checkpoint file; pass an existing .ckpt, or "
                        "--ckpt_path last to resume the run named by --run.name")
    if not ckpt_path and ck_dir.is_dir() and any(not p.name.startswith(".") for p in ck_dir.glob("*.ckpt")):
        raise RecipeError(f"run.name: {run_dir} already holds checkpoints; resume it with --ckpt_path last, "
                          f"start a new run with --run.name NEW, or delete the folder")


def _folder(root: Any, full: bool, counts_given: bool) -> Any:
    """The data root as this rank reads it at start-up (:func:`resnet_lamb.data.index.startup_folder`:
    the index, else rank 0's listing), read once per run (the start-up checks run twice and the data
    module reuses it); None on a rank that waits for rank 0's listing."""
    key = os.path.abspath(os.path.expanduser(str(root)))
    if key not in _FOLDERS:
        from resnet_lamb.data.index import startup_folder

        rank0 = int(os.environ.get("RANK", "0")) == 0  # torchrun's rank; no process group yet
        _FOLDERS[key] = startup_folder(root, rank0=rank0, counts_given=counts_given, full=full)
    return _FOLDERS[key]


def _check_writable(run_dir: Path) -> None:
    """The run folder takes config.yaml, logs and checkpoints: one line before any compute when it cannot."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as err:
        raise UserError(f"run.root: cannot write the run folder {run_dir} ({err.strerror or err}); pass a "
                        f"writable --run.root or fix the folder's permissions") from None


def _remove_partial_checkpoints(ck_dir: Path) -> None:
    """Temp files of a checkpoint write that a kill interrupted (``.tmp-*.ckpt``, never loaded:
    Lightning's ``last`` lookup and the checks here skip dot files) are removed at the next start."""
    for p in sorted(ck_dir.glob(".tmp-*.ckpt")):
        try:
            p.unlink()
            print(f"resnet-lamb: removed {p}, a checkpoint write that was interrupted", file=sys.stderr)
        except OSError:
            pass


def _resume_path(ckpt_path: Any, run_dir: Path) -> Optional[Path]:
    """The file ``fit --ckpt_path`` will load (``last``: the run folder's last.ckpt), None if none."""
    if not ckpt_path or ckpt_path in ("best", "hpc", "registry"):
        return None
    path = run_dir / "checkpoints" / "last.ckpt" if ckpt_path == "last" else Path(str(ckpt_path))
    return path if path.is_file() else None


def check_resume(ckpt: Path, recipe: Any, force: bool = False) -> None:
    """Resuming continues the checkpoint's run: the optimizer (name, LR rule, weight decay, param
    rule, kwargs but ``impl``), the schedule, the global batch, the epoch count and mode must be the
    checkpoint's (``resnet_lamb.model.recipe_identity``); a different world size or micro batch
    only changes the accumulation.  Otherwise one line naming the keys, unless ``force``."""
    import torch

    from resnet_lamb.model import recipe_changes, recipe_identity

    try:
        ckpt_dict = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)
        saved = (ckpt_dict.get("resnet_lamb") or {}).get("recipe")
    except Exception as err:  # noqa: BLE001 - truncated or not a checkpoint: say which file
        raise UserError(f"ckpt_path: {ckpt} does not load as a checkpoint ({type(err).__name__}: "
                        f"{str(err)[:120]}); pass an intact one with --ckpt_path PATH") from None
    if not saved:
        return  # written before checkpoints recorded their recipe
    now = recipe_identity(recipe.optimizer, recipe.schedule, recipe.global_batch, recipe.epochs, recipe.epoch_mode)
    diff = recipe_changes(saved, now)
    if diff and not force:
        shown = ", ".join(f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in diff)
        raise RecipeError(f"ckpt_path: {ckpt} was trained with another recipe ({shown}); resume with the "
                          "checkpoint's values, or pass --run.force_resume true to continue with the new ones")


def world_size(trainer_cfg: Any, configured: Optional[int] = None) -> int:
    """devices x num_nodes as Lightning will resolve them; under torchrun they must equal its
    WORLD_SIZE (Lightning raises otherwise, once per rank, after the plan was printed)."""
    configured = _configured_world_size(trainer_cfg) if configured is None else configured
    env = os.environ.get("WORLD_SIZE")
    if env and int(env) != configured:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", env))
        raise RecipeError(
            f"trainer.devices x trainer.num_nodes = {configured} but torchrun started WORLD_SIZE={env} "
            f"processes; pass --trainer.devices {local} --trainer.num_nodes {int(env) // max(local, 1)} "
            "(launch/torchrun.sh does)")
    return configured


def _configured_world_size(trainer_cfg: Any, light: bool = False) -> Optional[int]:
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


def _known_world_size(trainer_cfg: Any) -> Optional[int]:
    """:func:`world_size` before torch is imported, None where only torch can tell."""
    if trainer_cfg is not None and not isinstance(trainer_cfg, dict):
        return None  # not a mapping: validate_recipe says so
    configured = _configured_world_size(trainer_cfg or {}, light=True)
    return None if configured is None else world_size(trainer_cfg or {}, configured)


# ``--print_config[=flags]``: taken off the command line and answered after the plan has filled in the
# derived trainer numbers (jsonargparse's own prints the config as parsed: accumulate_grad_batches 1)
_PRINT_CONFIG: dict[str, Optional[str]] = {"flags": None}
# schedule keys the named schedule does not read (resnet_lamb.optim.schedules); --print_config leaves them out
_UNUSED_SCHEDULE_KEYS = {"poly": ("milestones", "gamma"), "goyal": ("power",),
                         "constant": ("power", "milestones", "gamma")}


def _take_print_config(args: list[str]) -> list[str]:
    """``args`` without ``--print_config[=flags]``, the flags ("" when none) kept in _PRINT_CONFIG."""
    _PRINT_CONFIG["flags"] = None
    out = []
    for a in args:
        if a == "--print_config" or a.startswith("--print_config="):
            _PRINT_CONFIG["flags"] = a.partition("=")[2]
        else:
            out.append(a)
    return out


def _print_config(parser: Any, cfg: Any, flags: str) -> None:
    """The resolved config as the run will use it: the plan's max_steps and accumulation, the chosen
    precision, and only the schedule keys its schedule reads."""
    flags_ = flags.split(",")
    text = parser.dump(cfg, skip_unset="skip_unset" in flags_, skip_default="skip_default" in flags_,
                       skip_validation=True)
    data = yaml.safe_load(text) or {}
    schedule = (data.get("model") or {}).get("schedule")
    if isinstance(schedule, dict):
        for key in _UNUSED_SCHEDULE_KEYS.get(schedule.get("name"), ()):
            schedule.pop(key, None)
    print(yaml.safe_dump(data, sort_keys=False), end="", flush=True)


# Trainer options `fit --help` does not list (they stay accepted): set by this CLI (the plan's
# accumulation, the run folder, its loggers), or for features this harness does not use (test and
# predict loops, debugging shortcuts, Lightning's model registry)
_UNLISTED_OPTIONS = (
    "trainer.accumulate_grad_batches", "trainer.default_root_dir", "trainer.logger", "trainer.fast_dev_run",
    "trainer.limit_test_batches", "trainer.limit_predict_batches", "trainer.overfit_batches",
    "trainer.inference_mode", "trainer.use_distributed_sampler", "trainer.barebones", "trainer.model_registry",
    "trainer.enable_autolog_hparams", "trainer.reload_dataloaders_every_n_epochs", "trainer.min_epochs",
    "trainer.min_steps", "trainer.detect_anomaly", "weights_only",
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
    return any(n == o or n.startswith(o + ".") for n in names for o in _UNLISTED_OPTIONS)


def _shrink_help(parser: Any) -> None:
    """Shorter texts for Lightning's page-long ``ckpt_path``, ``callbacks`` and ``plugins`` help
    (the options of :data:`_UNLISTED_OPTIONS` are left out by the parser's help formatter; hiding
    them with argparse's SUPPRESS would also drop them from the saved config.yaml)."""
    for action in parser._actions:
        for opt in action.option_strings:
            if opt.lstrip("-") in _SHORT_HELP:
                action.help = _SHORT_HELP[opt.lstrip("-")]


def device_defaults(gpu: bool, bf16: bool, deterministic: bool) -> dict[str, Any]:
    """Trainer settings chosen from the device where the recipe leaves them unset: on a GPU
    bf16-mixed where it computes in bf16 natively (Ampere and later), else 16-mixed (Lightning adds a
    GradScaler), and cuDNN's autotuner for the fixed input shapes (unless deterministic); on a CPU
    32-true."""
    if not gpu:
        return {"precision": "32-true"}
    out: dict[str, Any] = {"precision": "bf16-mixed" if bf16 else "16-mixed"}
    if not deterministic:
        out["benchmark"] = True
    return out


def _check_cadence(cfg: Any) -> None:
    """Checkpoint and validation cadences, before anything is built. The last epoch must be
    validated (report reads its top-1): the validation cadence divides the epochs."""
    every, epochs = cfg.trainer.get("check_val_every_n_epoch"), cfg.trainer.get("max_epochs")
    if every is not None and epochs and (every < 1 or epochs % every):
        raise RecipeError(f"trainer.check_val_every_n_epoch: {every} does not divide trainer.max_epochs {epochs}; "
                          "choose a divisor so that the last epoch is validated")
    ckpt = cfg.run.get("checkpoint_every_n_epochs")
    if ckpt is not None and ckpt < 1:
        raise RecipeError(f"run.checkpoint_every_n_epochs: {ckpt}; must be an integer >= 1")
    bucket = cfg.run.get("ddp_bucket_mb")
    if bucket is not None and not bucket > 0:
        raise RecipeError(f"run.ddp_bucket_mb: {bucket}; must be > 0")


def ddp_strategy(strategy: Any, world: int, bucket_mb: float) -> Any:
    """``ddp`` (as torchrun.sh passes it), or ``auto`` with several devices: DDPStrategy with
    ``gradient_as_bucket_view`` (gradients are views into DDP's buckets: no copy between them, and
    less memory) and ``bucket_cap_mb`` from the recipe. A Strategy object from the recipe
    (``trainer.strategy: {class_path: ..., init_args: ...}``) and other names are left as they are."""
    if not isinstance(strategy, str) or strategy not in ("ddp", "auto") or (strategy == "auto" and world < 2):
        return strategy
    from lightning.pytorch.strategies import DDPStrategy

    return DDPStrategy(gradient_as_bucket_view=True, bucket_cap_mb=bucket_mb)


def _to_dict(ns: Any) -> Any:
    if hasattr(ns, "as_dict"):
        return ns.as_dict()
    return ns


# ------------------------------------------------------------------------------------ W&B
def _wandb_host(url: str):
    from urllib.parse import urlparse

    return urlparse(url if "//" in url else "https://" + url)


def _wandb_key_configured(url: str) -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc

        path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
        if os.path.isfile(path):
            return netrc.netrc(path).authenticators(_wandb_host(url).hostname) is not None
    except Exception:  # noqa: BLE001 - an unreadable netrc means no key
        return False
    return False


def _wandb_url() -> str:
    """The W&B server: WANDB_BASE_URL, else the installed wandb's default."""
    if os.environ.get("WANDB_BASE_URL"):
        return os.environ["WANDB_BASE_URL"]
    try:
        import wandb

        return str(wandb.Settings().base_url)
    except Exception:  # noqa: BLE001
        return "https://api.wandb.ai"


def _wandb_route(url: str) -> tuple[str, int]:
    """Where a connection to the W&B server goes first: the proxy that ``HTTPS_PROXY`` / ``HTTP_PROXY``
    (either case) names for the server's scheme, unless ``NO_PROXY`` exempts the host (as wandb's own
    HTTP client does), else the server itself."""
    import urllib.request

    u = _wandb_host(url)
    target = (u.hostname or "", u.port or (80 if u.scheme == "http" else 443))
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(u.scheme)
    if proxy and not urllib.request.proxy_bypass_environment(target[0], proxies):
        p = _wandb_host(proxy)
        return p.hostname or "", p.port or (443 if p.scheme == "https" else 80)
    return target


def _wandb_reachable(url: str, timeout: float = 5.0) -> bool:
    """A TCP connect to the server, or to the proxy the environment routes it through: wandb.init
    would otherwise wait up to its init_timeout (90 s) and then fail the run on a machine without
    internet."""
    import socket

    try:
        with socket.create_connection(_wandb_route(url), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def wandb_mode() -> str:
    """Honour WANDB_MODE; with it unset and no API key, or a key but no route to the W&B server,
    go offline (one line says so)."""
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode
    sync = "(sync later with `wandb sync runs/<name>/wandb/offline-run-*`)"
    url = _wandb_url()
    say = int(os.environ.get("RANK", "0")) == 0  # under torchrun every rank decides, rank 0 says it once
    if not _wandb_key_configured(url):
        os.environ["WANDB_MODE"] = "offline"
        if say:
            print(f"resnet-lamb: no W&B API key configured; logging to W&B offline {sync}", file=sys.stderr)
        return "offline"
    if not _wandb_reachable(url):
        os.environ["WANDB_MODE"] = "offline"
        if say:
            print(f"resnet-lamb: W&B server {url} unreachable; logging to W&B offline {sync}", file=sys.stderr)
        return "offline"
    return "online"


# ------------------------------------------------------------------------------------ CLI
def _cli_class():
    import lightning.pytorch as pl
    from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

    from resnet_lamb.data import ImageDataModule
    from resnet_lamb.model import LambModule
    from resnet_lamb.preemption import Preemption
    from resnet_lamb.telemetry import FirstStepRow, RunStatus, Throughput, TrustRatios, progress_bar

    class SaveConfig(SaveConfigCallback):
        """Writes the resolved config to ``<run dir>/config.yaml`` (not the first logger's dir)."""

        def setup(self, trainer, pl_module, stage):
            if self.already_saved:
                return
            if trainer.is_global_zero:
                run = self.config.get("run")
                name = "config.yaml" if stage == "fit" else f"config_{stage}.yaml"
                path = Path(run["root"]) / run["name"] / name
                path.parent.mkdir(parents=True, exist_ok=True)
                import warnings

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # jsonargparse's skip_none deprecation
                    self.parser.save(self.config, str(path), skip_none=False, overwrite=True, multifile=False)
            self.already_saved = True

    class RecipeCLI(LightningCLI):
        def init_parser(self, **kwargs):
            kwargs.setdefault("dump_header", [f"resnet-lamb; lightning.pytorch=={pl.__version__}"])
            return super().init_parser(**kwargs)

        def _parse_ckpt_path(self) -> None:
            """Lightning's replaces the model config by the checkpoint's hyperparameters when
            ``--ckpt_path`` is a file (not for ``last``), silently overriding the recipe and the
            command line.  Here the recipe is what runs, and check_resume refuses a checkpoint
            trained with another one."""

        def _set_seed(self) -> None:  # Lightning's, without the "Seed set to N" line
            from lightning.fabric.utilities.seed import seed_everything

            key = "seed_everything"
            cfg = self.config[self.subcommand] if self.subcommand else self.config
            seed = cfg.get(key)
            if seed is False:
                return
            cfg[key] = seed_everything(None if seed is True else seed, workers=True, verbose=False)

        def _prepare_subcommand_parser(self, klass, subcommand, **kwargs):
            parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
            _shrink_help(parser)
            parser.usage = (f"resnet-lamb {subcommand} --config RECIPE [--config OVERRIDE.yaml] "
                            "[--section.key value ...]")  # argparse's lists all ~80 options
            return parser

        def add_arguments_to_parser(self, parser) -> None:
            parser.add_argument("--expected", type=Optional[dict], default=None,
                                help="the paper's numbers for this recipe (read by `report`)")
            parser.add_argument("--sources", type=Optional[dict], default=None,
                                help="where each recipe setting comes from (dotted key -> text; shown by `plan`)")
            parser.add_argument("--run.name", type=Optional[str], default=None,
                                help="run folder name under run.root (default: the recipe's file stem)")
            parser.add_argument("--run.project", type=str, default=RUN_DEFAULTS["project"],
                                help="the W&B project the run logs to")
            parser.add_argument("--run.tags", type=list[str], default=[], help="tags of the W&B run")
            parser.add_argument("--run.root", type=str, default=RUN_DEFAULTS["root"], help="folder of run folders")
            parser.add_argument("--run.wandb", type=bool, default=True, help="log to W&B as well as CSV")
            parser.add_argument("--run.checkpoint_every_n_epochs", type=int, default=1,
                                help="write last.ckpt at the end of every N-th epoch (and of the last one; a new "
                                     "best by val/top1 is always kept); validation: trainer.check_val_every_n_epoch")
            parser.add_argument("--run.ddp_bucket_mb", type=float, default=25.0,
                                help="DDP gradient bucket size in MB (torch's default 25); with --trainer.strategy "
                                     "ddp or several devices the CLI builds DDPStrategy(gradient_as_bucket_view=True, "
                                     "bucket_cap_mb=this)")
            parser.add_argument("--run.force_resume", type=bool, default=False,
                                help="resume --ckpt_path with another optimizer, schedule, global batch or "
                                     "epoch count than the checkpoint's (refused otherwise)")
            parser.add_argument("--run.progress_seconds", type=float, default=30.0,
                                help="when the output is not a terminal, a progress line at least this often, "
                                     "inside a long accumulated step too (micro-batches done, img/s, ETA)")
            parser.add_argument("--run.fresh_if_missing", type=bool, default=False,
                                help="with --ckpt_path last: start the run from scratch when its folder has no "
                                     "last.ckpt yet (refused otherwise: a mistyped --run.name would restart a run)")
            # one class count: the model's output layer follows the data's (counted from data.root when null)
            parser.link_arguments("data.num_classes", "model.num_classes")

        # -- before anything is built: validate, plan, trainer numbers
        def before_instantiate_classes(self) -> None:
            sub = self.subcommand
            cfg = self.config[sub] if sub else self.config
            path = _RECIPE["path"] or "<command line>"
            # main() ran these checks on the recipe and command line before Lightning was imported;
            # again on what LightningCLI parsed (its defaults filled in), with the world size it will use
            recipe, self.folder, plan, classes, images = check_config(_to_dict(cfg), sub, world_size(cfg.trainer))
            rank0 = int(os.environ.get("RANK", "0")) == 0  # torchrun's rank; the trainer does not exist yet
            steps = int(plan.optimizer_steps)
            user_max = cfg.trainer.get("max_steps")
            if user_max is not None and 0 < user_max < steps:
                print(f"resnet-lamb: trainer.max_steps {user_max} stops the run before the plan's {steps} "
                      "steps (the schedule still follows the plan)", file=sys.stderr)
            else:
                cfg.trainer.max_steps = steps
            if sub == "fit" and int(os.environ.get("RANK", "0")) == 0:
                _warn_small_data(plan)
            cfg.trainer.accumulate_grad_batches = int(plan.accumulation)
            # one class count (the model's is linked to the data's: Lightning refuses differing hparams of
            # the same name), and the data the run used recorded in config.yaml (`report` reads it)
            cfg.data.num_classes = cfg.model.num_classes = classes
            if self.folder is not None:
                cfg.data.train_images, cfg.data.val_images = images, len(self.folder.splits["val"])
            elif cfg.data.get("backend") == "synthetic":  # the counts given, else ImageNet's (what its data module uses): the counts given, else ImageNet's (what its data module uses)
                from resnet_lamb.data.folder import IMAGENET

                cfg.data.train_images, cfg.data.val_images = images, cfg.data.val_images or IMAGENET["val_images"]
            if cfg.model.get("input_size") is None:
                cfg.model.input_size = cfg.data.image_size  # the mlp's input size
            import torch

            gpu = torch.cuda.is_available() and str(cfg.trainer.get("accelerator") or "auto") in ("auto", "gpu", "cuda")
            bf16 = gpu and torch.cuda.is_bf16_supported(including_emulation=False)
            for key, value in device_defaults(gpu, bf16, bool(cfg.trainer.get("deterministic"))).items():
                if cfg.trainer.get(key) is None:
                    setattr(cfg.trainer, key, value)
            if gpu:
                cfg.data.channels_last = True
            _check_cadence(cfg)
            if cfg.run.name is None:
                cfg.run.name = Path(path).stem if _RECIPE["path"] else "run"
            if _PRINT_CONFIG["flags"] is not None:  # what the run uses, before any folder is made
                _print_config(self._parser(sub), cfg, _PRINT_CONFIG["flags"])
                sys.exit(0)
            self.run_dir = Path(cfg.run.root) / cfg.run.name
            if rank0:
                _check_writable(self.run_dir)  # config, logs and checkpoints go there: fail now, not at epoch 1
            if sub == "fit":
                if rank0:
                    _remove_partial_checkpoints(self.run_dir / "checkpoints")
                if cfg.get("ckpt_path") == "last" and not (self.run_dir / "checkpoints" / "last.ckpt").is_file():
                    cfg.ckpt_path = None  # --run.fresh_if_missing (check_ckpt_path refused it otherwise)
                    if rank0:
                        print(f"resnet-lamb: {self.run_dir} has no checkpoint yet; starting it from scratch "
                              "(--run.fresh_if_missing)", file=sys.stderr)
                resume = _resume_path(cfg.get("ckpt_path"), self.run_dir)
                if resume is not None:
                    check_resume(resume, recipe, force=bool(cfg.run.get("force_resume")))
            if rank0 and not os.environ.get("RESNET_LAMB_PLAN_SHOWN"):  # launch/torchrun.sh printed it already
                print(_format_plan(plan), flush=True)
            if rank0 and sub == "fit":  # the run's own record of its numbers and their sources (report reads it)
                import json

                from resnet_lamb.recipe import plan_rows

                sources = {k: src for k, _, _, src in plan_rows(plan, recipe) if src}
                (self.run_dir / "plan.json").write_text(json.dumps({**plan.to_dict(), "sources": sources}, indent=1))

        def instantiate_classes(self) -> None:
            super().instantiate_classes()
            if self.folder is not None:  # read once, in before_instantiate_classes
                self.datamodule.validate(self.folder)

        def instantiate_trainer(self, **kwargs):
            cfg = self.config[self.subcommand] if self.subcommand else self.config
            extra = [self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys]
            config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
            config["default_root_dir"] = str(self.run_dir)
            config.setdefault("plugins", None)
            plugins = config["plugins"] or []
            plugins = plugins if isinstance(plugins, list) else [plugins]
            config["plugins"] = [*plugins, _atomic_io_class()()]
            callbacks = config.get("callbacks") or []
            callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
            if config.get("enable_progress_bar", True) is not False:
                callbacks.append(progress_bar(every=max(int(config.get("log_every_n_steps") or 50), 1),
                                              every_s=float(cfg.run.get("progress_seconds", 30.0))))
            if self.subcommand == "fit":
                callbacks += [Throughput(), TrustRatios(self.model.trust_ratio_every), RunStatus(str(self.run_dir)),
                              FirstStepRow(), Preemption()]
                if config.get("enable_checkpointing", True) is not False:
                    callbacks.append(_checkpoint_class()(
                        dirpath=str(self.run_dir / "checkpoints"), every_n_epochs=int(cfg.run.checkpoint_every_n_epochs)))
            config["callbacks"] = callbacks
            config["strategy"] = ddp_strategy(config.get("strategy", "auto"), world_size(cfg.trainer),
                                              float(cfg.run.ddp_bucket_mb))
            if config.get("logger", None) is not False:
                config["logger"] = self._loggers(cfg)
            return self._instantiate_trainer(config, extra)

        def _loggers(self, cfg) -> list:
            csv_name = "csv" if self.subcommand == "fit" else f"csv_{self.subcommand}"
            # every logged row written at once (Lightning's default: every 100 rows), so a short or
            # killed run keeps what it logged
            loggers = [_csv_logger_class()(save_dir=str(self.run_dir), name=csv_name, version="",
                                           flush_logs_every_n_steps=1)]
            if cfg.run.wandb and self.subcommand == "fit":
                loggers.append(_wandb_logger(self.run_dir, cfg, resume=bool(cfg.get("ckpt_path"))))
            return loggers

    return RecipeCLI, LambModule, ImageDataModule, SaveConfig


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (disk full, read-only folder): the run stops, older files stay."""


def _atomic_io_class():
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    class AtomicCheckpointIO(TorchCheckpointIO):
        """Lightning's ``_atomic_save`` goes through an fsspec transaction whose temp file is made by
        ``tempfile.mkstemp()`` in the system temp dir and moved with ``shutil.move``: a copy (not
        atomic) when /tmp is another file system, and never fsynced.  Here: a temp file in the
        target's own folder, fsync, ``os.replace``, fsync of the folder.  Remote URLs fall back."""

        def save_checkpoint(self, checkpoint, path, storage_options=None):
            path = os.fspath(path)
            if "://" in path:
                return super().save_checkpoint(checkpoint, path, storage_options)
            import torch

            folder = os.path.dirname(os.path.abspath(path))
            tmp = None
            try:
                os.makedirs(folder, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".ckpt", dir=folder)
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual file mode
                with os.fdopen(fd, "wb") as f:
                    torch.save(checkpoint, f)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException as err:
                if tmp is not None and os.path.exists(tmp):
                    os.unlink(tmp)
                oserr = err if isinstance(err, OSError) else err.__cause__ or err.__context__
                if isinstance(err, Exception) and isinstance(oserr, OSError):  # disk full, read-only, quota
                    # (not Ctrl-C: a KeyboardInterrupt inside torch.save may carry an OSError it handled)
                    raise CheckpointWriteError(
                        f"{path}: cannot write checkpoint ({oserr.strerror or oserr}); run stopped, the "
                        f"checkpoints already in {folder} are intact; free space there and resume with "
                        "--ckpt_path last") from None
                raise
            try:
                dfd = os.open(folder, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
            except OSError:
                pass

    return AtomicCheckpointIO


def _csv_logger_class():
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter

    class AppendingWriter(ExperimentWriter):
        """Keeps an existing metrics.csv (Lightning deletes it): a resumed run appends to it, and
        rows of the killed attempt from the resumed step on are dropped (they were redone)."""

        _trimmed = False

        def _check_log_dir_exists(self) -> None:
            import csv

            if self._fs.isfile(self.metrics_file_path):
                with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                    self.metrics_keys = sorted(csv.DictReader(f).fieldnames or [])
            else:
                self._trimmed = True

        def save(self) -> None:
            if self.metrics and not self._trimmed and self._fs.isfile(self.metrics_file_path):
                import csv

                first = min(int(m.get("step", 0)) for m in self.metrics)
                with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                    rows = [r for r in csv.DictReader(f) if not r.get("step") or int(float(r["step"])) < first]
                with self._fs.open(self.metrics_file_path, "w", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=self.metrics_keys)
                    w.writeheader()
                    w.writerows(rows)
            if self.metrics:  # a save with nothing buffered (Lightning makes some) has no step to trim from
                self._trimmed = True
            super().save()

    from lightning.fabric.loggers.logger import rank_zero_experiment

    class AppendingCSVLogger(CSVLogger):
        @property
        @rank_zero_experiment
        def experiment(self):
            if self._experiment is None:
                os.makedirs(self.root_dir, exist_ok=True)
                self._experiment = AppendingWriter(log_dir=self.log_dir)
            return self._experiment

    return AppendingCSVLogger


def _checkpoint_class():
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Checkpoints(ModelCheckpoint):
        """``last.ckpt`` at the end of every ``every_n_epochs``-th epoch and of the last one, after that
        epoch's validation when it has one; the best by ``val/top1`` (``best-epoch...``) whenever a
        validation improves it; ``last.ckpt`` mid-epoch when :class:`resnet_lamb.preemption.Preemption`
        asks (:meth:`save_last_now`).

        One write per save: a new best is written to ``last.ckpt`` and the best file is a hard link to
        it (the next ``last.ckpt`` is a new file, so the link keeps its contents; where the file system
        has no hard links the best is written a second time). Lightning 2.6's ModelCheckpoint writes
        the two as separate full files, and refreshes ``last.ckpt`` only when a best was written at the
        same step (a run killed after an epoch that did not improve would resume from an older one)."""

        def __init__(self, dirpath: str, every_n_epochs: int = 1):
            super().__init__(dirpath=dirpath, monitor="val/top1", mode="max", save_last=True, save_top_k=1,
                             filename="best-epoch{epoch:03d}-top1{val/top1:.4f}", auto_insert_metric_name=False,
                             every_n_epochs=every_n_epochs, save_on_train_epoch_end=False,
                             enable_version_counter=False)
            self._last_written_step = -1
            self._step_seen = -1

        @property
        def last_path(self) -> str:
            return os.path.join(self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)

        def _due(self, trainer) -> bool:
            epoch = trainer.current_epoch + 1
            return epoch % self._every_n_epochs == 0 or epoch >= (trainer.max_epochs or 0)

        # Saved at the end of an epoch's validation, or, for an epoch without one, after its last
        # optimizer step (on_train_batch_end): the two points Lightning resumes from correctly when
        # max_steps is set (from on_train_epoch_end it would count the finished epoch twice).
        def on_validation_end(self, trainer, pl_module):
            if self._should_skip_saving_checkpoint(trainer):
                return
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            if self._due(trainer) or 0 < (trainer.max_steps or 0) <= trainer.global_step:
                self._save_last_checkpoint(trainer, candidates)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == self._step_seen:  # accumulating: no optimizer step yet
                return
            self._step_seen = trainer.global_step
            last_batch = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
            validates = last_batch and trainer.enable_validation and \
                (trainer.current_epoch + 1) % (trainer.check_val_every_n_epoch or 1) == 0
            stop = 0 < (trainer.max_steps or 0) <= trainer.global_step
            if validates or not ((last_batch and self._due(trainer)) or stop):
                return
            if not self._should_skip_saving_checkpoint(trainer):
                self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

        def save_last_now(self, trainer) -> str:
            """``last.ckpt`` at this step, mid-epoch (every rank calls this at the same step)."""
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            return self.last_path

        def _save_checkpoint(self, trainer, filepath):
            last = self.last_path
            if filepath == last:
                if self._last_written_step != trainer.global_step:  # not already written with a new best
                    super()._save_checkpoint(trainer, last)
                    self._last_written_step = trainer.global_step
                return
            self.last_model_path = last  # part of the state written below
            super()._save_checkpoint(trainer, last)
            self._last_written_step = trainer.global_step
            linked = False
            if trainer.is_global_zero:
                tmp = os.path.join(os.path.dirname(filepath), f".tmp-link-{os.getpid()}.ckpt")
                try:
                    os.link(last, tmp)
                    os.replace(tmp, filepath)
                    linked = True
                except OSError:  # no hard links here (some network file systems)
                    if os.path.exists(tmp):
                        os.unlink(tmp)
            if not trainer.strategy.broadcast(linked, src=0):
                super()._save_checkpoint(trainer, filepath)
            self._last_checkpoint_saved = filepath

    return Checkpoints


def _wandb_logger(run_dir: Path, cfg: Any, resume: bool):
    mode = wandb_mode()
    from lightning.pytorch.loggers import WandbLogger

    id_file = run_dir / "wandb" / "run_id"
    run_id = id_file.read_text().strip() if resume and id_file.is_file() else None
    if run_id is None:
        import secrets

        run_id = secrets.token_hex(4)
    if int(os.environ.get("RANK", "0")) == 0:
        id_file.parent.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id + "\n")
    logger = WandbLogger(project=cfg.run.project, name=cfg.run.name, save_dir=str(run_dir),
                         tags=list(cfg.run.tags or []), id=run_id, resume="allow",
                         offline=(mode == "offline"))
    # Lightning 2.6 always passes anonymous=None to wandb.init, which wandb 0.31 answers with "The
    # anonymous setting has no effect and will be removed"; leaving the key out changes nothing else
    logger._wandb_init.pop("anonymous", None)
    return logger


def _warn_small_data(plan: Any) -> None:
    """One line when the global batch is larger than the data set: most of each step is padding."""
    n, batch = int(plan.train_images), int(plan.global_batch)
    if n >= batch:
        return
    computed = min(n, plan.accumulation * plan.world_size) * plan.micro_batch  # slots holding a real image
    print(f"resnet-lamb: warning: data.global_batch {batch} is larger than the {n} training images: each step "
          f"pads them with {batch - n} repeats labelled -1 (no gradient) and computes {computed} of the {batch} "
          "(micro-batches of padding only are skipped); a smaller data.micro_batch computes fewer", file=sys.stderr)


def _format_plan(plan: Any) -> str:
    warm = f"{plan.warmup_steps} warmup steps ({plan.warmup_epochs:g} epochs)"
    return (f"resnet-lamb plan: {plan.optimizer} lr {plan.lr:.6g} ({plan.base_lr:g} x ({plan.global_batch}/"
            f"{plan.base_batch}) {plan.scaling}), {plan.schedule} schedule, {warm}, {plan.total_steps} total steps "
            f"(optimizer steps {plan.optimizer_steps} = " + (f"{plan.epochs} epochs x {plan.steps_per_epoch}" if
                                                             plan.epoch_mode == "padded" else "all full batches") +
            f"), accumulation "
            f"{plan.accumulation} (global batch {plan.global_batch} = micro {plan.micro_batch} x {plan.world_size} devices x "
            f"{plan.accumulation}), {plan.train_images} train images, {plan.epoch_mode} epochs, BatchNorm over "
            f"{plan.bn_images} images")


def _quiet_libraries(subcommand: str) -> None:
    """Library messages that do not concern a user of this CLI, each silenced by its own text (a
    warning filter or a logging filter on the logger that emits it, nothing blanket)."""
    import warnings

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


def main(argv: list[str] | None = None) -> int:
    """Entry of the dispatcher: ``main(["fit", *args])`` / ``main(["validate", *args])``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("fit", "validate"):
        raise UserError("usage: resnet-lamb fit|validate --config RECIPE [--key value ...]")
    _quiet_libraries(argv[0])
    argv = [argv[0], *_take_print_config(argv[1:])]
    _ARGV[:] = argv
    _RECIPE.update(path=None, stated=[], origins={})
    _FOLDERS.clear()
    with tempfile.TemporaryDirectory(prefix="resnet-lamb-") as tmp:
        expanded, merged, overrides = _expand_recipe(argv[1:], tmp)
        if _RECIPE["path"] and not {"-h", "--help", "--print_config"} & {a.split("=", 1)[0] for a in argv}:
            # recipe, data and run-folder errors before torch and Lightning are imported
            from resnet_lamb.recipe import apply_overrides

            cfg, _RECIPE["origins"] = apply_overrides(merged, overrides)
            check_config(cfg, argv[0], _known_world_size(cfg.get("trainer")))
        args = [argv[0], *expanded]
        RecipeCLI, LambModule, ImageDataModule, SaveConfig = _cli_class()
        saved_argv, sys.argv = sys.argv, sys.argv[:1]  # args are given explicitly (no "both" warning)
        try:
            _run_cli(RecipeCLI, LambModule, ImageDataModule, SaveConfig, args)
        finally:
            sys.argv = saved_argv
    return 0


def _run_cli(RecipeCLI, LambModule, ImageDataModule, SaveConfig, args):
    RecipeCLI(
        LambModule, ImageDataModule,
        args=args,
        parser_class=_parser_class(),
        save_config_callback=SaveConfig,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"num_sanity_val_steps": 0},
        auto_configure_optimizers=False,
        seed_everything_default=0,
    )


if __name__ == "__main__":  # pragma: no cover - `python -m resnet_lamb.train fit ...`
    sys.exit(main())
