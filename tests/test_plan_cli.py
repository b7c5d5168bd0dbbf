"""`resnet-lamb plan` as a user runs it: a subprocess, its stdout, its one-line errors and exit 2.
(Malformed recipes, through `plan` and `fit`: the matrix in tests/reliability/test_recipes.py.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes" / "imagenet"
SCRIPT = Path(sys.executable).with_name("resnet-lamb")
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "resnet_lamb"]


def plan(*args, cwd=REPO):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([*COMMAND, "plan", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=60)


def test_plan_lamb_32k_prints_every_number_and_its_source():
    """Issue 12's must-show: lr 0.04, 3519 optimizer steps, 782 warmup steps, decay from step 782 to
    0 at 3519, weight decay 1.5, label smoothing 0.1, bias correction off, BN batch 128, each with
    its source."""
    out = plan("--config", RECIPES / "table5" / "lamb-bs32k.yaml")
    assert out.returncode == 0, out.stderr
    lines = {line.split()[0]: line for line in out.stdout.splitlines()[1:] if line.startswith("  ")}
    rows = {key: line.split()[1] for key, line in lines.items()}
    source = {key: line.split(" | ", 1)[1] if " | " in line else "" for key, line in lines.items()}
    assert rows["lr"] == "0.04" and rows["total_steps"] == "3519" and rows["warmup_epochs"] == "20"
    assert rows["warmup_steps"] == "782" and rows["steps_per_epoch"] == "40" and rows["accumulation"] == "128"
    assert rows["images_seen"] == str(3519 * 32768) and rows["micro_batches_per_epoch_per_rank"] == "5120"
    assert rows["optimizer_steps"] == "3519" and rows["epoch_mode"] == "full_batch" and rows["padding_per_epoch"] == "0"
    assert "padded mode would take 90 x 40 = 3600" in lines["optimizer_steps"]  # both step counts
    assert rows["decay"] == "782..3519" and "linear from step 782 (the peak LR) to 0 at step 3519" in lines["decay"]
    assert rows["schedule"] == "poly_after_warmup" and rows["end_lr"] == "0"
    assert rows["weight_decay"] == "1.5" and rows["label_smoothing"] == "0.1" and rows["bias_correction"] == "false"
    assert rows["bn_batch"] == "128" and rows["zero_init_residual"] == "true" and rows["grad_clip_norm"] == "1"
    assert rows["run_epochs"] == "88" and "(the last 39 steps)" in lines["run_epochs"]
    assert "0.7642 / 0.9308" in out.stdout
    assert "Table 5 rule" in source["lr"] and "0.04 at 32K" in source["lr"]
    assert "Training for 3519 steps" in source["total_steps"] and "3519 full steps" in source["optimizer_steps"]
    assert "782 steps at 32K" in source["warmup_steps"] and "(T - step)*lr/(T - W)" in source["decay"]
    assert "weight_decay_input=1.5" in source["weight_decay"] and "label_smoothing=0.1" in source["label_smoothing"]
    assert "no bias correction" in source["bias_correction"] and "128 per core" in source["bn_batch"]
    assert source["micro_batch"].startswith("our choice") and source["norm"] == "the optimizer's default"


def plan_here(*args, capsys, cwd=REPO, monkeypatch=None):
    """`resnet-lamb plan` in this process (the CLI's own entry point), for the checks beyond bad input."""
    from resnet_lamb.cli import main

    if monkeypatch is not None:
        monkeypatch.chdir(cwd)
    code = main(["plan", *map(str, args)])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def test_plan_json_and_overrides_change_accumulation(capsys):
    out = plan_here("--config", RECIPES / "table5" / "lamb-bs16k.yaml", "--world-size", 8, "--micro-batch", 128,
                    "--json", capsys=capsys)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert (data["accumulation"], data["world_size"], data["micro_batch"]) == (16, 8, 128)
    assert data["total_steps"] == 7038 and data["micro_batches_per_epoch_per_rank"] == 79 * 16
    assert data["lr"] == pytest.approx(0.005 * 32**0.5, rel=1e-12)
    assert data["expected"]["top1"] == 0.7666
    # the numbers stay flat (existing consumers); their sources come in a parallel map, keyed like the rows
    assert (data["epoch_mode"], data["optimizer_steps"], data["padded_steps"], data["bn_images"]) == \
        ("full_batch", 7038, 7110, 128)
    assert "Table 5 rule" in data["sources"]["lr"] and "our choice" in data["sources"]["micro_batch"]
    assert "assumed from the author's 32K run" in data["sources"]["global_batch"]


GOOD = """\
trainer: {max_epochs: 10}
model:
  optimizer: {name: lamb, base_lr: 0.005, base_batch: 512}
  schedule: {name: poly, warmup_epochs: 0.3125}
data: {global_batch: 512, micro_batch: 64, train_images: 10000}
"""


def _with(old: str, new: str) -> str:
    assert old in GOOD
    return GOOD.replace(old, new)


def test_world_size_error_suggests_micro_batches(capsys):
    out = plan_here("--config", RECIPES / "table5-text" / "lamb-bs512.yaml", "--world-size", 16, capsys=capsys)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"resnet-lamb: error: {RECIPES / 'table5-text' / 'lamb-bs512.yaml'}: data.global_batch: 512 is not divisible "
        "by data.micro_batch 64 x world size 16 = 1024; valid data.micro_batch values for world size 16: "
        "1, 2, 4, 8, 16, 32"]


def test_train_images_null_without_data_asks_for_it(tmp_path, capsys, monkeypatch):
    (tmp_path / "r.yaml").write_text(_with("train_images: 10000", "train_images: null, root: data/none"))
    out = plan_here("--config", "r.yaml", capsys=capsys, cwd=tmp_path, monkeypatch=monkeypatch)
    assert out.returncode == 2
    assert "data.train_images: null and data/none/train does not exist; set data.train_images in the recipe " \
           "or pass --train-images" in out.stderr
    ok = plan_here("--config", "r.yaml", "--train-images", 5000, "--json", capsys=capsys)
    assert ok.returncode == 0 and json.loads(ok.stdout)["steps_per_epoch"] == 10
