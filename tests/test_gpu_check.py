"""scripts/gpu_check.sh without a GPU (issue 14, item 7): the GPU-only checks report themselves
skipped with the reason, the last line is one JSON object, exit status 0 when nothing that ran
failed; an unknown check name is exit status 2. (The checks that do run on a CPU, DALI decode over 3
epochs and a DALI fit stopped by SIGUSR1 and resumed exactly, are what tests/test_dali_stream.py and
tests/reliability/test_preemption.py check; the full script takes about 2.5 minutes on a 2-core CPU.)"""
from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from conftest import REPO

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without a GPU reports")


def _run(*args):
    env = dict(os.environ, PYTHON=os.environ.get("PYTHON", "") or __import__("sys").executable)
    return subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_gpu_only_checks_are_listed_as_skipped():
    p = _run("--only", "optim,resnet50_fit,ddp_equivalence")
    assert p.returncode == 0, p.stderr[-2000:]
    last = json.loads(p.stdout.strip().splitlines()[-1])
    assert last["ok"] is True and last["ran"] == [] and last["failed"] == []
    assert last["skipped"] == {"optim": "no CUDA device", "resnet50_fit": "no CUDA device",
                               "ddp_equivalence": "0 GPU(s): needs 2 or more"}


def test_unknown_check_is_refused():
    p = _run("--only", "optim,warp_drive")
    assert p.returncode == 2 and "unknown check(s) warp_drive" in p.stderr


def test_dali_fit_resume_command_line_is_accepted_by_fit(tmp_path):
    """The CPU-capable dali_fit_resume check launches fit with fixed flags: fit must accept them (a flag
    the CLI stopped taking would fail the check on every machine, GPU or not)."""
    import sys

    sys.path.insert(0, str(REPO / "scripts"))
    import gpu_check

    root = gpu_check.make_jpegs(tmp_path / "data", 96, 72, per_class=3)
    p = subprocess.run([sys.executable, "-m", "resnet_lamb", "fit", "--config", "recipes/demo.yaml",
                        *gpu_check.fit_overrides(root, tmp_path / "runs"), "--print_config"],
                       cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, WANDB_MODE="offline"))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "backend: dali" in p.stdout and "num_classes: 8" in p.stdout
