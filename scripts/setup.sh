#!/usr/bin/env bash
# Create (or update) .venv with the CPU torch pinned and the three packages editable.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade "pip>=25.1"
# Torch first, from the pinned CPU build: a bare `torch` would resolve a multi-GB CUDA wheel.
.venv/bin/python -m pip install -q -c constraints.txt "torch==2.13.0"
# The packages name shared-dist by version (as on an index); installing the checkout's
# shared-dist in the same command satisfies that requirement with the editable copy.
.venv/bin/python -m pip install -q -c constraints.txt \
    -e packages/shared-dist -e packages/rrcm-diffusers -e packages/conan-st --group dev
