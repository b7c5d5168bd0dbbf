#!/usr/bin/env bash
# Idempotent setup: a virtual environment in .venv with the package, DALI and the test tools.
# torch 2.14.1 / torchvision 0.29.1 come from this machine's local wheels through plain pip
# (uv and poetry do not look there). Fashion-MNIST comes from Debian's dataset-fashion-mnist.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.resnet-lamb-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    # This machine's pip config names local index folders that lack some packages; pip says so
    # once per package. Those lines are noise; everything else pip prints stays.
    .venv/bin/pip install -q --disable-pip-version-check -e '.[dali,test]' 2>&1 \
        | { grep -v "is ignored: it is neither a file nor a directory" || true; }
    touch "$stamp"
fi
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "setup: apt-get install dataset-fashion-mnist (Debian's Fashion-MNIST, the demo's data; output hidden)" >&2
    (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
        || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1)) \
        || echo "setup: Debian's dataset-fashion-mnist could not be installed; the demo falls back to scikit-learn digits" >&2
fi
