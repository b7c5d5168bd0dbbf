"""Non-finite values (issue 7, item 2), injected in-process into tiny CPU runs (6 optimizer steps,
3 per epoch, accumulation 2):

- a NaN gradient (loss finite) stops the run with one line naming the optimizer step and the
  parameter where it appeared; the last good checkpoint (end of epoch 0) is intact and finite;
- ``model.nonfinite: skip``: an Inf loss and a NaN gradient are each skipped with one warning line,
  counted in ``train/skipped_steps`` and the checkpoint; the optimizer does not step (its own
  step counts show 4 of 6) while the schedule moves on (the run ends at step 6);
- a bad ``model.nonfinite`` value is one line naming the key.
(A NaN loss stopping the run: tests/test_train_errors.py.)
"""
from __future__ import annotations

import torch

import resnet_lamb.model as model_mod
from conftest import read_csv, tiny_recipe


def _inject_grad(monkeypatch, at_step: int, param: str, value: float):
    """After the last backward of optimizer step ``at_step + 1``, one gradient tensor := value."""

    def on_after_backward(self):
        if self.global_step == at_step:  # each micro-batch: NaN + x stays NaN
            dict(self.named_parameters())[param].grad.fill_(value)

    monkeypatch.setattr(model_mod.LambModule, "on_after_backward", on_after_backward, raising=False)


def _errors(capsys, prefix: str) -> list[str]:
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith(prefix)]


def test_nan_gradient_stops_naming_step_and_parameter(fit, monkeypatch, capsys):
    """NaN enters the gradient at the 2nd hidden layer's output: backward carries it to that layer's
    and the 1st layer's parameters (4 of 6 tensors), and the message names the one backward
    reached first, model.3.bias (for a ResNet: names like model.layer1.0.conv1.weight)."""
    real = model_mod.LambModule.training_step

    def nan_from_layer_3(self, batch, batch_idx):
        if self.global_step != 4:
            return real(self, batch, batch_idx)
        hook = self.model[3].register_forward_hook(
            lambda mod, inp, out: out.register_hook(lambda g: g * float("nan")) and None)
        try:
            return real(self, batch, batch_idx)
        finally:
            hook.remove()

    monkeypatch.setattr(model_mod.LambModule, "training_step", nan_from_layer_3)
    run = fit(tiny_recipe(None, **{"model.arch": "mlp", "model.mlp_hidden": [32, 32]}), name="nangrad", expect=2)
    err = _errors(capsys, "resnet-lamb: error:")
    last = run / "checkpoints" / "last.ckpt"
    assert err == [
        "resnet-lamb: error: non-finite gradient at optimizer step 5 of 6 (epoch 1): nan first in "
        "model.3.bias (4 of 6 gradient tensors non-finite); run stopped before the step, "
        f"last good checkpoint: {last}; lower model.optimizer.base_lr or set model.grad_clip_norm "
        "(model.nonfinite: skip skips such steps)"], err
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 3 and ckpt["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_skip_mode_skips_counts_and_logs(fit, monkeypatch, capsys):
    real = model_mod.LambModule._loss_sum

    def inf_loss_at_step_2(self, logits, labels):
        loss = real(self, logits, labels)
        return loss * float("inf") if self.training and self.global_step == 1 else loss

    monkeypatch.setattr(model_mod.LambModule, "_loss_sum", inf_loss_at_step_2)
    _inject_grad(monkeypatch, at_step=3, param="model.3.bias", value=float("nan"))
    recipe = tiny_recipe(None, **{"model.arch": "mlp", "model.mlp_hidden": [32], "model.nonfinite": "skip"})
    run = fit(recipe, name="skip")
    warn = _errors(capsys, "resnet-lamb: warning:")
    assert warn == [
        "resnet-lamb: warning: train/loss is inf at optimizer step 2 of 6 (epoch 0); step skipped "
        "(model.nonfinite: skip), 1 skipped so far",
        "resnet-lamb: warning: non-finite gradient at optimizer step 4 of 6 (epoch 1): nan first in model.3.bias "
        "(1 of 4 gradient tensors non-finite); step skipped (model.nonfinite: skip), 2 skipped so far"], warn
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 6 and ckpt["lr_schedulers"][0]["last_epoch"] == 6  # the schedule moved on
    assert ckpt["resnet_lamb"]["skipped_steps"] == 2
    steps = {float(s["step"]) for s in ckpt["optimizer_states"][0]["state"].values()}
    assert steps == {4.0}, f"the optimizer stepped {steps} times, not 6 - 2 skipped"
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    logged = {int(r["step"]): float(r["train/skipped_steps"]) for r in read_csv(run) if r.get("train/skipped_steps")}
    assert sorted(logged) == list(range(6)), logged
    assert [logged[s] for s in range(6)] == [0, 1, 1, 2, 2, 2], logged


def test_bad_nonfinite_value_is_one_line(fit, capsys):
    fit(tiny_recipe(None, **{"model.nonfinite": "halt"}), name="bad", expect=2)
    err = _errors(capsys, "resnet-lamb: error:")
    assert err == ["resnet-lamb: error: model.nonfinite: expected one of stop, skip, got 'halt'; stop (default) "
                   "ends the run at a NaN/Inf loss or gradient, skip skips such steps"], err
