"""Every native op against its pure-PyTorch reference (calm_fast.reference.ReferenceOps) on fresh
random inputs: odd sizes, empty and 1-element tensors, mixed-size lists, ties at the threshold, masses
of zeros, ±0, inf/NaN counting, all dtypes, fine-tuned or task-vector inputs, DARE; plus opcheck,
determinism, thread-count independence and bad-input errors."""
import pytest
import torch

from calm_fast import ops
from calm_fast.reference import ReferenceOps as R

from conftest import DTYPES, make_list

C = torch.ops.calm_fast
SIZES = [[1], [0, 5], [1000, 1, 33, 4097], [70001, 3]]


def _case(gen, T, sizes, dtype, with_base, zeros_frac=0.3):
    inputs = make_list(gen, T, sizes, dtype, zeros_frac=zeros_frac)
    base = None
    if with_base:
        base = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
        inputs = [(x.float() + base[i % len(sizes)].float()).to(dtype) for i, x in enumerate(inputs)]
    return inputs, base or []


def _tables(gen, T, L):
    w = torch.rand(T, L, generator=gen) + 0.1
    thr = torch.rand(T, L, generator=gen) * 0.8
    keys = torch.randint(-2**62, 2**62, (T, L), generator=gen)
    return w, thr, keys


def _assert_lists_equal(a, b, exact=True, atol=0.0, rtol=0.0):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        if exact:
            assert torch.equal(x, y), (x - y).abs().max()
        else:
            torch.testing.assert_close(x, y, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes", SIZES)
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("dare_p", [0.0, 0.4])
def test_histogram_matches_reference(gen, dtype, sizes, with_base, dare_p):
    T = 3
    inputs, base = _case(gen, T, sizes, dtype, with_base)
    _, _, keys = _tables(gen, T, len(sizes))
    keys = keys if dare_p else None
    for prefix in [None, torch.tensor([0, 0x3f00, -1])]:
        bins = ops.HIST_HIGH_BINS if prefix is None else ops.HIST_LOW_BINS
        h1 = torch.zeros(T, bins, dtype=torch.int64)
        h2 = torch.zeros(T, bins, dtype=torch.int64)
        C.abs_histogram_(h1, inputs, base, T, prefix, dare_p, keys, True)
        R.abs_histogram_(h2, inputs, base, T, prefix, dare_p, keys, True)
        assert torch.equal(h1, h2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes", SIZES)
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("variant", ["plain", "thresholds", "strict", "bool_masks", "packed_masks", "dare"])
@pytest.mark.parametrize("out_float", [False, True])
def test_weighted_merge_matches_reference(gen, dtype, sizes, with_base, variant, out_float):
    T, L = 3, len(sizes)
    inputs, base = _case(gen, T, sizes, dtype, with_base)
    w, thr, keys = _tables(gen, T, L)
    kw = dict(thresholds=None, strict=False, masks=[], dare_p=0.0, dare_keys=None)
    if variant in ("thresholds", "strict"):
        kw.update(thresholds=thr, strict=variant == "strict")
    if variant in ("bool_masks", "packed_masks"):
        bools = [torch.rand(x.shape, generator=gen) < 0.5 for x in inputs]
        kw["masks"] = bools if variant == "bool_masks" else [ops.pack_mask(m) for m in bools]
    if variant == "dare":
        kw.update(dare_p=0.3, dare_keys=keys)
    args = (inputs, base, T, w, 0.7, kw["thresholds"], kw["strict"], kw["masks"], kw["dare_p"], kw["dare_keys"],
            True, out_float)
    out, nf = C.weighted_merge(*args)
    ref, nf_ref = R.weighted_merge(*args)
    _assert_lists_equal(list(out), ref)
    assert int(nf) == int(nf_ref) == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes", SIZES)
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("merge", ["sum", "mean", "max"])
@pytest.mark.parametrize("zero_sign", [1, -1, 0])
def test_ties_merge_matches_reference(gen, dtype, sizes, with_base, merge, zero_sign):
    T, L = 4, len(sizes)
    inputs, base = _case(gen, T, sizes, dtype, with_base)
    if not with_base:  # exact cancellations: task 1 = -task 0 on every tensor
        for l in range(L):
            inputs[L + l] = -inputs[l]
    w, thr, keys = _tables(gen, T, L)
    zs = torch.full((L,), zero_sign, dtype=torch.int64)
    args = (inputs, base, T, thr, False, w, merge, 0.5, zs, 0.0, None, True, False, 1 << 20)
    out, ss, pos, patch, cancel, nf = C.ties_merge(*args)
    r_out, r_ss, r_pos, r_patch, r_cancel, r_nf = R.ties_merge(*args)
    _assert_lists_equal(list(out), r_out)
    assert torch.equal(ss, r_ss) and torch.equal(cancel, r_cancel) and int(nf) == int(r_nf) == 0
    order = torch.argsort(pos)
    assert torch.equal(pos[order], r_pos)
    assert torch.equal(patch[order], r_patch)


def test_ties_cancellations_recorded_and_capped(gen):
    x = torch.randn(5000, generator=gen)
    inputs = [x, -x]
    thr = torch.zeros(2, 1)
    w = torch.ones(2, 1)
    zs = torch.ones(1, dtype=torch.int64)
    out, ss, pos, patch, cancel, _ = C.ties_merge(inputs, [], 2, thr, False, w, "sum", 1.0, zs, 0.0, None, True,
                                                  False, 100)
    # more cancellations than max_positions: none recorded (all or nothing)
    assert int(cancel[0]) == 5000 and pos.numel() == 0 and patch.shape == (0, 3) and int(ss[0]) == 0
    # zero sign +1 keeps the positive value of each pair
    assert torch.equal(out[0], x.abs())


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("simd", ["1", "0"])
def test_ties_positions_all_or_nothing(gen, monkeypatch, threads, simd):
    """positions/patch: every cancelled position in ascending order when there are at most max_positions,
    else none -- never more than max_positions, whatever the thread count (it used to be up to
    max_positions per thread), and the same as the reference."""
    monkeypatch.setenv("CALM_FAST_CPU_SIMD", simd)
    sizes = [200003, 70001, 5]  # several 64K work units: every thread finds cancellations
    T, L = 3, len(sizes)
    inputs = make_list(gen, T, sizes)
    for l, n in enumerate(sizes):  # task 1 = -task 0 where task 2 is zero (exact cancellation), ~2 %
        where = torch.rand(n, generator=gen) < 0.02
        inputs[L + l] = torch.where(where, -inputs[l], inputs[L + l])
        inputs[2 * L + l] = torch.where(where, torch.zeros(()), inputs[2 * L + l])
    w, thr, _ = _tables(gen, T, L)
    thr.zero_()
    zs = torch.ones(L, dtype=torch.int64)
    args = (inputs, [], T, thr, False, w.fill_(1.0), "mean", 0.5, zs, 0.0, None, True, False)
    r_pos, r_patch, r_cancel = R.ties_merge(*args, 1 << 40)[2:5]
    total = int(r_cancel.sum())
    assert total > 1000 and r_pos.numel() == total
    n_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for cap in [0, 3, total - 1, total, total + 1, 1 << 40]:
            _, _, pos, patch, cancel, _ = C.ties_merge(*args, cap)
            assert torch.equal(cancel, r_cancel)
            if total <= cap:
                assert torch.equal(pos, r_pos) and torch.equal(patch, r_patch)  # ascending, all of them
            else:
                assert pos.shape == (0,) and patch.shape == (0, 3), (cap, pos.shape)
            ref = R.ties_merge(*args, cap)
            assert torch.equal(pos, ref[2]) and torch.equal(patch, ref[3])
    finally:
        torch.set_num_threads(n_threads)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes", SIZES)
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("given_mtl", [False, True])
@pytest.mark.parametrize("min_count", [0, 2, 5])
def test_consensus_merge_matches_reference(gen, dtype, sizes, with_base, given_mtl, min_count):
    T = 4
    inputs, base = _case(gen, T, sizes, dtype, with_base)
    lam = torch.tensor([0.2, 0.4, 0.6, 0.5])
    mtl = [torch.randn(n, generator=gen) for n in sizes] if given_mtl else []
    args = (inputs, base, T, lam, mtl, min_count, 0.3, True, False)
    out, masks, nf = C.consensus_merge(*args)
    r_out, r_masks, r_nf = R.consensus_merge(*args)
    _assert_lists_equal(list(out), r_out)
    _assert_lists_equal(list(masks), r_masks)
    assert int(nf) == int(r_nf)


def test_nonfinite_counted(gen):
    x = torch.randn(100, generator=gen)
    x[3] = float("nan")
    x[7] = float("inf")
    y = torch.randn(100, generator=gen)
    w = torch.ones(2, 1)
    _, nf = C.weighted_merge([x, y], [], 2, w, 1.0, None, False, [], 0.0, None, True, False)
    assert int(nf) == 2
    *_, nf = C.ties_merge([x, y], [], 2, torch.zeros(2, 1), False, w, "sum", 1.0, torch.ones(1, dtype=torch.int64),
                          0.0, None, True, False, 10)
    assert int(nf) == 2
    *_, nf = C.consensus_merge([x, y], [], 2, torch.ones(2), [], 1, 1.0, False, False)
    assert int(nf) == 2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rescale", [True, False])
def test_nonfinite_counted_after_dare(gen, dtype, rescale):
    """The non-finite count covers what enters the merge: after DARE, so an inf/NaN that DARE drops is
    not counted (``--p 1`` with a NaN in a dropped entry is not an error), and a survivor whose rescale
    overflows is.  Kernels and reference agree."""
    from calm_fast.reference import dare_reference

    n = 3001
    x = torch.randn(n, generator=gen)
    bad = torch.randperm(n, generator=gen)[:200]
    x[bad[:100]] = float("nan")
    x[bad[100:]] = float("inf")
    y = torch.randn(n, generator=gen)
    inputs = [x.to(dtype), y.to(dtype)]
    keys = torch.tensor([[123456789], [-987654321]])
    w = torch.ones(2, 1)
    zs = torch.ones(1, dtype=torch.int64)
    for p in [0.0, 0.3, 0.9, 1.0]:
        kept = dare_reference(inputs[0].float(), p, int(keys[0, 0]), rescale)
        want = int((~torch.isfinite(kept)).sum())
        if p == 1.0:
            assert want == 0
        elif p > 0:
            assert 0 < want < 200  # some dropped, some kept
        _, nf = C.weighted_merge(inputs, [], 2, w, 1.0, None, False, [], p, keys, rescale, False)
        _, nf_r = R.weighted_merge(inputs, [], 2, w, 1.0, None, False, [], p, keys, rescale, False)
        assert int(nf) == int(nf_r) == want, (p, int(nf), int(nf_r), want)
        tie_args = (inputs, [], 2, torch.zeros(2, 1), False, w, "sum", 1.0, zs, p, keys, rescale, False, 10)
        nf = C.ties_merge(*tie_args)[5]
        nf_r = R.ties_merge(*tie_args)[5]
        assert int(nf) == int(nf_r) == want, (p, int(nf), int(nf_r), want)


def test_nonfinite_counts_rescale_overflow():
    """A finite value whose DARE rescale overflows to inf enters the merge as inf: counted."""
    x = torch.full((64,), 3.0e38)
    keys = torch.tensor([[42]])
    w = torch.ones(1, 1)
    _, nf = C.weighted_merge([x], [], 1, w, 1.0, None, False, [], 0.5, keys, True, False)
    _, nf_r = R.weighted_merge([x], [], 1, w, 1.0, None, False, [], 0.5, keys, True, False)
    survivors = int((philox_kept(64, 42, 0.5)).sum())
    assert 0 < survivors < 64 and int(nf) == int(nf_r) == survivors
    _, nf = C.weighted_merge([x], [], 1, w, 1.0, None, False, [], 0.5, keys, False, False)
    assert int(nf) == 0  # no rescale: nothing overflows


def philox_kept(n, key, p):
    from calm_fast.reference import philox_uniform

    return philox_uniform(torch.arange(n, dtype=torch.int64), key) >= p


def test_signed_zeros_and_inf_thresholds():
    x = torch.tensor([0.0, -0.0, 1.0, -1.0, float("inf")])
    w = torch.ones(1, 1)
    out, _ = C.weighted_merge([x], [], 1, w, 1.0, torch.full((1, 1), float("inf")), True, [], 0.0, None, True, False)
    assert torch.equal(out[0], torch.zeros(5))  # strict > inf keeps nothing
    out, _ = C.weighted_merge([x], [], 1, w, 1.0, torch.zeros(1, 1), False, [], 0.0, None, True, False)
    assert torch.equal(out[0], x)  # >= 0 keeps everything


def test_dare_extremes(gen):
    x = torch.randn(1000, generator=gen)
    w = torch.ones(1, 1)
    keys = torch.tensor([[12345]])
    out, _ = C.weighted_merge([x], [], 1, w, 1.0, None, False, [], 1.0, keys, True, False)
    assert torch.equal(out[0], torch.zeros(1000))  # p = 1: zeros, never NaN
    out, _ = C.weighted_merge([x], [], 1, w, 1.0, None, False, [], 0.5, keys, False, False)
    kept = out[0] != 0
    assert torch.equal(out[0][kept], x[kept])  # no rescale
    assert 400 < int(kept.sum()) < 600


def test_dare_independent_of_threads_and_split(gen):
    """The DARE mask depends only on (key, element index): same with 1 or 2 threads."""
    x = torch.randn(300000, generator=gen)
    w = torch.ones(1, 1)
    keys = torch.tensor([[987654321]])
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a, _ = C.weighted_merge([x], [], 1, w, 1.0, None, False, [], 0.5, keys, True, False)
        torch.set_num_threads(max(2, n))
        b, _ = C.weighted_merge([x], [], 1, w, 1.0, None, False, [], 0.5, keys, True, False)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(a[0], b[0])


def test_deterministic(gen):
    inputs = make_list(gen, 3, [100000, 17])
    thr = torch.full((3, 2), 0.5)
    w = torch.ones(3, 2)
    zs = torch.ones(2, dtype=torch.int64)
    r1 = C.ties_merge(inputs, [], 3, thr, False, w, "mean", 1.0, zs, 0.2, torch.ones(3, 2, dtype=torch.int64),
                      True, False, 10)
    r2 = C.ties_merge(inputs, [], 3, thr, False, w, "mean", 1.0, zs, 0.2, torch.ones(3, 2, dtype=torch.int64),
                      True, False, 10)
    for a, b in zip(r1[0], r2[0]):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))


