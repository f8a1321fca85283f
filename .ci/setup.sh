#!/usr/bin/env bash
# Idempotent set-up on a fresh machine (the README's two commands start with it):
#   .venv with torch 2.14.1, the test tools and the model-adapter extras (transformers, open_clip_torch;
#   torchvision pinned to the release made for torch 2.14.1, in the same command so torch is not changed),
#   then calm_fast built in place: CPU kernels always, CUDA kernels when nvcc is found (no GPU needed to
#   compile), and the emulated-CUDA test module.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check \
    torch==2.14.1 torchvision==0.29.1 ninja numpy safetensors tqdm pyyaml pytest pytest-benchmark hypothesis \
    "transformers>=4.56" "open_clip_torch>=2.24"
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
export CALM_FAST_BUILD_EMU=${CALM_FAST_BUILD_EMU:-1} MAX_JOBS=${MAX_JOBS:-2}
.venv/bin/python -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
.venv/bin/python -c "import calm_fast; print('calm_fast', calm_fast.__version__, '|', calm_fast.build_info())"
