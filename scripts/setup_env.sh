#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install everything into it.
# torch is pinned first: an unpinned torch would pull a multi-GB CUDA build on CPU machines.
# Override with TORCH_SPEC (e.g. TORCH_SPEC="torch" on a GPU node) or PYTHON=python3.11.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    echo "[setup] installing $TORCH_SPEC"
    .venv/bin/pip install -q "$TORCH_SPEC"
fi
if ! .venv/bin/python -c "import guided_diffusion, evaluations, mpi4py, pytest, scipy, tqdm, PIL, matplotlib" 2>/dev/null \
   || [ ! -x .venv/bin/mpiexec ]; then
    echo "[setup] installing sag-adm and its dependencies"
    .venv/bin/pip install -q -e ".[test]"
fi