def test_inputs_not_modified(gen):
    inputs, base = _case(gen, 2, [1000], torch.float32, True)
    before = [x.clone() for x in inputs + base]
    C.ties_merge(inputs, base, 2, torch.full((2, 1), 0.3), False, torch.ones(2, 1), "sum", 1.0,
                 torch.ones(1, dtype=torch.int64), 0.0, None, True, False, 10)
    C.consensus_merge(inputs, base, 2, torch.ones(2), [], 1, 1.0, True, False)
    for a, b in zip(before, inputs + base):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# Bad input: clear errors naming the problem
# ------------------------------------------------------------------------------------------------
def test_bad_inputs():
    x, y = torch.randn(10), torch.randn(11)
    w = torch.ones(2, 1)
    with pytest.raises(RuntimeError, match="shape"):
        C.weighted_merge([x, y], [], 2, w, 1.0, None, False, [], 0.0, None, True, False)
    with pytest.raises(RuntimeError, match="dtype"):
        C.weighted_merge([x, x.double()], [], 2, w, 1.0, None, False, [], 0.0, None, True, False)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        C.weighted_merge([x.long(), x.long()], [], 2, w, 1.0, None, False, [], 0.0, None, True, False)
    with pytest.raises(RuntimeError, match="multiple of num_tasks"):
        C.weighted_merge([x, x, x], [], 2, w, 1.0, None, False, [], 0.0, None, True, False)
    with pytest.raises(RuntimeError, match="weights must have shape"):
        C.weighted_merge([x, x], [], 2, torch.ones(3, 1), 1.0, None, False, [], 0.0, None, True, False)
    with pytest.raises(RuntimeError, match="dare_p"):
        C.weighted_merge([x, x], [], 2, w, 1.0, None, False, [], 1.5, None, True, False)
    with pytest.raises(RuntimeError, match="contiguous"):
        m = torch.randn(4, 6)[:, ::2]
        C.weighted_merge([m, m], [], 2, w, 1.0, None, False, [], 0.0, None, True, False)
    with pytest.raises(RuntimeError, match="merge must be"):
        C.ties_merge([x, x], [], 2, torch.zeros(2, 1), False, w, "median", 1.0, torch.ones(1, dtype=torch.int64),
                     0.0, None, True, False, 10)
    with pytest.raises(RuntimeError, match="base has"):
        C.weighted_merge([x, x], [x, x], 2, w, 1.0, None, False, [], 0.0, None, True, False)


