"""The index of a data root: one file per split that ``fit`` reads instead of listing the tree.

``ROOT/<split>.index``: a first line ``resnet-lamb-index <version> <header bytes>``, a JSON header,
then the arrays' raw bytes (read with one ``read()``, the arrays taken from it without a copy):

- ``names`` (bytes): a folder's image path relative to ``ROOT/<split>`` (``<class>/<file>``), or a
  shard member's name (``<class>/<key>.jpg``);
- ``labels`` (int64), ``sizes`` (int64, bytes per image);
- shards only: ``shard`` (int32, number of the shard in ``shards``) and ``offset`` (int64, byte
  offset of the member's data in its shard).

The header holds ``kind`` (folder | shards), ``split``, ``images``, ``classes`` (label order),
``hash`` (a content hash of the arrays, the kind, the classes and the shard list), the arrays'
dtypes and places, and what the start-up check compares with the tree: ``dirs`` (folder:
modification time of the split folder and of each class folder) or ``shards`` (``[name, bytes]``
per shard).

Who writes it: ``resnet-lamb prepare`` and ``resnet-lamb pack`` (with the data), ``resnet-lamb index
ROOT`` (over an existing folder or shard set; ``--check`` compares instead of writing).

Who reads it: :func:`load_root`, on every rank at ``fit`` start-up (one open and one read per split,
whatever the number of images). Only rank 0 checks (``check=True``): the content hash; for a folder,
one ``stat`` per class folder (a file added, removed or renamed changes its folder's time); for
shards, one ``stat`` per shard (missing, truncated, another size) and the tar headers of its first
and last member (another data set, another packing). A shard that fails is then scanned header by
header to name the first member that is not where the index says. ``full=True`` (``data.index_check``,
``index --check``) re-lists the whole tree, or reads every shard's headers and labels, and compares
every entry. A failed check is one line naming the folder, or the shard and member, and saying how
to rebuild the index. A root without an index is listed as before (:mod:`resnet_lamb.data.folder`),
or its shards' headers read, by one rank (:class:`resnet_lamb.data.datamodule.ImageDataModule`
shares the result with the others).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

from resnet_lamb.data.folder import Folder, Split, validate_root
from resnet_lamb.data.shards import ShardSplit
from resnet_lamb.errors import DataError

SPLITS = ("train", "val")
FORMAT, VERSION = "resnet-lamb-index", 1
LISTING_HINT_FILES = 50_000  # our choice: above this a listing takes seconds on a network file system


def index_path(root: str | os.PathLike, split: str) -> Path:
    return Path(root).expanduser() / f"{split}.index"


def rebuild_hint(root) -> str:
    return f"rebuild the index: resnet-lamb index {root}"


# ---------------------------------------------------------------------------------- the file
def content_hash(kind: str, classes: list[str], arrays: dict[str, np.ndarray], shards: list | None) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps([kind, list(classes), shards or []]).encode())
    for key in ("names", "labels", "sizes", "shard", "offset"):
        if key in arrays:
            a = np.ascontiguousarray(arrays[key])
            h.update(f"{key}:{a.dtype.str}:{a.shape}".encode())
            h.update(a.data)
    return h.hexdigest()


def write_index(
    root,
    split: str,
    *,
    kind: str,
    classes: list[str],
    names,
    labels,
    sizes,
    shard=None,
    offset=None,
    shards: list | None = None,
    dirs: dict | None = None,
) -> Path:
    """Write ``ROOT/<split>.index`` atomically (temp file + rename); returns its path."""
    arrays = {
        "names": np.asarray(names, dtype="S"),
        "labels": np.asarray(labels, dtype=np.int64),
        "sizes": np.asarray(sizes, dtype=np.int64),
    }
    if kind == "shards":
        arrays.update(shard=np.asarray(shard, dtype=np.int32), offset=np.asarray(offset, dtype=np.int64))
    meta = {
        "kind": kind,
        "split": split,
        "images": len(arrays["labels"]),
        "classes": list(classes),
        "hash": content_hash(kind, classes, arrays, shards),
    }
    if shards is not None:
        meta["shards"] = [list(s) for s in shards]
    if dirs is not None:
        meta["dirs"] = dirs
    layout, at = {}, 0
    for key, a in arrays.items():
        layout[key] = [a.dtype.str, len(a), at]
        at += a.nbytes
    meta["arrays"] = layout
    header = json.dumps(meta).encode()
    path = index_path(root, split)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(f"{FORMAT} {VERSION} {len(header)}\n".encode() + header)
        for a in arrays.values():
            f.write(np.ascontiguousarray(a).data)
    os.replace(tmp, path)
    return path


class Index:
    """One split's index as read from disk: ``meta`` (dict) and the arrays."""

    def __init__(self, path: Path, meta: dict, arrays: dict[str, np.ndarray]):
        self.path, self.meta, self.arrays = path, meta, arrays

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    def verify_hash(self) -> None:
        shards = self.meta.get("shards")
        if content_hash(self.kind, self.meta["classes"], self.arrays, shards) != self.meta["hash"]:
            raise DataError(
                f"{self.path}: damaged or edited (its content hash does not match); {rebuild_hint(self.path.parent)}"
            )


