"""The LightningCLI of ``fit`` / ``validate`` (:class:`RecipeCLI`), run by :func:`resnet_lamb.train.main`
after the start-up checks (:mod:`resnet_lamb.startup`): the recipe's options, the plan's trainer
numbers, the device's precision, the run folder and the callbacks, plugins and loggers of a run.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import Logger
from lightning.pytorch.strategies import DDPStrategy

from resnet_lamb import telemetry  # its callbacks looked up when a trainer is built (tests replace them)
from resnet_lamb.checkpoints import (
    AtomicCheckpointIO,
    Checkpoints,
    check_resume,
    remove_partial_checkpoints,
    resume_path,
)
from resnet_lamb.cli_parser import OneLineParser, print_config, shrink_help
from resnet_lamb.data import ImageDataModule
from resnet_lamb.data.folder import IMAGENET
from resnet_lamb.errors import RecipeError
from resnet_lamb.model import LambModule
from resnet_lamb.preemption import Preemption
from resnet_lamb.recipe import TOP_LEVEL_KEYS, blame, check_keys, key_tree, plan_rows, recipe_part
from resnet_lamb.run_logging import AppendingCSVLogger, wandb_logger
from resnet_lamb.startup import (
    PRINT_CONFIG,
    RECIPE,
    RUN_DEFAULTS,
    check_cadence,
    check_config,
    check_writable,
    format_plan,
    warn_small_data,
    world_size,
)
from resnet_lamb.time_to_target import TimeToTarget

# The CLI's own options beside LightningCLI's: (flag, type, default, help).
OPTIONS: list[tuple[str, Any, Any, str]] = [
    ("--expected", dict | None, None, "the paper's numbers for this recipe (read by `report`)"),
    ("--sources", dict | None, None, "where each recipe setting comes from (dotted key -> text; shown by `plan`)"),
    ("--run.name", str | None, None, "run folder name under run.root (default: the recipe's file stem)"),
    ("--run.project", str, RUN_DEFAULTS["project"], "the W&B project the run logs to"),
    ("--run.tags", list[str], [], "tags of the W&B run"),
    ("--run.root", str, RUN_DEFAULTS["root"], "folder of run folders"),
    ("--run.wandb", bool, True, "log to W&B as well as CSV"),
    (
        "--run.checkpoint_every_n_epochs",
        int,
        1,
        "write last.ckpt at the end of every N-th epoch (and of the last one; a new best by val/top1 is "
        "always kept); validation: trainer.check_val_every_n_epoch",
    ),
    (
        "--run.target_top1",
        float | None,
        None,
        "stop at the first validation whose val/top1 is at or above this fraction and record the epochs, "
        "steps and wall time to it in summary.json (MLPerf's time to accuracy); null = off",
    ),
    (
        "--run.ddp_bucket_mb",
        float,
        25.0,
        "DDP gradient bucket size in MB (torch's default 25); with --trainer.strategy ddp or several "
        "devices the CLI builds DDPStrategy(gradient_as_bucket_view=True, bucket_cap_mb=this)",
    ),
    (
        "--run.force_resume",
        bool,
        False,
        "resume --ckpt_path with another optimizer, schedule, global batch or epoch count than the "
        "checkpoint's (refused otherwise)",
    ),
    (
        "--run.progress_seconds",
        float,
        30.0,
        "when the output is not a terminal, a progress line at least this often, inside a long "
        "accumulated step too (micro-batches done, img/s, ETA)",
    ),
    (
        "--run.fresh_if_missing",
        bool,
        False,
        "with --ckpt_path last: start the run from scratch when its folder has no last.ckpt yet "
        "(refused otherwise: a mistyped --run.name would restart a run)",
    ),
]


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


def ddp_strategy(strategy: Any, world: int, bucket_mb: float) -> Any:
    """``ddp`` (as torchrun.sh passes it), or ``auto`` with several devices: DDPStrategy with
    ``gradient_as_bucket_view`` (gradients are views into DDP's buckets: no copy between them, and
    less memory) and ``bucket_cap_mb`` from the recipe. A Strategy object from the recipe
    (``trainer.strategy: {class_path: ..., init_args: ...}``) and other names are left as they are."""
    if not isinstance(strategy, str) or strategy not in ("ddp", "auto") or (strategy == "auto" and world < 2):
        return strategy
    return DDPStrategy(gradient_as_bucket_view=True, bucket_cap_mb=bucket_mb)


def _to_dict(ns: Any) -> Any:
    if hasattr(ns, "as_dict"):
        return ns.as_dict()
    return ns


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
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # jsonargparse's skip_none deprecation
                self.parser.save(self.config, str(path), skip_none=False, overwrite=True, multifile=False)
        self.already_saved = True


# options set from another by link_arguments (not in the parser's defaults; a recipe may state them)
LINKED_OPTIONS = ("model.num_classes",)


class RecipeCLI(LightningCLI):
    """LightningCLI over the recipe: the ``run.*`` options, the start-up checks again on the parsed
    config, the plan's trainer numbers, and the run folder's callbacks, plugins and loggers."""

    def init_parser(self, **kwargs):
        kwargs.setdefault("dump_header", [f"resnet-lamb; lightning.pytorch=={pl.__version__}"])
        return super().init_parser(**kwargs)

    def parse_arguments(self, parser, args) -> None:
        """The recipe's keys against every option of the subcommand (LightningCLI's and the recipe's:
        :func:`resnet_lamb.recipe.check_keys`, the one check for unknown keys) before jsonargparse
        parses, so that an unknown key reads as it does in ``plan``."""
        cfg, sub = RECIPE.get("config"), args[0] if args else None
        if cfg is not None and sub in self.subcommands():
            path = RECIPE["path"] or "<command line>"
            try:
                options = [*self._parser(sub).get_defaults().keys(), *LINKED_OPTIONS]
                check_keys(recipe_part(cfg), key_tree(options))
            except RecipeError as err:
                raise RecipeError(blame(f"{os.path.normpath(path)}: {err}", path, RECIPE["origins"])) from None
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """Lightning's replaces the model config by the checkpoint's hyperparameters when
        ``--ckpt_path`` is a file (not for ``last``), silently overriding the recipe and the
        command line.  Here the recipe is what runs, and check_resume refuses a checkpoint
        trained with another one."""

    def _set_seed(self) -> None:  # Lightning's, without the "Seed set to N" line
        key = "seed_everything"
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        seed = cfg.get(key)
        if seed is False:
            return
        cfg[key] = seed_everything(None if seed is True else seed, workers=True, verbose=False)

    def _prepare_subcommand_parser(self, klass, subcommand, **kwargs):
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        shrink_help(parser)
        parser.usage = (
            f"resnet-lamb {subcommand} --config RECIPE [--config OVERRIDE.yaml] "
            "[--section.key value ...]"
        )  # argparse's lists all ~80 options
        return parser

    def add_arguments_to_parser(self, parser) -> None:
        for flag, kind, default, help_text in OPTIONS:
            parser.add_argument(flag, type=kind, default=default, help=help_text)
        # one class count: the model's output layer follows the data's (counted from data.root when null)
        parser.link_arguments("data.num_classes", "model.num_classes")  # LINKED_OPTIONS

    # -- before anything is built: validate, plan, trainer numbers
    def before_instantiate_classes(self) -> None:
        sub = self.subcommand
        cfg = self.config[sub] if sub else self.config
        path = RECIPE["path"] or "<command line>"
        # main() ran these checks on the recipe and command line before Lightning was imported;
        # again on what LightningCLI parsed (its defaults filled in), with the world size it will use
        # (the keys were checked against every option in parse_arguments; the subcommand's own, such as
        # validate's `verbose`, are not the recipe's)
        parsed = {k: v for k, v in _to_dict(cfg).items() if k in TOP_LEVEL_KEYS}
        recipe, self.folder, plan, classes, images = check_config(parsed, sub, world_size(cfg.trainer))
        rank0 = int(os.environ.get("RANK", "0")) == 0  # torchrun's rank; the trainer does not exist yet
        steps = int(plan.optimizer_steps)
        user_max = cfg.trainer.get("max_steps")
        if user_max is not None and 0 < user_max < steps:
            print(
                f"resnet-lamb: trainer.max_steps {user_max} stops the run before the plan's {steps} "
                "steps (the schedule still follows the plan)",
                file=sys.stderr,
            )
        else:
            cfg.trainer.max_steps = steps
        if sub == "fit" and int(os.environ.get("RANK", "0")) == 0:
            warn_small_data(plan)
        cfg.trainer.accumulate_grad_batches = int(plan.accumulation)
        # one class count (the model's is linked to the data's: Lightning refuses differing hparams of
        # the same name), and the data the run used recorded in config.yaml (`report` reads it)
        cfg.data.num_classes = cfg.model.num_classes = classes
        if self.folder is not None:
            cfg.data.train_images, cfg.data.val_images = images, len(self.folder.splits["val"])
        elif cfg.data.get("backend") == "synthetic":  # the counts given, else ImageNet's (what its data module uses)
            cfg.data.train_images, cfg.data.val_images = images, cfg.data.val_images or IMAGENET["val_images"]
        if cfg.model.get("input_size") is None:
            cfg.model.input_size = cfg.data.image_size  # the mlp's input size
        gpu = torch.cuda.is_available() and str(cfg.trainer.get("accelerator") or "auto") in ("auto", "gpu", "cuda")
        bf16 = gpu and torch.cuda.is_bf16_supported(including_emulation=False)
        for key, value in device_defaults(gpu, bf16, bool(cfg.trainer.get("deterministic"))).items():
            if cfg.trainer.get(key) is None:
                setattr(cfg.trainer, key, value)
        if gpu:
            cfg.data.channels_last = True
        check_cadence(cfg)
        if cfg.run.name is None:
            cfg.run.name = Path(path).stem if RECIPE["path"] else "run"
        if PRINT_CONFIG["flags"] is not None:  # what the run uses, before any folder is made
            print_config(self._parser(sub), cfg, PRINT_CONFIG["flags"])
            sys.exit(0)
        self.run_dir = Path(cfg.run.root) / cfg.run.name
        if rank0:
            check_writable(self.run_dir)  # config, logs and checkpoints go there: fail now, not at epoch 1
        if sub == "fit":
            if rank0:
                remove_partial_checkpoints(self.run_dir / "checkpoints")
            if cfg.get("ckpt_path") == "last" and not (self.run_dir / "checkpoints" / "last.ckpt").is_file():
                cfg.ckpt_path = None  # --run.fresh_if_missing (check_ckpt_path refused it otherwise)
                if rank0:
                    print(
                        f"resnet-lamb: {self.run_dir} has no checkpoint yet; starting it from scratch "
                        "(--run.fresh_if_missing)",
                        file=sys.stderr,
                    )
            resume = resume_path(cfg.get("ckpt_path"), self.run_dir)
            if resume is not None:
                check_resume(resume, recipe, plan, force=bool(cfg.run.get("force_resume")))
        if rank0 and not os.environ.get("RESNET_LAMB_PLAN_SHOWN"):  # launch/torchrun.sh printed it already
            print(format_plan(plan), flush=True)
        self.plan = plan  # the one plan of the run: the module and the data module follow it
        if rank0 and sub == "fit":  # the run's own record of its numbers and their sources (report reads it)
            sources = {k: src for k, _, _, src in plan_rows(plan, recipe) if src}
            (self.run_dir / "plan.json").write_text(json.dumps({**plan.to_dict(), "sources": sources}, indent=1))

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        self.model.run_plan = self.datamodule.plan = self.plan
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
        config["plugins"] = [*plugins, AtomicCheckpointIO()]
        callbacks = config.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        if config.get("enable_progress_bar", True) is not False:
            callbacks.append(
                telemetry.progress_bar(
                    every=max(int(config.get("log_every_n_steps") or 50), 1),
                    every_s=float(cfg.run.get("progress_seconds", 30.0)),
                )
            )
        if self.subcommand == "fit":
            callbacks += [
                telemetry.Throughput(),
                telemetry.TrustRatios(self.model.trust_ratio_every),
                telemetry.RunStatus(str(self.run_dir)),
                telemetry.FirstStepRow(),
                Preemption(),
            ]
            if cfg.run.get("target_top1") is not None:
                callbacks.append(TimeToTarget(float(cfg.run.target_top1)))
            if config.get("enable_checkpointing", True) is not False:
                callbacks.append(
                    Checkpoints(
                        dirpath=str(self.run_dir / "checkpoints"), every_n_epochs=int(cfg.run.checkpoint_every_n_epochs)
                    )
                )
        config["callbacks"] = callbacks
        config["strategy"] = ddp_strategy(
            config.get("strategy", "auto"), world_size(cfg.trainer), float(cfg.run.ddp_bucket_mb)
        )
        if config.get("logger", None) is not False:
            config["logger"] = self._loggers(cfg)
        return self._instantiate_trainer(config, extra)

    def _loggers(self, cfg) -> list:
        csv_name = "csv" if self.subcommand == "fit" else f"csv_{self.subcommand}"
        # every logged row written at once (Lightning's default: every 100 rows), so a short or
        # killed run keeps what it logged
        loggers: list[Logger] = [
            AppendingCSVLogger(save_dir=str(self.run_dir), name=csv_name, version="", flush_logs_every_n_steps=1)
        ]
        if cfg.run.wandb and self.subcommand == "fit":
            loggers.append(wandb_logger(self.run_dir, cfg, resume=bool(cfg.get("ckpt_path"))))
        return loggers


def run(args: list[str]) -> None:
    """LightningCLI on ``args`` (the subcommand and its arguments, the recipe expanded)."""
    saved_argv, sys.argv = sys.argv, sys.argv[:1]  # args are given explicitly (no "both" warning)
    try:
        RecipeCLI(
            LambModule,
            ImageDataModule,
            args=args,
            parser_class=OneLineParser,
            save_config_callback=SaveConfig,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"num_sanity_val_steps": 0},
            auto_configure_optimizers=False,
            seed_everything_default=0,
        )
    finally:
        sys.argv = saved_argv