# ------------------------------------------------------------------------------------------------
# torch.library.opcheck (schema, fake/meta kernels, dispatcher consistency)
# ------------------------------------------------------------------------------------------------
def test_opcheck(gen):
    from torch.library import opcheck

    inputs = make_list(gen, 2, [33, 8])
    base = [torch.randn(33, generator=gen), torch.randn(8, generator=gen)]
    w = torch.ones(2, 2)
    thr = torch.full((2, 2), 0.2)
    keys = torch.ones(2, 2, dtype=torch.int64)
    hist = torch.zeros(2, ops.HIST_HIGH_BINS, dtype=torch.int64)
    opcheck(C.abs_histogram_.default, (hist, inputs, base, 2, None, 0.2, keys, True))
    opcheck(C.weighted_merge.default, (inputs, base, 2, w, 0.5, thr, False, [], 0.2, keys, True, False))
    opcheck(C.consensus_merge.default, (inputs, base, 2, torch.ones(2), [], 1, 0.3, True, False))
    opcheck(C.abs_kth_per_tensor.default, (inputs, base, 2, torch.tensor([[5, 8], [33, 0]]), 0.2, keys, True))
    # abs_bracket's candidate rows beyond the counted ones are unspecified (uninitialised memory), so
    # only the schema and dispatcher checks apply to it.
    opcheck(C.abs_bracket.default, (inputs, base, 2, torch.tensor([0.1, 0.0]), torch.tensor([0.5, 1.0]), 64, 0.2,
                                    keys, True), test_utils=("test_schema", "test_autograd_registration",
                                                             "test_faketensor"))
    # ties_merge has data-dependent output sizes (cancelled positions): skip the fake-tensor checks
    # that require static shapes, keep the schema and dispatcher checks.
    opcheck(C.ties_merge.default, (inputs, base, 2, thr, False, w, "sum", 0.3, torch.ones(2, dtype=torch.int64),
                                   0.0, None, True, False, 100),
            test_utils=("test_schema", "test_autograd_registration"))


