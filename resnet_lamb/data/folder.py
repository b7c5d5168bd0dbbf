"""The folder layout every backend reads, and its start-up checks.

Layout: ``root/train/<class>/<image>`` and ``root/val/<class>/<image>`` (ImageNet's, with
``<class>`` a WordNet id there). Class names are the sorted train folder names; the label of an
image is the index of its folder's name in that list.

A root with an index (``root/{train,val}.index``, :mod:`resnet_lamb.data.index`) is read from it
and not listed; the listing below runs for roots without one, once (on rank 0 with several ranks).
The same interface (``read(i)``, ``name(i)``, ``find(name)``) serves images packed in tar shards
(:mod:`resnet_lamb.data.shards`).

Start-up checks (:func:`validate_root`, cheap: directory listings only, no image is opened):
a missing root, a root without ``train/`` or ``val/``, a split without class folders, an empty
class folder, class folders that differ between train and val, a file whose extension is not
an image extension, a folder or a broken symlink (missing target, symlink loop) inside a class
folder, a class folder that is a symlink to a folder containing it, and a folder this user cannot
list each raise :class:`resnet_lamb.errors.DataError` with one line naming the path. Only symlinked
files cost a ``stat`` each; regular files are typed by the listing itself.
Files and folders whose names start with ``.`` are ignored.

Unreadable files (permission denied) are not found at start-up (that needs a syscall per file);
at decode time they are skipped and counted like corrupt images, the warning says "permission
denied" and how to fix it.

Corrupt images (a file with an image extension that does not decode) are found at decode time,
not at start-up: reading every byte of 1.28M files before the first step would take many minutes.
Policy, the same for every backend: **skip it and count it** - the sample is replaced by a
placeholder marked with label -1 (which the loss and metrics ignore, like padding), one warning
line names the file, and it is skipped (without being decoded again) for the rest of the run.
The count is ``ImageDataModule.skipped``. A 90-epoch ImageNet run thus survives a bad file; the
warning tells the user which one to replace.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from resnet_lamb.errors import DataError

if TYPE_CHECKING:
    from resnet_lamb.data.shards import ShardSplit

# data.backend's choices (resnet_lamb.data.datamodule), named here so fit checks them before Lightning loads
BACKENDS = ("dali", "torchvision", "memory", "synthetic", "auto")
# ImageNet-1k (ILSVRC2012) sizes: the synthetic backend's counts when none are given, and what
# `report` requires of a run set beside the paper's ImageNet numbers
IMAGENET = {"train_images": 1281167, "val_images": 50000, "num_classes": 1000}
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pnm")


@dataclass
class Split:
    """One split's files: ``paths[i]`` (relative to the split folder) has label ``labels[i]``.

    The loaders get an image's bytes with ``read(i)`` and name it with ``name(i)`` (its path), the
    interface :class:`resnet_lamb.data.shards.ShardSplit` shares for images packed in tar shards."""

    root: Path
    paths: np.ndarray  # bytes ('S'), relative to root, compact for 1.28M files
    labels: np.ndarray  # int64
    sizes: np.ndarray | None = None  # bytes per file, when read from an index (a listing does not stat)

    kind = "folder"

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, i: int) -> str:
        return os.path.join(self.root, self.paths[i].decode())

    def name(self, i: int) -> str:
        """What a warning and ``ImageDataModule.skipped`` call image ``i``: its path."""
        return self.path(i)

    def read(self, i: int) -> bytes:
        """Image ``i``'s bytes: one open per image. OSError (missing, unreadable) is the caller's to
        handle: the loaders skip and count the image like a corrupt one."""
        with open(self.path(i), "rb") as f:
            return f.read()

    def find(self, name: str) -> int | None:
        """The index of the image ``name(i)`` names, None when the split holds no such image."""
        rel = os.path.relpath(name, self.root).encode()
        hits = np.flatnonzero(self.paths == rel)
        return int(hits[0]) if len(hits) else None


@dataclass
class Folder:
    root: Path
    classes: list[str]
    splits: dict[str, Split | ShardSplit] = field(default_factory=dict)
    index_hash: str | None = None  # the content hash of the index it was read from; None: listed

    @property
    def kind(self) -> str:
        """folder (one file per image) | shards (tar shards read by byte offset)."""
        return next(iter(self.splits.values())).kind if self.splits else "folder"


def _listing(folder: Path) -> list[os.DirEntry]:
    """The entries of ``folder`` (hidden ones dropped); an unreadable folder is a one-line DataError."""
    try:
        with os.scandir(folder) as it:
            return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    except PermissionError:
        raise DataError(
            f"{folder}: permission denied; make the data readable by this user (chmod -R a+rX {folder})"
        ) from None
    except OSError as err:
        raise DataError(f"{folder}: cannot list it ({err.strerror or err})") from None


def _kind(e: os.DirEntry) -> str:
    """file | dir | other (fifo, socket...); a broken symlink (missing target, symlink loop) is a
    one-line DataError."""
    try:
        if e.is_file():
            return "file"
        if e.is_dir():
            return "dir"
    except OSError:  # ELOOP: DirEntry.is_file only swallows ENOENT
        pass
    if e.is_symlink():
        raise DataError(f"{e.path}: broken symlink (its target is missing or it is a symlink loop); fix or remove it")
    return "other"


def _list_classes(split_dir: Path) -> list[str]:
    names = []
    for e in _listing(split_dir):
        kind = _kind(e)
        if kind == "dir" and e.is_symlink():
            target = os.path.realpath(e.path)
            if os.path.commonpath([target, os.path.realpath(split_dir)]) == target:  # points at or above itself
                raise DataError(f"{e.path}: symlink loop (points to {target}, which contains it); remove the link")
        if kind == "dir":
            names.append(e.name)
    if not names:
        raise DataError(
            f"{split_dir}: no class folders; expected {split_dir}/<class>/<image>.JPEG "
            "(`resnet-lamb prepare` writes this layout)"
        )
    return names


def _scan_split(split_dir: Path, classes: list[str]) -> Split:
    paths: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        cdir = split_dir / name
        entries = _listing(cdir)
        if not entries:
            raise DataError(
                f"{cdir}: empty class folder; put its images there or remove the folder from train/ and val/"
            )
        for e in entries:
            # is_file() costs nothing for a regular file (the listing's d_type) and one stat for a symlink
            kind = _kind(e)
            if kind != "file":
                what = "a folder" if kind == "dir" else "not a regular file"
                raise DataError(
                    f"{e.path}: {what} inside a class folder; images go directly in "
                    f"{split_dir.name}/<class>/, move it out of the data folder"
                )
            if not e.name.lower().endswith(IMG_EXTENSIONS):
                raise DataError(
                    f"{e.path}: not an image file (extensions read: "
                    f"{' '.join(IMG_EXTENSIONS)}); move it out of the data folder"
                )
        files = [e.name for e in entries]
        paths += [f"{name}/{f}" for f in files]
        labels += [label] * len(files)
    return Split(split_dir, np.array(paths, dtype="S"), np.array(labels, dtype=np.int64))


def require_root(backend: str, root) -> None:
    """Every backend but synthetic reads a folder: ``data.root`` must be set."""
    if backend != "synthetic" and not root:
        raise DataError(
            f"data.root: not set; backend {backend} reads root/train/<class>/ and root/val/<class>/ "
            "(`resnet-lamb prepare DATASET --out DIR` writes them), or use backend: synthetic"
        )


def validate_root(root: str | os.PathLike, splits: tuple[str, ...] = ("train", "val")) -> Folder:
    """Check the folder layout under ``root`` and index its files (no image is opened).

    Raises DataError (one line naming the path) on any structural problem. Callable before any
    model is built; :func:`resnet_lamb.data.index.load_root` calls it for a root without an index.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(
            f"{root}: data root not found; pass data.root=DIR with DIR/train/<class>/ and "
            "DIR/val/<class>/ (`resnet-lamb prepare DATASET --out DIR` writes one)"
        )
    for s in splits:
        if not (root / s).is_dir():
            raise DataError(
                f"{root / s}: missing; the data root needs train/<class>/ and val/<class>/ "
                "folders (`resnet-lamb prepare DATASET --out DIR` writes them)"
            )
    classes = _list_classes(root / splits[0])
    for s in splits[1:]:
        other = _list_classes(root / s)
        if other != classes:
            only_a = sorted(set(classes) - set(other))
            only_b = sorted(set(other) - set(classes))
            raise DataError(
                f"{root}: class folders differ between {splits[0]}/ and {s}/ "
                f"(only in {splits[0]}: {_few(only_a)}; only in {s}: {_few(only_b)}); "
                "both splits need the same class folders"
            )
    folder = Folder(root, classes)
    for s in splits:
        folder.splits[s] = _scan_split(root / s, classes)
    return folder


def _few(names: list[str], n: int = 5) -> str:
    if not names:
        return "none"
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def check_counts(folder: Folder, given: dict, root) -> None:
    """The counts a recipe states (``given``: ``train_images``, ``val_images``, ``num_classes``;
    None = count it) against the folder: every mismatch in one DataError."""
    found = {
        "train_images": len(folder.splits["train"]),
        "val_images": len(folder.splits["val"]),
        "num_classes": len(folder.classes),
    }
    wrong = [key for key, value in given.items() if value is not None and value != found[key]]
    if wrong:
        stated = ", ".join(f"data.{key} {given[key]} (the folder: {found[key]})" for key in wrong)
        fix = " ".join(f"--data.{key} {found[key]}" for key in wrong)
        raise DataError(
            f"{root} does not hold what the recipe states: {stated}; pass {fix}, or set "
            f"{'them' if len(wrong) > 1 else 'it'} in the recipe (null: counted from the folder; the "
            "model's class count follows data.num_classes)"
        )
