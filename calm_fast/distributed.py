"""torch.distributed plumbing shared by the distributed streaming merge and the data-parallel trainers.

calm_fast does not run its own cluster engine: it runs on ``torch.distributed`` (gloo on CPU, NCCL on GPU),
launched the usual way with ``torchrun``.  This module holds the few pieces every distributed code path
needs, so that each of them reads the same way:

* :func:`init_from_env` joins the process group that ``torchrun`` describes in the environment (``RANK``,
  ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) with a bounded timeout, so a rank that dies makes the
  others fail with an error instead of hanging forever;
* :func:`rank` / :func:`world_size` / :func:`is_distributed` answer as one process (0 / 1 / False) when no
  process group exists, so the same code runs with and without ``torchrun``;
* :func:`all_reduce_flat_` sums a list of tensors across ranks with ONE collective (the tensors are packed
  into a flat buffer), the pattern the data-parallel mask/coefficient training uses once per iteration;
* :func:`all_gather_tensor` gathers one 1-D tensor per rank (lengths may differ), exactly, in rank order;
* :class:`DistributedError` is what every distributed code path raises when a rank fails or a collective
  times out: the CLI maps it to exit code 7 on every rank;
* :func:`assign_by_cost` is the deterministic byte-balanced assignment of work items (tensors, layers) to
  ranks: every rank computes the same assignment from the same inputs, without communicating.
"""
from __future__ import annotations

import datetime
import os
from typing import Any, Callable, List, Optional, Sequence

import torch
import torch.distributed as dist

#: how long a collective waits for the other ranks before failing (seconds); ``CALM_FAST_DIST_TIMEOUT``
#: overrides it.  Long enough for a slow rank to read a large tensor, short enough that a killed rank
#: turns into an error on the others within minutes.
DEFAULT_TIMEOUT_S = 600.0

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(RuntimeError):
    """A distributed run aborted: a rank failed, was killed, or a collective timed out.

    Raised on every surviving rank with a message naming the cause where it is known; the command line
    exits with code 7 for it.  Nothing finished-looking is published when it is raised.
    """

    exit_code = 7


