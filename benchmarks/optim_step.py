"""Side-by-side optimizer step() timing on torchvision resnet50's 161 parameter tensors, at 1 thread
and at all of the machine's threads (CPU), plus a GPU run with kernel launches per step when one
is present.

Every contender gets its own copy of the parameters and the same random gradients; the
contenders run interleaved (one step each, in a shuffled order, per repetition) so machine load
hits all of them alike; medians, minima and the median of per-repetition (paired) ratios are
reported.  Each thread count runs in its own
process (inductor bakes the thread count into its CPU kernels).  The compiled paths are warmed up
first and their one-time compile cost (first step, state init included) is reported;
``--cold-compile`` disables inductor's on-disk caches to show the cold cost.  Parameters are
grouped by the author's rule (BatchNorm: no decay, no trust ratio; the training configuration),
the same groups for every contender; ``lamb_compiled_alladapt`` adapts all 161 tensors (rule
"none").

The floor: LAMB must read the update norm before it applies the update, so it moves about
40 bytes per parameter (read x g m v, write m v r; read x r, write x) where fused AdamW moves 28
(read x g m v, write x m v): a floor near 1.43x.  LARS moves about 28 (read x g m, write m; read
x m, write x) where fused SGD moves 20: near 1.4x.  ``over_floor`` = ratio / floor.

The last line of output is one JSON object (ratios per thread count, the floors, load averages).

    python benchmarks/optim_step.py [--reps 15] [--threads 1,all] [--only lamb_compiled,...]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import subprocess
import sys
import time
import warnings

import torch

#: bytes moved per parameter: (LAMB, fused AdamW), (LARS, fused SGD); see the module docstring
FLOORS = {"lamb_over_adamw_fused": 40 / 28, "lars_over_sgd_fused": 28 / 20}
#: each contender against its fused anchor, under that anchor's floor
FLOOR_OF_ANCHOR = {"adamw_fused": "lamb_over_adamw_fused", "sgd_fused": "lars_over_sgd_fused"}
CONTENDERS = {
    "adamw_fused": ("lamb_compiled", "lamb_compiled_alladapt", "lamb_eager", "timm_lamb", "torch_optimizer_lamb"),
    "sgd_fused": ("lars_paper_compiled", "lars_classic_compiled", "lars_paper_eager", "lars_classic_eager", "timm_lars"),
}
#: ratio name -> (contender, anchor, floor key); "_compiled" left out of the name
RATIOS = {
    f"{c.replace('_compiled', '')}_over_{anchor}": (c, anchor, FLOOR_OF_ANCHOR[anchor])
    for anchor, names in CONTENDERS.items()
    for c in names
}
#: the ratios the project holds to 1.5x (issue 15)
HEADLINE = ("lamb_over_adamw_fused", "lars_paper_over_sgd_fused", "lars_classic_over_sgd_fused")


def resnet50() -> torch.nn.Module:
    import torchvision

    return torchvision.models.resnet50()


def contenders() -> dict:
    from resnet_lamb.optim import Lamb, Lars

    def timm_lamb(ps):
        from timm.optim import Lamb as TL
        return TL(ps, lr=1e-3, weight_decay=0.01)

    def timm_lars(ps):
        from timm.optim import Lars as TLa
        return TLa(ps, lr=0.1, momentum=0.9, weight_decay=1e-4)

    def tio_lamb(ps):
        import torch_optimizer
        return torch_optimizer.Lamb(ps, lr=1e-3, weight_decay=0.01)

    fused = {"fused": True}
    return {
        "lamb_compiled": lambda ps: Lamb(ps, lr=1e-3, weight_decay=0.01, impl="compiled"),
        "lamb_compiled_alladapt": lambda ps: Lamb(ps, lr=1e-3, weight_decay=0.01,
                                                  layer_adaptation=True, impl="compiled"),
        "lamb_eager": lambda ps: Lamb(ps, lr=1e-3, weight_decay=0.01, impl="eager"),
        "lars_paper_compiled": lambda ps: Lars(ps, lr=0.1, weight_decay=1e-4, mode="paper",
                                               impl="compiled"),
        "lars_paper_eager": lambda ps: Lars(ps, lr=0.1, weight_decay=1e-4, mode="paper",
                                            impl="eager"),
        "lars_classic_compiled": lambda ps: Lars(ps, lr=0.1, weight_decay=1e-4, mode="classic",
                                                 impl="compiled"),
        "lars_classic_eager": lambda ps: Lars(ps, lr=0.1, weight_decay=1e-4, mode="classic",
                                              impl="eager"),
        "adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, **fused),
        "adamw_foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01,
                                                      foreach=True),
        "sgd_fused": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-4,
                                                **fused),
        "sgd_foreach": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-4,
                                                  foreach=True),
        "timm_lamb": timm_lamb,
        "timm_lars": timm_lars,
        "torch_optimizer_lamb": tio_lamb,
    }


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def launches_per_step(opt, device: str, steps: int = 3) -> float:
    """CUDA kernels (and memcpy/memset) the profiler sees per step()."""
    from torch.profiler import ProfilerActivity, profile

    _sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            opt.step()
        _sync(device)
    n = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return round(n / steps, 1)


def run(args: argparse.Namespace, threads: int, device: str) -> dict:
    """Every contender at one thread count on one device; the JSON summary of that run."""
    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    from resnet_lamb.optim.param_groups import param_groups

    load_before = os.getloadavg()
    base = resnet50().to(device)
    grads = [torch.randn_like(p) * 1e-2 for p in base.parameters()]
    table = contenders()
    names = [n for n in table if not args.only or n in args.only.split(",")]
    opts = {}
    compile_s: dict[str, float] = {}
    for n in names:
        model = copy.deepcopy(base)
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()
        # the training configuration: the author's rule (BN: no decay, no trust ratio); the
        # same groups for every contender (torch's/timm's ignore "layer_adaptation")
        groups = param_groups(model, 0.01, args.rule if "alladapt" not in n else "none")
        if not n.startswith(("lamb", "lars")):
            groups = [dict(g, params=[p for _, p in g["params"]]) for g in groups]
        try:
            opt = table[n](groups)
        except Exception as e:  # noqa: BLE001 - a missing third-party contender is skipped
            print(f"skip {n}: {e}", file=sys.stderr)
            continue
        t0 = time.perf_counter()
        opt.step()  # first step: state init (+ compile for the compiled paths)
        _sync(device)
        if n.endswith("compiled"):
            compile_s[n] = round(time.perf_counter() - t0, 2)
        for _ in range(args.warmup):
            opt.step()
        opts[n] = opt

    times: dict[str, list[float]] = {n: [] for n in opts}
    order = list(opts)
    for _ in range(args.reps):
        random.shuffle(order)
        for n in order:
            _sync(device)
            t0 = time.perf_counter()
            opts[n].step()
            _sync(device)
            times[n].append(time.perf_counter() - t0)

    med = {n: round(statistics.median(v) * 1e3, 2) for n, v in times.items()}
    low = {n: round(min(v) * 1e3, 2) for n, v in times.items()}
    print(f"-- {device}, {threads} thread(s)")
    print(f"{'optimizer':24s} {'median ms':>10s} {'min ms':>8s}")
    for n in opts:
        print(f"{n:24s} {med[n]:10.2f} {low[n]:8.2f}")

    out = {"device": device, "threads": threads, "reps": args.reps, "median_ms": med,
           "min_ms": low, "compile_s": compile_s,
           "load_avg": [round(x, 2) for x in load_before + os.getloadavg()]}
    for key, (a, b, floor) in RATIOS.items():
        if a in med and b in med:
            out[key] = round(med[a] / med[b], 3)
            out[key + "_min"] = round(low[a] / low[b], 3)
            # a and b ran back to back in each repetition: the median of per-repetition ratios
            # is the figure least moved by other jobs on a shared machine
            out[key + "_paired"] = round(statistics.median(x / y for x, y in zip(times[a], times[b])), 3)
            out[key + "_over_floor"] = round(med[a] / med[b] / FLOORS[floor], 3)
    if device == "cuda":
        out["launches_per_step"] = {n: launches_per_step(o, device) for n, o in opts.items()}
    return out


def _child(argv: list[str], threads: int, device: str) -> dict:
    """Run one thread count / device in a fresh process; its JSON last line."""
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--threads", str(threads),
           "--device", device]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    lines = proc.stdout.strip().splitlines()
    print("\n".join(lines[:-1]), flush=True)
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15, help="timed interleaved repetitions")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps after compile")
    ap.add_argument("--threads", default="1,all",
                    help="comma list of CPU thread counts, 'all' = every CPU of the machine "
                         "(default 1,all: one process each)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                    help="auto: the CPU runs, plus a CUDA run when a GPU is present")
    ap.add_argument("--only", default="", help="comma list of contenders (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rule", default="author", help="param-group rule (author | timm | none)")
    ap.add_argument("--cold-compile", action="store_true",
                    help="disable inductor's on-disk caches: report the cold compile cost")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.cold_compile:
        import torch._inductor.config as inductor_config

        inductor_config.force_disable_caches = True
    counts = sorted({(os.cpu_count() or 1) if t == "all" else int(t) for t in args.threads.split(",")})
    if args.device != "auto" and len(counts) == 1:  # one run, in this process
        out = run(args, counts[0], args.device)
        print(json.dumps(out))
        return out

    passthrough = [a for a in argv]
    for flag in ("--threads", "--device"):  # the children get their own
        while flag in passthrough:
            i = passthrough.index(flag)
            del passthrough[i:i + 2]
        passthrough = [a for a in passthrough if not a.startswith(flag + "=")]
    runs = {}
    if args.device in ("auto", "cpu"):
        for t in counts:
            runs[f"cpu{t}"] = _child(passthrough, t, "cpu")
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        runs["cuda"] = _child(passthrough, counts[-1], "cuda")
    model = resnet50()
    out = {"bench": "optim_step", "model": "resnet50",
           "tensors": sum(1 for _ in model.parameters()),
           "params": sum(p.numel() for p in model.parameters()), "rule": args.rule,
           "floor": {k: round(v, 3) for k, v in FLOORS.items()},
           "compile_cache": "cold" if args.cold_compile else "default",
           "load_avg": {name: r["load_avg"] for name, r in runs.items()},
           "compile_s": {name: r["compile_s"] for name, r in runs.items()}}
    for key in RATIOS:
        per = {name: r[key] for name, r in runs.items() if key in r}
        if per:
            out[key] = per
            out[key + "_paired"] = {name: r[key + "_paired"] for name, r in runs.items() if key in r}
    out["headline_max"] = max((r[k] for r in runs.values() if r["device"] == "cpu"
                               for k in HEADLINE if k in r), default=None)
    out["runs"] = runs
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
