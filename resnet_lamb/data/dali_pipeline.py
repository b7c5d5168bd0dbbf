"""The DALI pipelines: one per split for the loader (:mod:`resnet_lamb.data.dali`), fed by
``fn.external_source``, and a one-image CPU pipeline that finds the files a failed batch could not decode.

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
"""

from __future__ import annotations

import os

import numpy as np
import torch

from resnet_lamb.data.common import MEAN, STD, val_resize

# nvJPEG preallocation for the training decoder: buffer padding sized for full-size ImageNet, from
# NVIDIA DeepLearningExamples PyTorch/Classification/ConvNets/image_classification/dali.py, and the
# largest ImageNet image as a size hint, from DALI docs/examples/use_cases/pytorch/resnet50/main.py
NVJPEG_TRAIN = dict(
    device_memory_padding=211025920,
    host_memory_padding=140544512,
    preallocate_width_hint=5980,
    preallocate_height_hint=6430,
)


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


def build_pipeline(feed, settings, *, train, device_id):
    """The split's pipeline, built, for :class:`resnet_lamb.data.common.LoaderSettings` ``settings``; fed
    by ``feed`` (stream batch -> encoded images, labels and, training, the crop windows and flips of
    :mod:`resnet_lamb.data.crop_windows`)."""
    from nvidia.dali import fn, pipeline_def, types

    gpu = device_id is not None
    if gpu:
        _pin_threads(settings.workers)
    dec = "mixed" if gpu else "cpu"
    size = settings.image_size
    # encoded image, label; training: window start, window shape, flip
    dtypes = [types.UINT8, types.INT64] + ([types.INT32] * 3 if train else [])

    @pipeline_def(
        batch_size=settings.micro_batch,
        num_threads=max(1, settings.workers),
        device_id=device_id,
        prefetch_queue_depth=max(1, settings.prefetch),
        exec_dynamic=True,
    )  # the default in DALI 2.x; outputs shared
    def pipe():
        enc, label, *window = fn.external_source(source=feed, num_outputs=len(dtypes), batch=True, dtype=dtypes)
        if train:
            start, shape, mirror = window
            img = fn.decoders.image_slice(
                enc,
                start=start,
                shape=shape,
                device=dec,
                output_type=types.RGB,
                adjust_orientation=False,
                **(NVJPEG_TRAIN if gpu else {}),
            )
            img = fn.resize(img, resize_x=size, resize_y=size)
        else:
            img = fn.decoders.image(enc, device=dec, output_type=types.RGB, adjust_orientation=False)
            img = fn.resize(img, resize_shorter=val_resize(size))
            mirror = 0
        img = fn.crop_mirror_normalize(
            img,
            crop=(size, size),
            mirror=mirror,
            mean=[m * 255 for m in MEAN],
            std=[s * 255 for s in STD],
            dtype=types.FLOAT16 if settings.dtype == torch.float16 else types.FLOAT,
            output_layout="HWC" if settings.channels_last else "CHW",
        )
        return img, label.gpu() if gpu else label

    p = pipe()
    p.build()
    return p


def probe_bad(split, files: dict[str, int]) -> dict[str, str]:
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
