"""The proxy study's pieces: recipes/proxy (rules at every study batch), the memory backend, the
MLP, and failed.txt for a diverged run (what the study and `report` read)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, read_csv, tiny_recipe
from resnet_lamb.data.common import MEAN, STD, LoaderSettings
from resnet_lamb.data.folder import validate_root
from resnet_lamb.data.memory import MemoryLoader
from resnet_lamb.recipe import load_recipe, plan_recipe, validate_recipe

PROXY = REPO / "recipes" / "proxy"
BATCHES = (128, 256, 512, 1024, 2048, 4096, 8192, 16384)
RULES = {"lamb": "sqrt", "adam": "sqrt", "adamw": "sqrt", "lars": "linear", "momentum": "linear"}


@pytest.mark.parametrize("name", sorted(RULES))
def test_proxy_recipes_follow_one_rule_at_every_batch(name):
    cfg = load_recipe(PROXY / f"{name}.yaml")
    base = cfg["model"]["optimizer"]["base_lr"]
    for batch in BATCHES:
        cfg["data"]["global_batch"] = cfg["data"]["micro_batch"] = batch
        plan = plan_recipe(validate_recipe(cfg, name))
        k = batch / 128
        assert plan.lr == pytest.approx(base * (math.sqrt(k) if RULES[name] == "sqrt" else k), rel=1e-12)
        assert plan.epochs == 10 and plan.warmup_epochs == pytest.approx(0.02 * k)
        assert plan.total_steps == math.ceil(10 * 60000 / batch)


def _decoded(split, size):
    out = []
    for i in range(len(split)):
        with Image.open(split.path(i)) as img:
            out.append(np.array(img.convert("RGB").resize((size, size), Image.BILINEAR)))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)


def test_memory_loader_two_ranks_cover_every_image_once_per_epoch(digits_root):
    split = validate_root(digits_root).splits["train"]  # 80 images at 16 px
    pixels = _decoded(split, 16)
    mean, std = torch.tensor(MEAN).view(3, 1, 1) * 255, torch.tensor(STD).view(3, 1, 1) * 255
    orders = []
    for epoch in (0, 1):
        seen, padding = [], 0
        for rank in (0, 1):
            settings = LoaderSettings(global_batch=48, micro_batch=12, world_size=2, rank=rank, seed=0, image_size=16,
                                      workers=1, channels_last=False, dtype=torch.float32)
            loader = MemoryLoader(split, settings, train=True, n=len(split), epoch_fn=lambda e=epoch: e)
            batches = list(loader)
            assert len(batches) == len(loader) == math.ceil(80 / 48) * 2
            for x, y in batches:
                assert x.shape == (12, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
                raw = (x * std + mean).round().to(torch.uint8)
                for img, label in zip(raw, y.tolist()):
                    if label == -1:
                        padding += 1
                        continue
                    match = (pixels == img).flatten(1).all(1).nonzero().flatten().tolist()
                    assert match, "a yielded image is not any decoded file"
                    assert split.labels[match[0]] == label
                    seen.append(match[0])
        assert sorted(seen) == list(range(80)) and padding == 2 * 48 - 80
        orders.append(seen)
    assert orders[0] != orders[1]  # a new permutation each epoch


def test_mlp_on_the_memory_backend_learns_and_writes_the_usual_run(fit, digits_root):
    run = fit(tiny_recipe(digits_root, **{"model.arch": "mlp", "model.small_input": False, "data.backend": "memory",
                                          "trainer.max_epochs": 4,
                                          "model.optimizer.base_lr": 0.02}), name="mlp")
    rows = [r for r in read_csv(run) if r.get("val/top1")]
    assert len(rows) == 4 and float(rows[-1]["val/top1"]) > 0.5  # 10 classes: chance is 0.1
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    shapes = [tuple(v.shape) for k, v in ckpt["state_dict"].items() if k.endswith("weight")]
    assert shapes == [(512, 256), (512, 512), (10, 512)]  # 16 x 16 px -> 256 inputs
    assert not (run / "failed.txt").exists()


def test_a_diverged_run_leaves_failed_txt(fit, digits_root):
    run = fit(tiny_recipe(digits_root, **{"model.optimizer.name": "sgd", "model.optimizer.kwargs": {}, "model.optimizer.base_lr": 1e6,
                                          "model.grad_clip_norm": None}), name="diverged", expect=2)
    text = (run / "failed.txt").read_text()
    assert text.startswith("NonFiniteLossError: train/loss is ") and text.count("\n") == 1
    from resnet_lamb.report import grid_table, load_run

    report = load_run(run)
    assert report.status == "failed" and report.reason == text.strip()
    assert grid_table([report])[-1] == "| sgd | failed |"


def test_module_and_datamodule_built_by_hand_share_no_conflicting_hparams(tmp_path):
    """Lightning refuses a fit when the module and the datamodule log the same hparam with other
    values; the MLP's size is ``model.input_size``, not a second ``image_size``."""
    import lightning.pytorch as pl

    from resnet_lamb.data import ImageDataModule
    from resnet_lamb.model import LambModule
    from resnet_lamb.recipe import OptimizerSpec

    dm = ImageDataModule(backend="synthetic", global_batch=8, micro_batch=8, image_size=16, workers=0,
                         train_images=16, val_images=8, num_classes=10)
    for arch, kw in (("resnet18", {}), ("mlp", {"input_size": 16})):
        model = LambModule(arch=arch, num_classes=10, trust_ratio_every=0,
                           optimizer=OptimizerSpec(name="lamb", base_lr=0.01, base_batch=8), **kw)
        trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
        trainer.fit(model, datamodule=dm)
        assert trainer.global_step == 2  # 16 images, batch 8
