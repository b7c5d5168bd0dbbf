"""ILSVRC2012 for ``resnet-lamb prepare imagenet`` (:mod:`resnet_lamb.data.prepare`), from the user's
own archives: ``--train-tar`` ILSVRC2012_img_train.tar (one tar per wnid inside), ``--val-tar``
ILSVRC2012_img_val.tar, ``--devkit`` ILSVRC2012_devkit_t12.tar.gz (the validation labels). Nothing is
downloaded; the training archive is streamed in one pass.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np

from resnet_lamb.data.folder_writer import FolderWriter
from resnet_lamb.errors import DataError


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


def imagenet(args, w: FolderWriter):
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
