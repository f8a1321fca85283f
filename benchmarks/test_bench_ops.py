"""pytest-benchmark suite: each fused op next to its plain-PyTorch reference, same inputs, same run.

    .venv/bin/python -m pytest benchmarks/test_bench_ops.py --benchmark-group-by=group
    CALM_FAST_BENCH_N=88000000 .venv/bin/python -m pytest benchmarks/test_bench_ops.py   # full size

Compare within a group (calm_fast vs reference); absolute numbers depend on the machine and its load.
benchmarks/report.py prints the same comparison as a table with GB/s and % of copy bandwidth.
No assertions on time here or anywhere in tests.
"""
import os

import pytest
import torch

import calm_fast
from calm_fast import ops, reference, selection

N = int(os.environ.get("CALM_FAST_BENCH_N", 4_000_000))
T = int(os.environ.get("CALM_FAST_BENCH_T", 8))
DTYPE = getattr(torch, os.environ.get("CALM_FAST_BENCH_DTYPE", "float32"))


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    sizes = [N // 4] * 4
    xs = [(torch.randn(s, generator=g) * 1e-3).to(DTYPE) for _ in range(T) for s in sizes]
    names = [f"p{i}" for i in range(4)]
    base = {n: torch.zeros(s, dtype=DTYPE) for n, s in zip(names, sizes)}
    tvs = [{n: xs[t * 4 + l] for l, n in enumerate(names)} for t in range(T)]
    return xs, base, tvs


@pytest.mark.benchmark(group="threshold: exact k-th |x| of one task")
def test_threshold_calm_fast(benchmark, data):
    xs = data[0]
    k = selection.topk_fraction_to_k(N, 0.2)
    benchmark(selection.kth_smallest_abs, xs[:4], None, 1, [k])


@pytest.mark.benchmark(group="threshold: exact k-th |x| of one task")
def test_threshold_reference_kthvalue(benchmark, data):
    xs = data[0]
    k = selection.topk_fraction_to_k(N, 0.2)
    benchmark(lambda: torch.kthvalue(torch.cat([x.float().abs() for x in xs[:4]]), k))


@pytest.mark.benchmark(group="ties: threshold + merge (mean)")
def test_ties_calm_fast(benchmark, data):
    _, base, tvs = data
    benchmark(calm_fast.ties_merging, base, tvs, 0.2, "mean", 0.3)


@pytest.mark.benchmark(group="ties: threshold + merge (mean)")
def test_ties_reference(benchmark, data):
    _, base, tvs = data
    benchmark.pedantic(reference.ties_merging_reference, (base, tvs, 0.2, "mean", 0.3), rounds=2, iterations=1)


@pytest.mark.benchmark(group="task arithmetic")
def test_ta_calm_fast(benchmark, data):
    _, base, tvs = data
    benchmark(calm_fast.task_arithmetic, base, tvs, 0.3)


@pytest.mark.benchmark(group="task arithmetic")
def test_ta_reference(benchmark, data):
    _, base, tvs = data
    benchmark(reference.task_arithmetic_reference, base, tvs, 0.3)


@pytest.mark.benchmark(group="consensus (TALL k=2)")
def test_consensus_calm_fast(benchmark, data):
    _, base, tvs = data
    benchmark(calm_fast.consensus_merging, base, tvs, 0.6, 2, 0.3)


@pytest.mark.benchmark(group="consensus (TALL k=2)")
def test_consensus_reference(benchmark, data):
    _, base, tvs = data
    benchmark(reference.consensus_merging_reference, base, tvs, 0.6, 2, 0.3)


@pytest.mark.benchmark(group="dare + task arithmetic")
def test_dare_calm_fast(benchmark, data):
    _, base, tvs = data
    benchmark(calm_fast.dare_merging, base, tvs, 0.5, 0.3)


# ------------------------------------------------------------------------------------------------
# CALM mask training (per iteration: interpolate once, accumulate per batch, one mask step).  fp32 R and
# A; base, taus and grads in CALM_FAST_BENCH_DTYPE.  Independent of T.
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def calm_data():
    g = torch.Generator().manual_seed(1)
    sizes = [N // 4] * 4

    def lst(scale, dtype=DTYPE):
        return [(torch.randn(s, generator=g) * scale).to(dtype) for s in sizes]

    R = [torch.where(torch.rand(s, generator=g) < 1e-3, 5.0, -5.0) for s in sizes]
    return dict(R=R, A=lst(1.0, torch.float32), base=lst(1.0), prev=lst(1e-3), new=lst(1e-3), grad=lst(1e-6),
                theta=[torch.empty(s, dtype=DTYPE) for s in sizes])


def _fresh(xs):
    return [x.clone() for x in xs]


@pytest.mark.benchmark(group="calm: interpolate (fused)")
def test_calm_interpolate_calm_fast(benchmark, calm_data):
    d = calm_data
    benchmark(ops.calm_interpolate, d["base"], d["prev"], d["new"], d["R"], "fused")


@pytest.mark.benchmark(group="calm: interpolate (fused)")
def test_calm_interpolate_reference(benchmark, calm_data):
    d = calm_data
    benchmark(reference.ReferenceOps.calm_interpolate, d["base"], d["prev"], d["new"], d["R"], "fused", False)


@pytest.mark.benchmark(group="calm: accumulate one batch")
def test_calm_accumulate_calm_fast(benchmark, calm_data):
    d = calm_data
    A = _fresh(d["A"])
    benchmark(ops.calm_accumulate_, A, d["grad"], d["prev"], d["new"], 1e7)


@pytest.mark.benchmark(group="calm: accumulate one batch")
def test_calm_accumulate_reference(benchmark, calm_data):
    d = calm_data
    A = _fresh(d["A"])
    benchmark(reference.ReferenceOps.calm_accumulate_, A, d["grad"], d["prev"], d["new"], 1e7, False)


@pytest.mark.benchmark(group="calm: mask step + theta rewrite")
def test_calm_mask_step_calm_fast(benchmark, calm_data):
    d = calm_data
    R, A = _fresh(d["R"]), _fresh(d["A"])  # A is zeroed by the first round: later rounds step with A = 0
    benchmark(ops.calm_mask_step_, R, A, 1.0, False, d["theta"], d["base"], d["prev"], d["new"])


@pytest.mark.benchmark(group="calm: mask step + theta rewrite")
def test_calm_mask_step_reference(benchmark, calm_data):
    d = calm_data
    R, A = _fresh(d["R"]), _fresh(d["A"])
    benchmark(reference.ReferenceOps.calm_mask_step_, R, A, 1.0, False, d["theta"], d["base"], d["prev"], d["new"],
              "fused")


@pytest.mark.benchmark(group="calm: binarize merge")
def test_calm_binarize_calm_fast(benchmark, calm_data):
    d = calm_data
    benchmark(ops.calm_binarize_merge, d["prev"], d["new"], d["R"])


@pytest.mark.benchmark(group="calm: binarize merge")
def test_calm_binarize_reference(benchmark, calm_data):
    d = calm_data
    benchmark(reference.ReferenceOps.calm_binarize_merge, d["prev"], d["new"], d["R"])
