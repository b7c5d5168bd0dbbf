"""Lars (paper Algorithm 1 and the classic You et al. 2017 / MLPerf form) against literal
per-tensor references, both implementations."""
from __future__ import annotations

import io

import pytest
import torch

from resnet_lamb.optim import Lars
from optim_common import IMPLS, SHAPES, assert_matches_reference, run_two_groups



def _phi(z, clip):
    return z if clip is None else min(max(z, clip[0]), clip[1])


def ref_lars_step(x, g, st, *, lr, momentum=0.9, weight_decay=0.0, eps=1e-9,
                  trust_coefficient=1e-3, mode="paper", nesterov=False, trust_clip=None,
                  layer_adaptation=True):
    m = st.get("m", torch.zeros_like(x))
    wn = float(x.norm())
    if mode == "paper":  # Algorithm 1
        m = momentum * m + (1 - momentum) * (g + weight_decay * x)
        mn = float(m.norm())
        phi = _phi(wn, trust_clip)
        ratio = phi / mn if (layer_adaptation and phi > 0 and mn > 0) else 1.0
        x -= lr * ratio * m
    else:  # You et al. 2017 / MLPerf
        gn = float(g.norm())
        phi = _phi(wn, trust_clip)
        ratio = (trust_coefficient * phi / (gn + weight_decay * wn + eps)
                 if (layer_adaptation and phi > 0 and gn > 0) else 1.0)
        d = (g + weight_decay * x) * ratio
        m = momentum * m + d
        x -= lr * (d + momentum * m if nesterov else m)
    st["m"] = m
    return ratio


def run_both(opts, group1, impl, steps=4):
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    init[3].zero_()

    def grads_for(s):
        g2 = torch.Generator().manual_seed(100 + s)
        gs = [torch.randn(p.shape, generator=g2, dtype=torch.float64) * (i + 1) for i, p in enumerate(init)]
        if s == 0:
            gs[3].zero_()
        return gs

    return run_two_groups(Lars, ref_lars_step, init, grads_for, dict(dict(lr=0.1), **opts), group1, impl, steps)


CASES = {
    "paper": ({"weight_decay": 1e-2}, {"layer_adaptation": False, "weight_decay": 0.0}),
    "paper_clip": ({"trust_clip": (0.5, 2.0), "weight_decay": 1e-3}, {"momentum": 0.5}),
    "classic": ({"mode": "classic", "weight_decay": 1e-2},
                {"layer_adaptation": False, "weight_decay": 0.0}),
    "classic_nesterov": ({"mode": "classic", "nesterov": True, "weight_decay": 5e-3,
                          "trust_coefficient": 0.02}, {"lr": 0.03}),
    "classic_clip": ({"mode": "classic", "trust_clip": (0.0, 1.0)},
                     {"layer_adaptation": False, "nesterov": True}),
}


@pytest.mark.parametrize("fast_cpu", [True, False])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, impl, fast_cpu, monkeypatch):
    monkeypatch.setattr(Lars, "_fast_cpu", fast_cpu)
    opts, group1 = CASES[case]
    assert_matches_reference(*run_both(opts, group1, impl), ratio_abs=1e-7)


@pytest.mark.parametrize("src,dst", [("eager", IMPLS[-1]), (IMPLS[-1], "eager")])
def test_state_dict_round_trip(src, dst):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES[:3]]
    mk = lambda params, impl: Lars(params, lr=0.1, weight_decay=1e-3, mode="classic",  # noqa: E731
                                   nesterov=True, impl=impl)
    a = mk(ps, src)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen)
        a.step()
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    ps2 = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    b = mk(ps2, dst)
    b.load_state_dict(torch.load(buf))
    assert set(b.state_dict()["state"][0]) == {"step", "momentum_buffer"}
    for _ in range(2):
        for p, q in zip(ps, ps2):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        a.step()
        b.step()
    for p, q in zip(ps, ps2):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["paper", "classic"])
def test_converges(mode):
    torch.manual_seed(0)
    x = torch.randn(256, 10)
    y = (x @ torch.randn(10) > 0).long()
    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))
    lr = 0.05 if mode == "paper" else 20.0
    opt = Lars(model.named_parameters(), lr=lr, mode=mode, impl="eager")
    for _ in range(150):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    assert loss.item() < 0.15


@pytest.mark.parametrize("kwargs,msg", [
    ({"lr": -0.1}, "lr must be a finite number >= 0; got -0.1"),
    ({"lr": float("nan")}, "lr must be a finite number >= 0; got nan"),
    ({"momentum": 1.0}, "momentum must be a number in [0, 1); got 1.0"),
    ({"mode": "tf"}, "mode must be one of paper, classic; got 'tf'"),
    ({"nesterov": True}, "nesterov=True needs mode='classic'"),
    ({"trust_coefficient": 0.0}, "trust_coefficient must be a finite number > 0"),
    ({"weight_decay": -1.0}, "weight_decay must be a finite number >= 0"),
])
def test_bad_arguments(kwargs, msg):
    kwargs = dict({"lr": 0.1}, **kwargs)
    with pytest.raises(ValueError) as e:
        Lars([torch.nn.Parameter(torch.randn(2))], **kwargs)
    assert msg in str(e.value)
