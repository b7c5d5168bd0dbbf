"""The flat-buffer step shared by Lamb and Lars (resnet_lamb.optim.layerwise, .flat, .kernels): kernels per step,
parameters/gradients/state as views, the fallbacks when they are not, tensors without a gradient,
the trust-clip rule against its literal formula, determinism."""
from __future__ import annotations

import collections
import copy
import math

import pytest
import torch

import resnet_lamb.optim.kernels as optim_kernels
import resnet_lamb.optim.layerwise as layerwise
from optim_common import IMPLS
from resnet_lamb.optim import Lamb, Lars
from test_optim_lamb import ref_lamb_step
from test_optim_lars import ref_lars_step

needs_compiler = pytest.mark.skipif("compiled" not in IMPLS, reason="no working compiler")
SHAPES = [(37, 50), (7,), (3, 2, 2, 2), (1200,), (40, 60)]  # 1, 1, 1, 2 and 3 blocks

OPTIMIZERS = {
    "lamb": lambda ps, **kw: Lamb(ps, lr=1e-2, weight_decay=0.01, **kw),
    "lars": lambda ps, **kw: Lars(ps, lr=0.1, weight_decay=1e-3, **kw),
    "lars_classic": lambda ps, **kw: Lars(ps, lr=0.1, weight_decay=1e-3, mode="classic", **kw),
}


def _params(shapes=SHAPES, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def _grads(ps, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen) for p in ps]


def _bucket(opt, group=0):
    return opt._flat[group][1][0]


