"""Time per optimizer step: `fit`'s LightningModule + Trainer against a hand-written PyTorch loop.

Both sides do the same work on the same in-memory batch: ResNet-18 with the small-input stem
(default 32 px, batch 32, 10 classes), LAMB through ``build_optimizer`` (author's param rule),
the recipe's poly schedule through ``build_scheduler``, global gradient-norm clipping at 1.0,
cross-entropy (sum / batch).  The Lightning side is the harness as `fit` runs it: LambModule,
the synthetic ImageDataModule (one batch drawn once), the Throughput and TrustRatios callbacks,
a CSV logger; no W&B, no checkpoint, no progress bar.  The two alternate step by step in one
process: after each optimizer step of `fit` a callback runs one step of the hand-written loop
(timed apart), so on a shared machine both see the same load at the same moment.  Per side the
median over ``--steps`` steps (after ``--warmup``) is reported, and the ratio of the medians.
Last line: one JSON object.

    .venv/bin/python benchmarks/harness_overhead.py [--steps 40] [--size 32] [--batch 32]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch

os.environ.setdefault("WANDB_MODE", "disabled")


def _device() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"


def make_parts(args):
    from resnet_lamb.recipe import OptimizerSpec, ScheduleSpec

    opt = OptimizerSpec(name="lamb", base_lr=0.005, base_batch=512, kwargs={"impl": args.impl})
    sched = ScheduleSpec(name="poly", warmup_epochs=0.3125)
    return opt, sched


def make_loop(args):
    """The hand-written loop's state and one step of it (closure)."""
    from resnet_lamb.data import ImageDataModule
    from resnet_lamb.networks import build_resnet
    from resnet_lamb.optim import build_optimizer
    from resnet_lamb.optim.schedules import build_scheduler
    from resnet_lamb.recipe import derive_plan

    opt_spec, sched_spec = make_parts(args)
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    torch.manual_seed(0)
    net = build_resnet("resnet18", 10, small_input=True).to(device)
    if gpu:
        net = net.to(memory_format=torch.channels_last)
    net.train()
    dm = ImageDataModule(backend="synthetic", global_batch=args.batch, micro_batch=args.batch,
                         image_size=args.size, train_images=args.batch * args.steps, val_images=args.batch,
                         num_classes=10, channels_last=gpu)
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    images, labels = images.to(device), labels.to(device)
    plan = derive_plan(opt_spec, sched_spec, global_batch=args.batch, micro_batch=args.batch, world_size=1,
                       train_images=args.batch * args.steps, epochs=1)
    opt = build_optimizer("lamb", net, lr=plan.lr, weight_decay=opt_spec.weight_decay, param_rule="author",
                          **opt_spec.kwargs)
    sched = build_scheduler(opt, sched_spec, plan)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
            logits = net(images)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels, ignore_index=-1,
                                                 reduction="sum") / labels.numel()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if gpu:
            torch.cuda.synchronize()

    return step


def lockstep(args, tmp: str) -> tuple[list[float], list[float]]:
    """One `fit`; after each of its optimizer steps one step of the hand-written loop runs (timed
    apart), so both see the same machine at the same moment.  The Lightning time of a step is
    the wall time from the end of the previous loop step to the end of this Lightning batch: it
    holds everything Lightning does (data fetch, hooks, logging, callbacks, the step itself)."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers import CSVLogger

    from resnet_lamb.data import ImageDataModule
    from resnet_lamb.model import LambModule
    from resnet_lamb.telemetry import Throughput, TrustRatios

    loop_step = make_loop(args)
    lit: list[float] = []
    raw: list[float] = []

    class Lockstep(Callback):
        t = 0.0

        def on_train_start(self, trainer, pl_module):
            self.t = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t1 = time.perf_counter()
            lit.append(t1 - self.t)
            loop_step()
            t2 = time.perf_counter()
            raw.append(t2 - t1)
            self.t = t2

    opt, sched = make_parts(args)
    torch.manual_seed(0)
    model = LambModule(arch="resnet18", num_classes=10, small_input=True, grad_clip_norm=1.0,
                       trust_ratio_every=100, optimizer=opt, schedule=sched)
    dm = ImageDataModule(backend="synthetic", global_batch=args.batch, micro_batch=args.batch,
                         image_size=args.size, train_images=args.batch * args.steps, val_images=args.batch,
                         num_classes=10, channels_last=torch.cuda.is_available())
    gpu = torch.cuda.is_available()
    # Lockstep first: the harness's own callbacks run after it, so their cost lands in the next
    # Lightning interval (as does Lightning's end-of-batch logging)
    trainer = pl.Trainer(max_epochs=1, max_steps=args.steps, accumulate_grad_batches=1, logger=CSVLogger(tmp),
                         callbacks=[Lockstep(), Throughput(), TrustRatios(100)], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0, precision="bf16-mixed" if gpu else "32-true",
                         devices=1, log_every_n_steps=50)
    trainer.fit(model, datamodule=dm)
    return lit[args.warmup:], raw[args.warmup:]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40, help="optimizer steps (each side)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps at the start")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--impl", default="eager", help="LAMB implementation: eager | compiled | auto")
    args = p.parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        lit, raw = lockstep(args, tmp)
    ratios = [a / b for a, b in zip(lit, raw)]
    lit_s, raw_s = statistics.median(lit), statistics.median(raw)
    print(f"lightning {lit_s * 1e3:.1f} ms/step, loop {raw_s * 1e3:.1f} ms/step (medians of {len(lit)}); "
          f"pairwise ratio median {statistics.median(ratios):.4f}", file=sys.stderr)
    out = {"benchmark": "harness_overhead", "device": _device(),
           "model": f"resnet18 small_input {args.size}px batch {args.batch}", "optimizer": f"lamb ({args.impl})",
           "steps_timed_each": len(lit), "lightning_s_per_step": round(lit_s, 5), "loop_s_per_step": round(raw_s, 5),
           "ratio": round(lit_s / raw_s, 4), "pairwise_ratio_median": round(statistics.median(ratios), 4), "overhead_pct": round((lit_s / raw_s - 1) * 100, 2),
           "within_5pct": lit_s <= 1.05 * raw_s}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
