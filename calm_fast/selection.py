"""Exact global magnitude selection over lists of tensors, without concatenating them.

By default (``method='auto'``) one ``abs_bracket`` pass pins the k-th smallest ``|tau|`` of a task's whole
(virtual) flattened vector between two sampled bounds and selects it exactly among the few values inside
(see :func:`kth_smallest_abs`).  The fallback, and the streaming/distributed form, is two counting passes
of the ``abs_histogram_`` op (radix select on fp32 magnitude keys, see csrc/cpu/selection_cpu.cpp):

1. count the high 15 bits of every key -> the bucket holding the k-th key (prefix sums);
2. count the low 16 bits of the keys inside that bucket only -> the exact key.

The result is bit-identical to ``torch.kthvalue(torch.cat([x.abs().flatten() for x in xs]).float(), k)``
(the rank rule P1 of the README), works past 2**31 elements (int64 counts), for fp32/bf16/fp16, for T tasks in one
call, and needs memory for two small histograms only.  Because histograms add, the same two passes run
over tensors streamed from disk (:class:`ThresholdFinder`) or sharded across processes (all-reduce).
"""
from __future__ import annotations

import math
from typing import Iterable, List, Optional, Sequence

import torch

from . import ops

Tensor = torch.Tensor

# Threshold meaning "keep every element" for the >= rule (|x| >= 0 for every non-NaN x).
KEEP_ALL = 0.0
# Threshold meaning "keep nothing" for the strict > rule.
KEEP_NONE_STRICT = float("inf")


def _find_rank(hist: Tensor, k: Tensor) -> tuple:
    """For each row, the bin holding the k-th (1-indexed) count and the rank of k inside that bin."""
    cum = hist.cumsum(dim=1)
    kk = k.clamp(min=1).to(cum.dtype)[:, None]
    bin_ = torch.searchsorted(cum, kk).squeeze(1)  # first bin whose cumulative count >= k
    below = torch.where(bin_ > 0, cum.gather(1, (bin_ - 1).clamp(min=0)[:, None]).squeeze(1), torch.zeros_like(bin_))
    return bin_, k - below


class ThresholdFinder:
    """Incremental exact k-th smallest |tau| for T tasks, fed tensor by tensor in two passes.

    Usage (streaming):  ``for chunk in pass(): finder.add(chunk_inputs, chunk_base)`` with
    ``finder.level == 0``; then ``finder.next_level()``; then the same passes again; then
    ``finder.thresholds()``.  For distributed runs, ``finder.hist`` can be all-reduced (summed) across
    ranks before ``next_level()`` and ``thresholds()``.
    """

    def __init__(self, num_tasks: int, ks: Sequence[int], device=None, dare_p: float = 0.0,
                 dare_rescale: bool = True):
        self.T = int(num_tasks)
        self.k = torch.as_tensor(list(ks), dtype=torch.int64)
        if self.k.numel() != self.T:
            raise ValueError(f"need one k per task ({self.T}), got {self.k.numel()}")
        self.device = device if device is not None else torch.device("cpu")
        self.dare_p = float(dare_p)
        self.dare_rescale = bool(dare_rescale)
        self.level = 0
        self.hist = torch.zeros(self.T, ops.HIST_HIGH_BINS, dtype=torch.int64, device=self.device)
        self.prefix: Optional[Tensor] = None
        self.rank: Optional[Tensor] = None
        self.count = torch.zeros(self.T, dtype=torch.int64)

    def add(self, inputs: Sequence[Tensor], base: Optional[Sequence[Tensor]] = None,
            dare_keys: Optional[Tensor] = None) -> None:
        """Count one group of tensors (task-major, ``T * L`` of them, one dtype)."""
        if not len(inputs):
            return
        if self.level == 0:
            L = len(inputs) // self.T
            self.count += torch.tensor([sum(inputs[t * L + l].numel() for l in range(L)) for t in range(self.T)])
        hist = self.hist if self.hist.device == inputs[0].device else torch.zeros_like(self.hist, device=inputs[0].device)
        prefix = None if self.prefix is None else self.prefix.to(inputs[0].device)
        ops.abs_histogram_(hist, inputs, base, self.T, prefix, self.dare_p, dare_keys, self.dare_rescale)
        if hist is not self.hist:
            self.hist += hist.to(self.hist.device)

    def next_level(self) -> None:
        """Finish the first pass: locate each task's bucket and prepare the refinement pass."""
        if self.level != 0:
            raise RuntimeError("next_level() called twice")
        n = self.count
        if bool(((self.k < 0) | (self.k > n)).any()):
            raise ValueError(f"k out of range: k={self.k.tolist()} for task sizes {n.tolist()}")
        bucket, rank = _find_rank(self.hist.cpu(), self.k)
        self.prefix = torch.where(self.k > 0, bucket, torch.full_like(bucket, -1))
        self.rank = rank
        self.level = 1
        self.hist = torch.zeros(self.T, ops.HIST_LOW_BINS, dtype=torch.int64, device=self.device)

    def thresholds(self) -> Tensor:
        """fp32 [T]: the exact k-th smallest |tau| per task (``KEEP_ALL`` where k == 0)."""
        if self.level != 1:
            raise RuntimeError("thresholds() needs both passes")
        low, _ = _find_rank(self.hist.cpu(), self.rank)
        keys = (self.prefix.clamp(min=0) << 16) | low
        values = keys.to(torch.int32).view(torch.float32)
        return torch.where(self.k > 0, values, torch.full_like(values, KEEP_ALL))


