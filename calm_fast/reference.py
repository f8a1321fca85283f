"""Pure-PyTorch reference implementations: the executable specification.

Two layers, both written directly from the methods' specifications and independent of the C++/CUDA kernels:

* **Op references** (:class:`ReferenceOps`): the same signatures as ``torch.ops.calm_fast.*``.  Tests
  compare every kernel with them; ``CALM_FAST_FALLBACK=reference`` runs the whole library on them.
* **Method references** (``*_reference`` functions): whole methods on state dicts, written the way the
  public reference code computes them (flatten all keys in sorted order, ``torch.kthvalue``, sign of a
  sum, ...), deliberately naive: clarity over speed and memory.
"""
from __future__ import annotations

import hashlib
import math
import struct
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

Tensor = torch.Tensor

# Philox-4x32-10 (DARE's counter-based generator): shared with the engine, see calm_fast.philox
from .philox import philox_uniform  # noqa: E402,F401  (re-exported: part of the reference API)


def dare_key(seed: int, task: int, name: str) -> int:
    """The DARE key of one (seed, task index, tensor name): the 8-byte BLAKE2b digest of the UTF-8 text
    ``"{seed}/{task}/{name}"`` read as a little-endian signed 64-bit integer.

    Written here from that definition, independently of :func:`calm_fast.ops.dare_keys`, so that the
    references do not share a bug with the implementation (tests pin both to known values)."""
    digest = hashlib.blake2b(("%d/%d/%s" % (int(seed), int(task), name)).encode("utf-8"), digest_size=8).digest()
    return struct.unpack("<q", digest)[0]


def dare_key_table(seed: int, names: Sequence[str], num_tasks: int) -> Tensor:
    """[T, L] int64 table of :func:`dare_key` (row t = task t, column l = tensor ``names[l]``)."""
    return torch.tensor([[dare_key(seed, t, n) for n in names] for t in range(num_tasks)],
                        dtype=torch.int64).reshape(num_tasks, len(names))


def pack_bits(mask: Tensor) -> Tensor:
    """bool mask -> uint8 bytes, element i in bit (i mod 8) of byte (i div 8), zero padding (NumPy's
    little-endian bit order; independent of :func:`calm_fast.ops.pack_mask`)."""
    flat = mask.detach().reshape(-1).cpu().numpy().astype(bool)
    return torch.from_numpy(np.packbits(flat, bitorder="little").copy())


def unpack_bits(packed: Tensor, numel: int) -> Tensor:
    """The inverse of :func:`pack_bits`: the first ``numel`` bits as a bool tensor (on packed's device)."""
    bits = np.unpackbits(packed.detach().reshape(-1).cpu().numpy().astype(np.uint8), bitorder="little")
    return torch.from_numpy(bits[:numel].astype(bool).copy()).to(packed.device)


def dare_reference(tau: Tensor, p: float, key: int, rescale: bool = True) -> Tensor:
    """DARE on one fp32 task-vector tensor: keep iff u >= p, survivors times 1/(1-p) (0 if p == 1)."""
    if p <= 0:
        return tau
    flat = tau.reshape(-1)
    u = philox_uniform(torch.arange(flat.numel(), dtype=torch.int64), int(key) & ((1 << 64) - 1))
    keep = u >= p
    factor = (1.0 / (1.0 - p) if p < 1 else 0.0) if rescale else 1.0
    factor = torch.tensor(factor, dtype=torch.float32)
    return torch.where(keep, flat * factor, torch.zeros_like(flat)).reshape(tau.shape)


# ------------------------------------------------------------------------------------------------
# Op references (signatures of torch.ops.calm_fast.*)
# ------------------------------------------------------------------------------------------------
def _taus(inputs, base, T, dare_p=0.0, dare_keys=None, dare_rescale=True) -> List[List[Tensor]]:
    """taus[t][l] in fp32 (tau = input - base when a base is given), DARE applied."""
    L = len(inputs) // T
    out = []
    for t in range(T):
        row = []
        for l in range(L):
            x = inputs[t * L + l].float()
            if base:
                x = x - base[l].float()
            if dare_p > 0:
                x = dare_reference(x, dare_p, int(dare_keys[t, l]), dare_rescale)
            row.append(x)
        out.append(row)
    return out


def _keys(x: Tensor) -> Tensor:
    return x.float().view(torch.int32).to(torch.int64) & 0x7FFFFFFF


def _nonfinite(taus) -> int:
    return int(sum((~torch.isfinite(x)).sum() for row in taus for x in row))


# ------------------------------------------------------------------------------------------------
# CALM per-element formulas, written as the official code evaluates them
# ------------------------------------------------------------------------------------------------
# The sigmoid of the CALM references.  The kernels use their own fp32 sigmoid (within 2 ulp of this
# one); tests swap in the native one here to compare the rest of the arithmetic bit for bit.
calm_sigmoid = torch.sigmoid

_CALM_MODES = ("fused", "faithful", "round")


def _calm_mode(mode: str) -> str:
    if mode not in _CALM_MODES:
        raise RuntimeError(f"calm: mode must be 'fused', 'faithful' or 'round', got {mode!r}")
    return mode


