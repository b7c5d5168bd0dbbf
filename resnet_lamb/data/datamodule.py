"""``ImageDataModule``: one LightningDataModule over the backends (dali | torchvision | memory |
synthetic | auto).

Batches: ``(images, labels)``, images float (B, 3, H, W) normalised with ImageNet mean/std (NHWC
memory when ``channels_last``), labels int64 (B,), label -1 = padding or a skipped corrupt image.

Per rank per epoch the train loader yields exactly ``steps_per_epoch * accumulation`` micro-batches
(``steps_per_epoch = ceil(train_images / global_batch)``, ``accumulation = global_batch /
(micro_batch * world_size)``), every image once across all ranks (a permutation seeded by
``seed + epoch``, the same on every rank, sharded by global rank; the last global batch is padded
with repeats labelled -1). Validation: ``ceil(val_images / (micro_batch * world_size))`` batches per
rank, every image exactly once across ranks, padding labelled -1.

World size and rank come from the trainer at ``setup`` when attached, else from torch.distributed
when initialised, else 1 / 0. The epoch (which permutation) comes from ``trainer.current_epoch``,
or without a trainer from the loader's own count; ``state_dict()`` stores it, so a resumed run
continues at the epoch boundary with the right permutation.

Corrupt images: skipped and counted (see :mod:`resnet_lamb.data.folder`); ``skipped`` lists them.
Known-bad files are remembered per run: a loader's DataLoader workers share one set (shared
memory), the ranks exchange what they found at the start of every training epoch and whenever a
checkpoint is written (``state_dict``, called on every rank), so every rank skips them and the
checkpoint lists them all; a resumed run starts with them skipped.

Mid-epoch resume: the training loaders follow Lightning's stateful-loader protocol
(:class:`resnet_lamb.data.common.EpochPosition`), so a checkpoint written inside an epoch (a
SIGUSR1/SIGTERM save) resumes at its next batch.
"""

from __future__ import annotations

import math
import os
import sys

import lightning as L

from resnet_lamb.data.common import torch_dtype
from resnet_lamb.errors import DataError, RecipeError

BACKENDS = ("dali", "torchvision", "memory", "synthetic", "auto")
# ImageNet-1k sizes, used by the synthetic backend when the counts are not given
IMAGENET = {"train_images": 1281167, "val_images": 50000, "num_classes": 1000}


def check_counts(folder, given: dict, root) -> None:
    """The image and class counts a recipe states (``given``, None = count it) against the folder."""
    found = {"train_images": len(folder.splits["train"]), "val_images": len(folder.splits["val"]),
             "num_classes": len(folder.classes)}
    for key, value in given.items():
        if value is not None and value != found[key]:
            raise DataError(f"data.{key}: {value} given but {root} holds {found[key]}; "
                            f"set data.{key}: {found[key]} (or null to count it)")


