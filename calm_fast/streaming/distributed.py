"""The streaming merge on several ``torch.distributed`` ranks: who merges what, and how the ranks agree.

Launched by ``torchrun`` (gloo on CPU, NCCL on GPU); see :func:`calm_fast.streaming.merge_checkpoints`
(``distributed=``) for the flow.  This module holds its pieces:

* :func:`shard_plan`: the deterministic assignment of whole tensors to ranks, balanced by the bytes each
  tensor costs (read in every pass, written once), with :func:`calm_fast.distributed.assign_by_cost`.
  Every rank computes the same assignment from the same plan without communicating; pieces of a tensor
  split by the memory budget stay on one rank, so per-tensor thresholds need no communication.
* :class:`Comm`: the collectives the engine needs (integer sums, exact gathers), a failure flag in the
  process group's key-value store (a rank that fails sets it; the others check it once per group and at
  every collective, so they stop within one group instead of at the collective timeout), and the
  translation of every collective failure into :class:`calm_fast.distributed.DistributedError`.
  :data:`LOCAL` is the one-process version (no communication).
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional

import torch

from .. import distributed as D
from ..io.formats import element_size, format_bytes
from .plan import MergePlan, Piece, _make_groups

Tensor = torch.Tensor

_FLAG_PREFIX = "calm_fast/stream"
#: seconds between two looks at the failure flag during a pass
CHECK_INTERVAL_S = 0.5


@dataclass
class RankShard:
    """What one rank merges: its tensors (whole), cut into groups with the plan's budget."""

    rank: int
    world_size: int
    names: frozenset
    groups: List[List[Piece]]
    copy_groups: List[List[Piece]]
    cost: int = 0
    stats: Dict[str, Any] = field(default_factory=dict)


def tensor_cost(plan: MergePlan, t) -> int:
    """Bytes moved for one tensor: its sources read in every pass and its output written (a copied tensor:
    read once, written once)."""
    if t.action == "copy":
        return 2 * t.numel * element_size(t.base_dtype)
    src = t.src_bytes if t.src_bytes else element_size(t.base_dtype) * (plan.T + 1)
    return t.numel * (src * plan.num_passes + element_size(t.out_dtype))


def shard_plan(plan: MergePlan, world_size: int) -> List[RankShard]:
    """Every rank's share of ``plan`` (a list indexed by rank; deterministic)."""
    costs = [tensor_cost(plan, t) for t in plan.tensors]
    owner = D.assign_by_cost(costs, world_size)
    shards = []
    for r in range(world_size):
        mine = [t for t, o in zip(plan.tensors, owner) if o == r]
        merge = [t for t in mine if t.action == "merge"]
        copy = [t for t in mine if t.action == "copy"]
        groups = _make_groups(merge, plan.T, plan.method, plan.params, plan.group_budget) if merge else []
        copy_groups = _make_groups(copy, 0, "copy", {}, plan.group_budget) if copy else []
        local = replace(plan, groups=groups, copy_groups=copy_groups)
        stats = {"rank": r, "tensors": len(mine), "merged_tensors": len(merge), "copied_tensors": len(copy),
                 "elements": sum(t.numel for t in merge),
                 "read_bytes": local.input_bytes_per_pass() * plan.num_passes + local.copy_bytes(),
                 "write_bytes": sum(t.numel * element_size(t.out_dtype) for t in mine),
                 "memory_bytes": local.memory_estimate() if (groups or copy_groups) else 0}
        shards.append(RankShard(r, world_size, frozenset(t.name for t in mine), groups, copy_groups,
                                sum(c for c, o in zip(costs, owner) if o == r), stats))
    return shards


def describe_shards(rank_stats: List[Dict[str, Any]]) -> str:
    """The per-rank plan (``RankShard.stats`` of every rank, as ``StreamResult.rank_plans`` holds them)."""
    lines = [f"ranks: {len(rank_stats)} (tensors assigned whole, balanced by bytes moved)"]
    for st in rank_stats:
        lines.append(f"  rank {st['rank']}: {st['tensors']} tensors ({st['merged_tensors']} merged, "
                     f"{st['copied_tensors']} copied), reads {format_bytes(st['read_bytes'])}, writes "
                     f"{format_bytes(st['write_bytes'])}, memory estimate {format_bytes(st['memory_bytes'])}")
    return "\n".join(lines)


def plan_fingerprint(plan: MergePlan, settings: Dict[str, Any]) -> str:
    """A digest of everything the ranks must agree on: the method, its parameters, the weight table, every
    output tensor (name, action, shape, dtypes, sources, adjustments), the memory budget and ``settings``
    (the output path, the non-finite policy...).  Equal digests on every rank = the same merge."""
    from .params import _jsonable

    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps([plan.method, _jsonable(plan.params), plan.group_budget, plan.merged_keys,
                         {k: str(v) for k, v in settings.items()}], sort_keys=True, default=str).encode())
    if plan.weights is not None:
        h.update(plan.weights.contiguous().numpy().tobytes())
    for t in plan.tensors:
        h.update(repr((t.name, t.action, tuple(t.shape), str(t.base_dtype), str(t.out_dtype),
                       str(t.compute_dtype), t.col, list(t.src_keys), list(t.adjust))).encode())
    return h.hexdigest()


