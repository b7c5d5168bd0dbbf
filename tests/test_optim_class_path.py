"""Issue 17 item 3: a recipe names any torch.optim.Optimizer subclass by import path (here
pytorch-optimizer's ScalableShampoo, a third-party package). It is built from the same param
groups, gets the recipe's schedule, runs without trust-ratio telemetry, checkpoints and resumes
exactly; a path that does not import or is not an optimizer is one line before any model is built."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from resnet_lamb.errors import RecipeError
from resnet_lamb.optim.registry import REQUIRED, build_optimizer, optimizer_options

from conftest import read_csv, run_cli, tiny_recipe, write_recipe

pytest.importorskip("pytorch_optimizer")

SHAMPOO = "pytorch_optimizer.ScalableShampoo"
# preconditioner roots from step 2, every 2 steps: the 6-step run computes and checkpoints them
SHAMPOO_KWARGS = {"betas": [0.96, 0.75], "start_preconditioning_step": 2, "preconditioning_compute_steps": 2,
                  "block_size": 128, "nesterov": False}


def small_model():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def test_class_path_gets_the_param_rules_groups_lr_and_checked_kwargs():
    """The same groups as the registry's names (names, weight decay 0 on BatchNorm), lr, and
    options checked against the constructor, each refusal one line naming what is accepted."""
    model = small_model()
    mine = build_optimizer("torch.optim.SGD", model, lr=0.3, weight_decay=1e-4, momentum=0.8)
    ref = build_optimizer("sgd", model, lr=0.3, weight_decay=1e-4, momentum=0.8)
    assert type(mine) is torch.optim.SGD
    strip = [{k: v for k, v in g.items() if k not in ("params", "fused", "foreach")} for g in mine.param_groups]
    want = [{k: v for k, v in g.items() if k not in ("params", "fused", "foreach")} for g in ref.param_groups]
    assert strip == want and [g["weight_decay"] for g in strip] == [1e-4, 0.0] and strip[0]["lr"] == 0.3
    assert strip[1]["param_names"] == ["1.weight", "1.bias"]

    opt = build_optimizer(SHAMPOO, model, lr=0.5, weight_decay=1e-3, param_rule="author", block_size=64)
    assert type(opt).__name__ == "ScalableShampoo" and not hasattr(opt, "trust_ratios")
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-3, 0.0]
    assert opt.block_size == 64 and opt.param_groups[0]["lr"] == 0.5

    accepted = optimizer_options(SHAMPOO)
    assert accepted["block_size"] == 512 and "lr" not in accepted and "weight_decay" not in accepted
    with pytest.raises(ValueError) as e:
        build_optimizer(SHAMPOO, model, 0.1, 0.0, block_sise=64)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"unknown option 'block_sise' for optimizer '{SHAMPOO}'; accepted: ")
    assert "block_size" in msg and "graft_type" in msg


class NeedsRho(torch.optim.SGD):
    """An optimizer with a required option and no weight decay."""

    def __init__(self, params, lr, rho, momentum=0.0):
        super().__init__(params, lr=lr, momentum=momentum)
        self.rho = rho


def test_required_options_and_weight_decay_the_class_does_not_take(monkeypatch):
    import sys
    import types

    module = types.ModuleType("fake_optim_pkg")
    module.NeedsRho = NeedsRho
    monkeypatch.setitem(sys.modules, "fake_optim_pkg", module)
    assert optimizer_options("fake_optim_pkg.NeedsRho") == {"rho": REQUIRED, "momentum": 0.0}
    with pytest.raises(ValueError, match=r"^optimizer 'fake_optim_pkg.NeedsRho' needs option 'rho'"):
        build_optimizer("fake_optim_pkg.NeedsRho", small_model(), 0.1, 0.0)
    with pytest.raises(ValueError, match=r"^fake_optim_pkg.NeedsRho takes no weight_decay; set weight_decay 0$"):
        build_optimizer("fake_optim_pkg.NeedsRho", small_model(), 0.1, 1e-4, rho=2)
    opt = build_optimizer("fake_optim_pkg.NeedsRho", small_model(), 0.1, 0.0, rho=2)
    assert opt.rho == 2 and [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.0]  # SGD's own default


@pytest.mark.parametrize(("name", "message"), [
    ("nopkg_xyz.optim.Fast", "model.optimizer.name: cannot import 'nopkg_xyz.optim.Fast' (ModuleNotFoundError: "
                             "No module named 'nopkg_xyz'); install its package or fix the path"),
    ("pytorch_optimizer.Shampo", "model.optimizer.name: cannot import 'pytorch_optimizer.Shampo' (AttributeError: "
                                 "module 'pytorch_optimizer' has no attribute 'Shampo'); install its package or fix "
                                 "the path"),
    ("collections.OrderedDict", "model.optimizer.name: 'collections.OrderedDict' is not a torch.optim.Optimizer "
                                "subclass; name one by its import path or choose one of lamb, "),
])
def test_bad_class_path_is_one_line_before_any_model_is_built(tmp_path, capsys, monkeypatch, name, message):
    """`resnet-lamb fit` exits 2 with one line; the LightningModule is never constructed and no run
    folder is made. The recipe's own check says the same."""
    import resnet_lamb.model as model_mod
    from resnet_lamb.recipe import OptimizerSpec

    def no_model(*a, **k):
        raise AssertionError("a model was built")

    monkeypatch.setattr(model_mod.LambModule, "__init__", no_model)
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(None, **{"model.optimizer.name": name,
                                                                   "model.optimizer.kwargs": {}}))
    capsys.readouterr()
    rc = run_cli("fit", "--config", str(path), "--run.root", str(tmp_path / "runs"), "--run.name", "x",
                 "--run.wandb", "false")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("resnet-lamb: error: ") and message in err[0]
    assert not (tmp_path / "runs" / "x").exists()
    with pytest.raises(RecipeError) as e:
        OptimizerSpec(name=name)
    assert str(e.value).startswith(message)


