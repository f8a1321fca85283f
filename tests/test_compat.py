"""Drop-in shims (calm_fast.compat) against pure-torch re-implementations of the peers' documented
behaviour, written here from ALGORITHMS.md (§0.4 P1, §2, §3) and the peers' public semantics:
FusionBench/AdaMerging/TIES ``ties_merging_utils``, PEFT ``merge_utils``, task_vectors ``TaskVector``.
No peer package is imported (none is needed, none may be installed)."""
import copy
import pickle
import warnings
from collections import OrderedDict

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from calm_fast import ops
from calm_fast.compat import peft as CP
from calm_fast.compat import task_vectors as CTV
from calm_fast.compat import ties_merging as CT
from calm_fast.reference import philox_uniform

HALF = [torch.bfloat16, torch.float16]


def same(a, b):
    """Bit-for-bit equal values (``-0.0 == 0.0``, NaN == NaN) and the same dtype and shape."""
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.equal(a, b) or torch.equal(torch.nan_to_num(a), torch.nan_to_num(b)), \
        (a.float() - b.float()).abs().max()


def rows(gen, T, d, dtype=torch.float32, zeros=0.0, ties=False):
    x = torch.randn(T, d, generator=gen) * (torch.rand(T, 1, generator=gen) + 0.1)
    if ties:  # few distinct magnitudes: ties at every threshold
        x = torch.round(x * 3) / 3
    if zeros:
        x[torch.rand(T, d, generator=gen) < zeros] = 0.0
    return x.to(dtype)


# ================================================================================================
# Peer re-implementations (the documented public behaviour, plain torch)
# ================================================================================================
def peer_topk_values_mask(M, K=0.7, return_mask=False):
    """P1 per row: K > 1 is a percentage, t = (d - int(d*K))-th smallest |x| (kthvalue), keep |x| >= t."""
    if K > 1:
        K = K / 100
    shape = M.shape
    if M.dim() == 1:
        M = M.unsqueeze(0)
    d = M.shape[1]
    t = M.abs().kthvalue(d - int(d * K), dim=1, keepdim=True).values
    mask = M.abs() >= t
    if shape == M.squeeze().shape:
        mask = mask.squeeze()
    res = (M * mask, mask.float().mean(dim=1))
    return res + (mask,) if return_mask else res


def peer_resolve_sign(V):
    s = torch.sign(V.sum(dim=0))
    s[s == 0] = torch.sign(s.sum())  # global majority for zero elections
    return s


def peer_disjoint(V, func, s):
    func = func.split("-")[-1]
    E = V * torch.where(s[None] > 0, V > 0, V < 0)
    if func == "sum":
        return E.sum(dim=0)
    if func == "mean":
        return E.sum(dim=0) / (E != 0).sum(dim=0).float().clamp(min=1)
    if func == "max":
        return E.abs().max(dim=0).values * s
    raise ValueError(func)


def peer_ties(M, K, func):
    V, _ = peer_topk_values_mask(M, K)
    return peer_disjoint(V, func, peer_resolve_sign(V))


def seq_sum(V):
    """Sum over dim 0 in task order (the fused ops' order; torch.sum(dim=0) may differ in the last bit
    in a few tail elements for T >= 5)."""
    acc = torch.zeros_like(V[0], dtype=torch.float32)
    for t in range(V.shape[0]):
        acc = acc + V[t].float()
    return acc


# ================================================================================================
# ties_merging_utils
# ================================================================================================
def _sd(gen, dtype=torch.float32):
    return {"z.weight": torch.randn(3, 4, generator=gen).to(dtype), "a.bias": torch.randn(5, generator=gen).to(dtype),
            "m.scale": torch.tensor(1.5, dtype=dtype), "b.weight": torch.randn(2, 2, 2, generator=gen).to(dtype)}


@pytest.mark.parametrize("remove_keys", [None, [], ["a.bias"], ["a.bias", "not.there"]])
def test_state_dict_to_vector_sorted_keys_and_remove_keys(gen, remove_keys):
    sd = _sd(gen)
    before = {k: v.clone() for k, v in sd.items()}
    args = () if remove_keys is None else (remove_keys,)
    vec = CT.state_dict_to_vector(sd, *args)
    keys = sorted(k for k in sd if k not in (remove_keys or []))
    same(vec, torch.cat([sd[k].reshape(-1) for k in keys]))
    for k in sd:  # inputs untouched, result does not alias them
        assert torch.equal(sd[k], before[k])
    vec.zero_()
    assert torch.equal(sd["z.weight"], before["z.weight"])


def test_state_dict_to_vector_empty_raises():
    with pytest.raises((RuntimeError, ValueError)):  # torch.cat([]) (the reference's error)
        CT.state_dict_to_vector({})


def test_vector_to_state_dict_roundtrip_views_and_order(gen):
    sd = _sd(gen)
    vec = CT.state_dict_to_vector(sd, ["m.scale"])
    out = CT.vector_to_state_dict(vec, sd, ["m.scale"])
    assert isinstance(out, OrderedDict)
    assert list(out) == sorted(k for k in sd if k != "m.scale")
    for k, v in out.items():
        same(v, sd[k])
    vec.mul_(2)  # the values are views of the vector, as the reference's .data assignment makes them
    assert torch.equal(out["z.weight"], 2 * sd["z.weight"])
    with pytest.raises(TypeError):
        CT.vector_to_state_dict([1.0, 2.0], sd)


