"""Helpers of CALM's mask training built from the fused ops.

The per-iteration ops themselves are in :mod:`calm_fast.ops` (``calm_interpolate``,
``calm_accumulate_``, ``calm_mask_step_``, ``calm_binarize_merge``); this module adds the pieces that
compose them with the exact selection of :mod:`calm_fast.selection`:

* :func:`init_mask_logits`: the initial logits R of §8.4 (P2 strict top-k of ``|tau_new|``);
* :func:`sigmoid`: the ops' own fp32 sigmoid, for callers that need the very values the kernels use.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch

from . import ops, selection

Tensor = torch.Tensor


def _dtype_groups(xs: Sequence[Tensor]) -> List[List[int]]:
    """Index sets of tensors sharing one dtype (each is counted by its own op call)."""
    groups: Dict[torch.dtype, List[int]] = {}
    for l, x in enumerate(xs):
        groups.setdefault(x.dtype, []).append(l)
    return list(groups.values())


def init_mask_logits(tau_new: Sequence[Tensor], fraction: float = 1e-5, bias: float = 5.0) -> List[Tensor]:
    """CALM's initial mask logits (§8.4): ``+bias`` where ``|tau_new| > t``, ``-bias`` elsewhere.

    ``t`` is the k-th largest ``|tau_new|`` over all given tensors together, ``k = int(fraction * N)``
    (P2: strictly greater, so the k-th value itself and every tie with it get ``-bias``; about k - 1
    entries start "on").  Found exactly in place by :func:`calm_fast.selection.kth_smallest_abs`,
    without concatenating the model.  Returns float32 tensors shaped like ``tau_new``.

    Raises ``ValueError`` when ``k == 0`` (the official code fails there too: ``min`` of an empty top-k).
    """
    xs = list(tau_new)
    n = sum(x.numel() for x in xs)
    rank = selection.strict_topk_to_k(n, fraction)
    if rank == 0:
        raise ValueError(f"init_mask_logits: int(fraction * N) = int({fraction} * {n}) = 0: no entry can be selected")
    t = float(selection.kth_smallest_abs(xs, None, 1, [rank], groups=_dtype_groups(xs))[0])
    on = torch.tensor(float(bias), dtype=torch.float32)
    off = torch.tensor(-float(bias), dtype=torch.float32)
    return [torch.where(x.float().abs() > t, on.to(x.device), off.to(x.device)) for x in xs]


def sigmoid(x: Tensor) -> Tensor:
    """The fp32 sigmoid of the CALM kernels (identical on CPU and CUDA; within 2 ulp of the exact value).

    Computed through ``calm_interpolate`` as ``0 + s * (1 - 0)``, which is exactly ``s``.
    """
    r = x.detach().float().contiguous()
    zero, one = torch.zeros_like(r), torch.ones_like(r)
    return ops.calm_interpolate(None, [zero], [one], [r], "fused", out_float=True)[0]