def launched_by_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` (or another launcher that sets the same variables)."""
    return all(v in os.environ for v in _TORCHRUN_VARS)


def is_distributed() -> bool:
    """Whether a process group with more than one rank is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of ranks (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def timeout_seconds() -> float:
    """The collective timeout: ``$CALM_FAST_DIST_TIMEOUT`` seconds if set, else :data:`DEFAULT_TIMEOUT_S`."""
    raw = os.environ.get("CALM_FAST_DIST_TIMEOUT", "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"CALM_FAST_DIST_TIMEOUT must be a number of seconds, got {raw!r}") from None
    if not value > 0:
        raise ValueError(f"CALM_FAST_DIST_TIMEOUT must be positive, got {raw!r}")
    return value


def default_backend() -> str:
    """``nccl`` when this process sees a CUDA device and NCCL is built in, else ``gloo``."""
    if torch.cuda.is_available() and dist.is_nccl_available():
        return "nccl"
    return "gloo"


def init_from_env(backend: Optional[str] = None, timeout_s: Optional[float] = None) -> bool:
    """Join the process group described by the ``torchrun`` environment.

    Returns True when a process group is active afterwards (it was already initialised, or this call
    created it), False when the process was not launched by ``torchrun`` (single-process run).  With NCCL,
    each rank uses the GPU ``LOCAL_RANK``.

    Raises:
        RuntimeError: torch was built without ``torch.distributed``.
    """
    if dist.is_available() and dist.is_initialized():
        return True
    if not launched_by_torchrun():
        return False
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed; run the merge in one process")
    backend = backend or default_backend()
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = datetime.timedelta(seconds=timeout_s if timeout_s is not None else timeout_seconds())
    dist.init_process_group(backend=backend, timeout=timeout)
    return True


def leave() -> None:
    """Leave the process group (best effort, no-op without one).  After a failure on this rank, its
    connections close, so the other ranks' pending collectives fail at once instead of at the timeout."""
    try:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - a broken group is left to the process exit
        pass


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if is_distributed():
        dist.barrier()


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` in place across ranks and return it (no-op in one process).

    Integer sums are exact in any order; floating-point sums depend on the backend's reduction order (gloo
    and NCCL each use a fixed order for a fixed world size, so a rerun is reproducible).
    """
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_flat_(tensors: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
    """Sum every tensor of ``tensors`` in place across ranks with a single collective.

    The tensors (all of one dtype and device) are packed into one flat buffer, reduced once, and copied
    back: one latency per call instead of one per tensor.  No-op in one process.
    """
    if not is_distributed() or not tensors:
        return tensors
    dtypes = {t.dtype for t in tensors}
    devices = {t.device for t in tensors}
    if len(dtypes) != 1 or len(devices) != 1:
        raise ValueError(f"all_reduce_flat_ needs one dtype and one device, got {sorted(map(str, dtypes))} "
                         f"on {sorted(map(str, devices))}")
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n
    return tensors


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` as rank ``src`` holds it, on every rank (returns ``obj`` itself in one process)."""
    if not is_distributed():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> List[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` in one process)."""
    if not is_distributed():
        return [obj]
    out: List[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_gather_tensor(tensor: torch.Tensor) -> List[torch.Tensor]:
    """Every rank's 1-D ``tensor``, in rank order; lengths may differ between ranks (``[tensor]`` in one
    process).  Exact: the values are copied, not reduced.  All ranks must pass one dtype and device."""
    if tensor.dim() != 1:
        raise ValueError(f"all_gather_tensor takes a 1-D tensor, got shape {tuple(tensor.shape)}")
    if not is_distributed():
        return [tensor]
    n = world_size()
    sizes = torch.tensor([tensor.numel()], dtype=torch.int64, device=tensor.device)
    all_sizes = [torch.empty_like(sizes) for _ in range(n)]
    dist.all_gather(all_sizes, sizes)
    lengths = [int(s.item()) for s in all_sizes]
    longest = max(lengths)
    padded = torch.zeros(longest, dtype=tensor.dtype, device=tensor.device)
    padded[:tensor.numel()] = tensor
    out = [torch.empty_like(padded) for _ in range(n)]
    dist.all_gather(out, padded)
    return [o[:m] for o, m in zip(out, lengths)]


def guarded(what: str, fn: Callable, *args: Any) -> Any:
    """``fn(*args)`` for a collective: a failure of the group (a rank died or left, a timeout; gloo and NCCL
    report these as ``RuntimeError``) becomes :class:`DistributedError` naming ``what``."""
    try:
        return fn(*args)
    except DistributedError:
        raise
    except (RuntimeError, ValueError) as e:
        raise DistributedError(f"rank {rank()}: {what} failed (another rank failed or timed out): "
                               f"{type(e).__name__}: {e}") from e


def assign_by_cost(costs: Sequence[int], n_ranks: int) -> List[int]:
    """The rank of each work item, balancing the summed cost per rank; deterministic.

    Greedy longest-processing-time: items in decreasing cost (ties: lower index first) go to the rank with
    the smallest load so far (ties: lower rank).  The result depends only on ``costs`` and ``n_ranks``, so
    every rank computes the same assignment without communicating; the largest rank load is at most 4/3 of
    the optimum plus one item.  With more ranks than items, some ranks get nothing.
    """
    if n_ranks < 1:
        raise ValueError(f"n_ranks must be >= 1, got {n_ranks}")
    if any(c < 0 for c in costs):
        raise ValueError("costs must be non-negative")
    loads = [0] * n_ranks
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(n_ranks), key=lambda r: (loads[r], r))
        owner[i] = r
        loads[r] += costs[i]
    return owner
