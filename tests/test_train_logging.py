"""What `fit` logs: train/lr follows the schedule's formula step by step, the logged trust ratios
are the ones LAMB used (recomputed here from its state), W&B offline files, CSV, config."""
from __future__ import annotations

import math

import pytest
import torch

import resnet_lamb.telemetry as telemetry
from conftest import read_csv, tiny_recipe


def _poly_lr(step, *, lr, warm, total, steps_per_epoch, n, batch):
    """The paper's schedule written out: epoch e, batch i -> paper step t = floor(e*N/B) + i;
    t/W during warmup, else 1 - t/T (BERT's warmup overriding a linear decay)."""
    e, i = divmod(step, steps_per_epoch)
    t = e * n // batch + i
    return lr * (t / warm if t < warm else 1.0 - t / total)


def test_logged_lr_equals_the_formula(fit):
    # 80 images, batch 32: 3 steps/epoch (last one padded), T = ceil(3 epochs * 80/32) = 8,
    # warmup 0.75 epochs at base batch 16 -> 1.5 epochs at 32 -> W = round(1.5*80/32) = 4
    recipe = tiny_recipe(None, **{"trainer.max_epochs": 3, "model.optimizer.base_lr": 0.02,
                                  "model.optimizer.base_batch": 16, "model.optimizer.scaling": "linear",
                                  "model.schedule.warmup_epochs": 0.75, "model.trust_ratio_every": 0})
    run = fit(recipe, name="lr")
    logged = {int(r["step"]): float(r["train/lr"]) for r in read_csv(run) if r.get("train/lr")}
    assert sorted(logged) == list(range(9)), "one LR per optimizer step (3 epochs x 3 steps)"
    for step, lr in logged.items():
        want = _poly_lr(step, lr=0.04, warm=4, total=8, steps_per_epoch=3, n=80, batch=32)
        assert lr == pytest.approx(want, rel=1e-6, abs=1e-9), f"step {step}"
    assert logged[0] == 0.0 and logged[4] == pytest.approx(0.03, rel=1e-6) and logged[6] == pytest.approx(0.015, rel=1e-6)


class _CheckedTrustRatios(telemetry.TrustRatios):
    """Also recomputes each ratio from the parameter before the step and LAMB's moments after it."""

    recomputed: dict = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._before = {n: p.detach().clone() for n, p in pl_module.model.named_parameters()}
        self._lrs = [g["lr"] for g in optimizer.param_groups]  # the scheduler moves it after the step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        opt = trainer.optimizers[0]
        if trainer.global_step != self._last_step and trainer.global_step > 0:
            names = dict(pl_module.model.named_parameters())
            out = {}
            for group, lr in zip(opt.param_groups, self._lrs):
                if not group.get("layer_adaptation", True):
                    continue
                b1, b2 = group["betas"]
                for name in group["param_names"]:
                    p, st, x = names[name], opt.state[names[name]], self._before[name]
                    t = float(st["step"])
                    r = (st["exp_avg"] / (1 - b1 ** t)) / ((st["exp_avg_sq"] / (1 - b2 ** t)).sqrt() + group["eps"])
                    r = r + group["weight_decay"] * x
                    ratio = (x.norm() / r.norm()).item()
                    torch.testing.assert_close(p.detach(), x - lr * ratio * r, rtol=1e-4, atol=1e-6)
                    out[name] = ratio
            type(self).recomputed[trainer.global_step - 1] = out
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def test_logged_trust_ratios_are_the_optimizers(fit, monkeypatch):
    monkeypatch.setattr(telemetry, "TrustRatios", _CheckedTrustRatios)
    _CheckedTrustRatios.recomputed = {}
    recipe = tiny_recipe(None, **{"model.trust_ratio_every": 2})
    run = fit(recipe, name="ratios")
    rows = [r for r in read_csv(run) if r.get("optim/trust_ratio/conv1.weight")]
    assert [int(r["step"]) for r in rows] == [1, 3, 5], "every 2 optimizer steps"
    checked = 0
    for r in rows:
        want = _CheckedTrustRatios.recomputed[int(r["step"])]
        for name, ratio in want.items():
            assert float(r[f"optim/trust_ratio/{name}"]) == pytest.approx(ratio, rel=1e-4), name
            checked += 1
    assert checked > 20
    # excluded tensors (BatchNorm, author's rule) log 1
    assert float(rows[0]["optim/trust_ratio/bn1.weight"]) == 1.0


