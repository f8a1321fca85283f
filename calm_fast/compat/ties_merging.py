"""Drop-in replacement for the TIES-merging utilities used by FusionBench, AdaMerging and the official
TIES-merging repository (``ties_merging_utils.py`` / ``merge_utils.py``).

Change one import::

    # from fusion_bench.method.ties_merging.ties_merging_utils import ties_merging, state_dict_to_vector, ...
    from calm_fast.compat.ties_merging import ties_merging, state_dict_to_vector, ...

Same names, signatures and results (rank rule P1 and TIES).  What is faster:

* ``topk_values_mask``: the per-row k-th smallest ``|x|`` comes from the exact two-pass histogram
  selection (:func:`calm_fast.selection.kth_smallest_abs`) on row views (no copy, no ``kthvalue``);
  bit-identical thresholds.
* ``ties_merging``: trim, elect, disjoint merge in one fused pass over the row views
  (:func:`calm_fast.methods.ties.ties_core`, global mode), with the reference's *global* majority sign
  for elements whose trimmed values cancel exactly.  No trimmed copy, no sign/mask temporaries.
* ``state_dict_to_vector`` / ``vector_to_state_dict``: no ``copy.deepcopy`` of the whole model (the
  reference deep-copies every tensor and then copies again); same vector, same key order (sorted).

Kept as in the reference (documented edge cases):

* ``K > 1`` is a percentage (divided by 100); ``K == 1`` / ``K == 100`` ask for the 0-th smallest value,
  which ``torch.kthvalue`` rejects: a ``RuntimeError`` is raised, as in the reference.  ``K <= 0`` with
  ``int(d*K) == 0`` keeps the largest magnitude(s) only; ``reset_thresh=None`` raises ``TypeError``.
* ties at the threshold are kept (``|x| >= t``), so at least ``floor(K·d) + 1`` entries per row.
* ``ties_merging`` returns the merged *task vector* (1-D, ``d``), unscaled, in the input dtype; with
  ``merge_func`` "mean" on fp16/bf16 input the reference returns float32 (type promotion by its float
  count), so does this shim.
* ``state_dict_to_vector`` flattens in sorted-key order and honours ``remove_keys``;
  ``vector_to_state_dict`` returns an ``OrderedDict`` in sorted-key order whose tensors are views of
  ``vector`` (the reference assigns ``.data`` of its deep copies to slices of the vector), and re-adds
  ``remove_keys`` as aliases of ``transformer.shared.weight`` when that key exists (T5 tied embeddings).

Deviations (on purpose):

* the reference prints "RESOLVING SIGN" / "Disjoint AGGREGATION: ..."; the shim logs them at DEBUG level.
* fp32 arithmetic inside the fused pass: for fp16/bf16 rows the merged sum is rounded once at the end.
  The reference sums in fp32 too (torch's CPU/CUDA reductions accumulate half types in fp32), so results
  agree; ``mean`` on fp16/bf16 divides the fp32 sum (the reference rounds the sum to the half type
  first): at most one half-type rounding apart.
* element order of the final sum: the fused pass sums tasks in order ``t = 0..T-1`` for every element.
  ``torch.sum(dim=0)`` does the same except in the vectorisation tail of some shapes with ``T >= 5``,
  where it may round differently (a last-bit difference in a few elements).
* inputs the fused ops do not take (float64 or integer rows, 1-D input, empty rows), and rows that
  require grad with grad mode on, run the reference composition (``topk_values_mask`` -> ``resolve_sign``
  -> ``disjoint_merge``) on plain torch, so the result carries grad as the reference's does.  The
  selection (the exact per-row threshold) reads the rows detached: a comparison has no gradient.
* non-finite values: propagate (no error), but NaN/inf handling is not guaranteed bit-identical.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Iterable, Mapping

import torch

from .. import selection
from ..methods._common import Prepared
from ..methods.ties import ties_core

Tensor = torch.Tensor
log = logging.getLogger(__name__)

__all__ = ["state_dict_to_vector", "vector_to_state_dict", "add_ptm_to_tv", "check_parameterNamesMatch",
           "check_state_dicts_equal", "topk_values_mask", "resolve_zero_signs", "resolve_sign", "disjoint_merge",
           "disjoint_merge_split", "ties_merging", "ties_merging_split"]

_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_KTH_ERROR = "kthvalue(): selected number k out of range for dimension 1"


# ------------------------------------------------------------------------------------------------
# Model conversion utils
# ------------------------------------------------------------------------------------------------
def _kept_keys(state_dict: Mapping[str, Tensor], remove_keys: Iterable[str]) -> list:
    removed = set(remove_keys if remove_keys is not None else ())
    return sorted(k for k in state_dict if k not in removed)


def state_dict_to_vector(state_dict, remove_keys=()):
    """Concatenate the state dict's tensors (keys sorted, ``remove_keys`` left out) into one 1-D tensor.

    Same vector as the reference (``parameters_to_vector`` over the sorted items), without the
    reference's deep copy of the whole state dict.
    """
    keys = _kept_keys(state_dict, remove_keys)
    return torch.nn.utils.parameters_to_vector([state_dict[k].reshape(-1) for k in keys])


def vector_to_state_dict(vector, state_dict, remove_keys=()):
    """Split ``vector`` back into an ``OrderedDict`` shaped like ``state_dict`` (keys sorted,
    ``remove_keys`` left out; re-added as aliases of ``transformer.shared.weight`` when present).

    The values are views of ``vector`` (detached, like the reference's ``.data`` assignment) with
    ``vector``'s dtype and device; an entry whose reference tensor requires grad keeps requiring grad.
    """
    if not isinstance(vector, torch.Tensor):
        raise TypeError(f"expected torch.Tensor, but got: {torch.typename(vector)}")
    keys = _kept_keys(state_dict, remove_keys)
    flat = vector.detach()
    out: "OrderedDict[str, Tensor]" = OrderedDict()
    pointer = 0
    for k in keys:
        ref = state_dict[k]
        n = ref.numel()
        piece = flat[pointer:pointer + n].view_as(ref)
        if ref.requires_grad:
            piece.requires_grad_(True)
        out[k] = piece
        pointer += n
    if "transformer.shared.weight" in out:
        for k in (remove_keys or ()):
            out[k] = out["transformer.shared.weight"]
    return out


def add_ptm_to_tv(tv_dict, ptm_dict):
    """``tv + ptm`` per key (both dicts must have the same keys)."""
    if set(tv_dict.keys()) != set(ptm_dict.keys()):
        raise AssertionError("Differing parameter names in models.")
    out = dict(tv_dict)
    for k, v in ptm_dict.items():
        out[k] = tv_dict[k] + v
    return out


def check_parameterNamesMatch(checkpoints):  # noqa: N802 (reference name)
    """Raise ``ValueError`` if the checkpoints do not all have the same parameter names."""
    names = set(checkpoints[0].keys())
    for ck in checkpoints[1:]:
        other = set(ck.keys())
        if other != names:
            raise ValueError("Differing parameter names in models. "
                             f"The different parameters are {names.symmetric_difference(other)}")


def check_state_dicts_equal(state_dict1, state_dict2):
    """True iff both state dicts have the same keys and ``torch.equal`` tensors."""
    if set(state_dict1.keys()) != set(state_dict2.keys()):
        return False
    return all(torch.equal(state_dict1[k], state_dict2[k]) for k in state_dict1)


# ------------------------------------------------------------------------------------------------
# TIES merging utils
# ------------------------------------------------------------------------------------------------
def _fraction(K):
    """The reference's K normalisation: K > 1 is a percentage."""
    if K > 1:
        K /= 100
    return K


def _rank(d: int, K) -> int:
    """kthvalue rank of the threshold: ``d - int(d * K)`` (keep the top ``int(d*K)`` plus ties)."""
    return d - int(d * K)


def _fusable(M: Tensor) -> bool:
    return M.dim() == 2 and M.dtype in _FUSED_DTYPES and M.shape[0] > 0 and M.shape[1] > 0


def _kth_abs_per_row(M: Tensor, k: int) -> Tensor:
    """``M.abs().kthvalue(k, dim=1, keepdim=True).values`` for a 2-D M, via the exact histogram selection
    on the row views when the fused ops take the dtype (same values, same errors)."""
    n, d = M.shape
    if not _fusable(M):
        return M.abs().kthvalue(k, dim=1, keepdim=True).values
    if not 1 <= k <= d:
        raise RuntimeError(_KTH_ERROR)
    rows = list(M.contiguous().unbind(0))  # views, no copy for a contiguous M
    thr = selection.kth_smallest_abs(rows, None, n, [k] * n)
    return thr.to(device=M.device, dtype=M.dtype).reshape(n, 1)  # exact: each is some |M[i, j]|


def topk_values_mask(M, K=0.7, return_mask=False):
    """Keep, in every row of ``M``, the entries with ``|x| >= t`` where ``t`` is the ``(d - int(d*K))``-th
    smallest ``|x|`` of the row (rule P1; ``K > 1`` is a percentage).

    Returns ``(M * mask, mask.float().mean(dim=1))``, plus ``mask`` when ``return_mask``; shapes as
    the reference (including its squeeze rule for 1-D input).
    """
    K = _fraction(K)
    original_shape = M.shape
    if M.dim() == 1:
        M = M.unsqueeze(0)
    n, d = M.shape
    kth = _kth_abs_per_row(M, _rank(d, K))
    mask = M.abs() >= kth
    final_mask = mask.squeeze() if original_shape == M.squeeze().shape else mask
    if return_mask:
        return M * final_mask, final_mask.float().mean(dim=1), final_mask
    return M * final_mask, final_mask.float().mean(dim=1)


def resolve_zero_signs(sign_to_mult, method="majority"):
    """Replace zero signs (in place) by the sign of the sum of all signs ("majority") or its opposite."""
    majority_sign = torch.sign(sign_to_mult.sum())
    if method == "majority":
        sign_to_mult[sign_to_mult == 0] = majority_sign
    elif method == "minority":
        sign_to_mult[sign_to_mult == 0] = -1 * majority_sign
    return sign_to_mult


def _norm_fracs(T: Tensor) -> Tensor:
    return T ** 2 / torch.norm(T, dim=1, keepdim=True) ** 2


def resolve_sign(Tensor, resolve_method="mass"):  # noqa: N803 (reference argument name)
    """Elected sign per column: ``sign(sum over rows)`` ("mass", the FusionBench/AdaMerging rule);
    zeros take the global majority sign.  ``resolve_method`` (official TIES repo only) also accepts
    "normfrac" and "normmass"."""
    if resolve_method == "mass":
        sign_to_mult = torch.sign(Tensor.sum(dim=0))
    elif resolve_method == "normfrac":
        fracs = _norm_fracs(Tensor)
        sign_to_mult = torch.sign(Tensor[fracs.argmax(dim=0), torch.arange(Tensor.shape[1], device=Tensor.device)])
    elif resolve_method == "normmass":
        sign_to_mult = (Tensor.sign() * _norm_fracs(Tensor).abs()).sum(dim=0).sign()
    else:
        raise ValueError(f"Sign resolve method {resolve_method} is not defined.")
    return resolve_zero_signs(sign_to_mult, "majority")


def _select(v: Tensor, sign_to_mult) -> Tensor:
    """Entries agreeing with the elected sign (all non-zero entries when no sign is given)."""
    if sign_to_mult is not None:
        keep = torch.where(sign_to_mult.unsqueeze(0) > 0, v > 0, v < 0)
    else:
        keep = v != 0
    return v * keep


def disjoint_merge(Tensor, merge_func, sign_to_mult):  # noqa: N803
    """Disjoint merge of the rows of ``Tensor`` ("sum", "mean" or "max"; a "dis-" prefix is ignored)."""
    func = merge_func.split("-")[-1]
    selected = _select(Tensor, sign_to_mult)
    if func == "mean":
        counts = (selected != 0).sum(dim=0).float()
        return torch.sum(selected, dim=0) / torch.clamp(counts, min=1)
    if func == "sum":
        return torch.sum(selected, dim=0)
    if func == "max":
        out = selected.abs().max(dim=0)[0]
        out *= sign_to_mult
        return out
    raise ValueError(f"Merge method {func} is not defined.")


def disjoint_merge_split(Tensor, merge_func, sign_to_mult):  # noqa: N803
    """Like :func:`disjoint_merge` ("sum" only) but also returns the selected entries."""
    func = merge_func.split("-")[-1]
    selected = _select(Tensor, sign_to_mult)
    if func == "sum":
        return selected, torch.sum(selected, dim=0)
    raise ValueError(f"Merge method {func} is not defined.")


def _ties_composed(flat_task_checks: Tensor, reset_thresh, merge_func: str) -> Tensor:
    """The reference pipeline on plain torch (inputs the fused pass does not take)."""
    updated, *_ = topk_values_mask(flat_task_checks, K=reset_thresh, return_mask=False)  # a new tensor
    signs = resolve_sign(updated)
    return disjoint_merge(updated, merge_func, signs)


def ties_merging(flat_task_checks, reset_thresh=None, merge_func=""):
    """TIES-merging of the rows of a ``[T, d]`` matrix of flattened task vectors.

    ``reset_thresh``: the kept fraction K (``K > 1`` is a percentage: 20 means 20 %).
    ``merge_func``: "sum", "mean" or "max" (optionally prefixed, e.g. "dis-mean").
    Returns the merged task vector ``[d]`` (not scaled, no pretrained weights added).
    """
    M = flat_task_checks
    func = merge_func.split("-")[-1]
    if func not in ("sum", "mean", "max"):
        raise ValueError(f"Merge method {func} is not defined.")
    log.debug("RESOLVING SIGN")
    log.debug("Disjoint AGGREGATION: %s", merge_func)
    if not _fusable(M) or (torch.is_grad_enabled() and M.requires_grad):
        # the reference pipeline on plain torch: also what keeps the result in the autograd graph, as the
        # reference's is (the fused ops have no backward)
        return _ties_composed(M, reset_thresh, merge_func)
    K = _fraction(reset_thresh)
    T, d = M.shape
    k = _rank(d, K)
    if not 1 <= k <= d:
        raise RuntimeError(_KTH_ERROR)
    # ties_core takes a kept fraction and ranks it as d - floor(density * d): K itself gives the same k;
    # for int(d * K) == 0 (K <= 0 or tiny) any density below 1/d does.
    density = float(K) if int(d * K) > 0 else 0.5 / d
    rows = list(M.contiguous().unbind(0))
    prep = Prepared(keys=["flat"], T=T, inputs=rows, base=None, pretrained=None, passthrough={}, order=["flat"],
                    groups=[[0]])
    out_dtype = torch.float32 if (func == "mean" and M.dtype != torch.float32) else None
    merged = ties_core(prep, density=density, merge=func, scaling=1.0, mode="global", out_dtype=out_dtype,
                       nonfinite="propagate", method="ties_merging")
    return merged["flat"]


def ties_merging_split(flat_task_checks, reset_thresh=None, merge_func=""):
    """TIES with "sum": returns ``(selected_entries [T, d], merged [d])`` (the FusionBench/AdaMerging
    variant).  The trim uses the exact fast threshold; the rest is the reference's torch pipeline
    (the selected entries have to be materialised anyway)."""
    updated, *_ = topk_values_mask(flat_task_checks, K=reset_thresh, return_mask=False)  # a new tensor
    log.debug("RESOLVING SIGN")
    signs = resolve_sign(updated)
    log.debug("Disjoint AGGREGATION: %s", merge_func)
    return disjoint_merge_split(updated, merge_func, signs)
