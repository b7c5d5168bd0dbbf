"""The LightningModule: the network (:mod:`resnet_lamb.networks`), cross-entropy, top-1/top-5, and
the recipe's optimizer + per-step schedule.

* Loss: cross-entropy with optional label smoothing.  Label -1 marks a padding sample (the data
  side pads the last batch so every image counts once); the loss is the sum over real samples
  divided by the micro-batch's row count, so an all-padding micro-batch contributes 0 (not NaN)
  and every real sample has the same weight within a step.
* Metrics: torchmetrics ``MulticlassAccuracy`` top-1/top-5, micro average, ``ignore_index=-1``,
  synced across ranks at compute; ``val/loss`` is a synced sum / count.
* Optimizer and schedule: ``resnet_lamb.optim.build_optimizer`` and
  ``resnet_lamb.optim.schedules.build_scheduler`` with the numbers of the run's plan (``run_plan``:
  the CLI's, in plan.json and in each checkpoint; else ``resnet_lamb.recipe.derive_plan``), stepped
  once per optimizer step.  ``grad_clip_norm``: global gradient-norm clipping.
* Once per optimizer step the ranks sum one small tensor (:meth:`LambModule._exchange`: the step's
  only collective besides DDP's and its only host sync): each rank's loss sum and count of real
  samples, whether its gradient norm is finite, whether it was asked to stop (SIGUSR1 / SIGTERM,
  :mod:`resnet_lamb.preemption`).  Every decision is taken from the sums: the same on every rank.
  ``train/loss`` (global mean, padding excluded) and ``train/lr`` are logged once per step.
* Non-finite loss or global gradient norm: ``nonfinite: stop`` (default) raises
  :class:`NonFiniteLossError` / :class:`NonFiniteGradientError` before the step, one line naming the
  step and the parameter where a NaN gradient first appeared (per-tensor checks only on failure);
  no checkpoint is written from the bad state.  ``nonfinite: skip``: every rank drops the step's
  gradients, the optimizer and its state stay as they were, ``global_step`` and the LR schedule move
  on (the run still ends after the plan's steps); one warning line per skipped step,
  ``train/skipped_steps`` logged and kept in checkpoints.  Under ``16-mixed`` the GradScaler skips
  overflowing steps itself.
* Checkpoints carry the recipe identity and the RNG states (:mod:`resnet_lamb.checkpoints`); a
  forced resume with another recipe is applied in :meth:`LambModule.on_load_checkpoint`.
"""

from __future__ import annotations

import math
from typing import Any, cast

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torchmetrics.aggregation import SumMetric
from torchmetrics.classification import MulticlassAccuracy

from resnet_lamb.checkpoints import recipe_changes, recipe_identity, restate_epoch_progress
from resnet_lamb.checkpoints import rng_state as _rng_state
from resnet_lamb.checkpoints import set_rng_state as _set_rng_state
from resnet_lamb.errors import NonFiniteGradientError, NonFiniteLossError, RecipeError, UserError
from resnet_lamb.networks import build_resnet
from resnet_lamb.optim.portable_state import load_optimizer_states, save_optimizer_states
from resnet_lamb.recipe import OptimizerSpec, ScheduleSpec

NONFINITE = ("stop", "skip")


