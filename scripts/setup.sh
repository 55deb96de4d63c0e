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
# Torch first, the CPU build. Where pip serves only the public index, `torch==2.13.0` resolves to a
# CUDA build with ~20 nvidia-* packages (several GB): ask pip what it WOULD install, and on a machine
# without a GPU take PyTorch's documented CPU wheel index instead (a quick fallback to the default
# when that index cannot be reached). Then say what was installed.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    report=$(mktemp)
    .venv/bin/python -m pip install -q -c constraints.txt --dry-run --ignore-installed --report "$report" "torch==2.13.0"
    if grep -q '"name": "nvidia-' "$report" && ! command -v nvidia-smi >/dev/null; then
        echo "setup: the default index offers a CUDA build of torch and this machine has no GPU;" \
             "installing the CPU build from PyTorch's CPU index" >&2
        # pip's own errors for an unreachable index end in "ResolutionImpossible", which reads like a
        # failed setup: keep them in a file and say in one line what happened and what comes next
        index=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu} errors=$(mktemp)
        .venv/bin/python -m pip install -q --timeout 20 --retries 1 --index-url "$index" "torch==2.13.0" 2>"$errors" \
            || { reason=$(grep -m1 -oE "Failed to resolve '[^']+'|No matching distribution[^:]*" "$errors" \
                          || grep -m1 "^ERROR" "$errors" || echo "pip failed")
                 echo "setup: no torch 2.13.0 from $index ($reason); installing the default build" >&2
                 .venv/bin/python -m pip install -q -c constraints.txt "torch==2.13.0"; }
        rm -f "$errors"
    else
        .venv/bin/python -m pip install -q -c constraints.txt "torch==2.13.0"
    fi
    rm -f "$report"
fi
# -W: a CUDA build warns on import that numpy (installed next) is missing
.venv/bin/python -W ignore::UserWarning -c "import torch; print(f'setup: torch {torch.__version__}', 'CPU build' if torch.version.cuda is None else f'CUDA {torch.version.cuda} build')"
# The packages name shared-dist by version (as on an index); installing the checkout's
# shared-dist in the same command satisfies that requirement with the editable copy.
.venv/bin/python -m pip install -q -c constraints.txt \
    -e packages/shared-dist -e "packages/rrcm-diffusers[plot]" -e "packages/conan-st[mteb,faiss]" --group dev
