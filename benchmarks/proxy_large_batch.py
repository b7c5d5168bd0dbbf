"""The proxy large-batch study, v2 (fair to every optimizer): LAMB, LARS, Adam, AdamW, momentum SGD
and Nesterov momentum on two CPU proxies, the same epoch budget at every batch, and at every batch
every optimizer tried on the same log-spaced LR grid around its recipe's scaling rule.

    .venv/bin/python benchmarks/proxy_large_batch.py                      # the committed study
    .venv/bin/python benchmarks/proxy_large_batch.py --proxies mlp --optimizers lars --batches 8192 \\
        --runs /tmp/fresh --out /tmp/fresh-out --compare benchmarks/results/proxy-v2/summary.json

Proxies (PROXIES): ``mlp``, the TensorFlow LAMB README's MNIST MLP (784-512-512-10, no BatchNorm)
on half of Fashion-MNIST, and ``resnet``, a tiny ResNet with BatchNorm (resnet_lamb/small_resnet.py) on
a class-balanced Fashion-MNIST subset. Recipes: recipes/proxy/<optimizer>.yaml (base.yaml: the mlp);
the resnet proxy's settings are command-line overrides of the same recipes (PROXIES below).

1. Grid: every (proxy, optimizer, batch) at peak LR = rule(batch) x 4^k, k = -3 ... +1 (GRID), seed 0.
   The grid reaches further below the rule than above it: the v1 study's failures were all LRs too high.
   A cell whose best point is at the edge of what it tried (or that diverged at every LR) gets the next
   point beyond that edge, up to EDGE_ROUNDS times: the same rule for every optimizer.
2. Best point: the grid LR with the best seed-0 final top-1 (ties: the smaller LR); at the two largest
   batches it gets seeds 1 and 2 too and is reported as mean ± half range over 3 seeds.
3. Ablation at the largest batch: LAMB at its best LR with the paper's text settings (recipes/proxy/
   lamb.yaml) against the author's settings one at a time and all together (ABLATION).
4. Epochs to target: the first epoch whose val top-1 reaches the proxy's target, the earliest over the
   grid (seed 0), per optimizer and batch.

Every run is an ordinary `resnet-lamb fit` in a worker process (``--jobs`` side by side, ``--threads``
torch threads each: bit-reproducible for the same value) into ``--runs/<name>``; a finished run is
not run again and an interrupted one resumes from its last.ckpt. ``--out`` gets README.md (command,
date, machine, wall time, tables), summary.json (every run's final top-1 and val curve) and one figure
per proxy; the last line of stdout is a JSON summary. ``--compare SUMMARY_JSON`` prints the largest
final top-1 difference of the runs both hold.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPTIMIZERS = ("lamb", "lars", "adam", "adamw", "momentum", "nesterov")
GRID = tuple(4.0 ** k for k in range(-3, 2))  # x rule(batch): 1/64, 1/16, 1/4, 1, 4
EDGE_ROUNDS = 2
FACTORS = tuple(4.0 ** k for k in range(-3 - EDGE_ROUNDS, 2 + EDGE_ROUNDS))  # the grid and its extensions
EXTRA_SEEDS = (1, 2)


@dataclass(frozen=True)
class Proxy:
    data: str  # prepared folder, relative to the repository
    prepare: tuple  # `resnet-lamb prepare` arguments that make it
    batches: tuple
    epochs: int
    warmup_epochs: float  # at batch 128, times batch/128 (the paper's linear-epoch warmup)
    target: float  # val top-1 for "epochs to target"
    args: tuple = ()  # overrides of recipes/proxy/<optimizer>.yaml
    about: str = ""
    notes: dict = field(default_factory=dict)


# Sizes: our choice, to fit ~20 min on a quiet 2-core CPU with 2 runs side by side (the results'
# README states the measured cost): half of Fashion-MNIST's train set for the mlp, 5000 images for
# the resnet. At the largest batch both proxies take 20 optimizer steps (mlp: 8192 of 30000 images,
# 4 steps an epoch, 5 epochs; resnet: 1024 of 5000, 5 steps an epoch, 4 epochs) and warm up for about
# a quarter of the budget (the paper: 20 of 90 epochs at 32K), the same warmup steps at every batch.
# Targets: our choice, between the small-batch and the large-batch accuracy of the proxy.
PROXIES = {
    "mlp": Proxy("data/fashion-mnist-3000", ("fashion-mnist", "--per-class-train", "3000"), (256, 2048, 8192), 5,
                 0.02, 0.82, args=("--data.train_images", "30000"),
                 about="MLP 784-512-512-10 (no BatchNorm), Fashion-MNIST 3000 train images per class and all "
                       "10000 test images as val (28 px)"),
    "resnet": Proxy("data/fashion-mnist-500", ("fashion-mnist", "--per-class-train", "500", "--per-class-val", "500"),
                    (64, 256, 1024), 4, 0.125, 0.75,
                    args=("--model.arch", "small_resnet", "--data.train_images", "5000", "--data.val_images", "5000"),
                    about="small_resnet (3x3/2 stem, 3 BasicBlocks 16/32/64, BatchNorm; 78k parameters), "
                          "Fashion-MNIST 500 train / 500 val images per class (5000 / 5000, 28 px)"),
}
LAMB_KWARGS = '{"betas": [0.9, 0.999], "eps": 1.0e-6, "bias_correction": false}'  # lamb.yaml's, bias correction off
# The LAMB author's settings (recipes/demo-author.yaml, recipes/imagenet/table5: run.sh and
# optimization.py) against the paper text's (recipes/proxy/lamb.yaml: wd 0.01, no label smoothing,
# Algorithm 2's bias correction, padded epochs)
ABLATION = {
    "weight decay 1.5": ("--model.optimizer.weight_decay", "1.5"),
    "label smoothing 0.1": ("--model.label_smoothing", "0.1"),
    "no bias correction": ("--model.optimizer.kwargs", LAMB_KWARGS),
    "full-batch epochs": ("--data.epoch_mode", "full_batch"),
}
ABLATION["all four (author)"] = tuple(a for v in ABLATION.values() for a in v)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="runs/proxy-v2", help="folder of the run folders")
    p.add_argument("--out", default="benchmarks/results/proxy-v2", help="results folder")
    p.add_argument("--proxies", default=",".join(PROXIES), help="comma-separated: " + ", ".join(PROXIES))
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="recipes/proxy/<name>.yaml, comma-separated")
    p.add_argument("--batches", default=None, help="only these of the proxies' batches, comma-separated")
    p.add_argument("--epochs", type=int, default=None, help="override every proxy's epochs (smoke tests)")
    p.add_argument("--data-root", default=None, help="use this prepared folder for every proxy (smoke tests)")
    p.add_argument("--extra", default="", help="more fit arguments for every run, space-separated (smoke tests)")
    p.add_argument("--jobs", type=int, default=2, help="runs side by side (worker processes)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (results are bit-reproducible "
                                                          "for the same value)")
    p.add_argument("--compare", default=None, metavar="SUMMARY_JSON", help="print the largest top-1 difference to it")
    return p.parse_args(argv)


# ------------------------------------------------------------------ selection (pure: tests/test_proxy.py)
def best_factor(tops: dict) -> float | None:
    """The grid factor with the best final top-1 (``tops``: factor -> top-1, None = diverged); ties go
    to the smaller LR; None when every point diverged."""
    ok = [(top, -f) for f, top in tops.items() if top is not None]
    return -max(ok)[1] if ok else None


def next_factor(tops: dict) -> float | None:
    """The point beyond the edge of ``tops`` (factor -> top-1) that the best point sits on (below when
    every point diverged); None when the best point is inside or FACTORS end there."""
    f = best_factor(tops)
    want = min(tops) / 4 if f is None or f == min(tops) else max(tops) * 4 if f == max(tops) else None
    return next((x for x in FACTORS if want is not None and math.isclose(want, x)), None)


def epochs_to(curve: list, target: float) -> int | None:
    """The first (1-based) epoch whose val top-1 reaches ``target``; None if none does."""
    return next((i for i, top in enumerate(curve, 1) if top >= target), None)


def spread(values: list) -> tuple:
    """(mean, half the range); (None, None) for no values."""
    return (sum(values) / len(values), (max(values) - min(values)) / 2) if values else (None, None)


def run_name(proxy: str, opt: str, batch: int, factor: float, seed: int, variant: str = "") -> str:
    k = round(math.log(factor, 4))
    tag = "".join(c if c.isalnum() or c == "." else "-" for c in variant).strip("-")
    return f"{proxy}-{opt}-bs{batch}-lr4x{k:+d}" + (f"-{tag}" if tag else "") + f"-seed{seed}"


def analyse(runs: dict, proxies: dict, optimizers: list, batches: dict) -> dict:
    """Grid, best points, epochs to target and ablation per proxy from ``runs`` (name -> {top1, curve,
    lr}; top1 None = diverged), as summary.json holds them."""
    out = {}
    for p, proxy in proxies.items():
        grid, best, reach, ablation = {}, {}, {}, {}
        bs = batches[p]
        for opt in optimizers:
            for b in bs:
                if any(run_name(p, opt, b, f, 0) not in runs for f in GRID):
                    continue
                cell = {f: runs[run_name(p, opt, b, f, 0)] for f in FACTORS if run_name(p, opt, b, f, 0) in runs}
                grid.setdefault(opt, {})[str(b)] = {f"{f:g}": {"lr": r["lr"], "top1": r["top1"]}
                                                    for f, r in cell.items()}
                f = best_factor({f: r["top1"] for f, r in cell.items()})
                if f is None:
                    best.setdefault(opt, {})[str(b)] = None
                else:
                    seeds = [0] + (list(EXTRA_SEEDS) if b in bs[-2:] else [])
                    got = [runs.get(run_name(p, opt, b, f, s)) for s in seeds]
                    tops = [r["top1"] for r in got if r is not None and r["top1"] is not None]
                    mean, half = spread(tops)
                    best.setdefault(opt, {})[str(b)] = {
                        "factor": f, "lr": cell[f]["lr"], "mean": mean, "half_range": half, "n": len(tops),
                        "diverged": sum(r is not None and r["top1"] is None for r in got),
                        "edge": f in (min(cell), max(cell))}
                firsts = [(epochs_to(r["curve"], proxy.target), f) for f, r in cell.items()]
                firsts = [(e, f) for e, f in firsts if e is not None]
                e, f = min(firsts) if firsts else (None, None)
                reach.setdefault(opt, {})[str(b)] = None if e is None else {"epochs": e, "lr": cell[f]["lr"]}
        big = bs[-1]
        lamb = best.get("lamb", {}).get(str(big))
        if lamb:
            for variant in ["", *ABLATION]:
                r = runs.get(run_name(p, "lamb", big, lamb["factor"], 0, variant))
                if r is not None:
                    ablation[variant or "paper text (lamb.yaml)"] = r["top1"]
        out[p] = {"about": proxy.about, "batches": list(bs), "epochs": proxy.epochs, "target": proxy.target,
                  "warmup_epochs_at_128": proxy.warmup_epochs, "grid": grid, "best": best,
                  "epochs_to_target": reach, "ablation": ablation}
    return out


# ------------------------------------------------------------------ running
def result(run_dir: Path) -> tuple:
    """(validated epochs, final top-1 or None = diverged, diverged, val top-1 curve, peak LR)."""
    from resnet_lamb.report import load_run

    run = load_run(run_dir)
    bad = run.status == "failed" and run.reason.startswith(("NonFiniteLossError", "NonFiniteGradientError"))
    curve = [v[1] for v in run.val]
    return len(run.val), None if bad or not curve else run.final[0], bad, curve, run.lr


def _worker_init(threads: int) -> None:  # spawned workers start in the parent's folder (ROOT)
    import torch

    torch.set_num_threads(threads)


def _fit_job(job: tuple) -> tuple:
    return job[1], fit(*job)


def fit(recipe: Path, name: str, runs: Path, batch: int, seed: int, epochs: int, extra: list) -> float:
    """One `resnet-lamb fit`, resumed when its folder holds a checkpoint; returns its wall seconds."""
    from resnet_lamb.cli import main as cli

    run_dir = runs / name
    args = ["fit", "--config", str(recipe), "--data.global_batch", str(batch), "--data.micro_batch", str(batch),
            "--seed_everything", str(seed), "--trainer.max_epochs", str(epochs), "--run.root", str(runs),
            "--run.name", name, "--run.wandb", "false", *extra]
    if (run_dir / "checkpoints" / "last.ckpt").is_file():
        args += ["--ckpt_path", "last"]
    start = time.perf_counter()
    try:
        rc = cli(args)
    except SystemExit as exc:
        rc = exc.code
    if rc and not result(run_dir)[2]:
        raise SystemExit(f"proxy study: resnet-lamb {shlex.join(args)} exited {rc}")
    return time.perf_counter() - start


def recipe_of(opt: str) -> tuple:
    """(path, base_lr) of recipes/proxy/<opt>.yaml: the grid scales base_lr, fit applies the scaling rule."""
    from resnet_lamb.recipe import load_recipe

    path = ROOT / "recipes" / "proxy" / f"{opt}.yaml"
    if not path.is_file():
        raise SystemExit(f"proxy study: {path} does not exist; choose from {', '.join(OPTIMIZERS)}")
    o = load_recipe(path)["model"]["optimizer"]
    return path, float(o["base_lr"])


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


def run_pool(todo: list, args, runs: Path, started: float, walls: dict) -> None:
    if not todo:
        return
    # `--jobs` worker processes of `--threads` torch threads each: on 2 cores two 1-thread runs side
    # by side beat one 2-thread run; a worker keeps its decoded data sets across its runs
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_init, initargs=(args.threads,)) as pool:
        for i, (name, seconds) in enumerate(pool.map(_fit_job, todo), 1):
            walls[name] = seconds
            top = result(runs / name)[1]
            print(f"[{i}/{len(todo)}] {name}: {'diverged' if top is None else f'top-1 {top:.4f}'} in {seconds:.0f} s "
                  f"({time.perf_counter() - started:.0f} s so far)", flush=True)


# ------------------------------------------------------------------ writing
def _f(x) -> str:
    return "diverged" if x is None else f"{x:.4f}"


def _best_text(c) -> str:
    if c is None:
        return "diverged at every LR"
    text = _f(c["mean"]) + (f" ±{c['half_range']:.4f} (n={c['n']})" if c["n"] > 1 else "")
    text += f" @ {c['lr']:.3g}" + (" (grid edge)" if c["edge"] else "")
    return text + (f", {c['diverged']} diverged" if c["diverged"] else "")


def study_readme(summary: dict) -> str:
    s = summary
    factors = [f"{f:g}" for f in GRID]
    extended = [f"{f:g}" for f in FACTORS if f not in GRID]
    lines = ["# Proxy large-batch study v2: every optimizer tuned at every batch", "",
             f"- command: `{s['command']}`", f"- date: {s['date']}", f"- machine: {s['machine']}",
             f"- wall time: {s['wall_s']} s ({s['wall_s'] / 60:.1f} min) for {s['runs_trained']} runs"
             + (" (over several invocations)" if s.get("resumed") else ""),
             f"- {s['jobs']} runs side by side, {s['threads_per_run']} torch thread(s) each",
             f"- LR grid: peak LR = the recipe's scaling rule at the batch x {', '.join(factors)} (seed 0); the best "
             f"point gets seeds {list(EXTRA_SEEDS)} too at the two largest batches (mean ± half range); a cell "
             f"whose best point is at the edge of what it tried gets the next point beyond it "
             f"(x{', x'.join(extended)}; up to {EDGE_ROUNDS} more), the same rule for every optimizer",
             "- warmup: linear from 0, `warmup_epochs` at batch 128 times batch/128 (the same warmup steps at "
             "every batch), then linear decay to 0 (poly, power 1), for every optimizer", ""]
    for p, r in s["proxies"].items():
        bs = [str(b) for b in r["batches"]]
        cost = sorted(w for n, w in s.get("run_wall_s", {}).items() if n.startswith(p + "-"))
        lines += [f"## {p}: {r['about']}", "", f"{r['epochs']} epochs at every batch; warmup "
                  f"{r['warmup_epochs_at_128']} epochs at 128; target for epochs-to-target: val top-1 {r['target']}."
                  + (f" Wall time of a run (2 side by side): median {cost[len(cost) // 2]:.0f} s, "
                     f"{cost[0]:.0f}-{cost[-1]:.0f} s over {len(cost)} runs." if cost else ""), "",
                  "Best point per optimizer and batch (final val top-1 @ peak LR):", "",
                  "| optimizer | " + " | ".join(bs) + " |", "|---" * (len(bs) + 1) + "|"]
        lines += [f"| {o} | " + " | ".join(_best_text(c.get(b)) if b in c else "-" for b in bs) + " |"
                  for o, c in r["best"].items()]
        lines += ["", f"Epochs to val top-1 {r['target']} (the earliest over the LR grid, seed 0; its LR):", "",
                  "| optimizer | " + " | ".join(bs) + " |", "|---" * (len(bs) + 1) + "|"]
        lines += [f"| {o} | " + " | ".join("-" if b not in c else "not reached" if c[b] is None
                                          else f"{c[b]['epochs']} @ {c[b]['lr']:.3g}" for b in bs) + " |"
                  for o, c in r["epochs_to_target"].items()]
        if r["ablation"]:
            lines += ["", f"LAMB at batch {bs[-1]} and its best LR, seed 0: the paper's text against the author's "
                      "settings:", "", "| setting | final val top-1 |", "|---|---|"]
            lines += [f"| {v} | {_f(t)} |" for v, t in r["ablation"].items()]
        lines += ["", "The whole grid (final val top-1 @ peak LR, seed 0; columns: x the rule's LR):", ""]
        for b in bs:
            cols = sorted({k for c in r["grid"].values() if b in c for k in c[b]}, key=float)
            lines += [f"Batch {b}:", "", "| optimizer | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
            lines += [f"| {o} | " + " | ".join(f"{_f(c[b][k]['top1'])} @ {c[b][k]['lr']:.3g}" if k in c[b] else "-"
                                              for k in cols) + " |" for o, c in r["grid"].items() if b in c]
            lines.append("")
        lines += [f"![best top-1 vs batch]({p}.png)", ""]
    return "\n".join(lines)


def plot(summary: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for p, r in summary["proxies"].items():
        fig, ax = plt.subplots(figsize=(6.5, 4.5), constrained_layout=True)
        for o, cells in r["best"].items():
            xs = sorted(int(b) for b in cells)
            ys = [cells[str(x)]["mean"] if cells[str(x)] else float("nan") for x in xs]
            err = [(cells[str(x)] or {}).get("half_range") or 0.0 for x in xs]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=o)
        ax.set_xscale("log", base=2)
        ax.set_xticks(r["batches"])
        ax.set_xticklabels([str(b) for b in r["batches"]])
        ax.set_xlabel("global batch")
        ax.set_ylabel("final val top-1 at the best grid LR")
        ax.set_title(f"{p}: {r['epochs']} epochs, the best point of each cell's LR grid", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.savefig(out / f"{p}.png", dpi=100)
        plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.chdir(ROOT)
    os.environ.setdefault("WANDB_MODE", "offline")
    runs, out = Path(args.runs), Path(args.out)
    proxies = {p: PROXIES[p] for p in args.proxies.split(",") if p}
    optimizers = [o for o in args.optimizers.split(",") if o]
    only = {int(b) for b in args.batches.split(",")} if args.batches else None
    batches = {p: tuple(b for b in x.batches if only is None or b in only) for p, x in proxies.items()}
    recipes = {o: recipe_of(o) for o in optimizers}
    extra_all = args.extra.split()
    for proxy in proxies.values():
        if not args.data_root and not (ROOT / proxy.data / "train").is_dir():
            from resnet_lamb.data.prepare import main as prepare

            prepare([*proxy.prepare, "--out", proxy.data])

    def job(p, opt, b, f, seed, variant=""):
        proxy, (path, lr) = proxies[p], recipes[opt]
        extra = ["--model.optimizer.base_lr", repr(lr * f), "--model.schedule.warmup_epochs",
                 repr(proxy.warmup_epochs), *proxy.args, *ABLATION.get(variant, ()), *extra_all,
                 "--data.root", args.data_root or proxy.data]
        return (path, run_name(p, opt, b, f, seed, variant), runs, b, seed, args.epochs or proxy.epochs, extra)

    def state(name, epochs):
        n, top, bad, curve, lr = result(runs / name)
        return {"done": n >= epochs or bad, "top1": top, "curve": curve, "lr": lr}

    started, walls = time.perf_counter(), {}
    phase1 = [job(p, o, b, f, 0) for p in proxies for o in optimizers for b in batches[p] for f in GRID]
    todo = [j for j in phase1 if not state(j[1], j[5])["done"]]
    todo.sort(key=lambda j: (j[5] * -1, j[3]))  # longest first: more epochs, then smaller batch
    print(f"proxy study: grid, {len(todo)} of {len(phase1)} runs to train", flush=True)
    run_pool(todo, args, runs, started, walls)
    for _ in range(EDGE_ROUNDS):
        names = {j[1] for j in phase1}
        beyond = []
        for p in proxies:
            for o in optimizers:
                for b in batches[p]:
                    tops = {f: state(run_name(p, o, b, f, 0), 1)["top1"] for f in FACTORS
                            if run_name(p, o, b, f, 0) in names}
                    f = next_factor(tops)
                    if f is not None:
                        beyond.append(job(p, o, b, f, 0))
        if not beyond:
            break
        phase1 += beyond
        todo = [j for j in beyond if not state(j[1], j[5])["done"]]
        print(f"proxy study: beyond the grid's edge, {len(todo)} of {len(beyond)} runs to train", flush=True)
        run_pool(todo, args, runs, started, walls)
    seed0 = {j[1]: state(j[1], j[5]) for j in phase1}
    first = analyse(seed0, proxies, optimizers, batches)
    phase2 = []
    for p, r in first.items():
        for o, cells in r["best"].items():
            for b in batches[p][-2:]:
                if cells.get(str(b)):
                    phase2 += [job(p, o, b, cells[str(b)]["factor"], s) for s in EXTRA_SEEDS]
        lamb = r["best"].get("lamb", {}).get(str(batches[p][-1])) if batches[p] else None
        if lamb:
            phase2 += [job(p, "lamb", batches[p][-1], lamb["factor"], 0, v) for v in ABLATION]
    todo = [j for j in phase2 if not state(j[1], j[5])["done"]]
    todo.sort(key=lambda j: (j[5] * -1, j[3]))
    print(f"proxy study: seeds and ablation, {len(todo)} of {len(phase2)} runs to train", flush=True)
    run_pool(todo, args, runs, started, walls)
    wall = time.perf_counter() - started

    everything = {j[1]: state(j[1], j[5]) for j in phase1 + phase2}
    per_run = {n: {"top1": r["top1"], "lr": r["lr"], "curve": r["curve"]} for n, r in everything.items()}
    command = shlex.join(["python", os.path.relpath(__file__, ROOT), *(sys.argv[1:] if argv is None else argv)])
    # wall time adds up over invocations of the same command (a resumed study; a rebuild trains nothing)
    old = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
    old = old if old.get("command") == command else {}
    run_wall = {**(old.get("run_wall_s") or {}), **{k: round(v, 1) for k, v in walls.items()}}
    fresh = len(walls) == len(everything)
    summary = {"command": command,
               "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC") if walls or not old else old["date"],
               "machine": machine() if walls or not old else old["machine"],
               "wall_s": round(wall) if fresh else old.get("wall_s", 0) + (round(wall) if walls else 0),
               "resumed": not fresh and bool(old), "runs_trained": len(run_wall), "run_wall_s": run_wall,
               "jobs": args.jobs, "threads_per_run": args.threads, "grid_factors": list(GRID),
               "edge_factors": [f for f in FACTORS if f not in GRID],
               "proxies": analyse(per_run, proxies, optimizers, batches), "runs": per_run}
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "README.md").write_text(study_readme(summary))
    plot(summary, out)
    compared = None
    if args.compare:
        ref = json.loads(Path(args.compare).read_text())["runs"]
        pairs = [(r["top1"], ref[n]["top1"]) for n, r in per_run.items() if n in ref]
        # diverged (None) on both sides agrees; on one side only it is a difference of 1
        diffs = [0.0 if a is None and b is None else 1.0 if a is None or b is None else abs(a - b) for a, b in pairs]
        compared = {"against": args.compare, "runs": len(diffs), "identical": sum(d == 0 for d in diffs),
                    "largest_top1_difference": max(diffs) if diffs else None}
        print(f"proxy study: {len(diffs)} runs compared with {args.compare}: {compared['identical']} identical, "
              f"largest |top-1 difference| {compared['largest_top1_difference']}", flush=True)
    headline = {p: {o: (c.get(str(r["batches"][-1])) or {}).get("mean") for o, c in r["best"].items()}
                for p, r in summary["proxies"].items()}
    print(json.dumps({"wall_s": summary["wall_s"], "runs": len(per_run), "runs_trained_now": len(walls),
                      "out": str(out), "best_top1_at_largest_batch": headline,
                      "ablation": {p: r["ablation"] for p, r in summary["proxies"].items()}, "compare": compared}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