class LambModule(pl.LightningModule):
    """ResNet + loss + metrics + the recipe's optimizer and schedule (init args: CONTRACTS.md)."""

    # training micro-batches of padding only may come empty (ImageDataModule.on_before_batch_transfer)
    skip_padding = True

    def __init__(
        self,
        arch: str = "resnet50",
        num_classes: int = 1000,
        small_input: bool = False,
        label_smoothing: float = 0.0,
        zero_init_residual: bool = False,
        grad_clip_norm: float | None = None,
        trust_ratio_every: int = 100,
        optimizer: OptimizerSpec | None = None,
        schedule: ScheduleSpec | None = None,
        input_size: int | None = None,
        mlp_hidden: tuple[int, ...] = (512, 512),
        nonfinite: str = "stop",
        bn_batch: int | None = None,
    ) -> None:
        """
        Args:
            arch: a torchvision ResNet (resnet18/34/50/101/152, wide_resnet*, resnext*) or mlp.
            num_classes: classes of the last layer (the data's class count).
            small_input: 3x3 stride-1 stem and no max-pool, for 28-64 px proxies.
            label_smoothing: cross-entropy label smoothing in [0, 1).
            zero_init_residual: zero each residual block's last BatchNorm gamma (Goyal et al.).
            grad_clip_norm: clip the global gradient norm to this before each step; null = off.
            trust_ratio_every: log optim/trust_ratio/<param> every N optimizer steps; 0 = off.
            optimizer: name, base_lr at base_batch, scaling rule, weight decay, param_rule, kwargs
                (`--model.optimizer.help` lists them).
            schedule: poly | poly_after_warmup | goyal | constant, warmup epochs at base_batch and its scaling
                (`--model.schedule.help` lists them).
            input_size: image size the mlp flattens (the CLI copies data.image_size).
            mlp_hidden: hidden layer widths of the mlp.
            nonfinite: at a NaN/Inf loss or gradient, stop the run or skip the step.
            bn_batch: ghost BatchNorm: training statistics over groups of this many samples of each
                micro batch (must divide data.micro_batch); null = plain BatchNorm over the micro batch.
        """
        super().__init__()
        if nonfinite not in NONFINITE:
            raise RecipeError(
                f"model.nonfinite: expected one of {', '.join(NONFINITE)}, got {nonfinite!r}; "
                "stop (default) ends the run at a NaN/Inf loss or gradient, skip skips such steps"
            )
        if not 0.0 <= label_smoothing < 1.0:
            raise RecipeError(f"model.label_smoothing: must be in [0, 1), got {label_smoothing}")
        if grad_clip_norm is not None and not grad_clip_norm > 0:
            raise RecipeError(f"model.grad_clip_norm: must be > 0 or null (off), got {grad_clip_norm}")
        if bn_batch is not None and (isinstance(bn_batch, bool) or not isinstance(bn_batch, int) or bn_batch < 1):
            raise RecipeError(
                f"model.bn_batch: expected a positive integer or null (plain BatchNorm), got {bn_batch!r}"
            )
        if not isinstance(trust_ratio_every, int) or trust_ratio_every < 0:
            raise RecipeError(f"model.trust_ratio_every: must be an integer >= 0 (0 = off), got {trust_ratio_every}")
        self.save_hyperparameters()
        self.optimizer_spec = optimizer if optimizer is not None else OptimizerSpec()
        self.schedule_spec = schedule if schedule is not None else ScheduleSpec()
        self.label_smoothing = float(label_smoothing)
        self.grad_clip_norm = grad_clip_norm
        self.trust_ratio_every = trust_ratio_every
        self.num_classes = num_classes
        self.bn_batch = bn_batch
        self.model = build_resnet(arch, num_classes, small_input, zero_init_residual, input_size, mlp_hidden, bn_batch)
        top5 = min(5, num_classes)
        self.val_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro", ignore_index=-1)
        self.val_top5 = MulticlassAccuracy(num_classes, top_k=top5, average="micro", ignore_index=-1)
        self.val_loss_sum = SumMetric()
        self.val_count = SumMetric()
        self.plan = None  # the resnet_lamb.recipe.Plan this run follows, set in configure_optimizers
        self.run_plan = None  # the CLI's plan (the run's plan.json): followed instead of deriving one
        self._channels_last = False
        self._step_share: torch.Tensor | None = None  # [loss sum, real samples] of this step's micro-batches
        self.stop_requested = False  # set at an optimizer step when any rank was asked to stop (preemption)
        self.nonfinite = nonfinite
        self.skipped_steps = 0  # optimizer steps skipped for non-finite values (nonfinite: skip)
        self._grad_norm: torch.Tensor | None = None  # this step's gradient norm, for the clipping
        self._skip_step = False
        self._pending_rng: dict[str, Any] | None = None  # restored at on_train_start
        self._forced: dict[str, Any] | None = None  # a forced resume's saved state (on_load_checkpoint)

    # ---------------------------------------------------------------------------- model
    def configure_model(self) -> None:
        if self.device.type == "cuda" and not self._channels_last:
            self.model.to(memory_format=torch.channels_last)
            self._channels_last = True

    def setup(self, stage: str) -> None:
        self.configure_model()
        size = self.hparams.get("input_size")
        if isinstance(size, int) and size > 0:  # the model summary's FLOPs and sizes, per image
            self.example_input_array = self.trainer.precision_plugin.convert_input(torch.zeros(1, 3, size, size))
        dm = getattr(self.trainer, "datamodule", None)
        dm_classes = getattr(dm, "num_classes", None)
        if isinstance(dm_classes, int) and dm_classes > self.num_classes:
            raise RecipeError(
                f"model.num_classes: {self.num_classes} but the data has {dm_classes} classes; "
                f"set model.num_classes: {dm_classes}"
            )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self._channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.model(images)

    def _loss_sum(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(
            logits.float(), labels, ignore_index=-1, reduction="sum", label_smoothing=self.label_smoothing
        )

    # ---------------------------------------------------------------------------- train
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        if images.shape[0] == 0:
            # a micro-batch of padding only, emptied by the data module (skip_padding): no forward; a
            # zero loss that reaches every parameter, so that backward (and under DDP its gradient
            # all-reduce, the same on every rank) runs as for any micro-batch, adding exact zeros
            zero = sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0
            return cast(torch.Tensor, zero)  # a sum of tensors: the module has parameters
        labels = labels.reshape(-1).long()
        logits = self(images)
        loss_sum = self._loss_sum(logits, labels)
        # this rank's share of the step's loss: [sum over real samples, real samples], added up on the
        # device across micro-batches (no host sync here); exchanged once per optimizer step
        # (on_before_optimizer_step). A non-finite loss stays non-finite in the sum (losses are >= 0).
        share = torch.stack([loss_sum.detach().float(), (labels >= 0).sum().float()])
        self._step_share = share if self._step_share is None else self._step_share + share
        return loss_sum / max(labels.numel(), 1)

    def _exchange(self, grad_bad: torch.Tensor | None) -> tuple[float, float, bool, bool]:
        """The step's one collective and one host sync: every rank's loss share, whether its gradient
        norm is finite and whether it was asked to stop (SIGUSR1/SIGTERM), summed over the ranks.
        Returns (global loss sum, global real samples, non-finite anywhere, stop requested anywhere):
        the same on every rank, so no decision can differ between them."""
        from resnet_lamb.preemption import stop_requested

        share, self._step_share = self._step_share, None
        if share is None:
            share = torch.zeros(2, device=self.device)
        bad = torch.zeros((), device=share.device) if grad_bad is None else grad_bad.to(share.device).float()
        stop = torch.full((), float(stop_requested()), device=share.device)
        flags = torch.cat([share, bad.reshape(1), stop.reshape(1)])
        if self.trainer.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flags)  # a sum; Lightning's strategy.reduce would add a barrier
        loss_sum, count, bad_ranks, stops = flags.tolist()
        return loss_sum, count, bad_ranks > 0 or not math.isfinite(loss_sum), stops > 0

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # The run's last step can fall inside a Lightning epoch (full_batch epochs: 3519 steps are
        # 87 epochs of 40 and 39 steps), where Lightning would stop without validating: asking it
        # to stop validates and writes last.ckpt there, as at an epoch's end.
        max_steps = self.trainer.max_steps
        if max_steps is not None and 0 < max_steps <= self.trainer.global_step:
            self.trainer.should_stop = True

    def on_before_optimizer_step(self, optimizer) -> None:
        self._skip_step = False
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        # fp16 + GradScaler: inf gradients are the scaler's business (it skips those steps itself)
        scaler = getattr(getattr(self._trainer, "precision_plugin", None), "scaler", None)
        norm = None
        if params and scaler is None:  # the order and function clip_grad_norm_ uses: same norm
            norm = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0, False, None)
        self._grad_norm = norm
        loss_sum, count, bad, self.stop_requested = self._exchange(None if norm is None else ~torch.isfinite(norm))
        loss = loss_sum / max(count, 1.0)
        # logged once per optimizer step, as Python numbers (no device tensor for the progress bar to read)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=1)
        self.log("train/lr", float(optimizer.param_groups[0]["lr"]), on_step=True, on_epoch=False, batch_size=1)
        if not bad:
            if self.nonfinite == "skip":
                self.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False)
            return
        total = self.plan.optimizer_steps if self.plan is not None else self.trainer.max_steps
        where = f"at optimizer step {self.global_step + 1} of {total} (epoch {self.current_epoch})"
        error: type[UserError]
        if not math.isfinite(loss):
            what, error = f"train/loss is {loss} {where}", NonFiniteLossError
        else:
            what, error = f"non-finite gradient {where}: {self._first_nonfinite(params)}", NonFiniteGradientError
        if self.nonfinite == "stop":
            ckpt = getattr(self.trainer.checkpoint_callback, "last_model_path", "") or "none written yet"
            raise error(
                f"{what}; run stopped before the step, last good checkpoint: {ckpt}; lower "
                "model.optimizer.base_lr or set model.grad_clip_norm (model.nonfinite: skip skips such steps)"
            )
        self.zero_grad(set_to_none=True)  # no gradient: the optimizer leaves every tensor and its state alone
        self._skip_step = True
        self.skipped_steps += 1
        if self.trainer.is_global_zero:
            import sys

            print(
                f"resnet-lamb: warning: {what}; step skipped (model.nonfinite: skip), "
                f"{self.skipped_steps} skipped so far",
                file=sys.stderr,
                flush=True,
            )
        self.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False)

    def _first_nonfinite(self, params: list) -> str:
        """Failure path only: the non-finite gradient nearest the output (backward reaches it first)."""
        names = {id(p): n for n, p in self.named_parameters()}
        order = {key: i for i, key in enumerate(names)}  # registration (forward) order
        bad = [p for p in params if not bool(torch.isfinite(p.grad).all())]
        if not bad:
            return "every gradient tensor is finite, their global norm overflowed"
        first = max(bad, key=lambda p: order.get(id(p), -1))
        kind = "nan" if bool(torch.isnan(first.grad).any()) else "inf"
        return f"{kind} first in {names.get(id(first), '?')} ({len(bad)} of {len(params)} gradient tensors non-finite)"

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        if self._skip_step:
            return
        if gradient_clip_val:  # trainer.gradient_clip_val still works if a user sets it
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        if self.grad_clip_norm:
            from lightning.pytorch.plugins.precision import MixedPrecision, Precision

            plugin = self.trainer.precision_plugin
            if self._grad_norm is not None and not gradient_clip_val and type(plugin) in (Precision, MixedPrecision):
                # clip_grad_norm_ without computing the norm a second time
                params = [p for g in optimizer.param_groups for p in g["params"]]
                torch.nn.utils.clip_grads_with_norm_(params, self.grad_clip_norm, self._grad_norm)
            else:
                self.clip_gradients(optimizer, gradient_clip_val=self.grad_clip_norm, gradient_clip_algorithm="norm")

    # ---------------------------------------------------------------------------- eval
    def validation_step(self, batch, batch_idx: int) -> None:
        images, labels = batch
        labels = labels.reshape(-1).long()
        logits = self(images).float()
        self.val_loss_sum.update(self._loss_sum(logits, labels))
        self.val_count.update((labels >= 0).sum())
        self.val_top1.update(logits, labels)
        self.val_top5.update(logits, labels)

    def on_validation_epoch_end(self) -> None:
        count = self.val_count.compute()
        self.log_dict(
            {
                "val/top1": self.val_top1.compute(),
                "val/top5": self.val_top5.compute(),
                "val/loss": self.val_loss_sum.compute() / count.clamp(min=1),
            },
            prog_bar=True,
        )
        for m in (self.val_top1, self.val_top5, self.val_loss_sum, self.val_count):
            m.reset()

    test_step = validation_step
    on_test_epoch_end = on_validation_epoch_end

    # ---------------------------------------------------------------------------- optim
    def derive_plan(self):
        """The recipe's numbers for this trainer (world size) and datamodule (batches, images)."""
        from resnet_lamb.recipe import derive_plan

        dm = self.trainer.datamodule
        return derive_plan(
            optimizer=self.optimizer_spec,
            schedule=self.schedule_spec,
            global_batch=dm.global_batch,
            micro_batch=dm.micro_batch,
            world_size=self.trainer.world_size,
            epochs=self.trainer.max_epochs,
            train_images=dm.train_images,
            epoch_mode=getattr(dm, "epoch_mode", "padded"),
            bn_batch=self.bn_batch,
        )

    def configure_optimizers(self):
        from resnet_lamb.optim import build_optimizer
        from resnet_lamb.optim.schedules import build_scheduler

        self.plan = self.run_plan if self.run_plan is not None else self.derive_plan()
        spec = self.optimizer_spec
        try:
            optimizer = build_optimizer(
                spec.name,
                self.model,
                lr=self.plan.lr,
                weight_decay=spec.weight_decay,
                param_rule=spec.param_rule,
                **dict(spec.kwargs or {}),
            )
        except ValueError as err:  # unknown optimizer option etc.: the user's recipe
            raise RecipeError(f"model.optimizer: {err}") from None
        scheduler = build_scheduler(optimizer, self.schedule_spec, self.plan)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    # ---------------------------------------------------------------------------- resume
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rng_states"] = _rng_state()
        plan = self.run_plan or self.plan
        checkpoint["resnet_lamb"] = {
            "recipe": self._recipe_identity(),
            "plan": None if plan is None else plan.to_dict(),
            "skipped_steps": self.skipped_steps,
        }
        save_optimizer_states(checkpoint, self.optimizer_spec.name)  # in a form weights_only loads

    def _recipe_identity(self) -> dict[str, Any] | None:
        plan = self.run_plan or self.plan
        if plan is not None:
            return recipe_identity(
                self.optimizer_spec, self.schedule_spec, plan.global_batch, plan.epochs, plan.epoch_mode
            )
        dm = getattr(getattr(self, "_trainer", None), "datamodule", None)
        if dm is None or getattr(dm, "global_batch", None) is None:
            return None
        epochs = self.trainer.max_epochs
        assert epochs is not None  # recipes require trainer.max_epochs (resnet_lamb.recipe.validate_recipe)
        return recipe_identity(
            self.optimizer_spec,
            self.schedule_spec,
            dm.global_batch,
            epochs,
            getattr(dm, "epoch_mode", "padded"),
        )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        load_optimizer_states(checkpoint, self.optimizer_spec.name)
        self._pending_rng = checkpoint.get("rng_states")
        restate_epoch_progress(checkpoint, getattr(getattr(self, "_trainer", None), "datamodule", None))
        ours = checkpoint.get("resnet_lamb") or {}
        self.skipped_steps = int(ours.get("skipped_steps", 0))
        saved, now = ours.get("recipe"), self._recipe_identity()
        self._forced = None
        fitting = str(getattr(getattr(self._trainer, "state", None), "fn", "fit")) in ("fit", "TrainerFn.FITTING")
        if (
            not fitting
            or saved is None
            or now is None
            or not recipe_changes(saved, now)
            or not checkpoint.get("optimizer_states")
        ):
            return
        # a forced resume (``--run.force_resume``; the CLI refuses otherwise): the new recipe's
        # hyperparameters and LRs at the restored step; the saved optimizer state only for the same
        # optimizer and parameter groups (another optimizer's state would not load)
        same = all(saved.get(k) == now.get(k) for k in ("model.optimizer.name", "model.optimizer.param_rule"))
        scheds = checkpoint.get("lr_schedulers") or []
        self._forced = {
            "optimizer_states": checkpoint["optimizer_states"] if same else None,
            "last_epoch": [s.get("last_epoch") for s in scheds],
        }
        checkpoint["optimizer_states"], checkpoint["lr_schedulers"] = [], []
        changed = recipe_changes(saved, now)
        if getattr(self._trainer, "is_global_zero", True):
            import sys

            print(
                f"resnet-lamb: resuming with another recipe ({', '.join(changed)}): "
                f"{'optimizer state kept' if same else 'fresh optimizer state'}, the new LR schedule from the "
                "restored step",
                file=sys.stderr,
                flush=True,
            )

    def _apply_forced_resume(self) -> None:
        forced, self._forced = self._forced, None
        if not forced:
            return
        for i, opt in enumerate(self.trainer.optimizers):
            if forced["optimizer_states"] and i < len(forced["optimizer_states"]):
                new = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
                opt.load_state_dict(forced["optimizer_states"][i])
                for g, hyper in zip(opt.param_groups, new, strict=True):
                    g.update(hyper)  # the new recipe's weight decay, betas, ...
        for cfg, last in zip(self.trainer.lr_scheduler_configs, forced["last_epoch"], strict=False):
            s = cfg.scheduler
            if last is None or not hasattr(s, "lr_lambdas"):
                continue
            s.last_epoch = last
            for g, base, fn in zip(s.optimizer.param_groups, s.base_lrs, s.lr_lambdas, strict=True):
                lr = base * fn(last)
                if torch.is_tensor(g["lr"]):
                    g["lr"].fill_(lr)
                else:
                    g["lr"] = lr
            s._last_lr = [float(g["lr"]) for g in s.optimizer.param_groups]

    def on_train_start(self) -> None:
        # restored here, not in on_load_checkpoint: nothing between this hook and the first batch
        # draws random numbers differently in a resumed run than in an uninterrupted one
        if self._pending_rng is not None:
            _set_rng_state(self._pending_rng)
            self._pending_rng = None
        self._apply_forced_resume()