def read_index(path: Path, header_only: bool = False) -> Index:
    """One open, one read. ``header_only``: the counts and classes without the arrays."""
    bad = f"{path}: not a readable index ({{}}); {rebuild_hint(path.parent)}"
    try:
        with open(path, "rb") as f:
            data = f.read(4096) if header_only else f.read()
            nl = data.find(b"\n", 0, 200)
            fmt, version, size_text = data[: max(nl, 0)].decode("ascii", "replace").split(" ")
            if fmt != FORMAT:
                raise ValueError(f"it starts with {data[:40]!r}")
            if int(version) != VERSION:
                raise DataError(f"{path}: an index of version {version}, not {VERSION}; {rebuild_hint(path.parent)}")
            start, size = nl + 1, int(size_text)
            if header_only and len(data) < start + size:
                data += f.read(start + size - len(data))
        meta = json.loads(data[start : start + size])
        arrays = {}
        if not header_only:
            body = memoryview(data)[start + size :]  # the arrays share the bytes read (no copy)
            for key, (dtype, n, at) in meta["arrays"].items():
                arrays[key] = np.frombuffer(body, dtype=dtype, count=n, offset=at)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(bad.format(f"{type(err).__name__}: {str(err)[:100]}")) from None
    return Index(path, meta, arrays)


def count_images(root, split: str = "train") -> int:
    """Images in a split: the index's count when there is one (nothing else is read), else a listing."""
    path = index_path(root, split)
    if path.is_file():
        return int(read_index(path, header_only=True).meta["images"])
    from resnet_lamb.data import shards

    if shards.is_shard_split(Path(root).expanduser() / split):
        return len(shards.scan_split(Path(root).expanduser(), split))
    return len(validate_root(root, (split,)).splits[split])


# ---------------------------------------------------------------------------------- building
def _dir_times(root: Path, split: str, classes: list[str]) -> dict[str, int]:
    d = root / split
    times = {"": os.stat(d).st_mtime_ns}
    for c in classes:
        times[c] = os.stat(d / c).st_mtime_ns
    return times


def folder_entries(folder: Folder, split: str) -> dict:
    """``write_index`` arguments for a listed folder split (one ``stat`` per file for the sizes)."""
    sp = folder.splits[split]
    assert isinstance(sp, Split)  # a folder layout's split (build_index gives shards their own entries)
    sizes = np.fromiter((os.stat(sp.path(i)).st_size for i in range(len(sp))), dtype=np.int64, count=len(sp))
    return dict(
        kind="folder",
        classes=folder.classes,
        names=sp.paths,
        labels=sp.labels,
        sizes=sizes,
        dirs=_dir_times(Path(folder.root), split, folder.classes),
    )


