"""mergekit's per-tensor sparsification (``mergekit.sparsify``), written from its documented semantics.

These are the parity rules of ALGORITHMS.md §12 for mergekit-format configs (and the
:mod:`calm_fast.compat.mergekit` shim).  Everything is **per tensor** and the arithmetic follows
mergekit's order, so that in fp32 the results are bitwise mergekit's:

* ``magnitude``: keep exactly ``k = max(1, int(density · n))`` entries of largest ``|x|`` (``density >= 1``
  keeps everything, ``density <= 0`` or an empty tensor keeps nothing).  mergekit sorts the magnitudes
  (fp32 on the CPU) with ``torch.argsort(descending=True)`` and keeps the first ``k`` positions, so ties
  at the k-th magnitude are broken by that sort's order.  Here the k-th largest magnitude is selected
  exactly (no sort) and, when exactly ``k`` entries reach it, that comparison is the mask (the same set);
  when entries tie at it, the same ``argsort`` call as mergekit's decides (same tie-break on the same
  torch build).
* ``magnitude_outliers`` (Model Breadcrumbs): sort ``|x|`` ascending, drop the ``n_top = int(gamma · n)``
  largest, then keep the next ``int(density · n)`` below them (the bottom start ``n − int(d·n) − n_top``
  is clamped at 0, so a high density eats into the outlier cut).
* ``random`` (DARE): keep each entry with probability ``density`` (``density`` is the *keep* rate).
* ``della_magprune``: per row (a 1-D tensor is one row), keep probability
  ``(density − ε) + 2ε · rank_norm`` where ``rank_norm`` is the ascending magnitude rank scaled to [0, 1].
* ``rescale_norm`` (``l1``/``l2``/``linf``): the masked tensor is rescaled to the original tensor's norm
  (skipped when either norm is below 1e-7); mergekit's DARE/DELLA use ``l1``, not ``1/density``.

Randomness: mergekit draws from torch's global generator.  Here the random methods take a ``key``
(:func:`draw_mask`): DARE's mask is calm_fast's own DARE mask (the fused kernel's counter-based Philox
draw: element ``i`` kept iff ``u(key, i) >= 1 − density``, ``u`` on a 2^-24 grid; it depends only on the
key and the element's position, for any thread count or tensor order); DELLA's per-element
probabilities are drawn by ``torch.bernoulli`` on a generator seeded with the key.  ``key=None`` draws
from torch's global generator, as mergekit does.  Same distribution and rescaling as mergekit, not the
same draws.
"""
from __future__ import annotations

from typing import Optional

import torch

Tensor = torch.Tensor

METHODS = ("magnitude", "random", "magnitude_outliers", "della_magprune")
NORMS = ("l1", "l2", "linf")


def _norm_name(norm) -> Optional[str]:
    """Accept ``None``, a string or an enum with a ``value`` (mergekit's ``RescaleNorm``)."""
    if norm is None:
        return None
    name = getattr(norm, "value", norm)
    if name not in NORMS:
        raise ValueError(f"rescale_norm must be one of {NORMS} or None, got {norm!r}")
    return name


def rescaled_masked_tensor(tensor: Tensor, mask: Tensor, norm=None, eps: float = 1e-7) -> Tensor:
    """``tensor * mask``, rescaled so that its ``norm`` equals the norm of ``tensor`` (no rescale when
    ``norm`` is None or when either norm is below ``eps``)."""
    masked = tensor * mask
    norm = _norm_name(norm)
    if norm is None:
        return masked
    if norm == "l1":
        before, after = tensor.abs().sum(), masked.abs().sum()
    elif norm == "l2":
        before, after = tensor.norm(), masked.norm()
    else:
        before, after = tensor.abs().max(), masked.abs().max()
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def _sort_key(tensor: Tensor) -> Tensor:
    """Flat magnitudes as mergekit sorts them (fp32 on the CPU, the tensor's dtype elsewhere)."""
    w = tensor.abs().reshape(-1)
    return w.float() if w.device.type == "cpu" else w


#: below this many elements the sort is as fast as the selection
_SELECT_MIN = 1 << 14


def _top_k_mask(tensor: Tensor, k: int) -> Tensor:
    """0/1 mask (tensor dtype, flat) of the ``k`` largest ``|x|``, exactly as mergekit's argsort picks them.

    Fast path (fp32): the k-th largest magnitude by calm_fast's exact selection and one comparison; used
    only when exactly ``k`` entries reach it (no tie at the k-th magnitude), where the kept set is the
    same as the sort's.  Otherwise (ties there, NaN, half dtypes, small tensors) mergekit's full
    ``argsort``, so ties are broken in its order."""
    n = tensor.numel()
    w = _sort_key(tensor)
    # fp32 only: with 8- or 11-bit mantissas (bf16/fp16) magnitudes tie at the k-th value almost always at
    # these sizes, so the selection would only precede the sort
    if n >= _SELECT_MIN and w.device.type == "cpu" and tensor.dtype == torch.float32:
        from ..selection import kth_smallest_abs

        thr = float(kth_smallest_abs([tensor.detach().reshape(-1).contiguous()], None, 1, [n - k + 1])[0])
        keep = w >= thr
        # a NaN (sorted first by argsort, never >= thr) makes the sum NaN: then the sort decides
        if thr == thr and int(keep.sum()) == k and not bool(torch.isnan(w.sum())):
            return keep.to(tensor.dtype)
    mask = torch.zeros(n, dtype=tensor.dtype, device=tensor.device)
    mask[torch.argsort(w, descending=True)[:k]] = 1
    return mask


