"""Lamb against a literal per-tensor transcription of the paper's pseudocode (Algorithm 2, N-/NN-
LAMB in Nadam form, Appendices E-F), for both implementations."""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch

from resnet_lamb.optim import Lamb
from optim_common import IMPLS, SHAPES, assert_matches_reference, run_two_groups

# ------------------------------------------------------------------------------------------
# reference: one tensor at a time, float64, straight from the pseudocode
# ------------------------------------------------------------------------------------------
def _norm(z: torch.Tensor, kind: str) -> float:
    if kind == "l2":
        return float(torch.sqrt((z * z).sum()))
    if kind == "l1":
        return float(z.abs().sum())
    return float(z.abs().max())


def ref_lamb_step(x, g, st, *, lr, betas, eps, weight_decay, bias_correction=True, norm="l2",
                  trust_clip=None, nesterov=None, layer_adaptation=True):
    b1, b2 = betas
    t = st["t"] = st.get("t", 0) + 1
    m = st["m"] = b1 * st.get("m", torch.zeros_like(x)) + (1 - b1) * g
    v = st["v"] = b2 * st.get("v", torch.zeros_like(x)) + (1 - b2) * g * g
    if nesterov:  # Dozat's Nadam, constant beta
        m_hat = b1 * m / (1 - b1 ** (t + 1)) + (1 - b1) * g / (1 - b1 ** t)
    elif bias_correction:
        m_hat = m / (1 - b1 ** t)
    else:
        m_hat = m
    if nesterov == "nn":
        v_hat = b2 * v / (1 - b2 ** (t + 1)) + (1 - b2) * g * g / (1 - b2 ** t)
    elif bias_correction or nesterov:
        v_hat = v / (1 - b2 ** t)
    else:
        v_hat = v
    r = m_hat / (torch.sqrt(v_hat) + eps) + weight_decay * x
    wn, rn = _norm(x, norm), _norm(r, norm)
    phi = wn if trust_clip is None else min(max(wn, trust_clip[0]), trust_clip[1])
    ratio = phi / rn if (layer_adaptation and phi > 0 and rn > 0) else 1.0
    x -= lr * ratio * r
    return ratio


DEFAULTS = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, bias_correction=True,
                norm="l2", trust_clip=None, nesterov=None, layer_adaptation=True)


