"""Methods on small models built in code, against the method references written from ALGORITHMS.md
(flatten in sorted-key order, torch.kthvalue, sign of sums, ...)."""
import pytest
import torch

import calm_fast
from calm_fast import reference as R


def small_model(gen, dtype=torch.float32):
    return {
        "blocks.0.attn.weight": torch.randn(48, 16, generator=gen).to(dtype),
        "blocks.0.attn.bias": torch.randn(48, generator=gen).to(dtype),
        "blocks.1.mlp.weight": torch.randn(31, 17, generator=gen).to(dtype),
        "ln.weight": torch.ones(1, dtype=dtype),
        "position_ids": torch.arange(9),
        "empty": torch.zeros(0, dtype=dtype),
    }


def finetune(gen, base, scale=0.01, zero_keys=()):
    out = {}
    for k, v in base.items():
        if v.is_floating_point() and k not in zero_keys:
            out[k] = (v.float() + scale * torch.randn(v.shape, generator=gen)).to(v.dtype)
        else:
            out[k] = v.clone()
    return out


def assert_sd_equal(a, b, keys=None):
    for k in keys or b:
        assert torch.equal(a[k].float(), b[k].float()), (k, (a[k].float() - b[k].float()).abs().max())


@pytest.fixture
def models(gen):
    base = small_model(gen)
    # a "text leftover"-like tensor whose task vectors are exactly zero (ALGORITHMS.md §0.3)
    fts = [finetune(gen, base, zero_keys=("ln.weight",)) for _ in range(4)]
    return base, fts


def test_task_arithmetic(models):
    base, fts = models
    got = calm_fast.task_arithmetic(base, fts, scaling=0.3)
    assert list(got) == list(base)  # key order kept
    assert_sd_equal(got, R.task_arithmetic_reference(base, fts, 0.3))
    assert torch.equal(got["position_ids"], base["position_ids"])  # integer buffers untouched


@pytest.mark.parametrize("merge", ["sum", "mean", "max"])
@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_global_matches_reference(models, merge, density):
    base, fts = models
    got = calm_fast.ties_merging(base, fts, density=density, merge=merge, scaling=0.3)
    ref = R.ties_merging_reference(base, fts, density=density, merge=merge, scaling=0.3)
    assert_sd_equal(got, ref)


@pytest.mark.parametrize("merge", ["sum", "mean", "max"])
def test_ties_global_majority_sign_for_cancellations(gen, merge):
    """Elements whose trimmed values cancel exactly take the *global* majority sign; make it negative so
    the library's patch path (recorded positions) is exercised, then force the re-run path too."""
    base = {"w": torch.zeros(4000)}
    a = torch.randn(4000, generator=gen).abs() + 0.1
    t1 = a.clone()
    t2 = -a.clone()
    t3 = -(torch.rand(4000, generator=gen) + 0.1)  # pushes most elected signs negative
    t3[:1000] = 0.0
    t1[1000:] = 0.0  # cancellation only on the first 1000 elements (t1 + t2 == 0 there, t3 == 0)
    t2[1000:] = 0.0
    fts = [{"w": x} for x in (t1, t2, t3)]
    ref = R.ties_merging_reference(base, fts, density=1.0, merge=merge, scaling=1.0)
    got = calm_fast.ties_merging(base, fts, density=1.0, merge=merge, scaling=1.0)
    assert_sd_equal(got, ref)
    # the μ = -1 branch really differs from the +1 guess on the cancelled part
    assert not torch.equal(ref["w"][:1000], a[:1000])
    from calm_fast.methods import ties as ties_mod
    from calm_fast.methods._common import prepare

    prep = prepare(base, fts, method="t")
    merged = ties_mod.ties_core(prep, density=1.0, merge=merge, scaling=1.0, mode="global", max_positions=10)
    assert torch.equal(merged["w"], ref["w"])


