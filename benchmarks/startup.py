"""Start-up: ``fit`` on a data root read through its index versus the same root listed, at >= 100,000 files.

Generates a folder of tiny JPEGs (``--images`` train images in ``--classes`` class folders, plus a few
val images; every file the same 8x8 JPEG: start-up opens none of them, and the first step decodes
only a batch), writes its index once (timed), then runs ``resnet-lamb fit`` to its first training
step, each run in a fresh process, alternating the two modes (``listing``: the index files moved
aside; ``index``). In each run the clock starts when ``fit`` is called (torch and Lightning already
imported, which both modes pay alike) and stops when the first ``training_step`` begins; the time
spent reading the data root (``startup_folder``: listing, or reading and checking the index) is
timed on its own. Then one run per mode counts the calls that touch the data root: Python-level
(``open``/``os.scandir``/``os.listdir`` audit events, ``os.stat``/``os.lstat`` calls, directory
entries returned by ``os.scandir``), and, when ``strace`` is installed, the system calls on paths
or descriptors under the root (``openat``, ``stat`` family, ``getdents64``). One process stands for
one rank, rank 0, which also checks the index against the tree (a stat per class folder); the calls
of every other rank (``startup_folder`` as fit runs it there) are counted too: at N ranks listing
costs N times the directory entries, the index N reads of one file per split.

The page cache is warm (the tree was just written): on a network file system each directory
entry and stat is a round trip to a metadata server, so listing costs more there, not less.

    python benchmarks/startup.py [--images 100000] [--classes 100] [--repeats 3] [--root DIR]

Last line: one JSON object: medians over the repeats, the counts (Python-level calls and directory
entries on rank 0 and on another rank; system calls on rank 0), their ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = ("listing", "index")


def make_tree(root: Path, images: int, classes: int, val_per_class: int = 2) -> None:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 90, 60)).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    for split, n in (("train", images), ("val", classes * val_per_class)):
        for c in range(classes):
            d = root / split / f"c{c:04d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(c, n, classes):
                fd = os.open(d / f"{i:07d}.JPEG", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.write(fd, data)
                os.close(fd)


def recipe(root: Path, classes: int) -> dict:
    return {
        "seed_everything": 0,
        "trainer": {"max_epochs": 1, "max_steps": 1, "limit_val_batches": 0, "enable_checkpointing": False,
                    "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0},
        "model": {"arch": "mlp", "mlp_hidden": [16], "num_classes": classes,
                  "optimizer": {"name": "lamb", "base_lr": 0.01, "base_batch": 16, "kwargs": {"impl": "eager"}},
                  "schedule": {"name": "constant", "warmup_epochs": 0}},
        "data": {"backend": "torchvision", "root": str(root), "global_batch": 16, "micro_batch": 16,
                 "image_size": 8, "workers": 0},
    }


# ---------------------------------------------------------------------------------- child: one fit
def child(args) -> int:
    import torch  # noqa: F401 - paid before the clock, alike in both modes
    import lightning.pytorch  # noqa: F401

    import resnet_lamb.data.index as index
    import resnet_lamb.model as model
    from resnet_lamb.cli import main

    root = str(Path(args.root).resolve())
    counts = {"open": 0, "scandir": 0, "listdir": 0, "stat": 0, "dir_entries": 0}
    if args.count:
        def hook(event, a):
            if event in ("open", "os.scandir", "os.listdir") and a and isinstance(a[0], (str, bytes, os.PathLike)):
                if os.fsdecode(a[0]).startswith(root):
                    counts[{"open": "open", "os.scandir": "scandir", "os.listdir": "listdir"}[event]] += 1

        sys.addaudithook(hook)
        real_stat, real_lstat, real_scandir = os.stat, os.lstat, os.scandir

        def counted(real):
            def call(path, *a, **k):
                if isinstance(path, (str, bytes, os.PathLike)) and os.fsdecode(path).startswith(root):
                    counts["stat"] += 1
                return real(path, *a, **k)
            return call

        class Scandir:
            def __init__(self, path="."):
                self._it = real_scandir(path)
                self._ours = isinstance(path, (str, bytes, os.PathLike)) and os.fsdecode(path).startswith(root)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self._it.close()

            def __iter__(self):
                for entry in self._it:
                    counts["dir_entries"] += self._ours
                    yield entry

            def close(self):
                self._it.close()

        os.stat, os.lstat, os.scandir = counted(real_stat), counted(real_lstat), Scandir

    marks = {}
    real_startup = index.startup_folder

    def timed_startup(*a, **k):
        t = time.perf_counter()
        try:
            return real_startup(*a, **k)
        finally:
            marks["data_startup_s"] = time.perf_counter() - t

    index.startup_folder = timed_startup
    real_step = model.LambModule.training_step

    def first_step(self, *a, **k):
        marks.setdefault("first_step", time.perf_counter())
        return real_step(self, *a, **k)

    model.LambModule.training_step = first_step
    with tempfile.TemporaryDirectory(prefix="resnet-lamb-startup-") as tmp:
        import yaml

        path = Path(tmp) / "r.yaml"
        path.write_text(yaml.safe_dump(recipe(Path(args.root), args.classes)))
        start = time.perf_counter()
        rc = main(["fit", "--config", str(path), "--run.root", tmp, "--run.name", "s", "--run.wandb", "false"])
    if rc or "first_step" not in marks:
        print(f"fit failed (exit {rc})", file=sys.stderr)
        return 1
    out = {"fit_to_first_step_s": marks["first_step"] - start, "data_startup_s": marks["data_startup_s"]}
    if args.count:
        out["rank0"] = dict(counts)
        # what fit does on every other rank before the process group exists (the recipe without counts:
        # the listing mode's worst case; with counts given those ranks read nothing until rank 0's
        # listing arrives by broadcast)
        for k in counts:
            counts[k] = 0
        real_startup(root, rank0=False, counts_given=False)
        out["other_rank"] = dict(counts)
    print("RESULT " + json.dumps(out), flush=True)
    return 0


# ---------------------------------------------------------------------------------- parent
def _set_mode(root: Path, mode: str) -> None:
    aside = root.parent / f"{root.name}.index-aside"
    aside.mkdir(exist_ok=True)
    for split in ("train", "val"):
        name = f"{split}.index"
        src, dst = (root / name, aside / name) if mode == "listing" else (aside / name, root / name)
        if src.exists():
            os.replace(src, dst)


def _run_child(root: Path, classes: int, count: bool, strace: str | None = None) -> tuple[dict, str]:
    cmd = [sys.executable, __file__, "--child", "--root", str(root), "--classes", str(classes)]
    if count:
        cmd.append("--count")
    trace = None
    if strace:
        trace = tempfile.NamedTemporaryFile(prefix="strace-", suffix=".txt", delete=False).name
        cmd = [strace, "-f", "-y", "-qq", "-o", trace, "-e",
               "trace=openat,open,stat,lstat,fstat,newfstatat,statx,access,faccessat,faccessat2,getdents64,"
               "readlink,readlinkat", *cmd]
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if p.returncode != 0 or "RESULT " not in p.stdout:
        raise SystemExit(f"child failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    result = json.loads(p.stdout.split("RESULT ", 1)[1].splitlines()[0])
    if trace:
        prefix = str(root.resolve())
        lines = [ln for ln in Path(trace).read_text().splitlines() if prefix in ln]
        os.unlink(trace)
        result["syscalls"] = len(lines)
        result["getdents64"] = sum(1 for ln in lines if "getdents64(" in ln)
    return result, p.stderr


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=100_000)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--root", help="where to generate the tree (default: a temp folder, removed at the end)")
    p.add_argument("--no-strace", action="store_true", help="skip the system-call counts")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--count", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)

    sys.path.insert(0, str(REPO))
    from resnet_lamb.data.index import build_index

    base = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="resnet-lamb-startup-"))
    root = base / "tree"
    try:
        t = time.perf_counter()
        make_tree(root, args.images, args.classes)
        print(f"generated {args.images} train images in {args.classes} classes in {time.perf_counter() - t:.1f} s",
              file=sys.stderr)
        t = time.perf_counter()
        build_index(root)
        index_build = time.perf_counter() - t
        times = {m: [] for m in MODES}
        for rep in range(args.repeats):
            for mode in MODES if rep % 2 == 0 else MODES[::-1]:
                _set_mode(root, mode)
                r, _ = _run_child(root, args.classes, count=False)
                times[mode].append(r)
                print(f"repeat {rep} {mode:<8} fit to first step {r['fit_to_first_step_s']:.2f} s, data root "
                      f"{r['data_startup_s'] * 1000:.1f} ms", file=sys.stderr)
        counts, syscalls = {}, {}
        strace = None if args.no_strace else shutil.which("strace")
        for mode in MODES:
            _set_mode(root, mode)
            counts[mode], _ = _run_child(root, args.classes, count=True)
            if strace:
                syscalls[mode], _ = _run_child(root, args.classes, count=False, strace=strace)
        _set_mode(root, "index")
    finally:
        if not args.root:
            shutil.rmtree(base, ignore_errors=True)

    def med(mode, key):
        return statistics.median(r[key] for r in times[mode])

    result = {"benchmark": "startup", "train_images": args.images, "classes": args.classes, "repeats": args.repeats,
              "index_build_s": round(index_build, 3)}
    for mode in MODES:
        result[f"{mode}_fit_to_first_step_s"] = round(med(mode, "fit_to_first_step_s"), 3)
        result[f"{mode}_data_startup_s"] = round(med(mode, "data_startup_s"), 4)
        result[f"{mode}_rank0_fs_calls"] = counts[mode]["rank0"]
        result[f"{mode}_other_rank_fs_calls"] = counts[mode]["other_rank"]
        if syscalls:
            result[f"{mode}_rank0_syscalls"] = {"total": syscalls[mode]["syscalls"],
                                                "getdents64": syscalls[mode]["getdents64"]}
    result["data_startup_speedup"] = round(result["listing_data_startup_s"] / result["index_data_startup_s"], 1)
    result["fit_to_first_step_speedup"] = round(result["listing_fit_to_first_step_s"]
                                                / result["index_fit_to_first_step_s"], 2)
    if syscalls:
        result["rank0_syscalls_ratio"] = round(result["listing_rank0_syscalls"]["total"]
                                               / max(result["index_rank0_syscalls"]["total"], 1), 1)
    calls = {m: sum(result[f"{m}_other_rank_fs_calls"].values()) for m in MODES}  # calls + entries read
    result["other_rank_calls_and_entries_ratio"] = round(calls["listing"] / max(calls["index"], 1), 1)
    result.update(cpus=os.cpu_count(), load_avg_1min=round(os.getloadavg()[0], 2))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
