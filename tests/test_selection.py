"""Exact global k-th magnitude selection: bit-identical to torch.kthvalue on the concatenation."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from calm_fast import ops, selection

from conftest import DTYPES, make_list


def _kth_ref(xs, k, base=None):
    parts = []
    for l, x in enumerate(xs):
        v = x.float()
        if base is not None:
            v = v - base[l].float()
        parts.append(v.abs().reshape(-1))
    cat = torch.cat(parts)
    return torch.kthvalue(cat, k).values


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes", [[1], [7], [1000, 1, 33, 0, 4097], [70001]])
def test_kth_matches_kthvalue(gen, dtype, sizes):
    T = 3
    xs = make_list(gen, T, sizes, dtype)
    L = len(sizes)
    n = sum(sizes)
    ks = [1, n, max(1, n // 2)]
    thr = selection.kth_smallest_abs(xs, None, T, ks)
    for t in range(T):
        want = _kth_ref(xs[t * L:(t + 1) * L], ks[t])
        assert thr.dtype == torch.float32
        assert thr[t].view(torch.int32) == want.view(torch.int32), (t, thr[t], want)


def test_kth_with_base_and_zeros_and_ties(gen):
    """Fine-tuned inputs (τ on the fly), masses of exact zeros, ±0 and exact ties at the threshold."""
    T, sizes = 2, [5000, 123]
    base = [torch.randn(n, generator=gen) for n in sizes]
    xs = []
    for t in range(T):
        for l, n in enumerate(sizes):
            tau = torch.randn(n, generator=gen).round(decimals=1)  # many exact ties
            tau[: n // 2] = 0.0
            tau[n // 2: n // 2 + 10] = -0.0
            xs.append(base[l] + tau)
    n = sum(sizes)
    for k in [1, n // 2, n // 2 + 1, n - 7, n]:
        thr = selection.kth_smallest_abs(xs, base, T, [k, k])
        for t in range(T):
            want = _kth_ref(xs[t * 2:(t + 1) * 2], k, base)
            assert thr[t].item() == want.item()


def test_kth_inf_and_k_zero(gen):
    xs = [torch.tensor([1.0, float("inf"), -2.0, 0.5])]
    assert selection.kth_smallest_abs(xs, None, 1, [4]).item() == float("inf")
    assert selection.kth_smallest_abs(xs, None, 1, [3]).item() == 2.0
    assert selection.kth_smallest_abs(xs, None, 1, [0]).item() == selection.KEEP_ALL


def test_k_out_of_range(gen):
    xs = [torch.randn(10, generator=gen)]
    with pytest.raises(ValueError, match="k out of range"):
        selection.kth_smallest_abs(xs, None, 1, [11])


def test_streaming_finder_equals_resident(gen):
    """Histograms add: feeding tensors one at a time gives the resident result."""
    T, sizes = 2, [300, 1, 4500, 77]
    xs = make_list(gen, T, sizes)
    L = len(sizes)
    ks = [100, 4000]
    finder = selection.ThresholdFinder(T, ks)
    for _ in range(2):
        for l in range(L):
            finder.add([xs[t * L + l] for t in range(T)])
        if finder.level == 0:
            finder.next_level()
    assert torch.equal(finder.thresholds(), selection.kth_smallest_abs(xs, None, T, ks))


def test_histogram_counts_past_uint32_flush(gen):
    """The op's int64 histogram is accumulated across calls (the path past 2^31 elements per task)."""
    x = torch.randn(1000, generator=gen)
    hist = torch.zeros(1, ops.HIST_HIGH_BINS, dtype=torch.int64)
    for _ in range(3):
        ops.abs_histogram_(hist, [x], None, 1)
    assert int(hist.sum()) == 3000


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(allow_nan=False, width=32), min_size=1, max_size=200), st.data())
def test_kth_property(values, data):
    x = torch.tensor(values, dtype=torch.float32)
    k = data.draw(st.integers(1, x.numel()))
    split = data.draw(st.integers(0, x.numel()))
    xs = [x[:split].contiguous(), x[split:].contiguous()]
    got = selection.kth_smallest_abs(xs, None, 1, [k])
    assert got.view(torch.int32) == torch.kthvalue(x.abs(), k).values.view(torch.int32)