def test_ties_per_tensor_mode(models):
    base, fts = models
    got = calm_fast.ties_merging(base, fts, density=0.3, merge="mean", scaling=1.0, mode="per_tensor")
    for k in ["blocks.0.attn.weight", "blocks.1.mlp.weight"]:
        V = torch.stack([ft[k].float().reshape(-1) - base[k].float().reshape(-1) for ft in fts])
        # PEFT's magnitude_prune per task and tensor: exactly k = int(0.3 n) entries by torch.topk
        kept = int(0.3 * V.shape[1])
        mask = torch.zeros_like(V)
        mask.scatter_(1, V.abs().topk(kept, dim=1).indices, 1.0)
        V = V * mask
        s = V.sum(0)
        g = torch.where(s >= 0, 1.0, -1.0)  # PEFT/mergekit: zero -> +1
        keep = torch.where(g > 0, V > 0, V < 0)
        E = V * keep
        want = base[k].reshape(-1) + E.sum(0) / (E != 0).sum(0).clamp(min=1)
        assert torch.equal(got[k].reshape(-1), want), k


@pytest.mark.parametrize("combine", ["task_arithmetic", "ties"])
def test_dare(models, combine):
    base, fts = models
    got = calm_fast.dare_merging(base, fts, p=0.4, seed=7, combine=combine, scaling=0.5)
    if combine == "task_arithmetic":
        assert_sd_equal(got, R.dare_merging_reference(base, fts, p=0.4, seed=7, scaling=0.5))
    else:
        # DARE-TIES: TIES on the dropped-and-rescaled task vectors (FusionBench's order)
        keys = sorted(k for k in base if base[k].is_floating_point())
        K = calm_fast.ops.dare_keys(7, keys, len(fts))
        dropped = []
        for t, ft in enumerate(fts):
            d = dict(base)
            for l, k in enumerate(keys):
                d[k] = base[k].float() + R.dare_reference(ft[k].float() - base[k].float(), 0.4, int(K[t, l]))
            dropped.append(d)
        ref = R.ties_merging_reference({k: base[k].float() if base[k].is_floating_point() else base[k] for k in base},
                                       dropped, density=0.2, merge="sum", scaling=0.5)
        for k in ref:
            torch.testing.assert_close(got[k].float(), ref[k], atol=1e-6, rtol=0)
    # same seed -> same result; another seed -> another mask
    assert_sd_equal(got, calm_fast.dare_merging(base, fts, p=0.4, seed=7, combine=combine, scaling=0.5))
    other = calm_fast.dare_merging(base, fts, p=0.4, seed=8, combine=combine, scaling=0.5)
    assert not torch.equal(other["blocks.0.attn.weight"], got["blocks.0.attn.weight"])


def test_dare_density_zero_is_zeros_not_nan(models):
    base, fts = models
    got = calm_fast.dare_merging(base, fts, p=1.0)
    assert_sd_equal(got, {k: v for k, v in base.items()})


@pytest.mark.parametrize("min_count", [0, 1, 2, 5])
def test_consensus(models, min_count):
    base, fts = models
    got, masks = calm_fast.consensus_merging(base, fts, tall_lambdas=[0.2, 0.3, 0.5, 0.6], min_count=min_count,
                                             alpha=0.4, return_masks=True)
    ref, ref_masks = R.consensus_merging_reference(base, fts, [0.2, 0.3, 0.5, 0.6], min_count, 0.4)
    assert_sd_equal(got, ref)
    for t in range(4):
        for k in ref_masks[t]:
            assert torch.equal(masks[t][k], ref_masks[t][k])


