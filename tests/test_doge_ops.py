"""DOGE_TA's fused ops (doge_row_grad_, doge_adam_) on the CPU against independent references.

* doge_row_grad_ bit for bit against a pure-PyTorch emulation of the documented summation order
  (32 strided lanes, then the pairwise tree; G summed in task order), within rounding of the plain
  reference (reference._doge_row_grad_), and the closed-form gradient against autograd of the loss as
  written (reference.doge_loss_reference) and against central finite differences, in fp64.
* doge_adam_ against torch.optim.Adam on the same gradients: exp_avg / exp_avg_sq bit for bit, the
  parameter within one ulp (torch's vectorised sqrt is not always correctly rounded), and bit for bit
  against the reference formula with a correctly rounded sqrt.
* opcheck, bad inputs.
"""
from __future__ import annotations

import pytest
import torch

import calm_fast
from calm_fast import ops, reference
from calm_fast.methods.doge import row_constants
from conftest import assert_same

LANES = 32


def lane_dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """<x, y> over the last dim in the kernels' order: lane k sums x[k + 32 i] y[k + 32 i] for i = 0, 1, ...
    (from +0), then p[k] = p[k] + p[k + s] for s = 16, 8, 4, 2, 1."""
    n = x.shape[-1]
    pad = (-n) % LANES
    prod = torch.nn.functional.pad(x * y, (0, pad)).reshape(*x.shape[:-1], (n + pad) // LANES, LANES)
    p = torch.zeros(*x.shape[:-1], LANES, dtype=x.dtype)
    for c in range(prod.shape[-2]):
        p = p + prod[..., c, :]  # padding adds exact zeros: p + 0 == p (p is never -0)
    s = LANES // 2
    while s:
        p = p[..., :s] + p[..., s:2 * s]
        s //= 2
    return p[..., 0]


def row_grad_exact(tau, delta, e, lam_sum):
    """The documented order of doge_row_grad_, in torch elementwise ops (each rounded once)."""
    B, T, m, n = tau.shape
    L = lam_sum[:, None]
    r = torch.stack([e[:, j] - L * lane_dot(tau[:, j], delta) for j in range(T)], dim=1)  # [B, T, m]
    acc = r[:, 0, :, None] * tau[:, 0]
    for j in range(1, T):
        acc = acc + r[:, j, :, None] * tau[:, j]
    G = (-2 * lam_sum)[:, None, None] * acc
    rl = torch.zeros(B, m, dtype=tau.dtype)
    for j in range(T):
        rl = rl + r[:, j] * r[:, j]
    loss = torch.tensor([sum(float(v) for v in rl[b].double()) for b in range(B)], dtype=torch.float64)
    return G, loss


def make_case(g, B, T, m, n, dtype, scale=1e-2):
    tau = (torch.randn(B, T, m, n, generator=g, dtype=torch.float64) * scale).to(dtype)
    lam = (0.07 / tau.double().flatten(2).norm(dim=2)).to(dtype)               # [B, T]
    e, lam_sum = row_constants(tau, lam)
    delta = (torch.randn(B, m, n, generator=g, dtype=torch.float64) * scale * 0.3).to(dtype)
    return tau, delta, e, lam_sum, lam


SHAPES = [(1, 1, 1, 1), (1, 2, 3, 31), (2, 3, 5, 32), (3, 8, 4, 33), (2, 8, 7, 100), (1, 4, 16, 257), (2, 2, 0, 5),
          (2, 3, 4, 0)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_row_grad_bitwise_order(shape, dtype):
    g = torch.Generator().manual_seed(hash(shape) & 0xFFFF)
    tau, delta, e, lam_sum, _ = make_case(g, *shape, dtype)
    grad = torch.full_like(delta, float("nan"))
    loss = ops.doge_row_grad_(grad, tau, delta, e, lam_sum)
    want_g, want_loss = row_grad_exact(tau, delta, e, lam_sum)
    assert_same(grad, want_g, "grad")
    assert_same(loss, want_loss, "loss")
    # and the plain reference, up to rounding
    g2 = torch.empty_like(delta)
    ref_loss = reference._doge_row_grad_(g2, tau, delta, e, lam_sum)
    tol = 1e-4 if dtype == torch.float32 else 1e-11
    scale = g2.abs().max() if g2.numel() else 0
    assert torch.allclose(grad, g2, rtol=tol, atol=tol * float(scale) + 1e-30, equal_nan=True)
    assert torch.allclose(loss, ref_loss, rtol=tol, atol=1e-30, equal_nan=True)  # n = 0: λ = inf, NaN


def test_row_grad_is_deterministic():
    g = torch.Generator().manual_seed(5)
    tau, delta, e, lam_sum, _ = make_case(g, 3, 8, 64, 96, torch.float32)
    a, b = torch.empty_like(delta), torch.empty_like(delta)
    la = ops.doge_row_grad_(a, tau, delta, e, lam_sum)
    lb = ops.doge_row_grad_(b, tau, delta, e, lam_sum)
    assert_same(a, b, "grad")
    assert_same(la, lb, "loss")


def _loss_and_autograd(tau, lam, delta):
    d = delta.clone().requires_grad_(True)
    loss = reference.doge_loss_reference(d, list(tau), list(lam))
    loss.backward()
    return float(loss.detach()), d.grad


def test_closed_form_gradient_matches_autograd_and_finite_differences_fp64():
    g = torch.Generator().manual_seed(11)
    tau, delta, e, lam_sum, lam = make_case(g, 1, 3, 6, 5, torch.float64, scale=1.0)
    grad = torch.empty_like(delta)
    loss = ops.doge_row_grad_(grad, tau, delta, e, lam_sum)
    ref_loss, ref_grad = _loss_and_autograd(tau[0], lam[0], delta[0])
    assert abs(float(loss[0]) - ref_loss) <= 1e-11 * abs(ref_loss)
    assert torch.allclose(grad[0], ref_grad, rtol=1e-10, atol=1e-10 * float(ref_grad.abs().max()))
    # central differences of the loss as written, every element
    h = 1e-6
    fd = torch.empty_like(delta[0])
    for idx in range(delta[0].numel()):
        dp, dm = delta[0].clone(), delta[0].clone()
        dp.view(-1)[idx] += h
        dm.view(-1)[idx] -= h
        lp = float(reference.doge_loss_reference(dp, list(tau[0]), list(lam[0])))
        lm = float(reference.doge_loss_reference(dm, list(tau[0]), list(lam[0])))
        fd.view(-1)[idx] = (lp - lm) / (2 * h)
    rel = float((fd - grad[0]).norm() / grad[0].norm())
    assert rel < 1e-7, rel


# ------------------------------------------------------------------------------------------------
# Adam
# ------------------------------------------------------------------------------------------------
def _ulp_diff(a: torch.Tensor, b: torch.Tensor) -> int:
    ia = a.view(torch.int32).to(torch.int64) if a.dtype == torch.float32 else a.view(torch.int64)
    ib = b.view(torch.int32).to(torch.int64) if b.dtype == torch.float32 else b.view(torch.int64)
    return int((ia - ib).abs().max()) if a.numel() else 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("hyper", [dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8), dict(lr=3e-2, betas=(0.8, 0.99), eps=1e-6)],
                         ids=["doge", "other"])
def test_adam_matches_torch_optim_adam(dtype, hyper):
    g = torch.Generator().manual_seed(3)
    n = 10007  # vector body and scalar tail of torch's kernels
    p0 = torch.randn(n, generator=g, dtype=dtype)
    P = p0.clone().requires_grad_(True)
    opt = torch.optim.Adam([P], **hyper)
    mine, prev = p0.clone(), p0.clone()
    m, v = torch.zeros_like(mine), torch.zeros_like(mine)
    for step in range(1, 8):
        grad = torch.randn(n, generator=g, dtype=dtype) * 10.0 ** (-step)
        grad[::97] = 0.0
        P.grad = grad.clone()
        opt.step()
        ops.doge_adam_(mine, m, v, grad, step, **hyper)
        st = opt.state[P]
        assert_same(m, st["exp_avg"], f"exp_avg step {step}")
        assert_same(v, st["exp_avg_sq"], f"exp_avg_sq step {step}")
        # torch's sqrt is <= 1 ulp off the correctly rounded one, which moves the step by a few ulps of the
        # step: |diff| <= eps (|p| + 4 |step|) (p + step can cancel, so not a bound in ulps of the result)
        new = P.detach()
        bound = torch.finfo(dtype).eps * (prev.abs() + 4 * (new - prev).abs())
        assert bool(((mine - new).abs() <= bound).all()), f"param step {step}"
        assert _ulp_diff(mine, new) <= 1 or hyper["lr"] > 1e-3, f"param step {step}: {_ulp_diff(mine, new)} ulp"
        mine.copy_(new)
        prev = new.clone()  # continue from torch's parameter: each step compared on the same input


@pytest.mark.parametrize("dtype", [torch.float32], ids=["f32"])
def test_adam_bitwise_against_reference_formula(dtype):
    g = torch.Generator().manual_seed(4)
    n = 4099
    p = torch.randn(n, generator=g, dtype=dtype)
    m = torch.randn(n, generator=g, dtype=dtype) * 1e-3
    v = torch.rand(n, generator=g, dtype=dtype) * 1e-6
    grad = torch.randn(n, generator=g, dtype=dtype) * 1e-3
    for step in (1, 2, 50, 400):
        a = [x.clone() for x in (p, m, v)]
        b = [x.clone() for x in (p, m, v)]
        ops.doge_adam_(a[0], a[1], a[2], grad, step, lr=1e-4)
        neg, bc2 = ops.adam_scalars(step, 1e-4, (0.9, 0.999))
        reference._doge_adam_(b[0], b[1], b[2], grad, 0.9, 0.999, neg, bc2, 1e-8)
        for x, y, w in zip(a, b, ("param", "exp_avg", "exp_avg_sq")):
            assert_same(x, y, f"{w} step {step}")


# ------------------------------------------------------------------------------------------------
# opcheck and bad inputs
# ------------------------------------------------------------------------------------------------
def test_opcheck():
    g = torch.Generator().manual_seed(9)
    tau, delta, e, lam_sum, _ = make_case(g, 2, 3, 5, 9, torch.float32)
    torch.library.opcheck(torch.ops.calm_fast.doge_row_grad_, (torch.empty_like(delta), tau, delta, e, lam_sum))
    p, m, v, gr = (torch.randn(33, generator=g) for _ in range(4))
    v = v.abs()
    torch.library.opcheck(torch.ops.calm_fast.doge_adam_, (p, m, v, gr, 0.9, 0.999, -1e-4, 0.5, 1e-8))


def test_row_grad_rejects_bad_inputs():
    g = torch.Generator().manual_seed(2)
    tau, delta, e, lam_sum, _ = make_case(g, 2, 3, 4, 6, torch.float32)
    grad = torch.empty_like(delta)
    with pytest.raises(RuntimeError, match="tau must be"):
        ops.doge_row_grad_(grad, tau[0], delta, e, lam_sum)
    with pytest.raises(RuntimeError, match="delta must be"):
        ops.doge_row_grad_(grad, tau, delta[:, :3].contiguous(), e, lam_sum)
    with pytest.raises(RuntimeError, match="e must be"):
        ops.doge_row_grad_(grad, tau, delta, e[:, :2].contiguous(), lam_sum)
    with pytest.raises(RuntimeError, match="lam_sum must be"):
        ops.doge_row_grad_(grad, tau, delta, e, lam_sum[:1].contiguous())
    with pytest.raises(RuntimeError, match="dtype"):
        ops.doge_row_grad_(grad, tau, delta.double(), e, lam_sum)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        ops.doge_row_grad_(grad.half(), tau.half(), delta.half(), e.half(), lam_sum.half())
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.doge_row_grad_(grad, tau, delta.transpose(1, 2).contiguous().transpose(1, 2), e, lam_sum)
    with pytest.raises(RuntimeError, match="alias"):
        ops.doge_row_grad_(delta, tau, delta, e, lam_sum)
    with pytest.raises(RuntimeError, match="T = 0"):
        ops.doge_row_grad_(grad, tau[:, :0].contiguous(), delta, e[:, :0].contiguous(), lam_sum)


def test_adam_rejects_bad_inputs():
    p = torch.zeros(8)
    with pytest.raises(RuntimeError, match="one shape"):
        ops.doge_adam_(p, torch.zeros(8), torch.zeros(7), torch.zeros(8), 1)
    with pytest.raises(RuntimeError, match="dtype"):
        ops.doge_adam_(p, torch.zeros(8, dtype=torch.float64), torch.zeros(8), torch.zeros(8), 1)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        ops.doge_adam_(p.half(), p.half(), p.half(), p.half(), 1)


def test_reference_fallback_ops_exist():
    assert hasattr(reference.ReferenceOps, "doge_row_grad_") and hasattr(reference.ReferenceOps, "doge_adam_")
    assert calm_fast.backend() in ("native-cpu", "native-cuda")
