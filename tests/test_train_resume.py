"""Kill -9 after the epoch-1 checkpoint, resume with --ckpt_path last: the weights after epoch 2
equal those of an uninterrupted run (CPU, seeded, deterministic algorithms)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from resnet_lamb.errors import RecipeError

from conftest import REPO, read_csv, run_cli, tiny_recipe, write_recipe


def _state(path):
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    return ckpt


def _assert_same(a, b):
    sa, sb = a["state_dict"], b["state_dict"]
    assert sa.keys() == sb.keys()
    diff = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not diff, f"{len(diff)} tensors differ after resume, e.g. {diff[:3]}"
    oa, ob = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for k in oa:
        for name, t in oa[k].items():
            if torch.is_tensor(t):
                assert torch.equal(t, ob[k][name]), f"optimizer state {k}.{name} differs"
    assert a["lr_schedulers"] == b["lr_schedulers"]
    assert a["global_step"] == b["global_step"]


# each backend once, both layouts (DALI on a folder: test_dali_stream's resume; torchvision on shards and every
# backend killed at random points: reliability/test_kill.py)
@pytest.mark.parametrize(("backend", "layout"), [("torchvision", "folder"), ("synthetic", None), ("dali", "shards")])
def test_kill_after_epoch_1_and_resume_matches_uninterrupted(tmp_path, request, backend, layout, one_thread):
    """shards: the same images packed in tar shards (digits_shards_large), read by byte offset. One
    thread (one_thread): oneDNN's multi-threaded conv backward can differ in the last bits between
    processes, which would make bitwise equality flaky."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    root = request.getfixturevalue({"folder": "digits_root_large", "shards": "digits_shards_large"}[layout]) \
        if layout else None
    recipe = tiny_recipe(root, **{"data.backend": backend})
    if backend == "synthetic":
        recipe["data"].update(train_images=240, val_images=40)
    path = write_recipe(tmp_path / "r.yaml", recipe)
    runs = tmp_path / "runs"
    common = ["--config", str(path), "--run.root", str(runs), "--run.wandb", "false"]

    # 1. a real process, SIGKILLed as soon as the epoch-1 checkpoint is on disk
    last = runs / "killed" / "checkpoints" / "last.ckpt"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "resnet_lamb", "fit", *common, "--run.name", "killed"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert last.exists(), f"no checkpoint written; stderr:\n{err.decode()[-2000:]}"
    killed_at = _state(last)
    assert killed_at["epoch"] == 0 and killed_at["global_step"] == 8, "killed inside epoch 2"

    # 2. resume it; 3. the same recipe uninterrupted
    assert run_cli("fit", *common, "--run.name", "killed", "--ckpt_path", "last") == 0
    assert run_cli("fit", *common, "--run.name", "straight") == 0
    resumed = _state(runs / "killed" / "checkpoints" / "last.ckpt")
    straight = _state(runs / "straight" / "checkpoints" / "last.ckpt")
    assert resumed["epoch"] == straight["epoch"] == 1 and straight["global_step"] == 16
    _assert_same(resumed, straight)
    # the CSV log of the resumed run continues where it stopped (same file, steps 8..15 added)
    steps = sorted({int(r["step"]) for r in read_csv(runs / "killed") if r.get("train/lr")})
    assert steps == list(range(16)), "the killed attempt's rows kept, the redone ones not doubled"


