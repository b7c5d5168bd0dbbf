#!/usr/bin/env bash
# The README's test command: set up, lint and type-check resnet_lamb/, then run the whole suite on the CPU,
# one test file per worker process, as many workers as CPUs (pytest-xdist; -n 0 runs in this process).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check resnet_lamb
.venv/bin/ruff format --check resnet_lamb
.venv/bin/mypy
export WANDB_MODE=offline WANDB_SILENT=true
exec .venv/bin/python -m pytest -q -n auto --dist loadfile --durations=10 "$@"
