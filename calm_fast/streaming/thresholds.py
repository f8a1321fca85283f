"""The threshold passes of the engine: exact global k-th |tau| per task (sampled bracket, radix fallback),
per-tensor thresholds of split tensors, and the threshold table of one group."""
from __future__ import annotations

import time
from typing import Dict, List, Optional, Tuple

import torch

from .. import ops, selection
from ..io.formats import parse_size
from . import params as P
from .reader import _Loaded

Tensor = torch.Tensor


class ThresholdsMixin:
    """Threshold passes of :class:`calm_fast.streaming.engine._Engine`."""

    def _density(self) -> Tuple[List[float], str]:
        p = self.plan.params
        if self.method == "consensus_merging":
            return [float(p["ties_density"])] * self.T, "global"
        d = p["density"]
        dens = [float(x) for x in d] if isinstance(d, (list, tuple)) else [float(d)] * self.T
        return dens, p.get("mode", "global")

    def _global_thresholds(self, dens: List[float]) -> Tensor:
        """fp32 [T]: each task's exact k-th smallest |tau| over the whole merged model.

        First the one-pass bracket select (as :func:`calm_fast.selection.kth_smallest_abs` does for resident
        tensors): a sample of |tau| read from a few slices of every tensor predicts an interval around the
        k-th value, one ``abs_bracket`` pass counts the elements below / at / inside / at the top of it and
        keeps the ~1% inside, among which the k-th is selected exactly.  Tasks it does not pin (a biased
        sample, or more candidates than half the memory budget) get the two-pass radix count.  Exact
        either way; the sample only decides whether it takes one pass or three."""
        N = self.plan.merged_numel()
        ks = [selection.topk_fraction_to_k(N, d) for d in dens]
        result = torch.full((self.T,), selection.KEEP_ALL, dtype=torch.float32)
        todo = torch.tensor([k > 0 for k in ks], dtype=torch.bool)
        if P.BRACKET_SELECT and bool(todo.any()):
            result, todo = self._bracket_thresholds(ks, N, todo, result)
        if bool(todo.any()):
            radix = self._radix_thresholds([k if bool(todo[t]) else 0 for t, k in enumerate(ks)])
            result = torch.where(todo, radix, result)
        return result

    def _radix_thresholds(self, ks: List[int]) -> Tensor:
        finder = selection.ThresholdFinder(self.T, ks, dare_p=self.dare_p, dare_rescale=self.rescale)

        def add(loaded: _Loaded) -> None:
            t0 = time.perf_counter()
            finder.add(loaded.inputs(), loaded.base, self._dare_keys(loaded.pieces))
            self.timer.add("select", time.perf_counter() - t0)

        self.passes += 1
        self._pass(f"pass {self.passes} thresholds (radix, coarse)", self.groups, add)
        self.comm.sum_(finder.hist)  # histograms and element counts of the whole model (integers: exact)
        self.comm.sum_(finder.count)
        finder.next_level()
        if bool((finder.k > 0).any()):
            self.passes += 1
            self._pass(f"pass {self.passes} thresholds (radix, exact)", self.groups, add)
        self.comm.sum_(finder.hist)
        return finder.thresholds()

    def _sample_abs_tau(self, N: int) -> List[Tensor]:
        """Per task, sorted |tau| (fp32, DARE applied) at about SAMPLE_SIZE positions: a few evenly spaced
        contiguous slices of every merged tensor, in proportion to its size (a handful of small reads)."""
        from ..philox import philox_uniform  # the kernels' Philox stream, on a few indices

        plan, T = self.plan, self.T
        parts: List[List[Tensor]] = [[] for _ in range(T)]
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # thousands of tiny ops: the intra-op pool only adds overhead here
        try:
            for tp in plan.tensors:
                if tp.action != "merge" or tp.numel == 0 or any(a in ("pad", "truncate") for a in tp.adjust):
                    continue
                if self.owned is not None and tp.name not in self.owned:
                    continue  # another rank samples it (the sample of a tensor depends on it and N only)
                n = tp.numel
                s = min(n, max(1, round(P.SAMPLE_SIZE * n / N)))
                runs = min(P.SAMPLE_RUNS, s)
                length = max(1, s // runs)
                starts = sorted({min(n - length, j * n // runs) for j in range(runs)})
                b = torch.cat([plan.base.read(tp.name, a, a + length) for a in starts]).float()
                idx = None
                if self.dare_p > 0:
                    idx = torch.cat([torch.arange(a, a + length, dtype=torch.int64) for a in starts])
                    keys = ops.dare_keys(self.seed, [tp.name], T)
                    scale = (1.0 / (1.0 - self.dare_p) if self.dare_p < 1 else 0.0) if self.rescale else 1.0
                for t, m in enumerate(plan.models):
                    if tp.adjust[t + 1] == "zero":
                        v = torch.zeros_like(b)
                    else:
                        v = torch.cat([m.read(tp.src_keys[t], a, a + length) for a in starts]).float() - b
                    if idx is not None:
                        keep = philox_uniform(idx, int(keys[t, 0])) >= self.dare_p
                        v = torch.where(keep, v * torch.tensor(scale, dtype=torch.float32), torch.zeros_like(v))
                    parts[t].append(v.abs())
            # every rank's share (sorted: the order of the parts does not matter)
            parts = [[self.comm.gather_cat(torch.cat(p) if p else torch.zeros(0))] for p in parts]
            return [torch.sort(torch.cat(p)).values if p else torch.zeros(0) for p in parts]
        finally:
            torch.set_num_threads(threads)

    def _bracket_thresholds(self, ks: List[int], N: int, todo: Tensor, result: Tensor) -> Tuple[Tensor, Tensor]:
        t0 = time.perf_counter()
        samples = self._sample_abs_tau(N)
        lo, hi, width = selection.bracket_bounds(samples, ks, N, todo)
        self.timer.add("select", time.perf_counter() - t0)
        counts = torch.zeros(self.T, 4, dtype=torch.int64)
        cands: List[List[Tensor]] = [[] for _ in range(self.T)]
        kept = [0] * self.T
        lost = [False] * self.T
        cap_bytes = parse_size(P.BRACKET_CANDIDATE_BYTES) if P.BRACKET_CANDIDATE_BYTES is not None else \
            max(self.plan.group_budget, 1 << 20)
        cap_total = cap_bytes // 4  # fp32 candidates kept, all tasks together

        def bracket(loaded: _Loaded) -> None:
            t1 = time.perf_counter()
            n_g = sum(p.numel for p in loaded.pieces)
            capacity = min(n_g, int(2 * width * n_g) + 4096)
            ins = loaded.inputs()
            dev = ins[0].device if ins else lo.device
            keys = self._dare_keys(loaded.pieces)
            c, cand = ops.abs_bracket(ins, loaded.base, self.T, lo.to(dev), hi.to(dev), capacity, self.dare_p,
                                      keys.to(dev) if keys is not None else None, self.rescale)
            c, cand = c.cpu(), cand.cpu()  # counts and candidates are small: resolve on the host
            counts.add_(c)
            for t in range(self.T):
                inside = int(c[t, 2])
                if lost[t] or inside == 0:
                    continue
                if inside > capacity or sum(kept) + inside > cap_total:
                    lost[t] = True  # this task's candidates are incomplete: it falls back to the radix count
                    kept[t] = 0
                    cands[t] = []
                    continue
                cands[t].append(cand[t, :inside].clone())
                kept[t] += inside
            self.timer.add("select", time.perf_counter() - t1)

        self.passes += 1
        self._pass(f"pass {self.passes} thresholds (bracket)", self.groups, bracket)
        t2 = time.perf_counter()
        # the whole model's counts and candidates: counts summed, candidates gathered (the k-th of a set does
        # not depend on its order); a task is lost if any rank lost it
        self.comm.sum_(counts)
        lost_any = self.comm.sum_(torch.tensor([int(x) for x in lost], dtype=torch.int64))
        lost = [bool(x) for x in lost_any.tolist()]
        if self.comm.active and sum(int(counts[t, 2]) for t in range(self.T) if not lost[t]) > cap_total:
            lost = [True] * self.T  # the gathered candidates would not fit the cap: every rank takes the radix passes
        pools = [None if lost[t] else self.comm.gather_cat(torch.cat(cands[t]) if cands[t] else torch.zeros(0))
                 for t in range(self.T)]
        still = selection.resolve_bracket(counts, pools, ks, todo, lo, hi, result)
        self.timer.add("select", time.perf_counter() - t2)
        self.bracket_fallbacks = int(still.sum())
        return result, still

    def _per_tensor_thresholds_split(self, dens: List[float]) -> Dict[str, Tensor]:
        """Per-tensor thresholds of the tensors that are processed in slices (two passes over just them)."""
        split = {}
        for g in self.groups:
            for p in g:
                if not p.whole:
                    split.setdefault(p.plan.name, []).append(p)
        if not split or all(d >= 1.0 for d in dens):
            return {}
        finders, keep_none = {}, {}
        for name, pieces in split.items():
            n = pieces[0].plan.numel
            ranks = [selection.exact_k_rank(n, d) for d in dens]  # PEFT/mergekit: exactly floor(d*n) kept
            keep_none[name] = [t for t, r in enumerate(ranks) if r == selection.KEEP_NONE_RANK]
            finders[name] = selection.ThresholdFinder(self.T, [n if r == selection.KEEP_NONE_RANK else r for r in ranks],
                                                      dare_p=self.dare_p, dare_rescale=self.rescale)
        groups = [[p] for pieces in split.values() for p in pieces]

        def add(loaded: _Loaded) -> None:
            t0 = time.perf_counter()
            p = loaded.pieces[0]
            finders[p.plan.name].add(loaded.inputs(), loaded.base, self._dare_keys(loaded.pieces))
            self.timer.add("select", time.perf_counter() - t0)

        self._pass("per-tensor thresholds of split tensors (coarse)", groups, add)
        for f in finders.values():
            f.next_level()
        self._pass("per-tensor thresholds of split tensors (exact)", groups, add)
        out = {}
        for name, f in finders.items():
            thr = f.thresholds().clone()
            thr[keep_none[name]] = float("inf")  # k == 0: nothing kept
            out[name] = thr
        return out

    def _thresholds_for(self, loaded: _Loaded, dens: List[float], mode: str, global_thr: Optional[Tensor],
                        split_thr: Dict[str, Tensor]) -> Tensor:
        L = len(loaded.pieces)
        if all(d >= 1.0 for d in dens):
            return torch.zeros(self.T, L)
        if mode == "global":
            return global_thr[:, None].expand(self.T, L).contiguous()
        t0 = time.perf_counter()
        table = torch.zeros(self.T, L)
        dk = self._dare_keys(loaded.pieces)
        for j, piece in enumerate(loaded.pieces):
            if piece.plan.name in split_thr:
                table[:, j] = split_thr[piece.plan.name]
                continue
            n = piece.numel
            if n == 0:
                continue
            ranks = [selection.exact_k_rank(n, d) for d in dens]  # PEFT/mergekit: exactly floor(d*n) kept
            ks = [n if r == selection.KEEP_NONE_RANK else r for r in ranks]
            sub = [loaded.models[t][j] for t in range(self.T)]
            table[:, j] = selection.kth_smallest_abs(sub, [loaded.base[j]], self.T, ks, dare_p=self.dare_p,
                                                     dare_keys=dk[:, [j]].contiguous() if dk is not None else None,
                                                     dare_rescale=self.rescale, method=P.PER_TENSOR_SELECT)
            for t, r in enumerate(ranks):
                if r == selection.KEEP_NONE_RANK:
                    table[t, j] = float("inf")  # k == 0: nothing kept
        self.timer.add("select", time.perf_counter() - t0)
        return table
