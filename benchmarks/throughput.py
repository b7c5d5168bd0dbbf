"""Training images/s of ResNet-50 through `fit`'s LightningModule + Trainer, on synthetic data and on
a DALI-read JPEG folder, on whatever device is present.

On a GPU: bf16-mixed, channels_last, 224 px, batch 256 per device (compare with NVIDIA's published
ResNet-50 training figure, about 2,470 img/s on one A100 80GB with AMP, DeepLearningExamples
"ResNet50 v1.5 for PyTorch" performance table).  On a CPU the defaults are small (64 px, batch 16,
10 timed steps) so the script finishes in a couple of minutes; the numbers then only compare
machines with each other.

The DALI folder is ``--root`` (ImageNet layout) or, when not given, a generated one: smooth random
JPEGs at 1.15x the crop size in ``--classes`` classes (decode-cheap, unlike noise).  Last line: one JSON object.

    .venv/bin/python benchmarks/throughput.py [--size 224] [--batch 256] [--steps 50] [--root DIR]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

os.environ.setdefault("WANDB_MODE", "disabled")
NVIDIA_A100_AMP = 2470  # img/s, ResNet-50 v1.5 training, 1x A100 80GB, AMP, DeepLearningExamples


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    import platform

    return f"cpu: {platform.processor() or platform.machine()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def make_folder(root: Path, width: int, height: int, per_class: int, classes: int = 10) -> Path:
    """Smooth random JPEGs (decode cost like photos, not like noise) in the ImageNet layout
    (train/ and val/; scripts/gpu_check.py uses it too)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", max(1, per_class // 4))):
        for c in range(classes):
            d = root / split / f"n{c:08d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
                Image.fromarray(small).resize((width, height), Image.BICUBIC).save(d / f"{i:05d}.JPEG", quality=90)
    return root


def measure(args, backend: str, root: str | None, tmp: str) -> float:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback

    from resnet_lamb.data import ImageDataModule
    from resnet_lamb.model import LambModule
    from resnet_lamb.recipe import OptimizerSpec, ScheduleSpec
    from resnet_lamb.telemetry import Throughput

    stamps: list[float] = []

    class Clock(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

    gpu = torch.cuda.is_available()
    steps = args.warmup + args.steps
    n = args.batch * steps
    kw = dict(backend=backend, global_batch=args.batch, micro_batch=args.batch, image_size=args.size,
              workers=args.workers, channels_last=gpu, num_classes=args.classes)
    if backend == "synthetic":
        kw.update(train_images=n, val_images=args.batch)
    else:
        kw.update(root=root)
    dm = ImageDataModule(**kw)
    model = LambModule(arch="resnet50", num_classes=kw["num_classes"], grad_clip_norm=1.0, trust_ratio_every=0,
                       optimizer=OptimizerSpec(name="lamb", base_lr=0.005, base_batch=512, kwargs={"impl": args.impl}),
                       schedule=ScheduleSpec(name="poly", warmup_epochs=0.0))
    trainer = pl.Trainer(max_steps=steps, max_epochs=max(1, -(-steps * args.batch // max(dm.train_images, 1))),
                         logger=False, callbacks=[Clock(), Throughput()], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0, precision="bf16-mixed" if gpu else "32-true", devices=1)
    trainer.fit(model, datamodule=dm)
    timed = stamps[args.warmup:]
    if len(timed) < 2:
        raise SystemExit(f"throughput: only {len(stamps)} steps ran; give a bigger --root or fewer --steps")
    return args.batch * (len(timed) - 1) / (timed[-1] - timed[0])


def main(argv=None) -> int:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=224 if gpu else 64)
    p.add_argument("--batch", type=int, default=256 if gpu else 16)
    p.add_argument("--steps", type=int, default=50 if gpu else 10, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=10 if gpu else 3, help="untimed steps first")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--root", default=None, help="ImageNet-layout folder for the DALI run (default: generated)")
    p.add_argument("--impl", default="auto" if gpu else "eager", help="LAMB implementation")
    p.add_argument("--backends", default="synthetic,dali")
    p.add_argument("--classes", type=int, default=1000, help="classes (generated folder and synthetic data)")
    args = p.parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    out = {"benchmark": "throughput", "device": device_name(), "model": "resnet50",
           "precision": "bf16-mixed + channels_last" if gpu else "fp32", "image_size": args.size,
           "batch": args.batch, "timed_steps": args.steps}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends.split(","):
            root = None
            if backend == "dali":
                try:
                    import nvidia.dali  # noqa: F401
                except ImportError:
                    out["dali_img_per_s"] = None
                    out["dali_note"] = "nvidia-dali not installed"
                    continue
                if args.root:
                    root = args.root
                else:
                    per_class = -(-args.batch * (args.steps + args.warmup) // args.classes)
                    root = str(make_folder(Path(tmp) / "jpegs", *(2 * [round(args.size * 1.15)]), per_class, args.classes))
            rate = measure(args, backend, root, tmp)
            out[f"{backend}_img_per_s"] = round(rate, 2)
            print(f"{backend}: {rate:.1f} img/s", file=sys.stderr, flush=True)
    out["reference"] = {"nvidia_resnet50_a100_amp_img_per_s": NVIDIA_A100_AMP}
    if gpu and out.get("synthetic_img_per_s"):
        out["fraction_of_reference"] = round(out["synthetic_img_per_s"] / NVIDIA_A100_AMP, 3)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
