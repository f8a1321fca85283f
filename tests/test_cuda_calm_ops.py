"""The CUDA kernels of the CALM ops (csrc/cuda/calm.cu) against the CPU kernels, bit for bit.

Same backends, fixtures and comparisons as tests/test_cuda_ops.py (imported from it): the real CUDA
ops when a GPU is visible, else calm_fast._C_emu (the same .cu compiled with the CPU emulator).  The
expected result is always the CPU op on the same inputs: outputs, the in-place R / A / theta and the
counts must be identical (floats by bit pattern, NaN == NaN).  The sizes make grid-stride loops, tail
chunks, empty tensors and tensors smaller than a chunk all occur; some cases are repeated with 1 SM and
with permuted / reversed thread and block orders (``emu_env``).  ``test_small_calm_*`` are the quick
cases benchmarks/gpu_check.sh runs under compute-sanitizer (``-k small``).
"""
from __future__ import annotations

import math

import pytest
import torch

import calm_fast._C  # noqa: F401  (CPU ops: torch.ops.calm_fast.*)
from test_cuda_ops import (SIZES, _gen, _numel, _shape, assert_same, assert_same_list, backend,  # noqa: F401
                           emu_env, to_dev)

CPU = torch.ops.calm_fast
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DT_IDS = ["f32", "bf16", "f16"]
MODES = ["fused", "faithful", "round"]


