"""Drop-in replacement for PEFT's ``peft.utils.merge_utils`` (the functions behind
``add_weighted_adapter(..., combination_type="ties" | "dare_linear" | "dare_ties" | "magnitude_prune")``).

Change one import::

    # from peft.utils import merge_utils
    from calm_fast.compat import peft as merge_utils

Semantics are PEFT's (per tensor; ``task_tensors`` is a list of same-shaped tensors, one per adapter,
stacked along dim 0; ``weights`` a tensor of per-task weights, reshaped by
:func:`reshape_weight_task_tensors`):

* ``magnitude_based_pruning`` keeps exactly ``k = int(density * numel)`` entries of largest ``|x|``
  (PEFT: ``torch.topk``).  Here the k-th largest ``|x|`` comes from the exact histogram selection
  (:mod:`calm_fast.selection`) and the mask from one comparison; no sort.
* ``ties``: magnitude prune, elect the sign of the (unweighted) sum with a zero sum counting as +1
  (``torch.where(sum >= 0, 1, -1)``), keep the entries of the elected sign, weight them, and average
  them over their count (PEFT's disjoint *mean*).  ``majority_sign_method="frequency"`` elects by
  counting signs instead.
* ``dare_linear`` / ``dare_ties``: random pruning (keep with probability ``density``, rescale by
  ``1/density``) then a weighted sum / TIES.
* output dtype as PEFT's type promotion gives it: ``promote(task dtype, weights dtype)``, and at least
  the default float dtype for ``ties``/``dare_ties`` (their division by a float count promotes).

What runs fused: for fp32/bf16/fp16 task tensors whose product with ``weights`` is float32 in PEFT
(fp32 tensors, or half-type tensors with fp32 weights as ``add_weighted_adapter`` passes them) and
0-d/1-D weights, the merge is one pass of :func:`calm_fast.ops.weighted_merge` /
:func:`calm_fast.ops.ties_merge` reading each task tensor once: no pruned copies, no stack, no sign or
mask temporaries.  For ``ties``/``dare_ties`` the fused pass also needs ``majority_sign_method="total"``
and one weight shared by all tasks that is 0 or a power of two (1, 0.5, -2, ...): PEFT elects the sign
on *unweighted* values while the fused op elects on weighted ones, and only such weights scale without
rounding, so that both elections agree bit for bit.  Everything else (other TIES weights, "frequency",
float64, half-type weights with half-type tensors, tensors that require grad with grad mode on, ...)
runs PEFT's composition of the public functions below, with the fast magnitude pruning.  As in PEFT,
results computed from tensors that require grad carry grad (``tensor * mask`` and the torch composition;
the magnitude threshold itself is found on the detached values: a comparison has no gradient).

Deviations (on purpose):

* **Ties at the magnitude threshold.**  ``torch.topk`` picks arbitrary entries among equal magnitudes
  (the choice changes with size, device and torch build).  ``tie_break="first"`` (default) keeps the
  same number ``k`` and the same set of magnitudes, breaking ties by lowest flat index (deterministic);
  ``tie_break="topk"`` calls ``torch.topk`` exactly like PEFT (slow path, PEFT's arbitrary choice);
  ``tie_break="all"`` keeps every tie (``|x| >= k-th largest``: at least k entries, the TIES-paper rule).
  Without ties at the threshold all three are identical to PEFT.
* **DARE randomness.**  PEFT draws ``torch.bernoulli`` from the global RNG; here the mask is the
  library's counter-based Philox (``keep iff u >= 1 - density``, ``u`` on a 2^-24 grid), keyed by
  ``(seed, task index)`` and the element's flat index: identical on CPU and GPU, for any thread count.
  Same distribution, different draws.  ``seed=None`` (default) draws the seed from torch's default
  generator, so ``torch.manual_seed`` makes a run reproducible and successive calls differ, as with
  PEFT; pass an int for a fixed mask.  Survivors are multiplied by ``1/density`` in fp32 (PEFT divides;
  at most one rounding apart); in ``dare_linear``/``dare_ties`` on fp16/bf16 tensors with fp32 weights
  they stay fp32 until the (fp32) result, where PEFT first rounds ``x / density`` to the half type.
* **density = 0 with rescaling** (peft PRs #3486/#3530): PEFT computes ``0/0`` and
  returns NaN; here every value is pruned and the result is zeros, as documented by PEFT.
* Summation order: tasks are summed in order ``t = 0..T-1`` in fp32 for every element; PEFT's
  ``sum(dim=0)`` does the same except in the vectorisation tail of some shapes with ``T >= 5`` (a
  last-bit difference in a few elements).  For fp16/bf16 inputs with float32 weights (PEFT's own
  ``add_weighted_adapter`` call) the result is float32 in both.
* Non-finite inputs: not guaranteed to propagate NaN exactly as PEFT does.
"""
from __future__ import annotations

