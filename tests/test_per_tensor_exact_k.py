"""TIES ``mode="per_tensor"`` keeps exactly k = floor(density·n) entries per task and tensor, as PEFT's
``magnitude_prune`` (torch.topk) and mergekit's ``magnitude`` (argsort) do; ``mode="global"`` keeps the
TIES reference's rule (the (n − floor(d·n))-th smallest |τ| and every value at or above it).

With one model, merge="sum" and scaling=1 the merged delta is the trimmed task vector itself, so the
kept set is observable directly.  Inputs are continuous random values (no exact ties at the threshold:
there, every tie is kept; see calm_fast.selection.exact_k_rank).
"""
from __future__ import annotations

import math

import pytest
import torch

import calm_fast
from calm_fast.streaming import merge_checkpoints


def _models(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"a.weight": (37, 53), "b.weight": (101,), "c.bias": (7,), "d.weight": (64, 64), "e.tiny": (3,)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    ft = {k: v + torch.randn(v.shape, generator=g) * 0.1 for k, v in base.items()}
    return base, ft


def _topk_reference(tau: torch.Tensor, density: float) -> torch.Tensor:
    """PEFT's magnitude_prune, written here: exactly int(density · n) largest |τ| by torch.topk."""
    k = int(density * tau.numel())
    mask = torch.zeros(tau.numel())
    mask[tau.abs().reshape(-1).topk(k).indices] = 1.0
    return tau * mask.reshape(tau.shape)


@pytest.mark.parametrize("density", [0.1, 0.3, 0.5, 0.9])
def test_per_tensor_mode_keeps_exactly_floor_density_n(density):
    base, ft = _models()
    got = calm_fast.ties_merging(base, [ft], density=density, merge="sum", scaling=1.0, mode="per_tensor")
    for k in base:
        tau = ft[k] - base[k]
        kept = int(((got[k] - base[k]) != 0).sum())
        assert kept == math.floor(density * tau.numel()), k
        want = base[k] + _topk_reference(tau, density)
        assert torch.equal(got[k], want), k


def test_per_tensor_mode_matches_peft_and_mergekit_pruning():
    peft_utils = pytest.importorskip("peft.utils.merge_utils")
    base, ft = _models(1)
    got = calm_fast.ties_merging(base, [ft], density=0.25, merge="sum", scaling=1.0, mode="per_tensor")
    for k in base:
        tau = ft[k] - base[k]
        assert torch.equal(got[k], base[k] + peft_utils.magnitude_based_pruning(tau, 0.25)), k
    try:
        from mergekit.sparsify import magnitude
    except ImportError:
        return
    for k in base:
        tau = ft[k] - base[k]
        if int(0.25 * tau.numel()) == 0:
            continue  # mergekit keeps max(1, k): one entry where PEFT keeps none
        assert torch.equal(got[k], base[k] + magnitude(tau, 0.25)), k


def test_per_tensor_mode_keeps_nothing_when_density_n_is_below_one():
    base, ft = _models(2)
    got = calm_fast.ties_merging(base, [ft], density=0.2, merge="sum", scaling=1.0, mode="per_tensor")
    assert torch.equal(got["e.tiny"], base["e.tiny"])  # int(0.2 * 3) == 0, as torch.topk(k=0)


@pytest.mark.parametrize("budget", ["1MiB", "2KiB"])  # 2 KiB: the large tensors are processed in slices
def test_streaming_per_tensor_mode_equals_exact_k(tmp_path, budget):
    from calm_fast.io import load_state_dict, save_state_dict

    base, ft = _models(3)
    save_state_dict(base, tmp_path / "base")
    save_state_dict(ft, tmp_path / "ft")
    merge_checkpoints(str(tmp_path / "base"), [str(tmp_path / "ft")], "ties_merging", output=str(tmp_path / "o"),
                      density=0.3, merge="sum", scaling=1.0, mode="per_tensor", memory_budget=budget, progress=False)
    got = load_state_dict(str(tmp_path / "o"))
    for k in base:
        tau = ft[k] - base[k]
        assert torch.equal(got[k], base[k] + _topk_reference(tau, 0.3)), k


def test_global_mode_keeps_the_ties_reference_rule():
    """Global: threshold = the (N − floor(d·N))-th smallest |τ| over the whole model, ties kept: floor(d·N)+1."""
    base, ft = _models(4)
    got = calm_fast.ties_merging(base, [ft], density=0.3, merge="sum", scaling=1.0, mode="global")
    keys = sorted(base)
    flat = torch.cat([(ft[k] - base[k]).reshape(-1) for k in keys])
    n = flat.numel()
    thr = flat.abs().kthvalue(n - math.floor(0.3 * n)).values
    kept = sum(int(((got[k] - base[k]) != 0).sum()) for k in keys)
    assert kept == int((flat.abs() >= thr).sum()) == math.floor(0.3 * n) + 1
