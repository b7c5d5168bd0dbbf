"""Packed shards: each split as a few large tar files (webdataset layout), read by byte offset.

Layout (``resnet-lamb pack SRC --out DIR`` or ``resnet-lamb prepare ... --shards``)::

    DIR/train/train-000000.tar ...   members <key>.<ext> (the image's bytes, unchanged) and <key>.cls
    DIR/val/val-000000.tar ...       (its label, decimal text); key = <class>/<file name without extension>
    DIR/train.index, DIR/val.index   per image: member name, label, size, shard, byte offset
    DIR/classes.txt                          class names in label order

Shards close at ``--shard-size`` bytes (default 512 MiB; our choice: webdataset's advice is 100 MB
to 1 GB per shard, and ImageNet's 140 GB then make about 280 shards, so one open file per shard
per reading process stays far below the usual limit of 1024). Training members are placed in a
seeded random order (``--seed``), validation members in order; the index lists images in the
order of the folder they came from (class, then name), so a folder and its shards give the same
image numbers and, with the same seed, the same batches.

Reading: :class:`ShardSplit` serves the loaders the same ``read(i) -> bytes`` / ``name(i)`` as a
folder's :class:`resnet_lamb.data.folder.Split`: one ``pread`` of the member's 512-byte tar header
and its data at the offset the index gives, from a file descriptor opened once per shard per
reading process (the first time that process reads from the shard) and kept for the run. The
order of the reads is :func:`resnet_lamb.data.sampling.epoch_plan`'s, exactly as for a folder, so
every guarantee of the folder path holds unchanged: each image once per epoch across ranks, the
padding (or full-batch) mode of the recipe, an exact resume. That is why DALI's
``fn.readers.webdataset`` is not used: it reads each shard from start to end, shards the samples by
rank itself and shuffles within a bounded buffer, so it cannot follow a global per-epoch
permutation given from outside, the shard-level order plus in-buffer shuffle differs from the
folder path, and a mid-epoch resume would need DALI's own checkpointing. The price of offset reads
is random access within a shard: fine on local disks and parallel file systems that read ahead
little; see README "Data" for staging shards on node-local disk.

A member's header is checked on every read (its name and size at the index's offset): a member the
index names but the shard does not hold at that place is one line naming the shard and the member
(:class:`resnet_lamb.errors.DataError`), not a silently wrong image. A corrupt image inside a shard
(bytes that do not decode) is skipped and counted like a corrupt file in a folder; its name is
``<shard path>::<member>``.
"""

from __future__ import annotations

import io
import os
import re
import sys
import tarfile
import threading
from pathlib import Path
from typing import BinaryIO

import numpy as np

from resnet_lamb.data.folder import Folder, Split
from resnet_lamb.errors import DataError

MEMBER_SEP = "::"  # an image inside a shard is named <shard path>::<member>
HEADER = tarfile.BLOCKSIZE  # 512: a member's data follows its header block
DEFAULT_SHARD_SIZE = 512 * 2**20
IMAGE_EXTS = ("jpg", "jpeg", "png", "bmp", "webp", "tif", "tiff", "ppm", "pgm", "pnm")
CLASSES_FILE = "classes.txt"


def parse_size(text: str) -> int:
    """``512M``, ``1G``, ``64KiB``, ``100000`` -> bytes (K/M/G are powers of 1024)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)(?:i?[bB])?\s*", str(text))
    if not m:
        raise DataError(f"--shard-size: {text!r} is not a size; give bytes, or a number with K, M or G (512M)")
    value = int(float(m.group(1)) * 1024 ** " KMG".index(m.group(2).upper() or " "))
    if value < 1:
        raise DataError(f"--shard-size: {text!r} must be at least 1 byte")
    return value


def member_key(rel: str) -> tuple[str, str]:
    """``<class>/<name>.JPEG`` -> (``<class>/<name>``, ``jpg``). Dots inside the name become ``_``:
    webdataset takes everything after the first dot of a member's base name as its field."""
    folder, _, base = rel.rpartition("/")
    stem, _, ext = base.rpartition(".")
    ext = ext.lower()
    ext = "jpg" if ext == "jpeg" else ext
    stem = stem.replace(".", "_")
    return (f"{folder}/{stem}" if folder else stem), ext


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


