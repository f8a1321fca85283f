"""The CUDA kernel of coef_grad (csrc/cuda/coef_grad.cu) against the CPU kernel, bit for bit.

Same backends and fixtures as tests/test_cuda_ops.py: the real CUDA op when a GPU is visible, else
calm_fast._C_emu (the same .cu compiled with the CPU emulator).  Both follow the summation order of
csrc/common/coef_grad.h, so the [T, L] results must be identical (NaN == NaN).  Mixed-size lists (empty,
1-element, odd, around the 1024-element block, enough blocks for grid-stride loops), fp32 / bf16 / fp16
inputs, fp32 or input-dtype grads, with and without base, trim (>= and strict), bool and packed masks,
inf / NaN; 1 SM and permuted / reversed thread and block orders.  ``test_small_coef_grad`` is the quick
case for the sanitizer run of benchmarks/gpu_check.sh.
"""
from __future__ import annotations

import pytest
import torch

import calm_fast._C  # noqa: F401  (CPU ops: torch.ops.calm_fast.*)
from calm_fast import ops
from test_coef_grad import make_case, random_masks, thresholds_for
from test_cuda_ops import assert_same, backend, emu_env, to_dev  # noqa: F401

CPU = torch.ops.calm_fast
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DT_IDS = ["f32", "bf16", "f16"]
# 8 warps (blocks) per CUDA block; 4 emulated SMs x 8 CUDA blocks = 256 warps in the grid: 70001 + 40000
# elements are ~108 blocks, so grid-stride happens under CALM_FAST_EMU_SMS=1 (64 warps).
SIZES = [0, 1, 7, (3, 11), 1023, 1024, 1025, 5000, 40000, 70001]


def _both(backend, grads, inputs, base, T, thr=None, strict=False, masks=None):
    want = CPU.coef_grad(grads, inputs, base or [], T, thr, strict, masks or [])
    got = backend.ops.coef_grad(to_dev(grads, backend), to_dev(inputs, backend), to_dev(base or [], backend), T,
                                to_dev(thr, backend), strict, to_dev(masks or [], backend))
    assert_same(got, want, "coef_grad")
    return want


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("with_base", [True, False], ids=["base", "taus"])
def test_coef_grad(backend, emu_env, dtype, with_base, gen):
    T = 3
    grads, inputs, base = make_case(gen, T, SIZES, dtype, with_base)
    _both(backend, grads, inputs, base, T)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("strict", [False, True], ids=["ge", "gt"])
def test_coef_grad_trim_input_dtype_grads(backend, dtype, strict, gen):
    T = 4
    grads, inputs, base = make_case(gen, T, [1, 33, 1025, 5000], dtype, True, grad_dtype=dtype)
    thr = thresholds_for(inputs, base, T)
    _both(backend, grads, inputs, base, T, thr, strict)


@pytest.mark.parametrize("packed", [False, True], ids=["bool", "packed"])
def test_coef_grad_masks(backend, emu_env, packed, gen):
    T = 2
    grads, inputs, base = make_case(gen, T, [7, (3, 11), 1030, 4099], torch.bfloat16, False)
    masks = random_masks(gen, inputs, packed)
    _both(backend, grads, inputs, base, T, thresholds_for(inputs, base, T, q=0.2), False, masks)


def test_coef_grad_nonfinite_and_empty(backend, gen):
    T = 2
    grads, inputs, base = make_case(gen, T, [40, 2000, 9, 0], torch.float32, True)
    inputs[1][5] = float("inf")
    inputs[2 * 4 - 2][2] = float("nan")
    grads[0][3] = float("inf")
    out = _both(backend, grads, inputs, base, T)
    assert torch.isnan(out).any() and torch.isinf(out).any()
    grads, inputs, base = make_case(gen, T, [0, 0], torch.float32, True)
    _both(backend, grads, inputs, base, T)


def test_small_coef_grad(backend, gen):
    T = 3
    grads, inputs, base = make_case(gen, T, [5, 1030, 64], torch.bfloat16, True)
    _both(backend, grads, inputs, base, T, thresholds_for(inputs, base, T), True, random_masks(gen, inputs, True))


def test_coef_grad_wrapper_on_device(backend, gen):
    """ops.coef_grad (the Python wrapper) on the backend's device returns the CPU op's bits (real GPU only:
    the emulated ops live in their own namespace)."""
    if backend.name != "cuda":
        pytest.skip("the wrapper dispatches to torch.ops.calm_fast on a real GPU only")
    T = 2
    grads, inputs, base = make_case(gen, T, [100, 3000], torch.float32, True)
    want = CPU.coef_grad(grads, inputs, base, T, None, False, [])
    got = ops.coef_grad(to_dev(grads, backend), to_dev(inputs, backend), to_dev(base, backend), T)
    assert_same(got, want, "wrapper")
