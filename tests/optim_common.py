"""What the optimizer test modules share: the tensor shapes, the implementations to check, and the
fixture that sends small tensors through the batched eager form."""
from __future__ import annotations

import pytest
import torch

from resnet_lamb.optim.lamb import compiler_available

SHAPES = [(6, 5), (7,), (3, 2, 2, 2), (4,)]
IMPLS = ["eager"] + (["compiled"] if compiler_available() else [])


@pytest.fixture(autouse=True)
def _mixed_small_tensors(monkeypatch):
    """Compiled path: tensors of >= 20 elements take the compiled kernels, smaller ones the
    batched eager form (as BatchNorm vectors do on a real model)."""
    import resnet_lamb.optim.lamb as lamb_mod

    monkeypatch.setattr(lamb_mod, "SMALL_NUMEL", 20)


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
