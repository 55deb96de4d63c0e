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
# shared-dist editable first; the other two then name it by version (SHARED_DIST_BY_NAME),
# not by path, so pip keeps the editable install instead of replacing it with a copy.
.venv/bin/python -m pip install -q -c constraints.txt -e packages/shared-dist
SHARED_DIST_BY_NAME=1 .venv/bin/python -m pip install -q -c constraints.txt \
    -e packages/rrcm-diffusers -e packages/conan-st --group dev
