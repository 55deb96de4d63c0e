#!/usr/bin/env bash
# The GPU check for rrcm-diffusers (never part of CI). Two steps:
#   1. here, once per session:  bash scripts/gpu_check.sh --download
#      (puts the wheels the GPU image lacks into .whl/, which git ignores)
#   2. with the device tool:    run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=540)
# The GPU machine has no network: its python3 brings torch (CUDA), accelerate, scipy, safetensors,
# pluggy, pyyaml, tqdm and pytest; diffusers (and what it needs beyond those) comes from .whl/.
# Dry run on a CPU machine: PYTHON=.venv/bin/python DEVICE=cpu QUICK=1 bash scripts/gpu_check.sh
# Prints the CUDA tests' result and benchmarks/gpu_check.py's figures (JSON lines, also in $OUT).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--download" ]; then
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "diffusers==0.42.1" importlib_metadata zipp
    ls -la .whl
    exit 0
fi
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
$PY -m pip install -q --no-index --find-links .whl diffusers 2>&1 | tail -3
export PYTHONPATH="$PWD/packages/shared-dist/src:$PWD/packages/rrcm-diffusers/src:$PWD"
export RRCM_DISABLE_PLUGIN_AUTOLOAD=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'diffusers', diffusers.__version__)"
# 1. the device tests: CUDA ones run here (they are skipped on CPU-only machines)
$PY -m pytest -q -p no:cacheprovider -rs tests/rrcm/test_device.py tests/rrcm/test_certification.py 2>&1 \
    | tee "$OUT/pytest.txt" | tail -15
# 2. speed (steps/s, samples/s, TFLOP/s vs the bf16 peak) and bf16 vs fp32 certificates
timeout 420 $PY benchmarks/gpu_check.py --device "${DEVICE:-cuda}" ${QUICK:+--quick} 2>&1 | grep -v "it/s" | tee "$OUT/gpu_check.jsonl"