def _ckpt(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def _same_tensors(a, b, where):
    if torch.is_tensor(a):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_third_party_class_path_fits_two_epochs_and_resumes_exactly(tmp_path, capsys, monkeypatch, one_thread):
    """ScalableShampoo by class path with the recipe's schedule: 2 epochs straight, and the same run
    crashed in epoch 2 then resumed from its epoch-1 checkpoint: weights, optimizer state (momentum,
    preconditioner statistics and roots, graft state) and schedule are bit-identical. No trust-ratio
    telemetry (the optimizer has none) and nothing fails for its lack."""
    import resnet_lamb.model as model_mod

    recipe = tiny_recipe(None, **{"model.optimizer.name": SHAMPOO, "model.optimizer.kwargs": SHAMPOO_KWARGS,
                                  "model.optimizer.weight_decay": 1e-4})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    runs = tmp_path / "runs"
    common = ["fit", "--config", str(path), "--run.root", str(runs), "--run.wandb", "false"]
    assert run_cli(*common, "--run.name", "straight") == 0
    straight = _ckpt(runs / "straight")
    assert straight["epoch"] == 1 and straight["global_step"] == 6

    real = model_mod.LambModule.training_step

    def crash_in_epoch_2(self, batch, batch_idx):
        if self.current_epoch == 1 and batch_idx == 1:
            raise RuntimeError("simulated crash")
        return real(self, batch, batch_idx)

    monkeypatch.setattr(model_mod.LambModule, "training_step", crash_in_epoch_2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_cli(*common, "--run.name", "resumed")
    monkeypatch.setattr(model_mod.LambModule, "training_step", real)
    assert _ckpt(runs / "resumed")["global_step"] == 3
    assert run_cli(*common, "--run.name", "resumed", "--ckpt_path", "last") == 0
    resumed = _ckpt(runs / "resumed")

    assert resumed["global_step"] == 6 and resumed["epoch"] == 1
    _same_tensors(resumed["state_dict"], straight["state_dict"], "state_dict")
    opt_r, opt_s = resumed["optimizer_states"][0], straight["optimizer_states"][0]
    # the preconditioners are in the checkpoint, as plain tagged dicts (it loads with weights_only=True)
    kinds = {v.get("__resnet_lamb_object__", "") for st in opt_s["state"].values() for v in st.values()
             if isinstance(v, dict)}
    assert "pytorch_optimizer.optimizer.utils.preconditioner:PreConditioner" in kinds
    _same_tensors(opt_r, opt_s, "optimizer")
    assert resumed["lr_schedulers"] == straight["lr_schedulers"]
    rows = read_csv(runs / "straight")
    lrs = [float(r["train/lr"]) for r in rows if r.get("train/lr")]
    assert len(lrs) == 6 and max(lrs) > lrs[-1]  # the recipe's warmup + poly schedule drives it
    assert not any(k.startswith("optim/trust_ratio/") for r in rows for k in r)
    assert straight["resnet_lamb"]["recipe"]["model.optimizer.name"] == SHAMPOO


def test_portable_state_round_trip_steps_identically_and_imports_only_the_optimizers_package(tmp_path):
    """to_plain -> torch.save -> torch.load(weights_only=True) -> from_plain gives a state that,
    loaded into a fresh ScalableShampoo, takes the same next step; a tag naming a class outside the
    optimizer's package is refused (the checkpoint cannot make it import another module)."""
    import pytorch_optimizer

    from resnet_lamb.optim.portable_state import from_plain, to_plain

    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    model = small_model()
    kw = dict(start_preconditioning_step=1, preconditioning_compute_steps=1, block_size=8)
    opt = pytorch_optimizer.ScalableShampoo(model.parameters(), lr=0.1, **kw)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    torch.save(to_plain(opt.state_dict()), tmp_path / "s.pt")
    twin = small_model()
    twin.load_state_dict(model.state_dict())
    twin_opt = pytorch_optimizer.ScalableShampoo(twin.parameters(), lr=0.1, **kw)
    twin_opt.load_state_dict(from_plain(torch.load(tmp_path / "s.pt", weights_only=True), "pytorch_optimizer"))
    for m, o in ((model, opt), (twin, twin_opt)):
        o.zero_grad()
        m(x).square().mean().backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters(), strict=True))
    with pytest.raises(ValueError, match=r"names 'os:system', outside the optimizer's package 'pytorch_optimizer'"):
        from_plain({"__resnet_lamb_object__": "os:system", "attrs": {}}, "pytorch_optimizer")


