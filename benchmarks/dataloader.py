"""Training-input throughput: DALI (CPU-only mode) against torchvision's DataLoader, each reading the
same images from a folder (one file per image) and from tar shards (read by byte offset).

Same JPEGs (full-size photos-like JPEGs, default 500x375, generated in a temp folder, or --root with a
prepared layout; packed with `resnet-lamb pack` into shards of --shard-size), same transforms
(random-resized-crop 224, flip, normalise), same number of threads / worker processes (--workers),
same batch, same number of batches in flight (--prefetch per DataLoader worker, so workers * prefetch
for DALI's prefetch queue). Epochs are interleaved (DALI folder, DALI shards, torchvision folder,
torchvision shards, then each pair the other way round, ...) so that load from other processes hits
all alike, and shards/folder ratios are also given per round (median of the paired epochs); before each one the
benchmark waits until the others have stopped working in the background (DALI prefetches the next
epoch's first batches), the first epoch of each is a warm-up, and each epoch is timed from its
--skip-batches-th batch on (steady state: what a loader prefetched while another one ran is not
counted). Besides images/s (wall clock, which depends on what else runs on the machine) it reports
images per CPU-second (this process's CPU time, DALI's threads included, plus the DataLoader's worker
processes), which load does not skew, and the files each loader opened under the data root in each
epoch, in every process that reads (DALI on the CPU reads in this process; torchvision in its
--workers worker processes, counted by an audit hook installed in each), with the number of reading
processes and of shards: a shard is opened once per reading process, when that process first reads
from it, and kept open. Then, what the layout alone changes: an epoch's bytes read through each
layout's ``read(i)`` in epoch_plan's order, without decoding (alternating, median of --read-repeats).
Last line: one JSON object with the rates, the counts and their ratios.

    python benchmarks/dataloader.py [--images 1024] [--epochs 3] [--workers 2] [--batch 64] [--shard-size 8M]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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


class CountOpens:
    """A DataLoader worker_init_fn that also installs an audit hook in the worker counting its opens of
    files under ``root`` (all of them, and the distinct ones) into shared counters."""

    def __init__(self, inner, root: str, opens, distinct):
        self.inner, self.root, self.opens, self.distinct = inner, root, opens, distinct

    def __call__(self, worker_id: int):
        if self.inner is not None:
            self.inner(worker_id)
        install_open_counter(self.root, self.opens, self.distinct)


def install_open_counter(root: str, opens, distinct, active=None, name=None) -> None:
    """Count this process's opens under ``root``; with ``active`` (a one-item list), only while
    ``active[0] == name`` (several loaders read in this process, one at a time)."""
    seen: set[str] = set()

    def hook(event, args):
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)) \
                and (active is None or active[0] == name):
            path = os.fsdecode(args[0])
            if path.startswith(root):
                with opens.get_lock():
                    opens.value += 1
                if path not in seen:
                    seen.add(path)
                    with distinct.get_lock():
                        distinct.value += 1

    sys.addaudithook(hook)


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
    p.add_argument("--shard-size", default="8M", help="bytes per shard when packing (default 8M: several shards "
                                                      "for the default 1024 images of ~60 KB)")
    p.add_argument("--read-repeats", type=int, default=15, help="passes of the read-only comparison per layout")
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

    import multiprocessing as mp

    from resnet_lamb.data.pack import pack, parse_size

    shards_tmp = tempfile.TemporaryDirectory(prefix="resnet-lamb-bench-shards-")
    shards_root = os.path.join(shards_tmp.name, "shards")
    t = time.perf_counter()
    pack(root, shards_root, shard_size=parse_size(args.shard_size), quiet=True)
    n_shards = len([f for f in os.listdir(os.path.join(shards_root, "train")) if f.endswith(".tar")])
    print(f"packed into {n_shards} train shards in {time.perf_counter() - t:.1f}s", file=sys.stderr)

    # what the layout changes, without the decoding both share: an epoch's bytes read in epoch_plan's
    # order through each split's read(i), in this process, interleaved, median of --read-repeats (before
    # any audit hook is installed here: they would tax the folder's one open per image)
    from resnet_lamb.data.index import load_root
    from resnet_lamb.data.sampling import epoch_plan

    splits = {"folder": load_root(root).splits["train"], "shards": load_root(shards_root).splits["train"]}
    order = epoch_plan(len(splits["folder"]), args.batch, args.batch, 1, 0, epoch=0)[0]
    read_s = {k: [] for k in splits}
    for rep in range(args.read_repeats):
        for layout in ("folder", "shards") if rep % 2 == 0 else ("shards", "folder"):
            split = splits[layout]
            t = time.perf_counter()
            for i in order:
                split.read(int(i))
            read_s[layout].append(time.perf_counter() - t)
    read_rate = {k: len(order) / statistics.median(v) for k, v in read_s.items()}
    print(f"read only: folder {read_rate['folder']:.0f} img/s, shards {read_rate['shards']:.0f} img/s",
          file=sys.stderr)

    loaders, opens, distinct, roots, active = {}, {}, {}, {}, [None]
    # the same number of batches in flight on both sides: the DataLoader's prefetch_factor is per worker
    # (workers * prefetch batches), DALI's prefetch_queue_depth is per pipeline
    prefetch = {"dali": max(1, args.workers) * args.prefetch, "torchvision": args.prefetch}
    readers = {"dali": 1, "torchvision": max(1, args.workers)}
    for backend in ("dali", "torchvision"):
        for layout, where in (("folder", root), ("shards", shards_root)):
            name = backend if layout == "folder" else f"{backend}_shards"
            dm = ImageDataModule(backend=backend, root=where, global_batch=args.batch, micro_batch=args.batch,
                                 image_size=args.image_size, workers=args.workers, prefetch=prefetch[backend])
            dm.setup("fit")
            loader = loaders[name] = dm.train_dataloader()
            roots[name] = os.path.join(os.path.realpath(where), "train")
            opens[name], distinct[name] = mp.Value("q", 0), mp.Value("q", 0)
            if backend == "torchvision" and args.workers > 0:
                loader.loader.worker_init_fn = CountOpens(loader.loader.worker_init_fn, roots[name], opens[name],
                                                          distinct[name])
            else:  # read in this process, while it is the loader iterated
                install_open_counter(roots[name], opens[name], distinct[name], active, name)
    n_train = dm.train_images
    times = {b: [] for b in loaders}
    counts = {b: [] for b in loaders}
    cpu = {b: [] for b in loaders}
    opened = {b: [] for b in loaders}  # files opened under the data root, per epoch
    names = list(loaders)  # dali, dali_shards, torchvision, torchvision_shards
    swapped = [names[1], names[0], names[3], names[2]]
    for epoch in range(args.epochs + 1):
        # folder then shards in even rounds, shards then folder in odd ones: neither always goes first
        for backend in names if epoch % 2 == 0 else swapped:
            loader = loaders[backend]
            settle(loaders.values())
            active[0] = backend
            before = opens[backend].value
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
            opened[backend].append(opens[backend].value - before)
            active[0] = None
            images, dt = sum(seen[k + 1:]), stamps[-1] - stamps[k]
            print(f"epoch {epoch} {backend:<18} {sum(seen)} images {stamps[-1] - t0:6.2f}s, steady {images / dt:7.1f} "
                  f"img/s, {images / (cpu1 - cpu0):7.1f} img per CPU-s, {opened[backend][-1]} files opened"
                  + (" (warm-up)" if epoch == 0 else ""), file=sys.stderr)
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
              "cpu_ratio_dali_over_torchvision": round(per_cpu["dali"] / per_cpu["torchvision"], 3)}
    for backend in ("dali", "torchvision"):
        sh = f"{backend}_shards"
        key = "dali_cpu" if backend == "dali" else backend
        result.update({
            f"{key}_shards_img_s": round(rate[sh], 1),
            f"ratio_shards_over_folder_{backend}": round(rate[sh] / rate[backend], 3),
            f"cpu_ratio_shards_over_folder_{backend}": round(per_cpu[sh] / per_cpu[backend], 3),
            # the two epochs of one round ran next to each other: their ratio drifts less with the load
            f"paired_ratio_shards_over_folder_{backend}": round(statistics.median(
                (counts[sh][e] / times[sh][e]) / (counts[backend][e] / times[backend][e]) for e in range(args.epochs)), 3),
            f"paired_cpu_ratio_shards_over_folder_{backend}": round(statistics.median(
                (counts[sh][e] / cpu[sh][e]) / (counts[backend][e] / cpu[backend][e]) for e in range(args.epochs)), 3),
            f"{backend}_reading_processes": readers[backend],
            f"{backend}_folder_files_opened_per_epoch": opened[backend],
            f"{backend}_shards_files_opened_per_epoch": opened[sh],
            f"{backend}_shards_distinct_files_opened": distinct[sh].value})
    result.update({"read_only_folder_img_s": round(read_rate["folder"]), "read_only_shards_img_s": round(read_rate["shards"]),
                   "read_only_ratio_shards_over_folder": round(read_rate["shards"] / read_rate["folder"], 2)})
    result.update({"train_shards": n_shards, "shard_size": args.shard_size,
                   "workers": args.workers, "prefetch_batches": args.workers * args.prefetch, "batch": args.batch,
                   "image_size": args.image_size, "images": n_train, "epochs": args.epochs,
                   "source_size": args.size if args.root is None else "folder",
                   "cpus": os.cpu_count(), "load_avg_1min": round(os.getloadavg()[0], 2)})
    print(json.dumps(result))
    shards_tmp.cleanup()
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
