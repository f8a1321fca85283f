"""Run-time helpers of the engine: what a run did (StreamResult), the phase timer, the background writer,
the progress bars."""
from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from ..io.formats import format_bytes
from ..io.writer import OutputSink
from .plan import MergePlan

Tensor = torch.Tensor


@dataclass
class StreamResult:
    """What :func:`merge_checkpoints` did."""

    plan: MergePlan
    paths: List[str] = field(default_factory=list)
    state_dict: Optional[Dict[str, Tensor]] = None
    timings: Dict[str, float] = field(default_factory=dict)
    bytes_read: int = 0
    bytes_written: int = 0
    passes: int = 0
    patched: int = 0                 # cancelled elements patched after the merge pass (TIES, μ != +1)
    remerged: int = 0                # groups merged again because they held too many cancellations
    bracket_fallbacks: int = 0       # tasks whose global threshold needed the radix passes
    zero_sign: Optional[int] = None
    dry_run: bool = False
    rank: int = 0                    # distributed merge: this process's rank, the number of ranks, every
    world_size: int = 1              # rank's share (tensors, bytes, memory) and bytes read per rank
    rank_plans: List[Dict] = field(default_factory=list)
    rank_bytes_read: List[int] = field(default_factory=list)

    @property
    def report(self) -> List[str]:
        return self.plan.report

    def summary(self) -> str:
        t = self.timings
        total = t.get("total", 0.0)
        parts = [f"{k} {t[k]:.2f}s" for k in ("read", "select", "merge", "write", "patch") if k in t]
        rate = self.bytes_read / total / 1e9 if total > 0 else float("nan")
        return (f"{self.plan.method}: {len(self.plan.out_specs)} tensors, {self.passes} pass(es), "
                f"read {format_bytes(self.bytes_read)}, wrote {format_bytes(self.bytes_written)}, "
                f"total {total:.2f}s ({rate:.2f} GB/s read) | " + ", ".join(parts))


class _Timer:
    def __init__(self):
        self.t: Dict[str, float] = {}
        self._lock = threading.Lock()

    def add(self, k: str, dt: float) -> None:
        with self._lock:
            self.t[k] = self.t.get(k, 0.0) + dt


class _AsyncWriter:
    """Writes finished groups from a background thread (``pwrite`` releases the GIL), at most
    ``max_pending`` groups behind the merge; errors surface at the next call."""

    def __init__(self, sink: OutputSink, timer: _Timer, max_pending: int = 2, enabled: bool = True):
        import queue

        self.sink, self.timer, self.enabled = sink, timer, enabled
        self.err: Optional[BaseException] = None
        if enabled:
            self.q: "queue.Queue" = queue.Queue(maxsize=max_pending)
            self.thread = threading.Thread(target=self._run, name="calm-fast-write", daemon=True)
            self.thread.start()

    def _write(self, items) -> None:
        t0 = time.perf_counter()
        for name, tensor, start in items:
            self.sink.write(name, tensor, start)
        self.timer.add("write", time.perf_counter() - t0)

    def _run(self) -> None:
        while True:
            items = self.q.get()
            try:
                if items is None:
                    return
                if self.err is None:
                    self._write(items)
            except BaseException as e:  # noqa: BLE001 - re-raised in the merging thread
                self.err = e
            finally:
                self.q.task_done()

    def _check(self) -> None:
        if self.err is not None:
            err, self.err = self.err, None
            raise err

    def write_group(self, items) -> None:
        if not self.enabled:
            self._write(items)
            return
        self._check()
        self.q.put(items)

    def flush(self) -> None:
        if self.enabled:
            self.q.join()
            self._check()

    def close(self) -> None:
        if self.enabled and self.thread.is_alive():
            self.q.put(None)
            self.thread.join()


class _Progress:
    def __init__(self, enabled: bool, total_bytes: int, desc: str):
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                                dynamic_ncols=True, leave=True, file=sys.stderr)
            except ImportError:  # pragma: no cover
                self.bar = None

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
