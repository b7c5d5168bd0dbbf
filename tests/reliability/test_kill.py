"""Kill -9 (issue 7, item 1), on real processes:

- one process (synthetic data, and tar shards), SIGKILLed at seeded random points (inside an epoch, after the first checkpoint) and
  once in the middle of writing last.ckpt (a patched ``torch.save`` writes half the bytes, then
  hangs): after every kill each ``*.ckpt`` present loads and last.ckpt is an epoch boundary no
  older than before; the half-written temp file is never taken for a checkpoint and is removed at
  the next start; the run resumed after all kills ends bit-identical to one never killed
  (1 thread, deterministic CPU settings) with one CSV row per step;
- one rank of two under torchrun (MAX_RESTARTS=0): the job stops with torchrun's line naming the
  rank and the signal and torchrun.sh's line saying how to resume; last.ckpt loads and a relaunch
  on ONE process resumes it: same global batch (accumulation 4 instead of 2), the step count and
  every logged LR as the schedule says (item 6: another world size).
- full-batch epochs (issue 12): a run whose 23 steps do not fill its 3 Lightning epochs (240 images,
  batch 32: epochs of 8 steps, the last of 7), SIGKILLed at a random point inside an epoch, resumes
  from the epoch boundary at the right stream position and ends bit-identical to one never killed.
(Kill right after the epoch-1 checkpoint, 3 backends: tests/test_train_resume.py; a killed worker
with MAX_RESTARTS=1: tests/test_launch.py.)
"""
from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, read_csv, run_cli, tiny_recipe, write_recipe

# The training process of the single-process test: `resnet-lamb fit ...` with two test hooks,
# STARTED (a file written when training starts) and HANG (a file: the first last.ckpt write of
# this process writes half its bytes, creates HANG and sleeps, so the test kills it mid-write).
CHILD = r"""
import io, os, sys, time
import torch
import lightning.pytorch as pl
import resnet_lamb.model as m

real_start, real_end = m.LambModule.on_train_start, m.LambModule.on_train_batch_end
def on_train_start(self):
    real_start(self)
    open(os.environ["STARTED"], "w").close()
def on_train_batch_end(self, *a):
    real_end(self, *a)
    time.sleep(float(os.environ.get("STEP_SLEEP", "0")))  # widens the window; no numbers change
m.LambModule.on_train_start, m.LambModule.on_train_batch_end = on_train_start, on_train_batch_end

target = {"path": None}
real_ckpt = pl.Trainer.save_checkpoint
def save_checkpoint(self, filepath, *a, **k):
    target["path"] = str(filepath)
    return real_ckpt(self, filepath, *a, **k)
pl.Trainer.save_checkpoint = save_checkpoint
real_save = torch.save
def save(obj, f, *a, **k):
    hang = os.environ.get("HANG")
    if hang and os.path.basename(target["path"] or "") == "last.ckpt":
        buf = io.BytesIO()
        real_save(obj, buf, *a, **k)
        out = f if hasattr(f, "write") else open(f, "wb")
        out.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        out.flush()
        os.fsync(out.fileno())
        open(hang, "w").close()
        time.sleep(600)
    return real_save(obj, f, *a, **k)
torch.save = save

from resnet_lamb.cli import main
sys.exit(main(sys.argv[1:]))
"""

