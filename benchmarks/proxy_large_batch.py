"""The proxy large-batch study: LAMB, LARS, Adam, AdamW and momentum SGD on Fashion-MNIST at batch
128 ... 16384, the same epoch budget at every batch, each optimizer from one base setting at batch
128 scaled by its recipe's rule (recipes/proxy/). Runs on a 2-core CPU.

    .venv/bin/python benchmarks/proxy_large_batch.py                       # the committed study
    .venv/bin/python benchmarks/proxy_large_batch.py --tune                # the base-LR grid at 128
    .venv/bin/python benchmarks/proxy_large_batch.py --batches 16384 --compare benchmarks/results/proxy-fashion-mnist/summary.json

Every run is an ordinary `resnet-lamb fit` (in this process, one after another) into
``--runs/<optimizer>-bs<batch>-seed<seed>``; a finished run is not run again and an interrupted one
resumes from its last.ckpt, so the study can be stopped and restarted. Then `resnet-lamb report`
writes report.md and the PNGs into ``--out``, and this script adds README.md (command, date,
machine, wall time, the table, the answer at the largest batch), accuracy_vs_batch.png and
summary.json (final top-1 per run; ``--compare`` prints the largest difference against one).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPTIMIZERS = ("lamb", "lars", "adam", "adamw", "momentum")
BATCHES = (128, 256, 512, 1024, 2048, 4096, 8192, 16384)
TUNE_FACTORS = (1 / 3, 1.0, 3.0)
TUNE_LABELS = ("base_lr / 3", "base_lr", "base_lr x 3")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/fashion-mnist", help="prepared Fashion-MNIST (made when missing)")
    p.add_argument("--runs", default="runs/proxy", help="folder of the run folders")
    p.add_argument("--out", default="benchmarks/results/proxy-fashion-mnist", help="report folder")
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="recipes/proxy/<name>.yaml, comma-separated")
    p.add_argument("--batches", default=",".join(map(str, BATCHES)))
    p.add_argument("--seeds", default="0", help="seeds of the whole grid, comma-separated")
    p.add_argument("--extra-seeds", default="1,2", help="more seeds at the two largest batches (noise at the answer)")
    p.add_argument("--epochs", type=int, default=None, help="override trainer.max_epochs (default: the recipe's)")
    p.add_argument("--tune", action="store_true", help="instead: base_lr x 1/3, 1, 3 at batch 128 for each optimizer")
    p.add_argument("--wandb", action="store_true", help="log to W&B as well (offline unless WANDB_MODE says otherwise)")
    p.add_argument("--jobs", type=int, default=2, help="runs side by side (worker processes)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (results are bit-reproducible "
                                                          "for the same value)")
    p.add_argument("--compare", default=None, metavar="SUMMARY_JSON", help="print the largest top-1 difference to it")
    return p.parse_args(argv)


def result(run_dir: Path) -> tuple:
    """(validated epochs, final top-1, diverged) of a run folder, as `resnet-lamb report` reads it; a
    run stopped by a NaN/Inf loss or gradient (failed.txt) is diverged, its top-1 None."""
    from resnet_lamb.report import load_run

    run = load_run(run_dir)
    bad = run.status == "failed" and run.reason.startswith(("NonFiniteLossError", "NonFiniteGradientError"))
    return len(run.val), None if bad else run.final[0], bad


def outcome(res: tuple) -> str:
    return "diverged" if res[2] else f"top-1 {res[1]:.4f}"


def _worker_init(threads: int) -> None:  # spawned workers start in the parent's folder (ROOT)
    import torch

    torch.set_num_threads(threads)


def _fit_job(job: tuple) -> tuple:
    return job[1], fit(*job)


def fit(recipe: Path, name: str, runs: Path, batch: int, seed: int, epochs: int, extra: list, wandb: bool) -> float:
    """One `resnet-lamb fit`, resumed when its folder holds a checkpoint; returns its wall seconds."""
    from resnet_lamb.cli import main as cli

    run_dir = runs / name
    args = ["fit", "--config", str(recipe), "--data.global_batch", str(batch), "--data.micro_batch", str(batch),
            "--seed_everything", str(seed), "--trainer.max_epochs", str(epochs), "--run.root", str(runs),
            "--run.name", name, "--run.wandb", str(wandb).lower(), *extra]
    if (run_dir / "checkpoints" / "last.ckpt").is_file():
        args += ["--ckpt_path", "last"]
    start = time.perf_counter()
    try:
        rc = cli(args)
    except SystemExit as exc:
        rc = exc.code
    if rc and not result(run_dir)[2]:
        raise SystemExit(f"proxy study: resnet-lamb {' '.join(args)} exited {rc}")
    return time.perf_counter() - start


def recipe_epochs(recipe: Path) -> int:
    from resnet_lamb.recipe import load_recipe

    return int(load_recipe(recipe)["trainer"]["max_epochs"])


def base_lr(recipe: Path) -> float:
    from resnet_lamb.recipe import load_recipe

    return float(load_recipe(recipe)["model"]["optimizer"]["base_lr"])


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"Python {platform.python_version()}, {platform.system()} {platform.release()}")


def plot_vs_batch(summary: dict, path: Path, title: str) -> None:
    """Left: every optimizer (x: diverged, drawn at chance). Right: those that kept above 0.5 at
    every batch, zoomed, with the seeds' half range as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    batches = sorted({int(b) for c in summary["grid"].values() for b in c})
    for opt, cells in summary["grid"].items():
        xs = sorted(int(b) for b in cells)
        ys = [cells[str(b)]["mean"] for b in xs]
        line, = axes[0].plot(xs, [float("nan") if y is None else y for y in ys], marker="o", label=opt)
        bad = [x for x, y in zip(xs, ys) if y is None]
        if bad:  # diverged: drawn at chance level
            axes[0].plot(bad, [0.1] * len(bad), linestyle="none", marker="x", markersize=9, color=line.get_color())
        if all(y is not None and y > 0.5 for y in ys):
            axes[1].errorbar(xs, ys, yerr=[cells[str(b)]["half_range"] or 0.0 for b in xs], marker="o", capsize=3,
                             label=opt, color=line.get_color())
    for ax, what in zip(axes, ("all optimizers (x: diverged, NaN/Inf)", "zoom: those above 0.5 at every batch")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches)
        ax.set_xticklabels([str(b) for b in batches], rotation=45)
        ax.set_xlabel("global batch")
        ax.set_ylabel("final val top-1")
        ax.set_title(what, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def study_readme(summary: dict, tune: bool) -> str:
    from resnet_lamb.report import mean_text

    grid = summary["grid"]
    columns = list(TUNE_LABELS) if tune else sorted({c for cells in grid.values() for c in cells}, key=int)
    def cell(c):
        if c is None:
            return "-"
        lr = f" (lr {c['lr']:.3g})" if "lr" in c else ""
        if c["mean"] is None:
            return "diverged" + (f" ({c['diverged']}/{c['n']})" if c["n"] > 1 else "") + lr
        text = mean_text([x for x in c["runs"].values() if x is not None])
        return text + lr + (f", {c['diverged']}/{c['n']} diverged" if c["diverged"] else "")

    lines = ["# Proxy large-batch study" + (": base-LR grid at batch 128" if tune else ""), "",
             f"- command: `{summary['command']}`", f"- date: {summary['date']}", f"- machine: {summary['machine']}",
             (f"- wall time: {summary['wall_s']} s ({summary['wall_s'] / 60:.1f} min) for {summary['runs_trained']} runs"
              if summary["runs_trained"] else "- wall time: not recorded (the runs were trained by earlier invocations)"),
             f"- {summary['jobs']} runs side by side, {summary['threads_per_run']} torch thread(s) each",
             f"- seeds: {summary['seeds']} for every cell"
             + ("" if tune else f", plus {summary['extra_seeds_at_largest_batches']} at the two largest batches"),
             "", "Final val top-1 (mean over seeds ± half their range):", "",
             "| optimizer | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {opt} | " + " | ".join(cell(cells.get(c)) for c in columns) + " |" for opt, cells in grid.items()]
    if not tune:
        big = columns[-1]
        at = {opt: cells[big]["mean"] for opt, cells in grid.items() if big in cells}
        ranked = sorted(at.items(), key=lambda kv: 1.0 if kv[1] is None else -kv[1])
        lines += ["", f"At the largest batch ({big}): " + ", ".join(
                      f"{o} {'diverged' if v is None else f'{v:.4f}'}" for o, v in ranked) + ".",
                  "", "![final top-1 vs batch](accuracy_vs_batch.png)", "",
                  "Per-run tables, curves and trust-ratio heatmaps: [report.md](report.md)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    os.chdir(ROOT)
    os.environ.setdefault("WANDB_MODE", "offline")
    data, runs, out = Path(args.data), Path(args.runs), Path(args.out)
    if not (data / "train").is_dir():
        from resnet_lamb.data.prepare import main as prepare

        prepare(["fashion-mnist", "--out", str(data)])
    optimizers = [o for o in args.optimizers.split(",") if o]
    batches = [int(b) for b in args.batches.split(",") if b]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    extra_seeds = [int(s) for s in args.extra_seeds.split(",") if s]
    jobs = []  # (optimizer, recipe, batch, seed, name, extra args)
    for opt in optimizers:
        recipe = ROOT / "recipes" / "proxy" / f"{opt}.yaml"
        if not recipe.is_file():
            raise SystemExit(f"proxy study: {recipe} does not exist; choose from {', '.join(OPTIMIZERS)}")
        if args.tune:
            lr = base_lr(recipe)
            for f, label in zip(TUNE_FACTORS, TUNE_LABELS):
                jobs.append((opt, recipe, 128, seeds[0], f"tune-{opt}-lr{lr * f:.3g}",
                             ["--model.optimizer.base_lr", repr(lr * f), label]))
            continue
        for b in batches:
            for s in seeds + [s for s in extra_seeds if s not in seeds and b in sorted(batches)[-2:]]:
                jobs.append((opt, recipe, b, s, f"{opt}-bs{b}-seed{s}", []))
    started = time.perf_counter()
    todo = []
    epochs = {opt: args.epochs or recipe_epochs(recipe) for opt, recipe, *_ in jobs}
    for opt, recipe, b, s, name, extra in jobs:
        res = result(runs / name)
        if res[0] >= epochs[opt] or res[2]:
            print(f"{name}: done before ({outcome(res)})", flush=True)
        else:
            todo.append((recipe, name, runs, b, s, epochs[opt], extra[:2], args.wandb))
    todo.sort(key=lambda job: job[3])  # small batches first: they take longest, so the pool ends even
    walls = {}
    # `--jobs` worker processes of `--threads` torch threads each: on 2 cores two 1-thread runs side
    # by side beat one 2-thread run (OpenMP scales poorly at these sizes and spins when the cores are
    # shared); a worker keeps its decoded data set across its runs
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_init, initargs=(args.threads,)) as pool:
        for i, (name, seconds) in enumerate(pool.map(_fit_job, todo), 1):
            walls[name] = seconds
            print(f"[{i}/{len(todo)}] {name}: {outcome(result(runs / name))} in {seconds:.0f} s "
                  f"({time.perf_counter() - started:.0f} s so far)", flush=True)
    wall = time.perf_counter() - started

    names = [j[4] for j in jobs]
    out.mkdir(parents=True, exist_ok=True)
    from resnet_lamb.report import main as report, spread

    report([str(runs / n) for n in names] + ["--out", str(out)])
    grid: dict = {}  # optimizer -> batch (or base_lr when tuning) -> runs and their mean
    for opt, _, b, s, name, extra in jobs:
        column = extra[2] if args.tune else str(b)
        cell = grid.setdefault(opt, {}).setdefault(column, {"runs": {}})
        cell["runs"][name] = result(runs / name)[1]  # None: diverged
        if args.tune:
            cell["lr"] = float(extra[1])
    for cells in grid.values():
        for cell in cells.values():
            v = [x for x in cell["runs"].values() if x is not None]
            mean, half = spread(v) if v else (None, None)
            cell.update(n=len(cell["runs"]), diverged=len(cell["runs"]) - len(v), mean=mean, half_range=half)
    command = shlex.join(["python", os.path.relpath(__file__, ROOT), *(sys.argv[1:] if argv is None else argv)])
    # wall time and per-run times add up over invocations (a resumed study; a rebuild trains nothing)
    old = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
    old = old if old.get("command") == command else {}
    run_wall = {**(old.get("run_wall_s") or {}), **{k: round(v, 1) for k, v in walls.items()}}
    summary = {"command": command,
               "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC") if walls or not old else old["date"],
               "machine": machine() if walls or not old else old["machine"],
               "wall_s": (round(wall) if len(walls) == len(jobs)
                          else old.get("wall_s", 0) + (round(wall) if walls else 0)),  # a rebuild adds nothing
               "runs_trained": len(run_wall), "run_wall_s": run_wall, "jobs": args.jobs,
               "threads_per_run": args.threads, "seeds": seeds, "extra_seeds_at_largest_batches": extra_seeds,
               "grid": grid}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "README.md").write_text(study_readme(summary, args.tune))
    if not args.tune:
        plot_vs_batch(summary, out / "accuracy_vs_batch.png", "Fashion-MNIST MLP, equal epochs: final top-1 vs batch")
    print(f"proxy study: {len(jobs)} runs, {wall:.0f} s; {out / 'report.md'}, {out / 'summary.json'}")
    if args.compare:
        ref = json.loads(Path(args.compare).read_text())["grid"]
        pairs = [(v, ref[o][c]["runs"][n]) for o, cells in grid.items() for c, cell in cells.items()
                 for n, v in cell["runs"].items() if n in ref.get(o, {}).get(c, {}).get("runs", {})]
        # diverged (None) on both sides agrees; on one side only it is a difference of 1
        diffs = [0.0 if a is None and b is None else 1.0 if a is None or b is None else abs(a - b) for a, b in pairs]
        print(f"proxy study: {len(diffs)} runs compared with {args.compare}: {sum(d == 0 for d in diffs)} identical, "
              f"largest |top-1 difference| {max(diffs) if diffs else float('nan'):.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
