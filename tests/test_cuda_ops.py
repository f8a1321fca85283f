"""The CUDA kernels (csrc/cuda/*.cu) against the CPU kernels, bit for bit.

Backend: the real CUDA ops (``torch.ops.calm_fast.*`` on cuda tensors) when a GPU is visible, else the
same .cu sources compiled with the CPU emulator (``torch.ops.calm_fast_emu.*`` from calm_fast._C_emu,
built with ``CALM_FAST_BUILD_EMU=1``).  The expected result is always the CPU op ``torch.ops.calm_fast.*``
on the same inputs: histograms, outputs (fp32 / bf16 / fp16 / out_float), packed masks, sign sums,
cancel counts and non-finite counts must be identical (floats compared by bit pattern, NaN == NaN);
ties positions (ascending, all or nothing) are compared exactly with their patch rows.  abs_bracket: identical counts; its candidates
(in unspecified order) as sorted sets when they fit the capacity, else as a sub-multiset of values strictly
inside (lo, hi).

Under the emulator, CALM_FAST_EMU_SMS (default 4) sets the "number of SMs", hence the grids: the tests
use sizes well above grid * chunk so that grid-stride loops, tail chunks and tensors smaller than a
chunk all occur, and repeat some cases with 1 SM and with permuted / reversed thread and block orders
(CALM_FAST_EMU_ORDER, read at every launch).  The whole file can also be run with the order forced:
    CALM_FAST_EMU_ORDER=permute:1 python -m pytest tests/test_cuda_ops.py -q
The tests named ``test_small_*`` run one quick case of every op; benchmarks/gpu_check.sh runs them
(``-k small``) under compute-sanitizer on a GPU.
"""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

import calm_fast._C  # noqa: F401  (CPU ops: torch.ops.calm_fast.*)

from conftest import assert_same, assert_same_list  # noqa: F401  (test_cuda_calm_ops imports them from here)

try:
    import calm_fast._C_emu  # noqa: F401  (emulated CUDA ops: torch.ops.calm_fast_emu.*)

    _EMU_ERROR = None
except ImportError as e:  # pragma: no cover - depends on the build
    _EMU_ERROR = e

CPU = torch.ops.calm_fast
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DT_IDS = ["f32", "bf16", "f16"]
HIGH_BINS, LOW_BINS = 1 << 15, 1 << 16
_ON_GPU = torch.cuda.is_available()

# Tensor sizes of the lists: empty, 1-element, odd, around the 1024-element merge chunk and the
# 16384-element level-0 histogram chunk, a 2-D one; the large ones make grid-stride loops happen.
SIZES = [0, 1, 7, (3, 11), 1023, 1025, 5000, 16391, 24000]


@pytest.fixture(params=["cuda" if _ON_GPU else "emu"])
def backend(request):
    """The CUDA implementation under test: ops namespace + device."""
    if request.param == "cuda":
        return SimpleNamespace(name="cuda", ops=torch.ops.calm_fast, device=torch.device("cuda"))
    if _EMU_ERROR is not None:
        pytest.skip(
            "no GPU and calm_fast._C_emu is not built (build it with CALM_FAST_BUILD_EMU=1 pip install "
            f"--no-build-isolation -e .): {_EMU_ERROR}"
        )
    return SimpleNamespace(name="emu", ops=torch.ops.calm_fast_emu, device=torch.device("cpu"))


@pytest.fixture(params=["default", "sms1", "permute:1", "reverse"])
def emu_env(request, monkeypatch, backend):
    """Emulator settings: default, a 1-SM device (grid 1 histogram, 8-block merges), permuted and
    reversed fiber/block orders.  Only meaningful for the emulated backend."""
    if request.param != "default" and backend.name != "emu":
        pytest.skip("emulator setting")
    if request.param == "sms1":
        monkeypatch.setenv("CALM_FAST_EMU_SMS", "1")
    elif request.param != "default":
        monkeypatch.setenv("CALM_FAST_EMU_ORDER", request.param)
    return request.param


# ----------------------------------------------------------------------------------------------------
# Inputs and comparison
# ----------------------------------------------------------------------------------------------------
def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _shape(s):
    return s if isinstance(s, tuple) else (s,)


def _numel(s):
    n = 1
    for d in _shape(s):
        n *= d
    return n