def test_rank_helpers():
    assert selection.topk_fraction_to_k(10, 0.2) == 8
    assert selection.topk_fraction_to_k(10, 1.0) == 0
    assert selection.strict_topk_to_k(100, 0.05) == 96
    assert selection.strict_topk_to_k(10, 0.01) == 0
    with pytest.raises(ValueError):
        selection.topk_fraction_to_k(10, 0.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("dare_p", [0.0, 0.5])
def test_bracket_op_matches_reference(gen, dtype, with_base, dare_p):
    from calm_fast.reference import ReferenceOps

    T, sizes = 2, [3000, 1, 0, 777]
    xs = make_list(gen, T, sizes, dtype, zeros_frac=0.2)
    base = [torch.randn(n, generator=gen).to(dtype) for n in sizes] if with_base else []
    keys = torch.randint(-2**62, 2**62, (T, len(sizes)), generator=gen) if dare_p else None
    lo = torch.tensor([0.0, 0.3])
    hi = torch.tensor([0.5, 0.3])  # task 1: lo == hi
    for cap in [0, 5, 100000]:
        c1, k1 = torch.ops.calm_fast.abs_bracket(xs, base, T, lo, hi, cap, dare_p, keys, True)
        c2, k2 = ReferenceOps.abs_bracket(xs, base, T, lo, hi, cap, dare_p, keys, True)
        assert torch.equal(c1, c2)
        for t in range(T):
            m = min(cap, int(c1[t, 2]))
            if int(c1[t, 2]) <= cap:  # complete: the same set
                assert torch.equal(torch.sort(k1[t, :m]).values, torch.sort(k2[t, :m]).values)


@pytest.mark.parametrize("data", ["gaussian", "zeros", "periodic", "constant", "two_values"])
def test_bracket_select_exact_with_and_without_fallback(gen, data):
    """'auto' (bracket) and 'radix' agree with kthvalue on inputs built to defeat the sample:
    masses of zeros at the threshold, a period that matches the sample stride, all-equal values."""
    n = 300_000
    if data == "gaussian":
        x = torch.randn(n, generator=gen)
    elif data == "zeros":
        x = torch.randn(n, generator=gen)
        x[: n // 2] = 0.0
    elif data == "periodic":
        stride = max(1, n // 65536)
        x = torch.rand(n, generator=gen) + 10.0
        x[::stride] = 0.001  # the sample sees only these
    elif data == "constant":
        x = torch.full((n,), -0.25)
    else:
        x = torch.where(torch.rand(n, generator=gen) < 0.8, torch.tensor(1.0), torch.tensor(2.0))
    xs = [x[: n // 3].contiguous(), x[n // 3:].contiguous()]
    for k in [1, n // 5, n // 2, n // 2 + 1, 4 * n // 5, n]:
        want = torch.kthvalue(x.abs(), k).values
        for method in ["auto", "radix"]:
            got = selection.kth_smallest_abs(xs, None, 1, [k], method=method)
            assert got.view(torch.int32) == want.view(torch.int32), (data, k, method)


def test_p2_strict_rule_keeps_at_most_k_minus_one(gen):
    """CALM / Localize-and-Stitch init (P2): k = int(s*N), threshold = k-th largest, keep |x| > t."""
    xs = [torch.randn(5000, generator=gen), torch.randn(123, generator=gen)]
    n = 5123
    for frac in [1e-3, 0.05, 0.5]:
        k = int(frac * n)
        rank = selection.strict_topk_to_k(n, frac)
        t = selection.kth_smallest_abs(xs, None, 1, [rank])
        cat = torch.cat(xs).abs()
        assert t.item() == torch.topk(cat, k).values.min().item()
        assert int((cat > t).sum()) == k - 1  # distinct values: exactly k - 1 kept
        out, _ = ops.weighted_merge(xs, None, 1, 1.0, 1.0, thresholds=t.reshape(1, 1).expand(1, 2), strict=True)
        assert sum(int((o != 0).sum()) for o in out) == k - 1


# ------------------------------------------------------------------------------------------------
# Per-tensor selection in one op call (per-tensor TIES thresholds)
# ------------------------------------------------------------------------------------------------
def _per_tensor_loop(xs, base, T, ks, dare_p=0.0, keys=None):
    """The k-th |tau| of every (task, tensor) pair by one kth_smallest_abs call per tensor (the
    per-tensor TIES path before the batched op)."""
    L = len(xs) // T
    out = torch.zeros(T, L)
    for l in range(L):
        if xs[l].numel() == 0:
            continue
        sub = [xs[t * L + l] for t in range(T)]
        dk = keys[:, [l]].contiguous() if keys is not None else None
        out[:, l] = selection.kth_smallest_abs(sub, [base[l]] if base else None, T, ks[:, l].tolist(),
                                               dare_p=dare_p, dare_keys=dk)
    return out


# sizes: tiny, the direct-select limit (16384) and one past it, a histogram-buffered one.
PT_SIZES = [1, 7, 0, 16384, 16385, 70001]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("dare_p", [0.0, 0.3])
def test_kth_per_tensor_op_matches_reference_and_loop(gen, dtype, with_base, dare_p):
    from calm_fast.reference import ReferenceOps

    T, L = 3, len(PT_SIZES)
    xs = make_list(gen, T, PT_SIZES, dtype, zeros_frac=0.2)
    for t in range(T):  # ties: a run of equal magnitudes of both signs in the large tensors
        for l in (3, 5):
            xs[t * L + l][100:3000] = torch.where(torch.rand(2900, generator=gen) < 0.5, 0.75, -0.75).to(dtype)
    base = [torch.randn(n, generator=gen).to(dtype) for n in PT_SIZES] if with_base else []
    keys = torch.randint(-2**62, 2**62, (T, L), generator=gen) if dare_p else None
    sizes = torch.tensor(PT_SIZES)
    ks = (torch.rand(T, L, generator=gen) * (sizes + 1)).long().clamp(max=sizes)
    ks[0] = sizes  # k = n: the largest
    ks[1, :] = torch.minimum(sizes, torch.ones_like(sizes))  # k = 1 (0 for the empty tensor)
    ks[2, 0] = 0  # k = 0: KEEP_ALL
    got = ops.abs_kth_per_tensor(xs, base, T, ks, dare_p, keys, True)
    want = ReferenceOps.abs_kth_per_tensor(xs, base, T, ks, dare_p, keys, True)
    assert got.dtype == torch.float32 and got.shape == (T, L)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    loop = _per_tensor_loop(xs, base, T, ks, dare_p, keys)
    assert torch.equal(got.view(torch.int32), loop.view(torch.int32))
    # through the selection front end
    front = selection.kth_smallest_abs_per_tensor(xs, base or None, T, ks, dare_p=dare_p, dare_keys=keys)
    assert torch.equal(front.view(torch.int32), loop.view(torch.int32))


def test_kth_per_tensor_nonfinite_and_unbuffered(gen):
    """inf/NaN order above every number (key order, as the histogram select); a tensor above the
    per-thread key buffer (2^22) takes the two-pass path."""
    n = (1 << 22) + 5
    big = torch.randn(n, generator=gen)
    big[[3, 10, n - 1]] = torch.tensor([float("inf"), float("nan"), -float("inf")])
    small = torch.randn(20000, generator=gen)
    small[5] = float("nan")
    xs = [big, small]
    ks = torch.tensor([[n // 3, 20000]])
    got = ops.abs_kth_per_tensor(xs, [], 1, ks, 0.0, None, True)
    loop = _per_tensor_loop(xs, [], 1, ks)
    assert torch.equal(got.view(torch.int32), loop.view(torch.int32))
    assert torch.isnan(got[0, 1])


def test_kth_per_tensor_fallback_loop_and_errors(gen, monkeypatch):
    T, sizes = 2, [50, 0, 3000]
    xs = make_list(gen, T, sizes)
    ks = torch.tensor([[10, 0, 3000], [50, 0, 1]])
    native = selection.kth_smallest_abs_per_tensor(xs, None, T, ks)
    monkeypatch.setattr(ops, "has_abs_kth_per_tensor", lambda device: False)  # the non-CPU path
    looped = selection.kth_smallest_abs_per_tensor(xs, None, T, ks)
    assert torch.equal(native.view(torch.int32), looped.view(torch.int32))
    monkeypatch.undo()
    with pytest.raises(ValueError, match="out of range"):
        selection.kth_smallest_abs_per_tensor(xs, None, T, torch.tensor([[51, 0, 1], [1, 0, 1]]))
    with pytest.raises(ValueError, match="shape"):
        selection.kth_smallest_abs_per_tensor(xs, None, T, torch.ones(2, 2, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="ks"):
        ops.abs_kth_per_tensor(xs, [], T, torch.tensor([[51, 0, 1], [1, 0, 1]]), 0.0, None, True)


@pytest.mark.parametrize("dare_p", [0.0, 0.4])
def test_per_tensor_ties_thresholds_unchanged(gen, dare_p):
    """methods.ties per-tensor thresholds (now one batched call per dtype group) equal the per-tensor loop,
    on a mixed-dtype model with fine-tuned inputs."""
    from calm_fast.methods import ties
    from calm_fast.methods._common import prepare

    shapes = {"a": (40, 30), "b": (7,), "c": (300, 70), "d": (17000,), "e": (1,)}
    dtypes = {"a": torch.float32, "b": torch.bfloat16, "c": torch.float32, "d": torch.bfloat16, "e": torch.float32}
    base = {k: torch.randn(s, generator=gen).to(dtypes[k]) for k, s in shapes.items()}
    fts = [{k: (v.float() + 0.1 * torch.randn(v.shape, generator=gen)).to(v.dtype) for k, v in base.items()}
           for _ in range(3)]
    prep = prepare(base, fts, method="ties_merging")
    keys = ops.dare_keys(5, prep.keys, prep.T) if dare_p else None
    got = ties._thresholds(prep, 0.2, "per_tensor", dare_p, keys, True)
    # per tensor = PEFT/mergekit: exactly floor(0.2 n) kept, so the floor(0.2 n)-th largest; none kept -> inf
    ranks = [selection.exact_k_rank(prep.inputs[l].numel(), 0.2) for l in range(prep.L)]
    want = torch.zeros(prep.T, prep.L)
    for l in range(prep.L):  # one dtype per call: tensor by tensor
        if ranks[l] == selection.KEEP_NONE_RANK:
            want[:, l] = float("inf")
            continue
        sub = [prep.inputs[t * prep.L + l] for t in range(prep.T)]
        dk = keys[:, [l]].contiguous() if keys is not None else None
        want[:, l] = selection.kth_smallest_abs(sub, [prep.base[l]], prep.T, [ranks[l]] * prep.T, dare_p=dare_p,
                                                dare_keys=dk)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


# ------------------------------------------------------------------------------------------------
# Inputs that require grad (selection reads them detached)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["auto", "radix"])
def test_kth_on_tensors_requiring_grad(gen, method):
    xs = [torch.randn(5000, generator=gen), torch.randn(300, generator=gen)]
    base = [torch.randn(5000, generator=gen), torch.randn(300, generator=gen)]
    want = selection.kth_smallest_abs(xs, base, 1, [1234], method=method)
    with torch.enable_grad():
        got = selection.kth_smallest_abs([x.clone().requires_grad_() for x in xs],
                                         [b.clone().requires_grad_() for b in base], 1, [1234], method=method)
        ks = torch.tensor([[100, 7]])
        per = selection.kth_smallest_abs_per_tensor([x.clone().requires_grad_() for x in xs], None, 1, ks)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32)) and not got.requires_grad
    assert torch.equal(per, selection.kth_smallest_abs_per_tensor(xs, None, 1, ks))


# ------------------------------------------------------------------------------------------------
# Threshold rules with values exactly AT the threshold
# ------------------------------------------------------------------------------------------------
def test_calm_init_strict_at_threshold(gen):
    """CALM init (P2): entries equal to the k-th largest |tau| are off (-bias), larger ones on."""
    from calm_fast import calm_ops

    x = torch.randn(4000, generator=gen) * 0.1
    x[:50] = 3.0  # 50 clear winners
    x[50:90] = torch.where(torch.arange(40) % 2 == 0, 2.0, -2.0)  # 40 entries tied at the threshold
    frac = 60 / 4000  # k = 60: the 60th largest |x| is 2.0, tied 40 times
    logits = calm_ops.init_mask_logits([x[:2000].contiguous(), x[2000:].contiguous()], fraction=frac, bias=5.0)
    on = torch.cat(logits) > 0
    assert torch.equal(on, x.abs() > 2.0) and int(on.sum()) == 50
