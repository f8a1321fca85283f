"""CALM mask-training ops (csrc/cpu/calm_cpu.cpp) against their references (calm_fast.reference).

Two comparisons for every op:
* **exact**: the reference evaluated with the kernels' own sigmoid (``reference.calm_sigmoid`` swapped
  for ``calm_ops.sigmoid``) must equal the op bit for bit: this checks every other rounding (order of
  the sums and products, fused vs faithful grouping, dtype conversions, in-place updates);
* **plain**: the reference as shipped (``torch.sigmoid``) must agree within the error that follows from
  the sigmoid bound below; binary masks and binarized merges must agree exactly (the inputs keep R off
  the one-float-wide round-half boundary, where any two sigmoids may round differently).

The sigmoid itself is tested against fp64 (``SIGMOID_ULP``) and torch.sigmoid over a strided sweep of
all float bit patterns, and at the round-half boundary (P3: round(0.5) = 0).  NaN/inf policy (no checks,
IEEE propagation as in the reference formulas) is pinned by ``test_nonfinite_policy``.
"""
import math

import pytest
import torch

from calm_fast import calm_ops, ops, reference
from calm_fast.reference import ReferenceOps as REF

from conftest import DTYPES, assert_same, assert_same_list, float_bits

C = torch.ops.calm_fast
DT_IDS = ["f32", "bf16", "f16"]
MODES = ["fused", "faithful", "round"]

# calm_sigmoid vs the exact (fp64) sigmoid, in ulps of the fp32 result: 1.86 measured over every 61st
# fp32 bit pattern (csrc/common/elementwise.h); 2 is the stated bound.
SIGMOID_ULP = 2.0
# vs torch.sigmoid (CPU, fp32) where torch's result is a normal float (x > -87.3; below, torch flushes
# to 0 while calm_sigmoid returns the correctly rounded subnormal): both errors add up.
SIGMOID_ULP_TORCH = 3
# The first fp32 R with round(sigma(R)) = 1 for calm_sigmoid (1.5 * 2^-24 rounds to exactly 0.5; so
# does everything below).  torch.sigmoid on the CPU flips at the same float.
FIRST_ON = 8.940697e-08
# Inputs keep |R| outside (ZONE_LO, ZONE_HI) when compared with torch.sigmoid's binarization.
ZONE_LO, ZONE_HI = 1e-8, 1e-6
EPS32 = 2.0 ** -24


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------
def _g(seed):
    return torch.Generator().manual_seed(seed)


def _ord(x):
    """fp32 -> int64 keys monotone in the value (so key differences count ulps), -0 == +0."""
    i = x.contiguous().view(torch.int32).to(torch.int64)
    return torch.where(i < 0, -(i & 0x7FFFFFFF), i)


def _ulp_f32(t64):
    """The fp32 ulp at each (fp64) value (subnormal spacing below 2^-126)."""
    _, e = torch.frexp(t64.abs().clamp(min=2.0 ** -149))  # |t| = m 2^e, m in [0.5, 1)
    return torch.pow(2.0, (torch.clamp(e - 1, min=-126) - 23).double())


def _kernel_sigmoid(x):
    """The native ops' sigmoid, straight from the CPU op (as calm_ops.sigmoid, but never through the
    wrappers, which a test may point at the reference)."""
    r = x.float().contiguous()
    return C.calm_interpolate([], [torch.zeros_like(r)], [torch.ones_like(r)], [r], "fused", True)[0]


@pytest.fixture
def native_sigmoid(monkeypatch):
    """Run the references with the kernels' sigmoid (for the bit-exact comparisons)."""
    monkeypatch.setattr(reference, "calm_sigmoid", _kernel_sigmoid)


# Lists: empty and 1-element tensors, odd sizes, a 2-D one, one past a 64K work unit, mixed sizes.
SIZE_LISTS = {
    "one": [1],
    "empty+odd": [0, 5, (3, 7)],
    "mixed": [1023, 1, 33, 4097, (17, 19)],
    "large": [70001, 3],
}


def _shape(s):
    return s if isinstance(s, tuple) else (s,)


def make_logits(g, sizes, *, zone_free=True, special=True, scale=6.0):
    """fp32 mask logits: N(0, scale^2), +-5 (the init values), exact zeros, +-tiny, +-huge; |R| kept out
    of the round-half zone when ``zone_free``."""
    out = []
    for s in sizes:
        n = math.prod(_shape(s))
        r = torch.randn(n, generator=g) * scale
        if special and n:
            u = torch.rand(n, generator=g)
            r[u < 0.1] = 5.0
            r[(u >= 0.1) & (u < 0.2)] = -5.0
            r[(u >= 0.2) & (u < 0.25)] = 0.0
            r[(u >= 0.25) & (u < 0.27)] = -0.0
            r[(u >= 0.27) & (u < 0.29)] = 1e-30
            r[(u >= 0.29) & (u < 0.31)] = -3e-9
            r[(u >= 0.31) & (u < 0.33)] = 120.0
            r[(u >= 0.33) & (u < 0.35)] = -95.0
            r[(u >= 0.35) & (u < 0.36)] = 3e38
            r[(u >= 0.36) & (u < 0.37)] = -3e38
        if zone_free:
            inside = (r.abs() > ZONE_LO) & (r.abs() < ZONE_HI)
            r[inside] = 0.5
        out.append(r.reshape(_shape(s)))
    return out