STEPS_PER_EPOCH, EPOCHS = 8, 6


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _wait(cond, proc, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}:\n{proc.communicate()[1][-3000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"timeout waiting for {what}")
        time.sleep(0.02)


def _ckpts_load(ck_dir: Path) -> int:
    """Every checkpoint file present loads; returns last.ckpt's global step (-1 if none)."""
    for p in ck_dir.glob("[!.]*.ckpt"):
        torch.load(p, map_location="cpu", weights_only=False)
    last = ck_dir / "last.ckpt"
    return torch.load(last, map_location="cpu", weights_only=False)["global_step"] if last.exists() else -1


def _same_weights(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"] and a["lr_schedulers"] == b["lr_schedulers"]
    diff = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert not diff, f"{len(diff)} tensors differ from the run never killed, e.g. {diff[:3]}"
    for i, st in a["optimizer_states"][0]["state"].items():
        for name, t in st.items():
            assert torch.equal(t, b["optimizer_states"][0]["state"][i][name]), f"optimizer state {i}.{name}"


@pytest.mark.parametrize("data", ["synthetic", "shards"])
def test_random_kills_and_a_kill_mid_write_then_resume_matches_never_killed(tmp_path, one_thread, request, data):
    """shards: 240 digits packed in tar shards (8 steps of 32 per epoch), read by byte offset."""
    if data == "shards":
        recipe = tiny_recipe(request.getfixturevalue("digits_shards_large"), **{
            "model.arch": "mlp", "model.mlp_hidden": [32], "trainer.max_epochs": EPOCHS})
    else:
        recipe = tiny_recipe(None, **{"model.arch": "mlp", "model.mlp_hidden": [32], "trainer.max_epochs": EPOCHS,
                                      "data.train_images": STEPS_PER_EPOCH * 32})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    runs = tmp_path / "runs"
    common = ["fit", "--config", str(path), "--run.root", str(runs), "--run.wandb", "false"]
    ck_dir = runs / "k" / "checkpoints"
    rng = random.Random(7)
    started, hang = tmp_path / "started", tmp_path / "hang"
    last_step, log = -1, []

    def attempt(kind: str) -> str:
        nonlocal last_step
        started.unlink(missing_ok=True)
        env = _env(STARTED=started, STEP_SLEEP=0.03, **({"HANG": hang} if kind == "mid-write" else {}))
        args = [*common, "--run.name", "k"] + (["--ckpt_path", "last"] if last_step >= 0 or kind != "first" else [])
        proc = subprocess.Popen([sys.executable, "-c", CHILD, *args], cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if kind == "mid-write":
            _wait(hang.exists, proc, 120, "the hung checkpoint write")
        elif kind == "first":  # a random point after the first checkpoint
            _wait(lambda: (ck_dir / "last.ckpt").exists(), proc, 120, "the first checkpoint")
            time.sleep(rng.uniform(0.0, 0.8))
        else:  # a random point after training started
            _wait(started.exists, proc, 120, "the start of training")
            time.sleep(rng.uniform(0.0, 1.0))
        assert proc.poll() is None, f"{kind}: the run ended before the kill"
        proc.send_signal(signal.SIGKILL)
        err = proc.communicate()[1]
        step = _ckpts_load(ck_dir)
        assert step % STEPS_PER_EPOCH == 0 and step >= last_step, (kind, step, last_step)
        if kind == "mid-write":
            assert step == last_step, "last.ckpt changed although its write was killed"
            partial = list(ck_dir.glob(".tmp-*.ckpt"))
            assert len(partial) == 1, partial
            with pytest.raises(Exception):
                torch.load(partial[0], map_location="cpu", weights_only=False)
        last_step = step
        log.append((kind, step))
        return err

    attempt("first")
    attempt("mid-write")
    err = attempt("random")
    assert "a checkpoint write that was interrupted" in err and ".tmp-" in err, err[-2000:]
    attempt("random")
    assert run_cli(*common, "--run.name", "k", "--ckpt_path", "last") == 0  # the last resume runs to the end
    assert not list(ck_dir.glob(".tmp-*")), "a temp file survived"
    assert run_cli(*common, "--run.name", "straight") == 0
    total = STEPS_PER_EPOCH * EPOCHS
    resumed = torch.load(ck_dir / "last.ckpt", weights_only=False)
    straight = torch.load(runs / "straight" / "checkpoints" / "last.ckpt", weights_only=False)
    assert resumed["global_step"] == total, log
    _same_weights(resumed, straight)
    steps = sorted(int(r["step"]) for r in read_csv(runs / "k") if r.get("train/lr"))
    assert steps == list(range(total)), f"CSV rows per step after kills at {log}"


def test_torchrun_rank_killed_stops_then_resumes_on_one_process(tmp_path, digits_root, capsys):
    from test_launch import TORCHRUN, worker_env

    from reliability.test_resume_changes import expected_lrs, logged_lrs

    rec = tmp_path / "rec"

    def recipe(sleep: float) -> dict:
        r = tiny_recipe(digits_root, **{"model.arch": "mlp", "model.mlp_hidden": [32], "model.grad_clip_norm": None,
                                        "data.global_batch": 16, "data.micro_batch": 4})
        r["trainer"]["callbacks"] = [{"class_path": "launch_helpers.Recorder",
                                      "init_args": {"out": str(rec), "sleep": sleep}}]
        return r

    path = write_recipe(tmp_path / "ddp.yaml", recipe(0.15))
    args = ["--run.root", str(tmp_path / "runs"), "--run.name", "ddp", "--run.wandb", "false"]
    run = tmp_path / "runs" / "ddp"
    last = run / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen(["bash", TORCHRUN, str(path), *args], cwd=REPO, env=worker_env(NPROC=2, MAX_RESTARTS=0),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    victim = rec / "pid-rank1-attempt0"
    deadline = time.time() + 180
    while not (last.exists() and victim.exists()) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before the first checkpoint:\n" + proc.communicate()[0][-3000:]
    os.kill(int(victim.read_text()), signal.SIGKILL)  # rank 1 of this test's own torchrun
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode != 0, out[-3000:]
    assert re.search(r"Root Cause \(first observed failure\):\s+\[0\]:.*?rank\s*: 1 \(local_rank: 1\).*?"
                     r"Signal 9 \(SIGKILL\) received by PID", out, re.S), out[-3000:]
    tail = [ln for ln in out.splitlines() if ln.strip()][-1]
    assert tail.startswith("torchrun.sh: error: torchrun exited with status 1") and \
        "launch the same command again to resume from the run's last.ckpt" in tail, tail
    step = _ckpts_load(run / "checkpoints")
    assert step == 5, step  # epoch 1 of 5 steps done, killed in epoch 2 (10 steps in all)

    # relaunch on one process: world size 1, accumulation 4, the same global batch and schedule
    path1 = write_recipe(tmp_path / "one.yaml", recipe(0.0))
    capsys.readouterr()
    assert run_cli("fit", "--config", str(path1), *args, "--ckpt_path", "last") == 0
    assert "accumulation 4 (global batch 16 = micro 4 x 1 devices x 4)" in capsys.readouterr().out
    ckpt = torch.load(last, weights_only=False)
    assert ckpt["global_step"] == 10 and ckpt["lr_schedulers"][0]["last_epoch"] == 10
    lrs = logged_lrs(run)
    assert sorted(lrs) == list(range(10)), sorted(lrs)
    plan = recipe(0.0)
    plan["data"]["train_images"] = 80
    assert [lrs[s] for s in range(10)] == pytest.approx(expected_lrs(plan, 10), rel=1e-6)


def test_full_batch_killed_mid_epoch_resumes_bit_identical(tmp_path, digits_root_large, one_thread):
    recipe = tiny_recipe(digits_root_large, **{
        "model.arch": "mlp", "model.mlp_hidden": [32], "trainer.max_epochs": 3, "data.backend": "memory",
        "data.epoch_mode": "full_batch", "model.schedule.name": "poly_after_warmup"})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    runs = tmp_path / "runs"
    common = ["fit", "--config", str(path), "--run.root", str(runs), "--run.wandb", "false"]
    ck_dir = runs / "k" / "checkpoints"
    started = tmp_path / "started"
    per_epoch, total = 8, 23  # ceil(240 / 32); ceil(3 * 240 / 32): the paper's count, no padding
    proc = subprocess.Popen([sys.executable, "-c", CHILD, *common, "--run.name", "k"], cwd=REPO,
                            env=_env(STARTED=started, STEP_SLEEP=0.05), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _wait(lambda: (ck_dir / "last.ckpt").exists(), proc, 300, "the first checkpoint")
    time.sleep(random.Random(12).uniform(0.2, 1.0))  # inside epoch 1 (8 steps of >= 2 x 0.05 s)
    assert proc.poll() is None, "the run ended before the kill"
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    killed_at = _ckpts_load(ck_dir)
    assert killed_at in (per_epoch, 2 * per_epoch), killed_at  # an epoch boundary: steps 8 or 16
    assert run_cli(*common, "--run.name", "k", "--ckpt_path", "last") == 0
    assert run_cli(*common, "--run.name", "straight") == 0
    resumed = torch.load(ck_dir / "last.ckpt", weights_only=False)
    straight = torch.load(runs / "straight" / "checkpoints" / "last.ckpt", weights_only=False)
    assert resumed["global_step"] == straight["global_step"] == total  # validated and saved inside epoch 2
    _same_weights(resumed, straight)
    steps = sorted(int(r["step"]) for r in read_csv(runs / "k") if r.get("train/lr"))
    assert steps == list(range(total)), steps
    vals = [int(r["step"]) for r in read_csv(runs / "straight") if r.get("val/top1")]
    assert vals == [per_epoch - 1, 2 * per_epoch - 1, total - 1], vals  # the last one after the short epoch