def build_index(root) -> dict[str, Index]:
    """List a folder (or read a shard set's headers) and write its index; returns the indexes written."""
    root = Path(root).expanduser()
    folder = discover(root)
    out = {}
    for split in SPLITS:
        sp = folder.splits[split]
        if isinstance(sp, ShardSplit):
            kw = dict(sp.index_entries(), classes=folder.classes)
        else:
            kw = folder_entries(folder, split)
        out[split] = read_index(write_index(root, split, **kw))
    return out


# ---------------------------------------------------------------------------------- loading
def discover(root: Path) -> Folder:
    """A root without an index: list the folder layout, or read the tar headers of a shard set."""
    from resnet_lamb.data import shards

    train = root / SPLITS[0]
    if root.is_dir() and train.is_dir() and shards.is_shard_split(train):
        return shards.scan_root(root)
    return validate_root(root)


def has_index(root) -> bool:
    return any(index_path(root, s).is_file() for s in SPLITS)


def load_root(root, *, check: bool = True, full: bool = False) -> Folder:
    """The data root as the loaders read it: from its index when it has one, else listed.

    ``check``: the cheap checks against the tree (rank 0 at start-up); ``full``: compare every entry
    (re-list the folder, read every shard's headers). Any failure: DataError, one line."""
    root = Path(root).expanduser()
    present = [s for s in SPLITS if index_path(root, s).is_file()]
    if not present:
        folder = discover(root)
        if check and folder.kind == "folder":
            n = sum(len(s) for s in folder.splits.values())
            if n >= LISTING_HINT_FILES:
                print(
                    f"resnet-lamb: {root}: listed {n} files (no index); `resnet-lamb index {root}` writes one "
                    "so that later runs read it instead",
                    file=sys.stderr,
                    flush=True,
                )
        return folder
    if len(present) < len(SPLITS):
        gone = next(s for s in SPLITS if s not in present)
        raise DataError(
            f"{index_path(root, gone)}: missing, but {index_path(root, present[0]).name} is there; {rebuild_hint(root)}"
        )
    idx = {s: read_index(index_path(root, s)) for s in SPLITS}
    kinds = {i.kind for i in idx.values()}
    first = idx[SPLITS[0]]
    if len(kinds) > 1 or any(i.meta["classes"] != first.meta["classes"] for i in idx.values()):
        raise DataError(f"{root}: the train and val indexes disagree (kind or classes); {rebuild_hint(root)}")
    folder = Folder(root, list(first.meta["classes"]), index_hash=_combined_hash(idx))
    for s, i in idx.items():
        folder.splits[s] = _split_from_index(root, s, i)
    if check or full:
        for s, i in idx.items():
            i.verify_hash()
            sp = folder.splits[s]
            if isinstance(sp, ShardSplit):
                sp.check_cheap()
            else:
                _check_folder_times(root, s, i)
    if full:
        if folder.kind == "folder":
            _check_folder_full(root, folder)
        else:
            for s in SPLITS:
                sp = folder.splits[s]
                if isinstance(sp, ShardSplit):
                    sp.check_full()
    return folder


def _combined_hash(idx: dict[str, Index]) -> str:
    return "-".join(idx[s].meta["hash"] for s in SPLITS)


def _split_from_index(root: Path, split: str, i: Index):
    a = i.arrays
    if i.kind == "folder":
        return Split(root / split, a["names"], a["labels"], a["sizes"])
    if i.kind == "shards":
        return ShardSplit(
            root / split,
            [str(n) for n, _ in i.meta["shards"]],
            [int(b) for _, b in i.meta["shards"]],
            a["names"],
            a["labels"],
            a["sizes"],
            a["shard"],
            a["offset"],
        )
    raise DataError(f"{i.path}: unknown kind {i.kind!r}; {rebuild_hint(root)}")