def _rebuild(root) -> str:
    from resnet_lamb.data.index import rebuild_hint

    return rebuild_hint(root)


# ---------------------------------------------------------------------------------- reading
class ShardSplit:
    """One split packed in shards: image ``i`` is member ``names[i]`` of shard ``shard[i]``, its data at
    ``offset[i]`` (``sizes[i]`` bytes), label ``labels[i]``."""

    kind = "shards"

    def __init__(self, root, shard_names, shard_sizes, names, labels, sizes, shard, offset):
        self.root = Path(root)
        self.shard_names, self.shard_sizes = list(shard_names), list(shard_sizes)
        self.paths = np.asarray(names, dtype="S")  # member names (the folder Split's ``paths``)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.shard = np.asarray(shard, dtype=np.int32)
        self.offset = np.asarray(offset, dtype=np.int64)
        self._fds: dict[int, int] = {}
        self._opening = threading.Lock()  # the DALI loader reads from a thread pool: one open per shard
        self._find: dict[str, int] | None = None
        self.opened = 0  # shard files this object opened (in this process)

    def __len__(self) -> int:
        return len(self.labels)

    def __getstate__(self):  # file descriptors stay in their process; a worker opens its own
        state = dict(self.__dict__)
        state.update(_fds={}, _find=None, opened=0)
        del state["_opening"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state, _opening=threading.Lock())

    def __del__(self):
        self.close()

    def close(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except Exception:  # noqa: BLE001 - also at interpreter exit, when os may be gone
                pass
        self._fds = {}

    def shard_path(self, s: int) -> Path:
        return self.root / self.shard_names[s]

    def member(self, i: int) -> str:
        return self.paths[i].decode()

    def name(self, i: int) -> str:
        return f"{self.shard_path(int(self.shard[i]))}{MEMBER_SEP}{self.member(i)}"

    def find(self, name: str) -> int | None:
        shard, _, member = name.rpartition(MEMBER_SEP)
        if os.path.dirname(shard) != str(self.root):
            return None  # another split's (or another root's) image
        if self._find is None:
            self._find = {m.decode(): i for i, m in enumerate(self.paths.tolist())}
        return self._find.get(member)

    def _fd(self, s: int) -> int:
        fd = self._fds.get(s)
        if fd is not None:
            return fd
        with self._opening:
            fd = self._fds.get(s)
            if fd is not None:  # another thread opened it meanwhile
                return fd
            if not self._fds:
                _ensure_open_files(len(self.shard_names) + 64)
            path = self.shard_path(s)
            try:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError as err:
                raise DataError(
                    f"{path}: cannot open this shard ({err.strerror or err}); copy it back or make it "
                    f"readable (chmod a+r), or {_rebuild(self.root.parent)}"
                ) from None
            self._fds[s] = fd
            self.opened += 1
            return fd

    def read(self, i: int) -> memoryview:
        """Image ``i``'s bytes: one ``pread`` of its header and data from the open shard."""
        s, off, size = self.shard.item(i), self.offset.item(i), self.sizes.item(i)
        fd = self._fds.get(s)
        buf = os.pread(self._fd(s) if fd is None else fd, size + HEADER, off - HEADER)
        if len(buf) < size + HEADER:
            raise DataError(
                f"{self.shard_path(s)}: truncated: member {self.member(i)} (bytes {off}-{off + size}) "
                f"is cut off; copy the shard again, or {_rebuild(self.root.parent)}"
            )
        if not _header_matches(buf, self.paths[i], size):
            raise DataError(
                f"{self.shard_path(s)}: no member {self.member(i)} at byte {off} as the index says (the "
                f"index is stale or from another data set); {_rebuild(self.root.parent)}"
            )
        return memoryview(buf)[HEADER:]

    # -- checks against the shards (index.load_root calls them on rank 0)
    def _members_of(self, s: int) -> np.ndarray:
        idx = np.flatnonzero(self.shard == s)
        return idx[np.argsort(self.offset[idx], kind="stable")]

    def check_cheap(self) -> None:
        """Per shard: one stat (missing, truncated, another size) and the headers of its first and last
        member (another data set, another packing); a shard that fails is scanned to name the member."""
        _ensure_open_files(len(self.shard_names) + 64, check_only=True)
        for s, expected in enumerate(self.shard_sizes):
            path = self.shard_path(s)
            members = self._members_of(s)
            try:
                actual = os.stat(path).st_size
            except OSError as err:
                first = self.member(members[0]) if len(members) else "none"
                raise DataError(
                    f"{path}: missing shard ({err.strerror or err}); the index lists {len(members)} images "
                    f"in it (the first: {first}); copy it back, or {_rebuild(self.root.parent)}"
                ) from None
            if actual != expected or not self._ends_match(path, members):
                self._locate(s, actual, members)

    def _ends_match(self, path: Path, members: np.ndarray) -> bool:
        if not len(members):
            return True
        with open(path, "rb", buffering=0) as f:
            for i in (members[0], members[-1]):
                f.seek(int(self.offset[i]) - HEADER)
                if not _header_matches(f.read(HEADER), self.paths[i], int(self.sizes[i])):
                    return False
        return True

    def _locate(self, s: int, actual: int, members: np.ndarray) -> None:
        """Name the first member of shard ``s`` that is not where the index says (scanning its headers)."""
        path = self.shard_path(s)
        found = {m.name: (m.offset_data, m.size) for m in scan_shard(path)}  # a member cut off: one line
        for i in members:
            off, size = int(self.offset[i]), int(self.sizes[i])
            if found.get(self.member(i)) == (off, size):
                continue
            if off + size > actual:
                raise DataError(
                    f"{path}: truncated at {actual} bytes: member {self.member(i)} (bytes {off}-"
                    f"{off + size}) is cut off; copy the shard again, or {_rebuild(self.root.parent)}"
                )
            raise DataError(
                f"{path}: no member {self.member(i)} at byte {off} as the index says (the index is "
                f"stale or from another data set); {_rebuild(self.root.parent)}"
            )
        raise DataError(
            f"{path}: {actual} bytes but the index says {self.shard_sizes[s]} (the shard was rewritten "
            f"after the index); {_rebuild(self.root.parent)}"
        )

    def check_full(self) -> None:
        """Read every shard's headers and labels; compare every member with the index (after
        :meth:`check_cheap`, which names a missing or truncated shard first)."""
        found = {m: entry for m, entry in ((e[3], e) for e in _scan_members(self.root, self.shard_names).values())}
        for i in range(len(self)):
            s, off, size = int(self.shard[i]), int(self.offset[i]), int(self.sizes[i])
            got = found.pop(self.member(i), None)
            if got is None or got[:3] != [s, off, size]:
                raise DataError(
                    f"{self.shard_path(s)}: no member {self.member(i)} at byte {off} as the index says "
                    f"(the index is stale or from another data set); {_rebuild(self.root.parent)}"
                )
            if got[4] != int(self.labels[i]):
                has = f"label {got[4]} in its .cls" if got[4] is not None else "no .cls label"
                raise DataError(
                    f"{self.shard_path(s)}: member {self.member(i)} has {has}, label {int(self.labels[i])} "
                    f"in the index; {_rebuild(self.root.parent)}"
                )
        if found:
            member, entry = next(iter(found.items()))
            raise DataError(
                f"{self.shard_path(entry[0])}: member {member} is not in the index ({len(found)} such); "
                f"{_rebuild(self.root.parent)}"
            )

    def index_entries(self) -> dict:
        """``index.write_index`` arguments (without ``classes``) for this split."""
        return dict(
            kind="shards",
            names=self.paths,
            labels=self.labels,
            sizes=self.sizes,
            shard=self.shard,
            offset=self.offset,
            shards=[[n, b] for n, b in zip(self.shard_names, self.shard_sizes, strict=True)],
        )


def _header_matches(block: bytes, member: bytes, size: int) -> bool:
    """A member's header block (or a buffer starting with it): its name field (the first 100 bytes of
    the name, NUL-padded) and its size field (octal text, or base-256 for sizes of 8 GiB and more)."""
    name = bytes(member)[:100]
    n = len(name)
    if len(block) < HEADER or block[:n] != name or (n < 100 and block[n] != 0):
        return False
    if block[124:135] == b"%011o" % size:
        return True
    try:
        # tarfile's own number-field parser and its error: in CPython's tarfile, not in typeshed
        return tarfile.nti(block[124:136]) == size  # type: ignore[attr-defined]
    except tarfile.InvalidHeaderError:  # type: ignore[attr-defined]
        return False


def _ensure_open_files(needed: int, check_only: bool = False) -> None:
    """Room for one open file per shard: raise this process's soft limit up to its hard limit if needed."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise DataError(
            f"{needed - 64} shards need as many open files per reading process, but the limit is {hard} "
            f"(ulimit -Hn); pack with a larger --shard-size, or raise the limit"
        )
    if not check_only:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


# ---------------------------------------------------------------------------------- scanning
def is_shard_split(split_dir: Path) -> bool:
    """A split folder holding ``*.tar`` files and no class folders."""
    try:
        with os.scandir(split_dir) as it:
            entries = [e for e in it if not e.name.startswith(".")]
    except OSError:
        return False
    return any(e.name.endswith(".tar") for e in entries) and not any(e.is_dir() for e in entries)


def scan_shard(path: Path) -> list[tarfile.TarInfo]:
    """The regular members of one shard (name, offset_data, size), from its headers. A shard that ends
    inside a member (or its header) is one line naming that member."""
    members, cut = [], False
    try:
        actual = os.stat(path).st_size
        with tarfile.open(path, "r:") as tf:
            while True:
                try:
                    m = tf.next()
                except tarfile.ReadError:  # "unexpected end of data": the next header lies past the end
                    cut = True
                    break
                if m is None:
                    break
                if m.isfile():
                    members.append(m)
    except (OSError, tarfile.TarError) as err:
        raise DataError(
            f"{path}: not a readable tar shard ({err}); copy it again, or pack the data again (resnet-lamb pack)"
        ) from None
    for m in members:
        if m.offset_data + m.size > actual:
            raise DataError(
                f"{path}: truncated at {actual} bytes: member {m.name} (bytes {m.offset_data}-"
                f"{m.offset_data + m.size}) is cut off; copy the shard again"
            )
    if cut:
        raise DataError(
            f"{path}: truncated at {actual} bytes, after member {members[-1].name if members else '(none)'}; "
            "copy the shard again"
        )
    return members


def _scan_members(split_dir: Path, shard_names: list[str]) -> dict[str, list]:
    """Read the headers (and ``.cls`` labels) of a split's shards: ``{key: [shard, offset, size, member,
    label or None]}`` for every image member. A duplicate key is one line naming both members."""
    images: dict[str, list] = {}
    labels: dict[str, int] = {}
    for s, name in enumerate(shard_names):
        path = split_dir / name
        with open(path, "rb") as f:
            for m in scan_shard(path):
                base = m.name.rpartition("/")[2]
                if "." not in base:
                    continue
                key = m.name[: len(m.name) - len(base)] + base.split(".", 1)[0]
                ext = base.split(".", 1)[1].lower()
                if ext == "cls":
                    f.seek(m.offset_data)
                    text = f.read(m.size)
                    try:
                        labels[key] = int(text.decode().strip())
                    except ValueError:
                        raise DataError(
                            f"{path}: member {m.name} holds {text[:20]!r}, not a class number; pack the data again"
                        ) from None
                    continue
                if ext not in IMAGE_EXTS:
                    continue
                if key in images:
                    where, other = images[key][0], images[key][3]
                    raise DataError(
                        f"{path}: duplicate key {key}: members {shard_names[where]}::{other} and "
                        f"{name}::{m.name}; each image needs its own key: pack the data again"
                    )
                images[key] = [s, m.offset_data, m.size, m.name, None]
    for key, entry in images.items():
        entry[4] = labels.get(key)
    return images


def _scan_entries(split_dir: Path, shard_names: list[str]) -> dict:
    """``write_index`` arrays of a split's shards, in (label, key) order; an image without its label
    is one line naming it."""
    images = _scan_members(split_dir, shard_names)
    for key, (s, _, _, member, label) in images.items():
        if label is None:
            raise DataError(
                f"{split_dir / shard_names[s]}: member {member} has no {key}.cls label; "
                "pack the data again (resnet-lamb pack)"
            )
    keys = sorted(images, key=lambda k: (images[k][4], k))
    return {
        "names": np.array([images[k][3].encode() for k in keys], dtype="S"),
        "labels": np.array([images[k][4] for k in keys], dtype=np.int64),
        "sizes": np.array([images[k][2] for k in keys], dtype=np.int64),
        "shard": np.array([images[k][0] for k in keys], dtype=np.int32),
        "offset": np.array([images[k][1] for k in keys], dtype=np.int64),
    }


def scan_split(root: Path, split: str) -> ShardSplit:
    split_dir = root / split
    names = sorted(e.name for e in os.scandir(split_dir) if e.name.endswith(".tar") and not e.name.startswith("."))
    if not names:
        raise DataError(f"{split_dir}: no .tar shards; pack the data: resnet-lamb pack SRC --out {root}")
    a = _scan_entries(split_dir, names)
    if not len(a["labels"]):
        raise DataError(f"{split_dir}: its shards hold no images; pack the data: resnet-lamb pack SRC --out {root}")
    sizes = [os.stat(split_dir / n).st_size for n in names]
    return ShardSplit(split_dir, names, sizes, a["names"], a["labels"], a["sizes"], a["shard"], a["offset"])


def scan_root(root: Path):
    """A shard set without an index: read every shard's headers (what a listing is for a folder)."""
    for s in ("train", "val"):
        if not (root / s).is_dir():
            raise DataError(
                f"{root / s}: missing; a shard set needs train/*.tar and val/*.tar "
                "(`resnet-lamb pack SRC --out DIR` writes them)"
            )
    splits: dict[str, Split | ShardSplit] = {s: scan_split(root, s) for s in ("train", "val")}
    n = int(max(sp.labels.max() for sp in splits.values())) + 1
    classes = [str(c) for c in range(n)]
    names_file = root / CLASSES_FILE
    if names_file.is_file():
        listed = [ln for ln in names_file.read_text().splitlines() if ln]
        if len(listed) < n:
            raise DataError(
                f"{names_file}: {len(listed)} class names but the shards hold labels up to {n - 1}; pack the data again"
            )
        classes = listed
    return Folder(root, classes, splits)