def make_list(g, sizes, dtype, scale=1e-2):
    return [(torch.randn(math.prod(_shape(s)), generator=g) * scale).to(dtype).reshape(_shape(s)) for s in sizes]


def _within(got, want, tol, what):
    """|got - want| <= tol elementwise (fp64), NaN positions equal, infinities equal."""
    g, w = got.double(), want.double()
    assert torch.equal(torch.isnan(g), torch.isnan(w)), f"{what}: NaN positions differ"
    fin = torch.isfinite(w) & torch.isfinite(g)
    assert torch.equal(g[~fin & ~torch.isnan(g)], w[~fin & ~torch.isnan(w)]), f"{what}: infinities differ"
    err = (g - w).abs()[fin]
    t = tol.double().expand_as(g)[fin]
    if not bool((err <= t).all()):
        i = int(torch.argmax(err - t))
        raise AssertionError(f"{what}: error {err[i].item()} > tolerance {t[i].item()} "
                             f"(got {g[fin][i].item()}, want {w[fin][i].item()})")


def _eps(dtype):
    return torch.finfo(dtype).eps / 2  # unit roundoff


# ------------------------------------------------------------------------------------------------
# The sigmoid
# ------------------------------------------------------------------------------------------------
def test_sigmoid_accuracy_over_all_exponents():
    # Every 1021st fp32 bit pattern (4.2M values, every exponent, both signs), NaN patterns dropped.
    bits = torch.arange(0, 2**32, 1021, dtype=torch.int64)
    x = (bits - (bits >= 2**31).long() * 2**32).to(torch.int32).view(torch.float32)
    x = x[~torch.isnan(x)]
    got = calm_ops.sigmoid(x)
    exact = torch.sigmoid(x.double())
    err = (got.double() - exact).abs() / _ulp_f32(exact)
    assert float(err.max()) <= SIGMOID_ULP, f"max {float(err.max())} ulp at x={x[int(err.argmax())].item()}"
    # torch.sigmoid where its result is normal: within both bounds of each other.
    normal = x > -87.3
    d = (_ord(got[normal]) - _ord(torch.sigmoid(x[normal]))).abs()
    assert int(d.max()) <= SIGMOID_ULP_TORCH, f"{int(d.max())} ulp from torch.sigmoid"


def test_sigmoid_special_values():
    x = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e30, -1e30, 3.4e38, -3.4e38, 17.4,
                      -200.0, -103.9, -88.0, 1.0, -1.0])
    s = calm_ops.sigmoid(x)
    assert s[0].item() == 0.5 and s[1].item() == 0.5
    assert s[2].item() == 1.0 and s[3].item() == 0.0 and math.isnan(s[4].item())
    assert s[5].item() == 1.0 and s[6].item() == 0.0 and s[7].item() == 1.0 and s[8].item() == 0.0
    assert s[9].item() == 1.0  # 1 - e^-17.4 rounds to 1
    assert s[10].item() == 0.0 and float_bits(s[10:11]).item() == 0  # +0, not -0
    # Deep in the subnormals: the correctly rounded value (torch.sigmoid flushes these to 0).
    for xv, sv in zip(x[11:13], s[11:13]):
        exact = torch.sigmoid(xv.double()).item()
        assert abs(sv.item() - exact) <= 2 * 2.0 ** -149, (xv.item(), sv.item(), exact)
    # sigma(-x) and 1 - sigma(x) agree to rounding (no symmetric formula is used: both ways accurate).
    assert abs(s[13].item() - 0.7310585786300049) < 1e-7 and abs(s[14].item() - 0.2689414213699951) < 1e-7


def test_sigmoid_round_half_boundary():
    # P3: round(0.5) = 0 (half to even).  sigma rounds to exactly 0.5 up to FIRST_ON, so those are "off".
    x = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-30, -1e-30, 1e-9, 5e-8, 8.9e-8, FIRST_ON])
    s = calm_ops.sigmoid(x)
    assert torch.equal(s[: x.numel() - 1], torch.full((x.numel() - 1,), 0.5))
    on = torch.round(s) == 1
    assert not bool(on.any())
    nxt = torch.nextafter(torch.tensor(FIRST_ON), torch.tensor(1.0))
    assert calm_ops.sigmoid(torch.tensor([FIRST_ON])).item() == 0.5
    assert torch.round(calm_ops.sigmoid(nxt.reshape(1))).item() == 1.0
    # Monotone binarization: every fp32 in [2^-25, 2^-22) after FIRST_ON is "on", every one before "off".
    f = torch.arange(0x33000000, 0x34800000, dtype=torch.int64).to(torch.int32).view(torch.float32)
    m = torch.round(calm_ops.sigmoid(f)) == 1
    assert torch.equal(m, f > FIRST_ON)
    assert torch.equal(torch.round(calm_ops.sigmoid(-f)) == 1, torch.zeros_like(m))
    # torch.sigmoid (CPU) flips at the same float; both agree on the binarization everywhere here.
    assert torch.equal(torch.round(torch.sigmoid(f)) == 1, m)
    # round() through the ops: the binarized merge takes tau_new exactly where R > FIRST_ON.
    out, count = ops.calm_binarize_merge([torch.zeros(f.numel())], [torch.ones(f.numel())], [f])
    assert torch.equal(out[0] == 1, m) and count == int(m.sum())


