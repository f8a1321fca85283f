"""Run a function on N gloo ranks on loopback, bounded in time: the harness of the distributed tests.

``run_ranks(fn, n, *args)`` starts ``n`` fresh processes (spawn, so nothing of the parent's state leaks),
each with the ``torchrun`` environment variables set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR=127.0.0.1,
a free MASTER_PORT), joins them to one gloo process group via :func:`calm_fast.distributed.init_from_env`,
calls ``fn(*args)`` (a module-level function, so it can be pickled) and returns each rank's return value in
rank order.  A rank that raises, exits non-zero or outlives ``timeout`` makes ``run_ranks`` raise
:class:`RanksFailed` (after killing the others), carrying every rank's outcome so a test can assert on the
failure itself.
"""
from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from typing import Any, Callable, Dict, List


class RanksFailed(RuntimeError):
    """At least one rank failed; ``outcomes[r]`` is ``("ok", value)``, ``("error", text)`` or ``("exit", code)``."""

    def __init__(self, message: str, outcomes: Dict[int, Any]):
        super().__init__(message)
        self.outcomes = outcomes


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, n: int, port: int, env: Dict[str, str], fn: Callable, args: tuple, out) -> None:
    os.environ.update(env)
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(n),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # n ranks share this machine's cores
    try:
        from calm_fast.distributed import init_from_env

        init_from_env(backend="gloo")
        value = fn(*args)
        # through torch.save bytes: a tensor put on the queue directly travels as shared memory that can
        # vanish when this process exits before the parent has read it (seen as an intermittent failure)
        buf = io.BytesIO()
        torch.save(value, buf)
        out.put((rank, "ok", buf.getvalue()))
    except BaseException:  # report everything, then exit non-zero
        out.put((rank, "error", traceback.format_exc()))
        raise SystemExit(1)
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


def run_ranks(fn: Callable, n: int, *args: Any, timeout: float = 120.0,
              env: Dict[str, str] | None = None) -> List[Any]:
    """``fn(*args)``'s return value on each of ``n`` gloo ranks, in rank order (see the module docstring)."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    child_env = {"CALM_FAST_DIST_TIMEOUT": str(int(timeout)), "OMP_NUM_THREADS": "1", **(env or {})}
    procs = [ctx.Process(target=_child, args=(r, n, port, child_env, fn, args, out), daemon=True)
             for r in range(n)]
    for p in procs:
        p.start()
    outcomes: Dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    while len(outcomes) < n and time.monotonic() < deadline:
        try:
            r, kind, value = out.get(timeout=0.2)
            outcomes[r] = (kind, value)
        except queue.Empty:
            if all(not p.is_alive() for p in procs) and out.empty():
                break
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()) if len(outcomes) == n else 1.0)
    for r, p in enumerate(procs):
        if p.is_alive():
            p.kill()
            p.join()
            outcomes.setdefault(r, ("exit", "killed after the timeout"))
        elif r not in outcomes:
            outcomes[r] = ("exit", p.exitcode)
    if any(kind != "ok" for kind, _ in outcomes.values()):
        lines = [f"rank {r}: {kind}: {value}" for r, (kind, value) in sorted(outcomes.items()) if kind != "ok"]
        raise RanksFailed("ranks failed:\n" + "\n".join(lines), outcomes)
    import torch

    return [torch.load(io.BytesIO(outcomes[r][1]), weights_only=False) for r in range(n)]
