"""torchvision backend: PIL decode + torchvision transforms in DataLoader worker processes.

The same transforms as the DALI pipeline (RandomResizedCrop scale 0.08-1 ratio 3/4-4/3, flip,
ImageNet mean/std; val: resize shorter side to 256/224 * size, centre crop), the same order
(:func:`resnet_lamb.data.sampling.epoch_plan`, via a batch sampler) and the same corrupt-image
policy (placeholder + label -1, one warning naming the file). A training sample's random crop and
flip draw from torch's generator seeded by ``(seed, epoch, file)`` for that sample alone (the
process's own generator is left as it was), so they are the same whichever worker process decodes
it and whether the run was resumed, at an epoch boundary or mid-epoch. The loader is returned wrapped in a
plain iterable so that Lightning does not swap its sampler for a DistributedSampler: sharding is
already done here, by global rank.
"""

from __future__ import annotations

import io
import sys

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from resnet_lamb.data.common import (
    MEAN,
    STD,
    BadFiles,
    EpochPosition,
    LoaderSettings,
    mix64,
    placeholder_jpeg,
    sample_key,
    val_resize,
    warn_corrupt,
)
from resnet_lamb.data.sampling import epoch_plan, micro_batches_per_rank
from resnet_lamb.errors import DataError


def transforms(train: bool, image_size: int):
    from torchvision import transforms as T

    if train:
        head = [T.RandomResizedCrop(image_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)), T.RandomHorizontalFlip()]
    else:
        head = [T.Resize(val_resize(image_size)), T.CenterCrop(image_size)]
    return T.Compose([*head, T.ToTensor(), T.Normalize(MEAN, STD)])


class _FolderDataset(Dataset):
    """Item ``(file index, real, epoch)`` -> ``(image, label)``; label -1 for padding, ``-2 - index`` for
    a corrupt file. The bytes come from ``split.read`` (a folder's file, or a shard's member). ``seed``
    (training): the transform's random draws come from ``(seed, epoch, index)``."""

    def __init__(self, split, transform, seed=None):
        self.split, self.transform, self.seed = split, transform, seed
        self.bad = BadFiles(len(split))  # shared with the worker processes: one decode attempt per run

    def __len__(self):
        return len(self.split)

    def __getitem__(self, item):
        from PIL import Image

        i, real, epoch = item
        # label -1: padding or a file already known to be corrupt (seen before, or restored from a
        # checkpoint); -2 - i: file i failed to decode just now, so the main process warns once
        label = -1
        if i not in self.bad:
            try:
                img = Image.open(io.BytesIO(self.split.read(i))).convert("RGB")
                return self._transform(img, i, epoch), int(self.split.labels[i]) if real else -1
            except DataError:  # a shard that is not what its index says: stop, not skip
                raise
            except Exception:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError...
                self.bad.add(i)
                label = -2 - i
        img = Image.open(io.BytesIO(placeholder_jpeg())).convert("RGB")
        return self._transform(img, i, epoch), label

    def _transform(self, img, i: int, epoch: int):
        if self.seed is None:
            return self.transform(img)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(mix64(sample_key(self.seed, epoch) ^ np.uint64(i))[0]) >> 1)
            return self.transform(img)


class _PlanBatchSampler:
    def __init__(self, n, plan_kw, micro_batch):
        self.n, self.plan_kw, self.micro_batch = n, plan_kw, micro_batch
        self.epoch = 0
        self.first = 0  # the batch the next pass starts at (a mid-epoch resume)
        self.length = micro_batches_per_rank(n, **plan_kw)

    def set_epoch(self, epoch: int, first: int = 0):
        self.epoch, self.first = epoch, first

    def __len__(self):
        return self.length

    def __iter__(self):
        index, real = epoch_plan(self.n, **self.plan_kw, epoch=self.epoch)
        m = self.micro_batch
        for b in range(self.first, self.length):
            yield [(int(index[j]), bool(real[j]), self.epoch) for j in range(b * m, (b + 1) * m)]


