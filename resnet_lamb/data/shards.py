"""Packed shards: each split as a few large tar files (webdataset layout), read by byte offset.

Layout (:mod:`resnet_lamb.data.pack` writes it: ``resnet-lamb pack SRC --out DIR`` or
``resnet-lamb prepare ... --shards``)::

    DIR/train/train-000000.tar ...   members <key>.<ext> (the image's bytes, unchanged) and <key>.cls
    DIR/val/val-000000.tar ...       (its label, decimal text); key = <class>/<file name without extension>
    DIR/train.index, DIR/val.index   per image: member name, label, size, shard, byte offset
    DIR/classes.txt                          class names in label order

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

import os
import threading
from pathlib import Path

import numpy as np

from resnet_lamb.data.folder import Folder, Split
from resnet_lamb.data.tar_members import HEADER, header_matches, scan_entries, scan_members, scan_shard
from resnet_lamb.errors import DataError

MEMBER_SEP = "::"  # an image inside a shard is named <shard path>::<member>
CLASSES_FILE = "classes.txt"


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
        if not header_matches(buf, self.paths[i], size):
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
                if not header_matches(f.read(HEADER), self.paths[i], int(self.sizes[i])):
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
        found = {m: entry for m, entry in ((e[3], e) for e in scan_members(self.root, self.shard_names).values())}
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


# ---------------------------------------------------------------------------------- without an index
def is_shard_split(split_dir: Path) -> bool:
    """A split folder holding ``*.tar`` files and no class folders."""
    try:
        with os.scandir(split_dir) as it:
            entries = [e for e in it if not e.name.startswith(".")]
    except OSError:
        return False
    return any(e.name.endswith(".tar") for e in entries) and not any(e.is_dir() for e in entries)


def scan_split(root: Path, split: str) -> ShardSplit:
    split_dir = root / split
    names = sorted(e.name for e in os.scandir(split_dir) if e.name.endswith(".tar") and not e.name.startswith("."))
    if not names:
        raise DataError(f"{split_dir}: no .tar shards; pack the data: resnet-lamb pack SRC --out {root}")
    a = scan_entries(split_dir, names)
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
