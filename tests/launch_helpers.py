"""Test-only Lightning callback for tests/test_launch.py, loaded by the recipe as
``trainer.callbacks: [{class_path: launch_helpers.Recorder, init_args: {...}}]`` (tests/ on PYTHONPATH).

Per rank it records what the rank was fed and writes ``<out>/rank<R>.json`` at the end of fit:
- ``train[epoch]``: the file indices and real-mask of the rank's shard, taken from the batch sampler
  that feeds the live DataLoader (its own rank/world-size arguments), and the labels of every batch
  the rank trained on (the test checks they are the files' labels at those indices, -1 on padding);
- ``val``: the same for the validation split, and ``val_count``, the model's validation sample
  counter after its cross-rank sync (the number of images val/top1 was computed over).
It also writes ``<out>/pid-rank<R>-attempt<A>`` (A = torchrun's restart count) when training
starts, so a test can SIGKILL one worker, and can sleep after each batch to widen that window.

``fixed_crops``: train on the deterministic validation transform (resize + centre crop) instead of
the random crops, so that the same image is the same tensor whichever process reads it (the
equivalence test needs identical micro-batches in every split).

``grads``: for the first optimizer step, rank 0 writes ``<out>/grads.pt``: ``reduced``, each
parameter's gradient as the optimizer sees it (accumulated over the rank's micro-batches and
all-reduced), and ``abs_sum``, the sum over the rank's micro-batches of the absolute value of each
micro-batch's contribution (a tensor hook sees it before it is added to ``.grad``).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import lightning.pytorch as pl


class Recorder(pl.Callback):
    def __init__(self, out: str, fixed_crops: bool = False, sleep: float = 0.0, grads: bool = False):
        self.out, self.fixed_crops, self.sleep, self.grads = Path(out), fixed_crops, sleep, grads
        self.record: dict = {"train": {}, "val": {}}
        self.abs_sum: dict = {}

    def _loader(self, trainer, split):
        dm = trainer.datamodule
        return dm.train_dataloader() if split == "train" else dm.val_dataloader()

    def setup(self, trainer, pl_module, stage):
        self.out.mkdir(parents=True, exist_ok=True)
        if self.fixed_crops and stage == "fit":
            from resnet_lamb.data.torchvision import transforms

            loader = self._loader(trainer, "train")  # cached by the datamodule: the one Lightning iterates
            loader._dataset.transform = transforms(False, trainer.datamodule.image_size)

    def on_train_start(self, trainer, pl_module):
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        (self.out / f"pid-rank{trainer.global_rank}-attempt{attempt}").write_text(str(os.getpid()))
        if self.grads and trainer.global_step == 0:
            for name, p in pl_module.named_parameters():
                p.register_hook(lambda g, name=name: self._contribution(trainer, name, g))

    def _contribution(self, trainer, name, grad):
        if trainer.global_step == 0:
            self.abs_sum[name] = self.abs_sum.get(name, 0) + grad.detach().abs()
        return grad

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.grads and trainer.global_step == 0 and trainer.global_rank == 0:
            import torch

            reduced = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters()}
            torch.save({"reduced": reduced, "abs_sum": self.abs_sum}, self.out / "grads.pt")

    def _shard(self, trainer, split, epoch):
        from resnet_lamb.data.sampling import epoch_plan

        sampler = self._loader(trainer, split)._sampler
        index, real = epoch_plan(sampler.n, **sampler.plan_kw, epoch=epoch)
        return {"index": index.tolist(), "real": real.tolist(), "rank": sampler.plan_kw["rank"],
                "world_size": sampler.plan_kw["world_size"], "labels": []}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        epoch = str(trainer.current_epoch)
        if epoch not in self.record["train"]:
            self.record["train"][epoch] = self._shard(trainer, "train", trainer.current_epoch)
        self.record["train"][epoch]["labels"] += batch[1].reshape(-1).tolist()
        if self.sleep:
            time.sleep(self.sleep)

    def on_validation_epoch_start(self, trainer, pl_module):
        self.record["val"] = self._shard(trainer, "val", 0)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.record["val"]["labels"] += batch[1].reshape(-1).tolist()

    def on_validation_epoch_end(self, trainer, pl_module):
        # callbacks run before the module's hook, which computes (synced) and resets the metrics
        self.record["val_count"] = int(pl_module.val_count.compute().item())

    def on_fit_end(self, trainer, pl_module):
        self.record["world_size"] = trainer.world_size
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.record))
