"""``resnet-lamb stage ROOT DEST``: copy a shard set to node-local disk before training, once per node.

On a cluster the shards usually live on a shared file system (Lustre, NFS, GPFS); reading them from
a node's own disk (NVMe, ``/tmp``, ``$SLURM_TMPDIR``) takes that load off the shared servers, as
MLPerf's ResNet-50 submissions do. ``launch/torchrun.sh`` runs this when ``STAGE_DIR`` is set (it
runs once per node, before torchrun starts the node's workers) and then trains on ``STAGE_DIR``.

What is copied: the shards, the index and ``classes.txt``, each to a temporary name then renamed;
the index last, so an interrupted copy leaves no index and is never read as complete. A second run
(another job on the same node, a restart) copies only the shards whose size or modification time
differ from the source's, and nothing when the copy is complete; concurrent runs on one node take
turns (a lock file). The copy is then checked like any root at start-up (one ``stat`` per shard, its
first and last member headers). Only shard sets are staged: copying a folder of 1.28M small files
would load the shared file system as much as training from it (``resnet-lamb pack`` first).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
from pathlib import Path

from resnet_lamb.errors import DataError

SPLITS = ("train", "val")


def _same(a: Path, b: Path) -> bool:
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return sa.st_size == sb.st_size and sa.st_mtime_ns == sb.st_mtime_ns


def _copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    try:
        shutil.copy2(src, tmp)  # keeps the modification time: the next run's quick check
        os.replace(tmp, dst)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise DataError(
            f"{dst}: cannot copy {src} there ({err.strerror or err}); free space on that disk or "
            "choose another STAGE_DIR"
        ) from None


def stage(src, dest) -> dict:
    """Copy the shard set ``src`` to ``dest``; returns {"copied": files, "kept": files, "bytes": copied bytes}."""
    from resnet_lamb.data.index import has_index, index_path, load_root, read_index

    src, dest = Path(src).expanduser(), Path(dest).expanduser()
    if not has_index(src):
        raise DataError(f"{src}: no index; stage copies a shard set with its index (resnet-lamb pack writes both)")
    indexes = {s: read_index(index_path(src, s)) for s in SPLITS}
    if any(i.kind != "shards" for i in indexes.values()):
        raise DataError(
            f"{src}: a folder with one file per image; pack it first (resnet-lamb pack {src} --out DIR) and stage DIR"
        )
    if src.resolve() == dest.resolve():
        raise DataError(f"{dest}: the shard set itself; stage to another folder")
    try:
        dest.mkdir(parents=True, exist_ok=True)
        lock = open(dest / ".stage.lock", "w")
    except OSError as err:
        raise DataError(f"{dest}: cannot write there ({err.strerror or err}); choose another STAGE_DIR") from None
    copied = kept = nbytes = 0
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another stage of this node waits, then finds the copy done
        done = all(_same(index_path(src, s), index_path(dest, s)) for s in SPLITS)
        if not done:
            for s in SPLITS:
                index_path(dest, s).unlink(missing_ok=True)
        for s in SPLITS:
            (dest / s).mkdir(exist_ok=True)
            for name, _ in indexes[s].meta["shards"]:
                a, b = src / s / name, dest / s / name
                if _same(a, b):
                    kept += 1
                    continue
                if not a.is_file():
                    raise DataError(f"{a}: missing shard; copy it back, or rebuild the index: resnet-lamb index {src}")
                _copy(a, b)
                copied += 1
                nbytes += b.stat().st_size
        for extra in ("classes.txt", ".resnet-lamb-prepared.json"):
            if (src / extra).is_file() and not _same(src / extra, dest / extra):
                _copy(src / extra, dest / extra)
        for s in SPLITS:
            if not _same(index_path(src, s), index_path(dest, s)):
                _copy(index_path(src, s), index_path(dest, s))
        load_root(dest, check=True)
    return {"copied": copied, "kept": kept, "bytes": nbytes}


def main(argv: list[str] | None = None) -> int:
    import argparse
    import time

    p = argparse.ArgumentParser(prog="resnet-lamb stage", description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    p.add_argument("root", help="a shard set (resnet-lamb pack / prepare --shards)")
    p.add_argument("dest", help="a folder on this node's local disk")
    args = p.parse_args(argv)
    start = time.perf_counter()
    r = stage(args.root, args.dest)
    print(
        f"resnet-lamb stage: {args.dest}: {r['copied']} shards copied ({r['bytes'] / 2**30:.2f} GiB), "
        f"{r['kept']} already there, {time.perf_counter() - start:.1f} s",
        file=sys.stderr,
        flush=True,
    )
    return 0