def magnitude(tensor: Tensor, density: float, rescale_norm=None) -> Tensor:
    """Keep exactly ``max(1, int(density · n))`` largest-magnitude entries (see the module docstring)."""
    if density >= 1:
        return tensor
    n = tensor.numel()
    if density <= 0 or n == 0:
        return torch.zeros_like(tensor)
    k = max(1, int(density * n))
    mask = _top_k_mask(tensor, k)
    return rescaled_masked_tensor(tensor, mask.reshape(tensor.shape), rescale_norm)


def magnitude_outliers(tensor: Tensor, density: float, rescale_norm=None, gamma: float = 0.01) -> Tensor:
    """Model Breadcrumbs: drop the ``gamma`` fraction of largest magnitudes, then the smallest, keeping
    ``int(density · n)`` entries (see the module docstring)."""
    if density >= 1:
        return tensor
    n = tensor.numel()
    kept = int(density * n)
    n_top = int(gamma * n)
    start = max(0, n - kept - n_top)
    ascending = torch.sort(_sort_key(tensor), descending=False).indices
    mask = torch.zeros(n, dtype=tensor.dtype, device=tensor.device)
    mask[ascending[start:start + kept]] = 1
    return rescaled_masked_tensor(tensor, mask.reshape(tensor.shape), rescale_norm)


def _work_dtype(tensor: Tensor) -> torch.dtype:
    # torch.bernoulli has no fp16 CPU kernel: mergekit works in fp32 there (bf16 stays bf16)
    if tensor.device.type != "cpu" or tensor.dtype == torch.bfloat16:
        return tensor.dtype
    return torch.float32


def draw_mask(probs: Tensor, key: Optional[int], density: Optional[float] = None) -> Tensor:
    """A 0/1 mask (dtype of ``probs``) keeping element ``i`` with probability ``probs[i]``.

    ``key`` None: ``torch.bernoulli`` on torch's global generator (mergekit's draws).  With a key and one
    ``density`` for every element (DARE): calm_fast's DARE mask — the fused kernel's counter-based Philox
    draw, kept iff ``u(key, i) >= 1 − density`` (the same mask calm_fast's own DARE makes for that key).
    With a key and per-element probabilities (DELLA): ``torch.bernoulli`` on a ``torch.Generator`` seeded
    with the key (reproducible for a key on a given device)."""
    if key is None:
        return torch.bernoulli(probs)
    if density is not None and probs.numel() > 0 and probs.device.type == "cpu":
        from .. import ops

        ones = torch.ones(probs.numel(), dtype=torch.float32)
        keys = torch.tensor([[int(key)]], dtype=torch.int64)
        (kept,), _ = ops.weighted_merge([ones], None, 1, weights=1.0, scale=1.0, dare_p=1.0 - float(density),
                                        dare_keys=keys, dare_rescale=False)
        return kept.reshape(probs.shape).to(probs.dtype)
    g = torch.Generator(device=probs.device).manual_seed(int(key) & ((1 << 63) - 1))
    return torch.bernoulli(probs, generator=g)


def bernoulli(tensor: Tensor, density: float, rescale_norm=None, *, key: Optional[int] = None) -> Tensor:
    """DARE's random drop: keep each entry with probability ``density``, then rescale to the norm."""
    if density >= 1:
        return tensor
    work = _work_dtype(tensor)
    probs = torch.full(tensor.shape, float(density), dtype=work, device=tensor.device)
    mask = draw_mask(probs, key, density=float(density))
    return rescaled_masked_tensor(tensor.to(work), mask, rescale_norm).to(tensor.dtype)


def della_magprune(tensor: Tensor, density: float, epsilon: float, rescale_norm=None, *,
                   key: Optional[int] = None) -> Tensor:
    """DELLA's MagPrune: per-row keep probabilities rising linearly with the magnitude rank."""
    if density >= 1:
        return tensor
    if density <= 0:
        return torch.zeros_like(tensor)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError("della_magprune: epsilon must be chosen such that density +/- epsilon is in (0, 1) "
                         f"(density {density}, epsilon {epsilon})")
    shape = tensor.shape
    work = _work_dtype(tensor)
    rows = tensor.unsqueeze(0) if tensor.dim() < 2 else tensor
    order = torch.argsort(rows.abs(), dim=1, descending=False)
    ranks = order.argsort(dim=1).to(work) + 1
    lo = ranks.min(dim=1, keepdim=True).values
    hi = ranks.max(dim=1, keepdim=True).values
    rank_norm = ((ranks - lo) / (hi - lo)).clamp(0, 1)
    probs = (density - epsilon) + rank_norm * 2 * epsilon
    mask = draw_mask(probs, key).to(work)
    return rescaled_masked_tensor(rows.to(work), mask, rescale_norm).to(tensor.dtype).reshape(shape)


def sparsify(tensor: Tensor, density: float, method, gamma: float = 0, epsilon: float = 0, rescale_norm=None, *,
             key: Optional[int] = None) -> Tensor:
    """Dispatch on ``method`` (a name of :data:`METHODS`, or mergekit's ``SparsificationMethod``)."""
    name = getattr(method, "value", method)
    if name == "magnitude":
        return magnitude(tensor, density, rescale_norm)
    if name == "random":
        return bernoulli(tensor, density, rescale_norm, key=key)
    if name == "magnitude_outliers":
        return magnitude_outliers(tensor, density, rescale_norm, gamma=gamma)
    if name == "della_magprune":
        return della_magprune(tensor, density, epsilon, rescale_norm, key=key)
    raise ValueError(f"unknown sparsification method {method!r}; expected one of {METHODS}")
