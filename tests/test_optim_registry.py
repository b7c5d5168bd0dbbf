"""Registry (every name builds and steps) and the param-group rule on a real resnet18."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from resnet_lamb.optim import Lamb, Lars, build_optimizer, list_optimizers
from resnet_lamb.optim.param_groups import param_groups
from resnet_lamb.optim.registry import AdamWL2, optimizer_options

NAMES = ["lamb", "nlamb", "nnlamb", "lars", "lars_classic", "adam", "adamw", "adagrad", "sgd",
         "nadam"]


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def test_list_optimizers():
    assert list_optimizers() == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_build_and_step_every_name(name):
    model = small_model()
    kw = {"impl": "eager"} if name in ("lamb", "nlamb", "nnlamb", "lars", "lars_classic") else {}
    opt = build_optimizer(name, model, lr=0.01, weight_decay=1e-4, **kw)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert len(opt.param_groups) == 2
    assert opt.param_groups[0]["weight_decay"] == 1e-4 and opt.param_groups[1]["weight_decay"] == 0


def test_names_reach_trust_ratios():
    model = small_model()
    opt = build_optimizer("lamb", model, lr=0.01, weight_decay=0.01, impl="eager")
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    assert set(opt.trust_ratios()) == {n for n, _ in model.named_parameters()}


def test_defaults_per_name():
    model = small_model()
    n = build_optimizer("nlamb", model, lr=0.01, weight_decay=0.0)
    assert isinstance(n, Lamb) and n.defaults["nesterov"] == "n"
    assert n.defaults["betas"] == (0.975, 0.999) and n.defaults["eps"] == 1e-8
    assert build_optimizer("nnlamb", model, 0.01, 0.0).defaults["nesterov"] == "nn"
    lamb = build_optimizer("lamb", model, 0.01, 0.0)
    assert lamb.defaults["betas"] == (0.9, 0.999) and lamb.defaults["eps"] == 1e-6
    assert build_optimizer("lars_classic", model, 0.1, 0.0).defaults["mode"] == "classic"
    assert isinstance(build_optimizer("lars", model, 0.1, 0.0), Lars)
    sgd = build_optimizer("sgd", model, 0.1, 0.0, nesterov=True)
    assert sgd.defaults["momentum"] == 0.9 and sgd.defaults["nesterov"] is True
    assert build_optimizer("adamw", model, 0.1, 0.0).defaults.get("fused") is True


def test_adamw_l2_is_coupled_l2():
    """AdamW(l2=c, weight_decay=0) == Adam(weight_decay=c) (torch's Adam decay is coupled L2)."""
    m1, m2 = small_model(), small_model()
    a = build_optimizer("adamw", m1, lr=0.01, weight_decay=0.0, param_rule="none", l2=0.1)
    b = torch.optim.Adam(m2.parameters(), lr=0.01, weight_decay=0.1)
    assert isinstance(a, AdamWL2)
    for _ in range(3):
        x = torch.randn(2, 3, 8, 8)
        for m, o in ((m1, a), (m2, b)):
            o.zero_grad()
            m(x).sum().backward()
            o.step()
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q)


def test_adamw_l2_follows_rule():
    opt = build_optimizer("adamw", small_model(), 0.01, 0.01, l2=1e-3)
    assert [g["l2"] for g in opt.param_groups] == [1e-3, 0.0]


def test_unknown_optimizer_message():
    with pytest.raises(ValueError) as e:
        build_optimizer("lion", small_model(), 0.1, 0.0)
    assert str(e.value) == ("unknown optimizer 'lion'; choose one of lamb, nlamb, nnlamb, lars, "
                            "lars_classic, adam, adamw, adagrad, sgd, nadam or an optimizer class by import path "
                            "(package.module.Class)")


def test_unknown_kwarg_message():
    with pytest.raises(ValueError) as e:
        build_optimizer("lamb", small_model(), 0.1, 0.0, momentum=0.9)
    msg = str(e.value)
    assert msg.startswith("unknown option 'momentum' for optimizer 'lamb'; accepted: ")
    assert "betas" in msg and "trust_clip" in msg
    assert "l2" in optimizer_options("adamw")


@pytest.mark.parametrize("lr,msg", [(-1.0, "lr must be a finite number >= 0; got -1.0"),
                                    (float("nan"), "lr must be a finite number >= 0; got nan")])
def test_bad_lr_through_registry(lr, msg):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(")):
        build_optimizer("lamb", small_model(), lr, 0.0)


def test_bad_betas_through_registry():
    with pytest.raises(ValueError, match=r"betas must be two numbers in \[0, 1\)"):
        build_optimizer("nlamb", small_model(), 0.01, 0.0, betas=(0.9, 1.2))


# ------------------------------------------------------------------------------------------
# param-group rules on torchvision resnet18
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def resnet18():
    torchvision = pytest.importorskip("torchvision")
    return torchvision.models.resnet18()


def _names(group):
    return {n for n, _ in group["params"]}


def test_author_rule(resnet18):
    groups = param_groups(resnet18, 0.01, "author")
    decay, plain = groups
    bn = {f"{m}.{k}" for m, mod in resnet18.named_modules() if isinstance(mod, nn.BatchNorm2d)
          for k in ("weight", "bias")}
    assert _names(plain) == bn
    assert "fc.bias" in _names(decay) and "fc.weight" in _names(decay)
    assert all(p.ndim == 4 for n, p in decay["params"] if n.startswith(("conv", "layer")))
    assert decay["weight_decay"] == 0.01 and decay["layer_adaptation"] is True
    assert plain["weight_decay"] == 0.0 and plain["layer_adaptation"] is False
    assert len(_names(decay)) + len(bn) == len(list(resnet18.parameters()))


def test_timm_rule(resnet18):
    decay, plain = param_groups(resnet18, 0.01, "timm")
    assert "fc.bias" in _names(plain) and "fc.weight" in _names(decay)
    assert all(p.ndim <= 1 for _, p in plain["params"])
    assert all(p.ndim > 1 for _, p in decay["params"])


def test_none_rule(resnet18):
    groups = param_groups(resnet18, 0.01, "none")
    assert len(groups) == 1 and groups[0]["layer_adaptation"] is True
    assert len(groups[0]["params"]) == len(list(resnet18.parameters()))


def test_bn_found_by_type_not_name():
    model = nn.Sequential()
    model.add_module("weird", nn.Linear(3, 3))
    model.add_module("bnlike_name", nn.Linear(3, 3))
    model.add_module("x", nn.BatchNorm1d(3))
    decay, plain = param_groups(model, 0.1, "author")
    assert _names(plain) == {"x.weight", "x.bias"}
    assert {"bnlike_name.weight", "bnlike_name.bias", "weird.bias"} <= _names(decay)


def test_bad_rule():
    with pytest.raises(ValueError, match="param_rule must be one of author, timm, none; got 'x'"):
        param_groups(small_model(), 0.1, "x")


def test_frozen_params_left_out():
    model = small_model()
    model[0].weight.requires_grad_(False)
    names = {n for g in param_groups(model, 0.1, "author") for n, _ in g["params"]}
    assert "0.weight" not in names