SAMPLE_SIZE = 1 << 16


def _strided_sample(inputs, base, T: int, L: int, n: int, dare_p: float, dare_keys, dare_rescale: bool) -> List[Tensor]:
    """Per task, |tau| at every ``stride``-th element of the (virtual) concatenation, sorted (fp32).

    Strided views and NumPy sorting only: a few tiny single-threaded operations, so the sample costs
    microseconds rather than thread-pool round trips.  Inputs are read detached: a selection is a
    comparison, never part of an autograd graph (inputs may require grad).
    """
    import numpy as np

    from .philox import philox_uniform  # the same Philox stream as the kernels, on a few indices

    stride = max(1, n // SAMPLE_SIZE)
    out = []
    for t in range(T):
        parts, offset = [], 0
        for l in range(L):
            x = inputs[t * L + l].detach().reshape(-1)
            m = x.numel()
            first = (-offset) % stride
            offset += m
            if first >= m:
                continue
            v = x[first::stride].float()
            if base:
                v = v - base[l].detach().reshape(-1)[first::stride].float()
            if dare_p > 0:
                idx = torch.arange(first, m, stride)
                keep = philox_uniform(idx, int(dare_keys[t, l])).to(v.device) >= dare_p
                scale = (1.0 / (1.0 - dare_p) if dare_p < 1 else 0.0) if dare_rescale else 1.0
                v = torch.where(keep, v * torch.tensor(scale, dtype=torch.float32), torch.zeros_like(v))
            parts.append(np.abs(v.cpu().numpy()))
        out.append(torch.from_numpy(np.sort(np.concatenate(parts))) if parts else torch.zeros(0))
    return out


def kth_smallest_abs(inputs: Sequence[Tensor], base: Optional[Sequence[Tensor]], num_tasks: int,
                     ks: Sequence[int], dare_p: float = 0.0, dare_keys: Optional[Tensor] = None,
                     dare_rescale: bool = True, groups: Optional[Iterable[Sequence[int]]] = None,
                     method: str = "auto") -> Tensor:
    """Exact k-th smallest |tau| (1-indexed) per task over a resident task-major list of tensors.

    ``k = 0`` for a task returns ``KEEP_ALL`` (0.0).  ``groups`` optionally lists index sets ``[l...]`` of
    tensors sharing one dtype (mixed-dtype models), each counted with its own op call.

    ``method='auto'`` (default) first tries the one-pass bracket select: a strided sample of 65536
    values per task predicts an interval [lo, hi] around the k-th value; one ``abs_bracket`` pass counts
    the elements below / at / inside / at the top of it and copies out the ~1% inside, among which the
    k-th is selected exactly.  Tasks whose k-th value falls outside the predicted interval (or with
    more candidates than the buffer holds) fall back to the two-pass radix count (``method='radix'``).
    Both are exact; the sample only decides how fast.
    """
    T = int(num_tasks)
    L = len(inputs) // T if T else 0
    groups = [list(range(L))] if groups is None else [list(g) for g in groups]
    k = torch.as_tensor(list(ks), dtype=torch.int64)
    if k.numel() != T:
        raise ValueError(f"need one k per task ({T}), got {k.numel()}")
    n = sum(inputs[l].numel() for l in range(L))
    if bool(((k < 0) | (k > n)).any()):
        raise ValueError(f"k out of range: k={k.tolist()} for task size {n}")
    result = torch.full((T,), KEEP_ALL, dtype=torch.float32)
    todo = k > 0
    if method == "auto" and bool(todo.any()):
        result, todo = _bracket_select(inputs, base, T, L, n, k, todo, groups, dare_p, dare_keys, dare_rescale,
                                       result)
    elif method not in ("auto", "radix"):
        raise ValueError(f"method must be 'auto' or 'radix', got {method!r}")
    if bool(todo.any()):
        kk = torch.where(todo, k, torch.zeros_like(k))
        finder = ThresholdFinder(T, kk.tolist(), device=inputs[0].device, dare_p=dare_p, dare_rescale=dare_rescale)

        def run_pass() -> None:
            for g in groups:
                sub = [inputs[t * L + l] for t in range(T) for l in g]
                sub_base = [base[l] for l in g] if base else None
                keys = dare_keys[:, g].contiguous() if dare_keys is not None else None
                finder.add(sub, sub_base, keys)

        run_pass()
        finder.next_level()
        run_pass()
        result = torch.where(todo, finder.thresholds(), result)
    return result


def kth_smallest_abs_per_tensor(inputs: Sequence[Tensor], base: Optional[Sequence[Tensor]], num_tasks: int,
                                ks: Tensor, dare_p: float = 0.0, dare_keys: Optional[Tensor] = None,
                                dare_rescale: bool = True, groups: Optional[Iterable[Sequence[int]]] = None) -> Tensor:
    """Exact ``ks[t, l]``-th smallest ``|tau|`` of task t's tensor l *alone*, for every pair: float32 ``[T, L]``
    (``k = 0`` gives ``KEEP_ALL``).  The thresholds of per-tensor TIES.

    Bit-identical to ``kth_smallest_abs`` called on each tensor by itself (the same fp32 magnitude-key
    order), in one :func:`calm_fast.ops.abs_kth_per_tensor` call per dtype group on the CPU (no Python per
    tensor); on other devices it loops over the tensors with :func:`kth_smallest_abs`.
    """
    T = int(num_tasks)
    L = len(inputs) // T if T else 0
    k = torch.as_tensor(ks, dtype=torch.int64)
    if tuple(k.shape) != (T, L):
        raise ValueError(f"ks: expected shape [{T}, {L}], got {list(k.shape)}")
    sizes = torch.tensor([inputs[l].numel() for l in range(L)], dtype=torch.int64)
    if bool(((k < 0) | (k > sizes[None, :])).any()):
        raise ValueError(f"k out of range: k={k.tolist()} for tensor sizes {sizes.tolist()}")
    result = torch.full((T, L), KEEP_ALL, dtype=torch.float32)
    if L == 0:
        return result
    groups = [list(range(L))] if groups is None else [list(g) for g in groups]
    for g in groups:
        if not g:
            continue
        dev = inputs[g[0]].device
        if ops.has_abs_kth_per_tensor(dev):
            sub = [inputs[t * L + l].detach() for t in range(T) for l in g]
            sub_base = [base[l].detach() for l in g] if base else None
            keys = dare_keys[:, g].contiguous().to(dev) if dare_keys is not None else None
            result[:, g] = ops.abs_kth_per_tensor(sub, sub_base, T, k[:, g].contiguous().to(dev), dare_p, keys,
                                                  dare_rescale).cpu()
            continue
        for l in g:
            if sizes[l] == 0:
                continue
            sub = [inputs[t * L + l] for t in range(T)]
            sub_base = [base[l]] if base else None
            keys = dare_keys[:, [l]].contiguous() if dare_keys is not None else None
            result[:, l] = kth_smallest_abs(sub, sub_base, T, k[:, l].tolist(), dare_p=dare_p, dare_keys=keys,
                                            dare_rescale=dare_rescale)
    return result


def bracket_bounds(samples: Sequence[Tensor], ks: Sequence[int], n: int, todo: Tensor):
    """[lo, hi] per task around the k-th of n values, from sorted samples: the sample quantiles at
    q ± (4 standard errors + 2/m), so the k-th value lies inside with overwhelming probability for a
    representative sample (and the select stays exact when it does not).  Returns (lo, hi, width) with
    width = the largest predicted fraction of elements strictly inside."""
    T = len(samples)
    lo = torch.zeros(T, dtype=torch.float32)
    hi = torch.full((T,), float("inf"), dtype=torch.float32)
    width = 0.0
    for t in range(T):
        m = samples[t].numel()
        if not bool(todo[t]) or m == 0:
            continue
        q = float(ks[t]) / n
        delta = 4.0 * math.sqrt(max(q * (1.0 - q), 1.0 / m) / m) + 2.0 / m
        width = max(width, 2 * delta)
        lo_rank, hi_rank = math.floor((q - delta) * m), math.ceil((q + delta) * m)
        if lo_rank >= 0:
            lo[t] = samples[t][lo_rank]
        if hi_rank < m:
            hi[t] = samples[t][hi_rank]
    return lo, hi, width


def _kth_key(pool: Tensor, rank: int) -> float:
    """The rank-th (1-indexed) smallest of non-negative fp32 magnitudes, ordered by their bit patterns
    (the selection's key order, which also orders NaN payloads): NumPy's introselect on an int32 view,
    ~10x faster than ``torch.kthvalue`` on a ~1M-element pool."""
    import numpy as np

    keys = pool.detach().cpu().contiguous().numpy().view(np.int32)
    return float(np.partition(keys, rank - 1)[rank - 1:rank].view(np.float32)[0])


def resolve_bracket(counts: Tensor, candidates: Sequence[Optional[Tensor]], ks: Sequence[int], todo: Tensor,
                    lo: Tensor, hi: Tensor, result: Tensor) -> Tensor:
    """Pin each task's k-th |tau| from the abs_bracket counts; writes ``result`` and returns the mask of
    tasks still unresolved (k-th outside [lo, hi], or inside with an incomplete candidate set: pass
    ``None`` as a task's candidates when some were dropped)."""
    still = todo.clone()
    for t in range(len(ks)):
        if not bool(todo[t]):
            continue
        below, at_lo, inside, at_hi = (int(v) for v in counts[t])
        k = int(ks[t])
        if below < k <= below + at_lo:
            result[t], still[t] = lo[t], False
        elif below + at_lo < k <= below + at_lo + inside:
            pool = candidates[t]
            if pool is not None and pool.numel() == inside:  # the full set: select exactly among it
                result[t] = _kth_key(pool, k - below - at_lo)
                still[t] = False
        elif below + at_lo + inside < k <= below + at_lo + inside + at_hi:
            result[t], still[t] = hi[t], False
    return still


def _bracket_select(inputs, base, T, L, n, k, todo, groups, dare_p, dare_keys, dare_rescale, result):
    samples = _strided_sample(inputs, base, T, L, n, dare_p, dare_keys, dare_rescale)
    lo, hi, width = bracket_bounds(samples, k.tolist(), n, todo)
    capacity = min(n, int(2 * width * n) + 4096)
    dev = inputs[0].device
    counts = torch.zeros(T, 4, dtype=torch.int64)
    cands: List[List[Tensor]] = [[] for _ in range(T)]
    for g in groups:
        sub = [inputs[t * L + l] for t in range(T) for l in g]
        sub_base = [base[l] for l in g] if base else None
        keys = dare_keys[:, g].contiguous().to(dev) if dare_keys is not None else None
        c, cand = ops.abs_bracket(sub, sub_base, T, lo.to(dev), hi.to(dev), capacity, dare_p, keys, dare_rescale)
        c, cand = c.cpu(), cand.cpu()
        for t in range(T):
            cands[t].append(cand[t, :min(int(c[t, 2]), capacity)])
        counts += c
    pools = [c[0] if len(c) == 1 else torch.cat(c) if c else torch.zeros(0) for c in cands]
    return result, resolve_bracket(counts, pools, k.tolist(), todo, lo, hi, result)


def topk_fraction_to_k(n: int, density: float) -> int:
    """P1 rank: the threshold is the ``(n - floor(density * n))``-th smallest |x|.

    ``density`` in (0, 1]; density == 1 gives k = 0 (no trim).  The kept set is every |x| >= threshold:
    at least ``floor(density * n) + 1`` entries, more with ties.
    """
    import math

    if not (0.0 < density <= 1.0):
        raise ValueError(f"density must be in (0, 1], got {density}")
    return n - math.floor(density * n)


#: rank returned by :func:`exact_k_rank` when nothing is kept (``floor(density * n) == 0``)
KEEP_NONE_RANK = -1


def exact_k_rank(n: int, density: float) -> int:
    """Per-tensor rank of PEFT's ``magnitude_prune`` / mergekit's ``magnitude``: keep exactly
    ``k = floor(density * n)`` entries, so the threshold is the k-th *largest* |x|, i.e. the
    ``(n - k + 1)``-th smallest (one more than :func:`topk_fraction_to_k`, which keeps ``k + 1``).

    Returns 0 for density >= 1 (no trim: threshold 0) and :data:`KEEP_NONE_RANK` when ``k == 0`` (PEFT's
    ``topk(k=0)`` keeps nothing; the caller sets the threshold to +inf).  Without exact ties at the
    k-th largest magnitude the kept set is exactly the top k, as ``torch.topk`` / ``torch.argsort`` give
    it; with ties there, every tied entry is kept (those libraries keep k of them, chosen by the
    internal order of their sort, which torch does not specify and which changes with size, device
    and build).
    """
    import math

    if not (0.0 < density <= 1.0):
        raise ValueError(f"density must be in (0, 1], got {density}")
    if density >= 1.0:
        return 0
    k = math.floor(density * n)
    return KEEP_NONE_RANK if k == 0 else n - k + 1


def strict_topk_to_k(n: int, fraction: float) -> int:
    """P2 rank (CALM / Localize-and-Stitch): ``k = int(fraction * n)`` largest; the threshold is the
    k-th largest = ``(n - k + 1)``-th smallest |x| and the kept set is ``|x| > threshold`` (ties dropped:
    at most k - 1 entries).  Returns the k-th-smallest rank, or 0 when k == 0 (keep nothing)."""
    if not (0.0 <= fraction <= 1.0):
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    k = int(fraction * n)
    return 0 if k == 0 else n - k + 1
