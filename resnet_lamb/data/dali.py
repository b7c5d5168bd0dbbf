"""DALI backend: one pipeline per split for the whole run, fed batch by batch from the main process.

Order: :func:`resnet_lamb.data.sampling.epoch_plan` (per-epoch permutations seeded by
``(seed, epoch)``, sharded by global rank; padded with label -1 or cut into full batches from one
stream, by ``data.epoch_mode``), not ``fn.readers.file``: every
epoch sees each image exactly once across ranks and every rank yields the same number of batches,
with no LastBatchPolicy subtleties (DALI#2881/#4686/#4440).

Feeding: ``fn.external_source`` in batch mode with a callback that DALI calls in the main thread
each time it schedules an iteration (``prefetch`` ahead of the consumer). The callback hands over
the encoded bytes of stream batch ``pos`` (``pos = epoch * len(loader) + batch``), read by a thread
pool one batch ahead (``split.read``: a folder's file or a shard's member; reads release the GIL); no
Python worker processes. Each split's stream runs on across epochs (the next epoch's first batches
decode during validation); a consumer that asks for another position (a resume, an epoch cut short
by ``limit_*_batches``) gets it after the batches already in flight are run and dropped.

Augmentation: a training sample's crop window and flip come from
:mod:`resnet_lamb.data.crop_windows`, keyed by ``(seed, epoch, file index)``, not from DALI's random
state; the pipelines themselves (devices, operators, nvJPEG buffers): :mod:`resnet_lamb.data.dali_pipeline`.

Outputs reach torch without a copy (DLPack): the dynamic executor (``exec_dynamic``, DALI 2.x's
default, set explicitly here) hands out reference-counted buffers that later runs never overwrite, so
a batch stays valid while the trainer holds it.

Corrupt files: DALI's decoder fails the whole batch (a "Critical error in pipeline"; checked in CPU
mode for non-image bytes, truncated and damaged JPEGs; a file that cannot be read, or whose header
Pillow cannot read, is marked at read time). The loader then decodes the files of the batches in
flight one by one with a small DALI CPU pipeline, marks the failing ones bad (placeholder + label -1
from then on, one warning each), rebuilds the pipeline at the failed batch (the only case where a split gets a second
pipeline) and carries on. See :mod:`resnet_lamb.data.folder` for the policy.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from resnet_lamb.data.common import BadFiles, EpochPosition, LoaderSettings, placeholder_jpeg, warn_corrupt
from resnet_lamb.data.crop_windows import ATTEMPTS, header_size, random_resized_crop, sample_uniforms
from resnet_lamb.data.dali_pipeline import build_pipeline, probe_bad
from resnet_lamb.data.sampling import epoch_plan, micro_batches_per_rank

PIPELINES_BUILT = 0  # pipelines built in this process (tests count them; torchvision spawns its workers then)


def available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception:  # ImportError, or a broken install (CUDA library mismatch)
        return False
    return True


# ------------------------------------------------------------------------------ the source
class _Source:
    """The samples of a split's stream: stream batch ``pos`` -> external_source's outputs.

    Bytes come from :meth:`read` (one call per file index: the only place that touches storage),
    run by a thread pool one batch ahead of the pipeline's request."""

    def __init__(self, split, settings: LoaderSettings, *, train, n, bad, on_bad):
        self.split, self.train, self.n, self.micro_batch = split, train, n, settings.micro_batch
        self.plan_kw, self.seed, self.bad, self.on_bad = settings.plan_kwargs(train), settings.seed, bad, on_bad
        self.n_batches = micro_batches_per_rank(n, **self.plan_kw)
        self.sizes = np.full((n, 2), -1, dtype=np.int32)  # (width, height) per file, read once
        self._plans: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._pool = ThreadPoolExecutor(max(1, settings.workers), thread_name_prefix="dali-read")
        self._ahead: dict[int, list] = {}  # stream batch -> futures of its reads

    def read(self, i: int) -> np.ndarray:
        """The encoded bytes of image ``i`` (a folder's file or a shard's member: ``split.read``). A shard's
        member comes as a view past its tar header; fed as that view DALI ran at 0.85x the folder's
        rate, as its own bytes at 1.01-1.08x (benchmarks/dataloader.py), so it gets a copy."""
        return np.frombuffer(bytes(self.split.read(i)), dtype=np.uint8)

    def plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if epoch not in self._plans:
            if len(self._plans) > 2:
                self._plans.pop(min(self._plans))
            self._plans[epoch] = epoch_plan(self.n, **self.plan_kw, epoch=epoch)
        return self._plans[epoch]

    def files(self, pos: int) -> tuple[np.ndarray, np.ndarray, int]:
        """File indices, real mask and epoch of stream batch ``pos``."""
        epoch, b = divmod(pos, self.n_batches)
        index, real = self.plan(epoch)
        m = self.micro_batch
        return index[b * m : (b + 1) * m], real[b * m : (b + 1) * m], epoch

    def _read_sized(self, i: int):
        """File ``i``'s bytes (training: and its size from the header), None when it cannot be read."""
        try:
            data = self.read(i)
        except OSError:
            return None
        if self.train and self.sizes[i, 0] < 0:
            self.sizes[i] = header_size(data)
        return data

    def _submit(self, pos: int) -> None:
        if pos not in self._ahead:
            idx, _, _ = self.files(pos)
            self._ahead[pos] = [self._pool.submit(self._read_sized, int(i)) for i in idx]

    def batch(self, pos: int) -> tuple:
        """external_source's outputs for stream batch ``pos``: encoded images, labels and (training)
        the crop windows and flips; starts reading batch ``pos + 1``."""
        idx, real, epoch = self.files(pos)
        self._submit(pos)
        futures = self._ahead.pop(pos)
        for stale in [p for p in self._ahead if p < pos]:  # a repositioned stream: drop reads never used
            for f in self._ahead.pop(stale):
                f.cancel()
        self._submit(pos + 1)
        data = [f.result() for f in futures]
        known = self.bad.mask(idx)
        failed = np.array([d is None for d in data])
        if self.train:
            failed |= self.sizes[idx, 0] <= 0
        for j in np.flatnonzero(failed & ~known):
            self.on_bad(int(idx[j]))
        known |= failed
        placeholder = np.frombuffer(placeholder_jpeg(), dtype=np.uint8)
        enc = [placeholder if k else d for d, k in zip(data, known, strict=True)]
        labels = np.where(real & ~known, self.split.labels[idx], -1).astype(np.int64)
        if not self.train:
            return enc, labels
        sizes = np.where(known[:, None], 32, self.sizes[idx])  # the placeholder is 32 x 32
        u = sample_uniforms(self.seed, epoch, idx, 4 * ATTEMPTS + 1)
        start, shape = random_resized_crop(sizes, u[:, :-1])
        mirror = (u[:, -1] < 0.5).astype(np.int32)
        return enc, labels, start, shape, mirror

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class DaliLoader(EpochPosition):
    """An iterable of ``(images, labels)`` batches over one split, ``len()`` batches per pass."""

    def __init__(self, split, settings: LoaderSettings, *, train, n, epoch_fn=None, on_skip=None, bad=None):
        self.split, self.settings, self.train, self.n = split, settings, train, n
        self.plan_kw = settings.plan_kwargs(train)
        self.n_batches = micro_batches_per_rank(n, **self.plan_kw)
        self.images_per_batch = settings.images_per_batch
        self.device_id = torch.cuda.current_device() if torch.cuda.is_available() else None
        self._pipe = None
        self._fed = 0  # the stream batch the callback hands over next
        self._out = 0  # the stream batch the pipeline outputs next
        self.epoch_fn = epoch_fn or (lambda: self._out // self.n_batches)
        self.on_skip = on_skip or (lambda path: None)
        self.bad = bad if bad is not None else BadFiles(n)
        self._source = _Source(split, settings, train=train, n=n, bad=self.bad, on_bad=self._unreadable)

    def __len__(self) -> int:
        return self.n_batches

    def _feed(self):
        """external_source's callback: DALI calls it in this thread whenever it schedules a run."""
        pos, self._fed = self._fed, self._fed + 1
        return self._source.batch(pos)

    def _build(self, pos: int) -> None:
        self._pipe = None  # the old one (its threads and buffers) goes before the new one is made
        self._fed = self._out = pos
        self._pipe = build_pipeline(self._feed, self.settings, train=self.train, device_id=self.device_id)
        global PIPELINES_BUILT
        PIPELINES_BUILT += 1
        self._ran = False

    def _seek(self, pos: int) -> None:
        """Make ``pos`` the next batch out: drop the batches in flight (run them, feeding from ``pos``)."""
        if self._pipe is None:
            self._build(pos)
        elif self._out != pos:
            if not self._ran:
                self._fed = self._out = pos
                return
            stale, self._fed = self._fed - self._out, pos
            try:
                for _ in range(stale):
                    self._run()
            except RuntimeError:  # a corrupt file among the dropped batches: start afresh at pos
                self._build(pos)
            self._out = pos

    def _run(self):
        self._ran = True
        return self._pipe.run()

    def __iter__(self):
        if self.train:
            epoch = self.epoch_fn()
            first = self._begin(epoch)
        else:  # validation: the next pass starts at the next multiple of len() (the same files each pass)
            epoch, first = -(-self._out // self.n_batches), 0
        self._seek(epoch * self.n_batches + first)
        for _ in range(first, self.n_batches):
            batch = self._next()
            if self.train:
                self._advance()
            yield batch

    def _next(self):
        while True:
            try:
                images, labels = self._run()
                break
            except RuntimeError as err:
                self._recover(err)
        self._out += 1
        return self._to_torch(images), self._to_torch(labels).view(-1)

    def _unreadable(self, i: int) -> None:
        self._mark_bad(i, "cannot read it, or Pillow cannot read its image header")

    def _mark_bad(self, i: int, why: str) -> None:
        if i not in self.bad:
            path = self.split.name(i)
            warn_corrupt(path, why)
            self.bad.add(i)
            self.on_skip(path)

    def _recover(self, err: Exception):
        """A batch failed to decode: find the bad files among the batches in flight, rebuild at it, retry."""
        files = {}
        for pos in range(self._out, max(self._fed, self._out + 1)):
            for i in self._source.files(pos)[0]:
                if int(i) not in self.bad:
                    files[self.split.name(int(i))] = int(i)
        bad = probe_bad(self.split, files)
        if not bad:
            raise err
        for path, why in bad.items():
            self._mark_bad(files[path], why)
        self._build(self._out)

    def _to_torch(self, tl):
        t = tl.as_tensor()  # dense: every sample has the same shape here
        gpu = type(t).__name__.endswith("GPU")
        # the dynamic executor hands out reference-counted buffers that later runs never overwrite:
        # share them (DLPack) instead of copying, as DALI's own PyTorch iterator does since 1.44
        with torch.cuda.device(self.device_id) if gpu else contextlib.nullcontext():
            out = torch.from_dlpack(t)
        if out.dim() == 4:
            if self.settings.channels_last:
                out = out.permute(0, 3, 1, 2)  # NHWC memory, NCHW shape: channels_last strides
            if out.dtype != self.settings.dtype:
                out = out.to(self.settings.dtype)
        return out

    def close(self) -> None:
        """Free the pipeline (its threads and buffers) and the reading threads."""
        self._pipe = None
        self._source.close()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()
