"""DARE: drop each task-vector entry with probability p, rescale survivors by 1/(1−p),
then task arithmetic or TIES — fused into those passes (no dropped copy of any task vector is made).

Randomness: a counter-based Philox-4x32-10 keyed by (seed, task index, tensor name) and indexed by the
element's flat index, so the mask is identical on CPU and CUDA, for any thread count, order, sharding
or streaming.  It is *not* the stream of ``torch.rand_like`` (FusionBench) or ``torch.bernoulli``
(MergeLM/PEFT): same distribution, different draws.  An entry is kept iff u >= p with u uniform on a
2^-24 grid; p = 1 drops everything and yields zeros (never NaN, unlike 0/0 rescaling).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from ._common import Patterns, StateDict, check_fraction, check_params, finish, prepare
from .task_arithmetic import merge_weighted
from .ties import ties_core


def dare_merging(pretrained: Optional[StateDict], finetuned: Sequence[StateDict], p: float = 0.5,
                 scaling: float = 0.3, *, seed: int = 0, combine: str = "task_arithmetic", rescale: bool = True,
                 density: float = 0.2, merge: str = "sum", mode: str = "global", weights=None,
                 task_vectors: bool = False, include: Patterns = None, exclude: Patterns = None,
                 out_dtype: Optional[Union[torch.dtype, str]] = None, nonfinite: str = "error") -> dict:
    """DARE + task arithmetic (``combine='task_arithmetic'``, FusionBench defaults p=0.5, λ=0.3) or
    DARE + TIES (``combine='ties'``: the trim threshold is taken on the dropped-and-rescaled vectors, as
    FusionBench's DareTiesMerging; its defaults are p=0.5, λ=0.5, density 0.2, sum).

    Args:
        p: drop probability in [0, 1].
        seed: the DARE seed (recorded by the CLI in the output metadata).
        rescale: multiply survivors by 1/(1−p) (default True).
        density, merge, mode: TIES parameters (``combine='ties'`` only), see :func:`ties_merging`.
        Other arguments as in :func:`task_arithmetic`.
    """
    out_dtype = check_params("dare_merging", scaling=scaling, weights=weights, out_dtype=out_dtype)
    p = check_fraction("p", p, False, "dare_merging")
    prep = prepare(pretrained, finetuned, task_vectors=task_vectors, include=include, exclude=exclude,
                   method="dare_merging")
    if combine == "task_arithmetic":
        merged = merge_weighted(prep, scaling=scaling, weights=weights, dare_p=p, seed=seed, rescale=rescale,
                                out_dtype=out_dtype, nonfinite=nonfinite, method="dare_merging")
    elif combine == "ties":
        merged = ties_core(prep, density=density, merge=merge, scaling=scaling, mode=mode, weights=weights,
                           dare_p=p, seed=seed, rescale=rescale, out_dtype=out_dtype, nonfinite=nonfinite,
                           method="dare_merging")
    else:
        raise ValueError(f"dare_merging: combine must be 'task_arithmetic' or 'ties', got {combine!r}")
    return finish(prep, merged, out_dtype)
