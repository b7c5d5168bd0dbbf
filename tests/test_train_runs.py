"""2-epoch `resnet-lamb fit` runs (in-process) through each backend and each optimizer."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import read_csv, tiny_recipe
from resnet_lamb.optim import list_optimizers


def _check_run(run, epochs=2):
    rows = read_csv(run)
    vals = [r for r in rows if r.get("val/top1")]
    assert len(vals) == epochs, "one validation per epoch"
    for r in vals:
        assert 0.0 <= float(r["val/top1"]) <= float(r["val/top5"]) <= 1.0
        assert math.isfinite(float(r["val/loss"]))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert losses and all(math.isfinite(x) for x in losses)
    assert any(r.get("train/img_per_s") for r in rows)
    ck = run / "checkpoints"
    assert (ck / "last.ckpt").is_file()
    assert list(ck.glob("best-*.ckpt")), "best checkpoint by val/top1"
    assert not list(ck.glob(".tmp-*")), "no temp files left behind"
    assert (run / "config.yaml").is_file()
    return rows


@pytest.mark.parametrize("backend", ["dali", "torchvision", "synthetic"])
def test_two_epochs_each_backend(fit, digits_root, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    recipe = tiny_recipe(None if backend == "synthetic" else digits_root)
    recipe["data"]["backend"] = backend
    run = fit(recipe, name=f"backend-{backend}")
    _check_run(run)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 6 and ckpt["epoch"] == 1
    assert "rng_states" in ckpt and ckpt["lr_schedulers"][0]["last_epoch"] == 6


@pytest.mark.parametrize("name", list_optimizers())
def test_two_epochs_each_optimizer(fit, name):
    recipe = tiny_recipe(None, **{
        "model.optimizer.name": name,
        "model.optimizer.base_lr": 0.01 if "lamb" in name or "adam" in name else 0.1,
        "model.optimizer.kwargs": {"impl": "eager"} if ("lamb" in name or "lars" in name) else {},
        "model.arch": "resnet18", "data.image_size": 8,
        "data.global_batch": 16, "data.micro_batch": 8, "data.train_images": 32, "data.val_images": 16,
    })
    run = fit(recipe, name=f"opt-{name}")
    rows = _check_run(run)
    ratios = [k for k in rows[0] if k.startswith("optim/trust_ratio/")]
    if "lamb" in name or "lars" in name:
        assert "optim/trust_ratio/conv1.weight" in ratios
    else:
        assert not ratios, "no trust ratios for optimizers without them"


def test_start_up_reads_the_index_or_lists_the_data_folder_once(fit, digits_root, tmp_path, monkeypatch):
    """fit reads the root's index before anything is built and hands it to the data module; a folder
    without an index is listed once, the listing handed over the same way."""
    import shutil

    import resnet_lamb.data.folder as folder
    import resnet_lamb.data.index as index

    listings, reads = [], []
    real_list, real_read = folder.validate_root, index.read_index
    monkeypatch.setattr(folder, "validate_root", lambda *a: listings.append(a) or real_list(*a))
    monkeypatch.setattr(index, "validate_root", folder.validate_root)
    monkeypatch.setattr(index, "read_index", lambda path: reads.append(path) or real_read(path))
    _check_run(fit(tiny_recipe(digits_root), name="indexed"))
    assert listings == [] and sorted(p.name for p in reads) == ["train.index", "val.index"]
    bare = tmp_path / "bare"
    shutil.copytree(digits_root, bare, ignore=shutil.ignore_patterns("*.index"))
    reads.clear()
    _check_run(fit(tiny_recipe(bare), name="listed-once"))
    assert len(listings) == 1 and reads == []


def test_synthetic_with_a_root_plans_the_images_it_trains_on(fit, digits_root, capsys):
    """backend synthetic ignores data.root: the plan counts ImageNet's 1,281,167 images, as the data module does."""
    recipe = tiny_recipe(digits_root, **{"data.backend": "synthetic", "data.num_classes": 10})
    fit(recipe, "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0", name="synthetic-root")
    assert "1281167 train images" in capsys.readouterr().out