# ------------------------------------------------------------------------------------------------
# calm_interpolate
# ------------------------------------------------------------------------------------------------
def _interp_case(seed, sizes, base_dt, prev_dt, new_dt, with_base, zone_free=True):
    g = _g(seed)
    R = make_logits(g, sizes, zone_free=zone_free)
    base = make_list(g, sizes, base_dt, scale=1.0) if with_base else []
    prev = make_list(g, sizes, prev_dt)
    new = make_list(g, sizes, new_dt)
    return base, prev, new, R


DT_COMBOS = [  # (base, tau_prev, tau_new)
    (torch.float32, torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16, torch.float16),
    (torch.bfloat16, torch.float32, torch.float32),
    (torch.float32, torch.bfloat16, torch.float16),
]
DT_COMBO_IDS = ["f32", "bf16", "f16", "bf16-base_f32-tau", "mixed"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dts", DT_COMBOS, ids=DT_COMBO_IDS)
@pytest.mark.parametrize("sizes", list(SIZE_LISTS.values()), ids=list(SIZE_LISTS))
@pytest.mark.parametrize("with_base", [True, False], ids=["base", "nobase"])
@pytest.mark.parametrize("out_float", [False, True], ids=["out_dflt", "out_f32"])
def test_interpolate_matches_reference(native_sigmoid, mode, dts, sizes, with_base, out_float):
    base, prev, new, R = _interp_case(len(sizes) * 7 + MODES.index(mode), sizes, *dts, with_base)
    before = [x.clone() for x in base + prev + new + R]
    got = C.calm_interpolate(base, prev, new, R, mode, out_float)
    assert_same_list(got, REF.calm_interpolate(base, prev, new, R, mode, out_float), "theta (exact)")
    assert_same_list(base + prev + new + R, before, "inputs untouched")
    want_dt = torch.float32 if out_float else (dts[0] if with_base else torch.promote_types(dts[1], dts[2]))
    assert all(t.dtype == want_dt and t.shape == r.shape for t, r in zip(got, R))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dts", DT_COMBOS, ids=DT_COMBO_IDS)
@pytest.mark.parametrize("with_base", [True, False], ids=["base", "nobase"])
def test_interpolate_close_to_torch_sigmoid_reference(mode, dts, with_base):
    sizes = SIZE_LISTS["mixed"]
    base, prev, new, R = _interp_case(3 + MODES.index(mode), sizes, *dts, with_base)
    got = C.calm_interpolate(base, prev, new, R, mode, False)
    want = REF.calm_interpolate(base, prev, new, R, mode, False)
    for l in range(len(R)):
        if mode == "round":  # R is off the round-half zone: identical masks, identical values
            assert_same(got[l], want[l], f"round theta[{l}]")
            continue
        b = base[l].double().abs() if with_base else 0.0
        p, n = prev[l].double().abs(), new[l].double().abs()
        # sigma differs by <= 5 fp32 ulps (<= 5 * 2^-24 absolute); a few fp32 roundings; then the output
        # rounding, which two nearby fp32 values may take to adjacent output values.
        tol = (b + p + n) * (8 * EPS32 + 2 * _eps(want[l].dtype)) + 1e-38
        _within(got[l], want[l], tol, f"{mode} theta[{l}]")


def test_interpolate_modes_and_fused_vs_faithful():
    g = _g(5)
    R = [torch.randn(50000, generator=g) * 3]
    prev, new = [torch.randn(50000, generator=g) * 10], [torch.randn(50000, generator=g) * 10]
    base = [torch.randn(50000, generator=g)]
    fused = C.calm_interpolate(base, prev, new, R, "fused", False)[0]
    faithful = C.calm_interpolate(base, prev, new, R, "faithful", False)[0]
    rounded = C.calm_interpolate(base, prev, new, R, "round", False)[0]
    # Different roundings of the same value: close, but not bitwise equal everywhere.
    assert not torch.equal(fused, faithful)
    torch.testing.assert_close(fused, faithful, rtol=1e-5, atol=1e-5)
    m = R[0] > FIRST_ON
    assert torch.equal(rounded, base[0] + torch.where(m, new[0], prev[0]))
    # Without a base the round mode returns exactly tau_prev or tau_new.
    sel = C.calm_interpolate([], prev, new, R, "round", False)[0]
    assert torch.equal(sel, torch.where(m, new[0], prev[0]))
    with pytest.raises(RuntimeError, match="mode must be 'fused', 'faithful' or 'round'"):
        C.calm_interpolate(base, prev, new, R, "soft", False)


# ------------------------------------------------------------------------------------------------
# calm_accumulate_
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("faithful", [False, True], ids=["default", "faithful"])
@pytest.mark.parametrize("grad_dt", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("tau_dts", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                     (torch.float16, torch.bfloat16)], ids=["f32", "bf16", "f16+bf16"])
@pytest.mark.parametrize("sizes", list(SIZE_LISTS.values()), ids=list(SIZE_LISTS))
def test_accumulate_matches_reference(faithful, grad_dt, tau_dts, sizes):
    # No sigmoid here: bit-exact against the plain reference.  Three batches accumulate into A.
    g = _g(len(sizes) + 11 * faithful)
    prev, new = make_list(g, sizes, tau_dts[0]), make_list(g, sizes, tau_dts[1])
    A = [torch.randn(_shape(s), generator=g) for s in sizes]
    A_ref = [a.clone() for a in A]
    ptrs = [a.data_ptr() for a in A]
    for batch in range(3):
        grad = make_list(g, sizes, grad_dt, scale=1e-4)
        before = [x.clone() for x in grad + prev + new]
        assert C.calm_accumulate_(A, grad, prev, new, 1e7, faithful) is None
        REF.calm_accumulate_(A_ref, grad, prev, new, 1e7, faithful)
        assert_same_list(grad + prev + new, before, "inputs untouched")
    assert_same_list(A, A_ref, "A")
    assert [a.data_ptr() for a in A] == ptrs  # updated in place


def test_accumulate_default_vs_faithful_and_views_of_flat_buffer():
    g = _g(8)
    shapes = [(64, 33), (33,), (7, 5, 3)]
    flat = torch.randn(sum(math.prod(s) for s in shapes), generator=g) * 1e-3
    grads, i = [], 0
    for s in shapes:  # model gradients as views into one flat buffer (no copies)
        grads.append(flat[i:i + math.prod(s)].view(s))
        i += math.prod(s)
    prev = [torch.randn(s, generator=g) for s in shapes]
    new = [torch.randn(s, generator=g) for s in shapes]
    A1 = [torch.zeros(s) for s in shapes]
    A2 = [torch.zeros(s) for s in shapes]
    C.calm_accumulate_(A1, grads, prev, new, 1e7, False)
    C.calm_accumulate_(A2, grads, prev, new, 1e7, True)
    assert any(not torch.equal(a, b) for a, b in zip(A1, A2))  # different roundings
    for a, b in zip(A1, A2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)


# ------------------------------------------------------------------------------------------------
# calm_mask_step_
# ------------------------------------------------------------------------------------------------
def _step_case(seed, sizes, theta_dt, base_dt, tau_dt, rewrite, with_base):
    g = _g(seed)
    R = make_logits(g, sizes)
    # Accumulators of the size CALM sees (eta = 1e7 times grad * delta ~ 1e-8..1e-6): order 0.01-10.
    A = [torch.randn(_shape(s), generator=g) * 3 for s in sizes]
    theta = [torch.empty(_shape(s), dtype=theta_dt) for s in sizes] if rewrite else []
    base = make_list(g, sizes, base_dt, scale=1.0) if rewrite and with_base else []
    prev = make_list(g, sizes, tau_dt) if rewrite else []
    new = make_list(g, sizes, tau_dt) if rewrite else []
    return R, A, theta, base, prev, new


def _clone(xs):
    return [x.clone() for x in xs]


# theta rewrite (none, with a base, without) x interpolation mode (which only matters with a rewrite).
REWRITES = [("none", "fused")] + [(w, m) for w in ("base", "nobase") for m in MODES]


@pytest.mark.parametrize("faithful", [False, True], ids=["default", "faithful"])
@pytest.mark.parametrize("rewrite,mode", REWRITES, ids=[f"{w}-{m}" for w, m in REWRITES])
@pytest.mark.parametrize("dts", [(torch.float32, torch.float32, torch.float32),
                                 (torch.bfloat16, torch.bfloat16, torch.float32),
                                 (torch.float16, torch.float16, torch.bfloat16)], ids=["f32", "bf16", "f16+bf16"])
@pytest.mark.parametrize("sizes", list(SIZE_LISTS.values()), ids=list(SIZE_LISTS))
def test_mask_step_matches_reference(native_sigmoid, faithful, rewrite, mode, dts, sizes):
    R, A, theta, base, prev, new = _step_case(len(sizes) * 3 + faithful, sizes, *dts, rewrite != "none",
                                              rewrite == "base")
    R_ref, A_ref, theta_ref = _clone(R), _clone(A), _clone(theta)
    ptrs = [x.data_ptr() for x in R + A + theta]
    before = _clone(base + prev + new)
    counts = C.calm_mask_step_(R, A, 1.0, faithful, theta, base, prev, new, mode)
    counts_ref = REF.calm_mask_step_(R_ref, A_ref, 1.0, faithful, theta_ref, base, prev, new, mode)
    assert_same_list(R, R_ref, "R")
    assert_same_list(A, A_ref, "A")
    assert_same_list(theta, theta_ref, "theta")
    assert_same(counts, counts_ref, "counts")
    assert all(bool((float_bits(a) == 0).all()) for a in A)  # +0.0 exactly
    assert [x.data_ptr() for x in R + A + theta] == ptrs
    assert_same_list(base + prev + new, before, "inputs untouched")
    if rewrite != "none":  # the rewrite is calm_interpolate (fp32) at the new R, stored in theta's dtype
        want = [t.to(theta[0].dtype) for t in C.calm_interpolate(base, prev, new, R, mode, True)]
        assert_same_list(theta, want, "theta = interpolation at the new R")


@pytest.mark.parametrize("faithful", [False, True], ids=["default", "faithful"])
def test_mask_step_close_to_torch_sigmoid_reference(faithful):
    sizes = SIZE_LISTS["mixed"] + [20000]
    R, A, theta, base, prev, new = _step_case(21, sizes, torch.float32, torch.float32, torch.float32, True, True)
    R_ref, A_ref, theta_ref = _clone(R), _clone(A), _clone(theta)
    R0, A0 = _clone(R), _clone(A)
    counts = C.calm_mask_step_(R, A, 1.0, faithful, theta, base, prev, new, "fused")
    counts_ref = REF.calm_mask_step_(R_ref, A_ref, 1.0, faithful, theta_ref, base, prev, new, "fused")
    for l in range(len(R)):
        # d = s (1 - s) differs by <= ~6 * 2^-24 absolute when s does by <= 5 ulps; R moves by (|A| + alpha) d.
        tol = (A0[l].abs() + 1.0) * 8 * EPS32 + R0[l].abs() * 4 * EPS32 + 1e-38
        _within(R[l], R_ref[l], tol, f"R[{l}]")
    assert_same_list(A, A_ref, "A")
    # Masks: identical wherever the new R is off the round-half zone (all but a handful at most).
    off_zone = sum(int(((r.abs() <= ZONE_LO) | (r.abs() >= ZONE_HI)).sum()) for r in R)
    assert off_zone >= sum(r.numel() for r in R) - 2
    assert abs(int(counts[0]) - int(counts_ref[0])) <= sum(r.numel() for r in R) - off_zone


def test_mask_step_semantics_by_hand():
    # One element per case, checked against the formula written out in fp64.
    R = [torch.tensor([5.0, -5.0, 0.0, -0.0, 0.5, -0.5, 20.0])]
    A = [torch.tensor([0.0, 0.0, 0.0, 0.0, 3.0, -3.0, 1e9])]
    r0, a0 = R[0].double().clone(), A[0].double().clone()
    s = calm_ops.sigmoid(R[0]).double()  # fp32 sigma: sigma(20) is exactly 1, so d = 0 and R = 20 stays
    counts = C.calm_mask_step_(R, A, 0.25, False, [], [], [], [], "fused")
    d = s * (1 - s)
    sgn = torch.where(r0 > 0, 1.0, -1.0).double()  # sgn+(0) = -1
    want = r0 - a0 * d + 0.25 * sgn * d
    torch.testing.assert_close(R[0].double(), want, rtol=1e-6, atol=1e-7)
    assert R[0][2].item() < 0 and R[0][3].item() < 0  # R = 0 is pushed negative (counts as "off")
    assert R[0][6].item() == 20.0
    assert torch.equal(A[0], torch.zeros(7))
    on_after = int((R[0] > FIRST_ON).sum())
    flips = int(((r0 > FIRST_ON) != (R[0].double() > FIRST_ON)).sum())
    assert counts.tolist() == [on_after, flips]


def test_mask_step_default_mode_and_wrapper():
    g = _g(9)
    R = [torch.randn(3000, generator=g) * 4]
    A = [torch.randn(3000, generator=g) * 30]
    prev, new = [torch.randn(3000, generator=g)], [torch.randn(3000, generator=g)]
    for faithful, mode in [(False, "fused"), (True, "faithful")]:
        Rw, Aw, th = _clone(R), _clone(A), [torch.empty(3000)]
        Rc, Ac, thc = _clone(R), _clone(A), [torch.empty(3000)]
        cw = ops.calm_mask_step_(Rw, Aw, 1.0, faithful, theta=th, tau_prev=prev, tau_new=new)
        cc = C.calm_mask_step_(Rc, Ac, 1.0, faithful, thc, [], prev, new, mode)
        assert isinstance(cw, torch.Tensor) and cw.dtype == torch.int64 and cw.shape == (2,)
        assert torch.equal(cw, cc) and torch.equal(Rw[0], Rc[0]) and torch.equal(th[0], thc[0])
    # The faithful grouping rounds differently somewhere.
    R1, A1, R2, A2 = _clone(R), _clone(A), _clone(R), _clone(A)
    ops.calm_mask_step_(R1, A1, 1.0, False)
    ops.calm_mask_step_(R2, A2, 1.0, True)
    assert not torch.equal(R1[0], R2[0])
    torch.testing.assert_close(R1[0], R2[0], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# calm_binarize_merge
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tau_dts", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                     (torch.float16, torch.float16), (torch.bfloat16, torch.float32),
                                     (torch.bfloat16, torch.float16)],
                         ids=["f32", "bf16", "f16", "bf16+f32", "bf16+f16"])
