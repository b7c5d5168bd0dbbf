#!/usr/bin/env bash
# Checks a GPU machine before the first real run: LAMB/LARS compiled vs eager on CUDA and their step
# time, DALI decode speed and leaks over 3 epochs, a 200-step ResNet-50 fit beside NVIDIA's published
# A100 figure, a DALI fit stopped by SIGUSR1 and resumed (checked exact), 1xN vs Nx1 with N GPUs.
# At most 8 minutes on one GPU; on a machine without one it runs what can run and lists what it
# skipped. Last line: one JSON object. Exit status 0 when every check that ran held.
#
#   bash scripts/gpu_check.sh [--only optim,dali_decode,resnet50_fit,dali_fit_resume,ddp_equivalence]
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python}
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then py=.venv/bin/python; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE="${WANDB_MODE:-offline}" WANDB_SILENT=true
exec "$py" scripts/gpu_check.py "$@"