class _Collate:
    def __init__(self, channels_last: bool):
        self.channels_last = channels_last

    def __call__(self, items):
        first = items[0][0]
        shape = (len(items), *first.shape)
        if torch.utils.data.get_worker_info() is not None:
            # in a worker: write the batch straight into shared memory, as default_collate does (no extra copy)
            storage = first._typed_storage()._new_shared(first.numel() * len(items), device=first.device)
            flat = first.new(storage)
        else:
            flat = first.new_empty(first.numel() * len(items))
        if self.channels_last:  # NHWC memory, NCHW view
            x = flat.view(shape[0], shape[2], shape[3], shape[1]).permute(0, 3, 1, 2)
        else:
            x = flat.view(shape)
        for i, it in enumerate(items):
            x[i].copy_(it[0])
        return x, torch.tensor([it[1] for it in items], dtype=torch.int64)


class TorchvisionLoader(EpochPosition):
    """An iterable of ``(images, labels)`` batches over one split, ``len()`` batches per pass."""

    def __init__(self, split, settings: LoaderSettings, *, train, n, epoch_fn=None, on_skip=None):
        self._sampler = _PlanBatchSampler(n, settings.plan_kwargs(train), settings.micro_batch)
        self.images_per_batch = settings.images_per_batch
        self.split, self.train, self.dtype = split, train, settings.dtype
        self._dataset = _FolderDataset(split, transforms(train, settings.image_size), settings.seed if train else None)
        self.bad = self._dataset.bad  # files known to be corrupt (filled from a checkpoint before the first pass)
        self.epoch_fn = epoch_fn
        self.on_skip = on_skip or (lambda path: None)
        self._warned: set[int] = set()
        self._epochs = 0
        workers = settings.workers
        self.loader: DataLoader | None = DataLoader(
            self._dataset,
            batch_sampler=self._sampler,
            num_workers=workers,
            collate_fn=_Collate(settings.channels_last),
            pin_memory=torch.cuda.is_available(),
            persistent_workers=workers > 0,
            prefetch_factor=max(1, settings.prefetch) if workers > 0 else None,
            # its base seed draw leaves the global generator alone
            generator=torch.Generator().manual_seed(settings.seed),
            worker_init_fn=_WorkerSeed(settings.seed * 1000 + settings.rank),
            # forking a process that runs DALI's thread pools can deadlock the workers: spawn them then
            multiprocessing_context="spawn" if workers > 0 and _dali_running() else None,
        )

    def __len__(self):
        return len(self._sampler)

    def __iter__(self):
        epoch = self.epoch_fn() if (self.train and self.epoch_fn) else self._epochs
        first = self._begin(epoch) if self.train else 0
        self._sampler.set_epoch(epoch if self.train else 0, first)
        assert self.loader is not None, "a closed loader cannot iterate again"
        for x, y in _one_line_errors(self.loader):
            if (y < -1).any():
                for i in (-2 - y[y < -1]).tolist():
                    if i not in self._warned:
                        self._warned.add(i)
                        warn_corrupt(self.split.name(i), "PIL cannot decode it")
                        self.on_skip(self.split.name(i))
                y = torch.where(y < -1, torch.full_like(y, -1), y)
            if x.dtype != self.dtype:
                x = x.to(self.dtype)
            if self.train:
                self._advance()
            yield x, y
        self._epochs += 1

    def close(self) -> None:
        """End the DataLoader's persistent worker processes now, not at garbage collection (a suspended
        pass, e.g. a fit stopped mid-epoch, would keep them alive); the loader cannot iterate again."""
        loader, self.loader = self.loader, None
        workers = getattr(loader, "_iterator", None)  # the persistent workers' iterator, once a pass began
        if workers is not None:
            workers._shutdown_workers()


def _one_line_errors(loader):
    """The DataLoader re-raises a worker's DataError with the worker's traceback in its message: keep the
    one line the worker raised."""
    try:
        yield from loader
    except DataError as err:
        lines = [ln for ln in str(err).splitlines() if ln.strip()]
        raise DataError(lines[-1].split("DataError: ", 1)[-1] if lines else str(err)) from None


def _dali_running() -> bool:
    dali = sys.modules.get("resnet_lamb.data.dali")
    return bool(dali is not None and getattr(dali, "PIPELINES_BUILT", 0))


class _WorkerSeed:
    def __init__(self, base: int):
        self.base = base

    def __call__(self, worker_id: int):
        torch.manual_seed(self.base * 100 + worker_id + torch.initial_seed() % 1000)