def test_fresh_fit_refuses_a_run_folder_with_checkpoints(tmp_path, capsys):
    recipe = tiny_recipe(None, **{"trainer.max_epochs": 1, "data.train_images": 32, "data.val_images": 16})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    args = ["fit", "--config", str(path), "--run.root", str(tmp_path / "runs"), "--run.name", "x",
            "--run.wandb", "false"]
    assert run_cli(*args) == 0
    capsys.readouterr()
    assert run_cli(*args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--ckpt_path last" in err[0]


def test_resume_of_a_mistyped_run_name_is_refused_unless_asked_to_start_fresh(tmp_path, capsys):
    """Issue 11 item 4: `--ckpt_path last` for a run folder without last.ckpt is one line naming that
    folder and the runs that can resume (exit 2, nothing created); `--run.fresh_if_missing true`
    starts it from scratch, saying so, and a second such call resumes it."""
    recipe = tiny_recipe(None, **{"trainer.max_epochs": 1, "data.train_images": 32, "data.val_images": 16})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    runs = tmp_path / "runs"
    for name in ("lamb-bs512", "demo"):
        (runs / name / "checkpoints").mkdir(parents=True)
        (runs / name / "checkpoints" / "last.ckpt").write_bytes(b"")
    args = ["fit", "--config", str(path), "--run.root", str(runs), "--run.wandb", "false", "--ckpt_path", "last"]
    capsys.readouterr()
    assert run_cli(*args, "--run.name", "lamb-bs521") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"resnet-lamb: error: ckpt_path: last, but {runs}/lamb-bs521 has no checkpoints/last.ckpt (the "
                   f"runs under {runs} that can resume: demo, lamb-bs512; did you mean --run.name lamb-bs512?); pass "
                   f"--run.name of the run to resume, or --run.fresh_if_missing true to start {runs}/lamb-bs521 from "
                   "scratch"]
    assert not (runs / "lamb-bs521").exists()
    assert run_cli(*args, "--run.name", "new", "--run.fresh_if_missing", "true") == 0
    assert f"{runs}/new has no checkpoint yet; starting it from scratch" in capsys.readouterr().err
    assert _state(runs / "new" / "checkpoints" / "last.ckpt")["global_step"] == 1  # 32 images, batch 32
    assert run_cli(*args, "--run.name", "new", "--run.fresh_if_missing", "true") == 0  # now it resumes (and ends)
    assert "from scratch" not in capsys.readouterr().err


def test_resume_with_another_accumulation_keeps_the_global_batch(tmp_path, capsys, monkeypatch):
    """A different micro-batch (as with another device count) changes accumulation, not the plan:
    the run dies in epoch 2, resumes at the epoch boundary with accumulation 4 instead of 2."""
    import resnet_lamb.model as model_mod

    real = model_mod.LambModule.training_step

    def crash_in_epoch_2(self, batch, batch_idx):
        if self.current_epoch == 1 and batch_idx == 1:
            raise RuntimeError("simulated crash")
        return real(self, batch, batch_idx)

    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(None))
    args = ["fit", "--config", str(path), "--run.root", str(tmp_path / "runs"), "--run.name", "x",
            "--run.wandb", "false"]
    monkeypatch.setattr(model_mod.LambModule, "training_step", crash_in_epoch_2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_cli(*args)
    monkeypatch.setattr(model_mod.LambModule, "training_step", real)
    last = tmp_path / "runs" / "x" / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 3
    capsys.readouterr()
    assert run_cli(*args, "--data.micro_batch", "8", "--ckpt_path", "last") == 0
    out = capsys.readouterr().out
    assert "accumulation 4 (global batch 32 = micro 8 x 1 devices x 4)" in out
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 6 and ckpt["epoch"] == 1 and ckpt["lr_schedulers"][0]["last_epoch"] == 6
    steps = [int(r["step"]) for r in read_csv(tmp_path / "runs" / "x") if r.get("train/lr")]
    assert steps == list(range(6))


def test_world_size_from_torchrun_or_devices(monkeypatch):
    from resnet_lamb.startup import world_size

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert world_size({"devices": 4, "num_nodes": 2, "accelerator": "gpu"}) == 8
    assert world_size({"devices": [0, 1], "num_nodes": 1}) == 2
    assert world_size({"devices": "0,1,2", "num_nodes": 1}) == 3
    assert world_size({"devices": "auto", "num_nodes": 1, "accelerator": "cpu"}) == 1
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert world_size({"devices": 8, "num_nodes": 2, "accelerator": "gpu"}) == 16
    with pytest.raises(RecipeError, match=r"trainer.devices x trainer.num_nodes = 1 but torchrun started "
                                          r"WORLD_SIZE=16 processes; pass --trainer.devices 8 --trainer.num_nodes 2"):
        world_size({"devices": 1, "num_nodes": 1, "accelerator": "cpu"})
