"""Reading groups of pieces: ``pread`` into reused buffers, the next group prefetched in a background thread."""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import List, Optional

import torch

from ..io.formats import Checkpoint, element_size
from .plan import MergePlan, Piece, TensorPlan

Tensor = torch.Tensor


class _Arena:
    """A reusable byte buffer carved into aligned slices (so repeated reads do not fault in new pages)."""

    def __init__(self):
        self.buf: Optional[Tensor] = None
        self.pos = 0

    def reset(self, need: int) -> None:
        if self.buf is None or self.buf.numel() < need:
            self.buf = None
            self.buf = torch.empty(max(need, 1), dtype=torch.uint8)
        self.pos = 0

    def take(self, nbytes: int) -> Optional[Tensor]:
        if self.buf is None or self.pos + nbytes > self.buf.numel():
            return None
        out = self.buf[self.pos:self.pos + nbytes]
        self.pos += (nbytes + 63) // 64 * 64
        return out


@dataclass
class _Loaded:
    pieces: List[Piece]
    base: List[Tensor]
    models: List[List[Tensor]]  # [t][piece]
    dtype: torch.dtype
    bytes_read: int
    seconds: float

    def inputs(self) -> List[Tensor]:
        return [x for per_model in self.models for x in per_model]


class _Reader:
    def __init__(self, plan: MergePlan, device=None):
        self.plan = plan
        self.device = torch.device(device) if device is not None else None
        self.arenas = [_Arena(), _Arena()]

    def _read(self, ck: Checkpoint, key: str, piece: Piece, arena: _Arena) -> Tensor:
        info = ck.info(key)
        nbytes = piece.numel * element_size(info.dtype)
        return ck.read(key, piece.start, piece.stop, out=arena.take(nbytes))

    def _adjusted(self, ck: Checkpoint, key: str, how: str, t: TensorPlan, base_full: Optional[Tensor]) -> Tensor:
        x = ck.read(key)
        if how == "truncate":
            return x[tuple(slice(0, s) for s in t.shape)].contiguous()
        # pad: new entries come from the (padded) base for models, zeros for the base
        out = base_full.clone() if base_full is not None else torch.zeros(t.shape, dtype=x.dtype)
        out = out.to(x.dtype)
        out[tuple(slice(0, s) for s in x.shape)] = x
        return out

    def _arena_bytes(self, pieces: List[Piece], base_only: bool) -> int:
        plan = self.plan
        need = 0
        for piece in pieces:
            t = piece.plan
            if base_only or t.adjust[0] is None:
                need += (piece.numel * element_size(plan.base.info(t.name).dtype) + 63) // 64 * 64
            if base_only:
                continue
            for i, m in enumerate(plan.models):
                if t.adjust[i + 1] is None:
                    need += (piece.numel * element_size(m.info(t.src_keys[i]).dtype) + 63) // 64 * 64
        return need

    def load(self, pieces: List[Piece], arena: _Arena, base_only: bool = False) -> _Loaded:
        t0 = time.perf_counter()
        plan = self.plan
        arena.reset(self._arena_bytes(pieces, base_only))
        base_list: List[Tensor] = []
        models: List[List[Tensor]] = [[] for _ in range(0 if base_only else plan.T)]
        nread = 0
        dtype = pieces[0].plan.base_dtype if base_only else pieces[0].plan.compute_dtype
        for piece in pieces:
            t = piece.plan
            if base_only or t.adjust[0] is None:
                b = self._read(plan.base, t.name, piece, arena)
                nread += b.numel() * b.element_size()
            else:
                bfull = self._adjusted(plan.base, t.name, t.adjust[0], t, None)
                nread += plan.base.info(t.name).nbytes
                b = bfull.reshape(-1)[piece.start:piece.stop]
            base_list.append(b)
            if base_only:
                continue
            base_full_shaped = b.reshape(t.shape) if piece.whole else None
            for i, m in enumerate(plan.models):
                how = t.adjust[i + 1]
                if how == "zero":
                    x = b
                elif how is None:
                    x = self._read(m, t.src_keys[i], piece, arena)
                    nread += x.numel() * x.element_size()
                else:
                    x = self._adjusted(m, t.src_keys[i], how, t, base_full_shaped).reshape(-1)[piece.start:piece.stop]
                    nread += m.info(t.src_keys[i]).nbytes
                models[i].append(x)
        if not base_only:
            def conv(x: Tensor) -> Tensor:
                x = x if x.dtype == dtype else x.to(dtype)
                x = x.reshape(-1)
                return x if self.device is None else x.to(self.device, non_blocking=True)
            base_list = [conv(x) for x in base_list]
            models = [[conv(x) for x in per] for per in models]
        return _Loaded(pieces, base_list, models, dtype, nread, time.perf_counter() - t0)


class _Pipeline:
    """Iterate over loaded groups, prefetching the next one in a background thread (two arenas)."""

    def __init__(self, reader: _Reader, groups: List[List[Piece]], prefetch: bool, base_only: bool = False):
        self.reader, self.groups, self.prefetch, self.base_only = reader, groups, prefetch, base_only

    def __iter__(self):
        arenas = self.reader.arenas  # reused across passes: their pages are faulted in once
        if not self.prefetch:
            for g in self.groups:
                yield self.reader.load(g, arenas[0], self.base_only)
            return
        with ThreadPoolExecutor(1, thread_name_prefix="calm-fast-read") as ex:
            fut: Optional[Future] = None
            for i, g in enumerate(self.groups):
                if fut is None:
                    fut = ex.submit(self.reader.load, g, arenas[i % 2], self.base_only)
                loaded = fut.result()
                fut = None
                if i + 1 < len(self.groups):
                    fut = ex.submit(self.reader.load, self.groups[i + 1], arenas[(i + 1) % 2], self.base_only)
                try:
                    yield loaded
                finally:
                    del loaded
            if fut is not None:
                fut.result()
