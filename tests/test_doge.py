"""calm_fast.doge_ta (DOGE_TA, §9.1 of the spec) against reference.doge_ta_reference (plain autograd,
m x m projector, torch.optim.Adam), on small CLIP-like state dicts built in code whose task vectors have a
clear spectral gap (so the shared subspace is well defined, §9.1 "checked by running" notes)."""
from __future__ import annotations

import pytest
import torch

import calm_fast
from calm_fast import reference
from calm_fast.methods.doge import DOGE_INCLUDE, shared_subspace

SHAPES = {  # two layers of one shape (batched together), a tall and a wide one
    "vision_model.encoder.layers.0.self_attn.q_proj.weight": (12, 12),
    "vision_model.encoder.layers.1.self_attn.q_proj.weight": (12, 12),
    "vision_model.encoder.layers.0.mlp.fc1.weight": (24, 12),
    "vision_model.encoder.layers.0.mlp.fc2.weight": (12, 24),
}
OTHER = {  # not merged by DOGE: keep θ0
    "vision_model.encoder.layers.0.mlp.fc1.bias": (24,),
    "vision_model.encoder.layers.0.layer_norm1.weight": (12,),
    "vision_model.embeddings.patch_embedding.weight": (12, 3, 2, 2),
    "vision_model.post_layernorm.weight": (12,),
}


def gapped_task_vector(g, shared: torch.Tensor, m: int, n: int, dtype) -> torch.Tensor:
    """A task vector whose top left singular vectors contain the layer's shared 2-D column space (weight 3),
    plus a task-specific rank-3 part (weights 1.5, 1.2, 1.0) and small noise: the stacked per-task bases
    then have singular values ~sqrt(T) on the shared directions and <~1.2 elsewhere (a clear gap)."""
    d = torch.float64
    R = torch.linalg.qr(torch.randn(n, 2, generator=g, dtype=d))[0].T
    own = torch.linalg.qr(torch.randn(m, 3, generator=g, dtype=d))[0]
    V = torch.linalg.qr(torch.randn(n, 3, generator=g, dtype=d))[0]
    tau = 3 * shared @ R + own @ torch.diag(torch.tensor([1.5, 1.2, 1.0], dtype=d)) @ V.T
    tau = tau + 0.01 * torch.randn(m, n, generator=g, dtype=d)
    return (tau * 1e-2).to(dtype)


