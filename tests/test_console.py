"""What a user sees on the console: no library noise, help with descriptions, --print_config with
the numbers the run uses, --version, and the small-data warning with its padding skipped.

The noise test runs `resnet-lamb fit` as a real process (stdout and stderr as a terminal-less user
sees them, W&B offline but not silenced, the model summary on), resumes the finished run and
validates its checkpoint.
Under DDP (the `sync_dist` recommendations, the plan once) tests/test_launch.py checks the same on a
2-process torchrun.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, run_cli, tiny_recipe, write_recipe

SCRIPT = Path(sys.executable).with_name("resnet-lamb")
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "resnet_lamb"]
# each seen on every run before (issue 11, item 9)
NOISE = ("litlogger", "litmodels", "💡 Tip", "The anonymous setting has no effect", "LeafSpec is deprecated",
         "isinstance(treespec, LeafSpec)", "No CUDA runtime is found", "Total FLOPs: 0", "exists and is not empty",
         "sync_dist=True", "smaller than the logging interval", "Be aware that when using `ckpt_path`")


def _env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_MODE="offline", HOME=str(tmp_path), PYTHONPATH=os.pathsep.join(
        [str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep), CUDA_HOME=str(tmp_path))
    return env


def test_fit_and_resume_print_no_library_noise(tmp_path):
    recipe = tiny_recipe(None, **{"trainer.max_epochs": 1, "trainer.enable_model_summary": True,
                                  "trainer.log_every_n_steps": 50, "model.trust_ratio_every": 0})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    args = ["--config", str(path), "--run.root", str(tmp_path / "runs"), "--run.name", "n"]
    last = str(tmp_path / "runs" / "n" / "checkpoints" / "last.ckpt")
    outs = []
    # a fit; its resume, which finds the run finished and ends at once; a validation of its checkpoint
    for command in (["fit", *args], ["fit", *args, "--ckpt_path", "last"], ["validate", *args, "--ckpt_path", last]):
        p = subprocess.run([*COMMAND, *command], capture_output=True, text=True, cwd=tmp_path, env=_env(tmp_path),
                           stdin=subprocess.DEVNULL, timeout=600)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
        outs.append(p.stdout + p.stderr)
    for out in outs:
        seen = [s for s in NOISE if s in out]
        assert not seen, f"{seen} in:\n{out[-4000:]}"
    first = outs[0]
    assert first.count("resnet-lamb plan:") == 1
    assert "wandb: Run data is saved locally" in first  # W&B's own lines about the run stay
    summary = [ln for ln in first.splitlines() if "Total FLOPs" in ln or "Total Flops" in ln]
    assert summary and not summary[0].rstrip().endswith(" 0"), summary  # the model summary counts them now
    assert "step 2 [3/3]" in first and "val/top1" in first


def test_cuda_toolkit_without_gpu_message_is_filtered(tmp_path):
    """torch says "No CUDA runtime is found" when it finds a CUDA toolkit but no GPU and its compiler
    stack is imported (torch.compile); CUDA_HOME pointing at any folder makes it say so here."""
    code = "import torch.utils.cpp_extension"
    quiet = "from resnet_lamb.startup import quiet_libraries; quiet_libraries('fit'); " + code
    env = _env(tmp_path)
    if torch.cuda.is_available():
        pytest.skip("the message is only printed without a GPU")
    loud = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert "No CUDA runtime is found" in loud.stderr, "the control: torch prints it without the filter"
    p = subprocess.run([sys.executable, "-c", quiet], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0 and "No CUDA runtime" not in p.stderr, p.stderr


def test_wandb_offline_line_only_on_rank_zero(monkeypatch, capsys, tmp_path):
    from resnet_lamb.run_logging import wandb_mode

    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    for rank, lines in (("1", 0), ("0", 1)):
        monkeypatch.delenv("WANDB_MODE", raising=False)
        monkeypatch.delenv("WANDB_API_KEY", raising=False)
        monkeypatch.setenv("RANK", rank)
        assert wandb_mode() == "offline"
        assert len(capsys.readouterr().err.splitlines()) == lines, f"rank {rank}"


def test_fit_help_describes_the_projects_options(capsys):
    assert run_cli("fit", "--help") == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("usage: resnet-lamb fit --config RECIPE")
    assert len(lines) < 450, len(lines)  # 585 before: every option in the usage, Lightning's test/predict options
    for hidden in ("--trainer.accumulate_grad_batches", "--trainer.limit_predict_batches", "--weights_only"):
        assert hidden not in out
    blocks: dict[str, str] = {}  # option -> its help entry, the wrapped lines joined
    current = None
    for line in lines:
        if line.startswith("  --"):
            current = line.split()[0].rstrip(",")
            blocks[current] = line
        elif current and line.startswith(" " * 20):
            blocks[current] += " " + line.strip()
        else:
            current = None
    ours = [o for o in blocks if o.startswith(("--model.", "--data.", "--run.")) and not o.endswith(".help")]
    assert len(ours) > 30, ours
    for opt in ours:
        words = blocks[opt].split("(type:")[0].split()
        described = [w for w in words if not (w.startswith(("--", "{", "[")) or w.isupper())]
        assert len(described) >= 2, f"{opt} has no description: {blocks[opt]}"


def test_print_config_shows_what_the_run_uses(tmp_path, capsys):
    recipe = tiny_recipe(None, **{"data.micro_batch": 4})  # accumulation 8, 3 steps x 2 epochs
    path = write_recipe(tmp_path / "r.yaml", recipe)
    runs = tmp_path / "runs"
    assert run_cli("fit", "--config", str(path), "--run.root", str(runs), "--print_config") == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["trainer"]["accumulate_grad_batches"] == 8 and cfg["trainer"]["max_steps"] == 6
    assert cfg["trainer"]["precision"] == "32-true"
    assert cfg["model"]["schedule"]["name"] == "poly" and "power" in cfg["model"]["schedule"]
    assert "milestones" not in cfg["model"]["schedule"] and "gamma" not in cfg["model"]["schedule"]
    assert not runs.exists(), "--print_config writes nothing"
    recipe["model"]["schedule"] = {"name": "goyal", "warmup_epochs": 0.5, "milestones": [1]}
    write_recipe(path, recipe)
    assert run_cli("fit", "--config", str(path), "--run.root", str(runs), "--print_config=skip_default") == 0
    sched = yaml.safe_load(capsys.readouterr().out)["model"]["schedule"]
    assert sched["milestones"] == [1] and "power" not in sched


def test_version(capsys):
    from resnet_lamb import __version__

    assert run_cli("--version") == 0
    out = capsys.readouterr().out
    assert out.startswith(f"resnet-lamb {__version__} (torch ")


@pytest.fixture(scope="module")
def ten_images(tmp_path_factory) -> Path:
    """One train image per class (10), 4 val images per class."""
    from conftest import _prepare_digits

    return _prepare_digits(tmp_path_factory, "digits10", 1)


def _padding_run(fit, monkeypatch, root: Path, skip: bool, name: str) -> dict:
    import resnet_lamb.model as model_mod

    monkeypatch.setattr(model_mod.LambModule, "skip_padding", skip)
    # 10 images, global batch 32 in 16 micro-batches of 2: the padding is dealt round-robin, so 10
    # micro-batches hold one real image each and 6 hold padding only
    recipe = tiny_recipe(root, **{"trainer.max_epochs": 1, "data.micro_batch": 2, "model.trust_ratio_every": 0})
    run = fit(recipe, name=name)
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]


def test_small_data_warns_and_skips_padding_only_micro_batches(fit, monkeypatch, capsys, ten_images):
    skipped = _padding_run(fit, monkeypatch, ten_images, True, "skip")
    err = capsys.readouterr().err
    warning = [ln for ln in err.splitlines() if "larger than the 10 training images" in ln]
    assert len(warning) == 1 and "computes 20 of the 32" in warning[0], err[-2000:]
    full = _padding_run(fit, monkeypatch, ten_images, False, "full")
    assert int(skipped["model.bn1.num_batches_tracked"]) == 10  # forward passes: the 10 with a real image
    assert int(full["model.bn1.num_batches_tracked"]) == 16
    stats = ("running_mean", "running_var", "num_batches_tracked")
    trainable = [k for k in full if k.startswith("model.") and not k.endswith(stats)]
    assert len(trainable) > 50
    # a padding-only micro-batch adds exactly zero gradient: the same weights, bit for bit (one process)
    assert all(torch.equal(skipped[k], full[k]) for k in trainable)