def test_vector_to_state_dict_dtype_grad_and_shared_embedding(gen):
    sd = {"transformer.shared.weight": torch.randn(4, 3, generator=gen),
          "encoder.embed_tokens.weight": torch.randn(4, 3, generator=gen),
          "lm.bias": torch.randn(2, generator=gen).requires_grad_()}
    rk = ["encoder.embed_tokens.weight", "decoder.embed_tokens.weight"]
    vec = CT.state_dict_to_vector(sd, rk).detach().double()
    out = CT.vector_to_state_dict(vec, sd, rk)
    assert out["lm.bias"].dtype == torch.float64 and out["lm.bias"].requires_grad
    assert not out["transformer.shared.weight"].requires_grad
    for k in rk:  # tied T5 embeddings re-added as aliases, even for keys absent from state_dict
        assert out[k] is out["transformer.shared.weight"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("K", [20, 0.2, 0.5, 0.05, 99, 0, 0.999])
@pytest.mark.parametrize("kind", ["plain", "ties", "zeros"])
def test_topk_values_mask_matches_peer(gen, dtype, K, kind):
    M = rows(gen, 4, 257, dtype, zeros=0.6 if kind == "zeros" else 0.0, ties=kind == "ties")
    got = CT.topk_values_mask(M, K, return_mask=True)
    ref = peer_topk_values_mask(M, K, return_mask=True)
    for g, r in zip(got, ref):
        same(g, r)
    got2 = CT.topk_values_mask(M, K)
    assert len(got2) == 2
    same(got2[0], ref[0])


def test_topk_values_mask_shapes_and_errors(gen):
    M = rows(gen, 1, 50)
    for g, r in zip(CT.topk_values_mask(M, 30, True), peer_topk_values_mask(M, 30, True)):
        same(g, r)  # [1, d]: mask kept 2-D
    with pytest.raises(IndexError):  # 1-D input: the reference's mask.mean(dim=1) fails too
        peer_topk_values_mask(M[0], 30)
    with pytest.raises(IndexError):
        CT.topk_values_mask(M[0], 30)
    for K in (1, 1.0, 100):  # K = 100 %: kthvalue(0) is rejected, as in the reference
        with pytest.raises(RuntimeError, match="out of range"):
            CT.topk_values_mask(rows(gen, 3, 40), K)
    with pytest.raises(RuntimeError, match="out of range"):
        CT.topk_values_mask(rows(gen, 3, 40), -0.5)
    with pytest.raises(TypeError):
        CT.topk_values_mask(rows(gen, 3, 40), None)


@settings(max_examples=60, deadline=None)
@given(T=st.integers(1, 4), d=st.integers(1, 300), K=st.floats(0.0, 0.999), levels=st.integers(1, 6),
       seed=st.integers(0, 2**31 - 1), half=st.booleans())
def test_topk_values_mask_hypothesis(T, d, K, levels, seed, half):
    g = torch.Generator().manual_seed(seed)
    M = (torch.randint(-levels, levels + 1, (T, d), generator=g).float() / levels)
    M = M.to(torch.bfloat16 if half else torch.float32)
    for a, b in zip(CT.topk_values_mask(M, K, True), peer_topk_values_mask(M, K, True)):
        same(a, b)


def test_resolve_sign_and_disjoint_merge(gen):
    V = rows(gen, 3, 200, zeros=0.3)
    V[1, :10] = -V[0, :10]
    V[2, :10] = 0  # exact cancellations: zero elections
    s = CT.resolve_sign(V.clone())
    same(s, peer_resolve_sign(V.clone()))
    same(CT.resolve_sign(V.clone(), "mass"), s)
    for func in ("sum", "mean", "max", "dis-mean", "topk-dis-sum"):
        same(CT.disjoint_merge(V, func, s), peer_disjoint(V, func, s))
    same(CT.disjoint_merge(V, "sum", None), V.sum(dim=0))  # no sign: every non-zero entry
    with pytest.raises(ValueError):
        CT.disjoint_merge(V, "median", s)
    with pytest.raises(ValueError):
        CT.resolve_sign(V, "nope")
    sel, merged = CT.disjoint_merge_split(V, "sum", s)
    same(merged, peer_disjoint(V, "sum", s))
    same(sel.sum(dim=0), merged)


def test_resolve_sign_norm_variants(gen):
    V = rows(gen, 3, 64)
    fr = V ** 2 / V.norm(dim=1, keepdim=True) ** 2
    nf = torch.sign(V[fr.argmax(dim=0), torch.arange(64)])
    nm = (V.sign() * fr).sum(dim=0).sign()
    same(CT.resolve_sign(V, "normfrac"), nf)
    same(CT.resolve_sign(V, "normmass"), nm)


@pytest.mark.parametrize("T", [1, 2, 3, 4])
@pytest.mark.parametrize("func", ["sum", "mean", "max", "dis-sum"])
@pytest.mark.parametrize("K", [20, 0.2, 0.6, 0])
def test_ties_merging_matches_peer_fp32(gen, T, func, K):
    M = rows(gen, T, 1031, zeros=0.2)
    before = M.clone()
    same(CT.ties_merging(M, K, func), peer_ties(M, K, func))
    assert torch.equal(M, before)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("func", ["sum", "max", "mean"])
def test_ties_merging_half(gen, dtype, func):
    M = rows(gen, 4, 777, dtype, ties=True)
    got, ref = CT.ties_merging(M, 20, func), peer_ties(M, 20, func)
    if func != "mean":
        same(got, ref)  # input dtype, bit-identical
    else:  # float32 like the reference (its float count promotes); the sum is not rounded to `dtype` first
        assert got.dtype == ref.dtype == torch.float32
        V, _ = peer_topk_values_mask(M.float(), 20)
        same(got, peer_disjoint(V, "mean", peer_resolve_sign(V)))
        eps = torch.finfo(dtype).eps
        assert torch.allclose(got, ref, rtol=eps, atol=0)


@pytest.mark.parametrize("majority", [1, -1, 0])
@pytest.mark.parametrize("func", ["sum", "mean", "max"])
def test_ties_merging_global_majority_sign(majority, func):
    """Elements whose trimmed values cancel exactly take the *global* majority sign (patched)."""
    d = 64
    M = torch.zeros(3, d)
    M[0, :8], M[1, :8] = 1.5, -1.5           # exact cancellations
    M[2, :8] = 0.0
    n_neg = {1: 10, -1: 30, 0: 20}[majority]
    M[0, 8:8 + n_neg] = -2.0
    M[0, 8 + n_neg:48] = 2.0                  # 40 elected signs: majority decided by n_neg
    M[1, 8:48] = M[0, 8:48] * 0.5
    got, ref = CT.ties_merging(M, 0.999, func), peer_ties(M, 0.999, func)
    same(got, ref)
    # mu = 0 leaves the zero elections at 0: the "else" branch keeps the negative entries (max: 0 * ...)
    expected = 1.5 * majority if func == "max" else {1: 1.5, -1: -1.5, 0: -1.5}[majority]
    assert torch.all(got[:8] == expected)


@pytest.mark.parametrize("T", [5, 8])
def test_ties_merging_many_tasks_sequential_order(gen, T):
    M = rows(gen, T, 1000)
    got = CT.ties_merging(M, 20, "sum")
    V, _ = peer_topk_values_mask(M, 20)
    s = peer_resolve_sign(V)
    same(got, seq_sum(V * torch.where(s[None] > 0, V > 0, V < 0)))
    ref = peer_ties(M, 20, "sum")  # torch.sum(dim=0): at most a last-bit difference
    assert torch.allclose(got, ref, rtol=2 * torch.finfo(torch.float32).eps, atol=1e-7)


def test_ties_merging_fallbacks_and_errors(gen):
    M = rows(gen, 3, 300).double()  # float64: reference composition on plain torch
    for func in ("sum", "mean", "max"):
        same(CT.ties_merging(M, 20, func), peer_ties(M, 20, func))
    M = rows(gen, 3, 300)
    with pytest.raises(ValueError, match="not defined"):
        CT.ties_merging(M, 20)  # merge_func="" (the reference's default) is not a merge
    with pytest.raises(TypeError):
        CT.ties_merging(M, None, "sum")
    for K in (1, 100):
        with pytest.raises(RuntimeError, match="out of range"):
            CT.ties_merging(M, K, "sum")
    Mt = rows(gen, 300, 3).t()  # non-contiguous rows
    same(CT.ties_merging(Mt, 20, "mean"), peer_ties(Mt, 20, "mean"))


def test_ties_merging_split_matches_peer(gen):
    M = rows(gen, 3, 500, zeros=0.1)
    sel, merged = CT.ties_merging_split(M, 20, "sum")
    V, _ = peer_topk_values_mask(M, 20)
    s = peer_resolve_sign(V)
    same(sel, V * torch.where(s[None] > 0, V > 0, V < 0))
    same(merged, peer_ties(M, 20, "sum"))
    with pytest.raises(ValueError):
        CT.ties_merging_split(M, 20, "mean")


def test_ties_pipeline_on_state_dicts(gen):
    """The FusionBench/AdaMerging script: flatten, subtract, ties_merging, unflatten, add, scale."""
    ptm = _sd(gen)
    fts = [{k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in ptm.items()} for _ in range(3)]
    flat_ptm = CT.state_dict_to_vector(ptm)
    tv = torch.vstack([CT.state_dict_to_vector(ft) for ft in fts]) - flat_ptm
    merged = CT.ties_merging(tv, 20, "sum")
    same(merged, peer_ties(tv, 20, "sum"))
    out = CT.vector_to_state_dict(flat_ptm + 0.3 * merged, ptm)
    assert set(out) == set(ptm)


# ================================================================================================
# PEFT merge_utils
# ================================================================================================
def peer_magnitude(t, density):
    mask = torch.zeros_like(t).reshape(-1)
    mask[torch.topk(t.abs().reshape(-1), k=int(density * t.numel()), largest=True)[1]] = 1
    return t * mask.reshape(t.shape)


def peer_prune(t, density, method, rescale=False, dare_mask=None):
    if density >= 1:
        return t
    if method == "magnitude":
        return peer_magnitude(t, density)
    out = t * dare_mask.to(t.dtype)  # PEFT: bernoulli mask; here the library's draws, passed in
    return out / density if rescale else out


def peer_sign_mask(t, method="total"):
    s = t.sign()
    mag = t.sum(dim=0) if method == "total" else s.sum(dim=0)
    return s == torch.where(mag >= 0, 1, -1)


def peer_weights(stacked, w):
    return w.view(w.shape + (1,) * (stacked.dim() - w.dim()))


def peer_disjoint_mean(V, mask):
    return (V * mask).sum(dim=0) / torch.clamp(mask.sum(dim=0), min=1.0)


def peer_merge(name, xs, w, density=1.0, method="total", dare_masks=None):
    if name in ("task_arithmetic", "magnitude_prune", "dare_linear"):
        if name == "magnitude_prune":
            xs = [peer_prune(x, density, "magnitude") for x in xs]
        if name == "dare_linear":
            xs = [peer_prune(x, density, "random", True, m) for x, m in zip(xs, dare_masks)]
        S = torch.stack(xs)
        return (S * peer_weights(S, w)).sum(dim=0)
    if name == "ties":
        xs = [peer_prune(x, density, "magnitude") for x in xs]
    else:
        xs = [peer_prune(x, density, "random", True, m) for x, m in zip(xs, dare_masks)]
    S = torch.stack(xs)
    mask = peer_sign_mask(S, method)
    return peer_disjoint_mean(S * peer_weights(S, w), mask)


def dare_masks(seed, xs, density):
    """The shim's documented draws: keep iff philox(key_t, flat index) >= 1 - density."""
    keys = ops.dare_keys(seed, [CP._DARE_NAME], len(xs))
    return [(philox_uniform(torch.arange(x.numel()), int(keys[t, 0])) >= 1.0 - density).reshape(x.shape)
            for t, x in enumerate(xs)]


def tasks(gen, T, shape=(24, 16), dtype=torch.float32, cancel=True):
    xs = [torch.randn(shape, generator=gen).to(dtype) for _ in range(T)]
    if cancel and T >= 2:  # exact cancellations: a zero majority sum -> +1 in PEFT
        xs[1].view(-1)[:20] = -xs[0].view(-1)[:20]
        if T >= 3:
            xs[2].view(-1)[:20] = 0
    return xs


WEIGHTS = {
    "ones": lambda T: torch.ones(T),
    "varied": lambda T: torch.linspace(0.2, 1.7, T),
    "neg": lambda T: -torch.ones(T) * 0.5,
    "third": lambda T: torch.full((T,), 0.3),
    "zero": lambda T: torch.zeros(T),
    "one_entry": lambda T: torch.tensor([2.0]),
    "scalar": lambda T: torch.tensor(0.75),
    "mixed_signs": lambda T: torch.tensor([1.0, -2.0, 0.5, 3.0][:T]),
}


def test_reshape_weight_task_tensors():
    S = torch.zeros(3, 4, 5)
    assert CP.reshape_weight_task_tensors(S, torch.ones(3)).shape == (3, 1, 1)
    assert CP.reshape_weight_task_tensors(S, torch.ones(3, 4)).shape == (3, 4, 1)
    assert CP.reshape_weight_task_tensors(S, torch.tensor(1.0)).shape == (1, 1, 1)


@pytest.mark.parametrize("density", [0.0, 0.01, 0.3, 0.5, 0.99, 0.9999])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_magnitude_based_pruning_no_ties_is_peft(gen, density, dtype):
    x = torch.randn(37, 29, generator=gen).to(dtype)  # distinct magnitudes
    for tb in CP.TIE_BREAKS:
        same(CP.magnitude_based_pruning(x, density, tie_break=tb), peer_magnitude(x, density))


@pytest.mark.parametrize("dtype", [torch.float32] + HALF)
@pytest.mark.parametrize("density", [0.1, 0.5, 0.7])
def test_magnitude_based_pruning_ties(gen, dtype, density):
    x = (torch.randint(-3, 4, (41, 13), generator=gen).float() / 3).to(dtype)  # heavy ties (zeros too)
    k = int(density * x.numel())
    ref = peer_magnitude(x, density)
    got = CP.magnitude_based_pruning(x, density)
    # exactly k kept (PEFT's count), same kept magnitudes, ties broken by lowest flat index
    kept = got.reshape(-1) != 0
    a = x.reshape(-1).abs().float()
    thr = a.sort(descending=True).values[k - 1]
    first_tied = torch.nonzero(a == thr).reshape(-1)[: k - int((a > thr).sum())]
    expected = (a > thr)
    expected[first_tied] = True
    assert torch.equal(kept | (x.reshape(-1) == 0) & expected, expected)
    same(got, x * expected.reshape(x.shape))
    same(got.abs().reshape(-1).sort().values, ref.abs().reshape(-1).sort().values)
    same(CP.magnitude_based_pruning(x, density, tie_break="topk"), ref)  # PEFT's own call
    allt = CP.magnitude_based_pruning(x, density, tie_break="all")
    same(allt, x * (x.abs() >= thr.to(dtype)))


def test_magnitude_based_pruning_errors_and_nan(gen):
    x = torch.randn(10, generator=gen)
    with pytest.raises(RuntimeError, match="out of range"):
        CP.magnitude_based_pruning(x, 1.5)
    with pytest.raises(ValueError):
        CP.magnitude_based_pruning(x, 0.5, tie_break="random")
    x[3] = float("nan")  # topk ranks NaN first: the shim defers to it
    same(CP.magnitude_based_pruning(x, 0.3), peer_magnitude(x, 0.3))
    x[3], x[5], x[7] = float("inf"), -float("inf"), 1e30  # NaN-free, but a NaN sum
    same(CP.magnitude_based_pruning(x, 0.3), peer_magnitude(x, 0.3))


def test_fused_paths_are_taken(gen, monkeypatch):
    """Eligible inputs never reach the plain-torch compositions, topk or kthvalue."""
    def boom(*a, **k):
        raise AssertionError("slow path taken")

    for name in ("_weighted_sum", "_ties_composed", "_topk_mask"):
        monkeypatch.setattr(CP, name, boom)
    monkeypatch.setattr(CT, "_ties_composed", boom)
    monkeypatch.setattr(torch.Tensor, "kthvalue", boom)
    xs = tasks(gen, 3)
    for w in (torch.ones(3), torch.full((3,), -0.5), torch.tensor(2.0)):
        CP.task_arithmetic(xs, w)
        CP.magnitude_prune(xs, w, 0.3)
        CP.ties(xs, w, 0.3)
        CP.dare_linear(xs, w, 0.3, seed=0)
        CP.dare_ties(xs, w, 0.3, seed=0)
    CP.magnitude_based_pruning(xs[0], 0.3)
    CP.task_arithmetic([x.bfloat16() for x in xs], torch.tensor([0.3, 0.2, 0.1]))  # fp32 weights -> fp32
    M = rows(gen, 4, 999, zeros=0.1)
    for func in ("sum", "mean", "max"):
        CT.ties_merging(M, 20, func)
    CT.topk_values_mask(M, 20)
    CT.ties_merging(M.bfloat16(), 20, "mean")


def test_prune_density_rules(gen):
    x = torch.randn(8, 8, generator=gen)
    for method in ("magnitude", "random"):
        with pytest.warns(UserWarning, match="no pruning"):
            assert CP.prune(x, 1.0, method) is x
        with pytest.raises(ValueError, match="Density should be >= 0"):
            CP.prune(x, -0.1, method)
    with pytest.raises(ValueError, match="Unknown method"):
        CP.prune(x, 0.5, "sparsegpt")
    same(CP.prune(x, 0.25, "magnitude"), peer_magnitude(x, 0.25))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64] + HALF)