def _calm_theta(b: Optional[Tensor], p: Tensor, n: Tensor, r: Tensor, mode: str) -> Tensor:
    """theta in fp32 from fp32 b (or None), tau_prev p, tau_new n and logits r (see calm_fast.ops)."""
    s = calm_sigmoid(r)
    if mode == "round":
        v = torch.where(torch.round(s) == 1, n, p)
        return v if b is None else b + v
    if mode == "faithful":
        return ((b + (1 - s) * p) if b is not None else (1 - s) * p) + s * n
    return ((b + p) if b is not None else p) + s * (n - p)


def _calm_out_dtype(base, tau_prev, tau_new, out_float: bool) -> torch.dtype:
    if out_float:
        return torch.float32
    if base:
        return base[0].dtype
    return torch.promote_types(tau_prev[0].dtype, tau_new[0].dtype) if tau_prev else torch.float32


class ReferenceOps:
    """Pure-PyTorch versions of the native ops (same arguments and results)."""

    @staticmethod
    def build_info() -> str:
        return "pure-PyTorch reference"

    @staticmethod
    def abs_histogram_(hist, inputs, base, num_tasks, prefix, dare_p, dare_keys, dare_rescale):
        T = num_tasks
        taus = _taus(inputs, base, T, dare_p, dare_keys, dare_rescale)
        for t in range(T):
            if not taus[t]:
                continue
            k = torch.cat([_keys(x).reshape(-1) for x in taus[t]]).to(hist.device)
            if prefix is None:
                hist[t] += torch.bincount(k >> 16, minlength=hist.shape[1])
            elif int(prefix[t]) >= 0:
                sel = k[(k >> 16) == int(prefix[t])]
                hist[t] += torch.bincount(sel & 0xFFFF, minlength=hist.shape[1])

    @staticmethod
    def abs_bracket(inputs, base, num_tasks, lo, hi, capacity, dare_p, dare_keys, dare_rescale):
        T = num_tasks
        taus = _taus(inputs, base, T, dare_p, dare_keys, dare_rescale)
        counts = torch.zeros(T, 4, dtype=torch.int64)
        cand = torch.zeros(T, capacity)
        for t in range(T):
            if not taus[t]:
                continue
            a = torch.cat([x.abs().reshape(-1) for x in taus[t]])
            ka, klo, khi = _keys(a), _keys(lo[t].reshape(1)), _keys(hi[t].reshape(1))
            inside = a[(ka > klo) & (ka < khi)]
            counts[t] = torch.stack([(ka < klo).sum(), (ka == klo).sum(), inside.numel() * torch.ones((), dtype=torch.int64),
                                     ((ka == khi) & (khi > klo)).sum()])
            m = min(capacity, inside.numel())
            cand[t, :m] = inside[:m]
        return counts, cand

    @staticmethod
    def abs_kth_per_tensor(inputs, base, num_tasks, ks, dare_p, dare_keys, dare_rescale):
        T = num_tasks
        L = len(inputs) // T if T else 0
        taus = _taus(inputs, base, T, dare_p, dare_keys, dare_rescale)
        out = torch.zeros(T, L, dtype=torch.float32)
        for t in range(T):
            for l in range(L):
                k = int(ks[t, l])
                if k > 0:  # the k-th smallest magnitude key (bit pattern order), as a float
                    key = torch.kthvalue(_keys(taus[t][l]).reshape(-1).cpu(), k).values
                    out[t, l] = key.to(torch.int32).view(torch.float32)
        return out

    @staticmethod
    def weighted_merge(inputs, base, num_tasks, weights, scale, thresholds, strict, masks, dare_p, dare_keys,
                       dare_rescale, out_float):
        T = num_tasks
        L = len(inputs) // T
        taus = _taus(inputs, base, T, dare_p, dare_keys, dare_rescale)
        outs = []
        for l in range(L):
            acc = torch.zeros(inputs[l].shape, dtype=torch.float32, device=inputs[l].device)
            for t in range(T):
                x = taus[t][l]
                if thresholds is not None:
                    thr = float(thresholds[t, l])
                    x = torch.where(x.abs() > thr if strict else x.abs() >= thr, x, torch.zeros_like(x))
                if masks:
                    m = masks[t * L + l]
                    if m.dtype == torch.uint8:
                        m = unpack_bits(m, x.numel()).reshape(x.shape)
                    x = torch.where(m.reshape(x.shape), x, torch.zeros_like(x))
                acc = acc + float(weights[t, l]) * x
            res = (base[l].float() + scale * acc) if base else scale * acc
            outs.append(res.to(torch.float32 if out_float else inputs[l].dtype))
        return outs, torch.tensor(_nonfinite(taus))

    @staticmethod
    def ties_merge(inputs, base, num_tasks, thresholds, strict, weights, merge, scale, zero_sign, dare_p, dare_keys,
                   dare_rescale, out_float, max_positions):
        T = num_tasks
        L = len(inputs) // T
        taus = _taus(inputs, base, T, dare_p, dare_keys, dare_rescale)
        outs, sign_sums, cancel, positions, patches = [], [], [], [], []
        offset = 0
        for l in range(L):
            vals = []
            for t in range(T):
                x = taus[t][l].reshape(-1)
                thr = float(thresholds[t, l])
                keep = x.abs() > thr if strict else x.abs() >= thr
                vals.append(torch.where(keep, x * float(weights[t, l]), torch.zeros_like(x)))
            V = torch.stack(vals) if vals else torch.zeros(0, 0)
            s = torch.zeros(V.shape[1])
            for t in range(T):  # sequential sum, t ascending (the kernels' order)
                s = s + V[t]
            gamma = torch.sign(s)
            cancelled = (gamma == 0) & (V != 0).any(dim=0)
            sign_sums.append(int(gamma.sum()))
            cancel.append(int(cancelled.sum()))
            b = base[l].float().reshape(-1) if base else None

            def merged(zs: float) -> Tensor:
                g = torch.where(gamma != 0, gamma, torch.full_like(gamma, zs))
                keep = torch.where(g > 0, V > 0, V < 0)
                E = torch.where(keep, V, torch.zeros_like(V))
                if merge == "sum":
                    r = torch.zeros_like(s)
                    for t in range(T):
                        r = r + E[t]
                elif merge == "mean":
                    r = torch.zeros_like(s)
                    for t in range(T):
                        r = r + E[t]
                    r = r / keep.sum(dim=0).clamp(min=1).float()
                elif merge == "max":
                    r = g * E.abs().amax(dim=0) if T else s
                else:
                    raise ValueError(f"merge must be sum, mean or max, got {merge!r}")
                return (b + scale * r) if b is not None else scale * r

            res = merged(float(zero_sign[l]))
            outs.append(res.reshape(inputs[l].shape).to(torch.float32 if out_float else inputs[l].dtype))
            idx = torch.nonzero(cancelled).reshape(-1)
            if idx.numel():
                positions.append(idx + offset)
                patches.append(torch.stack([merged(1.0)[idx], merged(-1.0)[idx], merged(0.0)[idx]], dim=1))
            offset += inputs[l].numel()
        pos = torch.cat(positions) if positions else torch.zeros(0, dtype=torch.int64)
        pat = torch.cat(patches) if patches else torch.zeros(0, 3)
        if pos.numel() > max_positions:  # all or nothing (see calm_fast.ops.ties_merge)
            pos, pat = pos[:0], pat[:0]
        return (outs, torch.tensor(sign_sums, dtype=torch.int64), pos, pat,
                torch.tensor(cancel, dtype=torch.int64), torch.tensor(_nonfinite(taus)))

    @staticmethod
    def consensus_merge(inputs, base, num_tasks, tall_lambdas, mtl, min_count, alpha, return_masks, out_float):
        T = num_tasks
        L = len(inputs) // T
        taus = _taus(inputs, base, T)
        outs, masks = [], [None] * (T * L)
        for l in range(L):
            if mtl:
                m = mtl[l].float().reshape(taus[0][l].shape)
            else:
                m = torch.zeros_like(taus[0][l])
                for t in range(T):
                    m = m + taus[t][l]
            count = torch.zeros(m.shape, dtype=torch.int64)
            for t in range(T):
                mk = taus[t][l].abs() > float(tall_lambdas[t]) * (m - taus[t][l]).abs()
                count += mk
                if return_masks:
                    masks[t * L + l] = pack_bits(mk).to(mk.device)
            kept = torch.where(count >= min_count, m, torch.zeros_like(m))
            res = (base[l].float() + alpha * kept) if base else alpha * kept
            outs.append(res.to(torch.float32 if out_float else inputs[l].dtype))
        return outs, (masks if return_masks else []), torch.tensor(_nonfinite(taus))


    # --- CALM mask training -------------------------------------------------------------------------
    @staticmethod
    def calm_interpolate(base, tau_prev, tau_new, R, interp_mode, out_float):
        mode = _calm_mode(interp_mode)
        dt = _calm_out_dtype(base, tau_prev, tau_new, out_float)
        return [_calm_theta(base[l].float() if base else None, tau_prev[l].float(), tau_new[l].float(), r, mode).to(dt)
                for l, r in enumerate(R)]

    @staticmethod
    def calm_accumulate_(A, grad, tau_prev, tau_new, eta, faithful):
        for a, g, p, n in zip(A, grad, tau_prev, tau_new):
            g, p, n = g.float(), p.float(), n.float()
            gd = (-g * p + g * n) if faithful else g * (n - p)
            a.copy_(a + eta * gd)

    @staticmethod
    def calm_mask_step_(R, A, alpha, faithful, theta, base, tau_prev, tau_new, interp_mode):
        mode = _calm_mode(interp_mode)
        on, flips = 0, 0
        for l, (r, a) in enumerate(zip(R, A)):
            s = calm_sigmoid(r)
            d = s * (1 - s)
            if faithful:
                rn = r - (a * d - alpha * torch.where(r > 0, d, -d))
            else:
                rn = r - a * d + alpha * torch.where(r > 0, 1.0, -1.0) * d
            m_old = torch.round(s) == 1
            m_new = torch.round(calm_sigmoid(rn)) == 1
            on += int(m_new.sum())
            flips += int((m_old != m_new).sum())
            r.copy_(rn)
            a.zero_()
            if theta:
                b = base[l].float() if base else None
                theta[l].copy_(_calm_theta(b, tau_prev[l].float(), tau_new[l].float(), r, mode))
        dev = R[0].device if R else torch.device("cpu")
        return torch.tensor([on, flips], dtype=torch.int64, device=dev)

    @staticmethod
    def calm_binarize_merge(tau_prev, tau_new, R):
        dt = _calm_out_dtype([], tau_prev, tau_new, False)
        outs, count = [], 0
        for p, n, r in zip(tau_prev, tau_new, R):
            m = torch.round(calm_sigmoid(r)) == 1
            count += int(m.sum())
            outs.append(torch.where(m, n.to(dt), p.to(dt)))
        return outs, torch.tensor(count, dtype=torch.int64)