import math
import warnings
from typing import List, Literal, Optional, Sequence, Tuple

import torch

from .. import ops, selection
from ..philox import philox_uniform

Tensor = torch.Tensor

__all__ = ["reshape_weight_task_tensors", "magnitude_based_pruning", "random_pruning", "prune",
           "calculate_majority_sign_mask", "disjoint_merge", "task_arithmetic", "magnitude_prune", "ties",
           "dare_linear", "dare_ties", "TIE_BREAKS"]

_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
HALF_DTYPES = (torch.bfloat16, torch.float16)
TIE_BREAKS = ("first", "topk", "all")
_DARE_NAME = "peft.merge_utils"  # the tensor name in the DARE key derivation (ops.dare_keys)
TieBreak = Literal["first", "topk", "all"]


# ------------------------------------------------------------------------------------------------
# PEFT's building blocks
# ------------------------------------------------------------------------------------------------
def reshape_weight_task_tensors(task_tensors: Tensor, weights: Tensor) -> Tensor:
    """View ``weights`` with trailing singleton dimensions so it broadcasts against ``task_tensors``."""
    return weights.view(weights.shape + (1,) * (task_tensors.dim() - weights.dim()))


def _topk_mask(flat: Tensor, k: int) -> Tensor:
    mask = torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
    mask[torch.topk(flat.abs(), k=k, largest=True)[1]] = True
    return mask


def _has_nan(flat: Tensor) -> bool:
    """Any NaN?  A NaN-free sum proves there is none (one cheap reduction); only a NaN sum (NaN, or
    +inf and -inf, present) needs the elementwise check."""
    return bool(torch.isnan(flat.sum())) and bool(torch.isnan(flat).any())


def _magnitude_select(flat: Tensor, k: int, tie_break: str) -> Tuple[Optional[float], Optional[Tensor]]:
    """The ``k`` largest-magnitude entries of a 1-D tensor, as ``(threshold, mask)``.

    If ``threshold`` is not None, the selection is exactly ``|x| >= threshold`` (an fp32 value; ``mask``
    is that comparison when it was computed anyway, else None).  Otherwise ``mask`` (bool) is the selection.
    """
    n = flat.numel()
    if tie_break not in TIE_BREAKS:
        raise ValueError(f"tie_break must be one of {TIE_BREAKS}, got {tie_break!r}")
    if not 0 <= k <= n:
        raise RuntimeError("selected index k out of range")
    if k == 0:
        return None, torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
    if k == n:
        return None, torch.ones(flat.shape, dtype=torch.bool, device=flat.device)
    if tie_break == "topk" or flat.dtype not in _FUSED_DTYPES or _has_nan(flat):
        return None, _topk_mask(flat, k)  # NaN ranks above every number in topk: let topk place it
    thr32 = selection.kth_smallest_abs([flat.contiguous()], None, 1, [n - k + 1])  # the k-th largest |x|
    if tie_break == "all":
        return float(thr32[0]), None
    a = flat.abs()
    thr = thr32.to(device=a.device, dtype=a.dtype)  # exact: it is some |x|
    ge = a >= thr
    extra = int(torch.count_nonzero(ge)) - k
    if extra == 0:
        return float(thr32[0]), ge
    tied = a == thr  # keep the first (number tied - extra) of them, in flat order
    need = int(torch.count_nonzero(tied)) - extra
    return None, (a > thr) | (tied & (tied.cumsum(0) <= need))


def magnitude_based_pruning(tensor: Tensor, density: float, *, tie_break: TieBreak = "first") -> Tensor:
    """Keep the ``int(density * numel)`` entries of largest magnitude, zero the rest (ties: see module doc)."""
    flat = tensor.reshape(-1)
    k = int(density * tensor.numel())
    thr, mask = _magnitude_select(flat, k, tie_break)
    if mask is None:
        mask = flat.abs() >= thr
    return tensor * mask.reshape(tensor.shape)


def _resolve_seed(seed: Optional[int]) -> int:
    if seed is None:  # from torch's default generator: torch.manual_seed makes runs reproducible
        return int(torch.randint(0, 2**62, (), dtype=torch.int64))
    return int(seed)


def _dare_keys(seed: Optional[int], num_tasks: int) -> Tensor:
    """[T, 1] DARE keys: task t of a merge gets row t (task 0 = the key of a single-tensor prune)."""
    return ops.dare_keys(_resolve_seed(seed), [_DARE_NAME], num_tasks)


