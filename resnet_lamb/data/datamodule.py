"""``ImageDataModule``: one LightningDataModule over the backends (dali | torchvision | memory |
synthetic | auto).

Batches: ``(images, labels)``, images float (B, 3, H, W) normalised with ImageNet mean/std (NHWC
memory when ``channels_last``), labels int64 (B,), label -1 = padding or a skipped corrupt image.

Per rank per epoch the train loader yields exactly ``steps_per_epoch * accumulation`` micro-batches
(``steps_per_epoch = ceil(train_images / global_batch)``, ``accumulation = global_batch /
(micro_batch * world_size)``), in the order of :func:`resnet_lamb.data.sampling.epoch_plan`:
``epoch_mode: padded``: every image once across all ranks (a permutation seeded by
``(seed, epoch)``, the same on every rank, sharded by global rank; the last global batch is padded
with repeats labelled -1); ``full_batch``: full global batches cut from one stream of per-pass
permutations (no padding; the run's ``max_steps`` ends it). Validation:
``ceil(val_images / (micro_batch * world_size))`` batches per rank, every image exactly once across
ranks, padding labelled -1.

World size and rank come from the trainer at ``setup`` when attached, else from torch.distributed
when initialised, else 1 / 0.

The data root is read through its index when it has one (:mod:`resnet_lamb.data.index`: every rank
reads it, rank 0 checks it against the tree; ``index_check`` compares every entry), else listed
(:mod:`resnet_lamb.data.folder`) or, for tar shards, their headers read. With more than one rank,
``setup`` makes every rank use rank 0's view: a listing is made on rank 0 only and broadcast (the
ranks cannot disagree about the file list), an index is confirmed by its content hash, and an error
found on rank 0 is raised on every rank. The epoch (which permutation) comes from ``trainer.current_epoch``,
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
import sys

import lightning as L

from resnet_lamb.data.common import LoaderSettings, torch_dtype
from resnet_lamb.data.folder import (  # noqa: F401 (re-exported)
    BACKENDS,
    IMAGENET,
    Folder,
    check_counts,
    require_root,
)
from resnet_lamb.errors import DataError, RecipeError


class ImageDataModule(L.LightningDataModule):
    """Train and validation images of one data set, sharded over ranks, in global batches."""

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
        epoch_mode: str = "padded",
        index_check: bool = False,
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
            train_images: training images; counted from root when null, else must match it
                (synthetic: ImageNet's count when null). ``fit`` records the count it used in config.yaml.
            val_images: validation images; counted from root when null, else must match it.
            num_classes: classes; counted from root when null, else must match it; ``fit`` links
                ``model.num_classes`` to it.
            seed: seeds the per-epoch permutation (seed, epoch) and the augmentations.
            prefetch: batches prefetched (DALI prefetch_queue_depth; DataLoader prefetch_factor).
            epoch_mode: padded | full_batch, how training batches are cut from the data
                (:mod:`resnet_lamb.data.sampling`); validation is the same in both.
            index_check: at start-up, compare every entry of the root's index with the tree (re-list
                the folder, or read every shard's headers) instead of the cheap checks only.
        """
        super().__init__()
        self.save_hyperparameters()
        if backend not in BACKENDS:
            raise RecipeError(f"data.backend: {backend!r} is not one of {' | '.join(BACKENDS)}")
        for key, value in (("global_batch", global_batch), ("micro_batch", micro_batch), ("image_size", image_size)):
            if not isinstance(value, int) or value <= 0:
                raise RecipeError(f"data.{key}: {value!r} must be a positive integer")
        from resnet_lamb.data.sampling import EPOCH_MODES

        if epoch_mode not in EPOCH_MODES:
            raise RecipeError(
                f"data.epoch_mode: unknown epoch mode {epoch_mode!r}; choose one of {', '.join(EPOCH_MODES)}"
            )
        require_root(backend, root)
        self.backend_requested = backend
        self.root = root
        self.global_batch, self.micro_batch, self.image_size = global_batch, micro_batch, image_size
        self.workers, self.channels_last, self.dtype = workers, channels_last, torch_dtype(dtype)
        self.seed, self.prefetch, self.epoch_mode = seed, prefetch, epoch_mode
        self.index_check = index_check
        self._shared_world = 1  # world size whose ranks already agreed on the folder
        self._given = {"train_images": train_images, "val_images": val_images, "num_classes": num_classes}
        self._folder: Folder | None = None
        self._epoch = 0
        self._loaders: dict[str, object] = {}
        self._settings: LoaderSettings | None = None
        self.skipped: list[str] = []
        self.world_size, self.global_rank = self._dist_from_torch()
        self._backend: str | None = None

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
                    print(
                        "resnet-lamb: DALI not installed (pip install '.[dali]'); using torchvision's DataLoader",
                        file=sys.stderr,
                    )
            elif b == "dali" and not dali.available():
                raise DataError(
                    "data.backend: dali, but nvidia.dali is not importable; pip install '.[dali]' "
                    "(nvidia-dali-cuda130) or set data.backend: torchvision"
                )
            self._backend = b
        return self._backend

    def validate(self, folder=None):
        """Read the root (its index, else a listing) and check the given counts; idempotent.
        ``folder``: the :func:`resnet_lamb.data.index.load_root` of ``root`` when the caller has it."""
        if self.backend_requested == "synthetic" or self._folder is not None:
            return
        from resnet_lamb.data.index import load_root

        folder = (
            folder
            if folder is not None
            else load_root(self.root, check=self.global_rank == 0, full=self.index_check and self.global_rank == 0)
        )
        check_counts(folder, self._given, self.root)
        self._folder = folder

    def _share_folder(self):
        """More than one rank: every rank takes rank 0's view of the root (see the module's docstring).
        One broadcast from rank 0, on every rank, once per world size."""
        import torch.distributed as dist

        if self.backend_requested == "synthetic" or self.world_size == self._shared_world:
            return
        if not (dist.is_available() and dist.is_initialized()):
            self.validate()  # no process group (a trainer stand-in): nothing to share with
            return
        from resnet_lamb.data.index import load_root
        from resnet_lamb.errors import UserError

        held, message = self._folder, None
        if self.global_rank == 0:
            try:
                if held is None:
                    held = load_root(self.root, check=True, full=self.index_check)
                message = ("index", held.index_hash) if held.index_hash else ("listing", held)
            except UserError as err:
                message = ("error", str(err))
        message = self._broadcast(message)
        kind, value = message
        if kind == "error":
            raise DataError(value)
        if kind == "listing":
            folder = value
        else:
            folder = held if held is not None and held.index_hash == value else load_root(self.root, check=False)
            if folder.index_hash != value:
                raise DataError(
                    f"{self.root}: its index changed while the ranks started (rank 0 read another one); "
                    "start the run again once nothing writes to the data root"
                )
        check_counts(folder, self._given, self.root)
        self._folder = folder
        self._close_loaders()
        self._shared_world = self.world_size

    def _validated_folder(self) -> Folder:
        self.validate()
        assert self._folder is not None  # validate() reads it for every backend but synthetic
        return self._folder

    def _broadcast(self, obj):
        strategy = getattr(getattr(self, "trainer", None), "strategy", None)
        if strategy is not None and hasattr(strategy, "broadcast"):
            return strategy.broadcast(obj, src=0)
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _count(self, key: str) -> int:
        if self.backend_requested == "synthetic":
            given = self._given[key]
            return given if given is not None else IMAGENET[key]
        folder = self._validated_folder()
        if key == "num_classes":
            return len(folder.classes)
        return len(folder.splits["train" if key == "train_images" else "val"])

    # ---- derived numbers -------------------------------------------------------------------------
    plan = None  # the run's resnet_lamb.recipe.Plan, set by the CLI: its accumulation and steps are used

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
        return list(self._validated_folder().classes)

    @property
    def accumulation(self) -> int:
        plan = self.plan
        if plan is not None and (plan.micro_batch, plan.world_size) == (self.micro_batch, self.world_size):
            return int(plan.accumulation)
        slots = self.micro_batch * self.world_size
        if self.global_batch % slots:
            raise RecipeError(
                f"data.global_batch: {self.global_batch} is not a multiple of micro_batch x world size "
                f"= {self.micro_batch} x {self.world_size}; change data.micro_batch or the device count"
            )
        return self.global_batch // slots

    @property
    def steps_per_epoch(self) -> int:
        if self.plan is not None:
            return int(self.plan.steps_per_epoch)
        return math.ceil(self.train_images / self.global_batch)

    # ---- Lightning hooks -------------------------------------------------------------------------
    def setup(self, stage: str | None = None):
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            world, rank = trainer.world_size, trainer.global_rank
        else:
            world, rank = self._dist_from_torch()
        if (world, rank) != (self.world_size, self.global_rank):
            self._close_loaders()
        self.world_size, self.global_rank = world, rank
        if world > 1:
            self._share_folder()
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
        _ = self.accumulation
        kw = dict(
            train=train,
            n=self.train_images if train else self.val_images,
            epoch_fn=self._epoch_for_loader if train else None,
        )
        loader: object
        if self.backend == "synthetic":
            from resnet_lamb.data.synthetic import SyntheticLoader

            loader = SyntheticLoader(self._loader_settings(), num_classes=self.num_classes, **kw)
        else:
            from resnet_lamb.data import dali, memory, torchvision

            backends: dict[str, type] = {
                "dali": dali.DaliLoader,
                "memory": memory.MemoryLoader,
                "torchvision": torchvision.TorchvisionLoader,
            }
            split_images = self._validated_folder().splits[split]
            loader = backends[self.backend](split_images, self._loader_settings(), on_skip=self._on_skip, **kw)
        self._loaders[split] = loader
        for path in self.skipped:  # restored from a checkpoint or found by another rank: skip without a retry
            self._mark_known_bad(path)
        return loader

    def _loader_settings(self) -> LoaderSettings:
        """What every backend's loader takes, the same for both splits (until the loaders are closed)."""
        if self._settings is None:
            self._settings = LoaderSettings(
                global_batch=self.global_batch,
                micro_batch=self.micro_batch,
                world_size=self.world_size,
                rank=self.global_rank,
                seed=self.seed,
                image_size=self.image_size,
                workers=self.workers,
                channels_last=self.channels_last,
                dtype=self.dtype,
                prefetch=self.prefetch,
                epoch_mode=self.epoch_mode,
            )
        return self._settings

    def _mark_known_bad(self, path: str) -> None:
        """Tell the loader of ``path``'s split (if made) that the image is bad."""
        for split, loader in self._loaders.items():
            bad = getattr(loader, "bad", None)
            if bad is None or self._folder is None:
                continue
            i = self._folder.splits[split].find(path)
            if i is not None:
                bad.add(i)

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

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """A training micro-batch of padding only (label -1 everywhere: most of the last step when
        the data set is smaller than the global batch) adds exactly zero gradient: it goes on empty
        when the module takes that (``skip_padding``), told apart from labels still on the host (no
        device sync) and never with SyncBatchNorm (its forward is a collective every rank joins)."""
        trainer = getattr(self, "trainer", None)
        module = getattr(trainer, "lightning_module", None)
        if not (
            trainer is not None
            and trainer.training
            and module is not None
            and getattr(module, "skip_padding", False)
            and isinstance(batch, (list, tuple))
            and len(batch) == 2
        ):  # (the model summary's input)
            return batch
        from torch.nn import SyncBatchNorm

        images, labels = batch
        if (
            labels.device.type != "cpu"
            or not labels.numel()
            or bool((labels >= 0).any())
            or any(isinstance(m, SyncBatchNorm) for m in module.modules())
        ):
            return batch
        return images[:0], labels[:0]

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
        """Free what the loaders hold (DALI pipelines and their threads, DataLoader worker processes)
        now, not at garbage collection."""
        for loader in self._loaders.values():
            close = getattr(loader, "close", None)
            if close is not None:
                close()
        self._loaders.clear()
        self._settings = None

    def state_dict(self) -> dict:
        self.share_skipped()  # Lightning builds the checkpoint on every rank: the file lists them all
        return {"epoch": self.current_epoch(), "skipped": list(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        self._epoch = int(state.get("epoch", 0))
        self.skipped = list(state.get("skipped", []))
