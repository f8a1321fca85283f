"""Merging one loaded group with the fused ops, and the TIES sign patch of exactly cancelled elements."""
from __future__ import annotations

import time
from typing import List, Optional

import torch

from .. import ops
from .plan import Piece
from .reader import _Loaded

Tensor = torch.Tensor


class MergeStepMixin:
    """Group merging and patching of :class:`calm_fast.streaming.engine._Engine`."""

    def _merge_group(self, loaded: _Loaded, thr: Optional[Tensor], zero_sign: int, record: bool) -> None:
        p = self.plan.params
        T = self.T
        inputs, base = loaded.inputs(), loaded.base
        out_float = self._out_float(loaded)
        t0 = time.perf_counter()
        if self.method == "task_arithmetic" or (self.method == "dare_merging" and p["combine"] == "task_arithmetic"):
            out, bad = ops.weighted_merge(inputs, base, T, self._table(self.weights, loaded.pieces),
                                          scale=float(p["scaling"]), dare_p=self.dare_p,
                                          dare_keys=self._dare_keys(loaded.pieces), dare_rescale=self.rescale,
                                          out_float=out_float)
            self.timer.add("merge", time.perf_counter() - t0)
            self._check_nonfinite(bad, loaded)
            self._emit(loaded, out)
            return
        if self.method in ("ties_merging", "dare_merging"):
            res = ops.ties_merge(inputs, base, T, thr, merge=p["merge"], scale=float(p["scaling"]),
                                 weights=self._table(self.weights, loaded.pieces), zero_sign=zero_sign,
                                 dare_p=self.dare_p, dare_keys=self._dare_keys(loaded.pieces),
                                 dare_rescale=self.rescale, out_float=out_float,
                                 max_positions=max(0, self.position_budget) if record else 0)
            self.timer.add("merge", time.perf_counter() - t0)
            outputs, sign_sums, positions, patch, cancel, bad = res
            self._check_nonfinite(bad, loaded)
            if record:
                self._record(loaded, sign_sums, positions, patch, cancel, [o.dtype for o in outputs])
            self._emit(loaded, outputs)
            return
        # consensus
        lam = torch.as_tensor(p["tall_lambdas"], dtype=torch.float32).reshape(-1)
        lam = lam.expand(T).contiguous() if lam.numel() == 1 else lam
        given = None
        if p["mtl"] == "ties":
            res = ops.ties_merge(inputs, base, T, thr, merge=p["ties_merge"], scale=1.0, weights=1.0,
                                 zero_sign=zero_sign, out_float=False if loaded.dtype == torch.float32 else True,
                                 max_positions=max(0, self.position_budget) if record else 0)
            tm, sign_sums, positions, patch, cancel, bad = res
            self._check_nonfinite(bad, loaded)
            given = [(o - b.float()).contiguous() for o, b in zip(tm, base)]
        out, _, bad = ops.consensus_merge(inputs, base, T, lam, mtl=given, min_count=int(p["min_count"]),
                                          alpha=float(p["alpha"]), return_masks=False, out_float=out_float)
        self.timer.add("merge", time.perf_counter() - t0)
        self._check_nonfinite(bad, loaded)
        if p["mtl"] == "ties" and record:
            # alternatives of the consensus output at the cancelled positions, for every zero sign
            alt = self._consensus_alternatives(loaded, positions, patch, lam, out_float)
            self._record(loaded, sign_sums, positions, alt, cancel, [o.dtype for o in out])
        self._emit(loaded, out)

    def _consensus_alternatives(self, loaded: _Loaded, positions: Tensor, patch: Tensor, lam: Tensor,
                                out_float: bool) -> Tensor:
        """[P, 3] consensus outputs at the cancelled positions for zero signs +1, -1, 0 (elementwise, so
        computing them on the gathered elements gives exactly what a full pass would)."""
        P = positions.numel()
        if P == 0:
            return patch
        p = self.plan.params
        flat_in = [torch.cat([x.reshape(-1) for x in per]) for per in loaded.models]
        flat_b = torch.cat([b.reshape(-1) for b in loaded.base])
        pos = positions.to(flat_b.device)
        g_in = [x[pos].contiguous() for x in flat_in]
        g_b = flat_b[pos].contiguous()
        cols = []
        for c in range(3):
            mtl = (patch[:, c].to(torch.float32) - g_b.float()).contiguous()
            o, _, _ = ops.consensus_merge(g_in, [g_b], self.T, lam, mtl=[mtl], min_count=int(p["min_count"]),
                                          alpha=float(p["alpha"]), return_masks=False, out_float=True)
            cols.append(o[0].float())
        del flat_in, flat_b
        return torch.stack(cols, dim=1)

    def _record(self, loaded: _Loaded, sign_sums: Tensor, positions: Tensor, patch: Tensor, cancel: Tensor,
                out_dtypes: List[torch.dtype]) -> None:
        self.sign_total += int(sign_sums.sum())
        n_cancel = int(cancel.sum())
        if n_cancel == 0:
            return
        if n_cancel > positions.numel():
            self.overflow_groups.append(loaded.pieces)
            self.position_budget = 0
            return
        self.position_budget -= positions.numel()
        self.records.append((loaded.pieces, positions.cpu(), patch.cpu(), out_dtypes))

    def _apply_patch(self, pieces: List[Piece], positions: Tensor, values: Tensor, mu: int,
                     out_dtypes: List[torch.dtype]) -> None:
        # bookkeeping in numpy: tiny torch ops pay intra-op thread-pool overheads that dominate here
        import numpy as np

        column = {1: 0, -1: 1, 0: 2}[mu]
        numels = np.array([p.numel for p in pieces], dtype=np.int64)
        ends = np.cumsum(numels)
        starts = ends - numels
        pos = positions.numpy()
        which = np.searchsorted(ends, pos, side="right")
        order = np.argsort(which, kind="stable")
        which_sorted = which[order]
        bounds = np.searchsorted(which_sorted, np.arange(len(pieces) + 1), side="left")
        vals = values[:, column].contiguous()
        for j in range(len(pieces)):
            a, b = int(bounds[j]), int(bounds[j + 1])
            if a == b:
                continue
            sel = torch.from_numpy(order[a:b])
            piece = pieces[j]
            idx = torch.from_numpy(pos[order[a:b]] - starts[j] + piece.start)
            # the same roundings as the in-memory patch: fp32 -> kernel output dtype -> output dtype
            v = vals.index_select(0, sel).to(out_dtypes[j]).to(piece.plan.out_dtype)
            self.sink.patch(piece.plan.name, idx, v)
            self.patched += b - a
