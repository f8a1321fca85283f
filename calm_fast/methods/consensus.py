"""TALL masks and Consensus Merging, one fused pass.

Per task and element: ``m_t = |τ_t| > λ_t · |τ_MTL − τ_t|`` (strict: ties give 0), with the multi-task
vector ``τ_MTL = Σ_t τ_t`` (unscaled, TALL's default) or the unscaled TIES merged vector
(``mtl='ties'``).  Consensus keeps the elements that at least ``min_count`` task masks select:
``θ = θ0 + α · 1{Σ_t m_t >= min_count} ⊙ τ_MTL``.  ``min_count=0`` is plain task arithmetic with α,
``min_count > T`` returns θ0.  The per-task TALL masks can be returned (bool state dicts; stored
bit-packed inside the kernel, 1 bit per parameter and task).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from .. import ops
from ._common import Patterns, StateDict, check_nonfinite, check_params, finish, out_float_for, prepare
from .ties import ties_core


def consensus_merging(pretrained: Optional[StateDict], finetuned: Sequence[StateDict],
                      tall_lambdas: Union[float, Sequence[float]] = 0.6, min_count: int = 2, alpha: float = 0.3, *,
                      mtl: str = "sum", ties_density: float = 0.2, ties_merge: str = "sum",
                      return_masks: bool = False, task_vectors: bool = False, include: Patterns = None,
                      exclude: Patterns = None, out_dtype: Optional[Union[torch.dtype, str]] = None,
                      nonfinite: str = "error") -> Union[dict, Tuple[dict, List[Dict[str, torch.Tensor]]]]:
    """Consensus merging with TALL masks.

    Args:
        tall_lambdas: λ_t of the TALL masks, one number or one per task (FusionBench: 0.6 for all; the
            TALL paper picks each from {0.2, ..., 0.6} on validation data).
        min_count: consensus threshold k (default 2).
        alpha: scaling of the kept multi-task vector (chosen on validation in the paper; default 0.3,
            the task-arithmetic default).
        mtl: 'sum' (τ_MTL = Σ τ_t) or 'ties' (the unscaled TIES vector with ``ties_density`` and
            ``ties_merge``; computed as (θ0 + τ_m) − θ0 in fp32 when fine-tuned weights are given, the same
            rounding the TALL code's |θ0 + τ_MTL − θ_t| goes through).
        return_masks: also return the per-task TALL masks as a list of {key: bool tensor}.
        Other arguments as in :func:`task_arithmetic`.
    """
    out_dtype = check_params("consensus_merging", tall_lambdas=tall_lambdas, alpha=alpha, out_dtype=out_dtype)
    if int(min_count) < 0:
        raise ValueError(f"consensus_merging: min_count must be >= 0, got {min_count}")
    prep = prepare(pretrained, finetuned, task_vectors=task_vectors, include=include, exclude=exclude,
                   method="consensus_merging")
    lam = torch.as_tensor(tall_lambdas, dtype=torch.float32).reshape(-1)
    if lam.numel() == 1:
        lam = lam.expand(prep.T)
    if lam.numel() != prep.T:
        raise ValueError(f"consensus_merging: tall_lambdas needs 1 or {prep.T} values, got {lam.numel()}")
    mtl_vec: Optional[Dict[str, torch.Tensor]] = None
    if mtl == "ties":
        tm = ties_core(prep, density=ties_density, merge=ties_merge, scaling=1.0, mode="global",
                       out_dtype=torch.float32, nonfinite=nonfinite, method="consensus_merging")
        mtl_vec = {k: (v - prep.base[prep.keys.index(k)].float()) if prep.base is not None else v
                   for k, v in tm.items()}
    elif mtl != "sum":
        raise ValueError(f"consensus_merging: mtl must be 'sum' or 'ties', got {mtl!r}")
    merged: Dict[str, torch.Tensor] = {}
    masks: List[Dict[str, torch.Tensor]] = [dict() for _ in range(prep.T)]
    for g in prep.groups:
        dev = prep.inputs[g[0]].device
        given = [mtl_vec[prep.keys[l]].contiguous() for l in g] if mtl_vec is not None else None
        out, packed, bad = ops.consensus_merge(prep.group_inputs(g), prep.group_base(g), prep.T, lam.to(dev),
                                               mtl=given, min_count=int(min_count), alpha=alpha,
                                               return_masks=return_masks,
                                               out_float=out_float_for(prep, g, out_dtype))
        check_nonfinite(bad, prep, g, nonfinite, "consensus_merging")
        merged.update({prep.keys[l]: o for l, o in zip(g, out)})
        if return_masks:
            for t in range(prep.T):
                for j, l in enumerate(g):
                    x = prep.inputs[l]
                    masks[t][prep.keys[l]] = ops.unpack_mask(packed[t * len(g) + j], x.numel()).reshape(x.shape)
    result = finish(prep, merged, out_dtype)
    return (result, masks) if return_masks else result
