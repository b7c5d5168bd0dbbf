"""The members of a tar shard, read from their headers: what :mod:`resnet_lamb.data.shards` checks a
member against (:func:`header_matches`) and reads a shard set without an index from
(:func:`scan_shard`, :func:`scan_entries`).

A shard holds ``<key>.<ext>`` image members (``ext`` one of :data:`IMAGE_EXTS`) and ``<key>.cls``
label members (decimal text), as :mod:`resnet_lamb.data.pack` writes them.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import numpy as np

from resnet_lamb.errors import DataError

HEADER = tarfile.BLOCKSIZE  # 512: a member's data follows its header block
IMAGE_EXTS = ("jpg", "jpeg", "png", "bmp", "webp", "tif", "tiff", "ppm", "pgm", "pnm")


def header_matches(block: bytes, member: bytes, size: int) -> bool:
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


def scan_members(split_dir: Path, shard_names: list[str]) -> dict[str, list]:
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


def scan_entries(split_dir: Path, shard_names: list[str]) -> dict:
    """``write_index`` arrays of a split's shards, in (label, key) order; an image without its label
    is one line naming it."""
    images = scan_members(split_dir, shard_names)
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
