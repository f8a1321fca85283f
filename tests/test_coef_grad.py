"""coef_grad (AdaMerging's coefficient gradient, ALGORITHMS.md §6) on the CPU against independent references.

* Bit for bit against a pure-PyTorch emulation of the documented summation order (common/coef_grad.h:
  fp32 products, 32 fp32 lanes per 1024-element block, fp64 lane tree, fp64 lanes over blocks), for
  mixed-size lists (empty, 1-element, odd, around the block and the 64K work unit), fp32 / bf16 / fp16
  inputs, with and without base, trim (>= and strict >), bool and bit-packed masks, fp32 and input-dtype
  grads; so the result cannot depend on the thread count or the tiling.
* Within the documented error bound of reference.coef_grad_reference (float64 dot products).
* Against autograd through a plain-torch weighted merge (merged_l = base_l + sum_t lambda[t, l] keep tau)
  under a nonlinear loss: the op applied to dLoss/dmerged equals dLoss/dlambda.
* Identical bits with 1 and 2 threads; inf / NaN propagation as torch's; empty lists; bad input; opcheck;
  the reference fallback (ReferenceOps.coef_grad) agrees.
"""
from __future__ import annotations

import math

import pytest
import torch

from calm_fast import ops, reference
from conftest import DTYPES, assert_same, make_list

DT_IDS = ["f32", "bf16", "f16"]
BLOCK, LANES = 1024, 32
SIZES = [0, 1, 7, 31, 32, 33, (3, 11), 1023, 1024, 1025, 5000, 70001]


def _shape(s):
    return s if isinstance(s, tuple) else (s,)


def _numel(s):
    return math.prod(_shape(s))


def lane_tree(s: torch.Tensor) -> torch.Tensor:
    """s[..., k] = s[..., k] + s[..., k + h] for h = 16, 8, 4, 2, 1; returns s[..., 0]."""
    h = LANES // 2
    while h:
        s = s[..., :h] + s[..., h:2 * h]
        h //= 2
    return s[..., 0]