def coef_grad_reference(grads, inputs, base, num_tasks: int, thresholds=None, strict: bool = False,
                        masks=None) -> Tensor:
    """AdaMerging's coefficient gradient (ALGORITHMS.md §6), float64 ``[T, L]``:
    ``out[t, l] = <grads[l], keep_{t,l} * tau_{t,l}>``, the dot product taken in float64.

    tau and keep as :meth:`ReferenceOps.weighted_merge` computes them (tau in fp32, ``input - base`` when a
    base is given; keep from ``|tau| >= thresholds[t, l]`` (``>`` when strict) and bool or bit-packed masks),
    so the kept set is exactly the merge's; only the sum is exact-ish (fp64) rather than the kernels' order.
    """
    T = int(num_tasks)
    L = len(inputs) // T
    taus = _taus(list(inputs), list(base) if base else [], T)
    out = torch.zeros(T, L, dtype=torch.float64)
    for t in range(T):
        for l in range(L):
            x = taus[t][l]
            if thresholds is not None:
                thr = float(thresholds[t, l]) if torch.is_tensor(thresholds) else float(thresholds)
                x = torch.where(x.abs() > thr if strict else x.abs() >= thr, x, torch.zeros_like(x))
            if masks:
                m = masks[t * L + l]
                if m.dtype == torch.uint8:
                    m = unpack_bits(m, x.numel())
                x = torch.where(m.reshape(x.shape), x, torch.zeros_like(x))
            g = grads[l].reshape(x.shape).double()
            out[t, l] = (g * x.double()).sum()
    return out


