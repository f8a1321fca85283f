"""calm_fast.compat.mergekit: mergekit's ``sparsify`` semantics, checked against mergekit itself (bitwise for
the deterministic methods) when it is installed and against references written here from its rules."""
from __future__ import annotations

import pytest
import torch

from calm_fast.compat import mergekit as shim

try:
    from mergekit import sparsify as mk
except ImportError:  # pragma: no cover
    mk = None

needs_mergekit = pytest.mark.skipif(mk is None, reason="mergekit is not installed (pip install mergekit==0.1.5)")


def _tensors():
    g = torch.Generator().manual_seed(0)
    big = torch.randn(300, 257, generator=g)                       # selection fast path
    tied = big.clone()
    tied[torch.rand(tied.shape, generator=g) < 0.3] = 0.5          # many exact ties at one magnitude
    small = torch.randn(7, 5, generator=g)
    return {"big": big, "tied": tied, "small": small, "vec": torch.randn(1000, generator=g),
            "bf16": big.to(torch.bfloat16), "zeros": torch.zeros(64)}


def _magnitude_reference(x, density):
    """From mergekit's rule: the first max(1, int(d·n)) of a descending argsort of |x| (fp32)."""
    if density >= 1:
        return x
    k = max(1, int(density * x.numel()))
    mask = torch.zeros(x.numel(), dtype=x.dtype)
    mask[torch.argsort(x.abs().reshape(-1).float(), descending=True)[:k]] = 1
    return x * mask.reshape(x.shape)


@pytest.mark.parametrize("density", [0.0, 0.001, 0.1, 0.5, 0.97, 1.0])
@pytest.mark.parametrize("name", ["big", "tied", "small", "vec", "bf16", "zeros"])
def test_magnitude_keeps_exactly_k(name, density):
    x = _tensors()[name]
    got = shim.sparsify(x, density, shim.SparsificationMethod.magnitude)
    if density <= 0:
        assert torch.equal(got, torch.zeros_like(x))
        return
    assert torch.equal(got, _magnitude_reference(x, density))
    if 0 < density < 1 and name != "zeros":
        assert int((got != 0).sum()) == max(1, int(density * x.numel()))


@needs_mergekit
@pytest.mark.parametrize("norm", [None, "l1", "l2", "linf"])
@pytest.mark.parametrize("name", ["big", "tied", "small", "vec", "bf16"])
def test_deterministic_methods_equal_mergekit_bitwise(name, norm):
    x = _tensors()[name]
    mk_norm = None if norm is None else mk.RescaleNorm(norm)
    for d in (0.05, 0.3, 0.8):
        assert torch.equal(shim.sparsify(x, d, "magnitude", rescale_norm=norm),
                           mk.sparsify(x, d, mk.SparsificationMethod.magnitude, rescale_norm=mk_norm))
        for gamma in (0.0, 0.01, 0.3):
            assert torch.equal(shim.sparsify(x, d, shim.SparsificationMethod.magnitude_outliers, gamma=gamma,
                                             rescale_norm=norm),
                               mk.sparsify(x, d, mk.SparsificationMethod.magnitude_outliers, gamma=gamma,
                                           rescale_norm=mk_norm))
    mask = (torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) < 0.4).to(x.dtype)
    assert torch.equal(shim.rescaled_masked_tensor(x, mask, norm), mk.rescaled_masked_tensor(x, mask, mk_norm))


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_random_keep_rate_and_l1_rescale(density):
    x = torch.randn(200, 300, generator=torch.Generator().manual_seed(2))
    got = shim.sparsify(x, density, "random", rescale_norm="l1", seed=3)
    kept = (got != 0).float().mean().item()
    assert abs(kept - density) < 0.01  # density is the keep probability (mergekit), not the drop rate
    assert torch.allclose(got.abs().sum(), x.abs().sum(), rtol=1e-5)
    nz = got != 0
    ratio = got[nz] / x[nz]
    assert torch.allclose(ratio, ratio[0].expand_as(ratio))  # one factor: the L1 ratio, not 1/density
    assert torch.equal(got, shim.sparsify(x, density, "random", rescale_norm="l1", seed=3))  # seeded
    assert not torch.equal(got, shim.sparsify(x, density, "random", rescale_norm="l1", seed=4))
    assert torch.equal(shim.sparsify(x, density, "random", seed=3), x * (got != 0))  # no rescale


def test_della_keep_probability_rises_with_magnitude_rank():
    x = torch.randn(400, 500, generator=torch.Generator().manual_seed(5))
    d, eps = 0.5, 0.2
    got = shim.sparsify(x, d, "della_magprune", epsilon=eps, seed=1)
    ranks = x.abs().argsort(dim=1).argsort(dim=1).float() / (x.shape[1] - 1)
    kept = got != 0
    low, high = kept[ranks < 0.1].float().mean().item(), kept[ranks > 0.9].float().mean().item()
    assert abs(low - (d - eps + 2 * eps * 0.05)) < 0.01
    assert abs(high - (d - eps + 2 * eps * 0.95)) < 0.01
    with pytest.raises(ValueError, match="epsilon"):
        shim.sparsify(x, 0.9, "della_magprune", epsilon=0.2)


@needs_mergekit
def test_random_methods_equal_mergekit_given_the_same_mask(monkeypatch):
    """Everything but the draws: mergekit's torch.bernoulli and the shim's Philox draw replaced by one mask."""
    from calm_fast.methods import mergekit_sparsify

    def fake(probs, *a, **k):
        u = torch.rand(probs.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
        return (u < probs.double()).to(probs.dtype)

    monkeypatch.setattr(torch, "bernoulli", fake)
    monkeypatch.setattr(mergekit_sparsify, "draw_mask", lambda probs, key, density=None: fake(probs))
    for name, x in _tensors().items():
        if name == "zeros":
            continue
        for norm in (None, "l1"):
            mk_norm = None if norm is None else mk.RescaleNorm(norm)
            assert torch.equal(shim.sparsify(x, 0.3, "random", rescale_norm=norm),
                               mk.sparsify(x, 0.3, mk.SparsificationMethod.random, rescale_norm=mk_norm)), name
            assert torch.equal(shim.sparsify(x, 0.4, "della_magprune", epsilon=0.1, rescale_norm=norm),
                               mk.sparsify(x, 0.4, mk.SparsificationMethod.della_magprune, epsilon=0.1,
                                           rescale_norm=mk_norm)), name


def test_dare_mask_is_calm_fast_s_philox_dare_mask():
    """A keyed DARE mask is calm_fast's DARE draw: keep iff philox_uniform(key, i) >= 1 - density (reference)."""
    from calm_fast.methods.mergekit_sparsify import draw_mask
    from calm_fast.reference import philox_uniform

    n, key = 5003, 0x1234_5678_9ABC
    for density in (0.1, 0.5, 0.77):
        got = draw_mask(torch.full((n,), density), key, density=density)
        want = (philox_uniform(torch.arange(n, dtype=torch.int64), key) >= 1 - density).float()
        assert torch.equal(got, want)