@pytest.mark.parametrize("sizes", list(SIZE_LISTS.values()), ids=list(SIZE_LISTS))
def test_binarize_merge_matches_reference(tau_dts, sizes):
    g = _g(len(sizes) + 100)
    R = make_logits(g, sizes)  # off the zone: the plain reference (torch.sigmoid) must agree exactly
    prev, new = make_list(g, sizes, tau_dts[0]), make_list(g, sizes, tau_dts[1])
    before = _clone(prev + new + R)
    out, count = C.calm_binarize_merge(prev, new, R)
    want, want_count = REF.calm_binarize_merge(prev, new, R)
    assert_same_list(out, want, "tau_next")
    assert int(count) == int(want_count)
    assert_same_list(prev + new + R, before, "inputs untouched")
    dt = torch.promote_types(*tau_dts)
    for o, p, n, r in zip(out, prev, new, R):  # each element is exactly tau_prev or tau_new
        assert o.dtype == dt
        m = r > FIRST_ON
        assert torch.equal(o[m], n.to(dt)[m]) and torch.equal(o[~m], p.to(dt)[~m])


def test_binarize_merge_on_the_boundary(native_sigmoid):
    # R everywhere, the round-half zone included: equal to the reference with the kernels' sigmoid.
    g = _g(77)
    R = [torch.randn(20000, generator=g) * 2e-7, torch.randn(5, generator=g)]
    prev = [torch.randn(20000, generator=g), torch.randn(5, generator=g)]
    new = [torch.randn(20000, generator=g), torch.randn(5, generator=g)]
    out, count = C.calm_binarize_merge(prev, new, R)
    want, want_count = REF.calm_binarize_merge(prev, new, R)
    assert_same_list(out, want, "tau_next")
    assert int(count) == int(want_count) == sum(int((r > FIRST_ON).sum()) for r in R)
    assert ops.calm_binarize_merge(prev, new, R)[1] == int(count)


