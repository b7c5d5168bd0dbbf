"""Training-input throughput: DALI (CPU-only mode) against torchvision's DataLoader.

Same JPEG folder (full-size photos-like JPEGs, default 500x375, generated in a temp folder, or
--root with a prepared layout), same transforms (random-resized-crop 224, flip, normalise), same
number of threads / worker processes (--workers), same batch, same number of batches in flight
(--prefetch per DataLoader worker, so workers * prefetch for DALI's prefetch queue). Epochs are
interleaved (DALI, torchvision, DALI, ...) so that load from other processes hits both alike; before
each one the benchmark waits until the other loader has stopped working in the background (DALI
prefetches the next epoch's first batches), the first epoch of each is a warm-up, and each epoch is
timed from its --skip-batches-th batch on (steady state: what a loader prefetched while the other
one ran is not counted). Besides images/s (wall clock, which
depends on what else runs on the machine) it reports images per CPU-second (this process's CPU time,
DALI's threads included, plus the DataLoader's worker processes), which load does not skew.
Last line: one JSON object with both rates and their ratios.

    python benchmarks/dataloader.py [--images 384] [--epochs 4] [--workers 2] [--batch 64]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time


def make_folder(root: str, images: int, width: int, height: int, classes: int = 4, seed: int = 0) -> None:
    import numpy as np
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for i in range(images if split == "train" else classes):
            d = os.path.join(root, split, f"c{i % classes}")
            os.makedirs(d, exist_ok=True)
            # smooth colour fields + texture: JPEG sizes like photos (~40-80 KB at 500x375, q90)
            base = (rng.random((height // 16, width // 16, 3)) * 255).astype(np.uint8)
            img = Image.fromarray(base).resize((width, height), Image.BICUBIC)
            noise = (rng.normal(0, 12, (height, width, 3))).astype(np.int16)
            arr = np.clip(np.asarray(img).astype(np.int16) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(arr).filter(ImageFilter.SMOOTH).save(os.path.join(d, f"{i:05d}.JPEG"), quality=90)


def cpu_seconds(loader) -> float:
    """CPU time of this process (DALI's threads, the main thread) plus the DataLoader's worker processes."""
    total = time.process_time()
    workers = getattr(getattr(getattr(loader, "loader", None), "_iterator", None), "_workers", None) or []
    for w in workers:
        try:
            with open(f"/proc/{w.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            pass
    return total


def settle(loaders, interval: float = 0.05, limit: float = 5.0) -> None:
    """Wait until no loader works in the background any more (DALI fills its prefetch queue with the next
    epoch's batches after the last one of this epoch is out), so that it neither slows down nor is counted
    in the other loader's epoch: two intervals in a row with under 10% of a core busy, at most `limit` s."""
    def busy():
        return time.process_time() + sum(cpu_seconds(ld) - time.process_time() for ld in loaders)
    deadline, quiet, last = time.perf_counter() + limit, 0, busy()
    while quiet < 2 and time.perf_counter() < deadline:
        time.sleep(interval)
        now = busy()
        quiet = quiet + 1 if now - last < 0.1 * interval else 0
        last = now


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", help="a prepared folder (train/<class>/*.JPEG); default: generate one")
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--size", default="500x375", help="generated JPEGs' WxH")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per backend (plus one warm-up)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--skip-batches", type=int, default=None,
                   help="batches per epoch before the clock starts (default: the batches in flight, at least 4)")
    p.add_argument("--prefetch", type=int, default=2, help="batches prefetched per DataLoader worker (prefetch_factor)")
    args = p.parse_args(argv)
    if args.skip_batches is None:
        args.skip_batches = max(4, args.workers * args.prefetch)

    import torch

    from resnet_lamb.data import ImageDataModule

    torch.set_num_threads(1)
    tmp = None
    root = args.root
    if root is None:
        tmp = tempfile.TemporaryDirectory(prefix="resnet-lamb-bench-")
        root = tmp.name
        w, h = (int(v) for v in args.size.split("x"))
        t = time.perf_counter()
        make_folder(root, args.images, w, h)
        print(f"generated {args.images} {w}x{h} JPEGs in {time.perf_counter() - t:.1f}s", file=sys.stderr)

    loaders = {}
    # the same number of batches in flight on both sides: the DataLoader's prefetch_factor is per worker
    # (workers * prefetch batches), DALI's prefetch_queue_depth is per pipeline
    prefetch = {"dali": max(1, args.workers) * args.prefetch, "torchvision": args.prefetch}
    for backend in ("dali", "torchvision"):
        dm = ImageDataModule(backend=backend, root=root, global_batch=args.batch, micro_batch=args.batch,
                             image_size=args.image_size, workers=args.workers, prefetch=prefetch[backend])
        dm.setup("fit")
        loaders[backend] = dm.train_dataloader()
    n_train = dm.train_images
    times = {b: [] for b in loaders}
    counts = {b: [] for b in loaders}
    cpu = {b: [] for b in loaders}
    for epoch in range(args.epochs + 1):
        for backend, loader in loaders.items():
            settle(loaders.values())
            # steady state: time from the arrival of batch `skip` to the last one, so that the batches a
            # loader had prefetched in the background (while the other one ran) are not counted as free
            stamps, seen = [], []
            t0 = time.perf_counter()
            k = min(args.skip_batches, len(loader) - 2)
            for i, (x, y) in enumerate(loader):
                stamps.append(time.perf_counter())
                seen.append(int((y >= 0).sum()))
                if i == k:
                    cpu0 = cpu_seconds(loader)
            cpu1 = cpu_seconds(loader)
            images, dt = sum(seen[k + 1:]), stamps[-1] - stamps[k]
            print(f"epoch {epoch} {backend:<12} {sum(seen)} images {stamps[-1] - t0:6.2f}s, steady {images / dt:7.1f} "
                  f"img/s, {images / (cpu1 - cpu0):7.1f} img per CPU-s" + (" (warm-up)" if epoch == 0 else ""),
                  file=sys.stderr)
            if epoch:
                times[backend].append(dt)
                counts[backend].append(images)
                cpu[backend].append(cpu1 - cpu0)
    rate = {b: sum(counts[b]) / sum(times[b]) for b in loaders}
    per_cpu = {b: sum(counts[b]) / sum(cpu[b]) for b in loaders}
    result = {"benchmark": "dataloader", "dali_cpu_img_s": round(rate["dali"], 1),
              "torchvision_img_s": round(rate["torchvision"], 1),
              "ratio_dali_over_torchvision": round(rate["dali"] / rate["torchvision"], 3),
              "dali_img_per_cpu_s": round(per_cpu["dali"], 1), "torchvision_img_per_cpu_s": round(per_cpu["torchvision"], 1),
              "cpu_ratio_dali_over_torchvision": round(per_cpu["dali"] / per_cpu["torchvision"], 3),
              "workers": args.workers, "prefetch_batches": args.workers * args.prefetch, "batch": args.batch, "image_size": args.image_size, "images": n_train,
              "epochs": args.epochs, "source_size": args.size if args.root is None else "folder",
              "cpus": os.cpu_count(), "load_avg_1min": round(os.getloadavg()[0], 2)}
    print(json.dumps(result))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
