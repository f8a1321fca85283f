"""The CUDA kernels of DOGE_TA (csrc/cuda/doge.cu) against the CPU kernels, bit for bit.

Same backends and fixtures as tests/test_cuda_ops.py: the real CUDA ops when a GPU is visible, else
calm_fast._C_emu (the same .cu compiled with the CPU emulator).  Row counts that are not multiples of
the 8 rows of a block, rows shorter and longer than a warp, grid-stride loops (1 SM), permuted and
reversed thread orders; fp32 and fp64.  ``test_small_doge_*`` are quick cases for the sanitizer run.
"""
from __future__ import annotations

import pytest
import torch

import calm_fast._C  # noqa: F401  (CPU ops: torch.ops.calm_fast.*)
from calm_fast import ops
from test_cuda_ops import assert_same, backend, emu_env, to_dev  # noqa: F401
from test_doge_ops import make_case

CPU = torch.ops.calm_fast
DTYPES = [torch.float32, torch.float64]


def _row_grad_both(backend, tau, delta, e, lam_sum):
    want = torch.full_like(delta, float("nan"))
    want_loss = CPU.doge_row_grad_(want, tau, delta, e, lam_sum)
    got = to_dev(torch.full_like(delta, float("nan")), backend)
    got_loss = backend.ops.doge_row_grad_(got, *to_dev([tau, delta, e, lam_sum], backend))
    assert_same(got, want, "grad")
    assert_same(got_loss, want_loss, "loss")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 5, 31), (3, 8, 7, 33), (1, 2, 19, 70), (2, 3, 0, 4),
                                   (2, 2, 3, 0)], ids=lambda s: "x".join(map(str, s)))
def test_doge_row_grad(backend, emu_env, shape, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    _row_grad_both(backend, *make_case(g, *shape, dtype)[:4])


def test_small_doge_row_grad(backend):
    g = torch.Generator().manual_seed(1)
    _row_grad_both(backend, *make_case(g, 2, 3, 9, 40, torch.float32)[:4])


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_doge_adam(backend, emu_env, dtype):
    g = torch.Generator().manual_seed(7)
    n = 3001
    state = [torch.randn(n, generator=g, dtype=dtype), torch.randn(n, generator=g, dtype=dtype) * 1e-3,
             torch.rand(n, generator=g, dtype=dtype) * 1e-6]
    for step in (1, 2, 399):
        grad = torch.randn(n, generator=g, dtype=dtype) * 1e-3
        grad[::13] = 0.0
        neg, bc2 = ops.adam_scalars(step, 1e-4, (0.9, 0.999))
        want = [x.clone() for x in state]
        CPU.doge_adam_(*want, grad, 0.9, 0.999, neg, bc2, 1e-8)
        got = to_dev([x.clone() for x in state], backend)
        backend.ops.doge_adam_(*got, to_dev(grad, backend), 0.9, 0.999, neg, bc2, 1e-8)
        for a, b, w in zip(got, want, ("param", "exp_avg", "exp_avg_sq")):
            assert_same(a, b, f"{w} step {step}")
        state = want


def test_small_doge_adam_empty(backend):
    z = to_dev(torch.zeros(0), backend)
    backend.ops.doge_adam_(z, z.clone(), z.clone(), z.clone(), 0.9, 0.999, -1e-4, 1.0, 1e-8)


def test_doge_training_loop(backend):
    """A few iterations of the method's loop (row op, projection, Adam) on both backends: same δ bits."""
    g = torch.Generator().manual_seed(3)
    tau, _, e, lam_sum, _ = make_case(g, 2, 3, 12, 20, torch.float32)
    U = torch.linalg.qr(torch.randn(2, 12, 2, generator=g))[0].contiguous()

    def run(ns, dev):
        t, ee, ls, UU = (x.to(dev) for x in (tau, e, lam_sum, U))
        delta = torch.zeros(2, 12, 20, device=dev)
        m, v, G = torch.zeros_like(delta), torch.zeros_like(delta), torch.empty_like(delta)
        for step in range(1, 6):
            ns.doge_row_grad_(G, t, delta, ee, ls)
            G.baddbmm_(UU, torch.bmm(UU.transpose(1, 2), G), alpha=-1.0)
            neg, bc2 = ops.adam_scalars(step, 1e-4, (0.9, 0.999))
            ns.doge_adam_(delta, m, v, G, 0.9, 0.999, neg, bc2, 1e-8)
        return delta

    # bmm is not part of the kernels under test: on a GPU its cuBLAS bits may differ, so compare bitwise
    # only under the emulator (both sides run torch's CPU bmm) and closely on hardware.
    got, want = run(backend.ops, backend.device), run(CPU, torch.device("cpu"))
    if backend.name == "emu":
        assert_same(got, want, "delta")
    else:
        assert torch.allclose(got.cpu(), want, rtol=1e-5, atol=1e-7)