# ------------------------------------------------------------------------------------------------
# Policies: non-finite values, empty lists, determinism, threads
# ------------------------------------------------------------------------------------------------
def test_nonfinite_policy(native_sigmoid):
    """No checks: NaN/inf follow IEEE rules through the formulas, exactly as the reference does.
    sigma(NaN) = NaN (soft theta NaN; binary mask 0, so round/binarize take tau_prev); sigma(+-inf) = 1 / 0;
    a NaN R stays NaN after a step (counted as off); an infinite R stays infinite (d = 0)."""
    nan, inf = float("nan"), float("inf")
    R = [torch.tensor([nan, inf, -inf, 0.0, 2.0, -2.0, 2.0])]
    prev = [torch.tensor([1.0, 2.0, 3.0, inf, nan, 1.0, -inf])]
    new = [torch.tensor([4.0, 5.0, 6.0, 1.0, 1.0, nan, 1.0])]
    base = [torch.tensor([0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5])]
    for mode in MODES:
        assert_same_list(C.calm_interpolate(base, prev, new, R, mode, False),
                         REF.calm_interpolate(base, prev, new, R, mode, False), mode)
    soft = C.calm_interpolate([], prev, new, R, "fused", False)[0]
    assert math.isnan(soft[0].item()) and soft[1].item() == 5.0 and soft[2].item() == 3.0
    sel, count = C.calm_binarize_merge(prev, new, R)
    assert sel[0].tolist()[:3] == [1.0, 5.0, 3.0] and int(count) == 3  # NaN -> tau_prev; inf -> tau_new
    A = [torch.tensor([1.0, 1.0, 1.0, nan, inf, 0.0, 0.0])]
    R1, A1, R2, A2 = _clone(R), _clone(A), _clone(R), _clone(A)
    c1 = C.calm_mask_step_(R1, A1, 1.0, False, [], [], [], [], "fused")
    c2 = REF.calm_mask_step_(R2, A2, 1.0, False, [], [], [], [], "fused")
    assert_same_list(R1 + A1, R2 + A2, "step")
    assert_same(c1, c2, "counts")
    assert math.isnan(R1[0][0].item()) and R1[0][1].item() == inf and R1[0][2].item() == -inf
    assert math.isnan(R1[0][3].item()) and R1[0][4].item() == -inf  # A = NaN -> NaN; A = +inf -> R - inf
    # On after the step: R = +inf and R = 2 (A = 0); flipped: only R = 2 with A = +inf (now -inf).  NaN
    # counts as off before and after.
    assert c1.tolist() == [2, 1]


