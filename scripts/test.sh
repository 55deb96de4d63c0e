#!/usr/bin/env bash
# Quick start, command 2: set up .venv and run the fast test suite (1.5-4 min on 2 cores: Intel Xeon 1.4, AMD EPYC 3.7 min).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow` for the slow tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# No arguments: the fast suite on 2 pytest-xdist workers (one thread each: tests/conftest.py), each test
# file on one worker, so a file's one launch per world size is shared by its tests (350 s -> 268 s
# measured on 2 cores), the longest files first (tests/conftest.py; xdist's own reorder, by number of
# tests, sent them last). With arguments, exactly what you give (serial unless you add -n).
if [ "$#" -eq 0 ]; then set -- -m "not slow" -n "${TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder; fi
exec .venv/bin/python -m pytest "$@"
