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

Augmentation without DALI's random state: a training sample's random-resized-crop window and flip
are computed here, by :func:`random_resized_crop` (torchvision's algorithm: 10 attempts at scale
0.08-1 and ratio 3/4-4/3, then the centre crop clamped to the ratio range) from
:func:`sample_uniforms` keyed by ``(seed, epoch, file index)``, and passed to
``decoders.image_slice`` (decoding only the window) and ``crop_mirror_normalize`` as per-sample
inputs. A sample's crop is thus the same whatever the world size, micro batch, prefetch depth or
pipeline instance, and a run resumed at any step (an epoch boundary or a SIGUSR1 save mid-epoch)
sees exactly the crops of one never stopped; no DALI checkpoint needs carrying between ranks. The
window needs the image size: read from the file's header (Pillow, lazily; cached per file).

Devices: on a GPU the decoders run on ``mixed`` (nvJPEG) and the rest on ``gpu``, labels included
(returned on the GPU); without one the whole pipeline runs on ``cpu`` with ``device_id=None``
(DALI's CPU-only mode). The training decoder preallocates nvJPEG's buffers for full-size ImageNet
photos (``device/host_memory_padding`` as NVIDIA DeepLearningExamples' ConvNets ``dali.py``,
``preallocate_width/height_hint`` as DALI's PyTorch ResNet-50 example); the validation decoder
takes none of them, as in both examples (once per run, so it grows its buffers on demand). When the
launcher bound this process to some CPUs, DALI's threads stay on them (:func:`thread_cpus`).
EXIF orientation is ignored (``adjust_orientation=False``), as Pillow and torchvision do, so the
window computed on the stored size is the decoder's.

Train: ``decoders.image_slice`` (the window) -> ``resize`` to image_size -> ``crop_mirror_normalize``
(flip, ImageNet mean/std, CHW or HWC). Val: ``decoders.image`` -> resize shorter side to 256/224 *
image_size -> centre crop in ``crop_mirror_normalize``.

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
import io
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from resnet_lamb.data.common import (
    MEAN,
    STD,
    EpochPosition,
    mix64,
    placeholder_jpeg,
    sample_key,
    val_resize,
    warn_corrupt,
)
from resnet_lamb.data.sampling import epoch_plan, micro_batches_per_rank, plan_kwargs

PIPELINES_BUILT = 0  # pipelines built in this process (tests count them; torchvision spawns its workers then)

# nvJPEG preallocation for the training decoder: buffer padding sized for full-size ImageNet, from
# NVIDIA DeepLearningExamples PyTorch/Classification/ConvNets/image_classification/dali.py, and the
# largest ImageNet image as a size hint, from DALI docs/examples/use_cases/pytorch/resnet50/main.py
NVJPEG_TRAIN = dict(
    device_memory_padding=211025920,
    host_memory_padding=140544512,
    preallocate_width_hint=5980,
    preallocate_height_hint=6430,
)

SCALE, RATIO, ATTEMPTS = (0.08, 1.0), (3 / 4, 4 / 3), 10  # torchvision's RandomResizedCrop defaults


def available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception:  # ImportError, or a broken install (CUDA library mismatch)
        return False
    return True


# ------------------------------------------------------------------------------ per-sample randomness
def sample_uniforms(seed: int, epoch: int, keys: np.ndarray, count: int) -> np.ndarray:
    """``(len(keys), count)`` uniforms in [0, 1), a pure function of ``(seed, epoch, key, column)``:
    counter-based (a hash), so any sample's numbers are computed without drawing the others'."""
    z = mix64(sample_key(seed, epoch) ^ np.asarray(keys, dtype=np.uint64))[:, None]
    z = mix64(z ^ np.arange(count, dtype=np.uint64)[None, :])
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def random_resized_crop(sizes: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """torchvision's ``RandomResizedCrop.get_params`` (scale 0.08-1, ratio 3/4-4/3), vectorised over a
    batch: ``sizes`` (B, 2) = (width, height), ``u`` (B, 4 * ATTEMPTS) uniforms -> window start
    (x, y) and shape (w, h), int32 (B, 2) each. Attempt k uses ``u[:, 4k:4k+4]`` for the area, the
    log-ratio, y and x; the first attempt that fits wins; none fits: the centre crop of the whole
    image clamped to the ratio range."""
    W, H = sizes[:, 0:1].astype(np.float64), sizes[:, 1:2].astype(np.float64)
    u = u.reshape(len(sizes), ATTEMPTS, 4)
    area = W * H * (SCALE[0] + (SCALE[1] - SCALE[0]) * u[..., 0])
    lo, hi = np.log(RATIO[0]), np.log(RATIO[1])
    ratio = np.exp(lo + (hi - lo) * u[..., 1])
    w, h = np.round(np.sqrt(area * ratio)), np.round(np.sqrt(area / ratio))
    fits = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    k = fits.argmax(axis=1)
    rows = np.arange(len(sizes))
    w, h = w[rows, k], h[rows, k]
    y = np.floor(u[rows, k, 2] * (H[:, 0] - h + 1))
    x = np.floor(u[rows, k, 3] * (W[:, 0] - w + 1))
    # fallback: the whole image, clamped to the ratio range, centred
    Wf, Hf = W[:, 0], H[:, 0]
    wide, tall = Wf / Hf > RATIO[1], Wf / Hf < RATIO[0]
    fw = np.where(wide, np.round(Hf * RATIO[1]), Wf)
    fh = np.where(tall, np.round(Wf / RATIO[0]), Hf)
    none = ~fits.any(axis=1)
    w, h = np.where(none, fw, w), np.where(none, fh, h)
    x, y = np.where(none, (Wf - fw) // 2, x), np.where(none, (Hf - fh) // 2, y)
    start = np.stack([x, y], axis=1).astype(np.int32)
    shape = np.stack([w, h], axis=1).astype(np.int32)
    return start, shape


def header_size(data: np.ndarray) -> tuple[int, int]:
    """(width, height) from an encoded image's header (Pillow reads the header only); (0, 0) when
    it cannot be read."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data.tobytes() if isinstance(data, np.ndarray) else data)) as img:
            return img.size
    except Exception:  # noqa: BLE001 - Pillow raises UnidentifiedImageError, OSError, SyntaxError...
        return 0, 0


# ------------------------------------------------------------------------------ the source
class _Source:
    """The samples of a split's stream: stream batch ``pos`` -> external_source's outputs.

    Bytes come from :meth:`read` (one call per file index: the only place that touches storage),
    run by a thread pool one batch ahead of the pipeline's request."""

    def __init__(self, split, *, train, n, micro_batch, plan_kw, seed, bad, threads, on_bad):
        self.split, self.train, self.n, self.micro_batch = split, train, n, micro_batch
        self.plan_kw, self.seed, self.bad, self.on_bad = plan_kw, seed, bad, on_bad
        self.n_batches = micro_batches_per_rank(n, **plan_kw)
        self.sizes = np.full((n, 2), -1, dtype=np.int32)  # (width, height) per file, read once
        self._plans: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="dali-read")
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


def thread_cpus(threads: int, allowed: list[int], total: int) -> list[int]:
    """CPUs for DALI's ``threads`` worker threads (``DALI_AFFINITY_MASK``: thread i on entry i), or []
    to keep DALI's default.

    By default DALI sets each of its threads' affinity to every CPU NVML lists near the GPU, which
    undoes a narrower binding of the process (torchrun ``--numa-binding exclusive``, ``srun
    --cpu-bind``, taskset): ranks bound to their own cores would then share them. A process bound to
    a subset of the machine's CPUs keeps its DALI threads on that subset; an unbound one keeps the
    default (the CPUs near its GPU)."""
    cpus = sorted(allowed)
    if len(cpus) >= total:
        return []
    return [cpus[i % len(cpus)] for i in range(max(1, threads))]


def _pin_threads(threads: int) -> None:
    if "DALI_AFFINITY_MASK" in os.environ or not hasattr(os, "sched_getaffinity"):
        return
    cpus = thread_cpus(threads, sorted(os.sched_getaffinity(0)), os.cpu_count() or 1)
    if cpus:
        os.environ["DALI_AFFINITY_MASK"] = ",".join(map(str, cpus))


def _build_pipeline(feed, *, train, batch_size, image_size, threads, device_id, prefetch, channels_last, half):
    from nvidia.dali import fn, pipeline_def, types

    gpu = device_id is not None
    if gpu:
        _pin_threads(threads)
    dec = "mixed" if gpu else "cpu"

    @pipeline_def(
        batch_size=batch_size,
        num_threads=max(1, threads),
        device_id=device_id,
        prefetch_queue_depth=prefetch,
        exec_dynamic=True,
    )  # the default in DALI 2.x; outputs shared
    def pipe():
        if train:
            enc, label, start, shape, mirror = fn.external_source(
                source=feed,
                num_outputs=5,
                batch=True,
                dtype=[types.UINT8, types.INT64, types.INT32, types.INT32, types.INT32],
            )
            img = fn.decoders.image_slice(
                enc,
                start=start,
                shape=shape,
                device=dec,
                output_type=types.RGB,
                adjust_orientation=False,
                **(NVJPEG_TRAIN if gpu else {}),
            )
            img = fn.resize(img, resize_x=image_size, resize_y=image_size)
        else:
            enc, label = fn.external_source(source=feed, num_outputs=2, batch=True, dtype=[types.UINT8, types.INT64])
            img = fn.decoders.image(enc, device=dec, output_type=types.RGB, adjust_orientation=False)
            img = fn.resize(img, resize_shorter=val_resize(image_size))
            mirror = 0
        img = fn.crop_mirror_normalize(
            img,
            crop=(image_size, image_size),
            mirror=mirror,
            mean=[m * 255 for m in MEAN],
            std=[s * 255 for s in STD],
            dtype=types.FLOAT16 if half else types.FLOAT,
            output_layout="HWC" if channels_last else "CHW",
        )
        return img, label.gpu() if gpu else label

    global PIPELINES_BUILT
    PIPELINES_BUILT += 1
    p = pipe()
    p.build()
    return p


def _probe_bad(split, files: dict[str, int]) -> dict[str, str]:
    """Decode each image ({name: index}) alone with DALI on the CPU; return {name: error} for those that fail.
    A DataError reading the bytes (a shard unlike its index) is raised, not counted."""
    from nvidia.dali import fn, pipeline_def, types

    # device_id=None: a CPU-only pipeline, which DALI takes but its stubs (device_id: int) do not
    @pipeline_def(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1)  # type: ignore[call-overload]
    def probe():
        return fn.decoders.image(fn.external_source(name="enc", dtype=types.UINT8), device="cpu", output_type=types.RGB)

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


class DaliLoader(EpochPosition):
    """An iterable of ``(images, labels)`` batches over one split, ``len()`` batches per pass."""

    def __init__(
        self,
        split,
        *,
        train,
        n,
        global_batch,
        micro_batch,
        world_size,
        rank,
        seed,
        image_size,
        workers,
        channels_last,
        dtype,
        prefetch=2,
        epoch_fn=None,
        on_skip=None,
        bad=None,
        epoch_mode="padded",
    ):
        from resnet_lamb.data.common import BadFiles

        self.split, self.train, self.n = split, train, n
        self.micro_batch, self.image_size = micro_batch, image_size
        self.plan_kw = plan_kwargs(train, global_batch, micro_batch, world_size, rank, seed, epoch_mode)
        self.n_batches = micro_batches_per_rank(n, **self.plan_kw)
        self.images_per_batch = micro_batch * world_size
        self.seed, self.rank, self.workers = seed, rank, workers
        self.channels_last, self.dtype, self.prefetch = channels_last, dtype, max(1, prefetch)
        self.device_id = torch.cuda.current_device() if torch.cuda.is_available() else None
        self.epoch_fn = epoch_fn or (lambda: self._out // self.n_batches)
        self.on_skip = on_skip or (lambda path: None)
        self.bad = bad if bad is not None else BadFiles(n)
        self._source = _Source(
            split,
            train=train,
            n=n,
            micro_batch=micro_batch,
            plan_kw=self.plan_kw,
            seed=seed,
            bad=self.bad,
            threads=workers,
            on_bad=self._unreadable,
        )
        self._pipe = None
        self._fed = 0  # the stream batch the callback hands over next
        self._out = 0  # the stream batch the pipeline outputs next

    def __len__(self) -> int:
        return self.n_batches

    def _feed(self):
        """external_source's callback: DALI calls it in this thread whenever it schedules a run."""
        pos, self._fed = self._fed, self._fed + 1
        return self._source.batch(pos)

    def _build(self, pos: int) -> None:
        self._pipe = None  # the old one (its threads and buffers) goes before the new one is made
        self._fed = self._out = pos
        self._pipe = _build_pipeline(
            self._feed,
            train=self.train,
            batch_size=self.micro_batch,
            image_size=self.image_size,
            threads=self.workers,
            device_id=self.device_id,
            prefetch=self.prefetch,
            channels_last=self.channels_last,
            half=self.dtype == torch.float16,
        )
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
        bad = _probe_bad(self.split, files)
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
            if self.channels_last:
                out = out.permute(0, 3, 1, 2)  # NHWC memory, NCHW shape: channels_last strides
            if out.dtype != self.dtype:
                out = out.to(self.dtype)
        return out

    def close(self) -> None:
        """Free the pipeline (its threads and buffers) and the reading threads."""
        self._pipe = None
        self._source.close()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()