def _check_folder_times(root: Path, split: str, i: Index) -> None:
    """One stat per class folder: adding, removing or renaming a file changes its folder's time."""
    dirs = i.meta.get("dirs") or {}
    base = os.path.join(root, split)
    for name, mtime in dirs.items():
        d = os.path.join(base, name) if name else base  # (plain strings: a pathlib join per class costs more)
        try:
            now = os.stat(d).st_mtime_ns
        except OSError as err:
            raise DataError(
                f"{d}: {err.strerror or 'cannot stat it'}, but the index lists it; {rebuild_hint(root)}"
            ) from None
        if now != mtime:
            what = "class folders added or removed" if not name else "files added, removed or renamed"
            raise DataError(
                f"{d}: changed since the index was written ({what}, or copied without its times); "
                f"{rebuild_hint(root)}, or check it with --data.index_check true"
            )


def _check_folder_full(root: Path, folder: Folder) -> None:
    """Re-list the tree (plus one stat per file for the sizes) and compare every entry with the index."""
    listed = validate_root(root)
    problems = []
    if listed.classes != folder.classes:
        problems.append(
            f"{root}: class folders {_few(listed.classes)} in the tree, {_few(folder.classes)} in the index"
        )
    for split in SPLITS:
        sp, ls = folder.splits[split], listed.splits[split]
        assert sp.sizes is not None  # read from an index, which holds every file's size
        have = dict(zip(sp.paths.tolist(), zip(sp.labels.tolist(), sp.sizes.tolist(), strict=True), strict=True))
        seen = dict(zip(ls.paths.tolist(), ls.labels.tolist(), strict=True))
        for rel, label in seen.items():
            path = root / split / rel.decode()
            if rel not in have:
                problems.append(f"{path}: in the tree but not in the index")
            elif have[rel][0] != label:
                problems.append(f"{path}: label {label} in the tree, {have[rel][0]} in the index")
            elif os.stat(path).st_size != have[rel][1]:
                problems.append(f"{path}: {os.stat(path).st_size} bytes, the index says {have[rel][1]}")
        for rel in have.keys() - seen.keys():
            problems.append(f"{root / split / rel.decode()}: in the index but not in the tree")
    if problems:
        more = f" (and {len(problems) - 1} more differences)" if len(problems) > 1 else ""
        raise DataError(f"{sorted(problems)[0]}{more}; {rebuild_hint(root)}")


def _few(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" ... ({len(names)})" if len(names) > n else "")


def startup_folder(root, *, rank0: bool, counts_given: bool, full: bool = False) -> Folder | None:
    """``fit``'s view of the data root before the ranks can talk to each other (no process group yet).

    Every rank reads the index when there is one (the counts for the plan); rank 0 checks it against
    the tree (``full``: every entry). Without an index rank 0 lists the tree (the layout checks run
    there); the other ranks do only when the recipe does not give the image counts, and in any case
    take rank 0's listing in ``ImageDataModule.setup``. None: this rank has nothing to read yet."""
    if rank0:
        return load_root(root, check=True, full=full)
    if has_index(root) or not counts_given:
        return load_root(root, check=False)
    return None


# ---------------------------------------------------------------------------------- `resnet-lamb index`
def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="resnet-lamb index",
        description=(
            "Write ROOT/train.index and ROOT/val.index for a data root (a folder ROOT/<split>/<class>/<image> "
            "or tar shards ROOT/<split>/*.tar), so that fit reads them instead of listing the tree; "
            "--check compares an existing index with the tree instead."
        ),
    )
    p.add_argument("root")
    p.add_argument("--check", action="store_true", help="re-list the tree (read every shard's headers) and compare")
    args = p.parse_args(argv)
    root = Path(args.root).expanduser()
    if args.check:
        if not has_index(root):
            raise DataError(f"{root}: has no index to check; write one: resnet-lamb index {root}")
        folder = load_root(root, check=True, full=True)
        print(
            f"{root}: the index matches the tree ({len(folder.splits['train'])} train / "
            f"{len(folder.splits['val'])} val images, {folder.kind})"
        )
        return 0
    written = build_index(root)
    print(f"{root}: wrote " + ", ".join(f"{i.path.name} ({i.meta['images']} images)" for i in written.values()))
    return 0