def check_same_plan(comm: "Comm", plan: MergePlan, settings: Dict[str, Any]) -> None:
    """Every rank's plan digest, compared: ranks called with different arguments (another density, a
    relative path resolved in another folder, a different file) raise :class:`DistributedError` on every
    rank, before anything is read or written, instead of merging a mixture."""
    digests = comm.gather_object(plan_fingerprint(plan, settings), "comparing the ranks' merge plans")
    if len(set(digests)) > 1:
        groups: Dict[str, List[int]] = {}
        for r, d in enumerate(digests):
            groups.setdefault(d, []).append(r)
        parts = "; ".join(f"ranks {g}" for g in groups.values())
        raise D.DistributedError(f"rank {comm.rank}: the ranks were called with different merges ({parts} "
                                 "agree among themselves): every rank must get the same models, method, "
                                 "parameters and output")


class _LocalComm:
    """One process: no communication."""

    active = False
    rank = 0
    world_size = 1

    def sum_(self, t: Tensor) -> Tensor:
        return t

    def gather_cat(self, t: Tensor) -> Tensor:
        return t

    def abort(self) -> None:
        pass

    def check(self) -> None:
        pass


LOCAL = _LocalComm()
_RUNS = [0]


class Comm:
    """Collectives of one distributed streaming merge (every rank creates one, in the same order)."""

    active = True

    def __init__(self):
        import torch.distributed as dist

        self.dist = dist
        self.rank, self.world_size = D.rank(), D.world_size()
        _RUNS[0] += 1  # the ranks merge in lockstep, so the counter names the same run everywhere
        self.key = f"{_FLAG_PREFIX}/{_RUNS[0]}/failed"
        self.device = torch.device("cpu")
        if dist.get_backend() == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())
        try:
            self.store = dist.distributed_c10d._get_default_store()
        except Exception:  # pragma: no cover - a process group without a store
            self.store = None
        self._last_check = 0.0

    # -- failure flag ------------------------------------------------------------------------------
    def peer_failure(self) -> Optional[str]:
        """The message a failed rank left in the store, if any."""
        if self.store is None:
            return None
        try:
            if self.store.check([self.key]):
                return self.store.get(self.key).decode("utf-8", "replace")
        except Exception:  # the store lives on rank 0: gone when rank 0 is
            return None
        return None

    def fail(self, message: str) -> None:
        """Tell the other ranks this one failed (best effort)."""
        if self.store is None:
            return
        try:
            self.store.set(self.key, message[:4000])
        except Exception:
            pass

    def abort(self) -> None:
        """Leave the process group after a failure on this rank: its connections close, so the other ranks'
        pending collectives fail at once instead of at the timeout (best effort)."""
        D.leave()

    def check(self) -> None:
        now = time.monotonic()
        if now - self._last_check < CHECK_INTERVAL_S:
            return
        self._last_check = now
        msg = self.peer_failure()
        if msg is not None:
            raise D.DistributedError(f"rank {self.rank}: aborting the distributed merge: {msg}")

    def error(self, what: str, exc: BaseException) -> D.DistributedError:
        msg = self.peer_failure()
        cause = msg if msg is not None else f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        return D.DistributedError(f"rank {self.rank}: the distributed merge failed during {what}: {cause} "
                                  "(a rank failed, was killed or timed out; nothing was published)")

    def _run(self, what: str, fn):
        self.check_now()
        try:
            return fn()
        except D.DistributedError:
            raise
        except Exception as e:  # gloo/NCCL errors: a peer closed its connection, or the timeout expired
            raise self.error(what, e) from e

    def check_now(self) -> None:
        self._last_check = 0.0
        self.check()

    # -- collectives -------------------------------------------------------------------------------
    def sum_(self, t: Tensor) -> Tensor:
        """Sum ``t`` in place across ranks (used for integer counts only: exact in any order)."""
        def go():
            x = t.to(self.device)
            self.dist.all_reduce(x, op=self.dist.ReduceOp.SUM)
            if x is not t:
                t.copy_(x)
            return t
        return self._run("a sum of counts", go)

    def gather_cat(self, t: Tensor) -> Tensor:
        """Every rank's 1-D ``t``, concatenated in rank order (exact copies)."""
        def go():
            parts = D.all_gather_tensor(t.reshape(-1).to(self.device))
            return torch.cat([p.to(t.device) for p in parts])
        return self._run("a gather of candidates", go)

    def gather_object(self, obj: Any, what: str) -> List[Any]:
        return self._run(what, lambda: D.all_gather_object(obj))

    def broadcast_object(self, obj: Any, what: str) -> Any:
        return self._run(what, lambda: D.broadcast_object(obj, src=0))