def test_empty_lists_and_tensors():
    # L = 0: the wrappers answer directly (the raw ops would have no tensor to dispatch on).
    assert ops.calm_interpolate(None, [], [], []) == []
    assert ops.calm_accumulate_([], [], [], [], 1.0) is None
    assert ops.calm_mask_step_([], [], 1.0).tolist() == [0, 0]
    assert ops.calm_binarize_merge([], [], []) == ([], 0)
    # Tensors with no elements (and the ops on them) are fine.
    e = [torch.empty(0), torch.empty(0, 3)]
    assert [t.shape for t in C.calm_interpolate(_clone(e), _clone(e), _clone(e), _clone(e), "round", False)] == \
        [(0,), (0, 3)]
    A = _clone(e)
    C.calm_accumulate_(A, _clone(e), _clone(e), _clone(e), 1.0, True)
    assert C.calm_mask_step_(_clone(e), A, 1.0, True, _clone(e), _clone(e), _clone(e), _clone(e), "faithful") \
        .tolist() == [0, 0]
    out, count = C.calm_binarize_merge(_clone(e), _clone(e), _clone(e))
    assert [t.shape for t in out] == [(0,), (0, 3)] and int(count) == 0


def test_deterministic_and_thread_independent():
    g = _g(31)
    sizes = [300000, 77, (128, 129)]
    R = make_logits(g, sizes, zone_free=False)
    A = [torch.randn(_shape(s), generator=g) for s in sizes]
    prev, new = make_list(g, sizes, torch.bfloat16), make_list(g, sizes, torch.float32)
    base = make_list(g, sizes, torch.bfloat16, scale=1.0)
    n = torch.get_num_threads()
    runs = []
    try:
        for threads in [1, max(2, n), max(2, n)]:
            torch.set_num_threads(threads)
            Rc, Ac, th = _clone(R), _clone(A), [torch.empty(_shape(s), dtype=torch.bfloat16) for s in sizes]
            C.calm_accumulate_(Ac, [x.float() * 1e-3 for x in prev], prev, new, 1e3, False)
            counts = C.calm_mask_step_(Rc, Ac, 1.0, True, th, base, prev, new, "faithful")
            interp = C.calm_interpolate(base, prev, new, Rc, "fused", True)
            sel, cnt = C.calm_binarize_merge(prev, new, Rc)
            runs.append((Rc, th, counts, interp, sel, cnt))
    finally:
        torch.set_num_threads(n)
    for other in runs[1:]:
        assert_same_list(other[0], runs[0][0], "R")
        assert_same_list(other[1], runs[0][1], "theta")
        assert_same(other[2], runs[0][2], "counts")
        assert_same_list(other[3], runs[0][3], "interp")
        assert_same_list(other[4], runs[0][4], "binarized")
        assert int(other[5]) == int(runs[0][5])


