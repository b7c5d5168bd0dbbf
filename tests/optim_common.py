"""What the optimizer test modules share: the tensor shapes, the implementations to check and the
reference check."""
from __future__ import annotations

import pytest
import torch

from resnet_lamb.optim.layerwise import compiler_available

# 6x5 and 3x2x2x2 fit in one flat block; the 1500-element tensor spans two (BLOCK = 1024)
SHAPES = [(6, 5), (7,), (3, 2, 2, 2), (4,), (30, 50)]
IMPLS = ["eager"] + (["compiled"] if compiler_available() else [])


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
