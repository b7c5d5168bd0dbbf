"""Every private torch, Lightning and wandb API the package uses (docs/CONTRACTS.md, "Private APIs"):
each test fails, naming the API, when it disappears or changes signature or behaviour in an
installed version, instead of the run breaking (or a workaround silently doing nothing) later."""
from __future__ import annotations

import inspect

import torch

from resnet_lamb.lightning_internals import CHECKED_WITH


def _params(fn) -> list[str]:
    return [p for p in inspect.signature(fn).parameters if p != "self"]


def need(owner, name: str, api: str, params: list[str] | None = None):
    """``owner.name``, failing with a line naming ``api`` when it is gone or its parameters differ."""
    assert hasattr(owner, name), f"private API gone: {api} (checked with the versions in docs/CONTRACTS.md)"
    fn = getattr(owner, name)
    if params is not None:
        got = _params(fn)
        assert all(p in got for p in params), f"private API changed: {api} takes {got}, the project passes {params}"
    return fn


# ------------------------------------------------------------------------------------ torch
def test_torch_dynamo_maybe_mark_dynamic():
    mark = need(torch._dynamo, "maybe_mark_dynamic", "torch._dynamo.maybe_mark_dynamic", ["t", "index"])
    mark(torch.zeros(4, 2), 0)  # optim/flat.py, optim/layerwise.py, optim/lars.py: flat buffers' block count is dynamic


def test_torch_foreach_copy_zero_add():
    a, b = [torch.zeros(3), torch.zeros(2)], [torch.arange(3.0), torch.ones(2)]
    need(torch, "_foreach_copy_", "torch._foreach_copy_")(a, b)
    assert all(torch.equal(x, y) for x, y in zip(a, b)), "torch._foreach_copy_ no longer copies"
    need(torch, "_foreach_add_", "torch._foreach_add_")(a, b, alpha=2.0)
    assert torch.equal(a[0], 3 * b[0]), "torch._foreach_add_(alpha=) changed"
    need(torch, "_foreach_zero_", "torch._foreach_zero_")(a)
    assert not any(bool(x.any()) for x in a), "torch._foreach_zero_ no longer zeroes"


def test_torch_fused_sgd_keywords_and_update():
    """optim/lars.py: momentum SGD over a whole flat buffer, with the keywords it passes."""
    fused = need(torch, "_fused_sgd_", "torch._fused_sgd_")
    p, g, buf = torch.ones(4), torch.full((4,), 0.5), torch.zeros(4)
    fused([p], [g], [buf], weight_decay=0.0, momentum=0.9, lr=0.1, dampening=0.0, nesterov=False,
          maximize=False, is_first_step=False)
    torch.testing.assert_close(buf, torch.full((4,), 0.5), msg="torch._fused_sgd_: momentum buffer changed meaning")
    torch.testing.assert_close(p, torch.full((4,), 0.95), msg="torch._fused_sgd_: update changed meaning")


def test_torch_fused_adamw_matches_adamw():
    """optim/lamb.py: AdamW over a whole flat buffer, with the keywords it passes."""
    fused = need(torch, "_fused_adamw_", "torch._fused_adamw_")
    torch.manual_seed(0)
    p0, g = torch.randn(6), torch.randn(6)
    p, m, v = p0.clone(), torch.zeros(6), torch.zeros(6)
    fused([p], [g], [m], [v], [], [torch.tensor(1.0)], lr=0.01, beta1=0.9, beta2=0.999, weight_decay=0.1,
          eps=1e-8, amsgrad=False, maximize=False)
    ref = p0.clone().requires_grad_()
    ref.grad = g.clone()
    torch.optim.AdamW([ref], lr=0.01, betas=(0.9, 0.999), weight_decay=0.1, eps=1e-8, foreach=False).step()
    torch.testing.assert_close(p, ref.detach(), msg="torch._fused_adamw_ no longer takes one AdamW step")


def test_torch_norm_base():
    """optim/param_groups.py: every batch and instance norm layer is a _NormBase."""
    from torch import nn

    base = need(nn.modules.batchnorm, "_NormBase", "torch.nn.modules.batchnorm._NormBase")
    for cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm, nn.InstanceNorm2d):
        assert issubclass(cls, base), f"torch.nn.modules.batchnorm._NormBase: {cls.__name__} no longer derives from it"