class ImageDataModule(L.LightningDataModule):
    def __init__(
        self,
        backend: str = "auto",
        root: str | None = None,
        global_batch: int = 512,
        micro_batch: int = 256,
        image_size: int = 224,
        workers: int = 8,
        channels_last: bool = False,
        dtype: str = "float32",
        train_images: int | None = None,
        val_images: int | None = None,
        num_classes: int | None = None,
        seed: int = 0,
        prefetch: int = 2,
    ):
        """
        Args:
            backend: dali | torchvision | memory | synthetic | auto (dali when importable, else
                torchvision). memory: a small data set decoded once into RAM, no augmentation (proxies).
            root: folder with train/<class>/* and val/<class>/* (not needed for synthetic).
            global_batch: images per optimizer step across all devices (the paper's batch).
            micro_batch: images per device per forward.
            image_size: crop size (224 for ImageNet; smaller for proxies).
            workers: DALI CPU threads / DataLoader worker processes, per rank.
            channels_last: NHWC memory for images (shape stays NCHW).
            dtype: float32 | bfloat16 | float16 for images.
            train_images, val_images, num_classes: counted from root when None; when given they must
                match the folder (synthetic: ImageNet's sizes when None).
            seed: seeds the per-epoch permutation (seed, epoch) and the augmentations.
            prefetch: batches prefetched (DALI prefetch_queue_depth; DataLoader prefetch_factor).
        """
        super().__init__()
        self.save_hyperparameters()
        if backend not in BACKENDS:
            raise RecipeError(f"data.backend: {backend!r} is not one of {' | '.join(BACKENDS)}")
        for key, value in (("global_batch", global_batch), ("micro_batch", micro_batch),
                           ("image_size", image_size)):
            if not isinstance(value, int) or value <= 0:
                raise RecipeError(f"data.{key}: {value!r} must be a positive integer")
        if backend != "synthetic" and not root:
            raise DataError(f"data.root: not set; backend {backend} reads root/train/<class>/ and root/val/<class>/ "
                            "(`resnet-lamb prepare DATASET --out DIR` writes them), or use backend: synthetic")
        self.backend_requested = backend
        self.root = root
        self.global_batch, self.micro_batch, self.image_size = global_batch, micro_batch, image_size
        self.workers, self.channels_last, self.dtype = workers, channels_last, torch_dtype(dtype)
        self.seed, self.prefetch = seed, prefetch
        self._given = {"train_images": train_images, "val_images": val_images, "num_classes": num_classes}
        self._folder = None
        self._epoch = 0
        self._loaders: dict[str, object] = {}
        self.skipped: list[str] = []
        self.world_size, self.global_rank = self._dist_from_torch()
        self._backend = None

    # ---- world, backend, folder -------------------------------------------------------------
    @staticmethod
    def _dist_from_torch() -> tuple[int, int]:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(), dist.get_rank()
        return 1, 0

    @property
    def backend(self) -> str:
        """The backend in use (``auto`` resolved)."""
        if self._backend is None:
            from resnet_lamb.data import dali

            b = self.backend_requested
            if b == "auto":
                b = "dali" if dali.available() else "torchvision"
                if b == "torchvision":
                    print("resnet-lamb: DALI not installed (pip install '.[dali]'); using torchvision's DataLoader",
                          file=sys.stderr)
            elif b == "dali" and not dali.available():
                raise DataError("data.backend: dali, but nvidia.dali is not importable; pip install '.[dali]' "
                                "(nvidia-dali-cuda130) or set data.backend: torchvision")
            self._backend = b
        return self._backend

    def validate(self, folder=None):
        """Check the folder layout (cheap: directory listings) and the given counts; idempotent.
        ``folder``: the :func:`validate_root` of ``root`` when the caller already listed it."""
        if self.backend_requested == "synthetic" or self._folder is not None:
            return
        from resnet_lamb.data.folder import validate_root

        folder = folder if folder is not None else validate_root(self.root)
        check_counts(folder, self._given, self.root)
        self._folder = folder

    def _count(self, key: str) -> int:
        if self.backend_requested == "synthetic":
            return self._given[key] if self._given[key] is not None else IMAGENET[key]
        self.validate()
        return len(self._folder.splits["train" if key == "train_images" else "val"]) if key != "num_classes" \
            else len(self._folder.classes)

    # ---- derived numbers -------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return self._count("num_classes")

    @property
    def train_images(self) -> int:
        return self._count("train_images")

    @property
    def val_images(self) -> int:
        return self._count("val_images")

    @property
    def classes(self) -> list[str]:
        if self.backend_requested == "synthetic":
            return [str(i) for i in range(self.num_classes)]
        self.validate()
        return list(self._folder.classes)

    @property
    def accumulation(self) -> int:
        slots = self.micro_batch * self.world_size
        if self.global_batch % slots:
            raise RecipeError(f"data.global_batch: {self.global_batch} is not a multiple of micro_batch x world size "
                              f"= {self.micro_batch} x {self.world_size}; change data.micro_batch or the device count")
        return self.global_batch // slots

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.train_images / self.global_batch)

    # ---- Lightning hooks -------------------------------------------------------------------------
    def prepare_data(self):
        self.validate()

    def setup(self, stage: str | None = None):
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            world, rank = trainer.world_size, trainer.global_rank
        else:
            world, rank = self._dist_from_torch()
        if (world, rank) != (self.world_size, self.global_rank):
            self._close_loaders()
        self.world_size, self.global_rank = world, rank
        self.validate()
        _ = self.accumulation, self.backend  # fail early: inexact accumulation, missing DALI

    def current_epoch(self) -> int:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return int(trainer.current_epoch)
        return self._epoch

    def _loader(self, split: str):
        if split in self._loaders:
            return self._loaders[split]
        train = split == "train"
        kw = dict(train=train, n=self.train_images if train else self.val_images, global_batch=self.global_batch,
                  micro_batch=self.micro_batch, world_size=self.world_size, seed=self.seed,
                  image_size=self.image_size, channels_last=self.channels_last, dtype=self.dtype,
                  epoch_fn=self._epoch_for_loader if train else None)
        _ = self.accumulation
        if self.backend == "synthetic":
            from resnet_lamb.data.synthetic import SyntheticLoader

            loader = SyntheticLoader(num_classes=self.num_classes, **kw)
        else:
            kw.update(split=self._folder.splits[split], rank=self.global_rank, workers=self.workers,
                      prefetch=self.prefetch, on_skip=self._on_skip)
            if self.backend == "dali":
                from resnet_lamb.data.dali import DaliLoader

                loader = DaliLoader(**kw)
            elif self.backend == "memory":
                from resnet_lamb.data.memory import MemoryLoader

                loader = MemoryLoader(**kw)
            else:
                from resnet_lamb.data.torchvision import TorchvisionLoader

                loader = TorchvisionLoader(**kw)
        self._loaders[split] = loader
        for path in self.skipped:  # restored from a checkpoint or found by another rank: skip without a retry
            self._mark_known_bad(path)
        return loader

    def _mark_known_bad(self, path: str) -> None:
        """Tell the loader of ``path``'s split (if made) that the file is bad."""
        import numpy as np

        for split, loader in self._loaders.items():
            bad = getattr(loader, "bad", None)
            if bad is None or self._folder is None:
                continue
            folder = self._folder.splits[split]
            rel = os.path.relpath(path, folder.root)
            if rel.startswith(".."):
                continue
            hits = np.flatnonzero(folder.paths == rel.encode())
            if len(hits):
                bad.add(int(hits[0]))

    def share_skipped(self) -> None:
        """Every rank's known-bad files to every rank (a collective: every rank calls it at the same
        point, the start of a training epoch or a checkpoint write); no-op in one process."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return
        found: list = [None] * dist.get_world_size()
        dist.all_gather_object(found, list(self.skipped))
        for paths in found:
            for path in paths or []:
                if path not in self.skipped:
                    self.skipped.append(path)
                    self._mark_known_bad(path)

    def _epoch_for_loader(self) -> int:
        self.share_skipped()  # each rank calls iter() on its train loader at the start of every epoch
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return int(trainer.current_epoch)
        epoch = self._epoch
        self._epoch += 1  # without a trainer each pass over the train loader is the next epoch
        return epoch

    def _on_skip(self, path: str):
        if path not in self.skipped:
            self.skipped.append(path)

    def train_dataloader(self):
        self.validate()
        return self._loader("train")

    def val_dataloader(self):
        self.validate()
        return self._loader("val")

    def test_dataloader(self):
        return self.val_dataloader()

    def teardown(self, stage: str | None = None) -> None:
        self._close_loaders()

    def _close_loaders(self) -> None:
        """Free what the loaders hold (DALI pipelines and their threads) now, not at garbage collection."""
        for loader in self._loaders.values():
            close = getattr(loader, "close", None)
            if close is not None:
                close()
        self._loaders.clear()

    def state_dict(self) -> dict:
        self.share_skipped()  # Lightning builds the checkpoint on every rank: the file lists them all
        return {"epoch": self.current_epoch(), "skipped": list(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        self._epoch = int(state.get("epoch", 0))
        self.skipped = list(state.get("skipped", []))