@pytest.mark.parametrize("density", [0.0, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("rescale", [True, False])
def test_random_pruning_draws(gen, dtype, density, rescale):
    x = torch.randn(33, 31, generator=gen).to(dtype)
    got = CP.random_pruning(x, density, rescale, seed=7)
    (mask,) = dare_masks(7, [x], density)
    factor = torch.tensor((1.0 / density if density > 0 else 0.0) if rescale else 1.0, dtype=torch.float32)
    exp = torch.where(mask, x.float() * factor, torch.zeros(())).to(dtype)
    assert got.dtype == dtype
    if dtype == torch.float64:
        assert torch.equal(got != 0, mask & (x != 0))
        assert torch.allclose(got, exp.double(), rtol=1e-6)
    else:
        same(got, exp)
    assert not torch.isnan(got).any()  # density 0: zeros, not PEFT's 0/0 = NaN
    if density == 0.0 and rescale:
        assert torch.isnan(peer_prune(x, 0.0, "random", True, mask)).all()  # the PEFT bug being fixed


def test_random_pruning_rate_and_seeding():
    x = torch.ones(200_000)
    kept = (CP.random_pruning(x, 0.3, False, seed=1) != 0).float().mean().item()
    assert abs(kept - 0.3) < 0.005
    assert torch.equal(CP.random_pruning(x, 0.3, False, seed=1), CP.random_pruning(x, 0.3, False, seed=1))
    assert not torch.equal(CP.random_pruning(x, 0.3, False, seed=1), CP.random_pruning(x, 0.3, False, seed=2))
    torch.manual_seed(123)  # seed=None: from torch's default generator, like PEFT's bernoulli
    a, b = CP.random_pruning(x, 0.3, False), CP.random_pruning(x, 0.3, False)
    torch.manual_seed(123)
    assert torch.equal(a, CP.random_pruning(x, 0.3, False)) and not torch.equal(a, b)


def test_majority_sign_mask_and_disjoint_merge(gen):
    S = torch.stack(tasks(gen, 3))
    for method in ("total", "frequency"):
        same(CP.calculate_majority_sign_mask(S, method), peer_sign_mask(S, method))
    with pytest.raises(RuntimeError):
        CP.calculate_majority_sign_mask(S, "mass")
    m = peer_sign_mask(S)
    same(CP.disjoint_merge(S, m), peer_disjoint_mean(S, m))


@pytest.mark.parametrize("name", ["task_arithmetic", "magnitude_prune", "ties"])
@pytest.mark.parametrize("T", [1, 2, 3, 4])
@pytest.mark.parametrize("wname", list(WEIGHTS))
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_peft_merges_fp32_exact(gen, name, T, wname, density):
    xs = tasks(gen, T)
    w = WEIGHTS[wname](T)
    if w.dim() == 1 and w.numel() not in (1, T):
        pytest.skip("weights do not broadcast")
    args = (xs, w) if name == "task_arithmetic" else (xs, w, density)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        same(getattr(CP, name)(*args), peer_merge(name, xs, w, density))
        if name == "ties":
            same(CP.ties(*args, majority_sign_method="frequency"), peer_merge(name, xs, w, density, "frequency"))


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("name", ["task_arithmetic", "magnitude_prune", "ties"])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_peft_merges_half_inputs(gen, dtype, name, wdtype):
    """PEFT's add_weighted_adapter passes float32 weights: float32 result.  Half weights keep PEFT's
    half-type arithmetic (plain torch path).  tie_break='topk' reproduces PEFT's choice among the many
    equal magnitudes of half-precision data."""
    xs = tasks(gen, 3, dtype=dtype)
    for w in (torch.ones(3, dtype=wdtype), torch.tensor([0.5, 1.5, 1.0], dtype=wdtype)):
        args = (xs, w) if name == "task_arithmetic" else (xs, w, 0.4)
        kw = {} if name == "task_arithmetic" else {"tie_break": "topk"}
        same(getattr(CP, name)(*args, **kw), peer_merge(name, xs, w, 0.4))


@pytest.mark.parametrize("T", [5, 8])
def test_peft_many_tasks_sequential_order(gen, T):
    xs = tasks(gen, T, shape=(64, 65))
    w = torch.linspace(0.1, 1.0, T)
    got = CP.task_arithmetic(xs, w)
    acc = torch.zeros(64, 65)
    for x, wt in zip(xs, w):
        acc = acc + x * wt
    same(got, acc)
    assert torch.allclose(got, peer_merge("task_arithmetic", xs, w), rtol=1e-6, atol=1e-6)
    S = torch.stack([peer_magnitude(x, 0.5) for x in xs])
    mask = peer_sign_mask(S)
    same(CP.ties(xs, torch.ones(T), 0.5), seq_sum(S * mask) / torch.clamp(mask.sum(dim=0), min=1.0))


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("wname", ["ones", "varied", "neg", "zero"])
@pytest.mark.parametrize("density", [0.0, 0.3, 0.8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_peft_dare_merges(gen, name, wname, density, dtype):
    T = 3
    xs = tasks(gen, T, dtype=dtype)
    w = WEIGHTS[wname](T)
    got = getattr(CP, name)(xs, w, density, seed=11)
    masks = dare_masks(11, xs, density)
    # PEFT's composition on the shim's draws; rescale as the ops do it (x * fp32(1/density)), kept in fp32
    # (the result is fp32: fp32 weights), where PEFT would first round x / density to bf16
    pruned = [torch.where(m, x.float() * torch.tensor(1.0 / density if density else 0.0), torch.zeros(()))
              for x, m in zip(xs, masks)]
    exp = peer_merge("task_arithmetic" if name == "dare_linear" else "dare_ties", pruned, w, 1.0,
                     dare_masks=[torch.ones_like(m) for m in masks])
    same(got, exp)
    assert not torch.isnan(got).any()
    if density == 0.0:
        assert torch.all(got == 0)
    # the torch fallback path (2-D weights) draws the same masks
    same(getattr(CP, name)(xs, w[:, None], density, seed=11), exp)


def test_peft_dare_density_one_and_errors(gen):
    xs = tasks(gen, 2)
    w = torch.tensor([0.6, 0.9])
    with pytest.warns(UserWarning):
        same(CP.dare_linear(xs, w, 1.0), peer_merge("task_arithmetic", xs, w))
    with pytest.warns(UserWarning):
        same(CP.dare_ties(xs, w, 1.0), peer_merge("ties", xs, w, 1.0))
    with pytest.raises(ValueError):
        CP.dare_linear(xs, w, -0.2)


def test_peft_autograd_and_shapes(gen):
    xs = [x.requires_grad_() for x in tasks(gen, 2)]
    w = torch.tensor([0.5, 2.0])
    out = CP.task_arithmetic(xs, w)  # grad-requiring inputs: PEFT's torch composition
    out.sum().backward()
    assert torch.allclose(xs[0].grad, torch.full_like(xs[0], 0.5))
    with pytest.raises(RuntimeError):
        CP.task_arithmetic(tasks(gen, 2), torch.ones(3))  # does not broadcast, like PEFT


# ================================================================================================
# task_vectors.TaskVector
# ================================================================================================
class Tiny(torch.nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.lin = torch.nn.Linear(6, 4).to(dtype)
        self.ln = torch.nn.LayerNorm(4).to(dtype)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.0, dtype=dtype))
        self.register_buffer("position_ids", torch.arange(5))
        self.register_buffer("flags", torch.ones(3, dtype=torch.uint8))


def tiny_models(gen, T=3, dtype=torch.float32):
    base = Tiny(dtype)
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    fts = []
    for _ in range(T):
        m = copy.deepcopy(base)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=gen).to(dtype))
        fts.append(m)
    return base, fts


def peer_tv(ptm_sd, ft_sd):
    return {k: ft_sd[k] - v for k, v in ptm_sd.items() if v.dtype not in (torch.int64, torch.uint8)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_task_vector_construction_and_arithmetic(gen, dtype, tmp_path):
    base, fts = tiny_models(gen, dtype=dtype)
    p0 = tmp_path / "zeroshot.pt"
    torch.save(base, p0)  # pickled nn.Module, as the task_vectors checkpoints
    paths = []
    for i, m in enumerate(fts):
        paths.append(tmp_path / f"ft{i}.pt")
        torch.save(m, paths[-1])
    tvs = [CTV.TaskVector(str(p0), str(p)) for p in paths]
    ref = [peer_tv(base.state_dict(), m.state_dict()) for m in fts]
    for tv, r in zip(tvs, ref):
        assert list(tv.vector) == list(r)  # int64 / uint8 keys skipped, order kept
        for k in r:
            same(tv.vector[k], r[k])
    # in-memory modules and state dicts give the same vectors
    for k, v in CTV.TaskVector(base, fts[0]).vector.items():
        same(v, ref[0][k])
    for k, v in CTV.TaskVector(base.state_dict(), fts[0].state_dict()).vector.items():
        same(v, ref[0][k])
    # +, sum(), -, and a - b
    total = sum(tvs)
    exp = {k: (ref[0][k] + ref[1][k]) + ref[2][k] for k in ref[0]}
    for k in exp:
        same(total.vector[k], exp[k])
    for k, v in (-tvs[0]).vector.items():
        same(v, -ref[0][k])
    for k, v in (tvs[2] + tvs[1] - tvs[0]).vector.items():
        same(v, (ref[2][k] + ref[1][k]) + (-ref[0][k]))
    assert (0 + tvs[0]) is tvs[0] and tvs[0].__radd__(None) is tvs[0]


def test_task_vector_vector_keyword_and_missing_keys(gen):
    a = CTV.TaskVector(vector={"w": torch.ones(3), "b": torch.zeros(2)})
    b = CTV.TaskVector(vector={"w": torch.full((3,), 2.0)})
    assert a.vector["w"] is not None and CTV.TaskVector(vector=a.vector).vector is a.vector
    with pytest.warns(UserWarning, match="not present in both"):
        c = a + b
    assert list(c.vector) == ["w"] and torch.equal(c.vector["w"], torch.full((3,), 3.0))
    with pytest.raises(ValueError):
        CTV.TaskVector(pretrained_checkpoint="x.pt")
    with pytest.raises(TypeError):
        a + 1.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("coef", [1.0, 0.8, -0.5, 0.3])
def test_task_vector_apply_to(gen, dtype, coef, tmp_path):
    base, fts = tiny_models(gen, T=2, dtype=dtype)
    tv = sum(CTV.TaskVector(base, m) for m in fts)
    sd = base.state_dict()
    exp = {k: (sd[k] + coef * tv.vector[k]) if k in tv.vector else sd[k] for k in sd}
    # a path to a pickled module -> the module
    torch.save(base, tmp_path / "zs.pt")
    model = tv.apply_to(str(tmp_path / "zs.pt"), scaling_coef=coef)
    assert isinstance(model, Tiny)
    for k, v in model.state_dict().items():
        same(v, exp[k])
    # an in-memory module -> a modified deep copy, the argument stays pretrained
    before = {k: v.clone() for k, v in sd.items()}
    m2 = tv.apply_to(base, coef)
    assert m2 is not base
    for k in sd:
        same(base.state_dict()[k], before[k])
        same(m2.state_dict()[k], exp[k])
    # a state dict (or a state-dict file) -> a state dict in the pretrained order
    out = tv.apply_to(sd, coef)
    assert list(out) == list(sd)
    for k in sd:
        same(out[k], exp[k])
    torch.save(sd, tmp_path / "zs_sd.pt")
    out2 = tv.apply_to(tmp_path / "zs_sd.pt", coef, weights_only=True)
    for k in sd:
        same(out2[k], exp[k])


def test_task_vector_apply_to_missing_float_key_warns(gen):
    base, fts = tiny_models(gen, T=1)
    tv = CTV.TaskVector(base, fts[0])
    del tv.vector["ln.bias"]
    with pytest.warns(UserWarning, match="ln.bias"):
        out = tv.apply_to(base.state_dict(), 0.5)
    assert torch.equal(out["ln.bias"], base.state_dict()["ln.bias"])  # keeps the pretrained value
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # int64/uint8 buffers are expected to be missing: no warning
        CTV.TaskVector(base, fts[0]).apply_to(base.state_dict(), 0.5)


def test_task_vector_weights_only(gen, tmp_path):
    base, fts = tiny_models(gen, T=1)
    torch.save(base, tmp_path / "zs.pt")
    torch.save(fts[0], tmp_path / "ft.pt")
    with pytest.raises(pickle.UnpicklingError):
        CTV.TaskVector(tmp_path / "zs.pt", tmp_path / "ft.pt", weights_only=True)
    tv = CTV.TaskVector(tmp_path / "zs.pt", tmp_path / "ft.pt")  # trusted path: full unpickling
    assert set(tv.vector) == set(peer_tv(base.state_dict(), fts[0].state_dict()))


def test_task_vector_mixed_dtypes_fall_back_to_torch():
    a = CTV.TaskVector(vector={"w": torch.ones(4), "h": torch.ones(4, dtype=torch.float16)})
    b = CTV.TaskVector(vector={"w": torch.ones(4, dtype=torch.bfloat16),
                               "h": torch.full((4,), 0.5, dtype=torch.float16)})
    c = a + b
    same(c.vector["w"], torch.ones(4) + torch.ones(4, dtype=torch.bfloat16))  # promoted, as torch does
    same(c.vector["h"], torch.full((4,), 1.5, dtype=torch.float16))
    out = c.apply_to({"w": torch.zeros(4, dtype=torch.float64), "h": torch.ones(4, dtype=torch.float16)}, 0.1)
    same(out["w"], torch.zeros(4, dtype=torch.float64) + 0.1 * c.vector["w"])
    same(out["h"], torch.ones(4, dtype=torch.float16) + 0.1 * c.vector["h"])


# ================================================================================================
# Inputs that require grad (grad mode on): the shims work as PEFT / FusionBench do
# ================================================================================================
def _grad_case(name, gen):
    """(shim, peer, inputs) of one shim: shim and peer take a list of tensors."""
    T = 3
    xs = tasks(gen, T, shape=(12, 8))
    w = torch.tensor([1.0, 1.0, 1.0])
    M = torch.stack([x.reshape(-1) for x in xs])  # [T, d] rows for the TIES-utils shims
    cases = {
        "magnitude_based_pruning": (lambda a: CP.magnitude_based_pruning(a[0], 0.5),
                                    lambda a: peer_magnitude(a[0], 0.5), [xs[0]]),
        "magnitude_based_pruning_all": (lambda a: CP.magnitude_based_pruning(a[0], 0.5, tie_break="all"),
                                        lambda a: peer_magnitude(a[0], 0.5), [xs[0]]),
        "prune": (lambda a: CP.prune(a[0], 0.3, "magnitude"), lambda a: peer_prune(a[0], 0.3, "magnitude"), [xs[0]]),
        "magnitude_prune": (lambda a: CP.magnitude_prune(a, w, 0.4),
                            lambda a: peer_merge("magnitude_prune", a, w, 0.4), xs),
        "ties": (lambda a: CP.ties(a, w, 0.4), lambda a: peer_merge("ties", a, w, 0.4), xs),
        "topk_values_mask": (lambda a: CT.topk_values_mask(a[0], K=0.3)[0],
                             lambda a: peer_topk_values_mask(a[0], K=0.3)[0], [M]),
        "ties_merging": (lambda a: CT.ties_merging(a[0], reset_thresh=30, merge_func="dis-mean"),
                         lambda a: peer_ties(a[0], 30, "mean"), [M]),
        "ties_merging_split": (lambda a: CT.ties_merging_split(a[0], reset_thresh=30, merge_func="dis-sum")[1],
                               lambda a: peer_ties(a[0], 30, "sum"), [M]),
    }
    return cases[name]


@pytest.mark.parametrize("name", ["magnitude_based_pruning", "magnitude_based_pruning_all", "prune",
                                  "magnitude_prune", "ties", "topk_values_mask", "ties_merging",
                                  "ties_merging_split"])
def test_shims_on_tensors_requiring_grad(gen, name):
    """Magnitude selection used to call .numpy() on the inputs (``Can't call numpy() on Tensor that requires
    grad``).  With grad-requiring inputs every shim returns what it returns on plain inputs, and, like the
    original (plain torch ops on the inputs), a result that carries grad: the same gradients as the peer."""
    shim, peer, inputs = _grad_case(name, gen)
    want = shim(inputs)  # plain inputs
    with torch.enable_grad():
        a = [x.clone().requires_grad_() for x in inputs]
        got = shim(a)
        b = [x.clone().requires_grad_() for x in inputs]
        ref = peer(b)
        assert got.requires_grad and ref.requires_grad
        same(got.detach(), want)
        same(got.detach(), ref.detach())
        got.sum().backward()
        ref.sum().backward()
    for x, y in zip(a, b):
        same(x.grad, y.grad)
