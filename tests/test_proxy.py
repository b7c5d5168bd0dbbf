"""The proxy study's pieces: recipes/proxy (rules at every study batch), the memory backend, the
MLP and the small ResNet, failed.txt for a diverged run (what the study and `report` read), and the
study's selection of best points, epochs to target and ablation (benchmarks/proxy_large_batch.py)."""
from __future__ import annotations

import importlib.util
import math
import sys

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
RULES = {"lamb": "sqrt", "adam": "sqrt", "adamw": "sqrt", "lars": "linear", "momentum": "linear",
         "nesterov": "linear"}


@pytest.mark.parametrize("name", sorted(RULES))
def test_proxy_recipes_follow_one_rule_at_every_batch(name):
    cfg = load_recipe(PROXY / f"{name}.yaml")
    base = cfg["model"]["optimizer"]["base_lr"]
    for batch in BATCHES:
        cfg["data"]["global_batch"] = cfg["data"]["micro_batch"] = batch
        plan = plan_recipe(validate_recipe(cfg, name))
        k = batch / 128
        assert plan.lr == pytest.approx(base * (math.sqrt(k) if RULES[name] == "sqrt" else k), rel=1e-12)
        assert plan.epochs == 5 and plan.warmup_epochs == pytest.approx(0.02 * k)
        assert plan.total_steps == math.ceil(5 * 30000 / batch)


def test_nesterov_recipe_builds_torch_sgd_with_nesterov_momentum():
    from resnet_lamb.networks import MLP
    from resnet_lamb.optim.registry import build_optimizer

    opts = {}
    for name in ("momentum", "nesterov"):
        o = load_recipe(PROXY / f"{name}.yaml")["model"]["optimizer"]
        opt = build_optimizer(o["name"], MLP(8, (4,), 10), o["base_lr"], o["weight_decay"], **o["kwargs"])
        assert isinstance(opt, torch.optim.SGD)
        opts[name] = opt.defaults
    assert opts["nesterov"]["nesterov"] is True and opts["momentum"]["nesterov"] is False
    assert {k: v for k, v in opts["nesterov"].items() if k != "nesterov"} == \
        {k: v for k, v in opts["momentum"].items() if k != "nesterov"}  # otherwise the same recipe


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


