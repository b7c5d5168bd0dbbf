"""memory backend: a small data set decoded once into RAM, for CPU proxy studies.

Every image of a split is decoded once (PIL, ``workers`` threads), resized so the shorter side is
``image_size`` and centre-cropped, and kept as one uint8 tensor; batches are gathered from it in
the order of :func:`resnet_lamb.data.sampling.epoch_plan` (the same permutation, sharding and
padding as the other backends) and normalised with ImageNet mean/std. There is no random
augmentation: this backend exists so that an MLP or a small ResNet on Fashion-MNIST/MNIST is
bound by compute rather than by JPEG decoding (tens of thousands of images per second here), not
to reproduce ImageNet's input pipeline. Corrupt images follow the folder policy (skip and count:
label -1, one warning naming the file). Decoded splits are cached per process, keyed by folder,
split and size, so a study that runs many fits in one process decodes once.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from resnet_lamb.data.common import MEAN, STD, EpochPosition, LoaderSettings, warn_corrupt
from resnet_lamb.data.sampling import epoch_plan, micro_batches_per_rank
from resnet_lamb.errors import DataError

_CACHE: dict[tuple[str, int], tuple[torch.Tensor, list[int]]] = {}


def _decode(split, i: int, size: int) -> np.ndarray | None:
    from PIL import Image

    try:
        data = split.read(i)
    except DataError:
        raise
    except OSError:
        return None
    try:
        with Image.open(io.BytesIO(data)) as opened:
            img = opened.convert("RGB")
            w, h = img.size
            scale = size / min(w, h)
            if (w, h) != (size, size):
                img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BILINEAR)
                left, top = (img.width - size) // 2, (img.height - size) // 2
                img = img.crop((left, top, left + size, top + size))
            return np.array(img, dtype=np.uint8)
    except Exception:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError...
        return None


def decode_split(split, size: int, workers: int) -> tuple[torch.Tensor, list[int]]:
    """``(images uint8 (N, 3, size, size), indices of corrupt files)``, cached per process."""
    key = (str(split.root), size)
    if key not in _CACHE:
        out = torch.zeros((len(split), 3, size, size), dtype=torch.uint8)
        bad = []
        with ThreadPoolExecutor(max(1, workers)) as pool:  # PIL releases the GIL while decoding
            for i, arr in enumerate(pool.map(lambda i: _decode(split, i, size), range(len(split)))):
                if arr is None:
                    bad.append(i)
                else:
                    out[i] = torch.from_numpy(arr).permute(2, 0, 1)
        _CACHE[key] = (out, bad)
    return _CACHE[key]


class MemoryLoader(EpochPosition):
    """An iterable of ``(images, labels)`` batches over one split, ``len()`` batches per pass."""

    def __init__(self, split, settings: LoaderSettings, *, train, n, epoch_fn=None, on_skip=None):
        self.plan_kw = settings.plan_kwargs(train)
        self.split, self.n, self.train, self.micro_batch = split, n, train, settings.micro_batch
        self.image_size, self.workers = settings.image_size, settings.workers
        self.channels_last, self.dtype = settings.channels_last, settings.dtype
        self.epoch_fn, self.on_skip = epoch_fn, on_skip or (lambda path: None)
        self.bad: set[int] = set()  # filled from a checkpoint before the first pass
        self.length = micro_batches_per_rank(n, **self.plan_kw)
        self.images_per_batch = settings.images_per_batch
        self._epochs = 0
        self._labels = torch.from_numpy(np.array(split.labels, dtype=np.int64))
        self._mean = torch.tensor(MEAN).view(1, 3, 1, 1) * 255
        self._std = torch.tensor(STD).view(1, 3, 1, 1) * 255

    def __len__(self):
        return self.length

    def __iter__(self):
        images, corrupt = decode_split(self.split, self.image_size, self.workers)
        for i in corrupt:
            if i not in self.bad:
                self.bad.add(i)
                warn_corrupt(self.split.name(i), "PIL cannot decode it")
                self.on_skip(self.split.name(i))
        epoch = (self.epoch_fn() if self.epoch_fn else self._epochs) if self.train else 0
        first = self._begin(epoch) if self.train else 0
        index, real = epoch_plan(self.n, **self.plan_kw, epoch=epoch)
        index, real = torch.from_numpy(index), torch.from_numpy(real)
        if self.bad:
            real &= ~torch.isin(index, torch.tensor(sorted(self.bad)))
        m = self.micro_batch
        for b in range(first, self.length):
            idx = index[b * m : (b + 1) * m]
            x = (images[idx].float() - self._mean) / self._std
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = torch.where(real[b * m : (b + 1) * m], self._labels[idx], -1)
            if self.train:
                self._advance()
            yield x.to(self.dtype), y
        self._epochs += 1