def make_models(seed: int, T: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    pre = {k: torch.randn(*s, generator=g).to(dtype) for k, s in {**SHAPES, **OTHER}.items()}
    pre["vision_model.embeddings.position_ids"] = torch.arange(5)
    fts = [dict(pre) for _ in range(T)]
    for k, (m, n) in SHAPES.items():
        shared = torch.linalg.qr(torch.randn(m, 2, generator=g, dtype=torch.float64))[0]
        for t in range(T):
            fts[t] = dict(fts[t])
            fts[t][k] = pre[k] + gapped_task_vector(g, shared, m, n, dtype)
    for k, s in OTHER.items():  # unmerged keys are fine-tuned too: DOGE must still keep θ0
        for t in range(T):
            fts[t][k] = pre[k] + 0.1 * torch.randn(*s, generator=g).to(dtype)
    return pre, fts


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def fp32_run():
    pre, fts = make_models(0, 3)
    ours = calm_fast.doge_ta(pre, fts)
    ref = reference.doge_ta_reference(pre, fts)
    return pre, fts, ours, ref


def test_fused_matches_reference_fp32_400_steps(fp32_run):
    pre, fts, ours, ref = fp32_run
    assert ours.keys == sorted(SHAPES)
    for k in SHAPES:
        assert torch.equal(ours.lambdas[k], ref["lambdas"][k]), k
        r = rel(ours.delta[k], ref["delta"][k])
        assert r < 1e-4, (k, r)
        assert float(ref["delta"][k].norm()) > 0.05 * float((fts[0][k] - pre[k]).norm())  # δ is not negligible
        # the loss falls by orders of magnitude, as in the reference
        assert float(ours.losses[k][-1]) < 1e-3 * float(ours.losses[k][0])
        assert abs(float(ours.losses[k][0]) - ref["losses"][k][0]) <= 1e-5 * ref["losses"][k][0]


def test_merged_model_matches_reference_fp32(fp32_run):
    pre, fts, ours, ref = fp32_run
    assert list(ours.merged) == list(pre)
    for k in pre:
        if k in SHAPES:
            assert ours.merged[k].dtype == pre[k].dtype
            diff = (ours.merged[k] - ref["merged"][k]).abs().max()
            step = (ref["merged"][k] - pre[k]).abs().max()
            assert float(diff) <= 1e-4 * float(step), k
        else:
            assert ours.merged[k] is pre[k], k  # every other key keeps θ0 (the same tensor)


def test_trim_mask_and_thresholds_are_the_references(fp32_run):
    pre, fts, ours, ref = fp32_run
    keys = sorted(SHAPES)
    flat = torch.stack([torch.cat([(ft[k] - pre[k]).reshape(-1) for k in keys]) for ft in fts])
    d = flat.shape[1]
    kth = flat.abs().kthvalue(d - int(0.3 * d), dim=1).values
    assert torch.equal(ours.thresholds, kth)
    assert torch.equal(ours.lambda_table()[:, 0], ours.lambdas[keys[0]])


def test_fused_matches_reference_fp64_tighter():
    pre, fts = make_models(1, 2)  # fp32 checkpoints, fp64 arithmetic (τ = θ_t − θ0 in fp64)
    ours = calm_fast.doge_ta(pre, fts, dtype=torch.float64, steps=150)
    ref = reference.doge_ta_reference(pre, fts, steps=150, dtype=torch.float64)
    for k in SHAPES:
        assert ours.delta[k].dtype == torch.float64
        assert rel(ours.delta[k], ref["delta"][k]) < 1e-9, k
        # the merged weights are rounded once to the checkpoints' fp32
        assert torch.allclose(ours.merged[k], ref["merged"][k], rtol=2e-7, atol=0), k


@pytest.mark.parametrize("solver", ["svd", "gram"])
def test_shared_subspace_matches_reference_projector(solver):
    pre, fts = make_models(2, 4)
    for k, (m, n) in SHAPES.items():
        taus = [ft[k] - pre[k] for ft in fts]
        U = shared_subspace(torch.stack(taus)[None], 6, solver)[0]
        U_ref = reference.doge_subspace_reference(taus, 6)
        assert U.shape == (m, min(m, n) // 6)
        assert torch.allclose(U @ U.T, U_ref @ U_ref.T, atol=1e-5)


def test_gram_solver_matches_reference_on_gapped_layers():
    pre, fts = make_models(6, 3)
    ours = calm_fast.doge_ta(pre, fts, subspace_solver="gram", steps=100)
    ref = reference.doge_ta_reference(pre, fts, steps=100)
    for k in SHAPES:
        assert rel(ours.delta[k], ref["delta"][k]) < 1e-4, k
    with pytest.raises(ValueError, match="subspace_solver"):
        calm_fast.doge_ta(pre, fts, subspace_solver="qr")


def test_task_vector_inputs_and_options():
    pre, fts = make_models(3, 2)
    tvs = [{k: ft[k] - pre[k] for k in SHAPES} for ft in fts]
    a = calm_fast.doge_ta(pre, fts, steps=20, eta=0.15, subspace=3, density=0.5)
    b = calm_fast.doge_ta(None, tvs, task_vectors=True, steps=20, eta=0.15, subspace=3, density=0.5)
    ref = reference.doge_ta_reference(pre, fts, eta=0.15, subspace=3, K=0.5, steps=20)
    for k in SHAPES:
        assert torch.equal(a.delta[k], b.delta[k])
        assert rel(a.delta[k], ref["delta"][k]) < 1e-4
        assert rel(b.merged[k], ref["merged"][k] - pre[k]) < 1e-4  # without θ0: the merged task vector
    assert set(b.merged) == set(SHAPES)


def test_include_exclude_select_the_keys():
    pre, fts = make_models(4, 2)
    only = "vision_model.encoder.layers.0.mlp.fc1.weight"
    r = calm_fast.doge_ta(pre, fts, include=r"fc1\.weight", steps=5)
    assert r.keys == [only]
    r2 = calm_fast.doge_ta(pre, fts, exclude=[r"self_attn", r"fc2"], steps=5)
    assert r2.keys == [only]
    for k in pre:
        if k != only:
            assert r.merged[k] is pre[k]
    ref = reference.doge_ta_reference(pre, fts, keys=[only], steps=5)
    assert rel(r.merged[only] - pre[only], ref["merged"][only] - pre[only]) < 1e-5


def test_default_filter_is_fusion_benchs():
    import re

    keys = ["vision_model.encoder.layers.3.self_attn.k_proj.weight", "vision_model.encoder.layers.3.self_attn.k_proj.bias",
            "vision_model.encoder.layers.3.layer_norm1.weight", "vision_model.embeddings.patch_embedding.weight",
            "text_model.encoder.layers.0.mlp.fc2.weight", "encoder.weight", "weight.encoder.layer_norm"]
    for k in keys:
        assert bool(re.search(DOGE_INCLUDE, k)) == reference.doge_fusion_bench_key(k), k


def test_bad_inputs_give_clear_errors():
    pre, fts = make_models(5, 2)
    k = "vision_model.encoder.layers.0.mlp.fc2.weight"
    zero = [dict(fts[0]), fts[1]]
    zero[0][k] = pre[k].clone()
    with pytest.raises(ValueError, match="exactly zero"):
        calm_fast.doge_ta(pre, zero, steps=1)
    with pytest.raises(ValueError, match="2-D"):
        calm_fast.doge_ta(pre, fts, include=[r"encoder.*weight", r"patch_embedding"], steps=1)
    with pytest.raises(ValueError, match="2-D"):  # a 1-D key selected by the user's include
        calm_fast.doge_ta(pre, fts, include=r"layer_norm1", steps=1)
    bad = [dict(fts[0]), fts[1]]
    bad[0][k] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="shape mismatch"):
        calm_fast.doge_ta(pre, bad, steps=1)
    with pytest.raises(ValueError, match="no key"):
        calm_fast.doge_ta(pre, fts, include=r"nothing_matches")
    with pytest.raises(ValueError, match="subspace"):
        calm_fast.doge_ta(pre, fts, subspace=0)
    with pytest.raises(ValueError, match="density"):
        calm_fast.doge_ta(pre, fts, density=0.0)
    nan = [dict(fts[0]), fts[1]]
    nan[0][k] = fts[0][k].clone()
    nan[0][k][0, 0] = float("nan")
    with pytest.raises(ValueError, match="inf or NaN"):
        calm_fast.doge_ta(pre, nan, steps=1)


def test_save_writes_the_result_atomically(tmp_path):
    import json
    import os

    from calm_fast.io import load_state_dict
    from calm_fast.io.errors import OutputError

    pre, fts = make_models(5, 2)
    res = calm_fast.doge_ta(pre, fts, steps=5)
    assert res.state_dict is res.merged
    out = tmp_path / "merged"
    res.save(out)
    assert sorted(os.listdir(tmp_path)) == ["merged"]  # no staging folder or lock left behind
    got = load_state_dict(out / "model.safetensors")
    assert set(got) == set(res.merged) and all(torch.equal(got[k], v) for k, v in res.merged.items())
    extra = load_state_dict(out / "doge_ta_delta.safetensors")
    assert all(torch.equal(extra[f"delta.{k}"], res.delta[k]) for k in res.keys)
    assert torch.equal(extra["lambdas"], res.lambda_table()) and torch.equal(extra["thresholds"], res.thresholds)
    rec = json.loads((out / "doge_ta_record.json").read_text())
    assert rec["keys"] == res.keys and rec["lambdas"] == res.lambda_table().tolist()
    with pytest.raises(OutputError, match="already exists"):
        res.save(out)
    res.save(out, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["merged"]
