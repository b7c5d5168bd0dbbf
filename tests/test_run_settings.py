"""How a run is set up on GPUs and clusters (issue 14, items 3-4), on the CPU:

- precision and cuDNN autotuning chosen from the device (bf16-mixed where the GPU computes bf16,
  16-mixed otherwise, 32-true on a CPU; benchmark unless deterministic);
- DDPStrategy with gradient_as_bucket_view and the recipe's bucket size for ``ddp`` / several devices;
- the validation cadence must divide the epochs (the last epoch is validated);
- torchrun.sh counts GPUs with torch.cuda.device_count(), not nvidia-smi;
- the W&B check connects through HTTPS_PROXY unless NO_PROXY exempts the host;
- DALI's threads stay on the CPUs a launcher bound the process to;
- checkpoints: one write per save (a new best is a hard link to last.ckpt), last.ckpt at the epoch
  cadence whether or not the epoch validates, and a resume from a non-validated epoch is exact.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from conftest import REPO, read_csv, run_cli, tiny_recipe, write_recipe
from resnet_lamb.lightning_cli import ddp_strategy, device_defaults
from resnet_lamb.run_logging import _wandb_reachable, _wandb_route


def test_device_defaults():
    assert device_defaults(gpu=True, bf16=True, deterministic=False) == {"precision": "bf16-mixed", "benchmark": True}
    assert device_defaults(gpu=True, bf16=False, deterministic=False) == {"precision": "16-mixed", "benchmark": True}
    assert device_defaults(gpu=True, bf16=True, deterministic=True) == {"precision": "bf16-mixed"}
    assert device_defaults(gpu=False, bf16=False, deterministic=False) == {"precision": "32-true"}


def test_ddp_strategy():
    from lightning.pytorch.strategies import DDPStrategy

    s = ddp_strategy("ddp", 1, 50.0)
    assert isinstance(s, DDPStrategy) and s._ddp_kwargs == {"gradient_as_bucket_view": True, "bucket_cap_mb": 50.0}
    assert isinstance(ddp_strategy("auto", 8, 25.0), DDPStrategy)
    assert ddp_strategy("auto", 1, 25.0) == "auto"
    mine = DDPStrategy(find_unused_parameters=True)
    assert ddp_strategy(mine, 8, 25.0) is mine and ddp_strategy("fsdp", 8, 25.0) == "fsdp"


def test_bad_cadences_and_bucket_are_one_line_before_anything_is_built(fit, capsys, monkeypatch):
    import resnet_lamb.model as model_mod

    monkeypatch.setattr(model_mod, "build_resnet", lambda *a, **k: 1 / 0)
    cases = [({"trainer.max_epochs": 3, "trainer.check_val_every_n_epoch": 2}, [],
              "trainer.check_val_every_n_epoch: 2 does not divide trainer.max_epochs 3; choose a divisor so that "
              "the last epoch is validated"),
             ({}, ["--run.checkpoint_every_n_epochs", "0"], "run.checkpoint_every_n_epochs: 0; must be an integer >= 1"),
             ({}, ["--run.ddp_bucket_mb", "-1"], "run.ddp_bucket_mb: -1.0; must be > 0")]
    for i, (over, args, line) in enumerate(cases):
        fit(tiny_recipe(None, **over), *args, name=f"v{i}", expect=2)
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1] == f"resnet-lamb: error: {line}", err


def test_torchrun_counts_gpus_with_torch_not_nvidia_smi(tmp_path, digits_root):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\nfor i in 0 1 2 3 4 5 6 7; do echo \"GPU $i: fake\"; done\n")
    (fake / "nvidia-smi").chmod(0o755)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(digits_root))
    env = {k: v for k, v in os.environ.items() if k not in ("NPROC", "WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(PATH=f"{fake}:{env['PATH']}", PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="0,1,2,3")
    p = subprocess.run(["bash", str(REPO / "launch" / "torchrun.sh"), str(recipe), "--trainer.devices", "2"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2
    assert "but torchrun starts NPROC x NNODES = 1 x 1 = 1 processes" in p.stderr, p.stderr  # torch sees no GPU


@pytest.fixture
def listener():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield s.getsockname()[1]


def test_wandb_check_goes_through_the_proxy(monkeypatch, listener):
    for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    server = "https://wandb.invalid"  # no such host: only reachable through the proxy
    assert _wandb_route(server) == ("wandb.invalid", 443)
    assert not _wandb_reachable(server, timeout=2)
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{listener}")
    assert _wandb_route(server) == ("127.0.0.1", listener)
    assert _wandb_reachable(server, timeout=2)
    monkeypatch.setenv("NO_PROXY", "localhost,.invalid")
    assert _wandb_route(server) == ("wandb.invalid", 443)
    assert not _wandb_reachable(server, timeout=2)
    monkeypatch.setenv("no_proxy", "")
    monkeypatch.delenv("NO_PROXY")
    monkeypatch.setenv("https_proxy", "http://proxy.example")  # lower case wins, port 80 by default
    assert _wandb_route(server) == ("proxy.example", 80)


def test_dali_threads_stay_on_the_processs_cpus():
    from resnet_lamb.data.dali_pipeline import thread_cpus

    assert thread_cpus(4, [0, 1, 2, 3, 4, 5, 6, 7], 8) == []  # unbound: DALI's default (CPUs near the GPU)
    assert thread_cpus(4, [8, 9, 10, 11, 12, 13], 32) == [8, 9, 10, 11]
    assert thread_cpus(5, [20, 21], 32) == [20, 21, 20, 21, 20]


# ---------------------------------------------------------------------------------- checkpoints
@pytest.fixture
def saves(monkeypatch):
    """(global step, file name) of every checkpoint write through the Trainer."""
    import lightning.pytorch as pl

    out = []
    real = pl.Trainer.save_checkpoint

    def save_checkpoint(self, filepath, *a, **k):
        out.append((self.global_step, os.path.basename(filepath)))
        return real(self, filepath, *a, **k)

    monkeypatch.setattr(pl.Trainer, "save_checkpoint", save_checkpoint)
    return out


def test_checkpoint_cadence_and_one_write_per_save(tmp_path, saves, one_thread):
    recipe = tiny_recipe(None, **{"trainer.max_epochs": 4, "trainer.check_val_every_n_epoch": 2,
                                  "model.arch": "mlp", "model.mlp_hidden": [32], "trainer.enable_progress_bar": False})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    common = ["fit", "--config", str(path), "--run.root", str(tmp_path / "runs"), "--run.wandb", "false"]
    assert run_cli(*common, "--run.name", "every") == 0
    # 3 steps per epoch; validation after epochs 2 and 4 (steps 6, 12); last.ckpt after every epoch;
    # a best is the same write: nothing else is written
    assert saves == [(3, "last.ckpt"), (6, "last.ckpt"), (9, "last.ckpt"), (12, "last.ckpt")], saves
    ck = tmp_path / "runs" / "every" / "checkpoints"
    best = [p for p in ck.iterdir() if p.name.startswith("best-")]
    assert len(best) == 1
    step = torch.load(best[0], map_location="cpu", weights_only=False)["global_step"]
    assert step in (6, 12)
    assert os.stat(best[0]).st_nlink == 1 + (step == 12)  # a hard link to last.ckpt while last is that save
    if step == 12:
        assert os.path.samefile(best[0], ck / "last.ckpt")
    assert sum(1 for r in read_csv(tmp_path / "runs" / "every") if r.get("val/top1")) == 2

    saves.clear()
    assert run_cli(*common, "--run.name", "sparse", "--run.checkpoint_every_n_epochs", "3") == 0
    assert saves == [(6, "last.ckpt"), (9, "last.ckpt"), (12, "last.ckpt")], saves  # best at 6, epoch 3, last

    # stopped after epoch 3 (no validation there; its last.ckpt written after its last step), resumed
    saves.clear()
    assert run_cli(*common, "--run.name", "resumed", "--trainer.max_steps", "9") == 0
    assert run_cli(*common, "--run.name", "resumed", "--ckpt_path", "last") == 0
    a = torch.load(ck / "last.ckpt", map_location="cpu", weights_only=False)
    b = torch.load(tmp_path / "runs" / "resumed" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert a["global_step"] == b["global_step"] == 12
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    assert sum(1 for r in read_csv(tmp_path / "runs" / "resumed") if r.get("val/top1")) == 2


def test_progress_bar_reads_metrics_once_per_step_cadence(tmp_path, monkeypatch):
    """Lightning's rich bar reads the logged metrics after every micro-batch (a host copy of each
    device tensor); ours after an optimizer step, every log_every_n_steps steps."""
    from lightning.pytorch.callbacks import RichProgressBar

    from resnet_lamb import telemetry

    reads = []
    real = RichProgressBar.get_metrics
    monkeypatch.setattr(RichProgressBar, "get_metrics",
                        lambda self, trainer, pl_module: reads.append(trainer.global_step) or real(self, trainer, pl_module))
    monkeypatch.setattr(telemetry, "progress_bar", lambda every=10, every_s=30.0: telemetry.StepRichProgressBar(every))
    recipe = tiny_recipe(None, **{"model.arch": "mlp", "model.mlp_hidden": [16], "data.micro_batch": 4,
                                  "trainer.log_every_n_steps": 2})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    assert run_cli("fit", "--config", str(path), "--run.root", str(tmp_path / "runs"), "--run.name", "p",
                   "--run.wandb", "false") == 0
    # 2 epochs x 3 steps, accumulation 8: 48 micro-batches; read at the first batch, then steps 2, 4, 6
    assert reads == [0, 2, 4, 6], reads