def _coef_grad(grads, inputs, base, num_tasks, thresholds, strict, masks):
    """Reference of the ``coef_grad`` op (float32 result of :func:`coef_grad_reference`)."""
    dev = inputs[0].device if inputs else torch.device("cpu")
    return coef_grad_reference(grads, inputs, base, num_tasks, thresholds, strict, masks).float().to(dev)


ReferenceOps.coef_grad = staticmethod(_coef_grad)


# ------------------------------------------------------------------------------------------------
# Method references on state dicts, the way the public code computes them
# ------------------------------------------------------------------------------------------------
def _float_keys(sd: Mapping[str, Tensor], keys: Optional[Sequence[str]] = None) -> List[str]:
    ks = sorted(keys if keys is not None else sd.keys())
    return [k for k in ks if sd[k].is_floating_point()]


def _flatten(sd: Mapping[str, Tensor], keys: Sequence[str]) -> Tensor:
    return torch.cat([sd[k].float().reshape(-1) for k in keys]) if keys else torch.zeros(0)


def _unflatten(vec: Tensor, like: Mapping[str, Tensor], keys: Sequence[str]) -> Dict[str, Tensor]:
    out, i = {}, 0
    for k in keys:
        n = like[k].numel()
        out[k] = vec[i:i + n].reshape(like[k].shape)
        i += n
    return out


def task_arithmetic_reference(pretrained, finetuned, scaling: float = 0.3, keys=None) -> Dict[str, Tensor]:
    """θ = θ0 + λ Σ_t τ_t (§1), FusionBench order: Σ τ_t first, then × λ, then + θ0 (fp32)."""
    keys = _float_keys(pretrained, keys)
    out = {}
    for k in keys:
        acc = torch.zeros_like(pretrained[k], dtype=torch.float32)
        for ft in finetuned:
            acc = acc + (ft[k].float() - pretrained[k].float())
        out[k] = pretrained[k].float() + scaling * acc
    return out


def topk_values_mask_reference(M: Tensor, K: float) -> Tensor:
    """P1 on each row of M (the TIES helper): keep |x| >= the (d - floor(K*d))-th smallest |x|."""
    if K > 1:
        K /= 100
    d = M.shape[1]
    k = d - int(math.floor(K * d))
    kth = M.abs().kthvalue(k, dim=1, keepdim=True).values
    return M.abs() >= kth


def ties_merging_reference(pretrained, finetuned, density: float = 0.2, merge: str = "sum", scaling: float = 0.3,
                           keys=None) -> Dict[str, Tensor]:
    """TIES (§2) on the globally flattened task vectors: trim (P1), elect with the global majority sign
    for zero elections, disjoint sum/mean/max, θ = θ0 + λ τ_m."""
    keys = _float_keys(pretrained, keys)
    ptm = _flatten(pretrained, keys)
    V = torch.stack([_flatten(ft, keys) - ptm for ft in finetuned])
    if density < 1.0:
        V = V * topk_values_mask_reference(V, density)
    s = V.sum(dim=0)
    gamma = torch.sign(s)
    mu = torch.sign(gamma.sum())
    gamma = torch.where(gamma == 0, mu, gamma)
    keep = torch.where(gamma.unsqueeze(0) > 0, V > 0, V < 0)
    E = V * keep
    if merge == "sum":
        tm = E.sum(dim=0)
    elif merge == "mean":
        tm = E.sum(dim=0) / (E != 0).sum(dim=0).clamp(min=1).float()
    elif merge == "max":
        tm = E.abs().max(dim=0).values * gamma
    else:
        raise ValueError(merge)
    return _unflatten(ptm + scaling * tm, pretrained, keys)


