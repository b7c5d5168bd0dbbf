"""Bad input: one line `resnet-lamb: error: <key>: ...`, exit 2, before the model or data are
touched; a NaN loss stops the run naming the step and leaves the last good checkpoint."""
from __future__ import annotations

import pytest
import torch

import resnet_lamb.model as model_mod
from conftest import run_cli, tiny_recipe, write_recipe


@pytest.fixture
def untouched(monkeypatch):
    """Fails the test if a network is built or a data loader made."""
    touched = []
    monkeypatch.setattr(model_mod, "build_resnet", lambda *a, **k: touched.append("model") or 1 / 0)
    from resnet_lamb.data.datamodule import ImageDataModule

    monkeypatch.setattr(ImageDataModule, "_loader", lambda *a, **k: touched.append("data") or 1 / 0)
    return touched


CASES = [
    ([], ["--model.foo", "1"], "model.foo"),
    ([], ["--trainer.max_epochs", "abc"], "trainer.max_epochs"),
    ([], ["--model.optimizer.name", "lamm"], "model.optimizer.name"),
    ([], ["--model.optimizer.base_lr", "-1"], "model.optimizer.base_lr"),
    ([], ["--model.schedule.name", "pol"], "model.schedule.name"),
    ([], ["--data.micro_batch", "12"], "data.micro_batch"),
    ([], ["--model.arch", "resnet7"], "model.arch"),
    ([], ["--model.optimizer.kwargs", '{"momentum": 0.9}'], "model.optimizer.kwargs.momentum"),
    ([("model", "optimizer", "nme"), "lamb"], [], "model.optimizer.nme"),
    ([("data", "bogus"), 1], [], "data.bogus"),
    ([("trainer", "max_epochs"), "two"], [], "trainer.max_epochs"),
    ([("bogus",), 1], [], "bogus"),
]


@pytest.mark.parametrize("edit,flags,key", CASES, ids=[c[2] + ("" if c[1] else "(file)") for c in CASES])
def test_bad_input_is_one_line_naming_the_key(tmp_path, capsys, untouched, edit, flags, key):
    recipe = tiny_recipe(None)
    if edit:
        path, value = edit
        node = recipe
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = value
    cfg = write_recipe(tmp_path / "r.yaml", recipe)
    rc = run_cli("fit", "--config", str(cfg), "--run.root", str(tmp_path / "runs"), "--run.wandb", "false", *flags)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2
    assert len(err) == 1, err
    assert err[0].startswith("resnet-lamb: error: ") and key in err[0], err[0]
    assert not untouched
    assert not (tmp_path / "runs").exists()


def test_missing_recipe_and_missing_data(tmp_path, capsys, untouched):
    assert run_cli("fit", "--config", str(tmp_path / "nope.yaml")) == 2
    assert "nope.yaml" in capsys.readouterr().err
    cfg = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path / "no-data"))
    assert run_cli("fit", "--config", str(cfg), "--run.root", str(tmp_path / "runs")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no-data: data root not found" in err[0] and "resnet-lamb prepare" in err[0]
    (tmp_path / "no-data").mkdir()
    assert run_cli("fit", "--config", str(cfg), "--run.root", str(tmp_path / "runs")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no-data/train: missing" in err[0]
    assert not untouched


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
