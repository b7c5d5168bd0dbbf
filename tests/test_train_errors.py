"""A NaN loss stops the run naming the step and leaves the last good checkpoint. (Bad recipes and
bad data folders: the matrices in tests/reliability/test_recipes.py and test_data.py.)"""
from __future__ import annotations

import torch

import resnet_lamb.model as model_mod
from conftest import tiny_recipe


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(fit, monkeypatch, capsys):
    real = model_mod.LambModule._loss_sum

    def poisoned(self, logits, labels):
        loss = real(self, logits, labels)
        return loss * float("nan") if self.training and self.global_step >= 3 else loss

    monkeypatch.setattr(model_mod.LambModule, "_loss_sum", poisoned)
    run = fit(tiny_recipe(None), name="nan", expect=2)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("resnet-lamb: error:")]
    assert len(err) == 1 and "nan" in err[0] and "optimizer step 4 of" in err[0] and "last.ckpt" in err[0]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 3 and ckpt["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