# ------------------------------------------------------------------------------------------------
# Every threshold rule with values exactly AT the threshold (random thresholds never hit an element):
# P1 trim |x| >= t, P2 (strict) |x| > t, in weighted_merge and ties_merge; TALL |tau| > lambda |m - tau|
# and count >= min_count in consensus_merge.  Sizes put tied elements in the 8-lane AVX2 cores and in
# the scalar tails (a multiple of 8 plus 3, and fewer than 8 elements).
# ------------------------------------------------------------------------------------------------
AT_SIZES = [1003, 5, 16, 1]


def _at_threshold(gen, T, dtype):
    """Inputs where about a third of the entries (and the first two and last three of every tensor) have
    |x| exactly equal to their (task, tensor) threshold, both signs; the rest are random."""
    L = len(AT_SIZES)
    inputs = make_list(gen, T, AT_SIZES, dtype)
    thr = torch.empty(T, L)
    for t in range(T):
        for l, n in enumerate(AT_SIZES):
            x = inputs[t * L + l]
            v = float(x.float().abs().median())  # an element's magnitude: exact in the dtype and in fp32
            at = torch.rand(n, generator=gen) < 0.35
            at[:2] = True
            at[-3:] = True
            sign = torch.where(torch.rand(n, generator=gen) < 0.5, 1.0, -1.0)
            x[at] = (sign[at] * v).to(dtype)
            thr[t, l] = v
    return inputs, thr


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("strict", [False, True], ids=["p1_ge", "p2_gt"])
def test_weighted_merge_trim_at_threshold(gen, dtype, strict):
    T = 3
    inputs, thr = _at_threshold(gen, T, dtype)
    w = torch.tensor([[1.0] * len(AT_SIZES), [0.5] * len(AT_SIZES), [2.0] * len(AT_SIZES)])
    out, _ = C.weighted_merge(inputs, [], T, w, 1.0, thr, strict, [], 0.0, None, True, True)
    ref, _ = R.weighted_merge(inputs, [], T, w, 1.0, thr, strict, [], 0.0, None, True, True)
    _assert_lists_equal(list(out), ref)
    # and the rule itself, written out: an entry exactly at its threshold is kept by P1, dropped by P2
    L = len(AT_SIZES)
    for l in range(L):
        want = torch.zeros(AT_SIZES[l])
        for t in range(T):
            x = inputs[t * L + l].float()
            keep = x.abs() > thr[t, l] if strict else x.abs() >= thr[t, l]
            want = want + w[t, l] * torch.where(keep, x, torch.zeros(()))
        assert torch.equal(out[l], want), l


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("strict", [False, True], ids=["p1_ge", "p2_gt"])
@pytest.mark.parametrize("merge", ["sum", "max"])
def test_ties_merge_trim_at_threshold(gen, dtype, strict, merge):
    T = 3
    inputs, thr = _at_threshold(gen, T, dtype)
    L = len(AT_SIZES)
    w = torch.ones(T, L)
    zs = torch.ones(L, dtype=torch.int64)
    args = (inputs, [], T, thr, strict, w, merge, 1.0, zs, 0.0, None, True, True, 1 << 20)
    out = C.ties_merge(*args)
    ref = R.ties_merge(*args)
    _assert_lists_equal(list(out[0]), ref[0])
    assert torch.equal(out[1], ref[1]) and torch.equal(out[4], ref[4])
    # the kept entries of every task: with T = 1 the TIES output is exactly the trimmed input
    for t in range(T):
        one = [inputs[t * L + l] for l in range(L)]
        res = C.ties_merge(one, [], 1, thr[t:t + 1], strict, torch.ones(1, L), merge, 1.0, zs, 0.0, None, True, True,
                           1 << 20)[0]
        for l in range(L):
            x = one[l].float()
            keep = x.abs() > thr[t, l] if strict else x.abs() >= thr[t, l]
            assert torch.equal(res[l], torch.where(keep, x, torch.zeros(()))), (t, l)


