"""TIES-merging: trim, elect sign, disjoint merge — exact global semantics by default.

Pipeline: two counting passes find every task's exact global trim threshold (selection.py), then one
fused pass trims, elects, merges, scales and adds θ0.  The global majority sign μ (used only where the
trimmed values of an element cancel exactly) is only known after that pass, so the pass assumes
μ = +1, records the rare cancelled positions together with their output for every possible μ, and
patches them afterwards: no extra pass over the model (unless more than ``max_positions`` elements
cancel, in which case the pass is re-run with the now-known μ).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

import torch

from .. import ops, selection
from ._common import (Patterns, Prepared, StateDict, check_fraction, check_nonfinite, check_params, finish, out_float_for,
                      per_key_table, prepare, sub_table)

MODES = ("global", "per_tensor")
_PATCH_COLUMN = {1: 0, -1: 1, 0: 2}


def _thresholds(prep: Prepared, density: float, mode: str, dare_p: float, dare_keys, rescale: bool) -> torch.Tensor:
    """[T, L] fp32 trim thresholds (P1: keep |τ| >= t; t = 0 keeps everything when density == 1)."""
    T, L = prep.T, prep.L
    if density >= 1.0:
        return torch.zeros(T, L)
    if mode == "global":
        k = selection.topk_fraction_to_k(prep.numel(), density)
        thr = selection.kth_smallest_abs(prep.inputs, prep.base, T, [k] * T, dare_p=dare_p, dare_keys=dare_keys,
                                         dare_rescale=rescale, groups=prep.groups)
        return thr[:, None].expand(T, L).contiguous()
    # Per tensor (PEFT/mergekit): exactly floor(density * n) kept per tensor (exact_k_rank), every (task,
    # tensor) threshold in one selection call per dtype group (no Python per tensor).
    ranks = [selection.exact_k_rank(prep.inputs[l].numel(), density) if prep.inputs[l].numel() else 0
             for l in range(L)]
    none = [l for l, r in enumerate(ranks) if r == selection.KEEP_NONE_RANK]
    ks = torch.tensor([[prep.inputs[l].numel() if l in none else r for l, r in enumerate(ranks)]] * T,
                      dtype=torch.int64).reshape(T, L)
    thr = selection.kth_smallest_abs_per_tensor(prep.inputs, prep.base, T, ks, dare_p=dare_p, dare_keys=dare_keys,
                                                dare_rescale=rescale, groups=prep.groups)
    if none:
        thr[:, none] = float("inf")  # k == 0: nothing kept
    return thr


def _patch(outputs: List[torch.Tensor], numels: List[int], positions: torch.Tensor, patch: torch.Tensor,
           mu: int) -> None:
    """Write the recorded outputs for zero sign ``mu`` at the cancelled flat positions of a group."""
    if positions.numel() == 0:
        return
    ends = torch.tensor(numels, dtype=torch.int64).cumsum(0)
    pos = positions.cpu()
    which = torch.searchsorted(ends, pos, right=True)
    starts = ends - torch.tensor(numels, dtype=torch.int64)
    values = patch[:, _PATCH_COLUMN[mu]].cpu()
    for l in torch.unique(which).tolist():
        sel = which == l
        idx = (pos[sel] - starts[l]).to(outputs[l].device)
        outputs[l].view(-1)[idx] = values[sel].to(outputs[l].device, outputs[l].dtype)


def ties_core(prep: Prepared, *, density: float, merge: str, scaling: float, mode: str, weights=None,
              dare_p: float = 0.0, seed: int = 0, rescale: bool = True, out_dtype=None, nonfinite: str = "error",
              max_positions: int = 1 << 20, method: str = "ties_merging") -> Dict[str, torch.Tensor]:
    """Merged tensors by key: θ0 + λ τ_m (λ τ_m when the inputs are task vectors)."""
    if merge not in ("sum", "mean", "max"):
        raise ValueError(f"{method}: merge must be 'sum', 'mean' or 'max', got {merge!r}")
    if mode not in MODES:
        raise ValueError(f"{method}: mode must be one of {MODES}, got {mode!r}")
    density = check_fraction("density", density, True, method)
    dare_keys = ops.dare_keys(seed, prep.keys, prep.T) if dare_p > 0 else None
    thr = _thresholds(prep, density, mode, dare_p, dare_keys, rescale)
    wt = per_key_table(1.0 if weights is None else weights, prep, "weights")
    def run(g, zero_sign):
        dev = prep.inputs[g[0]].device
        dk = dare_keys[:, g].contiguous().to(dev) if dare_keys is not None else None
        return ops.ties_merge(prep.group_inputs(g), prep.group_base(g), prep.T, sub_table(thr, g, dev), merge=merge,
                              scale=scaling, weights=sub_table(wt, g, dev), zero_sign=zero_sign, dare_p=dare_p,
                              dare_keys=dk, dare_rescale=rescale,
                              out_float=out_float_for(prep, g, out_dtype),
                              max_positions=max_positions)

    results, sign_total = [], 0
    for g in prep.groups:
        r = run(g, 1)
        check_nonfinite(r[5], prep, g, nonfinite, method)
        results.append(r)
        sign_total += int(r[1].sum())
    # Zero-sign rule: global mode -> μ = sign of the sum of all elected signs (the reference's rule);
    # per-tensor mode -> +1 (PEFT/mergekit: `sign_sum >= 0 -> +1`), which the pass already used.
    mu = (sign_total > 0) - (sign_total < 0) if mode == "global" else 1
    merged = {}
    for g, r in zip(prep.groups, results):
        outputs, _, positions, patch, cancel, _ = r
        if mu != 1 and int(cancel.sum()) > 0:
            if int(cancel.sum()) <= positions.numel():
                _patch(outputs, [prep.inputs[l].numel() for l in g], positions, patch, mu)
            else:  # more cancellations than were recorded: redo this group with the known sign
                outputs = run(g, mu)[0]
        merged.update({prep.keys[l]: o for l, o in zip(g, outputs)})
    return merged


def ties_merging(pretrained: Optional[StateDict], finetuned: Sequence[StateDict], density: float = 0.2,
                 merge: str = "sum", scaling: float = 0.3, *, mode: str = "global", weights=None,
                 task_vectors: bool = False, include: Patterns = None, exclude: Patterns = None,
                 out_dtype: Optional[Union[torch.dtype, str]] = None, nonfinite: str = "error") -> dict:
    """TIES-merging.

    Args:
        density: fraction of entries kept per task, in (0, 1] (TIES "K = 20" is density 0.2).  The trim
            threshold is the ``(n − floor(density·n))``-th smallest ``|τ_t|`` and every ``|τ| >= t`` is
            kept (ties at the threshold kept, so at least ``floor(density·n) + 1`` entries: the rank
            rule P1).  density = 1 keeps everything (the public code errors there).
        merge: disjoint merge 'sum' (FusionBench/AdaMerging default), 'mean' (TIES paper) or 'max'.
        scaling: λ applied to the merged task vector (default 0.3 as FusionBench/AdaMerging).
        mode: 'global' (default; the paper's and FusionBench's semantics: one threshold per task over the
            whole flattened model in sorted-key order, and elements whose trimmed values cancel exactly
            take the *global* majority sign of all elected signs), or 'per_tensor' (PEFT ``magnitude_prune`` /
            mergekit style: exactly ``floor(density·n)`` entries kept per task and tensor — the threshold is
            the k-th largest ``|τ|``, nothing is kept when k = 0 — and a zero elected sign resolves to +1;
            with exact ties at the k-th magnitude every tied entry is kept, where torch.topk/argsort keep k
            of them in their unspecified internal order).
        weights: optional per-task (or [T, L], or key -> T numbers) multipliers applied to the trimmed
            values before the election (PEFT's weighted TIES); default 1.
        task_vectors, include, exclude, out_dtype, nonfinite: as in :func:`task_arithmetic`.

    Returns the merged state dict (``θ0 + scaling · τ_merged``; integer buffers and excluded keys are θ0).
    """
    out_dtype = check_params("ties_merging", scaling=scaling, weights=weights, out_dtype=out_dtype)
    prep = prepare(pretrained, finetuned, task_vectors=task_vectors, include=include, exclude=exclude,
                   method="ties_merging")
    merged = ties_core(prep, density=density, merge=merge, scaling=scaling, mode=mode, weights=weights,
                       out_dtype=out_dtype, nonfinite=nonfinite)
    return finish(prep, merged, out_dtype)