def test_consensus_ties_mtl(models):
    base, fts = models
    got = calm_fast.consensus_merging(base, fts, mtl="ties", min_count=2, alpha=1.0)
    tm = R.ties_merging_reference(base, fts, density=0.2, merge="sum", scaling=1.0)
    keys = [k for k in tm]
    mtl = torch.cat([(tm[k] - base[k].float()).reshape(-1) for k in keys])
    taus = [torch.cat([(ft[k].float() - base[k].float()).reshape(-1) for k in keys]) for ft in fts]
    count = sum((x.abs() > 0.6 * (mtl - x).abs()).long() for x in taus)
    want = torch.cat([base[k].float().reshape(-1) for k in keys]) + torch.where(count >= 2, mtl, torch.zeros_like(mtl))
    assert torch.equal(torch.cat([got[k].reshape(-1) for k in keys]), want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_error_bound(gen, dtype):
    """bf16/fp16 models: fp32 arithmetic, one rounding to the output dtype; error vs an fp64 reference
    within one output ulp."""
    base = small_model(gen, dtype)
    fts = [finetune(gen, base, scale=0.05) for _ in range(3)]
    got = calm_fast.task_arithmetic(base, fts, scaling=0.3)
    for k in ["blocks.0.attn.weight", "blocks.1.mlp.weight"]:
        exact = base[k].double() + 0.3 * sum(ft[k].double() - base[k].double() for ft in fts)
        ulp = torch.finfo(dtype).eps * exact.abs().clamp(min=torch.finfo(dtype).tiny)
        assert got[k].dtype == dtype
        assert bool(((got[k].double() - exact).abs() <= ulp + 1e-7).all())


def test_out_dtype_and_task_vectors(models):
    base, fts = models
    got = calm_fast.task_arithmetic(base, fts, out_dtype=torch.bfloat16)
    assert got["blocks.0.attn.weight"].dtype == torch.bfloat16
    assert got["position_ids"].dtype == torch.int64
    taus = [{k: ft[k] - base[k] for k in base if base[k].is_floating_point()} for ft in fts]
    tv = calm_fast.task_arithmetic(None, taus, scaling=1.0, task_vectors=True)
    for k in tv:
        torch.testing.assert_close(tv[k], sum(t[k] for t in taus), atol=1e-6, rtol=1e-6)
    with_base = calm_fast.ties_merging(base, taus, task_vectors=True)
    ref = R.ties_merging_reference(base, fts)
    for k in ref:
        torch.testing.assert_close(with_base[k], ref[k], atol=1e-6, rtol=1e-6)


def test_include_exclude_and_layerwise_weights(models):
    base, fts = models
    got = calm_fast.task_arithmetic(base, fts, include=r"blocks\.0", exclude=r"bias")
    assert torch.equal(got["blocks.0.attn.bias"], base["blocks.0.attn.bias"])
    assert torch.equal(got["blocks.1.mlp.weight"], base["blocks.1.mlp.weight"])
    assert not torch.equal(got["blocks.0.attn.weight"], base["blocks.0.attn.weight"])
    lw = {"blocks.1.mlp.weight": [1.0, 0.0, 0.0, 0.0]}
    got = calm_fast.task_arithmetic(base, fts, scaling=1.0, weights=lw)
    want = base["blocks.1.mlp.weight"] + (fts[0]["blocks.1.mlp.weight"] - base["blocks.1.mlp.weight"])
    torch.testing.assert_close(got["blocks.1.mlp.weight"], want, atol=1e-6, rtol=0)


def test_bad_inputs(models, gen):
    base, fts = models
    with pytest.raises(ValueError, match="empty list"):
        calm_fast.task_arithmetic(base, [])
    with pytest.raises(ValueError, match="missing"):
        calm_fast.task_arithmetic(base, [{k: v for k, v in fts[0].items() if k != "ln.weight"}])
    with pytest.raises(ValueError, match="extra"):
        calm_fast.task_arithmetic(base, [dict(fts[0], extra=torch.zeros(1))])
    bad = dict(fts[0])
    bad["blocks.0.attn.weight"] = torch.zeros(48, 15)
    with pytest.raises(ValueError, match=r"shape mismatch for 'blocks.0.attn.weight': model 0"):
        calm_fast.ties_merging(base, [bad])
    bad = dict(fts[0])
    bad["blocks.0.attn.weight"] = bad["blocks.0.attn.weight"].half()
    with pytest.raises(ValueError, match="dtype mismatch"):
        calm_fast.task_arithmetic(base, [bad])
    with pytest.raises(ValueError, match="density"):
        calm_fast.ties_merging(base, fts, density=0.0)
    with pytest.raises(ValueError, match="p must be"):
        calm_fast.dare_merging(base, fts, p=1.5)
    with pytest.raises(TypeError):
        calm_fast.task_arithmetic(base, fts[0])
    nan = dict(fts[1])
    nan["blocks.1.mlp.weight"] = nan["blocks.1.mlp.weight"].clone()
    nan["blocks.1.mlp.weight"][0, 0] = float("nan")
    for fn in (calm_fast.task_arithmetic, calm_fast.ties_merging, calm_fast.consensus_merging):
        with pytest.raises(ValueError, match=r"model 1 tensor 'blocks.1.mlp.weight' contains inf or NaN"):
            fn(base, [fts[0], nan])
    out = calm_fast.task_arithmetic(base, [fts[0], nan], nonfinite="propagate")
    assert torch.isnan(out["blocks.1.mlp.weight"][0, 0])
    # inputs are never modified
    snapshot = {k: v.clone() for k, v in fts[0].items()}
    calm_fast.ties_merging(base, fts)
    assert_sd_equal(fts[0], snapshot)