def _dyadic(gen, shape, dtype):
    """Values from {-4, -3.5, ..., 4}: sums, differences and products by 0.5 / 1 / 2 are exact, so
    |tau| == lambda |m - tau| and count == min_count happen often."""
    return (torch.randint(-8, 9, shape, generator=gen).float() / 2).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("given_mtl", [False, True])
@pytest.mark.parametrize("min_count", [1, 2, 3])
def test_consensus_rules_at_threshold(gen, dtype, given_mtl, min_count):
    T = 3
    L = len(AT_SIZES)
    inputs = [_dyadic(gen, (n,), dtype) for _ in range(T) for n in AT_SIZES]
    lam = torch.tensor([0.5, 1.0, 2.0])
    mtl = [_dyadic(gen, (n,), torch.float32) for n in AT_SIZES] if given_mtl else []
    args = (inputs, [], T, lam, mtl, min_count, 1.0, True, True)
    out, masks, _ = C.consensus_merge(*args)
    r_out, r_masks, _ = R.consensus_merge(*args)
    _assert_lists_equal(list(out), r_out)
    _assert_lists_equal(list(masks), r_masks)
    # the rules written out, and proof that the equal cases occur
    ties_tall = ties_count = 0
    for l in range(L):
        taus = [inputs[t * L + l].float() for t in range(T)]
        m = mtl[l] if given_mtl else taus[0] + taus[1] + taus[2]
        bits = [x.abs() > lam[t] * (m - x).abs() for t, x in enumerate(taus)]
        ties_tall += sum(int((x.abs() == lam[t] * (m - x).abs()).sum()) for t, x in enumerate(taus))
        count = sum(b.long() for b in bits)
        ties_count += int((count == min_count).sum())
        for t in range(T):
            assert torch.equal(ops.unpack_mask(masks[t * L + l], AT_SIZES[l]), bits[t]), (l, t)
        assert torch.equal(out[l], torch.where(count >= min_count, m, torch.zeros(()))), l
    assert ties_tall > 50 and ties_count > 10


@pytest.mark.parametrize("combine", ["task_arithmetic", "ties"])
def test_dare_p1_drops_nan_end_to_end(gen, combine):
    """``p = 1`` drops every entry, NaN included: the in-memory method and the streaming merger return
    θ0 without a non-finite error (they used to fail for a value that is not in the result, CLI exit 5).
    A NaN that DARE keeps is still an error."""
    from calm_fast import methods
    from calm_fast.streaming import merge_checkpoints

    base = {"a.weight": torch.randn(40, 30, generator=gen), "b.bias": torch.randn(70, generator=gen)}
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in base.items()} for _ in range(2)]
    fts[1]["a.weight"][3, 4] = float("nan")
    got = methods.dare_merging(base, fts, p=1.0, combine=combine, seed=1)
    streamed = merge_checkpoints(base, fts, "dare_merging", p=1.0, combine=combine, seed=1).state_dict
    for k, v in base.items():
        assert torch.equal(got[k], v) and torch.equal(streamed[k], v)
    with pytest.raises(ValueError, match="inf or NaN"):
        methods.dare_merging(base, fts, p=1e-7, combine=combine, seed=1)  # (nearly) everything kept
