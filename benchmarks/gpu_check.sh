#!/usr/bin/env bash
# One-command GPU check for any machine with an NVIDIA GPU (none exists in development or CI).
#
#   bash benchmarks/gpu_check.sh            # build, test, sanitize, benchmark; writes benchmarks/results/
#   bash benchmarks/gpu_check.sh --dry-run  # print every step without running anything
#
# Steps: (1) device facts; (2) build calm_fast against THIS machine's torch with CUDA kernels forced on
# (never reuse a .so built elsewhere); (3) the whole test-suite, CUDA tests on the real GPU;
# (4) compute-sanitizer memcheck and racecheck over a small CUDA test subset; (5) the benchmark report on
# the GPU (copy bandwidth, each kernel's time, GB/s against the bytes-moved model, % of copy bandwidth,
# speed-up over the torch reference on the same GPU) in fp32 and bf16, and the AdaMerging step benchmark
# (weighted_merge + coef_grad vs plain torch autograd).  Budget: < 10 minutes on an H100.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
STAMP=$(date -u +%Y-%m-%d)
OUTDIR=${GPU_CHECK_OUT:-benchmarks/results}
LOG="$OUTDIR/gpu_check_${STAMP}.log"
FAILED=0

step() {  # step "description" command...
    local what="$1"; shift
    echo "==> $what"
    echo "    \$ $*"
    [ "$DRY" = 1 ] && return 0
    if ! "$@" 2>&1 | tee -a "$LOG"; then echo "!! step failed: $what" | tee -a "$LOG"; FAILED=1; fi
}

[ "$DRY" = 1 ] || { mkdir -p "$OUTDIR"; : > "$LOG"; }
step "device facts" bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv && $PY -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())'"
step "build against this machine's torch (CUDA kernels forced on)" \
    env CALM_FAST_CUDA=1 CALM_FAST_BUILD_EMU=1 MAX_JOBS=${MAX_JOBS:-16} $PY -m pip install -q --no-build-isolation --no-deps -e .
step "whole test-suite (CUDA tests on the GPU)" $PY -m pytest -q -x
step "compute-sanitizer memcheck (small CUDA subset)" \
    compute-sanitizer --tool memcheck --error-exitcode 1 $PY -m pytest -q -x tests/test_cuda_ops.py tests/test_cuda_calm_ops.py tests/test_cuda_doge_ops.py tests/test_cuda_coef_grad_ops.py -k "small"
step "compute-sanitizer racecheck (small CUDA subset)" \
    compute-sanitizer --tool racecheck --error-exitcode 1 $PY -m pytest -q -x tests/test_cuda_ops.py tests/test_cuda_calm_ops.py tests/test_cuda_doge_ops.py tests/test_cuda_coef_grad_ops.py -k "small"
step "benchmarks fp32 (ViT-B/32 size, T=8)" \
    $PY benchmarks/report.py --device cuda --n 88000000 --ref-n 88000000 --repeat 10 --ref-repeat 3 \
        --out "$OUTDIR/gpu_float32_${STAMP}.json"
step "benchmarks bf16 (ViT-L/14 size, T=8)" \
    $PY benchmarks/report.py --device cuda --dtype bfloat16 --n 304000000 --ref-n 88000000 --repeat 10 \
        --out "$OUTDIR/gpu_bfloat16_${STAMP}.json"
step "AdaMerging step benchmark (88M, T=8: weighted_merge + coef_grad vs plain torch autograd)" \
    $PY benchmarks/bench_adamerging_step.py --device cuda --threads 1 --reps 10 \
        --out "$OUTDIR/adamerging_step_gpu_float32_${STAMP}.json"
if [ "$DRY" = 1 ]; then echo "(dry run: nothing was executed)"; exit 0; fi
echo "log: $LOG; results: $OUTDIR/gpu_*_${STAMP}.json"
exit $FAILED