# ------------------------------------------------------------------------------------------------
# Bad input: errors that name the op and the tensor
# ------------------------------------------------------------------------------------------------
def test_bad_inputs_name_the_tensor():
    R = [torch.zeros(4), torch.zeros(2, 3)]
    t = [torch.zeros(4), torch.zeros(2, 3)]
    A = [torch.zeros(4), torch.zeros(2, 3)]
    with pytest.raises(RuntimeError, match=r"calm_interpolate: tau_new has 1 tensors but R has 2"):
        C.calm_interpolate([], t, t[:1], R, "fused", False)
    with pytest.raises(RuntimeError, match=r"tau_prev\[1\] has shape \[6\] but R\[1\] has shape \[2, 3\]"):
        C.calm_interpolate([], [torch.zeros(4), torch.zeros(6)], t, R, "fused", False)
    with pytest.raises(RuntimeError, match=r"base\[1\] has dtype BFloat16 but base\[0\] has Float"):
        C.calm_interpolate([torch.zeros(4), torch.zeros(2, 3, dtype=torch.bfloat16)], t, t, R, "fused", False)
    with pytest.raises(RuntimeError, match=r"tau_prev\[0\] must be float32, bfloat16 or float16"):
        C.calm_interpolate([], [x.double() for x in t], t, R, "fused", False)
    with pytest.raises(RuntimeError, match=r"calm_interpolate: R\[1\] must be float32, got BFloat16"):
        C.calm_interpolate([], t, t, [R[0], R[1].bfloat16()], "fused", False)
    with pytest.raises(RuntimeError, match=r"R\[0\] must be contiguous"):
        C.calm_binarize_merge(t, t, [torch.zeros(4, 2)[:, 0], R[1]])
    with pytest.raises(RuntimeError, match=r"tau_new\[1\] must be contiguous"):
        C.calm_binarize_merge(t, [t[0], torch.zeros(3, 2).t()], R)
    with pytest.raises(RuntimeError, match=r"calm_accumulate_: A\[0\] must be float32, got Half"):
        C.calm_accumulate_([A[0].half(), A[1]], t, t, t, 1.0, False)
    with pytest.raises(RuntimeError, match=r"calm_accumulate_: grad has 3 tensors but A has 2"):
        C.calm_accumulate_(A, t + t[:1], t, t, 1.0, False)
    with pytest.raises(RuntimeError, match=r"calm_mask_step_: A\[1\] must be float32, got BFloat16"):
        C.calm_mask_step_(R, [A[0], A[1].bfloat16()], 1.0, False, [], [], [], [], "fused")
    with pytest.raises(RuntimeError, match=r"calm_mask_step_: R\[0\] must be float32, got Double"):
        C.calm_mask_step_([R[0].double(), R[1]], A, 1.0, False, [], [], [], [], "fused")
    with pytest.raises(RuntimeError, match=r"calm_mask_step_: tau_prev has 0 tensors but R has 2"):
        C.calm_mask_step_(R, A, 1.0, False, _clone(t), [], [], _clone(t), "fused")
    with pytest.raises(RuntimeError, match=r"only used to rewrite theta, but theta is empty"):
        C.calm_mask_step_(R, A, 1.0, False, [], [], _clone(t), _clone(t), "fused")
    with pytest.raises(RuntimeError, match=r"mode must be"):
        C.calm_mask_step_(R, A, 1.0, False, [], [], [], [], "binary")
    # In-place lists must not alias another operand.
    with pytest.raises(RuntimeError, match=r"calm_mask_step_: R\[0\] shares memory with A\[0\]"):
        C.calm_mask_step_(R, [R[0], A[1]], 1.0, False, [], [], [], [], "fused")
    with pytest.raises(RuntimeError, match=r"calm_accumulate_: A\[1\] shares memory with grad\[1\]"):
        C.calm_accumulate_(A, [t[0], A[1]], t, t, 1.0, False)
    with pytest.raises(RuntimeError, match=r"theta\[0\] shares memory with base\[0\]"):
        b = _clone(t)
        C.calm_mask_step_(R, A, 1.0, False, [b[0], torch.zeros(2, 3)], b, t, t, "fused")
    # Nothing was modified by the failed calls.
    assert all(bool((x == 0).all()) for x in R + A)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_bad_device_names_the_tensor():
    R = [torch.zeros(4), torch.zeros(3)]
    t = [torch.zeros(4), torch.zeros(3, device="cuda")]
    with pytest.raises(RuntimeError, match=r"tau_prev\[1\] is on cuda:0 but R\[1\] is on cpu"):
        C.calm_binarize_merge(t, [torch.zeros(4), torch.zeros(3)], R)