# ------------------------------------------------------------------------------------------
# kernels per step
# ------------------------------------------------------------------------------------------
@needs_compiler
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_kernels_per_step_do_not_grow_with_tensors(name, monkeypatch):
    """One step of 4 tensors and one of 40 run the same compiled kernels and the same ops: a
    fixed number per param group (for the adapted group one graph in classic LARS, two in LAMB
    and paper LARS; one for the unadapted group)."""
    import torch._inductor.config as inductor_config
    from torch.profiler import profile

    monkeypatch.setattr(optim_kernels, "_COMPILED", {})  # fresh compiles, with kernel records

    def events(n):
        ps = _params([(20, 30 + i % 7) for i in range(n)])
        opt = OPTIMIZERS[name]([{"params": ps[: n // 2]},
                                {"params": ps[n // 2:], "layer_adaptation": False}], impl="compiled")
        opt._fast_cpu = False  # the unadapted group through the compiled kernels too
        for s in range(2):
            for p, g in zip(ps, _grads(ps, s)):
                p.grad = g
            opt.step()
        with profile() as prof:
            opt.step()
        return collections.Counter(e.name for e in prof.events())

    with inductor_config.patch({"cpp.enable_kernel_profile": True}):
        few, many = events(4), events(40)
    kernels = sum(v for k, v in few.items() if "cpp_fused" in k)
    assert 2 <= kernels <= 5
    assert few == many


# ------------------------------------------------------------------------------------------
# views
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
def test_params_grads_and_state_are_views_of_flat_buffers(impl):
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    twin = copy.deepcopy(model)
    opt = Lamb(model.named_parameters(), lr=1e-2, impl=impl)
    ref = Lamb(twin.named_parameters(), lr=1e-2, impl="eager")
    x = torch.randn(5, 8)
    for step in range(3):
        opt.zero_grad()  # keeps the gradient views: backward accumulates into the buffer
        model(x * (step + 1)).square().sum().backward()
        if step > 0:
            assert all(p.grad.untyped_storage().data_ptr() == _bucket(opt).g.untyped_storage().data_ptr()
                       for p in model.parameters())
        opt.step()
        ref.zero_grad(set_to_none=True)  # fresh gradients every step: copied in
        twin(x * (step + 1)).square().sum().backward()
        ref.step()
    b = _bucket(opt)
    for p in model.parameters():
        assert p.untyped_storage().data_ptr() == b.p.untyped_storage().data_ptr()
        assert p.grad.untyped_storage().data_ptr() == b.g.untyped_storage().data_ptr()
        for k in ("exp_avg", "exp_avg_sq"):
            assert opt.state[p][k].untyped_storage().data_ptr() == b.bufs[k].untyped_storage().data_ptr()
        assert opt.state[p]["step"].dim() == 0 and float(opt.state[p]["step"]) == 3.0
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_zero_grad_modes():
    ps = _params()
    opt = Lars(ps, lr=0.1)
    for p, g in zip(ps, _grads(ps, 0)):
        p.grad = g
    opt.step()
    views = [p.grad for p in ps]
    opt.zero_grad()  # default: the buffer zeroed in one op, the views kept
    assert all(p.grad is v for p, v in zip(ps, views))
    assert float(_bucket(opt).g.abs().sum()) == 0.0
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in ps)
    loose = torch.nn.Parameter(torch.randn(3))
    opt.add_param_group({"params": [loose]})
    loose.grad = torch.ones(3)
    opt.zero_grad(set_to_none=False)
    assert torch.equal(loose.grad, torch.zeros(3))


def test_lamb_leaves_the_update_in_grad_and_lars_leaves_grad_alone():
    ps = _params([(6, 5)])
    x0 = ps[0].detach().double().clone()
    g0 = _grads(ps, 1)[0]
    opt = Lamb(ps, lr=1e-2, weight_decay=0.1, impl="eager")
    ps[0].grad = g0.clone()
    opt.step()
    st: dict = {}
    ref_lamb_step(x0.clone(), g0.double(), st, lr=1e-2, betas=(0.9, 0.999), eps=1e-6,
                  weight_decay=0.1)
    r = st["m"] / (1 - 0.9) / (torch.sqrt(st["v"] / (1 - 0.999)) + 1e-6) + 0.1 * x0
    torch.testing.assert_close(ps[0].grad.double(), r, rtol=1e-5, atol=1e-6)
    qs = _params([(6, 5)])
    lars = Lars(qs, lr=0.1)
    qs[0].grad = g0.clone()
    lars.step()
    assert torch.equal(qs[0].grad, g0)


# ------------------------------------------------------------------------------------------
# fallbacks: parameters or gradients that are not (or no longer) the buffers' views
# ------------------------------------------------------------------------------------------
def _lamb_reference(shapes, grads_per_step, init, skip=()):
    """Per-tensor float64 references; ``skip`` = {(step, tensor)} without a gradient."""
    ref = [x.double().clone() for x in init]
    st = [dict() for _ in ref]
    for s, gs in enumerate(grads_per_step):
        for i, g in enumerate(gs):
            if (s, i) not in skip:
                ref_lamb_step(ref[i], g.double(), st[i], lr=1e-2, betas=(0.9, 0.999), eps=1e-6,
                              weight_decay=0.01)
    return ref


@pytest.mark.parametrize("impl", IMPLS)
def test_replaced_param_data_is_copied_in_and_adopted_again(impl):
    ps = _params()
    init = [p.detach().clone() for p in ps]
    opt = Lamb(ps, lr=1e-2, impl=impl)
    grads = [_grads(ps, s) for s in range(4)]
    for s, gs in enumerate(grads):
        if s == 2:  # what module.to() or a checkpoint loader that assigns .data does
            ps[1].data = ps[1].data.clone()
            ps[4].data = ps[4].data.clone()
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        opt.step()
    for p, r in zip(ps, _lamb_reference(SHAPES, grads, init)):
        torch.testing.assert_close(p.detach().double(), r, rtol=2e-5, atol=2e-6)
        assert p.untyped_storage().data_ptr() == _bucket(opt).p.untyped_storage().data_ptr()


@pytest.mark.parametrize("impl", IMPLS)
def test_param_viewing_a_foreign_buffer_is_updated_in_place_not_repointed(impl):
    """A parameter that is a view of someone else's buffer (FSDP's flat parameter, tied storage)
    keeps its storage: the step copies it in and the result back out."""
    big = torch.zeros(3000)
    ps = _params()
    init = [p.detach().clone() for p in ps]
    big[100:100 + ps[3].numel()].copy_(ps[3].detach().view(-1))
    ps[3] = torch.nn.Parameter(big[100:100 + ps[3].numel()].view(ps[3].shape))
    opt = Lamb(ps, lr=1e-2, impl=impl)
    grads = [_grads(ps, s) for s in range(3)]
    for gs in grads:
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        opt.step()
    ref = _lamb_reference(SHAPES, grads, init)
    assert ps[3].untyped_storage().data_ptr() == big.untyped_storage().data_ptr()
    torch.testing.assert_close(big[100:100 + ps[3].numel()].double(), ref[3].view(-1),
                               rtol=2e-5, atol=2e-6)
    for p, r in zip(ps, ref):
        torch.testing.assert_close(p.detach().double(), r, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_grads_viewing_a_foreign_bucket_are_copied_not_repointed(impl):
    """DDP's gradient_as_bucket_view: the gradients are views of DDP's bucket; the step copies
    them in (one op) and leaves them where they are."""
    ps = _params()
    init = [p.detach().clone() for p in ps]
    bucket = torch.zeros(sum(p.numel() for p in ps))
    views, off = [], 0
    for p in ps:
        views.append(bucket[off:off + p.numel()].view(p.shape))
        off += p.numel()
    opt = Lars(ps, lr=0.1, weight_decay=1e-3, impl=impl)
    grads = [_grads(ps, s) for s in range(3)]
    ref = [x.double().clone() for x in init]
    st = [dict() for _ in ps]
    for gs in grads:
        for p, v, g in zip(ps, views, gs):
            v.copy_(g)
            p.grad = v
        opt.step()
        for i, g in enumerate(gs):
            ref_lars_step(ref[i], g.double(), st[i], lr=0.1, weight_decay=1e-3)
    for p, v, r in zip(ps, views, ref):
        assert p.grad is v
        torch.testing.assert_close(p.detach().double(), r, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_tensors_without_a_gradient_are_left_alone(impl):
    """A tensor whose grad is None is skipped (weights, state and step count unchanged); the
    buffers then hold tensors at different step counts, each bias-corrected by its own."""
    ps = _params()
    init = [p.detach().clone() for p in ps]
    opt = Lamb(ps, lr=1e-2, impl=impl)
    grads = [_grads(ps, s) for s in range(4)]
    skip = {(1, 0), (1, 3), (2, 3)}
    for s, gs in enumerate(grads):
        for i, (p, g) in enumerate(zip(ps, gs)):
            p.grad = None if (s, i) in skip else g.clone()
        before = ps[3].detach().clone()
        opt.step()
        if (s, 3) in skip:
            assert torch.equal(ps[3].detach(), before)
            assert "g0.p3" not in opt.trust_ratios()
    assert [float(opt.state[p]["step"]) for p in ps] == [3.0, 4.0, 4.0, 2.0, 4.0]
    for p, r in zip(ps, _lamb_reference(SHAPES, grads, init, skip)):
        torch.testing.assert_close(p.detach().double(), r, rtol=2e-5, atol=2e-6)


def test_dtype_change_rebuilds_the_buffers():
    ps = _params()
    opt = Lamb(ps, lr=1e-2, impl="eager")
    for s in range(2):
        for p, g in zip(ps, _grads(ps, s)):
            p.grad = g
        opt.step()
    before = [p.detach().double().clone() for p in ps]
    for p in ps:  # what module.double() does
        p.data = p.data.double()
        p.grad = None
    for p, g in zip(ps, _grads(ps, 2)):
        p.grad = g.double()
    opt.step()
    assert all(p.dtype == torch.float64 and opt.state[p]["exp_avg"].dtype == torch.float64 for p in ps)
    assert all(not torch.equal(p.detach(), b) and torch.isfinite(p).all() for p, b in zip(ps, before))
    assert _bucket(opt).dtype == torch.float64


# ------------------------------------------------------------------------------------------
# the trust-clip rule (paper Section 3: phi(z) = min(max(z, lower), upper))
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("clip", [(0.5, 2.0), (0.0, 2.0)])
def test_trust_clip_rule_matches_the_literal_formula(name, clip, impl):
    """ratio = phi(||x||)/||u||, 1 only where phi(||x||) = 0 or ||u|| = 0: with lower > 0 an
    all-zero tensor (a zero-initialised BN gamma) gets lower/||u||; an unadapted group (torch's
    fused kernel) reports 1."""
    shapes = [(6, 5), (40, 30), (7,), (4,), (3, 3)]
    gen = torch.Generator().manual_seed(3)
    x = [torch.randn(s, generator=gen) for s in shapes]
    x[0] *= 1e-3  # ||x|| below lower
    x[1] *= 10.0  # above upper
    x[2].zero_()  # all-zero weights
    x[3].zero_()  # all-zero weights and a zero gradient: ||u|| = 0 for Lamb/Lars paper
    g = [torch.randn(s, generator=gen) for s in shapes]
    g[3].zero_()
    ps = [torch.nn.Parameter(t.clone()) for t in x]
    kw = dict(trust_clip=clip, impl=impl)
    wd = 0.0  # with wd 0, the zero tensor with a zero gradient has a zero update
    opt = {"lamb": Lamb, "lars": Lars}[name.split("_")[0]](
        [{"params": [(f"t{i}", p) for i, p in enumerate(ps[:4])]},
         {"params": [("frozen", ps[4])], "layer_adaptation": False}],
        lr=1e-2 if name == "lamb" else 0.1, weight_decay=wd,
        **(dict(mode="classic") if name == "lars_classic" else {}), **kw)
    for p, gr in zip(ps, g):
        p.grad = gr.clone()
    opt.step()
    got = opt.trust_ratios()
    for i in range(4):
        xn = float(x[i].double().norm())
        phi = min(max(xn, clip[0]), clip[1])
        if name == "lamb":  # step 1, bias correction on: u = g/(|g| + eps) elementwise
            un = float((g[i].double() / (g[i].double().abs() + 1e-6)).norm())
            want = phi / un if phi > 0 and un > 0 else 1.0
        elif name == "lars":  # m = (1-momentum) g
            un = float((0.1 * g[i].double()).norm())
            want = phi / un if phi > 0 and un > 0 else 1.0
        else:
            gn = float(g[i].double().norm())
            want = 1e-3 * phi / (gn + 1e-9) if phi > 0 and gn > 0 else 1.0
        assert float(got[f"t{i}"]) == pytest.approx(want, rel=1e-5), (i, xn, phi)
    if clip[0] > 0:
        assert float(got["t2"]) != 1.0  # the all-zero tensor is adapted
    assert float(got["t3"]) == 1.0 and float(got["frozen"]) == 1.0


# ------------------------------------------------------------------------------------------
# determinism, eager chunks, compile keys
# ------------------------------------------------------------------------------------------
def _three_steps(opt, ps):
    """The parameters after three steps on the seeded gradients of :func:`_grads`."""
    for s in range(3):
        for p, g in zip(ps, _grads(ps, s)):
            p.grad = g
        opt.step()
    return [p.detach().clone() for p in ps]


@pytest.mark.parametrize("impl", IMPLS)
def test_two_runs_are_bit_identical(impl):
    out = []
    for _ in range(2):
        ps = _params([(300, 400), (1000,), (50, 50)])
        opt = Lamb(ps, lr=1e-2, impl=impl)
        out.append(_three_steps(opt, ps))
    assert all(torch.equal(a, b) for a, b in zip(*out))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_eager_chunks_do_not_change_results(name, monkeypatch):
    """The eager path cuts the buffers into chunks of blocks; one block per chunk gives the same
    bits as one chunk for everything."""
    out = []
    for chunk in (1, 1024):
        monkeypatch.setattr(layerwise, "EAGER_CHUNK_BLOCKS", chunk)
        ps = _params()
        opt = OPTIMIZERS[name](ps, impl="eager")
        out.append(_three_steps(opt, ps))
    assert all(torch.equal(a, b) for a, b in zip(*out))


def test_compiled_functions_are_keyed_by_thread_count():
    """Inductor bakes the OpenMP thread count into CPU kernels: another count, another compile."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = optim_kernels.get_compiled(optim_kernels.apply_update, {})
        torch.set_num_threads(2)
        two = optim_kernels.get_compiled(optim_kernels.apply_update, {})
        assert one is not two and optim_kernels.get_compiled(optim_kernels.apply_update, {}) is two
    finally:
        torch.set_num_threads(threads)


@needs_compiler
@pytest.mark.parametrize("name", ["lars", "lars_classic"])
def test_lars_changing_lr_does_not_recompile(name):
    from torch._dynamo.utils import counters

    ps = _params()
    opt = OPTIMIZERS[name](ps, impl="compiled")
    for s in range(2):
        for p, g in zip(ps, _grads(ps, s)):
            p.grad = g
        opt.step()
    before = dict(counters["stats"])
    for s in range(4):
        opt.param_groups[0]["lr"] = 0.1 / (s + 2)
        for p, g in zip(ps, _grads(ps, s)):
            p.grad = g
        opt.step()
    assert dict(counters["stats"]) == before
    assert all(math.isfinite(float(p.detach().sum())) for p in ps)


@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16_params_follow_float32(impl):
    """bf16 parameters get bf16 buffers and state; the norms are taken in float32."""
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        ps = [torch.nn.Parameter(p.detach().to(dtype)) for p in _params()]
        opt = Lamb(ps, lr=1e-2, impl=impl)
        for s in range(2):
            for p, g in zip(ps, _grads(ps, s)):
                p.grad = g.to(dtype)
            opt.step()
        assert opt.state[ps[0]]["exp_avg"].dtype == dtype
        out.append(([p.detach().float() for p in ps], {k: float(v) for k, v in opt.trust_ratios().items()}))
    (a, ra), (b, rb) = out
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=2e-2, atol=2e-2)
    assert ra.keys() == rb.keys() and all(rb[k] == pytest.approx(ra[k], rel=2e-2) for k in ra)


# ------------------------------------------------------------------------------------------
# one route for every device; the compiler probed per device type
# ------------------------------------------------------------------------------------------
@needs_compiler
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_cuda_tensors_take_the_same_compiled_functions_as_cpu(name, monkeypatch):
    """CUDA tensors take the very same compiled flat-bucket functions as CPU tensors: the
    compiled route has no device branch (only torch's fused AdamW/SGD shortcut for unadapted
    groups looks at the device, switched off here).  Shown device-independently: with
    ``get_compiled`` recording and running each function eagerly, CPU and meta tensors (meta:
    shapes only, like any non-CPU device here) call the same functions with the same static
    options in the same order.  Numerically, the compiled path on CPU tensors matches the eager
    path (below) and the float64 references (test_optim_lamb/test_optim_lars
    ``test_matches_*reference`` with impl "compiled")."""
    def route(device):
        calls = []

        def recording(fn, static):
            def run(*args):
                calls.append((fn.__name__, tuple(sorted(static.items(), key=lambda kv: kv[0]))))
                return fn(*args, **static)
            return run

        monkeypatch.setattr(layerwise, "get_compiled", recording)
        ps = [torch.nn.Parameter(p.detach().to(device)) for p in _params()]
        opt = OPTIMIZERS[name]([{"params": ps[:3]}, {"params": ps[3:], "layer_adaptation": False}],
                               impl="compiled")
        opt._fast_cpu = False
        for s in range(2):
            for p, g in zip(ps, _grads(ps, s)):
                p.grad = g.to(device)
            opt.step()
        monkeypatch.undo()
        return calls

    cpu = route("cpu")
    assert cpu and cpu == route("meta")
    assert {fn for fn, _ in cpu} <= {"layerwise_step", "ratio_then_apply", "lamb_phase1",
                                      "paper_phase1", "classic_phase2"}
    out = []
    for impl in ("eager", "compiled"):
        ps = _params()
        out.append(_three_steps(OPTIMIZERS[name](ps, impl=impl), ps))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compiler_probe_is_per_device_type(monkeypatch):
    """``compiler_available`` probes the backend of the device type asked for (cached per type);
    impl "auto" asks for the parameters' device: meta tensors (no compiler backend) resolve to
    eager with one warning, CPU tensors probe "cpu"."""
    monkeypatch.setattr(layerwise, "_compiler_warned", set())
    assert layerwise.compiler_available("meta") is False
    assert layerwise._compiler_ok["meta"] is False
    asked = []
    real = layerwise.compiler_available
    monkeypatch.setattr(layerwise, "compiler_available", lambda dt="cpu": asked.append(dt) or real(dt))
    with pytest.warns(UserWarning, match="not usable for meta tensors"):
        meta = Lamb([torch.nn.Parameter(torch.empty(3, 4, device="meta"))])
    assert meta.impl == "eager" and asked == ["meta"]
    cpu = Lars([torch.nn.Parameter(torch.randn(3, 4))], lr=0.1)
    assert asked == ["meta", "cpu"]
    assert cpu.impl == ("compiled" if real("cpu") else "eager")
    assert Lamb([torch.nn.Parameter(torch.randn(2))], impl="eager").impl == "eager"
    assert asked == ["meta", "cpu"]  # an explicit impl probes nothing