def test_torch_typed_storage_new_shared():
    """data/torchvision.py: a batch written straight into shared memory (as default_collate does)."""
    first = torch.zeros(2, 3)
    typed = need(first, "_typed_storage", "torch.Tensor._typed_storage")()
    storage = need(typed, "_new_shared", "TypedStorage._new_shared", ["size"])(first.numel() * 4, device=first.device)
    batch = first.new(storage)
    assert batch.is_shared() and batch.numel() == 24, "TypedStorage._new_shared no longer allocates shared memory"


def test_torch_dataloader_iterator_shutdown_workers():
    """data/torchvision.py: ``close()`` ends a DataLoader's persistent workers, also mid-pass."""
    from torch.utils.data import DataLoader

    loader = DataLoader(list(range(4)), num_workers=1, persistent_workers=True)
    it = iter(loader)
    next(it)  # a pass left suspended
    held = need(loader, "_iterator", "DataLoader._iterator")
    assert held is it, "DataLoader._iterator is no longer the persistent workers' iterator"
    need(held, "_shutdown_workers", "_MultiProcessingDataLoaderIter._shutdown_workers", [])()
    assert not any(w.is_alive() for w in held._workers), "_shutdown_workers no longer ends the workers"


def test_torch_scheduler_last_lr():
    """model.py: a forced resume restates the LRs and sets ``_last_lr`` (what get_last_lr returns)."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    assert hasattr(sched, "_last_lr"), "private API gone: torch.optim.lr_scheduler.LRScheduler._last_lr"
    sched._last_lr = [0.25]
    assert sched.get_last_lr() == [0.25], "LRScheduler.get_last_lr no longer returns _last_lr"


def test_torch_storage_weak_ref():
    """optim/flat.py: which flat buffers are still alive."""
    from torch.multiprocessing import reductions

    ref_cls = need(reductions, "StorageWeakRef", "torch.multiprocessing.reductions.StorageWeakRef")
    t = torch.zeros(3)
    ref = ref_cls(t.untyped_storage())
    assert not need(ref, "expired", "StorageWeakRef.expired")(), "StorageWeakRef.expired: a live storage expired"


# ------------------------------------------------------------------------------------ Lightning
def test_lightning_version_checked():
    import lightning

    assert lightning.__version__ == CHECKED_WITH or lightning.__version__.split(".")[:2] == CHECKED_WITH.split(".")[:2], (
        f"lightning {lightning.__version__}: the private APIs of docs/CONTRACTS.md were checked with {CHECKED_WITH}; "
        "run this file, then update CHECKED_WITH")


def test_lightning_model_checkpoint_internals():
    """checkpoints.Checkpoints overrides and calls ModelCheckpoint's save steps."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    for name, params in (("_save_checkpoint", ["trainer", "filepath"]),
                         ("_save_last_checkpoint", ["trainer", "monitor_candidates"]),
                         ("_save_topk_checkpoint", ["trainer", "monitor_candidates"]),
                         ("_monitor_candidates", ["trainer"]),
                         ("_should_skip_saving_checkpoint", ["trainer"])):
        need(ModelCheckpoint, name, f"ModelCheckpoint.{name}", params)
    cb = ModelCheckpoint(every_n_epochs=3)
    assert getattr(cb, "_every_n_epochs", None) == 3, "private API gone: ModelCheckpoint._every_n_epochs"
    assert hasattr(cb, "_last_checkpoint_saved"), "private API gone: ModelCheckpoint._last_checkpoint_saved"


def test_lightning_cli_internals():
    """lightning_cli.RecipeCLI overrides and calls these LightningCLI steps."""
    from lightning.pytorch.cli import LightningCLI

    for name, params in (("_parse_ckpt_path", []), ("_set_seed", []),
                         ("_prepare_subcommand_parser", ["klass", "subcommand"]), ("_parser", ["subcommand"]),
                         ("_get", ["config", "key", "default"]), ("_instantiate_trainer", ["config", "callbacks"])):
        need(LightningCLI, name, f"LightningCLI.{name}", params)
    import argparse

    assert isinstance(argparse.ArgumentParser()._actions, list), "private API gone: argparse ArgumentParser._actions"