# ---------------------------------------------------------------------------------- writing
class _ShardWriter:
    """Tar shards ``<split>-NNNNNN.tar`` of at most ``limit`` bytes (or one member), each written under a
    temporary name and renamed when complete. Deterministic bytes: no times, owners or modes."""

    def __init__(self, out_dir: Path, split: str, limit: int):
        self.out_dir, self.split, self.limit = out_dir, split, limit
        self.shards: list[list] = []  # [name, bytes]
        self._tf: tarfile.TarFile | None = None
        self._file: BinaryIO | None = None
        self._members = 0

    def _open(self):
        name = shard_name(self.split, len(self.shards))
        self._tmp = self.out_dir / f".{name}.tmp-{os.getpid()}"
        self._file = open(self._tmp, "wb")
        self._tf = tarfile.open(fileobj=self._file, mode="w", format=tarfile.GNU_FORMAT, encoding="utf-8")
        self._members = 0
        self.shards.append([name, 0])

    def _close(self):
        if self._tf is None:
            return
        self._tf.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        path = self.out_dir / self.shards[-1][0]
        os.replace(self._tmp, path)
        self.shards[-1][1] = os.stat(path).st_size
        self._tf = self._file = None

    def _add(self, name: str, data: bytes) -> int:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o444, 0
        assert self._tf is not None  # add() opens a shard first
        self._tf.addfile(info, io.BytesIO(data))
        return self._tf.offset - -(-len(data) // HEADER) * HEADER  # where the data starts

    def add(self, key: str, ext: str, data: bytes, label: int) -> tuple[int, int]:
        """Append ``key.ext`` and ``key.cls``; returns (shard number, data offset)."""
        need = 3 * HEADER + -(-len(data) // HEADER) * HEADER
        if self._tf is None or (self._members and self._tf.offset + need > self.limit):
            self._close()
            self._open()
        offset = self._add(f"{key}.{ext}", data)
        self._add(f"{key}.cls", str(int(label)).encode())
        self._members += 1
        return len(self.shards) - 1, offset

    def close(self) -> list[list]:
        self._close()
        return self.shards


def pack(src, out, shard_size: int = DEFAULT_SHARD_SIZE, seed: int = 0, quiet: bool = False) -> dict[str, int]:
    """Write the folder data set ``src`` as shards plus index under ``out``; returns images per split."""
    from resnet_lamb.data.index import load_root, write_index

    src, out = Path(src).expanduser(), Path(out).expanduser()
    folder = load_root(src, check=True)
    if folder.kind != "folder":
        raise DataError(f"{src}: already packed in shards; train on it as it is, or copy it (resnet-lamb stage)")
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise DataError(f"--out {out}: inside the folder being packed ({src}); pass another folder")
    counts = {}
    for split in ("train", "val"):
        sp = folder.splits[split]
        assert isinstance(sp, Split)  # folder.kind is "folder"
        rels = [p.decode() for p in sp.paths.tolist()]
        keys = [member_key(r) for r in rels]
        first: dict[str, int] = {}
        for i, (key, ext) in enumerate(keys):
            if ext not in IMAGE_EXTS:
                raise DataError(
                    f"{sp.path(i)}: extension .{ext} is not one of {', '.join(IMAGE_EXTS)}; "
                    "move it out of the data folder"
                )
            if key in first:
                raise DataError(
                    f"{sp.path(i)}: its key {key} is also {sp.path(first[key])}'s (keys drop the extension "
                    "and turn dots into _); rename one of them"
                )
            first[key] = i
        order = sorted(range(len(sp)), key=lambda i: (int(sp.labels[i]), keys[i][0]))  # the index's order
        placed = np.random.default_rng(seed).permutation(order) if split == "train" else order
        split_dir = out / split
        split_dir.mkdir(parents=True, exist_ok=True)
        index_file = out / f"{split}.index"
        if index_file.exists():
            index_file.unlink()  # an interrupted pack leaves no index that describes other shards
        for old in [*split_dir.glob(f"{split}-*.tar"), *split_dir.glob(f".{split}-*.tar.tmp-*")]:
            old.unlink()  # an earlier pack's shards, or those an interrupted one left half-written
        writer = _ShardWriter(split_dir, split, shard_size)
        where = {}  # image -> (shard, data offset, size)
        for n, i in enumerate(placed):
            i = int(i)
            try:
                data = sp.read(i)
            except OSError as err:
                raise DataError(
                    f"{sp.path(i)}: cannot read it ({err.strerror or err}); fix it and pack again"
                ) from None
            where[i] = (*writer.add(keys[i][0], keys[i][1], data, int(sp.labels[i])), len(data))
            if not quiet and (n + 1) % 50_000 == 0:
                print(f"{split}: {n + 1}/{len(sp)} images packed", file=sys.stderr, flush=True)
        shards = writer.close()
        write_index(
            out,
            split,
            kind="shards",
            classes=folder.classes,
            names=[f"{keys[i][0]}.{keys[i][1]}".encode() for i in order],
            labels=sp.labels[order],
            sizes=[where[i][2] for i in order],
            shard=[where[i][0] for i in order],
            offset=[where[i][1] for i in order],
            shards=shards,
        )
        counts[split] = len(sp)
    (out / CLASSES_FILE).write_text("".join(f"{c}\n" for c in folder.classes))
    return counts


# ---------------------------------------------------------------------------------- `resnet-lamb pack`
def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="resnet-lamb pack",
        description=(
            "Write a folder data set (SRC/<split>/<class>/<image>) as tar shards in the webdataset layout plus "
            "their index, for file systems where one open per image is too many (see README, Data)."
        ),
    )
    p.add_argument("src", help="a data folder (resnet-lamb prepare writes one)")
    p.add_argument("--out", required=True, help="folder for the shards (gets train/, val/ and the index)")
    p.add_argument("--shard-size", default="512M", help="bytes per shard, K/M/G suffixes (default 512M)")
    p.add_argument("--seed", type=int, default=0, help="seeds the order of training images across shards")
    args = p.parse_args(argv)
    counts = pack(args.src, args.out, parse_size(args.shard_size), args.seed)
    out = Path(args.out).expanduser()
    shards = {s: len(list((out / s).glob(f"{s}-*.tar"))) for s in counts}
    print(f"{out}: {counts['train']} train / {counts['val']} val images in {shards['train']} + {shards['val']} shards")
    return 0