def test_shampoo_challenger_recipe_plans_its_numbers_and_builds():
    """recipes/imagenet/challengers/shampoo-bs32k.yaml: `resnet-lamb plan` prints the MLPerf v1.0
    Shampoo entry's numbers with their sources; its kwargs build a ScalableShampoo that steps."""
    import subprocess
    import sys

    from conftest import REPO
    from resnet_lamb.recipe import load_recipe, validate_recipe

    path = REPO / "recipes" / "imagenet" / "challengers" / "shampoo-bs32k.yaml"
    out = subprocess.run([sys.executable, "-m", "resnet_lamb", "plan", "--config", str(path)], capture_output=True,
                         text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = {line.split()[0]: line for line in out.stdout.splitlines()[1:] if line.startswith("  ")}
    rows = {key: line.split()[1] for key, line in lines.items()}
    assert rows["optimizer"] == SHAMPOO and rows["lr"] == "16.22" and rows["epochs"] == "44"
    assert rows["total_steps"] == "1721" and rows["warmup_steps"] == "195" and rows["decay"] == "195..1721"
    assert rows["schedule"] == "poly_after_warmup" and rows["end_lr"] == "0" and rows["label_smoothing"] == "0.2"
    assert rows["betas"] == "0.96,0.75" and rows["block_size"] == "128" and rows["graft_type"] == "1"
    assert rows["start_preconditioning_step"] == "6" and rows["matrix_eps"] == "1e-08" and rows["bn_batch"] == "256"
    assert rows["param_rule"] == "timm" and rows["grad_clip_norm"] == "none" and rows["zero_init_residual"] == "true"
    assert "result_0.txt shampoo_opt_base_learning_rate 16.22" in lines["lr"]
    assert "UNCHECKED" in lines["label_smoothing"]
    assert "0.7590" in lines["expected"]

    recipe = validate_recipe(load_recipe(path), path)
    spec = recipe.optimizer
    model = small_model()
    opt = build_optimizer(spec.name, model, lr=16.22, weight_decay=spec.weight_decay, param_rule=spec.param_rule,
                          **spec.kwargs)
    assert type(opt).__name__ == "ScalableShampoo" and opt.block_size == 128
    assert [g["weight_decay"] for g in opt.param_groups] == [spec.weight_decay, 0.0]
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    assert all(torch.isfinite(p).all() and not torch.equal(p, b) for p, b in zip(model.parameters(), before,
                                                                                   strict=True))
