"""Side-by-side optimizer step() timing on torchvision resnet50's 161 parameter tensors (CPU).

Every contender gets its own copy of the parameters and the same random gradients; the
contenders run interleaved (one step each, in a shuffled order, per repetition) so machine load
hits all of them alike; medians are reported.  The compiled paths are warmed up first and their
one-time compile cost (first step, state init included) is reported; ``--cold-compile`` disables
inductor's on-disk caches to show the cold cost.  Parameters are grouped by the author's rule
(BatchNorm: no decay, no trust ratio; the training configuration), the same groups for every
contender; ``lamb_compiled_alladapt`` adapts all 161 tensors (rule "none").  Last line of output: one JSON object.

    python benchmarks/optim_step.py [--reps 15] [--threads N] [--only lamb,adamw_fused,...]
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
import warnings

import torch


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
        "adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, fused=True),
        "adamw_foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01,
                                                      foreach=True),
        "sgd_fused": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-4,
                                                fused=True),
        "sgd_foreach": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-4,
                                                  foreach=True),
        "timm_lamb": timm_lamb,
        "timm_lars": timm_lars,
        "torch_optimizer_lamb": tio_lamb,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15, help="timed interleaved repetitions")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps after compile")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: robust to other jobs on a shared CPU; 0 = torch default)")
    ap.add_argument("--only", default="", help="comma list of contenders (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rule", default="author", help="param-group rule (author | timm | none)")
    ap.add_argument("--cold-compile", action="store_true",
                    help="disable inductor's on-disk caches: report the cold compile cost")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    if args.cold_compile:
        import torch._inductor.config as inductor_config

        inductor_config.force_disable_caches = True
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    import copy

    from resnet_lamb.optim import param_groups

    base = resnet50()
    grads = [torch.randn_like(p) * 1e-2 for p in base.parameters()]
    table = contenders()
    names = [n for n in table if not args.only or n in args.only.split(",")]
    opts, params = {}, {}
    compile_s: dict[str, float] = {}
    for n in names:
        model = copy.deepcopy(base)
        ps = list(model.parameters())
        for p, g in zip(ps, grads):
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
        first = time.perf_counter() - t0
        if n.endswith("compiled"):
            compile_s[n] = round(first, 2)
        for _ in range(args.warmup):
            opt.step()
        opts[n], params[n] = opt, ps

    times: dict[str, list[float]] = {n: [] for n in opts}
    order = list(opts)
    for _ in range(args.reps):
        random.shuffle(order)
        for n in order:
            t0 = time.perf_counter()
            opts[n].step()
            times[n].append(time.perf_counter() - t0)

    med = {n: round(statistics.median(v) * 1e3, 2) for n, v in times.items()}
    print(f"{'optimizer':24s} {'median ms':>10s} {'min ms':>8s}")
    for n in opts:
        print(f"{n:24s} {med[n]:10.2f} {min(times[n]) * 1e3:8.2f}")

    def ratio(a: str, b: str) -> float | None:
        return round(med[a] / med[b], 3) if a in med and b in med else None

    out = {
        "bench": "optim_step", "model": "resnet50", "tensors": len(grads),
        "params": sum(g.numel() for g in grads), "device": "cpu", "rule": args.rule,
        "threads": torch.get_num_threads(), "reps": args.reps, "median_ms": med,
        "lamb_over_adamw_fused": ratio("lamb_compiled", "adamw_fused"),
        "lamb_alladapt_over_adamw_fused": ratio("lamb_compiled_alladapt", "adamw_fused"),
        "lamb_eager_over_adamw_fused": ratio("lamb_eager", "adamw_fused"),
        "lars_paper_over_sgd_fused": ratio("lars_paper_compiled", "sgd_fused"),
        "lars_classic_over_sgd_fused": ratio("lars_classic_compiled", "sgd_fused"),
        "lars_paper_eager_over_sgd_fused": ratio("lars_paper_eager", "sgd_fused"),
        "lars_classic_eager_over_sgd_fused": ratio("lars_classic_eager", "sgd_fused"),
        "timm_lamb_over_adamw_fused": ratio("timm_lamb", "adamw_fused"),
        "compile_s": compile_s, "compile_cache": "cold" if args.cold_compile else "default",
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
