#!/usr/bin/env bash
# Quick start, command 1: set up .venv and run the main job (both methods end to end on real
# data) into reports/latest. Arguments go to examples/main_job.py, e.g. --quick, --overwrite,
# --out DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python examples/main_job.py "$@"
