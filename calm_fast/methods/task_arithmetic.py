"""Task arithmetic: θ = θ0 + λ Σ_t w_t τ_t, one fused pass."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .. import ops
from ._common import (Patterns, Prepared, StateDict, check_nonfinite, check_params, finish, out_float_for, per_key_table, prepare,
                      sub_table)


def merge_weighted(prep: Prepared, *, scaling: float, weights, dare_p: float = 0.0, seed: int = 0,
                   rescale: bool = True, out_dtype: Optional[torch.dtype] = None, nonfinite: str = "error",
                   method: str = "task_arithmetic") -> dict:
    """θ0 + scaling · Σ_t weights[t,l] · DARE(τ_t) over every dtype group (shared by TA and DARE)."""
    table = per_key_table(1.0 if weights is None else weights, prep, "weights")
    keys_all = ops.dare_keys(seed, prep.keys, prep.T) if dare_p > 0 else None
    merged = {}
    for g in prep.groups:
        dev = prep.inputs[g[0]].device
        dk = keys_all[:, g].contiguous().to(dev) if keys_all is not None else None
        out, bad = ops.weighted_merge(prep.group_inputs(g), prep.group_base(g), prep.T, sub_table(table, g, dev),
                                      scale=scaling, dare_p=dare_p, dare_keys=dk, dare_rescale=rescale,
                                      out_float=out_float_for(prep, g, out_dtype))
        check_nonfinite(bad, prep, g, nonfinite, method)
        merged.update({prep.keys[l]: o for l, o in zip(g, out)})
    return merged


def task_arithmetic(pretrained: Optional[StateDict], finetuned: Sequence[StateDict], scaling: float = 0.3, *,
                    weights=None, task_vectors: bool = False, include: Patterns = None, exclude: Patterns = None,
                    out_dtype: Optional[Union[torch.dtype, str]] = None, nonfinite: str = "error") -> dict:
    """Task arithmetic: ``θ = θ0 + scaling · Σ_t w_t (θ_t − θ0)``.

    Args:
        pretrained: θ0 state dict (may be None with ``task_vectors=True``: the merged task vector is returned).
        finetuned: fine-tuned state dicts θ_t, or task vectors τ_t with ``task_vectors=True``.
        scaling: λ (default 0.3, the AdaMerging/CALM/FusionBench setting).
        weights: optional per-task multipliers w_t (T numbers), a [T, L] table, or a mapping
            ``key -> T numbers`` (layer-wise coefficients); default 1.
        include / exclude: regex patterns (``re.search``) selecting the merged keys; the others keep θ0.
        out_dtype: output dtype, a floating ``torch.dtype`` or its name (``"bfloat16"``, ``"bf16"``...;
            default: each pretrained tensor's dtype).  Non-finite ``scaling``/``weights`` and integer
            ``out_dtype`` raise ``ValueError`` before anything is computed.
        nonfinite: 'error' (default) or 'propagate' for inf/NaN task-vector values.

    Semantics: per element, fp32, ``Σ_t`` in task order, then ``× scaling``, then ``+ θ0`` (the FusionBench
    order); integer buffers are copied from θ0.
    """
    out_dtype = check_params("task_arithmetic", scaling=scaling, weights=weights, out_dtype=out_dtype)
    prep = prepare(pretrained, finetuned, task_vectors=task_vectors, include=include, exclude=exclude,
                   method="task_arithmetic")
    merged = merge_weighted(prep, scaling=scaling, weights=weights, out_dtype=out_dtype, nonfinite=nonfinite)
    return finish(prep, merged, out_dtype)
