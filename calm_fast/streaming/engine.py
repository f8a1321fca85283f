"""The engine: runs the passes of a plan over its groups into an output sink."""
from __future__ import annotations

import time
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch

from .. import ops
from ..io.errors import NonFiniteError
from ..io.formats import element_size
from ..io.writer import OutputSink
from . import params as P
from .distributed import LOCAL
from .merge_step import MergeStepMixin
from .params import _uses_ties
from .plan import MergePlan, Piece, _split_by_dtype
from .reader import _Loaded, _Pipeline, _Reader
from .runtime import StreamResult, _AsyncWriter, _Progress, _Timer
from .thresholds import ThresholdsMixin

Tensor = torch.Tensor


class _Engine(ThresholdsMixin, MergeStepMixin):
    """Runs the passes of ``plan`` into ``sink``.

    In a distributed merge each rank runs one engine over its share (``shard``: its groups, copy groups and
    tensor names); ``comm`` sums the global statistics across ranks at the few points where the passes
    need them (threshold counts, bracket candidates, TIES's sign count), so every rank takes the same
    decisions as one process over the whole plan.  Without them: the whole plan, in one process."""

    def __init__(self, plan: MergePlan, sink: OutputSink, timer: _Timer, progress: bool, nonfinite: str, device,
                 async_write: bool = True, shard: Optional[Any] = None, comm: Optional[Any] = None):
        self.plan, self.sink, self.timer = plan, sink, timer
        self.async_write = async_write
        self.progress, self.nonfinite, self.device = progress, nonfinite, device
        self.reader = _Reader(plan, device)
        self.comm = comm if comm is not None else LOCAL
        self.owned = None if shard is None else shard.names
        self.groups = _split_by_dtype(plan.groups if shard is None else shard.groups)
        self.copy_groups = plan.copy_groups if shard is None else shard.copy_groups
        self.passes = 0
        self.bytes_read = 0
        self.patched = 0
        self.remerged = 0
        self.bracket_fallbacks = 0
        self.zero_sign: Optional[int] = None
        p = plan.params
        self.T = plan.T
        self.method = plan.method
        self.seed = int(p.get("seed", 0))
        self.dare_p = float(p["p"]) if plan.method == "dare_merging" else 0.0
        self.rescale = bool(p.get("rescale", True))
        self.ties = _uses_ties(plan.method, p)
        self.weights = plan.weights

    # -- helpers ------------------------------------------------------------------------------------
    def _pass(self, desc: str, groups: List[List[Piece]], fn: Callable[[_Loaded], None], base_only=False) -> None:
        total = sum(p.numel * (element_size(p.plan.base_dtype) if base_only else
                               element_size(p.plan.base_dtype) + sum(
                                   element_size(m.info(k).dtype) if k is not None else 0
                                   for m, k in zip(self.plan.models, p.plan.src_keys)))
                    for g in groups for p in g)
        bar = _Progress(self.progress, total, desc)
        try:
            t_wait = time.perf_counter()
            for loaded in _Pipeline(self.reader, groups, self.plan.prefetch, base_only):
                # time blocked on reading (the background reads overlap the previous group's compute)
                self.timer.add("read", time.perf_counter() - t_wait)
                self.comm.check()  # a failed peer stops this rank at the next group, not at the next collective
                self.bytes_read += loaded.bytes_read
                fn(loaded)
                bar.update(loaded.bytes_read)
                t_wait = time.perf_counter()
        finally:
            bar.close()

    def _table(self, table: Optional[Tensor], pieces: List[Piece], default: float = 1.0) -> Tensor:
        cols = [p.plan.col for p in pieces]
        if table is None:
            return torch.full((self.T, len(pieces)), default, dtype=torch.float32)
        return table[:, cols].contiguous()

    def _dare_keys(self, pieces: List[Piece]) -> Optional[Tensor]:
        if self.dare_p <= 0:
            return None
        return ops.dare_keys(self.seed, [p.plan.name for p in pieces], self.T)

    def _out_float(self, loaded: _Loaded) -> bool:
        # as calm_fast.methods: ask the kernel for fp32 when the final dtype differs from the inputs'
        return any(p.plan.out_dtype != loaded.dtype for p in loaded.pieces)

    def _emit(self, loaded: _Loaded, outputs: Sequence[Tensor]) -> None:
        items = []
        for piece, o in zip(loaded.pieces, outputs):
            want = piece.plan.out_dtype
            if o.dtype != want:
                o = o.to(want)
            items.append((piece.plan.name, o if piece.whole else o.reshape(-1), piece.start))
        self.writer.write_group(items)

    def _check_nonfinite(self, count: int, loaded: _Loaded) -> None:
        if count == 0 or self.nonfinite == "propagate":
            return
        for j, piece in enumerate(loaded.pieces):
            for t in range(self.T):
                if not bool(torch.isfinite(loaded.models[t][j]).all()):
                    raise NonFiniteError(f"{self.method}: model {t} tensor {piece.plan.name!r} contains inf or NaN "
                                         "(pass nonfinite='propagate' / --nonfinite propagate to merge it anyway)")
            if not bool(torch.isfinite(loaded.base[j]).all()):
                raise NonFiniteError(f"{self.method}: base tensor {piece.plan.name!r} contains inf or NaN "
                                     "(pass nonfinite='propagate' / --nonfinite propagate to merge it anyway)")
        names = [p.plan.name for p in loaded.pieces]
        raise NonFiniteError(f"{self.method}: {count} task-vector values are inf or NaN in {names[:5]} (overflow in "
                             "fine-tuned - pretrained?); pass nonfinite='propagate' to merge anyway")

    # -- main -------------------------------------------------------------------------------------------
    def run(self) -> None:
        self.writer = _AsyncWriter(self.sink, self.timer, enabled=self.async_write)
        try:
            self._run()
            self.writer.flush()
        finally:
            self.writer.close()

    def _run(self) -> None:
        global_thr, split_thr = None, {}
        dens, mode = self._density() if self.ties else ([1.0] * self.T, "global")
        if self.ties:
            if mode == "global" and any(d < 1.0 for d in dens):
                global_thr = self._global_thresholds(dens)
            elif mode == "per_tensor":
                split_thr = self._per_tensor_thresholds_split(dens)
        # the merge pass
        self.records: List[Tuple[List[Piece], Tensor, Tensor, Any]] = []
        self.overflow_groups: List[List[Piece]] = []
        self.sign_total = 0
        self.position_budget = P.MAX_RECORDED_POSITIONS
        npass = self.passes + 1
        self.passes += 1

        def merge(loaded: _Loaded) -> None:
            thr = self._thresholds_for(loaded, dens, mode, global_thr, split_thr) if self.ties else None
            self._merge_group(loaded, thr, zero_sign=1, record=True)

        self._pass(f"pass {npass} merge", self.groups, merge)
        # TIES: the global majority sign, and the patch of exactly cancelled elements
        if self.ties:
            if mode == "global":  # the majority sign of the whole model: every rank's count
                self.sign_total = int(self.comm.sum_(torch.tensor([self.sign_total], dtype=torch.int64))[0])
            mu = (self.sign_total > 0) - (self.sign_total < 0) if mode == "global" else 1
            self.zero_sign = mu
            if mu != 1:
                self.writer.flush()  # patches go on top of the written values
                t0 = time.perf_counter()
                for pieces, positions, values, out_dtypes in self.records:
                    self._apply_patch(pieces, positions, values, mu, out_dtypes)
                self.timer.add("patch", time.perf_counter() - t0)
                if self.overflow_groups:
                    self.remerged = len(self.overflow_groups)

                    def remerge(loaded: _Loaded) -> None:
                        thr = self._thresholds_for(loaded, dens, mode, global_thr, split_thr)
                        self._merge_group(loaded, thr, zero_sign=mu, record=False)

                    self._pass("re-merge of groups with many cancellations", self.overflow_groups, remerge)
        # tensors copied from the base
        if self.copy_groups:
            def copy(loaded: _Loaded) -> None:
                # synchronous: the tensors are views of the read buffers, which are reused
                self.writer.flush()
                self.writer._write([(p.plan.name, b.reshape(p.plan.shape) if p.whole else b, p.start)
                                    for p, b in zip(loaded.pieces, loaded.base)])

            self._pass("copy unmerged tensors", self.copy_groups, copy, base_only=True)


def _run_engine(plan: MergePlan, sink: OutputSink, timer: _Timer, result: StreamResult, progress: bool,
                nonfinite: str, device, prefetch: bool, shard: Optional[Any] = None, comm: Optional[Any] = None):
    """Run every pass into ``sink`` and finish it (for a folder: files complete and synced, not yet
    published); returns what the sink's commit returns."""
    with sink:
        engine = _Engine(plan, sink, timer, progress=progress, nonfinite=nonfinite, device=device,
                         async_write=prefetch, shard=shard, comm=comm)
        engine.run()
        t0 = time.perf_counter()
        committed = sink.commit()
        timer.add("write", time.perf_counter() - t0)
    result.passes, result.bytes_read, result.patched, result.zero_sign = (
        engine.passes, engine.bytes_read, engine.patched, engine.zero_sign)
    result.remerged = engine.remerged
    result.bracket_fallbacks = engine.bracket_fallbacks
    result.bytes_written = plan.output_bytes()
    return committed
