"""DALI backend: encoded bytes read by index (fn.external_source), decoded and augmented by DALI.

The order comes from :func:`resnet_lamb.data.sampling.epoch_plan` (per-epoch permutations seeded
by ``(seed, epoch)``, sharded by global rank; padded with label -1 or cut into full batches from one
stream, by ``data.epoch_mode``), not from
``fn.readers.file``: that way every epoch sees each image exactly once across ranks and every rank
yields the same number of batches, with no LastBatchPolicy subtleties (DALI#2881/#4686/#4440).

Training builds a fresh pipeline at the start of every epoch, seeded by :func:`_pipeline_seed` from
``(seed, epoch, global rank)``: the random crops and flips of an epoch are then the same whether the
run went through without a stop or was resumed at that epoch (a pipeline kept across epochs would
carry its random state over, which a resumed run cannot reproduce). The source of a training pipeline
ends with its epoch (StopIteration), so nothing of the next epoch is decoded for nothing. The build
costs a few milliseconds on the CPU; where files are read in worker processes (GPU machines), spawning
them takes seconds, so there the next epoch's pipeline is made in a thread while the current one runs. Validation (no randomness) keeps one endless stream instead: sample ``p`` belongs to
pass ``p // per_rank``, so it prefetches across passes, and it is rebuilt only when the consumer asks
for a position the stream is not at (the sanity check, ``limit_val_batches``). Either kind is rebuilt
in place after a decode error.

Devices: on a GPU ``decoders.image*`` runs on ``mixed`` (nvJPEG) and the rest on ``gpu``; without
one the whole pipeline runs on ``cpu`` with ``device_id=None`` (DALI's CPU-only mode).

Train: ``decoders.image_random_crop`` (decode + random-resized-crop in one, decoding only the crop
window: scale 0.08-1, ratio 3/4-4/3) -> ``resize`` to image_size -> ``crop_mirror_normalize``
(random flip, ImageNet mean/std, CHW or HWC). Val: ``decoders.image`` -> resize shorter side to
256/224 * image_size -> centre crop in ``crop_mirror_normalize``.

Outputs reach torch without a copy (DLPack): the dynamic executor (``exec_dynamic``, DALI 2.x's
default, set explicitly here) hands out reference-counted buffers that later runs never overwrite, so
a batch stays valid while the trainer holds it. On the CPU that copy was a tenth of the loader's time.

Corrupt files: DALI's decoder fails the whole batch (a "Critical error in pipeline"; checked in CPU
mode for non-image bytes, truncated and damaged JPEGs). The loader then decodes that batch's files
(and the prefetched ones) one by one with a small DALI CPU pipeline, marks the failing files bad
(placeholder + label -1 from then on, one warning each), rebuilds the pipeline at the same position
(training: seeded from the epoch and the offset in it) and carries on. See :mod:`resnet_lamb.data.folder` for the policy.
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np
import torch

from resnet_lamb.data.common import MEAN, STD, placeholder_jpeg, val_resize, warn_corrupt
from resnet_lamb.data.sampling import epoch_plan, micro_batches_per_rank, plan_kwargs


PIPELINES_BUILT = 0  # torchvision's DataLoader spawns (not forks) its workers once DALI threads run here


def available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception:  # ImportError, or a broken install (CUDA library mismatch)
        return False
    return True


class _Source:
    """Picklable per-sample callback (parallel external_source needs that): SampleInfo -> (bytes, label)."""

    def __init__(self, split, n, plan_kw, start, bad, stop=None):
        self.split, self.labels, self.n = split, split.labels, n  # split.read(i): the bytes (folder or shard)
        self.plan_kw, self.start, self.bad = plan_kw, start, frozenset(bad)
        self.stop = stop  # stream position where the source ends (StopIteration); None: endless
        self.per_rank = micro_batches_per_rank(n, **plan_kw) * plan_kw["micro_batch"]
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def file_at(self, pos: int) -> tuple[int, bool]:
        epoch, j = divmod(pos, self.per_rank)
        plan = self._cache.get(epoch)
        if plan is None:
            if len(self._cache) > 2:
                self._cache.pop(min(self._cache))
            plan = self._cache[epoch] = epoch_plan(self.n, **self.plan_kw, epoch=epoch)
        return int(plan[0][j]), bool(plan[1][j])

    def path(self, i: int) -> str:
        return self.split.name(i)

    def __call__(self, info):
        pos = self.start + info.idx_in_epoch
        if self.stop is not None and pos >= self.stop:
            raise StopIteration  # at a batch boundary: stop - start is a whole number of batches
        i, real = self.file_at(pos)
        if i in self.bad:
            return np.frombuffer(placeholder_jpeg(), dtype=np.uint8), np.array([-1], dtype=np.int64)
        data = np.frombuffer(self.split.read(i), dtype=np.uint8)
        label = self.labels[i] if real else -1
        return data, np.array([label], dtype=np.int64)


def _build_pipeline(source, *, train, batch_size, image_size, threads, device_id, seed, prefetch,
                    py_workers, channels_last, half):
    from nvidia.dali import fn, pipeline_def, types

    gpu = device_id is not None
    kw = dict(batch_size=batch_size, num_threads=max(1, threads), device_id=device_id, seed=seed,
              prefetch_queue_depth=prefetch, exec_dynamic=True)  # the default in DALI 2.x; outputs shared
    if py_workers:
        kw.update(py_num_workers=py_workers, py_start_method="spawn")

    @pipeline_def(**kw)
    def pipe():
        enc, label = fn.external_source(source=source, num_outputs=2, batch=False, parallel=bool(py_workers),
                                        dtype=[types.UINT8, types.INT64])
        dec = "mixed" if gpu else "cpu"
        # nvJPEG's buffers sized up front for ImageNet-like photos, as in NVIDIA's ResNet-50 examples (no
        # reallocation when a larger image comes); the CPU decoder takes no such hints
        pad = dict(device_memory_padding=211025920, host_memory_padding=140544512) if gpu else {}
        if train:
            # torchvision's RandomResizedCrop: 10 attempts, then the whole image clamped to the ratio range
            img = fn.decoders.image_random_crop(enc, device=dec, output_type=types.RGB,
                                                random_area=[0.08, 1.0], random_aspect_ratio=[3 / 4, 4 / 3],
                                                num_attempts=10, **pad)
            img = fn.resize(img, resize_x=image_size, resize_y=image_size)
            mirror = fn.random.coin_flip(probability=0.5)
        else:
            img = fn.decoders.image(enc, device=dec, output_type=types.RGB, **pad)
            img = fn.resize(img, resize_shorter=val_resize(image_size))
            mirror = 0
        img = fn.crop_mirror_normalize(img, crop=(image_size, image_size), mirror=mirror,
                                       mean=[m * 255 for m in MEAN], std=[s * 255 for s in STD],
                                       dtype=types.FLOAT16 if half else types.FLOAT,
                                       output_layout="HWC" if channels_last else "CHW")
        return img, label

    global PIPELINES_BUILT
    PIPELINES_BUILT += 1
    p = pipe()
    if py_workers:
        p.start_py_workers()
    p.build()
    return p


def _pipeline_seed(seed: int, epoch: int, rank: int, offset: int = 0) -> int:
    """DALI's seed for a training pipeline started ``offset`` batches into ``epoch`` on ``rank``.

    A pure function of its arguments, so a resumed run seeds each epoch as an uninterrupted one does
    (``offset`` is non-zero only for a rebuild after a decode error)."""
    state = np.random.SeedSequence([seed % 2**63, epoch, rank, offset]).generate_state(2, np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1  # 62 bits: DALI takes a signed 64-bit seed


def _probe_bad(split, files: dict[str, int]) -> dict[str, str]:
    """Decode each image ({name: index}) alone with DALI on the CPU; return {name: error} for those that fail.
    A DataError reading the bytes (a shard unlike its index) is raised, not counted."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def probe():
        return fn.decoders.image(fn.external_source(name="enc", dtype=types.UINT8), device="cpu",
                                 output_type=types.RGB)

    bad: dict[str, str] = {}
    p = None
    for path, i in files.items():
        if p is None:
            p = probe()
            p.build()
        try:
            data = np.frombuffer(split.read(i), dtype=np.uint8)
        except OSError as err:  # a folder's file gone or unreadable: skipped and counted
            bad[path] = err.strerror or str(err)
            continue
        try:
            p.feed_input("enc", [data])
            p.run()
        except Exception as err:  # noqa: BLE001 - DALI raises RuntimeError; a broken pipeline is rebuilt
            text = str(err).split("encountered:")[-1]
            lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "no longer valid" not in ln]
            bad[path] = "DALI: " + (lines[0].rstrip(" :")[:160] if lines else "cannot decode it")
            p = None
    return bad