def exact_order(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """<g, v> (fp32 1-D tensors) in the kernels' documented order, as a float32 scalar."""
    p = (g * v).reshape(-1)  # one fp32 rounding per product
    n = p.numel()
    nb = (n + BLOCK - 1) // BLOCK
    if nb == 0:
        return torch.zeros((), dtype=torch.float32)
    p = torch.nn.functional.pad(p, (0, nb * BLOCK - n)).reshape(nb, BLOCK // LANES, LANES)  # [block, j, lane]
    acc = torch.zeros(nb, LANES, dtype=torch.float32)
    for j in range(BLOCK // LANES):
        acc = acc + p[:, j, :]
    blocks = lane_tree(acc.double())  # [nb] fp64 block sums
    rows = (nb + LANES - 1) // LANES
    blocks = torch.nn.functional.pad(blocks, (0, rows * LANES - nb)).reshape(rows, LANES)
    s = torch.zeros(LANES, dtype=torch.float64)
    for j in range(rows):
        s = s + blocks[j]
    return lane_tree(s).float()


def kept_taus(inputs, base, T, thresholds=None, strict=False, masks=None):
    """v[t][l]: tau in fp32 (input - base), zero where the trim or the mask drops it (written here from the
    docstring of ops.coef_grad / weighted_merge, independently of the reference module)."""
    L = len(inputs) // T
    out = []
    for t in range(T):
        row = []
        for l in range(L):
            x = inputs[t * L + l].float()
            if base:
                x = x - base[l].float()
            x = x.reshape(-1)
            if thresholds is not None:
                thr = float(thresholds[t, l])
                keep = x.abs() > thr if strict else x.abs() >= thr
                x = torch.where(keep, x, torch.zeros_like(x))
            if masks:
                m = masks[t * L + l]
                if m.dtype == torch.uint8:
                    m = ((m.reshape(-1, 1) >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1)[:x.numel()].bool()
                x = torch.where(m.reshape(-1), x, torch.zeros_like(x))
            row.append(x)
        out.append(row)
    return out


def exact_table(grads, inputs, base, T, **kw):
    v = kept_taus(inputs, base, T, **kw)
    L = len(inputs) // T
    out = torch.empty(T, L, dtype=torch.float32)
    for t in range(T):
        for l in range(L):
            out[t, l] = exact_order(grads[l].float().reshape(-1), v[t][l])
    return out


def make_case(gen, T, sizes, dtype, with_base=True, grad_dtype=torch.float32, scale=1e-2):
    shapes = [_shape(s) for s in sizes]
    if with_base:
        base = [(torch.randn(s, generator=gen)).to(dtype) for s in shapes]
        inputs = [(base[l].float() + scale * torch.randn(shapes[l], generator=gen)).to(dtype)
                  for t in range(T) for l in range(len(shapes))]
    else:
        base = None
        inputs = [(scale * torch.randn(s, generator=gen)).to(dtype) for t in range(T) for s in shapes]
    grads = [torch.randn(s, generator=gen).to(grad_dtype) for s in shapes]
    return grads, inputs, base


def thresholds_for(inputs, base, T, q=0.3):
    """[T, L] thresholds at an element's own |tau| (exact ties at the threshold occur)."""
    L = len(inputs) // T
    thr = torch.zeros(T, L)
    for t in range(T):
        for l in range(L):
            x = inputs[t * L + l].float()
            if base:
                x = x - base[l].float()
            x = x.reshape(-1).abs()
            if x.numel():
                thr[t, l] = x[int(q * (x.numel() - 1))]
    return thr


def random_masks(gen, inputs, packed):
    ms = [torch.rand(x.numel(), generator=gen) < 0.6 for x in inputs]
    return [ops.pack_mask(m) for m in ms] if packed else [m.reshape(x.shape) for m, x in zip(ms, inputs)]


# ------------------------------------------------------------------------------------------------
# Bit for bit against the documented order
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("with_base", [True, False], ids=["base", "taus"])
def test_exact_order_plain(gen, dtype, with_base):
    T = 3
    grads, inputs, base = make_case(gen, T, SIZES, dtype, with_base)
    got = ops.coef_grad(grads, inputs, base, T)
    assert_same(got, exact_table(grads, inputs, base, T), "coef_grad")


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("strict", [False, True], ids=["ge", "gt"])
def test_exact_order_trim(gen, dtype, strict):
    T = 4
    sizes = [1, 33, 1025, 5000]
    grads, inputs, base = make_case(gen, T, sizes, dtype, True, grad_dtype=dtype)
    thr = thresholds_for(inputs, base, T)
    got = ops.coef_grad(grads, inputs, base, T, thresholds=thr, strict=strict)
    assert_same(got, exact_table(grads, inputs, base, T, thresholds=thr, strict=strict), "trimmed")
    # the trim changes the result (the test would notice a kernel that ignores it)
    assert not torch.equal(got, ops.coef_grad(grads, inputs, base, T))


@pytest.mark.parametrize("packed", [False, True], ids=["bool", "packed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_exact_order_masks(gen, packed, dtype):
    T = 3
    sizes = [7, (3, 11), 1030, 4099]
    grads, inputs, base = make_case(gen, T, sizes, dtype, False)
    masks = random_masks(gen, inputs, packed)
    thr = thresholds_for(inputs, base, T, q=0.2)
    got = ops.coef_grad(grads, inputs, base, T, thresholds=thr, masks=masks)
    assert_same(got, exact_table(grads, inputs, base, T, thresholds=thr, masks=masks), "masked")


def test_flat_buffer_grad_views(gen):
    """grads as views into one flat buffer (how the adapters hand them over) are read in place."""
    T = 2
    sizes = [(4, 5), 1000, 7]
    _, inputs, base = make_case(gen, T, sizes, torch.float32, True)
    flat = torch.randn(sum(_numel(s) for s in sizes), generator=gen)
    views, off = [], 0
    for s in sizes:
        views.append(flat[off:off + _numel(s)].view(_shape(s)))
        off += _numel(s)
    assert_same(ops.coef_grad(views, inputs, base, T), exact_table(views, inputs, base, T), "views")
    # non-contiguous grads are copied by the wrapper (same result)
    nc = [torch.randn(_shape(s)[::-1], generator=gen).t() if len(_shape(s)) == 2 else torch.randn(s, generator=gen)
          for s in sizes]
    assert not nc[0].is_contiguous()
    assert_same(ops.coef_grad(nc, inputs, base, T), exact_table(nc, inputs, base, T), "non-contiguous")


def test_none_grads_give_zero_columns(gen):
    """A None gradient (a tensor the loss does not reach) gives an exact 0 column; the others are unchanged."""
    T = 3
    sizes = [40, 1025, 7, 300]
    grads, inputs, base = make_case(gen, T, sizes, torch.bfloat16, True)
    thr = thresholds_for(inputs, base, T)
    masks = random_masks(gen, inputs, packed=True)
    full = ops.coef_grad(grads, inputs, base, T, thresholds=thr, masks=masks)
    partial = ops.coef_grad([grads[0], None, grads[2], None], inputs, base, T, thresholds=thr, masks=masks)
    assert_same(partial[:, [0, 2]], full[:, [0, 2]], "kept columns")
    assert_same(partial[:, [1, 3]], torch.zeros(T, 2), "None columns")
    assert_same(ops.coef_grad([None] * 4, inputs, base, T), torch.zeros(T, 4), "all None")


# ------------------------------------------------------------------------------------------------
# Float64 reference and autograd
# ------------------------------------------------------------------------------------------------
def error_bound(grads, inputs, base, T, **kw):
    """The documented bound: 34 * 2^-24 * sum|g v| + 2^-24 |exact| (+ fp64 terms, far below)."""
    v = kept_taus(inputs, base, T, **kw)
    L = len(inputs) // T
    mag = torch.tensor([[float((grads[l].double().reshape(-1) * v[t][l].double()).abs().sum()) for l in range(L)]
                        for t in range(T)], dtype=torch.float64)
    return mag


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_against_fp64_reference(gen, dtype):
    T = 5
    sizes = [1, 100, 1025, 70001, 3000]
    grads, inputs, base = make_case(gen, T, sizes, dtype, True)
    thr = thresholds_for(inputs, base, T, q=0.5)
    for kw in ({}, {"thresholds": thr}, {"thresholds": thr, "strict": True}):
        got = ops.coef_grad(grads, inputs, base, T, **kw).double()
        want = reference.coef_grad_reference(grads, inputs, base, T, **kw)
        mag = error_bound(grads, inputs, base, T, **kw)
        tol = 34 * 2.0**-24 * mag + 2.0**-24 * want.abs() + 1e-300
        assert ((got - want).abs() <= tol).all(), (got - want).abs().max()
        assert (mag[:, 1:] > 0).all()  # (the 1-element tensor is trimmed away under strict)


@pytest.mark.parametrize("with_base", [True, False], ids=["base", "taus"])
@pytest.mark.parametrize("trim", [False, True], ids=["plain", "trimmed"])
def test_against_autograd_through_the_merge(gen, with_base, trim):
    """merged_l = base_l + sum_t lambda[t, l] keep tau_{t,l} in torch (float64), a nonlinear loss of the
    merged tensors; dLoss/dlambda by autograd == coef_grad(dLoss/dmerged)."""
    T = 4
    sizes = [(8, 16), 300, 2049, 5]
    grads_unused, inputs, base = make_case(gen, T, sizes, torch.float32, with_base)
    L = len(sizes)
    thr = thresholds_for(inputs, base, T, q=0.4) if trim else None
    v = kept_taus(inputs, base, T, thresholds=thr)
    lam = (0.3 + 0.1 * torch.randn(T, L, generator=gen, dtype=torch.float64)).requires_grad_()
    weights = [torch.randn(_shape(s), generator=gen, dtype=torch.float64) for s in sizes]
    merged = []
    for l in range(L):
        m = base[l].double() if base else torch.zeros(_shape(sizes[l]), dtype=torch.float64)
        for t in range(T):
            m = m + lam[t, l] * v[t][l].double().reshape(_shape(sizes[l]))
        m.retain_grad()
        merged.append(m)
    loss = sum((torch.sin(10 * m) * w).sum() + (m ** 2).sum() for m, w in zip(merged, weights))
    loss.backward()
    grads = [m.grad.float() for m in merged]  # what an adapter hands over: float32 dLoss/dmerged
    got = ops.coef_grad(grads, inputs, base, T, thresholds=thr)
    want = lam.grad
    mag = error_bound([m.grad for m in merged], inputs, base, T, thresholds=thr)
    # float32 grads (one rounding each) + the op's documented bound
    tol = 36 * 2.0**-24 * mag + 2.0**-24 * want.abs()
    assert ((got.double() - want).abs() <= tol).all(), (got.double() - want).abs().max()


# ------------------------------------------------------------------------------------------------
# Determinism, special values, empty lists
# ------------------------------------------------------------------------------------------------
def test_same_bits_for_any_thread_count(gen):
    T = 8
    sizes = [70001, 1025, 200000, 3]
    grads, inputs, base = make_case(gen, T, sizes, torch.bfloat16, True)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.coef_grad(grads, inputs, base, T)
        torch.set_num_threads(max(2, prev))
        many = ops.coef_grad(grads, inputs, base, T)
    finally:
        torch.set_num_threads(prev)
    assert_same(many, one, "threads")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("with_base", [True, False], ids=["base", "taus"])
def test_simd_and_generic_paths_agree(gen, monkeypatch, dtype, with_base):
    """The fp32 single-pass loop and the AVX2 conversions against the staged generic loop, bit for bit."""
    T = 3
    grads, inputs, base = make_case(gen, T, [1029, 70001, 5], dtype, with_base, grad_dtype=dtype)
    thr = thresholds_for(inputs, base, T)
    for kw in ({}, {"thresholds": thr}, {"thresholds": thr, "strict": True}):
        monkeypatch.delenv("CALM_FAST_CPU_SIMD", raising=False)
        fast = ops.coef_grad(grads, inputs, base, T, **kw)
        monkeypatch.setenv("CALM_FAST_CPU_SIMD", "0")
        assert_same(ops.coef_grad(grads, inputs, base, T, **kw), fast, f"simd vs generic {kw.keys()}")


def test_nonfinite_propagate_as_in_torch(gen):
    T = 2
    sizes = [40, 2000, 9]
    grads, inputs, base = make_case(gen, T, sizes, torch.float32, False)
    inputs[1][5] = float("inf")        # task 0, tensor 1: inf * g
    inputs[T * 3 - 1][2] = float("nan")  # task 1, tensor 2: NaN
    grads[0][3] = float("inf")         # tensor 0: inf * tau for both tasks
    got = ops.coef_grad(grads, inputs, base, T)
    want = reference.coef_grad_reference(grads, inputs, base, T)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert_same(got, exact_table(grads, inputs, base, T), "nonfinite")
    # a trimmed-away inf contributes g * 0: nothing for a finite g, NaN for g = inf (torch's g * (keep * tau));
    # a NaN tau fails every trim (|NaN| >= thr is false), as in weighted_merge
    thr = torch.full((T, len(sizes)), float("inf"))  # strict: |x| > inf drops everything, inf included
    thr[1] = 0.0
    got = ops.coef_grad(grads, inputs, base, T, thresholds=thr, strict=True)
    assert got[0, 1] == 0 and got[0, 2] == 0 and torch.isnan(got[0, 0]) and torch.isfinite(got[1, 2])
    assert_same(got, exact_table(grads, inputs, base, T, thresholds=thr, strict=True), "nonfinite trimmed")


def test_empty_lists_and_tensors(gen):
    assert ops.coef_grad([], [], None, 3).shape == (3, 0)
    T = 2
    grads, inputs, base = make_case(gen, T, [0, 0], torch.float32, True)
    assert_same(ops.coef_grad(grads, inputs, base, T), torch.zeros(T, 2), "empty tensors")


# ------------------------------------------------------------------------------------------------
# Bad input, opcheck, reference fallback
# ------------------------------------------------------------------------------------------------
def test_bad_input(gen):
    T = 2
    grads, inputs, base = make_case(gen, T, [10, 20], torch.float32, True)
    with pytest.raises(RuntimeError, match="grads has 1 tensors"):
        ops.coef_grad(grads[:1], inputs, base, T)
    with pytest.raises(RuntimeError, match=r"grads\[1\] has shape"):
        ops.coef_grad([grads[0], grads[1][:19]], inputs, base, T)
    with pytest.raises(RuntimeError, match="float32 or the inputs' dtype"):
        ops.coef_grad([g.bfloat16() for g in grads], inputs, base, T)
    with pytest.raises(RuntimeError, match="one dtype per list"):
        bf = [x.bfloat16() for x in inputs]
        ops.coef_grad([grads[0], grads[1].bfloat16()], bf, [b.bfloat16() for b in base], T)
    with pytest.raises(ValueError, match="thresholds"):
        ops.coef_grad(grads, inputs, base, T, thresholds=torch.zeros(T, 3))
    with pytest.raises(ValueError, match="thresholds"):
        ops.coef_grad(grads, inputs, base, T, thresholds=[0.1, 0.2, 0.3])
    with pytest.raises(RuntimeError, match="thresholds must have shape"):  # the raw op checks it too
        torch.ops.calm_fast.coef_grad(grads, inputs, base, T, torch.zeros(T, 3), False, [])
    with pytest.raises(RuntimeError, match="masks must be empty or hold"):
        ops.coef_grad(grads, inputs, base, T, masks=[torch.ones(10, dtype=torch.bool)])
    with pytest.raises(RuntimeError, match="not a multiple of num_tasks"):
        ops.coef_grad(grads, inputs[:3], base, T)
    with pytest.raises(ValueError, match="grads holds"):
        ops.coef_grad(grads, [], None, T)


def test_opcheck(gen):
    T = 2
    grads, inputs, base = make_case(gen, T, [5, (3, 4), 1030], torch.float32, True)
    thr = thresholds_for(inputs, base, T)
    C = torch.ops.calm_fast
    torch.library.opcheck(C.coef_grad.default, (grads, inputs, base, T, None, False, []))
    torch.library.opcheck(C.coef_grad.default, (grads, inputs, [], T, thr, True,
                                                random_masks(gen, inputs, packed=True)))


def test_reference_fallback_op_agrees(gen):
    T = 3
    grads, inputs, base = make_case(gen, T, [5, 1030, 64], torch.bfloat16, True)
    masks = random_masks(gen, inputs, packed=False)
    got = ops.coef_grad(grads, inputs, base, T, masks=masks)
    ref = reference.ReferenceOps.coef_grad(grads, inputs, base, T, None, False, masks)
    assert ref.dtype == torch.float32 and ref.shape == (T, 3)
    mag = error_bound(grads, inputs, base, T, masks=masks)
    assert ((got.double() - ref.double()).abs() <= 36 * 2.0**-24 * mag + 2.0**-23 * ref.double().abs()).all()
