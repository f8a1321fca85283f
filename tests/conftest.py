"""Shared test fixtures and bitwise comparison helpers.

Random test data is reproducible: the ``gen`` fixture seeds a generator from a stable hash of the test's
node id (``zlib.crc32``, the same in every process, unlike Python's salted ``hash``), and a failing test
that used ``gen`` prints its seed in a report section.  ``CALM_FAST_TEST_SEED=<int>`` overrides the seed
of every test (to replay a failure with another seed, or to draw fresh data on purpose).
"""
import os
import zlib

import pytest
import torch

import calm_fast  # noqa: F401  (loads the extension, registers the ops)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SEED_ENV = "CALM_FAST_TEST_SEED"


def data_seed(nodeid: str) -> int:
    """The data seed of a test: ``$CALM_FAST_TEST_SEED`` if set, else crc32 of its node id (31 bits)."""
    override = os.environ.get(SEED_ENV, "").strip()
    if override:
        return int(override, 0) % (2**31)
    return zlib.crc32(nodeid.encode("utf-8")) % (2**31)


@pytest.fixture
def gen(request):
    """A fresh random generator per test, seeded by :func:`data_seed` (stable across runs and processes;
    printed when the test fails)."""
    seed = data_seed(request.node.nodeid)
    request.node.calm_fast_seed = seed
    return torch.Generator().manual_seed(seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Attach the data seed to the report of a failing test that used ``gen``."""
    outcome = yield
    report = outcome.get_result()
    seed = getattr(item, "calm_fast_seed", None)
    if seed is not None and report.failed:
        report.sections.append(("calm_fast test seed",
                                f"gen seed {seed} (replay: {SEED_ENV}={seed} pytest '{item.nodeid}')"))


def make_list(gen, T, sizes, dtype=torch.float32, scale=1.0, zeros_frac=0.0, shapes=None):
    """Task-major list of T * len(sizes) random tensors (optionally with masses of exact zeros)."""
    out = []
    for t in range(T):
        for i, n in enumerate(sizes):
            x = torch.randn(n, generator=gen) * scale
            if zeros_frac > 0:
                x[torch.rand(n, generator=gen) < zeros_frac] = 0.0
            x = x.to(dtype)
            if shapes is not None and shapes[i] is not None:
                x = x.reshape(shapes[i])
            out.append(x)
    return out


def float_bits(x):
    """The bit patterns of a float tensor (int32 for fp32, int16 for bf16/fp16)."""
    if x.dtype == torch.float32:
        return x.view(torch.int32)
    if x.dtype in (torch.bfloat16, torch.float16):
        return x.view(torch.int16)
    return x


def assert_same(got, want, what=""):
    """Identical dtype, shape and values; floats by bit pattern (so -0 != +0), any NaN == any NaN."""
    got = got.detach().cpu()
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if got.is_floating_point():
        gn, wn = torch.isnan(got), torch.isnan(want)
        assert torch.equal(gn, wn), f"{what}: NaN positions differ"
        gb, wb = float_bits(got)[~gn], float_bits(want)[~wn]
        if not torch.equal(gb, wb):
            bad = (gb != wb).nonzero().reshape(-1)[:5]
            raise AssertionError(
                f"{what}: {int((gb != wb).sum())} of {gb.numel()} values differ, e.g. "
                f"got {got[~gn][bad].tolist()} want {want[~wn][bad].tolist()}"
            )
    else:
        assert torch.equal(got, want), f"{what}: values differ"


def assert_same_list(got, want, what):
    assert len(got) == len(want), f"{what}: {len(got)} tensors, expected {len(want)}"
    for i, (a, b) in enumerate(zip(got, want)):
        assert_same(a, b, f"{what}[{i}]")