def test_wandb_offline_csv_and_config_layout(fit, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = fit(tiny_recipe(None, **{"trainer.max_epochs": 1}), name="layout", wandb=True)
    assert list((run / "wandb").glob("offline-run-*/run-*.wandb")), "W&B offline run files"
    assert (run / "wandb" / "run_id").is_file()
    keys = set(read_csv(run)[0])
    for key in ("train/loss", "train/lr", "train/img_per_s", "val/top1", "val/top5", "val/loss"):
        assert key in keys
    assert "optimizer" in (run / "config.yaml").read_text()
    assert math.isfinite(float([r for r in read_csv(run) if r.get("val/top1")][-1]["val/top1"]))


def test_progress_within_one_long_accumulated_step(fit, capsys):
    """Accumulation 16 (global batch 32, micro batch 2) with a progress line due at every micro-batch
    (--run.progress_seconds 0): the micro-batches of the first step show before the step ends, with
    img/s and ETA; the step's line names the step and LR as the CSV's row does (index 0, its LR)."""
    recipe = tiny_recipe(None, **{"trainer.max_epochs": 1, "trainer.log_every_n_steps": 50,
                                  "data.micro_batch": 2, "model.trust_ratio_every": 0})
    run = fit(recipe, "--run.progress_seconds", "0", name="progress")
    out = capsys.readouterr().out.splitlines()
    first_step = next(i for i, ln in enumerate(out) if "step 0 [1/3]" in ln)
    within = [ln for ln in out[:first_step] if "micro-batch" in ln]
    assert [ln.split("micro-batch ")[1].split()[0] for ln in within] == [f"{a}/16" for a in range(1, 16)], within
    assert all("step 0 [0/3]" in ln and " img/s" in ln and " eta " in ln for ln in within), within
    rows = read_csv(run)
    train = {int(r["step"]): r for r in rows if r.get("train/loss")}
    assert 0 in train, "a train row from the first optimizer step on (log_every_n_steps 50)"
    console_lr = float(out[first_step].split(" lr ")[1].split()[0])
    assert console_lr == pytest.approx(float(train[0]["train/lr"]), rel=1e-4, abs=1e-12)
    assert any(r.get("val/top1") for r in rows)


def test_short_run_leaves_a_csv_row(fit):
    """3 optimizer steps of a 5-step epoch, log_every_n_steps 50: the CSV exists and holds the first
    step's row (and the validation that a stop at max_steps runs, as at an epoch's end)."""
    recipe = tiny_recipe(None, **{"trainer.max_epochs": 1, "trainer.log_every_n_steps": 50,
                                  "data.train_images": 160, "model.trust_ratio_every": 0})
    run = fit(recipe, "--trainer.max_steps", "3", name="short")
    rows = read_csv(run)
    assert [int(r["step"]) for r in rows if r.get("train/loss")][:1] == [0]
    assert any(r.get("val/top1") for r in rows), "a stop at max_steps validates"
    assert float([r for r in rows if r.get("train/lr")][0]["train/lr"]) == 0.0  # warmup starts at 0


def test_progress_lines_are_time_based(monkeypatch, capsys):
    """LineProgress alone with a fake clock: one micro-batch per second, every_s 30, 128 micro-batches
    per step: a line at micro-batches 30, 60, 90 and 120, none in between, no step line before the
    step ends."""
    from types import SimpleNamespace

    clock = [0.0]
    monkeypatch.setattr(telemetry.time, "perf_counter", lambda: clock[0])
    trainer = SimpleNamespace(is_global_zero=True, accumulate_grad_batches=128, global_step=0, max_steps=10,
                              current_epoch=0, world_size=2, callback_metrics={})
    bar = telemetry.LineProgress(every=50, every_s=30)
    bar._trainer = trainer
    bar.on_train_start(trainer, None)
    batch = (torch.zeros(8, 3, 4, 4), torch.zeros(8))
    for i in range(127):
        clock[0] += 1.0
        bar.on_train_batch_end(trainer, None, None, batch, i)
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split("micro-batch ")[1].split()[0] for ln in lines] == ["30/128", "60/128", "90/128", "120/128"]
    assert "16.0 img/s" in lines[0]  # 8 images x 2 ranks per second
    assert "eta 20:50" in lines[0]  # 10 steps x 128 - 30 micro-batches left at 1 s each
