"""What the optimizer test modules share: the tensor shapes, the implementations to check and the
reference check."""
from __future__ import annotations

import pytest
import torch

from resnet_lamb.optim.layerwise import compiler_available

# 6x5 and 3x2x2x2 fit in one flat block; the 1500-element tensor spans two (BLOCK = 1024)
SHAPES = [(6, 5), (7,), (3, 2, 2, 2), (4,), (30, 50)]
IMPLS = ["eager"] + (["compiled"] if compiler_available() else [])
NAMES = ["a.weight", "b.bias", "c.weight", "d.weight", "e.weight"]
GROUP1 = (2, 3)  # the tensors of the second group


def run_two_groups(cls, ref_step, init, grads_for, cfg0: dict, group1: dict, impl: str, steps: int):
    """``cls`` on float32 copies of ``init`` (float64) in two groups (tensors 0,1,4 with ``cfg0``; 2,3
    with ``cfg0`` overridden by ``group1``) beside ``ref_step`` on the float64 tensors, for ``steps``
    steps of ``grads_for(step)``. Returns (parameters, reference tensors, optimizer, the reference's
    ratio per name at the last step)."""
    ref = [p.clone() for p in init]
    ps = [torch.nn.Parameter(p.float().clone()) for p in init]
    cfg1 = dict(cfg0, **group1)
    opt = cls([{"params": [(NAMES[i], ps[i]) for i in range(len(ps)) if i not in GROUP1]},
               {"params": [(NAMES[i], ps[i]) for i in GROUP1], **group1}], impl=impl, **cfg0)
    st: list = [dict() for _ in ps]
    ratios = {}
    for s in range(steps):
        for i, (p, g) in enumerate(zip(ps, grads_for(s))):
            p.grad = g.float()
            ratios[NAMES[i]] = ref_step(ref[i], g, st[i], **(cfg1 if i in GROUP1 else cfg0))
        opt.step()
    return ps, ref, opt, ratios


def assert_matches_reference(ps, ref, opt, ratios, ratio_abs):
    """Parameters equal the float64 reference's, and trust_ratios() reports, for every named
    parameter, the 0-dim ratio the reference used at the last step."""
    for p, r in zip(ps, ref):
        torch.testing.assert_close(p.detach().double(), r, rtol=2e-5, atol=2e-6)
    got = opt.trust_ratios()
    assert set(got) == set(ratios)
    for name, want in ratios.items():
        assert got[name].dim() == 0
        assert float(got[name]) == pytest.approx(want, rel=1e-4, abs=ratio_abs), name
