"""The optimizer route only CUDA parameters take, run on CPU tensors (issue 14, item 2): with
``impl: compiled`` a bucket of CUDA tensors is updated by one compiled graph over the whole bucket
(``_lamb_list`` / ``_lars_list`` under ``torch.compile(dynamic=False)``), where CPU tensors take
per-tensor kernels. ``LayerwiseOptimizer._bucket_graph`` sends CPU tensors down the CUDA route and
``_fast_cpu = False`` turns off the CPU-only fused kernels, so that the graph is checked here against
the eager path and against the float64 per-tensor transcriptions of the paper's pseudocode.

Also: the compiler probe runs on the backend of the parameters' device.
"""
from __future__ import annotations

import pytest
import torch

import resnet_lamb.optim.lamb as lamb_mod
from optim_common import IMPLS, assert_matches_reference
from resnet_lamb.optim import Lamb, Lars

needs_compiler = pytest.mark.skipif("compiled" not in IMPLS, reason="no working compiler")


@pytest.fixture
def cuda_route(monkeypatch):
    calls = []
    real = lamb_mod.get_compiled

    def recording(fn, dynamic, static):
        calls.append((fn.__name__, dynamic))
        return real(fn, dynamic, static)

    monkeypatch.setattr(lamb_mod, "get_compiled", recording)
    for cls in (Lamb, Lars):
        monkeypatch.setattr(cls, "_bucket_graph", True)
        monkeypatch.setattr(cls, "_fast_cpu", False)
    return calls


LAMB_CASES = ["default", "clip", "nn"]
LARS_CASES = ["paper", "classic_nesterov"]


@needs_compiler
@pytest.mark.parametrize("case", LAMB_CASES)
def test_lamb_bucket_graph_matches_eager_and_reference(case, cuda_route):
    import test_optim_lamb as T

    opts, group1 = T.CASES[case]
    eager = T.run_both(opts, group1, "eager")
    graph = T.run_both(opts, group1, "compiled")
    assert {name for name, _ in cuda_route} == {"_lamb_list"} and all(not dyn for _, dyn in cuda_route)
    assert_matches_reference(*graph, ratio_abs=1e-6)
    for a, b in zip(graph[0], eager[0]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@needs_compiler
@pytest.mark.parametrize("case", LARS_CASES)
def test_lars_bucket_graph_matches_eager_and_reference(case, cuda_route):
    import test_optim_lars as T

    opts, group1 = T.CASES[case]
    eager = T.run_both(opts, group1, "eager")
    graph = T.run_both(opts, group1, "compiled")
    assert "_lars_list" in {name for name, _ in cuda_route} and all(not dyn for _, dyn in cuda_route)
    assert_matches_reference(*graph, ratio_abs=1e-6)
    for a, b in zip(graph[0], eager[0]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_compiler_probe_uses_the_parameters_device(monkeypatch):
    probed = []
    monkeypatch.setattr(lamb_mod, "compiler_available", lambda device_type="cpu": probed.append(device_type) or False)
    monkeypatch.setattr(lamb_mod, "_compiler_warned", True)
    Lamb([torch.nn.Parameter(torch.ones(3))], impl="auto")
    Lars([torch.nn.Parameter(torch.ones(3, device="meta"))], lr=0.1, impl="auto")
    assert probed == ["cpu", "meta"]
    monkeypatch.undo()
    assert lamb_mod.compiler_available("meta") is False  # meta tensors cannot run a kernel: no compiler there
