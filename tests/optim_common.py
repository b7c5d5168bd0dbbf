"""What the optimizer test modules share: the tensor shapes, the implementations to check, and the
fixture that sends small tensors through the batched eager form."""
from __future__ import annotations

import pytest

from resnet_lamb.optim.lamb import compiler_available

SHAPES = [(6, 5), (7,), (3, 2, 2, 2), (4,)]
IMPLS = ["eager"] + (["compiled"] if compiler_available() else [])


@pytest.fixture(autouse=True)
def _mixed_small_tensors(monkeypatch):
    """Compiled path: tensors of >= 20 elements take the compiled kernels, smaller ones the
    batched eager form (as BatchNorm vectors do on a real model)."""
    import resnet_lamb.optim.lamb as lamb_mod

    monkeypatch.setattr(lamb_mod, "SMALL_NUMEL", 20)