def test_small_resnet_is_torchvision_basic_blocks_with_batchnorm_and_trains(fit, digits_root):
    from torchvision.models.resnet import BasicBlock

    from resnet_lamb.ghost_batchnorm import GhostBatchNorm2d
    from resnet_lamb.networks import build_resnet
    from resnet_lamb.optim.param_groups import param_groups

    net = build_resnet("small_resnet", num_classes=10)
    blocks = [m for m in net.modules() if isinstance(m, BasicBlock)]
    assert [b.conv2.out_channels for b in blocks] == [16, 32, 64]
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) == 1 + 2 * 3 + 2  # stem, blocks, 2 shortcuts
    assert net(torch.randn(2, 3, 28, 28)).shape == (2, 10)
    decayed, plain = param_groups(net, 1e-4, "author")  # the author's rule finds the BatchNorm by type
    assert len(plain["params"]) == 2 * 9 and decayed["weight_decay"] == 1e-4  # every BatchNorm gamma and beta
    ghost = build_resnet("small_resnet", num_classes=10, bn_batch=4, zero_init_residual=True)
    assert all(isinstance(m, GhostBatchNorm2d) for m in ghost.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert all(float(b.bn2.weight.detach().abs().sum()) == 0 for b in ghost.modules() if isinstance(b, BasicBlock))

    run = fit(tiny_recipe(digits_root, **{"model.arch": "small_resnet", "model.small_input": False,
                                          "data.backend": "memory", "trainer.max_epochs": 3}), name="small_resnet")
    rows = [r for r in read_csv(run) if r.get("val/top1")]
    assert len(rows) == 3 and not (run / "failed.txt").exists()
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert "model.blocks.2.bn2.running_var" in ckpt["state_dict"]


def _study():
    spec = importlib.util.spec_from_file_location("proxy_study", REPO / "benchmarks" / "proxy_large_batch.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["proxy_study"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_study_picks_best_points_epochs_to_target_and_ablation_from_its_runs():
    s = _study()
    proxy = s.Proxy("data/x", (), (512, 4096, 16384), 3, 0.01, 0.8)
    lo, mid, hi = s.GRID[0], s.GRID[3], s.GRID[-1]  # 1/64, 1 (the rule), 4
    runs = {}

    def put(opt, batch, factor, seed, top, curve=None, variant=""):
        runs[s.run_name("p", opt, batch, factor, seed, variant)] = {
            "top1": top, "lr": 0.01 * factor * batch, "curve": curve or [0.5, 0.6, top or 0.1]}

    for b in (512, 4096, 16384):
        for f in s.GRID:
            put("lamb", b, f, 0, 0.70 if f != mid else 0.85, [0.5, 0.79, 0.70])
            put("lars", b, f, 0, None if b == 16384 else 0.60 if f != lo else 0.75)
        put("lamb", b, mid, 0, 0.85, [0.6, 0.81, 0.85])  # reaches 0.8 in epoch 2, ...
        put("lamb", b, hi, 0, 0.85, [0.8, 0.81, 0.85])  # ... this as well, in epoch 1; same top-1: the smaller LR wins
    for b, tops in ((4096, (0.83, 0.81)), (16384, (0.80, 0.84))):
        for seed, top in zip(s.EXTRA_SEEDS, tops):
            put("lamb", b, mid, seed, top)
        put("lars", b, lo, 1, 0.7)  # only at 4096 is it lars's best point
    for v in s.ABLATION:
        put("lamb", 16384, mid, 0, 0.5, variant=v)
    put("lamb", 16384, lo, 0, 0.9, variant="weight decay 1.5")  # not the best LR: not the ablation's
    put("lars", 4096, lo / 4, 0, 0.74)  # tried beyond the edge: in the grid, not the best

    got = s.analyse(runs, {"p": proxy}, ["lamb", "lars", "adam"], {"p": proxy.batches})["p"]
    assert set(got["grid"]) == {"lamb", "lars"}  # adam has no runs: left out, not invented
    lamb, lars = got["best"]["lamb"], got["best"]["lars"]
    assert lamb["512"] == {"factor": mid, "lr": 0.01 * 512, "mean": 0.85, "half_range": 0.0, "n": 1,
                           "diverged": 0, "edge": False}
    assert lamb["4096"]["n"] == 3 and lamb["4096"]["mean"] == pytest.approx((0.85 + 0.83 + 0.81) / 3)
    assert lamb["16384"]["half_range"] == pytest.approx((0.85 - 0.80) / 2)
    assert lars["512"]["factor"] == lo and lars["512"]["edge"] and lars["512"]["n"] == 1
    assert lars["4096"]["n"] == 2 and lars["4096"]["mean"] == pytest.approx(0.725)  # seed 2 missing: not counted
    assert not lars["4096"]["edge"] and got["grid"]["lars"]["4096"][f"{lo / 4:g}"]["top1"] == 0.74
    assert lars["16384"] is None  # diverged at every LR
    assert got["grid"]["lars"]["16384"][f"{lo:g}"]["top1"] is None
    assert got["epochs_to_target"]["lamb"]["512"] == {"epochs": 1, "lr": 0.01 * hi * 512}
    assert got["epochs_to_target"]["lars"]["4096"] is None
    assert got["ablation"] == {"paper text (lamb.yaml)": 0.85, **{v: 0.5 for v in s.ABLATION}}

    summary = {"command": "python x.py", "date": "d", "machine": "m", "wall_s": 60, "runs_trained": len(runs),
               "jobs": 2, "threads_per_run": 1, "proxies": {"p": {**got, "about": "a proxy"}}}
    text = s.study_readme(summary)
    assert "| lamb | 0.8500 @ 5.12 | 0.8300 ±0.0200 (n=3) @ 41 |" in text
    assert "diverged at every LR" in text and "(grid edge)" in text and "| all four (author) | 0.5000 |" in text


def test_study_run_names_are_distinct_and_ordered_by_the_grid():
    s = _study()
    names = {s.run_name("mlp", "lamb", 512, f, seed, v) for f in s.GRID for seed in (0, 1) for v in ["", *s.ABLATION]}
    assert len(names) == len(s.GRID) * 2 * (1 + len(s.ABLATION))
    assert s.run_name("mlp", "lamb", 512, 1 / 64, 0) == "mlp-lamb-bs512-lr4x-3-seed0"
    assert s.run_name("mlp", "lamb", 512, 4.0, 1, "weight decay 1.5") == "mlp-lamb-bs512-lr4x+1-weight-decay-1.5-seed1"
    assert s.best_factor({1.0: None, 4.0: None}) is None and s.epochs_to([0.1, 0.2], 0.5) is None


def test_study_tries_beyond_the_grid_edge_its_best_point_sits_on():
    s = _study()
    grid = dict.fromkeys(s.GRID, 0.5)
    assert s.next_factor({**grid, 1.0: 0.8}) is None  # inside: done
    assert s.next_factor({**grid, s.GRID[0]: 0.8}) == s.GRID[0] / 4
    assert s.next_factor({**grid, s.GRID[-1]: 0.8}) == s.GRID[-1] * 4
    assert s.next_factor(dict.fromkeys(s.GRID)) == s.GRID[0] / 4  # diverged everywhere: lower
    lowest = {f: 0.5 for f in s.FACTORS}
    assert s.next_factor({**lowest, s.FACTORS[0]: 0.8}) is None  # no further than EDGE_ROUNDS points
    assert len(s.FACTORS) == len(s.GRID) + 2 * s.EDGE_ROUNDS and set(s.GRID) < set(s.FACTORS)