# ----------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------
def logits(g, sizes, *, nonfinite=False):
    """fp32 mask logits: N(0, 36), the init values +-5, exact +-0, the round-half boundary region
    (|R| ~ 1e-7, where the mask is decided by the last bit of sigma), +-huge, optional inf/NaN."""
    out = []
    for s in sizes:
        n = _numel(s)
        r = torch.randn(n, generator=g) * 6
        u = torch.rand(n, generator=g)
        r[u < 0.1] = 5.0
        r[(u >= 0.1) & (u < 0.2)] = -5.0
        r[(u >= 0.2) & (u < 0.25)] = 0.0
        r[(u >= 0.25) & (u < 0.27)] = -0.0
        sel = (u >= 0.27) & (u < 0.32)
        r[sel] = torch.randn(int(sel.sum()), generator=g) * 1.5e-7
        r[(u >= 0.32) & (u < 0.34)] = 200.0
        r[(u >= 0.34) & (u < 0.36)] = -95.0
        if nonfinite and n >= 5:
            r[n // 5], r[2 * n // 5], r[3 * n // 5] = float("inf"), -float("inf"), float("nan")
        out.append(r.reshape(_shape(s)))
    return out


def values(g, sizes, dtype, scale=1e-2, *, nonfinite=False):
    out = []
    for s in sizes:
        x = torch.randn(_numel(s), generator=g) * scale
        if nonfinite and x.numel() >= 7:
            x[x.numel() // 7] = float("nan")
            x[2 * x.numel() // 7] = float("inf")
        out.append(x.to(dtype).reshape(_shape(s)))
    return out


def _clone(xs):
    return [x.clone() for x in xs]


# ----------------------------------------------------------------------------------------------------
# Runners: the op on the backend and on the CPU, compared
# ----------------------------------------------------------------------------------------------------
def _interpolate(backend, base, prev, new, R, mode, out_float):
    want = CPU.calm_interpolate(base, prev, new, R, mode, out_float)
    got = backend.ops.calm_interpolate(to_dev(base, backend), to_dev(prev, backend), to_dev(new, backend),
                                       to_dev(R, backend), mode, out_float)
    assert_same_list(got, want, f"theta ({mode})")


def _accumulate(backend, A, grads, prev, new, eta, faithful):
    """Several batches into the same A (on both sides); returns the CPU result."""
    A_cpu, A_dev = _clone(A), to_dev(_clone(A), backend)
    for grad in grads:
        CPU.calm_accumulate_(A_cpu, grad, prev, new, eta, faithful)
        backend.ops.calm_accumulate_(A_dev, to_dev(grad, backend), to_dev(prev, backend), to_dev(new, backend), eta,
                                     faithful)
    assert_same_list(A_dev, A_cpu, "A")
    return A_cpu


def _mask_step(backend, R, A, alpha, faithful, theta_dtype, base, prev, new, mode):
    theta_cpu = [torch.empty(r.shape, dtype=theta_dtype) for r in R] if theta_dtype is not None else []
    R_cpu, A_cpu = _clone(R), _clone(A)
    R_dev, A_dev, theta_dev = to_dev(_clone(R), backend), to_dev(_clone(A), backend), to_dev(_clone(theta_cpu), backend)
    want = CPU.calm_mask_step_(R_cpu, A_cpu, alpha, faithful, theta_cpu, base, prev, new, mode)
    got = backend.ops.calm_mask_step_(R_dev, A_dev, alpha, faithful, theta_dev, to_dev(base, backend),
                                      to_dev(prev, backend), to_dev(new, backend), mode)
    assert_same_list(R_dev, R_cpu, "R")
    assert_same_list(A_dev, A_cpu, "A")
    assert_same_list(theta_dev, theta_cpu, "theta")
    assert_same(got, want, "counts (on, flipped)")
    return R_cpu, want


def _binarize(backend, prev, new, R):
    want, want_count = CPU.calm_binarize_merge(prev, new, R)
    got, count = backend.ops.calm_binarize_merge(to_dev(prev, backend), to_dev(new, backend), to_dev(R, backend))
    assert_same_list(got, want, "tau_next")
    assert_same(count, want_count, "count")
    return want_count


# ----------------------------------------------------------------------------------------------------
# calm_interpolate
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("with_base", [True, False], ids=["base", "nobase"])
@pytest.mark.parametrize("out_float", [False, True], ids=["out_dflt", "out_f32"])
def test_calm_interpolate(backend, mode, dtype, with_base, out_float):
    g = _gen(200 + MODES.index(mode))
    R = logits(g, SIZES, nonfinite=True)
    base = values(g, SIZES, dtype, 1.0) if with_base else []
    _interpolate(backend, base, values(g, SIZES, dtype, nonfinite=True), values(g, SIZES, dtype), R, mode, out_float)


@pytest.mark.parametrize("dts", [(torch.bfloat16, torch.float32, torch.float32),
                                 (torch.float32, torch.bfloat16, torch.float16),
                                 (torch.float16, torch.float32, torch.bfloat16)], ids=["a", "b", "c"])
@pytest.mark.parametrize("mode", MODES)
def test_calm_interpolate_mixed_dtypes(backend, dts, mode):
    g = _gen(210)
    R = logits(g, SIZES)
    _interpolate(backend, values(g, SIZES, dts[0], 1.0), values(g, SIZES, dts[1]), values(g, SIZES, dts[2]), R,
                 mode, False)
    _interpolate(backend, [], values(g, SIZES, dts[1]), values(g, SIZES, dts[2]), R, mode, False)


def test_calm_interpolate_emulator_settings(backend, emu_env):
    g = _gen(220)
    sizes = [1, 1025, 40000, (3, 11)]
    for mode in MODES:
        _interpolate(backend, values(g, sizes, torch.bfloat16, 1.0), values(g, sizes, torch.float32),
                     values(g, sizes, torch.float32), logits(g, sizes), mode, False)


# ----------------------------------------------------------------------------------------------------
# calm_accumulate_
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("faithful", [False, True], ids=["default", "faithful"])
@pytest.mark.parametrize("grad_dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("tau_dtype", DTYPES, ids=DT_IDS)
def test_calm_accumulate(backend, faithful, grad_dtype, tau_dtype):
    g = _gen(300)
    A = values(g, SIZES, torch.float32, 1.0)
    grads = [values(g, SIZES, grad_dtype, 1e-4, nonfinite=(b == 1)) for b in range(3)]
    _accumulate(backend, A, grads, values(g, SIZES, tau_dtype), values(g, SIZES, torch.float32), 1e7, faithful)


def test_calm_accumulate_emulator_settings(backend, emu_env):
    g = _gen(310)
    sizes = [7, 1024, 40001]
    A = values(g, sizes, torch.float32, 1.0)
    grads = [values(g, sizes, torch.bfloat16, 1e-4) for _ in range(2)]
    _accumulate(backend, A, grads, values(g, sizes, torch.bfloat16), values(g, sizes, torch.bfloat16), 1e7, True)


# ----------------------------------------------------------------------------------------------------
# calm_mask_step_
# ----------------------------------------------------------------------------------------------------
REWRITES = [("none", "fused")] + [(w, m) for w in ("base", "nobase") for m in MODES]


@pytest.mark.parametrize("faithful", [False, True], ids=["default", "faithful"])
@pytest.mark.parametrize("rewrite,mode", REWRITES, ids=[f"{w}-{m}" for w, m in REWRITES])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_calm_mask_step(backend, faithful, rewrite, mode, dtype):
    g = _gen(400 + faithful)
    R = logits(g, SIZES, nonfinite=True)
    A = values(g, SIZES, torch.float32, 3.0, nonfinite=True)
    theta_dtype = None if rewrite == "none" else dtype
    base = values(g, SIZES, dtype, 1.0) if rewrite == "base" else []
    prev = values(g, SIZES, dtype) if rewrite != "none" else []
    new = values(g, SIZES, torch.float32) if rewrite != "none" else []
    _, counts = _mask_step(backend, R, A, 1.0, faithful, theta_dtype, base, prev, new, mode)
    assert int(counts[0]) > 0 and int(counts[1]) > 0  # the case exercises both counters


def test_calm_mask_step_emulator_settings(backend, emu_env):
    g = _gen(410)
    sizes = [1, 5000, 40000, (17, 19)]
    R = logits(g, sizes)
    A = values(g, sizes, torch.float32, 3.0)
    _mask_step(backend, R, A, 0.5, True, torch.bfloat16, values(g, sizes, torch.bfloat16, 1.0),
               values(g, sizes, torch.float32), values(g, sizes, torch.float32), "faithful")


def test_calm_training_loop(backend):
    """A few iterations of the CALM loop (interpolate, accumulate 2 batches, step with theta rewrite,
    binarize) on both sides: the states stay bitwise identical throughout."""
    g = _gen(420)
    sizes = [333, 4100, (20, 31)]
    prev, new = values(g, sizes, torch.float32), values(g, sizes, torch.float32)
    base = values(g, sizes, torch.bfloat16, 1.0)
    R = [torch.where(torch.rand(_shape(s), generator=g) < 0.3, 5.0, -5.0) for s in sizes]
    for it in range(3):
        _interpolate(backend, base, prev, new, R, "fused", False)
        A = [torch.zeros(_shape(s)) for s in sizes]
        grads = [values(g, sizes, torch.float32, 1e-6) for _ in range(2)]
        A = _accumulate(backend, A, grads, prev, new, 1e7, False)
        R, _ = _mask_step(backend, R, A, 1.0, False, torch.bfloat16, base, prev, new, "fused")
    _binarize(backend, prev, new, R)


# ----------------------------------------------------------------------------------------------------
# calm_binarize_merge
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dts", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                 (torch.float16, torch.float16), (torch.bfloat16, torch.float32),
                                 (torch.bfloat16, torch.float16)], ids=["f32", "bf16", "f16", "bf16+f32", "bf16+f16"])
def test_calm_binarize_merge(backend, dts):
    g = _gen(500)
    R = logits(g, SIZES, nonfinite=True)
    count = _binarize(backend, values(g, SIZES, dts[0], nonfinite=True), values(g, SIZES, dts[1], nonfinite=True), R)
    assert int(count) > 0


def test_calm_binarize_merge_emulator_settings(backend, emu_env):
    g = _gen(510)
    sizes = [3, 2048, 40000]
    _binarize(backend, values(g, sizes, torch.bfloat16), values(g, sizes, torch.bfloat16), logits(g, sizes))


# ----------------------------------------------------------------------------------------------------
# Edge cases
# ----------------------------------------------------------------------------------------------------
def test_calm_empty_tensors(backend):
    e = [torch.empty(0), torch.empty(0, 4)]
    _interpolate(backend, _clone(e), _clone(e), _clone(e), _clone(e), "fused", False)
    _accumulate(backend, _clone(e), [_clone(e)], _clone(e), _clone(e), 1.0, False)
    _mask_step(backend, _clone(e), _clone(e), 1.0, False, torch.float32, _clone(e), _clone(e), _clone(e), "round")
    _binarize(backend, _clone(e), _clone(e), _clone(e))


def test_calm_rejects_bad_arguments(backend):
    R = to_dev([torch.zeros(4), torch.zeros(3)], backend)
    t = to_dev([torch.zeros(4), torch.zeros(3)], backend)
    with pytest.raises(RuntimeError, match=r"tau_new\[1\] has shape \[4\] but R\[1\] has shape \[3\]"):
        backend.ops.calm_binarize_merge(t, to_dev([torch.zeros(4), torch.zeros(4)], backend), R)
    with pytest.raises(RuntimeError, match=r"A\[0\] must be float32"):
        backend.ops.calm_mask_step_(R, to_dev([torch.zeros(4).half(), torch.zeros(3)], backend), 1.0, False, [], [],
                                    [], [], "fused")
    with pytest.raises(RuntimeError, match=r"R\[0\] shares memory with A\[0\]"):
        backend.ops.calm_mask_step_(R, [R[0], t[1]], 1.0, False, [], [], [], [], "fused")
    with pytest.raises(RuntimeError, match=r"mode must be"):
        backend.ops.calm_interpolate([], t, t, R, "sigmoid", False)


# ----------------------------------------------------------------------------------------------------
# "small": one quick case of every CALM kernel for compute-sanitizer (benchmarks/gpu_check.sh, -k small)
# ----------------------------------------------------------------------------------------------------
SMALL_SIZES = [1, 33, (3, 5), 1025, 4500]


def test_small_calm_interpolate(backend):
    g = _gen(600)
    _interpolate(backend, values(g, SMALL_SIZES, torch.bfloat16, 1.0), values(g, SMALL_SIZES, torch.float32),
                 values(g, SMALL_SIZES, torch.float16), logits(g, SMALL_SIZES, nonfinite=True), "faithful", False)


def test_small_calm_accumulate(backend):
    g = _gen(601)
    _accumulate(backend, values(g, SMALL_SIZES, torch.float32, 1.0), [values(g, SMALL_SIZES, torch.bfloat16, 1e-4)],
                values(g, SMALL_SIZES, torch.float32), values(g, SMALL_SIZES, torch.float32), 1e7, False)


def test_small_calm_mask_step(backend):
    g = _gen(602)
    _mask_step(backend, logits(g, SMALL_SIZES), values(g, SMALL_SIZES, torch.float32, 3.0), 1.0, False,
               torch.bfloat16, values(g, SMALL_SIZES, torch.bfloat16, 1.0), values(g, SMALL_SIZES, torch.float32),
               values(g, SMALL_SIZES, torch.float32), "fused")


def test_small_calm_binarize_merge(backend):
    g = _gen(603)
    _binarize(backend, values(g, SMALL_SIZES, torch.float32), values(g, SMALL_SIZES, torch.bfloat16),
              logits(g, SMALL_SIZES))


def test_calm_repeatable(backend):
    g = _gen(700)
    sizes = [5, 3000, 9000]
    R, A = logits(g, sizes), values(g, sizes, torch.float32, 3.0)
    prev, new = values(g, sizes, torch.float32), values(g, sizes, torch.float32)
    runs = []
    for _ in range(2):
        Rd, Ad = to_dev(_clone(R), backend), to_dev(_clone(A), backend)
        th = to_dev([torch.empty(_shape(s)) for s in sizes], backend)
        c = backend.ops.calm_mask_step_(Rd, Ad, 1.0, False, th, [], to_dev(prev, backend), to_dev(new, backend),
                                        "fused")
        runs.append(([x.cpu() for x in Rd], [x.cpu() for x in th], c.cpu()))
    assert_same_list(runs[0][0], runs[1][0], "R")
    assert_same_list(runs[0][1], runs[1][1], "theta")
    assert_same(runs[0][2], runs[1][2], "counts")
    assert not math.isnan(float(runs[0][0][1].sum()))