def make_params(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    ps[3].zero_()  # zero weight norm -> ratio 1
    return ps


def grads_for(step: int, ps):
    gen = torch.Generator().manual_seed(100 + step)
    gs = [torch.randn(p.shape, generator=gen, dtype=torch.float64) * (i + 1)
          for i, p in enumerate(ps)]
    if step == 0:
        gs[3].zero_()  # zero weight and zero update -> ratio 1
    return gs




def run_both(opts: dict, group1: dict, impl: str, steps: int = 4):
    """Two groups: tensors 0,1,4 with ``opts``; tensors 2,3 with ``opts`` overridden by group1."""
    init = make_params()
    return run_two_groups(Lamb, ref_lamb_step, init, lambda s: grads_for(s, init), dict(DEFAULTS, **opts), group1,
                          impl, steps)


CASES = {
    "default": ({}, {"layer_adaptation": False, "weight_decay": 0.0}),
    "no_bias_correction": ({"bias_correction": False}, {"lr": 3e-3}),
    "l1": ({"norm": "l1"}, {"betas": (0.8, 0.99)}),
    "inf": ({"norm": "inf"}, {"layer_adaptation": False}),
    "clip": ({"trust_clip": (0.5, 1.5)}, {"weight_decay": 0.1}),
    "n": ({"nesterov": "n", "betas": (0.975, 0.999), "eps": 1e-8},
          {"layer_adaptation": False}),
    "nn": ({"nesterov": "nn", "betas": (0.975, 0.999), "eps": 1e-8}, {"weight_decay": 0.0}),
    "no_wd": ({"weight_decay": 0.0}, {"eps": 1e-3}),
}
COMPILED_CASES = ["default", "no_bias_correction", "clip", "n", "nn", "l1"]


# Every case on every impl with the CPU fast route; the compiled path on a subset (compile time);
# the generic route for non-adaptive groups on two cases.
REFERENCE_RUNS = [(case, impl, fast_cpu) for case in CASES for impl in IMPLS for fast_cpu in (True, False)
                  if (impl != "compiled" or case in COMPILED_CASES) and (fast_cpu or case in ("default", "n"))]


@pytest.mark.parametrize(("case", "impl", "fast_cpu"), REFERENCE_RUNS)
def test_matches_paper_reference(case, impl, fast_cpu, monkeypatch):
    monkeypatch.setattr(Lamb, "_fast_cpu", fast_cpu)
    opts, group1 = CASES[case]
    assert_matches_reference(*run_both(opts, group1, impl), ratio_abs=1e-6)


def test_zero_norms_give_ratio_one():
    p = torch.nn.Parameter(torch.zeros(5))
    q = torch.nn.Parameter(torch.randn(5))
    opt = Lamb([("zero", p), ("nograd", q)], lr=0.1, weight_decay=0.0, impl="eager")
    p.grad = torch.zeros(5)
    q.grad = torch.zeros(5)  # zero update norm (no decay) -> ratio 1
    opt.step()
    tr = opt.trust_ratios()
    assert float(tr["zero"]) == 1.0 and float(tr["nograd"]) == 1.0


def test_unnamed_params_get_group_index_names():
    ps = [torch.nn.Parameter(torch.randn(3)) for _ in range(3)]
    opt = Lamb([{"params": ps[:2]}, {"params": ps[2:]}], impl="eager")
    for p in ps:
        p.grad = torch.randn(3)
    opt.step()
    assert set(opt.trust_ratios()) == {"g0.p0", "g0.p1", "g1.p0"}


@pytest.mark.parametrize("impl", IMPLS)
def test_lr_tensor_and_changing_lr_each_step(impl):
    """A tensor lr (as LRScheduler may hold) that changes every step gives the steps a float lr gives."""
    torch.manual_seed(0)
    start, grads = torch.randn(4, 3), [torch.randn(4, 3) for _ in range(5)]
    out = []
    for as_tensor in (False, True):
        p = torch.nn.Parameter(start.clone())
        opt = Lamb([p], lr=torch.tensor(1e-2) if as_tensor else 1e-2, impl=impl)
        for s, g in enumerate(grads):  # a schedule changes lr every step: must not recompile/break
            lr = 1e-2 * (s + 1)
            if as_tensor:
                opt.param_groups[0]["lr"].fill_(lr)
            else:
                opt.param_groups[0]["lr"] = lr
            p.grad = g.clone()
            opt.step()
        out.append(p.detach().clone())
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    assert torch.isfinite(out[1]).all() and not torch.equal(out[1], start)
    torch.testing.assert_close(out[1], out[0], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------
# state dicts
# ------------------------------------------------------------------------------------------
def _train(opt, ps, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()


@pytest.mark.parametrize("src,dst", [("eager", IMPLS[-1]), (IMPLS[-1], "eager")])
def test_state_dict_round_trip_across_impls(src, dst):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES[:3]]
    a = Lamb([{"params": ps[:2]}, {"params": ps[2:], "layer_adaptation": False}], lr=1e-2,
             impl=src)
    _train(a, ps, 3, seed=1)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    ps2 = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    b = Lamb([{"params": ps2[:2]}, {"params": ps2[2:], "layer_adaptation": False}], lr=1e-2,
             impl=dst)
    buf.seek(0)
    b.load_state_dict(torch.load(buf))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for k in sa["state"]:
        assert set(sa["state"][k]) == {"step", "exp_avg", "exp_avg_sq"} == set(sb["state"][k])
        for name in sa["state"][k]:
            torch.testing.assert_close(sa["state"][k][name], sb["state"][k][name])
    _train(a, ps, 2, seed=2)
    _train(b, ps2, 2, seed=2)
    for p, q in zip(ps, ps2):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert float(b.state_dict()["state"][0]["step"]) == 5.0


def test_deepcopy_and_step_counts():
    p = torch.nn.Parameter(torch.randn(3))
    opt = Lamb([p], impl="eager")
    p.grad = torch.randn(3)
    opt.step()
    opt2 = copy.deepcopy(opt)
    assert float(opt2.state[opt2.param_groups[0]["params"][0]]["step"]) == 1.0


# ------------------------------------------------------------------------------------------
# convergence
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("nesterov", [None, "nn"])
def test_converges_on_separable_problem(nesterov):
    torch.manual_seed(0)
    x = torch.randn(256, 10)
    w_true = torch.randn(10)
    y = (x @ w_true > 0).long()
    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))
    opt = Lamb(model.named_parameters(), lr=0.02, weight_decay=0.0, nesterov=nesterov,
               impl="eager")
    loss0 = None
    for _ in range(150):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        loss0 = loss0 if loss0 is not None else loss.item()
    assert loss.item() < 0.1 < loss0


