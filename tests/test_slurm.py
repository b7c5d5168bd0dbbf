"""launch/slurm.sbatch on the CPU with ``srun`` and ``scontrol`` stubs (issue 14, item 4): SLURM's
SIGUSR1 to the batch script before the time limit reaches the worker through srun, torchrun.sh and
torchrun; the worker saves last.ckpt mid-epoch and exits; only then is the job requeued (the stub
``scontrol requeue`` copies last.ckpt as it is at that moment); the rendezvous port comes from the
job id; no process is left behind.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import torch

from conftest import REPO, tiny_recipe, write_recipe

SRUN = """#!/bin/bash
# stub: drop srun's options, run the task here (a real srun forwards signals to its tasks)
while [[ $# -gt 0 && $1 == --* ]]; do shift; done
exec "$@"
"""
SCONTROL = """#!/bin/bash
if [ "$1 $2" = "show hostnames" ]; then echo 127.0.0.1; exit 0; fi
echo "$*" >> "$STUB_LOG"
if [ "$1" = requeue ]; then cp "$RUN_DIR/checkpoints/last.ckpt" "$STUB_LOG.ckpt"; fi
"""


def _free_job_id() -> int:
    """A job id whose rendezvous port (15000 + id mod 15000) is free here."""
    for job in range(40000, 55000, 7):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 15000 + job % 15000))
                return job
            except OSError:
                continue
    raise RuntimeError("no free port")


def test_sbatch_requeues_after_the_workers_saved(tmp_path, digits_root_large):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(digits_root_large, **{"trainer.enable_progress_bar": False}))
    run = tmp_path / "runs" / "s"
    job = _free_job_id()
    env = {k: v for k, v in os.environ.items()
           if k not in ("NPROC", "NNODES", "NODE_RANK", "RDZV_ENDPOINT", "RDZV_ID", "RDZV_PORT", "WORLD_SIZE", "RANK")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", PYTHON=sys.executable, OMP_NUM_THREADS="1", WANDB_MODE="offline",
               SLURM_JOB_ID=str(job), SLURM_JOB_NODELIST="node0", SLURM_JOB_NUM_NODES="1", SLURM_NODEID="0",
               SLURM_SUBMIT_DIR=str(REPO), SLURM_CPUS_PER_TASK="1", NPROC="1", NUMA_BINDING="none",
               STUB_LOG=str(tmp_path / "scontrol.log"), RUN_DIR=str(run))
    proc = subprocess.Popen(["bash", str(REPO / "launch" / "slurm.sbatch"), str(recipe), "--run.root",
                             str(tmp_path / "runs"), "--run.name", "s", "--run.wandb", "false"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (run / "checkpoints" / "last.ckpt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@120 delivers
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"{out[-2000:]}\n{err[-3000:]}"
    assert f"rendezvous 127.0.0.1:{15000 + job % 15000}" in out
    assert (tmp_path / "scontrol.log").read_text().split("\n")[0] == f"requeue {job}"
    at_requeue = torch.load(tmp_path / "scontrol.log.ckpt", map_location="cpu", weights_only=False)
    assert at_requeue["global_step"] > 8 and at_requeue["epoch"] == 1, "requeued before the mid-epoch save"
    assert "stopped after optimizer step" in err
    leftover = subprocess.run(["pgrep", "-f", str(recipe)], capture_output=True, text=True).stdout.split()
    assert not leftover, f"processes left behind: {leftover}"
