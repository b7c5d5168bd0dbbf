"""Fixtures shared by the reliability tests (helpers of the top-level ``tests/conftest.py``, imported
as ``conftest``, are used as they are)."""
from __future__ import annotations

import pytest


@pytest.fixture
def untouched(monkeypatch):
    """Records (and fails) any network built or data loader made: bad input must stop before them."""
    import resnet_lamb.model as model_mod
    from resnet_lamb.data.datamodule import ImageDataModule

    touched = []
    monkeypatch.setattr(model_mod, "build_resnet", lambda *a, **k: touched.append("model") or 1 / 0)
    monkeypatch.setattr(ImageDataModule, "_loader", lambda *a, **k: touched.append("data") or 1 / 0)
    return touched


@pytest.fixture
def unprivileged():
    """``subprocess`` keyword arguments that make file permissions apply to the child. Root ignores
    them (chmod 000 does not stop its reads) through two capabilities, CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH; as root, the child drops both from its bounding set before exec (so it
    stays uid 0, owns the test's files, but obeys their mode bits like any user). As another user
    nothing is needed."""
    import ctypes
    import os

    env = dict(os.environ, WANDB_MODE="offline", PYTHONWARNINGS="ignore")
    if os.geteuid() != 0:
        return {"env": env}
    libc = ctypes.CDLL(None, use_errno=True)

    def drop():
        for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
            if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")

    return {"env": env, "preexec_fn": drop}