def _grad_needed(tensors: Sequence[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _random_prune_keyed(tensor: Tensor, density: float, rescale: bool, key: Tensor,
                        out_float: bool = False) -> Tensor:
    """DARE on one tensor with one key: keep iff philox(key, i) >= 1 - density; survivors x 1/density
    (in fp32, rounded to the tensor's dtype unless ``out_float``)."""
    if not 0.0 <= density <= 1.0:
        raise RuntimeError("Expected p_in >= 0 && p_in <= 1 to be true, but got false.")
    p = 1.0 - density
    if tensor.dtype in _FUSED_DTYPES and tensor.numel() > 0 and not _grad_needed([tensor]):
        out, _ = ops.weighted_merge([tensor.contiguous()], None, 1, weights=1.0, scale=1.0, dare_p=p,
                                    dare_keys=key.reshape(1, 1).to(tensor.device), dare_rescale=rescale,
                                    out_float=out_float)
        return out[0]
    # float64 / autograd / empty: the same draws on plain torch
    index = torch.arange(tensor.numel(), dtype=torch.int64, device=tensor.device)
    keep = (philox_uniform(index, int(key.reshape(-1)[0])) >= p).reshape(tensor.shape)
    factor = (1.0 / (1.0 - p) if p < 1 else 0.0) if rescale else 1.0
    src = tensor.float() if (out_float and tensor.dtype in HALF_DTYPES) else tensor
    return torch.where(keep, src * factor, torch.zeros_like(src))


def random_pruning(tensor: Tensor, density: float, rescale: bool, *, seed: Optional[int] = None) -> Tensor:
    """Keep each entry with probability ``density`` (rescaled by ``1/density`` when ``rescale``).

    Counter-based Philox draws (see the module doc): ``seed=None`` takes a seed from torch's default
    generator; density 0 gives zeros (never NaN).
    """
    return _random_prune_keyed(tensor, density, rescale, _dare_keys(seed, 1)[0])


def _needs_pruning(density: float) -> bool:
    """PEFT's density rules: >= 1 warns and prunes nothing, < 0 is an error."""
    if density >= 1:
        warnings.warn(f"The density {density} is greater than or equal to 1, no pruning will be performed.")
        return False
    if density < 0:
        raise ValueError(f"Density should be >= 0, got {density}")
    return True


def prune(tensor: Tensor, density: float, method: Literal["magnitude", "random"], rescale: bool = False, *,
          seed: Optional[int] = None, tie_break: TieBreak = "first") -> Tensor:
    """Prune by ``method`` ("magnitude" or "random"); density >= 1 returns ``tensor`` itself (with a warning)."""
    if not _needs_pruning(density):
        return tensor
    if method == "magnitude":
        return magnitude_based_pruning(tensor, density, tie_break=tie_break)
    if method == "random":
        return random_pruning(tensor, density, rescale=rescale, seed=seed)
    raise ValueError(f"Unknown method {method}")


def calculate_majority_sign_mask(tensor: Tensor, method: Literal["total", "frequency"] = "total") -> Tensor:
    """``sign(x) == majority`` per entry; majority = sign of the sum over dim 0 ("total") or of the sum of
    signs ("frequency"), a zero sum counting as +1."""
    sign = tensor.sign()
    if method == "total":
        magnitude = tensor.sum(dim=0)
    elif method == "frequency":
        magnitude = sign.sum(dim=0)
    else:
        raise RuntimeError(f'Unimplemented mask method "{method}"')
    return sign == torch.where(magnitude >= 0, 1, -1)


def disjoint_merge(task_tensors: Tensor, majority_sign_mask: Tensor) -> Tensor:
    """Mean over dim 0 of the entries selected by the mask (count clamped at 1)."""
    mixed = (task_tensors * majority_sign_mask).sum(dim=0)
    return mixed / torch.clamp(majority_sign_mask.sum(dim=0), min=1.0)


# ------------------------------------------------------------------------------------------------
# Fused merges
# ------------------------------------------------------------------------------------------------
def _fused_weights(task_tensors, weights, ties: bool) -> Optional[Tuple[List[Tensor], List[float], bool]]:
    """(contiguous inputs, one weight per task, out_float) when the fused ops compute exactly PEFT's
    expression; None otherwise (the caller then runs PEFT's composition)."""
    if not isinstance(task_tensors, (list, tuple)) or not task_tensors:
        return None
    if not all(isinstance(x, Tensor) for x in task_tensors):
        return None
    x0 = task_tensors[0]
    if x0.dtype not in _FUSED_DTYPES or x0.numel() == 0:
        return None
    if any(x.shape != x0.shape or x.dtype != x0.dtype or x.device != x0.device for x in task_tensors):
        return None
    w = weights if isinstance(weights, Tensor) else torch.as_tensor(weights)
    if _grad_needed(list(task_tensors) + [w]):
        return None
    T = len(task_tensors)
    if w.dim() > 1 or w.numel() not in (1, T) or w.is_complex():
        return None
    # PEFT multiplies and sums in promote(task dtype, weights dtype); the kernels do it in fp32 and round
    # once, which is the same only when that dtype is fp32 (half-type weights with half-type tensors make
    # PEFT round every product and the sum to the half type).  ties/dare_ties then divide by a count in
    # the default float dtype (torch.clamp(int_count, min=1.0)), which must keep the result fp32.
    if torch.promote_types(x0.dtype, w.dtype) != torch.float32:
        return None
    if ties and torch.promote_types(torch.float32, torch.get_default_dtype()) != torch.float32:
        return None
    wl = [float(v) for v in w.reshape(-1).tolist()]
    if len(wl) == 1:
        wl = wl * T
    return [x.contiguous() for x in task_tensors], wl, x0.dtype != torch.float32


def _as_weight_tensor(weights, like: Tensor) -> Tensor:
    return weights if isinstance(weights, Tensor) else torch.as_tensor(weights, device=like.device)


def _weighted_sum(task_tensors: Sequence[Tensor], weights) -> Tensor:
    """PEFT's ``sum(stack(task_tensors) * reshaped weights, dim=0)`` on plain torch."""
    stacked = torch.stack(list(task_tensors), dim=0)
    w = reshape_weight_task_tensors(stacked, _as_weight_tensor(weights, stacked))
    return (stacked * w).sum(dim=0)


def _ties_composed(pruned: Sequence[Tensor], weights, majority_sign_method: str) -> Tensor:
    stacked = torch.stack(list(pruned), dim=0)
    mask = calculate_majority_sign_mask(stacked, method=majority_sign_method)
    w = reshape_weight_task_tensors(stacked, _as_weight_tensor(weights, stacked))
    return disjoint_merge(stacked * w, mask)


def _magnitude_plan(x: Tensor, density: float, tie_break: str) -> Tuple[Tensor, float]:
    """(input, threshold) such that ``input`` trimmed at ``|input| >= threshold`` is PEFT's pruned ``x``:
    ``x`` itself with its exact threshold (no copy) unless ties must be broken, else a pruned copy."""
    flat = x.reshape(-1)
    thr, mask = _magnitude_select(flat, int(density * x.numel()), tie_break)
    if thr is not None:
        return x, thr
    return (x * mask.reshape(x.shape)).contiguous(), 0.0


def _zero_sign(w: float) -> int:
    """The fused op elects on weighted values; PEFT elects on unweighted ones with a zero sum -> +1.
    With one shared weight w the kept sets agree, and a zero election must keep the entries whose
    *unweighted* sign is +, i.e. weighted sign + (w > 0) or - (w < 0)."""
    return -1 if w < 0 else 1


def task_arithmetic(task_tensors: List[Tensor], weights: Tensor) -> Tensor:
    """``sum_t weights[t] * task_tensors[t]`` (one fused pass when possible)."""
    fused = _fused_weights(task_tensors, weights, ties=False)
    if fused is None:
        return _weighted_sum(task_tensors, weights)
    inputs, wl, out_float = fused
    out, _ = ops.weighted_merge(inputs, None, len(inputs), weights=wl, scale=1.0, out_float=out_float)
    return out[0]


def magnitude_prune(task_tensors: List[Tensor], weights: Tensor, density: float, *,
                    tie_break: TieBreak = "first") -> Tensor:
    """Magnitude-prune every task tensor to ``density``, then the weighted sum."""
    if not _needs_pruning(density):
        return task_arithmetic(task_tensors, weights)
    fused = _fused_weights(task_tensors, weights, ties=False)
    if fused is None:
        return _weighted_sum([magnitude_based_pruning(x, density, tie_break=tie_break) for x in task_tensors],
                             weights)
    inputs, wl, out_float = fused
    plans = [_magnitude_plan(x, density, tie_break) for x in inputs]
    out, _ = ops.weighted_merge([p[0] for p in plans], None, len(plans), weights=wl, scale=1.0,
                                thresholds=[p[1] for p in plans], out_float=out_float)
    return out[0]


def _fused_ties_weights(wl: List[float]) -> bool:
    """The fused op elects on weighted values, PEFT on unweighted ones.  Both agree exactly when all
    tasks share one weight w that scales without rounding (0 or +-2^j: w*x is exact in fp32), since
    then sign(sum w*x) = sign(w) * sign(sum x) with the same zeros; any other weights run PEFT's
    composition (e.g. 0.3 * (a + b + c) == 0 does not imply 0.3a + 0.3b + 0.3c == 0 in floating point)."""
    w = wl[0]
    return all(v == w for v in wl) and (w == 0.0 or (math.isfinite(w) and math.frexp(abs(w))[0] == 0.5))


def ties(task_tensors: List[Tensor], weights: Tensor, density: float,
         majority_sign_method: Literal["total", "frequency"] = "total", *, tie_break: TieBreak = "first") -> Tensor:
    """PEFT TIES: magnitude prune, elect the majority sign, weighted disjoint mean."""
    pruning = _needs_pruning(density)
    return _ties_magnitude(task_tensors, weights, density if pruning else None, majority_sign_method, tie_break)


def _ties_magnitude(task_tensors, weights, density: Optional[float], majority_sign_method: str,
                    tie_break: str) -> Tensor:
    """TIES after magnitude pruning to ``density`` (None: no pruning)."""
    fused = _fused_weights(task_tensors, weights, ties=True)
    if fused is None or majority_sign_method != "total" or not _fused_ties_weights(fused[1]):
        pruned = ([magnitude_based_pruning(x, density, tie_break=tie_break) for x in task_tensors]
                  if density is not None else list(task_tensors))
        return _ties_composed(pruned, weights, majority_sign_method)
    inputs, wl, out_float = fused
    plans = ([_magnitude_plan(x, density, tie_break) for x in inputs] if density is not None
             else [(x, 0.0) for x in inputs])
    out = ops.ties_merge([p[0] for p in plans], None, len(plans), thresholds=[p[1] for p in plans], merge="mean",
                         scale=1.0, weights=wl, zero_sign=_zero_sign(wl[0]), out_float=out_float)[0]
    return out[0]


def _dare_pruned(task_tensors, weights, density: float, keys: Tensor) -> List[Tensor]:
    """The DARE-pruned tensors for PEFT's composition.  The rescaled survivors stay fp32 when PEFT's
    weighted result is fp32 anyway (half-type tensors, fp32 weights), as in the fused pass; PEFT itself
    rounds ``x / density`` to the half type first (one extra rounding)."""
    w = weights if isinstance(weights, Tensor) else torch.as_tensor(weights)
    out = []
    for t, x in enumerate(task_tensors):
        keep_fp32 = x.dtype in HALF_DTYPES and torch.promote_types(x.dtype, w.dtype) == torch.float32
        out.append(_random_prune_keyed(x, density, True, keys[t], out_float=keep_fp32))
    return out


def dare_linear(task_tensors: List[Tensor], weights: Tensor, density: float, *, seed: Optional[int] = None) -> Tensor:
    """DARE (random prune + rescale, see the module doc for the draws) then the weighted sum."""
    if not _needs_pruning(density):
        return task_arithmetic(task_tensors, weights)
    T = len(task_tensors)
    keys = _dare_keys(seed, T)
    fused = _fused_weights(task_tensors, weights, ties=False)
    if fused is None:
        return _weighted_sum(_dare_pruned(task_tensors, weights, density, keys), weights)
    inputs, wl, out_float = fused
    out, _ = ops.weighted_merge(inputs, None, T, weights=wl, scale=1.0, dare_p=1.0 - density,
                                dare_keys=keys.to(inputs[0].device), dare_rescale=True, out_float=out_float)
    return out[0]


def dare_ties(task_tensors: List[Tensor], weights: Tensor, density: float,
              majority_sign_method: Literal["total", "frequency"] = "total", *, seed: Optional[int] = None) -> Tensor:
    """DARE (random prune + rescale) then TIES' election and weighted disjoint mean."""
    if not _needs_pruning(density):
        return _ties_magnitude(task_tensors, weights, None, majority_sign_method, "first")
    T = len(task_tensors)
    keys = _dare_keys(seed, T)
    fused = _fused_weights(task_tensors, weights, ties=True)
    if fused is None or majority_sign_method != "total" or not _fused_ties_weights(fused[1]):
        return _ties_composed(_dare_pruned(task_tensors, weights, density, keys), weights, majority_sign_method)
    inputs, wl, out_float = fused
    out = ops.ties_merge(inputs, None, T, thresholds=0.0, merge="mean", scale=1.0, weights=wl,
                         zero_sign=_zero_sign(wl[0]), dare_p=1.0 - density, dare_keys=keys.to(inputs[0].device),
                         dare_rescale=True, out_float=out_float)[0]
    return out[0]