def test_lightning_csv_logger_internals(tmp_path):
    """run_logging.AppendingCSVLogger: the writer's existing-file check and file system, the logger's
    cached experiment."""
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter

    need(ExperimentWriter, "_check_log_dir_exists", "ExperimentWriter._check_log_dir_exists", [])
    writer = ExperimentWriter(log_dir=str(tmp_path / "w"))
    for attr in ("_fs", "metrics_keys", "metrics_file_path", "metrics"):
        assert hasattr(writer, attr), f"private API gone: ExperimentWriter.{attr}"
    assert hasattr(CSVLogger(save_dir=str(tmp_path)), "_experiment"), "private API gone: CSVLogger._experiment"


def test_lightning_wandb_logger_init_kwargs(tmp_path):
    """run_logging.wandb_logger drops ``anonymous`` from the kwargs Lightning hands to wandb.init."""
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(save_dir=str(tmp_path), offline=True)
    init = getattr(logger, "_wandb_init", None)
    assert isinstance(init, dict), "private API gone: WandbLogger._wandb_init"
    assert "anonymous" in init, "WandbLogger._wandb_init has no 'anonymous' key: the pop in run_logging is no longer needed"


def test_lightning_module_trainer_reference():
    """model.py reads ``LightningModule._trainer`` where the public ``trainer`` raises when detached."""
    import lightning.pytorch as pl

    assert pl.LightningModule()._trainer is None, "private API gone: LightningModule._trainer"


class _Stateful:
    """A loader with Lightning's stateful-loader protocol (as the project's loaders)."""

    def __init__(self) -> None:
        self.images = 0

    def __iter__(self):
        for _ in range(2):
            self.images += 2
            yield torch.randn(2, 3)

    def __len__(self) -> int:
        return 2

    def state_dict(self) -> dict:
        return {"images": self.images}

    def load_state_dict(self, state: dict) -> None:
        self.images = state["images"]


def test_lightning_loop_state(tmp_path):
    """lightning_internals: the loop attributes it reads and edits, and the fit loop's saved state
    (one real step of a tiny fit, then a checkpoint)."""
    import lightning.pytorch as pl

    from resnet_lamb.lightning_internals import is_last_batch, saved_epoch_progress, skip_sigterm_broadcast

    seen = []

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(3, 1)

        def training_step(self, batch, batch_idx):
            seen.append(is_last_batch(self.trainer))
            return self.lin(batch).sum()

        def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
            seen[-1] = is_last_batch(self.trainer)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = pl.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    loop = trainer.fit_loop.epoch_loop
    assert callable(getattr(loop, "_broadcast_sigterm_tensor", None)), \
        "private API gone: _TrainingEpochLoop._broadcast_sigterm_tensor (lightning_internals.skip_sigterm_broadcast)"
    skip_sigterm_broadcast(trainer)
    assert loop._broadcast_sigterm_tensor() is None
    trainer.fit(Tiny(), train_dataloaders=_Stateful())
    assert seen == [False, True], f"fit_loop.epoch_loop.batch_progress.is_last_batch changed meaning: {seen}"
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    ckpt = torch.load(tmp_path / "c.ckpt", map_location="cpu", weights_only=False)
    saved = saved_epoch_progress(ckpt)
    assert saved is not None, "checkpoint['loops']['fit_loop']['epoch_loop.batch_progress'] is gone"
    progress, loaders = saved
    assert {"ready", "started", "processed", "completed"} <= set(progress.get("current", {})), \
        f"epoch_loop.batch_progress['current'] changed: {progress.get('current')}"
    assert "is_last_batch" in progress, "epoch_loop.batch_progress['is_last_batch'] is gone"
    assert loaders == [{"images": 4}], f"fit_loop state_dict['combined_loader'] changed: {loaders}"


# ------------------------------------------------------------------------------------ wandb
def test_wandb_wbauth_authenticate_session():
    """report (resnet_lamb/report/wandb_runs.py) looks up W&B credentials without wandb's interactive prompt."""
    from wandb.sdk.lib import wbauth

    need(wbauth, "authenticate_session", "wandb.sdk.lib.wbauth.authenticate_session",
         ["host", "source", "no_offline", "prompt", "update_session"])