# ------------------------------------------------------------------------------------------
# argument checks
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,msg", [
    ({"lr": -1.0}, "lr must be a finite number >= 0; got -1.0"),
    ({"lr": math.nan}, "lr must be a finite number >= 0; got nan"),
    ({"betas": (0.9, 1.0)}, "betas must be two numbers in [0, 1); got (0.9, 1.0)"),
    ({"betas": (-0.1, 0.9)}, "betas must be two numbers in [0, 1)"),
    ({"eps": -1e-8}, "eps must be a finite number > 0 (Algorithm 2)"),
    ({"eps": 0.0}, "eps must be a finite number > 0 (Algorithm 2); got 0.0"),
    ({"norm": "l3"}, "norm must be one of l2, l1, inf; got 'l3'"),
    ({"nesterov": "x"}, "nesterov must be one of None, 'n', 'nn'; got 'x'"),
    ({"trust_clip": (2.0, 1.0)}, "trust_clip must be None or (lower, upper) with 0 <= lower"),
    ({"trust_clip": (-1.0, 1.0)}, "trust_clip must be None or (lower, upper)"),
    ({"impl": "jit"}, "impl must be one of auto, eager, compiled; got 'jit'"),
])
def test_bad_arguments(kwargs, msg):
    with pytest.raises(ValueError) as e:
        Lamb([torch.nn.Parameter(torch.randn(2))], **kwargs)
    assert msg in str(e.value)


def test_bad_group_override():
    p = torch.nn.Parameter(torch.randn(2))
    with pytest.raises(ValueError, match="betas must be two numbers"):
        Lamb([{"params": [p], "betas": (1.5, 0.9)}])


def test_auto_falls_back_to_eager_when_compile_fails(monkeypatch):
    import resnet_lamb.optim.layerwise as layerwise

    def broken(*a, **k):
        raise RuntimeError("no compiler here")

    p = torch.nn.Parameter(torch.randn(8, 8))
    opt = Lamb([p], lr=1e-2)
    if opt.impl != "compiled":
        pytest.skip("no working compiler: auto is eager already")
    monkeypatch.setattr(layerwise, "get_compiled", broken)
    q = torch.nn.Parameter(p.detach().clone())
    ref = Lamb([q], lr=1e-2, impl="eager")
    p.grad = torch.randn(8, 8)
    q.grad = p.grad.clone()
    with pytest.warns(UserWarning, match="falling back to impl='eager'"):
        opt.step()
    ref.step()
    assert opt.impl == "eager"
    torch.testing.assert_close(p, q)


@pytest.mark.skipif("compiled" not in IMPLS, reason="no working compiler")
def test_changing_lr_does_not_recompile():
    from torch._dynamo.utils import counters

    p = torch.nn.Parameter(torch.randn(16, 8))
    opt = Lamb([p], lr=1e-2, impl="compiled")
    p.grad = torch.randn(16, 8)
    opt.step()
    opt.step()
    before = dict(counters["stats"])
    assert before.get("unique_graphs", 0) >= 1  # the compiled kernels did run
    for s in range(5):  # the LR schedule changes lr every step; step (t) changes too
        opt.param_groups[0]["lr"] = 1e-2 / (s + 1)
        p.grad = torch.randn(16, 8)
        opt.step()
    assert dict(counters["stats"]) == before


@pytest.mark.skipif("compiled" not in IMPLS, reason="no working compiler")
def test_channels_last_params_match_eager():
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3).to(memory_format=torch.channels_last)
    out = []
    for impl in ("eager", "compiled"):
        p = torch.nn.Parameter(w.clone(memory_format=torch.channels_last))
        opt = Lamb([p], lr=1e-2, impl=impl)
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            p.grad = torch.randn(w.shape, generator=gen).to(memory_format=torch.channels_last)
            opt.step()
        assert opt.state[p]["exp_avg"].is_contiguous(memory_format=torch.channels_last)
        out.append(p.detach().clone())
    torch.testing.assert_close(out[0], out[1], rtol=1e-5, atol=1e-6)
