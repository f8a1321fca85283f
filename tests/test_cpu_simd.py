"""The CPU kernels' two paths agree bit for bit: the hand-vectorised AVX2 cores (csrc/cpu/simd_avx2.h,
the default where the build has AVX2) and the generic tile loops (``CALM_FAST_CPU_SIMD=0``).

Inputs are built to reach every branch of the cores: sizes around the 8-lane vector and 1024-element
tile boundaries (tails), exact ties at the thresholds and exact TIES cancellations (small integers),
inf/NaN (counted), negative weights, every zero sign, both trim rules, every dtype, with and without a
base, with DARE (converted rows) and without (rows read in place).  Each path is also checked against the
reference on its own: test_ops / test_selection / test_methods run on the default path, and ``.ci/run``
reruns them with ``CALM_FAST_CPU_SIMD=0``.
"""
import pytest
import torch

import calm_fast
from calm_fast import ops

from conftest import DTYPES

pytestmark = pytest.mark.skipif("cpu vector cores: avx2" not in calm_fast.build_info(),
                                reason="built without AVX2 (-march lacks it): the CPU has one path only")

SIZES = [[1, 7, 8, 9], [1023, 1024, 1025], [70001, 0, 15], [8 * 1024 + 5]]


def _both(monkeypatch, fn):
    """fn() on the generic loops, then on the AVX2 cores."""
    monkeypatch.setenv("CALM_FAST_CPU_SIMD", "0")
    generic = fn()
    monkeypatch.setenv("CALM_FAST_CPU_SIMD", "1")
    return generic, fn()


def _inputs(gen, T, sizes, dtype, with_base, integers):
    """Task-major inputs (fine-tuned weights when with_base), with exact zeros, ties, inf and NaN."""
    taus = []
    for _ in range(T):
        for n in sizes:
            x = torch.randint(-3, 4, (n,), generator=gen).float() if integers else torch.randn(n, generator=gen)
            if n > 50:
                x[torch.randint(0, n, (2,), generator=gen)] = torch.tensor([float("inf"), float("nan")])
            taus.append(x)
    if not with_base:
        return [x.to(dtype) for x in taus], []
    base = [torch.randint(-2, 3, (n,), generator=gen).float().to(dtype) for n in sizes]
    L = len(sizes)
    return [(x + base[i % L].float()).to(dtype) for i, x in enumerate(taus)], base


def _tables(gen, T, L, integers):
    thr = (torch.randint(0, 3, (T, L), generator=gen).float() if integers else torch.rand(T, L, generator=gen))
    w = torch.randn(T, L, generator=gen)
    w[0] = 1.0  # includes +1 weights (exact cancellations survive weighting) and negative ones
    keys = torch.randint(-2**62, 2**62, (T, L), generator=gen)
    return thr, w, keys


def _equal(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    bits_a, bits_b = a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8)
    assert torch.equal(bits_a, bits_b), (a.float() - b.float()).abs().max()  # bitwise: ±0, NaN included


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("dare_p", [0.0, 0.3])
@pytest.mark.parametrize("T", [1, 3, 8])
def test_ties_merge_paths_identical(monkeypatch, gen, dtype, with_base, dare_p, T):
    for sizes in SIZES:
        for integers in (True, False):
            inputs, base = _inputs(gen, T, sizes, dtype, with_base, integers)
            thr, w, keys = _tables(gen, T, len(sizes), integers)
            zs = torch.randint(-1, 2, (len(sizes),), generator=gen)
            for merge in ("sum", "mean", "max"):
                for strict in (False, True):
                    out_float = bool(torch.randint(0, 2, (1,), generator=gen))

                    def run():
                        return ops.ties_merge(inputs, base, T, thr, merge, 0.7, w, zs, strict, dare_p,
                                              keys if dare_p else None, True, out_float, 1 << 20)

                    (o1, s1, p1, q1, c1, n1), (o2, s2, p2, q2, c2, n2) = _both(monkeypatch, run)
                    for a, b in zip(o1, o2):
                        _equal(a, b)
                    assert torch.equal(s1, s2) and torch.equal(c1, c2) and n1 == n2
                    i1, i2 = torch.argsort(p1), torch.argsort(p2)  # thread order varies: compare by position
                    assert torch.equal(p1[i1], p2[i2])
                    _equal(q1[i1], q2[i2])
            # the inf/NaN were counted (with DARE they may all be dropped: counts are taken after DARE)
            assert n1 > 0 or dare_p > 0 or sum(x.numel() for x in inputs) < 50 * T


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("dare_p", [0.0, 0.3])
@pytest.mark.parametrize("T", [1, 4])
def test_weighted_merge_paths_identical(monkeypatch, gen, dtype, with_base, dare_p, T):
    for sizes in SIZES:
        inputs, base = _inputs(gen, T, sizes, dtype, with_base, integers=True)
        thr, w, keys = _tables(gen, T, len(sizes), integers=True)
        for thresholds in (None, thr):
            for strict in (False, True):
                def run():
                    return ops.weighted_merge(inputs, base, T, w, 0.3, thresholds, strict, None, dare_p,
                                              keys if dare_p else None, True, False)

                (o1, n1), (o2, n2) = _both(monkeypatch, run)
                for a, b in zip(o1, o2):
                    _equal(a, b)
                assert n1 == n2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("dare_p", [0.0, 0.3])
def test_abs_bracket_paths_identical(monkeypatch, gen, dtype, with_base, dare_p):
    T = 3
    for sizes in SIZES:
        for integers in (True, False):
            inputs, base = _inputs(gen, T, sizes, dtype, with_base, integers)
            _, _, keys = _tables(gen, T, len(sizes), integers)
            n = sum(sizes)
            lo = torch.tensor([0.5, 1.0, 0.0]) if integers else torch.tensor([0.2, 0.0, 1.5])
            hi = torch.tensor([2.0, 1.0, float("inf")]) if integers else torch.tensor([0.9, 0.3, float("inf")])
            for capacity in (n, 7):
                def run():
                    return ops.abs_bracket(inputs, base, T, lo, hi, capacity, dare_p, keys if dare_p else None, True)

                (c1, k1), (c2, k2) = _both(monkeypatch, run)
                assert torch.equal(c1, c2)
                for t in range(T):
                    m = min(int(c1[t, 2]), capacity)
                    a, b = torch.sort(k1[t, :m]).values, torch.sort(k2[t, :m]).values
                    if m == int(c1[t, 2]):  # complete sets: identical; capped ones: any subset is valid
                        assert torch.equal(a, b)
                    else:
                        assert bool(((b > lo[t]) & (b < hi[t])).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("T", [1, 3, 8])
def test_consensus_merge_paths_identical(monkeypatch, gen, dtype, with_base, T):
    for sizes in SIZES:
        for integers in (True, False):
            inputs, base = _inputs(gen, T, sizes, dtype, with_base, integers)
            lambdas = torch.rand(T, generator=gen) * 1.5
            mtl = [torch.randn(n, generator=gen) for n in sizes]
            for given in (None, mtl):
                for min_count in (0, 2, T, T + 5):
                    out_float = bool(torch.randint(0, 2, (1,), generator=gen))

                    def run():
                        return ops.consensus_merge(inputs, base, T, lambdas, given, min_count, -0.7, True, out_float)

                    (o1, m1, n1), (o2, m2, n2) = _both(monkeypatch, run)
                    for a, b in zip(o1 + m1, o2 + m2):
                        _equal(a, b)
                    assert n1 == n2
