"""Training-input throughput: DALI (CPU-only mode) against torchvision's DataLoader.

Same JPEG folder (full-size photos-like JPEGs, default 500x375, generated in a temp folder, or
--root with a prepared layout), same transforms (random-resized-crop 224, flip, normalise), same
number of threads / worker processes (--workers), same batch. Epochs are interleaved (DALI,
torchvision, DALI, ...) so that load from other processes hits both alike; the first epoch of each
is a warm-up. Last line: one JSON object with both rates and their ratio.

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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", help="a prepared folder (train/<class>/*.JPEG); default: generate one")
    p.add_argument("--images", type=int, default=384)
    p.add_argument("--size", default="500x375", help="generated JPEGs' WxH")
    p.add_argument("--epochs", type=int, default=4, help="timed epochs per backend (plus one warm-up)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--image-size", type=int, default=224)
    args = p.parse_args(argv)

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
    for backend in ("dali", "torchvision"):
        dm = ImageDataModule(backend=backend, root=root, global_batch=args.batch, micro_batch=args.batch,
                             image_size=args.image_size, workers=args.workers)
        dm.setup("fit")
        loaders[backend] = dm.train_dataloader()
    n_train = dm.train_images
    times = {b: [] for b in loaders}
    counts = {b: [] for b in loaders}
    for epoch in range(args.epochs + 1):
        for backend, loader in loaders.items():
            t = time.perf_counter()
            seen = 0
            for x, y in loader:
                seen += int((y >= 0).sum())
            dt = time.perf_counter() - t
            print(f"epoch {epoch} {backend:<12} {seen} images {dt:6.2f}s {seen / dt:8.1f} img/s"
                  + (" (warm-up)" if epoch == 0 else ""), file=sys.stderr)
            if epoch:
                times[backend].append(dt)
                counts[backend].append(seen)
    rate = {b: sum(counts[b]) / sum(times[b]) for b in loaders}
    result = {"benchmark": "dataloader", "dali_cpu_img_s": round(rate["dali"], 1),
              "torchvision_img_s": round(rate["torchvision"], 1),
              "ratio_dali_over_torchvision": round(rate["dali"] / rate["torchvision"], 3),
              "workers": args.workers, "batch": args.batch, "image_size": args.image_size, "images": n_train,
              "epochs": args.epochs, "source_size": args.size if args.root is None else "folder",
              "cpus": os.cpu_count()}
    print(json.dumps(result))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