def dare_merging_reference(pretrained, finetuned, p: float = 0.5, seed: int = 0, scaling: float = 0.3,
                           rescale: bool = True, keys=None) -> Dict[str, Tensor]:
    """DARE (§3) + task arithmetic, with the library's Philox keys (:func:`dare_key`, per task and tensor name)."""
    keys = _float_keys(pretrained, keys)
    K = dare_key_table(seed, keys, len(finetuned))
    out = {}
    for l, k in enumerate(keys):
        acc = torch.zeros_like(pretrained[k], dtype=torch.float32)
        for t, ft in enumerate(finetuned):
            acc = acc + dare_reference(ft[k].float() - pretrained[k].float(), p, int(K[t, l]), rescale)
        out[k] = pretrained[k].float() + scaling * acc
    return out


def consensus_merging_reference(pretrained, finetuned, tall_lambdas=0.6, min_count: int = 2, alpha: float = 1.0,
                                keys=None):
    """TALL masks + consensus (§4) with τ_MTL = Σ τ_t (unscaled): returns (merged, per-task bool masks)."""
    keys = _float_keys(pretrained, keys)
    ptm = _flatten(pretrained, keys)
    taus = [_flatten(ft, keys) - ptm for ft in finetuned]
    mtl = torch.zeros_like(ptm)
    for x in taus:
        mtl = mtl + x
    lam = [tall_lambdas] * len(taus) if isinstance(tall_lambdas, (int, float)) else list(tall_lambdas)
    masks = [x.abs() > lam[t] * (mtl - x).abs() for t, x in enumerate(taus)]
    count = torch.stack(masks).sum(dim=0)
    merged = ptm + alpha * torch.where(count >= min_count, mtl, torch.zeros_like(mtl))
    return _unflatten(merged, pretrained, keys), [_unflatten(m, pretrained, keys) for m in masks]


# ------------------------------------------------------------------------------------------------
# CALM end to end, written the way the official code computes it
# ------------------------------------------------------------------------------------------------
def calm_credible_reference(logits, ratio: float, standard: int = 0):
    """§8.2 literally in NumPy: float64 softmax without max-subtraction, H = -Σ p ln(p + 1e-9), argmax
    pseudo-labels, per predicted class the first floor(ratio·|I_c|) of NumPy's default argsort of H
    (``standard=1``: the global lowest floor(ratio·n)).  Returns (sorted sample ids, their labels)."""
    import numpy as np

    z = np.asarray(logits, dtype=np.float64)
    p = np.exp(z) / np.sum(np.exp(z), axis=1, keepdims=True)
    ent = -np.sum(p * np.log(p + 1e-9), axis=1)
    pred = np.argmax(z, axis=1)
    if standard == 1:
        sel = list(np.argsort(ent)[: int(math.floor(ratio * len(ent)))])
    else:
        sel = []
        for c in np.unique(pred):
            idx = np.where(pred == c)[0]
            order = np.argsort(ent[idx])
            sel.extend(idx[order[: int(math.floor(ratio * len(idx)))]])
    ids = np.sort(np.array(sel, dtype=np.int64))
    return ids, pred[ids]


def calm_reference(pretrained: Mapping[str, Tensor], finetuned: Sequence[Mapping[str, Tensor]],
                   masked_keys: Sequence[str], groups: Sequence[Sequence[int]], loss_fn, batches, *,
                   iterations: int = 100, eta: float = 1e7, alpha: float = 1.0, sparsity: float = 1e-5,
                   bias: float = 5.0, ta_scaling: float = 0.3, record=()):
    """CALM's whole procedure (§8.9) in the official arithmetic order (§8.8b), on fp32 state dicts.

    ``loss_fn(params, task, ids)`` is the batch-mean cross-entropy of task ``task`` on the credible samples
    ``ids`` with the masked tensors ``params`` (a dict); ``batches(step, iteration, task)`` gives the list
    of id batches of a seen task (steps count from 1).  ``record`` lists ``(step, iteration)`` pairs whose
    R (after the update) is returned.  Every floating key of ``pretrained`` not in ``masked_keys`` is a
    frozen leftover (TA at step 0, then 0.5·(τ_prev + τ_new)).

    Returns ``{"task_vector": {key: τ_final}, "masks": [{key: bool}], "R": {(step, it): {key: R}}}``.
    """
    keys = [k for k in pretrained if pretrained[k].is_floating_point()]
    taus = [{k: ft[k] - pretrained[k] for k in keys} for ft in finetuned]
    scale = torch.tensor(ta_scaling, dtype=torch.float32)
    acc = {}
    for k in keys:
        s = taus[groups[0][0]][k]
        for t in groups[0][1:]:
            s = s + taus[t][k]
        acc[k] = s * scale
    seen = list(groups[0])
    masks, history = [], {}
    want = set(record)
    for step, group in enumerate(groups[1:], start=1):
        new = group[-1]
        seen = seen + [new]
        prev, nxt = acc, taus[new]
        flat = torch.cat([nxt[k].abs().reshape(-1) for k in masked_keys])
        k_top = int(sparsity * flat.numel())
        thr = torch.topk(flat, k_top).values.min()
        R = {k: torch.where(nxt[k].abs() > thr, torch.tensor(bias), torch.tensor(-bias)).float() for k in masked_keys}
        for it in range(iterations):
            params = {}
            for k in masked_keys:
                s = calm_sigmoid(R[k])
                params[k] = (pretrained[k] + (1 - s) * prev[k] + s * nxt[k]).detach().requires_grad_(True)
            A = {k: torch.zeros_like(R[k]) for k in masked_keys}
            for t in seen:
                for ids in batches(step, it, t):
                    loss = loss_fn(params, t, ids)
                    grads = torch.autograd.grad(loss, [params[k] for k in masked_keys])
                    for k, g in zip(masked_keys, grads):
                        A[k] = A[k] + eta * (-g * prev[k] + g * nxt[k])
            for k in masked_keys:
                s = calm_sigmoid(R[k])
                d = s * (1 - s)
                R[k] = R[k] - (A[k] * d - alpha * torch.where(R[k] > 0, d, -d))
            if (step, it) in want:
                history[(step, it)] = {k: R[k].clone() for k in masked_keys}
        m = {k: torch.round(calm_sigmoid(R[k])) for k in masked_keys}
        masks.append({k: m[k] == 1 for k in masked_keys})
        acc = {}
        for k in keys:
            if k in m:
                acc[k] = (1 - m[k]) * prev[k] + m[k] * nxt[k]
            else:
                acc[k] = 0.5 * (prev[k] + nxt[k])
    return {"task_vector": acc, "masks": masks, "R": history}