# ------------------------------------------------------------------------------------------------
# opcheck (schema, fake tensors, dispatcher) on every op
# ------------------------------------------------------------------------------------------------
def test_opcheck():
    from torch.library import opcheck

    g = _g(13)
    sizes = [33, (4, 5)]
    R = make_logits(g, sizes)
    prev, new = make_list(g, sizes, torch.float32), make_list(g, sizes, torch.bfloat16)
    base = make_list(g, sizes, torch.bfloat16, scale=1.0)
    grad = make_list(g, sizes, torch.float32)
    A = [torch.randn(_shape(s), generator=g) for s in sizes]
    theta = [torch.empty(_shape(s)) for s in sizes]
    for mode in MODES:
        opcheck(C.calm_interpolate.default, (base, prev, new, R, mode, False))
    opcheck(C.calm_interpolate.default, ([], prev, new, R, "fused", True))
    opcheck(C.calm_accumulate_.default, (A, grad, prev, new, 1e7, True))
    opcheck(C.calm_accumulate_.default, (A, grad, prev, new, 1e7, False))
    opcheck(C.calm_mask_step_.default, (_clone(R), _clone(A), 1.0, True, theta, base, prev, new, "faithful"))
    opcheck(C.calm_mask_step_.default, (_clone(R), _clone(A), 1.0, False, [], [], [], [], "fused"))
    opcheck(C.calm_binarize_merge.default, (prev, new, R))


# ------------------------------------------------------------------------------------------------
# init_mask_logits (§8.4, P2) and the native sigmoid helper
# ------------------------------------------------------------------------------------------------
def _init_reference(tau_new, fraction, bias):
    """§8.4 as the official code computes it: topk over the concatenation, min, strict >."""
    flat = torch.cat([x.float().abs().reshape(-1) for x in tau_new])
    k = int(fraction * flat.numel())
    t = torch.topk(flat, k).values.min()
    return [torch.where(x.float().abs() > t, bias, -bias).float() for x in tau_new]


@pytest.mark.parametrize("fraction", [1e-3, 0.01, 0.3])
@pytest.mark.parametrize("dtypes", [[torch.float32] * 3, [torch.bfloat16, torch.float32, torch.float16]],
                         ids=["f32", "mixed"])
def test_init_mask_logits(fraction, dtypes):
    g = _g(int(fraction * 1000))
    sizes = [(300, 70), 5000, 1]
    # Values on a coarse grid: many ties with the threshold (P2 excludes them).
    tau = [(torch.round(torch.randn(_shape(s), generator=g) * 64) / 64).to(dt) for s, dt in zip(sizes, dtypes)]
    got = calm_ops.init_mask_logits(tau, fraction, 5.0)
    want = _init_reference(tau, fraction, 5.0)
    assert_same_list(got, want, "R init")
    k = int(fraction * sum(x.numel() for x in tau))
    assert sum(int((r > 0).sum()) for r in got) <= k - 1  # strict: at most k - 1 "on"


def test_init_mask_logits_k_zero():
    with pytest.raises(ValueError, match="= 0"):
        calm_ops.init_mask_logits([torch.randn(100)], 1e-5)


def test_native_sigmoid_helper_equals_kernel_values():
    # The helper is what the kernels compute: binarize agrees with round(helper) everywhere.
    g = _g(3)
    r = torch.randn(10000, generator=g) * 20
    s = calm_ops.sigmoid(r)
    out, _ = C.calm_binarize_merge([torch.zeros(10000)], [torch.ones(10000)], [r])
    assert torch.equal(out[0], torch.round(s))
    assert torch.equal(C.calm_interpolate([], [torch.zeros(10000)], [torch.ones(10000)], [r], "faithful", False)[0],
                       (1 - s) * 0 + s * 1)


def test_wrappers_on_the_reference_backend(monkeypatch, native_sigmoid):
    """The typed wrappers give the same results through the pure-PyTorch fallback (CALM_FAST_FALLBACK)."""
    g = _g(41)
    sizes = [1000, (7, 9)]
    R, A = make_logits(g, sizes), [torch.randn(_shape(s), generator=g) for s in sizes]
    base = make_list(g, sizes, torch.bfloat16, 1.0)
    prev, new, grad = make_list(g, sizes, torch.float32), make_list(g, sizes, torch.float32), \
        make_list(g, sizes, torch.float32, 1e-4)

    def run():
        Rc, Ac, th = _clone(R), _clone(A), [torch.empty(_shape(s), dtype=torch.bfloat16) for s in sizes]
        interp = ops.calm_interpolate(base, prev, new, Rc, "faithful")
        ops.calm_accumulate_(Ac, grad, prev, new, 1e7, faithful=True)
        counts = ops.calm_mask_step_(Rc, Ac, 1.0, True, theta=th, base=base, tau_prev=prev, tau_new=new)
        sel, n = ops.calm_binarize_merge(prev, new, Rc)
        return interp, Rc, Ac, th, counts, sel, n

    native = run()
    monkeypatch.setattr(ops, "_ops", lambda: REF)
    ref = run()
    for i, what in enumerate(["interp", "R", "A", "theta"]):
        assert_same_list(ref[i], native[i], what)
    assert_same(ref[4], native[4], "counts")
    assert_same_list(ref[5], native[5], "binarized")
    assert ref[6] == native[6]