def make_tasks(g, T, sizes, dtype, *, zeros=0.25, nonfinite=False, cancel=False, quant=8.0):
    """T*L task-major tensors: values on a coarse grid (exact ties), masses of +0 and -0, optional
    inf/NaN, optional exact cancellations (task 1 = -task 0 and task 2.. = 0 on the first half)."""
    out = []
    for t in range(T):
        for s in sizes:
            n = _numel(s)
            x = torch.randn(n, generator=g)
            if quant:
                x = torch.round(x * quant) / quant
            r = torch.rand(n, generator=g)
            x[r < zeros] = 0.0
            x[(r >= zeros) & (r < zeros * 1.5)] = -0.0
            out.append(x)
    L = len(sizes)
    if cancel and T >= 2:
        for l, s in enumerate(sizes):
            h = _numel(s) // 2
            out[L + l][:h] = -out[l][:h]
            for t in range(2, T):
                out[t * L + l][:h] = 0.0
    if nonfinite:
        for l, s in enumerate(sizes):
            n = _numel(s)
            if n >= 5:
                x = out[(l % T) * L + l]
                x[n // 5] = float("inf")
                x[2 * n // 5] = float("-inf")
                x[3 * n // 5] = float("nan")
    return [x.to(dtype).reshape(_shape(s)) for x, s in zip(out, sizes * T)]


def make_base(g, sizes, dtype):
    return [(torch.round(torch.randn(_numel(s), generator=g) * 4) / 4).to(dtype).reshape(_shape(s)) for s in sizes]


def as_inputs(tau, base):
    """Fine-tuned weights base + tau (in the list's dtype) when there is a base, else tau itself."""
    if not base:
        return tau
    L = len(base)
    return [(t.float() + base[i % L].float()).to(t.dtype) for i, t in enumerate(tau)]


def thresholds_from(g, tau, T, L):
    """[T, L] thresholds equal to an existing |tau| value (ties at the threshold) or 0."""
    thr = torch.zeros(T, L)
    for t in range(T):
        for l in range(L):
            x = tau[t * L + l].reshape(-1).float().abs()
            x = x[torch.isfinite(x)]
            if x.numel() > 0:
                thr[t, l] = x[torch.randint(x.numel(), (1,), generator=g)].item()
    return thr


def dare_keys(g, T, L):
    return torch.randint(-(2**62), 2**62, (T, L), generator=g, dtype=torch.int64)


def to_dev(x, backend):
    if x is None:
        return None
    if isinstance(x, (list, tuple)):
        return [t.to(backend.device) for t in x]
    return x.to(backend.device)


# ----------------------------------------------------------------------------------------------------
# abs_histogram_
# ----------------------------------------------------------------------------------------------------
def _histograms(backend, inputs, base, T, dare_p, keys, rescale, seed_hist):
    L = len(inputs) // T
    h_cpu = seed_hist.clone()
    CPU.abs_histogram_(h_cpu, inputs, base, T, None, dare_p, keys, rescale)
    h_dev = seed_hist.to(backend.device, copy=True)  # updated in place
    backend.ops.abs_histogram_(h_dev, to_dev(inputs, backend), to_dev(base, backend), T, None, dare_p,
                               to_dev(keys, backend), rescale)
    assert_same(h_dev, h_cpu, "level-0 histogram")
    # Level 1 on the bucket holding each task's median key; one task skipped (prefix -1).
    counts = (h_cpu - seed_hist).cumsum(1)
    total = counts[:, -1]
    prefix = torch.searchsorted(counts, (total // 2).reshape(-1, 1), right=True).reshape(-1).clamp(max=HIGH_BINS - 1)
    if T > 1:
        prefix[1] = -1
    seed1 = torch.randint(0, 1000, (T, LOW_BINS), generator=_gen(3))
    h1_cpu = seed1.clone()
    CPU.abs_histogram_(h1_cpu, inputs, base, T, prefix, dare_p, keys, rescale)
    h1_dev = seed1.to(backend.device, copy=True)
    backend.ops.abs_histogram_(h1_dev, to_dev(inputs, backend), to_dev(base, backend), T,
                               to_dev(prefix, backend), dare_p, to_dev(keys, backend), rescale)
    assert_same(h1_dev, h1_cpu, "level-1 histogram")
    return h_cpu - seed_hist, h1_cpu - seed1


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("with_base", [False, True], ids=["tau", "base"])
def test_abs_histogram(backend, emu_env, dtype, with_base):
    g = _gen(11)
    T = 3
    sizes = SIZES + [40000]
    tau = make_tasks(g, T, sizes, dtype, zeros=0.3, nonfinite=True)
    base = make_base(g, sizes, dtype) if with_base else []
    inputs = as_inputs(tau, base)
    seed = torch.randint(0, 1000, (T, HIGH_BINS), generator=g)
    h0, h1 = _histograms(backend, inputs, base, T, 0.0, None, False, seed)
    assert int(h0.sum()) == T * sum(_numel(s) for s in sizes)
    assert int(h1.sum()) > 0


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("p", [0.3, 1.0])
def test_abs_histogram_dare(backend, dtype, rescale, p):
    g = _gen(12)
    T = 2
    sizes = [1, 1000, 20000]
    tau = make_tasks(g, T, sizes, dtype, zeros=0.0, quant=0)
    keys = dare_keys(g, T, len(sizes))
    _histograms(backend, tau, [], T, p, keys, rescale, torch.zeros(T, HIGH_BINS, dtype=torch.long))


def test_abs_histogram_zeros_and_single_bucket(backend, emu_env):
    # All elements in one level-0 bucket and many equal keys: the warp-aggregated atomics.
    T = 2
    x = [torch.zeros(30000), torch.full((5000,), 1.5), torch.tensor([-0.0, 0.0, 1.5, -1.5, 3.0])]
    inputs = x + [-t for t in x]
    _histograms(backend, inputs, [], T, 0.0, None, False, torch.zeros(T, HIGH_BINS, dtype=torch.long))


def test_abs_histogram_empty_lists(backend):
    h = to_dev(torch.zeros(2, HIGH_BINS, dtype=torch.long), backend)
    backend.ops.abs_histogram_(h, [], [], 2, None, 0.0, None, False)
    backend.ops.abs_histogram_(h, to_dev([torch.empty(0), torch.empty(0)], backend), [], 2, None, 0.0, None, False)
    assert int(h.sum()) == 0
    h1 = to_dev(torch.zeros(2, LOW_BINS, dtype=torch.long), backend)
    backend.ops.abs_histogram_(h1, to_dev([torch.ones(10), torch.ones(10)], backend), [], 2,
                               to_dev(torch.tensor([-1, -1]), backend), 0.0, None, False)
    assert int(h1.sum()) == 0


def test_abs_histogram_rejects_bad_arguments(backend):
    x = to_dev([torch.ones(10)], backend)
    with pytest.raises(RuntimeError, match="hist must be"):
        backend.ops.abs_histogram_(to_dev(torch.zeros(1, 10, dtype=torch.long), backend), x, [], 1, None, 0.0,
                                   None, False)
    with pytest.raises(RuntimeError, match="level-0 bucket"):
        backend.ops.abs_histogram_(to_dev(torch.zeros(1, LOW_BINS, dtype=torch.long), backend), x, [], 1,
                                   to_dev(torch.tensor([HIGH_BINS]), backend), 0.0, None, False)


# ----------------------------------------------------------------------------------------------------
# abs_bracket
# ----------------------------------------------------------------------------------------------------
def _taus_f32(inputs, base):
    """The fp32 tau the kernels see: input - base in fp32 (or the input)."""
    L = len(base)
    if not base:
        return [x.float() for x in inputs]
    return [x.float() - base[i % L].float() for i, x in enumerate(inputs)]


def bracket_bounds(taus, T, kinds):
    """fp32 [T] lo, hi per task from the task's sorted finite |tau| values (ties at lo and hi):
    'mid' a narrow bracket inside, 'equal' lo == hi at an existing value, 'zero_lo' lo = 0,
    'inf_hi' hi = inf, 'all' lo = 0 and hi = inf (every finite non-zero value inside)."""
    L = len(taus) // T
    lo, hi = torch.zeros(T), torch.zeros(T)
    for t, kind in enumerate(kinds):
        a = torch.cat([taus[t * L + l].reshape(-1).abs() for l in range(L)] + [torch.zeros(0)])
        a = torch.sort(a[torch.isfinite(a)]).values
        q = (lambda f: float(a[min(int(f * a.numel()), a.numel() - 1)])) if a.numel() else (lambda f: 0.5)
        lo[t], hi[t] = {"mid": (q(0.55), q(0.65)), "equal": (q(0.7), q(0.7)), "zero_lo": (0.0, q(0.5)),
                        "inf_hi": (q(0.9), float("inf")), "all": (0.0, float("inf"))}[kind]
    return lo, hi


def _sub_multiset(got, full):
    """Every value of `got` occurs in `full` at least as often (both 1-D)."""
    if got.numel() == 0:
        return True
    vg, cg = torch.unique(got, return_counts=True)
    vf, cf = torch.unique(full, return_counts=True)
    if vf.numel() == 0:
        return False
    i = torch.searchsorted(vf, vg).clamp(max=vf.numel() - 1)
    return bool((vf[i] == vg).all()) and bool((cf[i] >= cg).all())


def _bracket(backend, inputs, base, T, lo, hi, capacities, p=0.0, keys=None, rescale=False, check_counts=False):
    """abs_bracket on the backend at each capacity against the CPU op: identical counts; the candidate
    set equal to the CPU's complete one when it fits, else min(count, capacity) values, each strictly
    inside (lo, hi), forming a sub-multiset of the complete set.  Returns the counts."""
    n = sum(x.numel() for x in inputs[: len(inputs) // T]) if inputs else 0
    want_c, full = CPU.abs_bracket(inputs, base, T, lo, hi, n, p, keys, rescale)  # room for every candidate
    if check_counts:  # the CPU op itself against torch (no DARE): float compares of |tau| equal key compares
        L = len(inputs) // T
        taus = _taus_f32(inputs, base)
        for t in range(T):
            a = torch.cat([taus[t * L + l].reshape(-1).abs() for l in range(L)] + [torch.zeros(0)])
            ref = [(a < lo[t]).sum(), (a == lo[t]).sum(), ((a > lo[t]) & (a < hi[t])).sum(),
                   ((a == hi[t]) & (hi[t] > lo[t])).sum()]
            assert want_c[t].tolist() == [int(r) for r in ref], (t, want_c[t].tolist(), ref)
    for cap in capacities:
        c, k = backend.ops.abs_bracket(to_dev(inputs, backend), to_dev(base, backend), T, to_dev(lo, backend),
                                       to_dev(hi, backend), cap, p, to_dev(keys, backend), rescale)
        assert c.device.type == backend.device.type and k.device.type == backend.device.type
        assert_same(c, want_c, f"abs_bracket counts (capacity {cap})")
        assert k.dtype == torch.float32 and tuple(k.shape) == (T, cap), (k.dtype, k.shape)
        k = k.cpu()
        for t in range(T):
            inside = int(want_c[t, 2])
            everything = torch.sort(full[t, :inside]).values
            got = torch.sort(k[t, : min(inside, cap)]).values
            if inside <= cap:
                assert_same(got, everything, f"abs_bracket candidates of task {t} (capacity {cap})")
            else:
                assert bool(((got > lo[t]) & (got < hi[t])).all()), f"task {t}: a candidate outside (lo, hi)"
                assert _sub_multiset(got, everything), f"task {t}: candidates not a sub-multiset (capacity {cap})"
    return want_c


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("with_base", [False, True], ids=["tau", "base"])
def test_abs_bracket(backend, dtype, with_base):
    g = _gen(61)
    T = 5
    tau = make_tasks(g, T, SIZES, dtype, zeros=0.3, nonfinite=True)
    base = make_base(g, SIZES, dtype) if with_base else []
    inputs = as_inputs(tau, base)
    lo, hi = bracket_bounds(_taus_f32(inputs, base), T, ["mid", "equal", "zero_lo", "inf_hi", "all"])
    c = _bracket(backend, inputs, base, T, lo, hi, [1 << 17, 300], check_counts=True)
    assert int(c[0, 1]) > 0 and int(c[0, 3]) > 0 and int(c[0, 2]) > 300  # ties at both ends; over 300
    assert int(c[1, 2]) == 0 and int(c[1, 3]) == 0  # lo == hi: nothing inside, all ties "at lo"
    assert int(c[3, 3]) > 0  # the injected inf values sit at hi = inf (NaN counts nowhere)


def test_abs_bracket_emulator_settings(backend, emu_env):
    g = _gen(62)
    T = 3
    tau = make_tasks(g, T, SIZES, torch.bfloat16, zeros=0.1, quant=0)
    base = make_base(g, SIZES, torch.bfloat16)
    inputs = as_inputs(tau, base)
    keys = dare_keys(g, T, len(SIZES))
    lo, hi = bracket_bounds(_taus_f32(inputs, base), T, ["mid", "all", "equal"])
    _bracket(backend, inputs, base, T, lo, hi, [1 << 17, 1000], 0.3, keys, True)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("p,rescale", [(0.4, True), (0.25, False), (1.0, True)])
def test_abs_bracket_dare(backend, dtype, p, rescale):
    g = _gen(63)
    T = 2
    sizes = [1, 31, 4097, 9000]
    tau = make_tasks(g, T, sizes, dtype, zeros=0.05, quant=0)
    keys = dare_keys(g, T, len(sizes))
    lo, hi = bracket_bounds(_taus_f32(tau, []), T, ["mid", "zero_lo"])
    c = _bracket(backend, tau, [], T, lo, hi, [1 << 15, 64], p, keys, rescale)
    if p == 1.0:  # everything dropped: all values are 0, below task 0's bracket, at task 1's lo = 0
        n = sum(_numel(s) for s in sizes)
        assert c[0].tolist() == [n, 0, 0, 0] and c[1].tolist() == [0, n, 0, 0]


@pytest.mark.parametrize("capacity", [0, 1, 37, "exact", "exact+1"])
def test_abs_bracket_capacity(backend, emu_env, capacity):
    # Over capacity the counts stay exact and the first `capacity` slots all hold genuine candidates.
    g = _gen(64)
    T = 2
    sizes = [20000, 1, 9000]
    tau = make_tasks(g, T, sizes, torch.float32, zeros=0.2)
    lo, hi = bracket_bounds(tau, T, ["all", "mid"])
    want = CPU.abs_bracket(tau, [], T, lo, hi, 0, 0.0, None, False)[0]
    if isinstance(capacity, str):
        capacity = int(want[0, 2]) + (capacity == "exact+1")
    _bracket(backend, tau, [], T, lo, hi, [capacity])


def test_abs_bracket_stage_overflow(backend, monkeypatch):
    # One task of 17 full chunks on a 1-SM emulated device (grid 8): blocks meet several chunks of the
    # task in a row, so the warps' 512-float candidate buffers fill up and flush mid-task.
    monkeypatch.setenv("CALM_FAST_EMU_SMS", "1")
    g = _gen(65)
    x = [torch.randn(17 * 4096, generator=g) + 0.01, torch.randn(5, generator=g)]
    lo, hi = torch.tensor([0.0]), torch.tensor([float("inf")])
    c = _bracket(backend, x, [], 1, lo, hi, [1 << 17, 17 * 4096 - 3, 5000])
    assert int(c[0, 2]) > 17 * 4096 - 10


def test_abs_bracket_edge_cases(backend):
    # Empty lists, all-empty tensors, 1-element tensors, +-0 / inf / NaN values, lo = hi = 0 and inf.
    for T in (1, 3):
        lo, hi = torch.zeros(T), torch.ones(T)
        c, k = backend.ops.abs_bracket([], [], T, to_dev(lo, backend), to_dev(hi, backend), 5, 0.0, None, False)
        assert c.shape == (T, 4) and int(c.abs().sum()) == 0 and k.shape == (T, 5)
        c, k = backend.ops.abs_bracket(to_dev([torch.empty(0), torch.empty(0, 2)] * T, backend), [], T,
                                       to_dev(lo, backend), to_dev(hi, backend), 3, 0.0, None, False)
        assert int(c.abs().sum()) == 0 and k.shape == (T, 3)
    vals = torch.tensor([0.0, -0.0, 1.0, -1.0, 2.0, float("inf"), float("-inf"), float("nan"), 0.5, -3.0])
    xs = [v.reshape(1) for v in vals]  # ten 1-element tensors per task
    for lo_v, hi_v in [(0.0, 0.0), (0.0, 1.0), (1.0, 1.0), (0.5, float("inf")), (float("inf"), float("inf")),
                       (0.0, float("inf")), (-0.0, 2.0)]:
        for dtype in DTYPES:
            x = [t.to(dtype) for t in xs + [-t for t in xs]]
            _bracket(backend, x, [], 2, torch.tensor([lo_v, lo_v]), torch.tensor([hi_v, hi_v]), [0, 2, 10],
                     check_counts=True)


def test_abs_bracket_rejects_bad_arguments(backend):
    x = [torch.ones(10), torch.ones(10)]
    cases = [
        (dict(lo=torch.tensor([0.5, 0.2]), hi=torch.tensor([1.0, 0.1])), "0 <= lo <= hi"),
        (dict(lo=torch.tensor([-0.5, 0.0]), hi=torch.tensor([1.0, 1.0])), "0 <= lo <= hi"),
        (dict(lo=torch.tensor([float("nan"), 0.0]), hi=torch.tensor([1.0, 1.0])), "0 <= lo <= hi"),
        (dict(lo=torch.zeros(3), hi=torch.ones(2)), "lo must have shape"),
        (dict(lo=torch.zeros(2, dtype=torch.float64), hi=torch.ones(2)), "lo must have dtype"),
        (dict(capacity=-1), "capacity must be >= 0"),
        (dict(p=0.5), "dare_p > 0 needs dare_keys"),
        (dict(inputs=[torch.ones(10), torch.ones(10, dtype=torch.float16)]), "has dtype"),
        (dict(inputs=[torch.ones(10)] * 3), "not a multiple of num_tasks"),
    ]
    for kw, msg in cases:
        a = dict(inputs=x, lo=torch.zeros(2), hi=torch.ones(2), capacity=4, p=0.0)
        a.update(kw)
        args = lambda dev: (to_dev(a["inputs"], dev), [], 2, to_dev(a["lo"], dev), to_dev(a["hi"], dev),
                            a["capacity"], a["p"], None, False)
        with pytest.raises(RuntimeError, match=msg) as cpu_err:
            CPU.abs_bracket(*args(SimpleNamespace(device=torch.device("cpu"))))
        with pytest.raises(RuntimeError, match=msg) as dev_err:
            backend.ops.abs_bracket(*args(backend))
        assert str(cpu_err.value).splitlines()[0] == str(dev_err.value).splitlines()[0]


# ----------------------------------------------------------------------------------------------------
# weighted_merge
# ----------------------------------------------------------------------------------------------------
def _weighted(backend, inputs, base, T, weights, scale, thr, strict, masks, p, keys, rescale, out_float):
    want = CPU.weighted_merge(inputs, base, T, weights, scale, thr, strict, masks, p, keys, rescale, out_float)
    got = backend.ops.weighted_merge(to_dev(inputs, backend), to_dev(base, backend), T, to_dev(weights, backend),
                                     scale, to_dev(thr, backend), strict, to_dev(masks, backend), p,
                                     to_dev(keys, backend), rescale, out_float)
    assert_same_list(got[0], want[0], "weighted_merge outputs")
    assert_same(got[1], want[1], "weighted_merge nonfinite")
    return want


def _masks(g, tau, kind):
    if kind == "none":
        return []
    bools = [torch.rand(t.numel(), generator=g) < 0.6 for t in tau]
    if kind == "bool":
        return [b.reshape(t.shape) for b, t in zip(bools, tau)]
    packed = []
    for b in bools:
        n = b.numel()
        pad = torch.zeros((n + 7) // 8 * 8, dtype=torch.uint8)
        pad[:n] = b.to(torch.uint8)
        w = (pad.reshape(-1, 8) << torch.arange(8, dtype=torch.uint8)).sum(1).to(torch.uint8)
        packed.append(w)
    return packed


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("out_float", [False, True], ids=["out_in", "out_f32"])
@pytest.mark.parametrize("with_base", [False, True], ids=["tau", "base"])
def test_weighted_merge(backend, dtype, out_float, with_base):
    g = _gen(21)
    T = 3
    tau = make_tasks(g, T, SIZES, dtype, nonfinite=True)
    L = len(SIZES)
    base = make_base(g, SIZES, dtype) if with_base else []
    inputs = as_inputs(tau, base)
    weights = torch.randn(T, L, generator=g)
    weights[0, 0] = 0.0
    want = _weighted(backend, inputs, base, T, weights, 0.3, None, False, [], 0.0, None, False, out_float)
    assert int(want[1]) > 0  # the injected inf/NaN were seen


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("mask_kind", ["none", "bool", "packed"])
@pytest.mark.parametrize("strict", [None, False, True], ids=["no_trim", "trim_ge", "trim_gt"])
def test_weighted_merge_trim_masks(backend, dtype, mask_kind, strict):
    g = _gen(22)
    T = 2
    sizes = [1, 9, (5, 7), 1030, 9000]
    tau = make_tasks(g, T, sizes, dtype)
    L = len(sizes)
    thr = None if strict is None else thresholds_from(g, tau, T, L)
    weights = torch.rand(T, L, generator=g) + 0.5
    _weighted(backend, tau, [], T, weights, 1.0, thr, bool(strict), _masks(g, tau, mask_kind), 0.0, None, False,
              False)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("p,rescale", [(0.5, True), (0.3, False), (1.0, True), (1.0, False)])
def test_weighted_merge_dare(backend, emu_env, dtype, p, rescale):
    g = _gen(23)
    T = 3
    sizes = [1, 31, 1025, 12000]
    tau = make_tasks(g, T, sizes, dtype, quant=0, zeros=0.05)
    base = make_base(g, sizes, dtype)
    inputs = as_inputs(tau, base)
    L = len(sizes)
    thr = thresholds_from(g, tau, T, L)
    _weighted(backend, inputs, base, T, torch.randn(T, L, generator=g), 0.7, thr, False, [], p, dare_keys(g, T, L),
              rescale, True)


def test_weighted_merge_emulator_settings(backend, emu_env):
    g = _gen(24)
    T = 4
    tau = make_tasks(g, T, SIZES, torch.bfloat16, nonfinite=True)
    L = len(SIZES)
    _weighted(backend, tau, [], T, torch.randn(T, L, generator=g), 0.5, thresholds_from(g, tau, T, L), True,
              _masks(g, tau, "packed"), 0.2, dare_keys(g, T, L), True, False)


def test_weighted_merge_empty(backend):
    got = backend.ops.weighted_merge([], [], 2, to_dev(torch.zeros(2, 0), backend), 1.0, None, False, [], 0.0,
                                     None, False, False)
    assert got[0] == [] and int(got[1]) == 0
    x = to_dev([torch.empty(0), torch.empty(0, 3)], backend)
    got = backend.ops.weighted_merge(x, [], 1, to_dev(torch.ones(1, 2), backend), 1.0, None, False, [], 0.0,
                                     None, False, False)
    assert got[0][0].shape == (0,) and got[0][1].shape == (0, 3) and int(got[1]) == 0


# ----------------------------------------------------------------------------------------------------
# ties_merge
# ----------------------------------------------------------------------------------------------------
def _ties(backend, inputs, base, T, thr, strict, weights, merge, scale, zero_sign, p, keys, rescale, out_float,
          max_positions):
    args = (thr, strict, weights, merge, scale, zero_sign, p, keys, rescale, out_float)
    # CPU reference with room for every cancelled position.
    want = CPU.ties_merge(inputs, base, T, *args, 1 << 40)
    d = [to_dev(a, backend) if isinstance(a, torch.Tensor) else a for a in args]
    got = backend.ops.ties_merge(to_dev(inputs, backend), to_dev(base, backend), T, *d, max_positions)
    out, sign_sum, positions, patch, cancel, nonfinite = got
    assert_same_list(out, want[0], "ties outputs")
    assert_same(sign_sum, want[1], "ties sign sums")
    assert_same(cancel, want[4], "ties cancel counts")
    assert_same(nonfinite, want[5], "ties nonfinite")
    total = int(want[4].sum())
    assert total == want[2].numel()
    # All or nothing, in ascending flat order: every cancelled position when they fit max_positions, else none.
    P = total if total <= max_positions else 0
    assert positions.shape == (P,) and patch.shape == (P, 3), (positions.shape, patch.shape, P)
    assert positions.dtype == torch.int64 and patch.dtype == torch.float32
    positions, patch = positions.cpu(), patch.cpu()
    if P:
        assert torch.equal(positions, want[2]), "positions differ from the CPU's (or are not ascending)"
        assert_same(patch, want[3], "ties patch rows")
    return want


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("merge", ["sum", "mean", "max"])
@pytest.mark.parametrize("out_float", [False, True], ids=["out_in", "out_f32"])
def test_ties_merge(backend, dtype, merge, out_float):
    g = _gen(31)
    T = 3
    L = len(SIZES)
    tau = make_tasks(g, T, SIZES, dtype, cancel=True, nonfinite=(merge == "sum"))
    thr = thresholds_from(g, tau, T, L)
    thr[:, 1] = 0.0
    weights = torch.ones(T, L)
    weights[2, 4] = 0.5
    zero_sign = torch.tensor([1, -1, 0] * L)[:L]
    want = _ties(backend, tau, [], T, thr, False, weights, merge, 0.4, zero_sign, 0.0, None, False, out_float, 1 << 20)
    assert int(want[4].sum()) > 0  # cancellations happened


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("strict", [False, True])
def test_ties_merge_base_strict(backend, dtype, strict):
    g = _gen(32)
    T = 4
    sizes = [1, 40, 1024, (3, 700), 8000]
    L = len(sizes)
    tau = make_tasks(g, T, sizes, dtype, cancel=True)
    base = make_base(g, sizes, dtype)
    inputs = as_inputs(tau, base)
    thr = thresholds_from(g, [(x.float() - base[i % L].float()) for i, x in enumerate(inputs)], T, L)
    weights = torch.rand(T, L, generator=g) + 0.25
    zero_sign = torch.tensor([-1, 0, 1, 1, -1])
    _ties(backend, inputs, base, T, thr, strict, weights, "mean", 1.3, zero_sign, 0.0, None, False, False, 1 << 20)


@pytest.mark.parametrize("max_positions", [0, 1, 37, 1000, 1 << 20])
def test_ties_merge_position_cap(backend, emu_env, max_positions):
    g = _gen(33)
    T = 2
    sizes = [3000, 1, 5000]
    tau = make_tasks(g, T, sizes, torch.float32, cancel=True, zeros=0.1)
    thr = torch.zeros(T, len(sizes))
    want = _ties(backend, tau, [], T, thr, False, torch.ones(T, len(sizes)), "sum", 1.0, torch.tensor([1, 1, -1]),
                 0.0, None, False, False, max_positions)
    assert 1000 < int(want[4].sum()) < (1 << 20)  # the cap matters for all but the largest max_positions


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("merge", ["sum", "max"])
def test_ties_merge_dare(backend, emu_env, dtype, merge):
    g = _gen(34)
    T = 3
    sizes = [1, 17, 1025, 7000]
    L = len(sizes)
    tau = make_tasks(g, T, sizes, dtype, cancel=True, quant=4.0)
    thr = thresholds_from(g, tau, T, L)
    _ties(backend, tau, [], T, thr, False, torch.ones(T, L), merge, 0.5, torch.tensor([0, 1, -1, 1]), 0.4,
          dare_keys(g, T, L), True, True, 1 << 20)


@pytest.mark.parametrize("T", [16, 17], ids=["staged", "reloaded"])
@pytest.mark.parametrize("dare", [False, True], ids=["plain", "dare"])
def test_ties_merge_many_tasks(backend, T, dare):
    # Up to 16 tasks the kernel stages the values in shared memory (64 KiB at 16), beyond it reloads them.
    g = _gen(35)
    sizes = [3, 1500, 2100]
    L = len(sizes)
    tau = make_tasks(g, T, sizes, torch.bfloat16, cancel=True, quant=2.0, nonfinite=True)
    thr = thresholds_from(g, tau, T, L)
    thr[1] = thr[0]  # task 1 = -task 0 on the first halves: cancellations survive the trim
    weights = torch.rand(T, L, generator=g) + 0.5
    weights[1] = weights[0]
    keys = dare_keys(g, T, L) if dare else None
    want = _ties(backend, tau, [], T, thr, True, weights, "mean", 1.0,
                 torch.tensor([1, 0, -1]), 0.25 if dare else 0.0, keys, False, False, 1 << 20)
    assert int(want[4].sum()) > 0


def test_ties_merge_empty(backend):
    got = backend.ops.ties_merge([], [], 2, to_dev(torch.zeros(2, 0), backend), False,
                                 to_dev(torch.zeros(2, 0), backend), "sum", 1.0,
                                 to_dev(torch.zeros(0, dtype=torch.long), backend), 0.0, None, False, False, 10)
    assert got[0] == [] and got[2].shape == (0,) and got[3].shape == (0, 3) and int(got[5]) == 0
    x = to_dev([torch.empty(0), torch.empty(0)], backend)
    got = backend.ops.ties_merge(x, [], 2, to_dev(torch.zeros(2, 1), backend), False,
                                 to_dev(torch.ones(2, 1), backend), "mean", 1.0,
                                 to_dev(torch.zeros(1, dtype=torch.long), backend), 0.0, None, False, False, 10)
    assert got[0][0].shape == (0,) and int(got[4].sum()) == 0 and got[2].shape == (0,)


# ----------------------------------------------------------------------------------------------------
# consensus_merge
# ----------------------------------------------------------------------------------------------------
def _consensus(backend, inputs, base, T, lambdas, mtl, min_count, alpha, return_masks, out_float):
    want = CPU.consensus_merge(inputs, base, T, lambdas, mtl, min_count, alpha, return_masks, out_float)
    got = backend.ops.consensus_merge(to_dev(inputs, backend), to_dev(base, backend), T, to_dev(lambdas, backend),
                                      to_dev(mtl, backend), min_count, alpha, return_masks, out_float)
    assert_same_list(got[0], want[0], "consensus outputs")
    assert_same_list(got[1], want[1], "consensus packed masks")
    assert_same(got[2], want[2], "consensus nonfinite")
    return want


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("out_float", [False, True], ids=["out_in", "out_f32"])
@pytest.mark.parametrize("with_base", [False, True], ids=["tau", "base"])
def test_consensus_merge(backend, dtype, out_float, with_base):
    g = _gen(41)
    T = 3
    tau = make_tasks(g, T, SIZES, dtype, quant=2.0, nonfinite=True)  # coarse grid: |tau| == lam |mtl - tau| ties
    base = make_base(g, SIZES, dtype) if with_base else []
    inputs = as_inputs(tau, base)
    lambdas = torch.tensor([1.0, 0.5, 0.25])
    want = _consensus(backend, inputs, base, T, lambdas, [], 2, 0.8, True, out_float)
    assert int(want[2]) > 0


@pytest.mark.parametrize("min_count", [0, 1, 2, 4])
@pytest.mark.parametrize("given_mtl", [False, True])
@pytest.mark.parametrize("return_masks", [False, True])
def test_consensus_merge_options(backend, min_count, given_mtl, return_masks):
    g = _gen(42)
    T = 3
    sizes = [1, 8, 9, 33, (4, 63), 1100, 6000]
    tau = make_tasks(g, T, sizes, torch.bfloat16, quant=2.0)
    L = len(sizes)
    mtl = []
    if given_mtl:
        mtl = [sum(tau[t * L + l].float() for t in range(T)).reshape(-1) * 0.5 for l in range(L)]
        mtl[0] = mtl[0].reshape(_shape(sizes[0]))
    _consensus(backend, tau, [], T, torch.tensor([0.2, 1.0, 0.6]), mtl, min_count, 1.5, return_masks, False)


def test_consensus_merge_emulator_settings(backend, emu_env):
    g = _gen(43)
    T = 5
    tau = make_tasks(g, T, SIZES, torch.float16, quant=2.0, nonfinite=True)
    base = make_base(g, SIZES, torch.float16)
    _consensus(backend, as_inputs(tau, base), base, T, torch.tensor([0.2, 0.3, 0.4, 0.5, 1.0]), [], 2, 1.0, True,
               True)


def test_consensus_merge_empty(backend):
    got = backend.ops.consensus_merge([], [], 2, to_dev(torch.ones(2), backend), [], 1, 1.0, True, False)
    assert got[0] == [] and got[1] == [] and int(got[2]) == 0
    x = to_dev([torch.empty(0), torch.empty(0)], backend)
    got = backend.ops.consensus_merge(x, [], 2, to_dev(torch.ones(2), backend), [], 1, 1.0, True, False)
    assert got[0][0].shape == (0,) and [m.shape for m in got[1]] == [(0,), (0,)]


# ----------------------------------------------------------------------------------------------------
# "small": one quick case of every op (base, DARE, a partial chunk, tiny tensors) for
# benchmarks/gpu_check.sh, which runs `-k small` under compute-sanitizer memcheck and racecheck.
# ----------------------------------------------------------------------------------------------------
SMALL_SIZES = [1, 33, (3, 5), 1025, 4500]


def _small_case(dtype=torch.bfloat16, T=3, seed=71, **kw):
    g = _gen(seed)
    tau = make_tasks(g, T, SMALL_SIZES, dtype, **kw)
    base = make_base(g, SMALL_SIZES, dtype)
    return g, tau, base, as_inputs(tau, base), len(SMALL_SIZES)


@pytest.mark.parametrize("dare", [False, True], ids=["plain", "dare"])
def test_small_abs_histogram(backend, dare):
    g, tau, base, inputs, L = _small_case(nonfinite=True)
    keys = dare_keys(g, 3, L) if dare else None
    _histograms(backend, inputs, base, 3, 0.3 if dare else 0.0, keys, True,
                torch.zeros(3, HIGH_BINS, dtype=torch.long))


@pytest.mark.parametrize("dare", [False, True], ids=["plain", "dare"])
def test_small_abs_bracket(backend, dare):
    g, tau, base, inputs, L = _small_case(nonfinite=True)
    keys = dare_keys(g, 3, L) if dare else None
    lo, hi = bracket_bounds(_taus_f32(inputs, base), 3, ["mid", "equal", "all"])
    _bracket(backend, inputs, base, 3, lo, hi, [1 << 14, 100], 0.3 if dare else 0.0, keys, True)


def test_small_weighted_merge(backend):
    g, tau, base, inputs, L = _small_case(nonfinite=True)
    _weighted(backend, inputs, base, 3, torch.randn(3, L, generator=g), 0.5, thresholds_from(g, tau, 3, L), True,
              _masks(g, tau, "packed"), 0.2, dare_keys(g, 3, L), True, False)


def test_small_ties_merge(backend):
    g, tau, base, inputs, L = _small_case(cancel=True)
    thr = thresholds_from(g, tau, 3, L)
    _ties(backend, inputs, base, 3, thr, False, torch.ones(3, L), "sum", 0.5, torch.tensor([1, -1, 0, 1, -1]), 0.3,
          dare_keys(g, 3, L), True, False, 50)


def test_small_consensus_merge(backend):
    g, tau, base, inputs, L = _small_case(dtype=torch.float16, quant=2.0, nonfinite=True)
    _consensus(backend, inputs, base, 3, torch.tensor([0.2, 0.5, 1.0]), [], 2, 1.0, True, False)


# ----------------------------------------------------------------------------------------------------
# Determinism: two runs of every op are bitwise equal (the results do not depend on the order).
# ----------------------------------------------------------------------------------------------------
def test_repeatable(backend):
    g = _gen(51)
    T = 3
    sizes = [5, 2000, 9000]
    L = len(sizes)
    tau = to_dev(make_tasks(g, T, sizes, torch.bfloat16, cancel=True), backend)
    thr = to_dev(torch.zeros(T, L), backend)
    ones = to_dev(torch.ones(T, L), backend)
    zs = to_dev(torch.tensor([1, -1, 0]), backend)
    runs = [backend.ops.ties_merge(tau, [], T, thr, False, ones, "mean", 1.0, zs, 0.0, None, False, False, 1 << 20)
            for _ in range(2)]
    assert_same_list(runs[0][0], [x.cpu() for x in runs[1][0]], "ties outputs")
    assert torch.equal(torch.sort(runs[0][2]).values, torch.sort(runs[1][2]).values)
    lam = to_dev(torch.tensor([0.3, 0.5, 0.7]), backend)
    runs = [backend.ops.consensus_merge(tau, [], T, lam, [], 2, 1.0, True, False) for _ in range(2)]
    assert_same_list(runs[0][1], [x.cpu() for x in runs[1][1]], "consensus masks")


# ----------------------------------------------------------------------------------------------------
# Non-finite counts after DARE (what enters the merge), the same as the CPU ops and the reference
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T", [3, 17], ids=["staged", "unstaged"])  # TIES stages T <= 16 in shared memory
def test_nonfinite_counted_after_dare(backend, T):
    from calm_fast.reference import ReferenceOps

    g = _gen(91)
    sizes = [1025, 5000, 7]
    L = len(sizes)
    tau = make_tasks(g, T, sizes, torch.float32)
    for i, x in enumerate(tau):  # many inf/NaN, so that DARE drops some and keeps some
        r = torch.rand(x.shape, generator=g)
        x[r < 0.05] = float("nan")
        x[(r >= 0.05) & (r < 0.08)] = float("inf")
    keys = dare_keys(g, T, L)
    w = torch.ones(T, L)
    zs = torch.ones(L, dtype=torch.int64)
    for p in [0.0, 0.5, 1.0]:
        wargs = (T, w, 1.0, None, False, [], p, keys, True, False)
        want = int(ReferenceOps.weighted_merge(tau, [], *wargs)[1])
        assert (want == 0) == (p == 1.0)
        assert int(CPU.weighted_merge(tau, [], *wargs)[1]) == want
        got = backend.ops.weighted_merge(to_dev(tau, backend), [], T, *[to_dev(a, backend) if isinstance(a, torch.Tensor)
                                                                        else a for a in wargs[1:]])
        assert int(got[1]) == want, (p, int(got[1]), want)
        targs = (torch.zeros(T, L), False, w, "sum", 1.0, zs, p, keys, True, False, 1 << 20)
        assert int(ReferenceOps.ties_merge(tau, [], T, *targs)[5]) == want
        assert int(CPU.ties_merge(tau, [], T, *targs)[5]) == want
        got = backend.ops.ties_merge(to_dev(tau, backend), [], T,
                                     *[to_dev(a, backend) if isinstance(a, torch.Tensor) else a for a in targs])
        assert int(got[5]) == want, (p, int(got[5]), want)
