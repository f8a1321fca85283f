"""bf16/fp16 merges are rounded once: every intermediate is fp32 and only the final result is rounded to
the output dtype.  In particular with ``task_vectors=True`` and a pretrained base the merged task vector
must reach ``θ0 + λ τ_m`` in fp32 (rounding it to bf16 first rounds ~0.5% of the elements twice).

The references here are written in this file: fp32 arithmetic in the documented order (Σ_t τ_t, then
× λ, then + θ0), one final ``.to(dtype)``; compared bit for bit on 4,096+ elements per tensor."""
import math

import pytest
import torch

from calm_fast import methods, reference
from conftest import assert_same

HALF = [torch.bfloat16, torch.float16]
SHAPES = {"layers.0.w": (64, 48), "layers.1.w": (40, 33), "norm.b": (17,)}


def _data(gen, dtype, T=3):
    """θ0 with a wide magnitude spread and task vectors of various sizes, all in ``dtype``."""
    pre = {k: (torch.randn(s, generator=gen) * 4.0).to(dtype) for k, s in SHAPES.items()}
    taus = [{k: (torch.randn(s, generator=gen) * 0.05 * (t + 1)).to(dtype) for k, s in SHAPES.items()}
            for t in range(T)]
    return pre, taus


def _plus(pre, tau):
    return {k: (pre[k].float() + tau[k].float()).to(pre[k].dtype) for k in pre}


def _ties_tm(taus32, density, merge):
    """TIES on fp32 task vectors (dict per task): global P1 trim over the sorted flattened keys, sign of
    the sum (exact zeros take the global majority sign), disjoint sum or mean; fp32, tasks in order."""
    keys = sorted(taus32[0])
    T = len(taus32)
    flat = [torch.cat([t[k].reshape(-1) for k in keys]) for t in taus32]
    n = flat[0].numel()
    kk = n - math.floor(density * n)
    trimmed = []
    for v in flat:
        thr = torch.kthvalue(v.abs(), kk).values if kk > 0 else torch.tensor(0.0)
        trimmed.append(torch.where(v.abs() >= thr, v, torch.zeros(())))
    s = trimmed[0]
    for t in range(1, T):
        s = s + trimmed[t]
    gamma = torch.sign(s)
    total = int(gamma.sum())
    gamma = torch.where(gamma == 0, torch.tensor(1.0 if total >= 0 else -1.0), gamma)
    r = torch.zeros(n)
    count = torch.zeros(n)
    for v in trimmed:
        agree = ((gamma > 0) & (v > 0)) | ((gamma < 0) & (v < 0))
        r = r + torch.where(agree, v, torch.zeros(()))
        count = count + agree.float()
    if merge == "mean":
        r = r / count.clamp(min=1)
    out, i = {}, 0
    for k in keys:
        m = taus32[0][k].numel()
        out[k] = r[i:i + m].reshape(taus32[0][k].shape)
        i += m
    return out


def _sum_tm(taus32):
    keys = taus32[0].keys()
    out = {}
    for k in keys:
        acc = torch.zeros_like(taus32[0][k])
        for t in taus32:
            acc = acc + t[k]
        out[k] = acc
    return out


def _want(pre, tm, lam, dtype):
    """One rounding: fp32 θ0 + λ τ_m (or λ τ_m without θ0), then to ``dtype``."""
    if pre is None:
        return {k: (lam * v).to(dtype) for k, v in tm.items()}
    return {k: (pre[k].float() + lam * tm[k]).to(dtype) for k in tm}


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "f16"])
@pytest.mark.parametrize("inputs", ["task_vectors_with_base", "task_vectors_alone", "finetuned"])
@pytest.mark.parametrize("method", ["task_arithmetic", "ties_sum", "ties_mean", "dare"])
def test_half_precision_rounds_once(gen, dtype, inputs, method):
    pre, taus = _data(gen, dtype)
    lam = 0.3
    if inputs == "finetuned":
        models = [_plus(pre, t) for t in taus]
        taus32 = [{k: m[k].float() - pre[k].float() for k in pre} for m in models]  # τ in fp32, as read
    else:
        models = taus
        taus32 = [{k: v.float() for k, v in t.items()} for t in taus]
    base = None if inputs == "task_vectors_alone" else pre
    kw = dict(task_vectors=inputs != "finetuned")
    if method == "task_arithmetic":
        got = methods.task_arithmetic(base, models, scaling=lam, **kw)
        tm = _sum_tm(taus32)
    elif method.startswith("ties"):
        merge = method.split("_")[1]
        got = methods.ties_merging(base, models, density=0.3, merge=merge, scaling=lam, **kw)
        tm = _ties_tm(taus32, 0.3, merge)
    else:
        p, seed = 0.3, 4
        got = methods.dare_merging(base, models, p=p, seed=seed, scaling=lam, **kw)
        K = reference.dare_key_table(seed, sorted(pre), len(taus32))
        dropped = [{k: reference.dare_reference(t[k], p, int(K[i, l])) for l, k in enumerate(sorted(pre))}
                   for i, t in enumerate(taus32)]
        tm = _sum_tm(dropped)
    want = _want(base, tm, lam, dtype)
    for k in pre:
        assert_same(got[k], want[k], f"{method} {inputs} {k}")


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "f16"])
def test_out_dtype_rounds_once(gen, dtype):
    """fp32 inputs merged to a half ``out_dtype`` (and half inputs to fp32): one rounding, from fp32."""
    pre, taus = _data(gen, torch.float32)
    got = methods.task_arithmetic(pre, taus, scaling=0.7, task_vectors=True, out_dtype=dtype)
    want = _want(pre, _sum_tm(taus), 0.7, dtype)
    for k in pre:
        assert_same(got[k], want[k], k)
    hpre, htaus = _data(gen, dtype)
    hfts = [_plus(hpre, t) for t in htaus]
    taus32 = [{k: f[k].float() - hpre[k].float() for k in hpre} for f in hfts]
    for fn, tm in [(methods.ties_merging, _ties_tm(taus32, 0.5, "sum")), (methods.task_arithmetic, _sum_tm(taus32))]:
        kw = {"density": 0.5} if fn is methods.ties_merging else {}
        got = fn(hpre, hfts, scaling=0.7, out_dtype=torch.float32, **kw)
        want = _want(hpre, tm, 0.7, torch.float32)
        for k in hpre:
            assert_same(got[k], want[k], k)
