"""``resnet-lamb pack SRC --out DIR``: write a folder data set (SRC/<split>/<class>/<image>) as tar
shards in the webdataset layout plus their index, for file systems where one open per image is too
many (see README, Data).

The layout and how it is read: :mod:`resnet_lamb.data.shards`.

Shards close at ``--shard-size`` bytes (default 512 MiB; our choice: webdataset's advice is 100 MB
to 1 GB per shard, and ImageNet's 140 GB then make about 280 shards, so one open file per shard
per reading process stays far below the usual limit of 1024). Training members are placed in a
seeded random order (``--seed``), validation members in order; the index lists images in the
order of the folder they came from (class, then name), so a folder and its shards give the same
image numbers and, with the same seed, the same batches.
"""

from __future__ import annotations

import io
import os
import re
import sys
import tarfile
from pathlib import Path
from typing import BinaryIO

import numpy as np

from resnet_lamb.data.folder import Split
from resnet_lamb.data.shards import CLASSES_FILE
from resnet_lamb.data.tar_members import HEADER, IMAGE_EXTS
from resnet_lamb.errors import DataError

DEFAULT_SHARD_SIZE = 512 * 2**20


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

    about = " ".join(__doc__.split("\n\n")[0].split(": ", 1)[1].split())
    p = argparse.ArgumentParser(prog="resnet-lamb pack", description=about[0].upper() + about[1:])
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
