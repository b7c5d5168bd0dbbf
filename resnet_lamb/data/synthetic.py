"""Synthetic backend: random normalised images and labels of the right shape, for throughput runs.

One batch is drawn once (on the GPU when there is one, so no host-to-device copy is measured) and
yielded ``len()`` times per pass.
"""

from __future__ import annotations

import torch

from resnet_lamb.data.common import EpochPosition, LoaderSettings
from resnet_lamb.data.sampling import micro_batches_per_rank


class SyntheticLoader(EpochPosition):
    def __init__(self, settings: LoaderSettings, *, train, n, num_classes, epoch_fn=None):
        self.n_batches = micro_batches_per_rank(n, **settings.plan_kwargs(train))
        self.shape = (settings.micro_batch, 3, settings.image_size, settings.image_size)
        self.num_classes, self.channels_last, self.dtype = num_classes, settings.channels_last, settings.dtype
        self.seed, self._batch = settings.seed, None
        self.train, self.epoch_fn, self.images_per_batch = train, epoch_fn, settings.images_per_batch
        self._epochs = 0

    def __len__(self):
        return self.n_batches

    def _make(self):
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        gen = torch.Generator().manual_seed(self.seed)
        x = torch.randn(self.shape, generator=gen).clamp_(-2.1, 2.6).to(device=device, dtype=self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, self.num_classes, (self.shape[0],), generator=gen, dtype=torch.int64).to(device)
        return x, y

    def __iter__(self):
        if self._batch is None:
            self._batch = self._make()
        first = 0
        if self.train:
            epoch = self.epoch_fn() if self.epoch_fn else self._epochs
            self._epochs = epoch + 1
            first = self._begin(epoch)
        for _ in range(first, self.n_batches):
            if self.train:
                self._advance()
            yield self._batch