class DaliLoader:
    """An iterable of ``(images, labels)`` batches over one split, ``len()`` batches per pass."""

    def __init__(self, split, *, train, n, global_batch, micro_batch, world_size, rank, seed, image_size,
                 workers, channels_last, dtype, prefetch=2, py_workers=None, epoch_fn=None, on_skip=None,
                 epoch_mode="padded"):
        self.split, self.train, self.n = split, train, n
        self.micro_batch, self.image_size = micro_batch, image_size
        self.plan_kw = plan_kwargs(train, global_batch, micro_batch, world_size, rank, seed, epoch_mode)
        self.n_batches = micro_batches_per_rank(n, **self.plan_kw)
        self.seed, self.rank, self.workers = seed, rank, workers
        self.channels_last, self.dtype, self.prefetch = channels_last, dtype, max(1, prefetch)
        self.device_id = torch.cuda.current_device() if torch.cuda.is_available() else None
        if py_workers is None:  # read files in worker processes on GPU machines, in the main thread on CPU
            py_workers = max(1, min(4, workers // 2)) if self.device_id is not None else 0
        self.py_workers = py_workers
        self.epoch_fn = epoch_fn or (lambda: self._pos // self.n_batches)
        self.on_skip = on_skip or (lambda path: None)
        self.bad: set[int] = set()
        self._pipe = None
        self._source = None
        self._next_build = None  # (start batch, thread, result) of a pipeline made ahead
        self._pos = 0  # batches consumed from the stream
        self._start = 0  # stream position (batches) the pipeline was built at

    def __len__(self) -> int:
        return self.n_batches

    def _make(self, start_batch: int, bad: frozenset) -> tuple[_Source, object]:
        """A source and pipeline reading the stream from ``start_batch``; training: to the end of its epoch."""
        epoch, offset = divmod(start_batch, self.n_batches)
        source = _Source(self.split, self.n, self.plan_kw,
                         start_batch * self.micro_batch, bad,
                         stop=(epoch + 1) * self.n_batches * self.micro_batch if self.train else None)
        pipe = _build_pipeline(
            source, train=self.train, batch_size=self.micro_batch, image_size=self.image_size,
            threads=self.workers, device_id=self.device_id,
            seed=_pipeline_seed(self.seed, epoch, self.rank, offset) if self.train else self.seed,
            prefetch=self.prefetch, py_workers=self.py_workers, channels_last=self.channels_last,
            half=self.dtype == torch.float16)
        return source, pipe

    def _build(self, start_batch: int):
        self._pipe = None  # the old one (its threads and buffers) goes before the new one is made
        self._source, self._pipe = self._make(start_batch, frozenset(self.bad))
        self._pos = self._start = start_batch

    def _prebuild(self, start_batch: int, old: list):
        """Make the next epoch's pipeline in a thread while this epoch runs (after emptying ``old``).

        Only with file-reading worker processes: spawning them takes seconds (the CPU-only pipeline
        builds in milliseconds). DALI keeps the pipeline being defined in thread-local state."""
        box, bad = {}, frozenset(self.bad)

        def work():
            old.clear()  # the finished pipeline's worker pool is closed (joined) here, not in the loop
            try:
                box["built"] = self._make(start_batch, bad)
            except Exception as err:  # noqa: BLE001 - rebuilt in the loop's thread, where it raises
                box["error"] = err

        thread = threading.Thread(target=work, name="dali-prebuild")
        self._next_build = (start_batch, thread, box)
        thread.start()

    def _take_prebuilt(self, start_batch: int):
        if self._next_build is None:
            return None
        at, thread, box = self._next_build
        self._next_build = None
        thread.join()
        built = box.get("built")
        if built is None or at != start_batch or built[0].bad != frozenset(self.bad):
            return None  # not the epoch asked for, or files found bad since: build it afresh
        return built

    def __iter__(self):
        epoch = self.epoch_fn() if self.train else (self._pos + self.n_batches - 1) // self.n_batches
        want = epoch * self.n_batches
        # training: a new pipeline every epoch, seeded from (seed, epoch, rank), resumed run or not
        if self.train or self._pipe is None or self._pos != want:
            ahead = self.train and self.py_workers > 0
            old, self._pipe = self._pipe, None
            built = self._take_prebuilt(want)
            if built is None:
                if not ahead:
                    old = None  # freed before the new one is made
                built = self._make(want, frozenset(self.bad))
            self._source, self._pipe = built
            self._pos = self._start = want
            if ahead:
                hold, old = [old], None
                self._prebuild(want + self.n_batches, hold)
            old = None
        for _ in range(self.n_batches):
            yield self._next()

    def _next(self):
        while True:
            try:
                images, labels = self._pipe.run()
                break
            except RuntimeError as err:
                self._recover(err)
        self._pos += 1
        return self._to_torch(images), self._to_torch(labels).view(-1)

    def _recover(self, err: Exception):
        """A batch failed to decode: find the bad files among it and the prefetched ones, rebuild, retry."""
        first = (self._pos - self._start) * self.micro_batch
        span = (self.prefetch + 2) * self.micro_batch
        files = {}
        for p in range(first, first + span):
            i, _ = self._source.file_at(self._source.start + p)
            if i not in self.bad:
                files[self._source.path(i)] = i
        bad = _probe_bad(self.split, files)
        if not bad:
            raise err
        for path, why in bad.items():
            warn_corrupt(path, why)
            self.bad.add(files[path])
            self.on_skip(path)
        self._build(self._pos)

    def _to_torch(self, tl):
        from nvidia.dali.plugin.pytorch import feed_ndarray

        t = tl.as_tensor()  # dense: every sample has the same shape here
        gpu = type(t).__name__.endswith("GPU")
        if self._pipe.exec_dynamic:
            # the dynamic executor hands out reference-counted buffers that later runs never overwrite:
            # share them (DLPack) instead of copying, as DALI's own PyTorch iterator does since 1.44
            with torch.cuda.device(self.device_id) if gpu else contextlib.nullcontext():
                out = torch.from_dlpack(t)
        elif gpu:
            out = torch.empty(t.shape(), dtype=_torch_dtype_of(t), device=f"cuda:{self.device_id}")
            feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(self.device_id))
        else:
            out = torch.empty(t.shape(), dtype=_torch_dtype_of(t))
            feed_ndarray(t, out)
        if out.dim() == 4:
            if self.channels_last:
                out = out.permute(0, 3, 1, 2)  # NHWC memory, NCHW shape: channels_last strides
            if out.dtype != self.dtype:
                out = out.to(self.dtype)
        return out


def _torch_dtype_of(t):
    from nvidia.dali import types

    return {types.FLOAT: torch.float32, types.FLOAT16: torch.float16, types.INT64: torch.int64,
            types.INT32: torch.int32, types.UINT8: torch.uint8}[t.dtype]
