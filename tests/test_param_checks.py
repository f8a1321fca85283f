"""Method parameters in the Python API: non-finite scaling/weights/alpha/tall_lambdas and non-floating
out_dtype raise ValueError before any computation; out_dtype may be given by name."""
import pytest
import torch

import calm_fast
from calm_fast import methods, ops, selection
from calm_fast.io import ConfigError, save_state_dict
from calm_fast.streaming import merge_checkpoints

NAN, INF = float("nan"), float("inf")
METHODS = {"task_arithmetic": methods.task_arithmetic, "ties_merging": methods.ties_merging,
           "dare_merging": methods.dare_merging, "consensus_merging": methods.consensus_merging}


def make(gen, T=3):
    base = {"a.weight": torch.randn(40, 7, generator=gen), "b.bias": torch.randn(13, generator=gen),
            "ids": torch.arange(4)}
    fts = [{k: (v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v)
            for k, v in base.items()} for _ in range(T)]
    return base, fts


@pytest.fixture
def no_compute(monkeypatch):
    """Every op a merge could run fails the test: the checks must come first."""
    def forbidden(*a, **k):
        raise AssertionError("computation started before the parameters were checked")

    for name in ("weighted_merge", "ties_merge", "consensus_merge"):
        monkeypatch.setattr(ops, name, forbidden)
    monkeypatch.setattr(selection, "kth_smallest_abs", forbidden)


BAD = [
    ("task_arithmetic", {"scaling": NAN}, "scaling"),
    ("task_arithmetic", {"scaling": INF}, "scaling"),
    ("task_arithmetic", {"weights": [1.0, NAN, 1.0]}, "weights"),
    ("task_arithmetic", {"weights": torch.tensor([1.0, 1.0, INF])}, "weights"),
    ("task_arithmetic", {"weights": {"a.weight": [1.0, -INF, 1.0]}}, "weights"),
    ("ties_merging", {"scaling": -INF}, "scaling"),
    ("ties_merging", {"weights": [NAN, 1.0, 1.0]}, "weights"),
    ("ties_merging", {"density": NAN}, "density"),
    ("dare_merging", {"scaling": NAN}, "scaling"),
    ("dare_merging", {"weights": [1.0, 1.0, NAN], "combine": "ties"}, "weights"),
    ("dare_merging", {"p": NAN}, "p"),
    ("consensus_merging", {"alpha": NAN}, "alpha"),
    ("consensus_merging", {"alpha": INF}, "alpha"),
    ("consensus_merging", {"tall_lambdas": NAN}, "tall_lambdas"),
    ("consensus_merging", {"tall_lambdas": [0.5, INF, 0.5]}, "tall_lambdas"),
    ("consensus_merging", {"tall_lambdas": torch.tensor([0.5, 0.5, NAN])}, "tall_lambdas"),
]


@pytest.mark.parametrize("method, kwargs, name", BAD)
def test_nonfinite_parameters_raise_before_computing(gen, no_compute, method, kwargs, name):
    base, fts = make(gen)
    with pytest.raises(ValueError, match=name):
        METHODS[method](base, fts, **kwargs)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.int8, torch.bool, torch.uint8])
def test_integer_out_dtype_raises_before_computing(gen, no_compute, method, dtype):
    base, fts = make(gen)
    with pytest.raises(ValueError, match="out_dtype"):
        METHODS[method](base, fts, out_dtype=dtype)


@pytest.mark.parametrize("method", list(METHODS))
def test_bad_out_dtype_names_raise_before_computing(gen, no_compute, method):
    base, fts = make(gen)
    for bad in ("int32", "bfloat", 3):
        with pytest.raises(ValueError, match="out_dtype"):
            METHODS[method](base, fts, out_dtype=bad)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("name, dtype", [("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16),
                                         ("float16", torch.float16), ("fp32", torch.float32)])
def test_out_dtype_by_name_equals_the_dtype(gen, method, name, dtype):
    base, fts = make(gen)
    kwargs = {"seed": 5} if method == "dare_merging" else {}
    got = METHODS[method](base, fts, out_dtype=name, **kwargs)
    want = METHODS[method](base, fts, out_dtype=dtype, **kwargs)
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    assert got["a.weight"].dtype == dtype and got["ids"].dtype == torch.int64


def test_finite_parameters_are_accepted(gen):
    """The checks let ordinary values through: numpy-free ints, tensors, mappings, negative numbers."""
    base, fts = make(gen)
    a = calm_fast.task_arithmetic(base, fts, scaling=1, weights=torch.tensor([1.0, -0.5, 2.0]))
    b = calm_fast.task_arithmetic(base, fts, scaling=1.0, weights=[1.0, -0.5, 2.0])
    assert all(torch.equal(a[k], b[k]) for k in a)
    calm_fast.consensus_merging(base, fts, tall_lambdas=torch.tensor([0.2, 0.4, 0.6]), alpha=-1)


@pytest.mark.parametrize("kwargs, name", [({"scaling": NAN}, "scaling"), ({"weights": [1.0, INF]}, "weights"),
                                          ({"method": "consensus", "alpha": NAN}, "alpha"),
                                          ({"method": "consensus", "tall_lambdas": [0.5, NAN]}, "tall_lambdas"),
                                          ({"out_dtype": torch.int32}, "out_dtype")])
def test_merge_checkpoints_checks_the_same(tmp_path, gen, kwargs, name):
    base, fts = make(gen, T=2)
    save_state_dict(base, tmp_path / "base")
    for i, f in enumerate(fts):
        save_state_dict(f, tmp_path / f"ft{i}")
    kwargs = dict(kwargs)
    method = kwargs.pop("method", "ta")
    with pytest.raises(ConfigError, match=name):
        merge_checkpoints(str(tmp_path / "base"), [str(tmp_path / "ft0"), str(tmp_path / "ft1")], method,
                          output=str(tmp_path / "out"), **kwargs)
    assert not (tmp_path / "out").exists()


def test_merge_checkpoints_trust_pickle_must_be_a_bool(tmp_path, gen):
    base, fts = make(gen, T=1)
    save_state_dict(base, tmp_path / "base")
    save_state_dict(fts[0], tmp_path / "ft0")
    with pytest.raises(ConfigError, match="trust_pickle"):
        merge_checkpoints(str(tmp_path / "base"), [str(tmp_path / "ft0")], "ta", trust_pickle="false")