# DOGE_TA: plain autograd, the m x m projector, torch.optim.Adam
# ------------------------------------------------------------------------------------------------
def doge_fusion_bench_key(key: str) -> bool:
    """FusionBench's DOGE filter (§0.3): keys containing "encoder" and "weight" and not "layer_norm"."""
    return "encoder" in key and "weight" in key and "layer_norm" not in key


def doge_subspace_reference(taus: Sequence[Tensor], subspace: int = 6) -> Tensor:
    """U_r (m x r) of one layer (§9.1 step B): per task a thin SVD, its first k = floor(K / T) left singular
    vectors placed in columns [t k, (t + 1) k) of B (m x K, K = min(m, n)), then a thin SVD of B and its
    first r = floor(K / subspace) left singular vectors."""
    T = len(taus)
    m, n = taus[0].shape
    K = min(m, n)
    k = K // T
    B = torch.zeros(m, K, dtype=taus[0].dtype, device=taus[0].device)
    for t, tau in enumerate(taus):
        U, _, _ = torch.linalg.svd(tau, full_matrices=False)
        B[:, t * k:(t + 1) * k] = U[:, :k]
    U_B, _, _ = torch.linalg.svd(B, full_matrices=False)
    return U_B[:, :K // subspace]


def doge_loss_reference(delta: Tensor, taus: Sequence[Tensor], lambdas: Sequence) -> Tensor:
    """L(delta) = sum_j sum_a <tau_j[a, :], tau_j[a, :] - M[a, :]>^2 with M = sum_t lambda_t (tau_t + delta)."""
    M = sum(lam * (tau + delta) for lam, tau in zip(lambdas, taus))
    return sum((((tau * (tau - M)).sum(dim=1)) ** 2).sum() for tau in taus)


def doge_delta_reference(taus: Sequence[Tensor], lambdas: Sequence, U_r: Tensor, steps: int = 400, lr: float = 1e-4,
                         betas=(0.9, 0.999), eps: float = 1e-8):
    """§9.1 steps C-D for one layer: autograd gradient of the loss, projected with P = U_r U_r^T (the m x m
    projector: G <- G - P G), torch.optim.Adam.  Returns (delta, list of the loss before each step)."""
    P = U_r @ U_r.T
    delta = torch.zeros_like(taus[0], requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr, betas=betas, eps=eps)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = doge_loss_reference(delta, taus, lambdas)
        loss.backward()
        with torch.no_grad():
            delta.grad -= P @ delta.grad
        opt.step()
        losses.append(float(loss.detach()))
    return delta.detach(), losses


def doge_ta_reference(pretrained, finetuned, eta: float = 0.07, subspace: int = 6, K: float = 0.3, steps: int = 400,
                      lr: float = 1e-4, keys: Optional[Sequence[str]] = None, dtype: torch.dtype = torch.float32):
    """DOGE_TA as §9.1 (FusionBench's code): tau = theta_t - theta_0 (in ``dtype``), lambda = eta / ||tau||_F,
    the shared subspace, delta by projected Adam (layers one after the other), a top-K trim of the original
    task vectors (P1, one threshold per task over all keys flattened in sorted order), merge; every other
    key keeps theta_0.  Returns dict(merged=..., delta={key: delta}, lambdas={key: [T]}, losses={key: [...]})."""
    if keys is None:
        keys = [k for k in pretrained if pretrained[k].is_floating_point() and doge_fusion_bench_key(k)]
    keys = sorted(keys)
    T = len(finetuned)
    taus = {k: [ft[k].to(dtype) - pretrained[k].to(dtype) for ft in finetuned] for k in keys}
    lambdas = {k: [eta / torch.norm(t) for t in taus[k]] for k in keys}
    deltas, losses = {}, {}
    for k in keys:
        U_r = doge_subspace_reference(taus[k], subspace)
        deltas[k], losses[k] = doge_delta_reference(taus[k], lambdas[k], U_r, steps, lr)
    flat = torch.stack([torch.cat([taus[k][t].reshape(-1) for k in keys]) for t in range(T)])
    mask = topk_values_mask_reference(flat, K)
    merged = dict(pretrained)
    off = 0
    for k in keys:
        n = pretrained[k].numel()
        acc = None
        for t in range(T):
            masked = (taus[k][t] + deltas[k]) * mask[t, off:off + n].reshape(pretrained[k].shape)
            acc = lambdas[k][t] * masked if acc is None else acc + lambdas[k][t] * masked
        merged[k] = (pretrained[k].to(dtype) + acc).to(pretrained[k].dtype)
        off += n
    return dict(merged=merged, delta=deltas, lambdas={k: torch.stack(lambdas[k]) for k in keys}, losses=losses)



# ------------------------------------------------------------------------------------------------
# AdaMerging (ALGORITHMS.md §6) and DOGE + AdaMerging (§9.2): plain autograd through the merge,
# λ as a leaf tensor, torch.optim.Adam -- the way the official code and FusionBench compute them
# ------------------------------------------------------------------------------------------------
def entropy_reference(logits: Tensor, eps: Optional[float] = None) -> Tensor:
    """Batch-mean softmax entropy: −Σ softmax·log_softmax (official), or −Σ p·log(p + eps) (FusionBench)."""
    if eps is None:
        return -(logits.softmax(1) * logits.log_softmax(1)).sum(1).mean(0)
    p = torch.softmax(logits, dim=-1)
    return -torch.sum(p * torch.log(p + eps), dim=-1).mean()


def ties_selected_entries_reference(pretrained, finetuned, density: float = 0.2, keys=None) -> List[Dict[str, Tensor]]:
    """The official ``ties_merging_split`` (AdaMerging++): per task the top-``density`` entries of the globally
    flattened task vector (P1), then only the entries agreeing with the elected sign (zero elections take
    the global majority sign); no aggregation.  Returns one ``{key: selected τ}`` per task."""
    keys = _float_keys(pretrained, keys)
    ptm = _flatten(pretrained, keys)
    V = torch.stack([_flatten(ft, keys) - ptm for ft in finetuned])
    if density < 1.0:
        V = V * topk_values_mask_reference(V, density)
    gamma = torch.sign(V.sum(dim=0))
    gamma = torch.where(gamma == 0, torch.sign(gamma.sum()), gamma)
    E = V * torch.where(gamma.unsqueeze(0) > 0, V > 0, V < 0)
    return [_unflatten(E[t], pretrained, keys) for t in range(len(finetuned))]


def _adamerging_loop(base: Mapping[str, Tensor], taus: Sequence[Mapping[str, Tensor]], keys: Sequence[str],
                     logits_fn, batches, *, steps: int, lr: float, betas, init: float, clamp: bool, task_wise: bool,
                     entropy_eps: Optional[float]):
    """λ (``[T, L]`` or ``[T]``) trained by torch.optim.Adam on Σ_t Σ_batches entropy through
    θ_l = θ0_l + λ_{1,l} τ_{1,l} + λ_{2,l} τ_{2,l} + ... (left to right, autograd through the merge)."""
    T = len(taus)
    raw = torch.full((T,) if task_wise else (T, len(keys)), float(init), dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([raw], lr=lr, betas=betas, weight_decay=0.0)

    def coefficients():
        lam = torch.clamp(raw, min=0.0, max=1.0) if clamp else raw
        return lam[:, None].expand(T, len(keys)) if task_wise else lam

    def merged(lam):
        out = dict(base)
        for l, k in enumerate(keys):
            acc = base[k].float()
            for t in range(T):
                acc = acc + taus[t][k] * lam[t, l]
            out[k] = acc
        return out

    losses = []
    for step in range(steps):
        params = merged(coefficients())
        loss = 0.0
        for t in range(T):
            for ids in batches(step, t):
                loss = loss + entropy_reference(logits_fn(params, t, ids).float(), entropy_eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        lam = coefficients().detach().clone()
        return dict(lambdas=lam, raw=raw.detach().clone(), losses=losses,
                    merged={k: v.detach() for k, v in merged(lam).items()})


def adamerging_reference(pretrained, finetuned, logits_fn, batches, *, steps: int = 500, lr: float = 1e-3,
                         betas=(0.9, 0.999), init: float = 0.3, clamp: bool = True, task_wise: bool = False,
                         entropy_eps: Optional[float] = None, ties_density: Optional[float] = None, keys=None):
    """AdaMerging (§6; AdaMerging++ with ``ties_density``) with autograd through the merge.

    ``logits_fn(params, task, ids)``: logits of task ``task`` (index) on its samples ``ids`` with the merged state
    dict ``params`` (``torch.func.functional_call``); ``batches(step, task)``: the id batches of a task at a
    step.  Merged keys: the floating keys of ``pretrained`` in its order (or ``keys``); τ = θ_t − θ0 in fp32.
    Returns dict(lambdas=[T, L] effective, raw, losses=[per step], merged={key: θ0 + Σ λ τ} + θ0 elsewhere)."""
    if keys is None:
        keys = [k for k in pretrained if pretrained[k].is_floating_point()]
    keys = list(keys)
    if ties_density is not None:
        taus = ties_selected_entries_reference(pretrained, finetuned, ties_density, keys)
    else:
        taus = [{k: ft[k].float() - pretrained[k].float() for k in keys} for ft in finetuned]
    return _adamerging_loop(pretrained, taus, keys, logits_fn, batches, steps=steps, lr=lr, betas=betas, init=init,
                            clamp=clamp, task_wise=task_wise, entropy_eps=entropy_eps)


def doge_task_deltas_reference(taus: Sequence[Tensor], lambdas: Sequence, U_r: Tensor, steps: int = 400,
                               lr: float = 1e-4, betas=(0.9, 0.999), eps: float = 1e-8):
    """§9.2's per-task corrections of one layer: T deltas, loss with M = Σ λ_t τ_t + Σ λ_t δ_t, autograd,
    each gradient projected with the m x m projector P = U_r U_r^T, one torch.optim.Adam over the T deltas.
    Returns (stacked deltas [T, m, n], list of the loss before each step)."""
    P = U_r @ U_r.T
    deltas = [torch.zeros_like(taus[0], requires_grad=True) for _ in taus]
    opt = torch.optim.Adam(deltas, lr=lr, betas=betas, eps=eps)
    S = sum(lam * tau for lam, tau in zip(lambdas, taus))
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        M = S + sum(lam * d for lam, d in zip(lambdas, deltas))
        loss = sum((((tau * (tau - M)).sum(dim=1)) ** 2).sum() for tau in taus)
        loss.backward()
        with torch.no_grad():
            for d in deltas:
                d.grad -= P @ d.grad
        opt.step()
        losses.append(float(loss.detach()))
    return torch.stack([d.detach() for d in deltas]), losses


def doge_adamerging_reference(pretrained, finetuned, logits_fn, batches, *, eta: float = 0.07, doge_steps: int = 400,
                              doge_lr: float = 1e-4, density: float = 0.3, steps: int = 1000, lr: float = 1e-3,
                              init: float = 0.3, clamp: bool = False, entropy_eps: Optional[float] = 1e-8,
                              keys: Optional[Sequence[str]] = None):
    """DOGE + layer-wise AdaMerging (§9.2, FusionBench's code): λ = eta / ||τ||, subspace of rank floor(K / T),
    per-task deltas (:func:`doge_task_deltas_reference`), τ' = (τ + δ) ⊙ top-``density`` mask of the original
    flattened τ (P1, sorted keys), then AdaMerging over the merged keys (sorted) with the merge
    θ0 + w_1 τ'_1 + w_2 τ'_2 + ...; every other key θ0.  Returns dict(delta={key: [T, m, n]},
    doge_lambdas, doge_losses, lambdas=[T, L], losses, merged)."""
    if keys is None:
        keys = [k for k in pretrained if pretrained[k].is_floating_point() and doge_fusion_bench_key(k)]
    keys = sorted(keys)
    T = len(finetuned)
    taus = {k: [ft[k].float() - pretrained[k].float() for ft in finetuned] for k in keys}
    lambdas = {k: [eta / torch.norm(t) for t in taus[k]] for k in keys}
    deltas, doge_losses = {}, {}
    for k in keys:
        U_r = doge_subspace_reference(taus[k], subspace=T)
        deltas[k], doge_losses[k] = doge_task_deltas_reference(taus[k], lambdas[k], U_r, doge_steps, doge_lr)
    flat = torch.stack([torch.cat([taus[k][t].reshape(-1) for k in keys]) for t in range(T)])
    mask = topk_values_mask_reference(flat, density)
    trimmed = [{} for _ in range(T)]
    off = 0
    for k in keys:
        n = pretrained[k].numel()
        for t in range(T):
            trimmed[t][k] = (taus[k][t] + deltas[k][t]) * mask[t, off:off + n].reshape(pretrained[k].shape)
        off += n
    out = _adamerging_loop(pretrained, trimmed, keys, logits_fn, batches, steps=steps, lr=lr, betas=(0.9, 0.999),
                           init=init, clamp=clamp, task_wise=False, entropy_eps=entropy_eps)
    out.update(delta=deltas, doge_lambdas={k: torch.stack(v) for k, v in lambdas.items()}, doge_losses=doge_losses,
               trimmed=trimmed)
    return out

def _doge_row_grad_(grad, tau, delta, e, lam_sum):
    """Reference of ``doge_row_grad_`` (same result up to the order of the sums)."""
    lam = lam_sum[:, None, None]
    q = (tau * delta[:, None]).sum(-1)              # [B, T, m]
    r = e - lam * q
    grad.copy_(-2 * lam * (r[..., None] * tau).sum(1))
    return (r.double() ** 2).sum((1, 2))


def _doge_adam_(param, exp_avg, exp_avg_sq, grad, beta1, beta2, neg_step_size, bias_correction2_sqrt, eps):
    """Reference of ``doge_adam_``: torch.optim.Adam's single-tensor step, with a correctly rounded sqrt."""
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    root = exp_avg_sq.double().sqrt().float() if exp_avg_sq.dtype == torch.float32 else exp_avg_sq.sqrt()
    denom = (root / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=neg_step_size)


ReferenceOps.doge_row_grad_ = staticmethod(_doge_row_grad_)
ReferenceOps.doge_adam_ = staticmethod(_doge_adam_)
