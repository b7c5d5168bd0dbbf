"""Shared fixtures: a tiny prepared data folder (made once per session with `resnet-lamb prepare
digits`), a recipe writer and an in-process `resnet-lamb fit` runner.

Everything runs on the CPU with W&B offline; runs land under pytest's tmp folders.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

REPO = Path(__file__).resolve().parents[1]


def _prepare_digits(tmp_path_factory, name: str, per_class_train: int, *extra: str) -> Path:
    out = tmp_path_factory.mktemp("data") / name
    subprocess.run([sys.executable, "-m", "resnet_lamb", "prepare", "digits", "--out", str(out), "--size", "16",
                    "--per-class-train", str(per_class_train), "--per-class-val", "4", *extra], check=True, cwd=REPO,
                   stdout=subprocess.DEVNULL)
    return out


def jpeg_tree(root: Path, seed: int = 0, per: tuple = (4, 2), classes: tuple = ("c0", "c1")) -> Path:
    """A small ImageNet-layout folder of 16-px random JPEGs: ``per`` = images per class in train, val."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "val"), per):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = (rng.random((16, 16, 3)) * 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.JPEG", quality=92)
    return root


@pytest.fixture
def one_thread():
    """One intra-op thread for bitwise comparisons across processes (oneDNN's multi-threaded
    reductions can differ in the last bits between processes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    """80 train / 40 val 16-px JPEGs in 10 classes, the ImageNet folder layout."""
    return _prepare_digits(tmp_path_factory, "digits", 8)


@pytest.fixture(scope="session")
def digits_root_large(tmp_path_factory) -> Path:
    """240 train / 40 val 16-px JPEGs: epochs long enough to kill a run inside one."""
    return _prepare_digits(tmp_path_factory, "digits_large", 24)


@pytest.fixture(scope="session")
def digits_shards_large(tmp_path_factory) -> Path:
    """digits_root_large's images packed in tar shards of at most 16 KiB (about 20 images each)."""
    return _prepare_digits(tmp_path_factory, "digits_shards_large", 24, "--shards", "--shard-size", "16K")


def tiny_recipe(root: Path | None, **over) -> dict:
    """A recipe for a few-second 2-epoch run: resnet18 small_input at 16 px, LAMB, 3 steps/epoch."""
    recipe = {
        "seed_everything": 0,
        "trainer": {"max_epochs": 2, "log_every_n_steps": 1, "enable_model_summary": False,
                    "deterministic": True},
        "model": {"arch": "resnet18", "num_classes": 10, "small_input": True, "trust_ratio_every": 1,
                  "grad_clip_norm": 1.0,
                  "optimizer": {"name": "lamb", "base_lr": 0.01, "base_batch": 32, "kwargs": {"impl": "eager"}},
                  "schedule": {"name": "poly", "warmup_epochs": 0.5}},
        "data": {"backend": "torchvision" if root is not None else "synthetic",
                 "root": None if root is None else str(root),
                 "global_batch": 32, "micro_batch": 16, "image_size": 16, "workers": 0},
    }
    if root is None:
        recipe["data"].update(train_images=80, val_images=40, num_classes=10)
    for key, value in over.items():  # "model.optimizer.name": "sgd"
        node = recipe
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return recipe


def write_recipe(path: Path, recipe: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run_cli(*args: str) -> int:
    """`resnet-lamb ARGS` in this process; returns the exit status (SystemExit included)."""
    from resnet_lamb.cli import main

    try:
        return main(list(args))
    except SystemExit as exc:
        return int(exc.code or 0)


@pytest.fixture
def fit(tmp_path):
    """fit(recipe_dict, *extra_args, name="run") -> run folder; in-process, W&B off unless asked."""

    def _fit(recipe: dict, *extra: str, name: str = "run", wandb: bool = False, expect: int = 0) -> Path:
        path = write_recipe(tmp_path / f"{name}.yaml", recipe)
        args = ["fit", "--config", str(path), "--run.root", str(tmp_path / "runs"), "--run.name", name,
                "--run.wandb", str(wandb).lower(), *extra]
        rc = run_cli(*args)
        assert rc == expect, f"resnet-lamb {' '.join(args)} exited {rc}"
        return tmp_path / "runs" / name

    return _fit


def read_csv(run_dir: Path) -> list[dict]:
    import csv

    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))
