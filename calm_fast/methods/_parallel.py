"""Data-parallel training on ``torch.distributed`` ranks (CALM, AdaMerging, DOGE + AdaMerging) and the
exact gathers of the layer-sharded DOGE stage.

An iteration of the trainers evaluates the network on a list of batches (all tasks' batches, in the order
the single-process loop draws them) and sums the gradients.  With ``W`` ranks, batch ``j`` runs on rank
``j % W``; every rank draws the same batch list (the samplers are pure functions of step, iteration and
task), so no ids travel.  Two ways to combine the ranks' gradients:

* ``"allreduce"`` (default): each rank sums its own batches' gradients (and losses) into one flat buffer
  and the buffers are summed with **one** ``all_reduce`` per iteration.  Floating-point sums in the
  backend's order: equal to the single-process run to rounding (a few ulp of the gradient), not bit for
  bit.  A rank with no batch contributes zeros.
* ``"exact"``: every rank's per-batch gradients are gathered exactly (``all_gather`` of the raw values,
  one collective per round of ``W`` batches) and every rank adds them in the single-process order, so the
  result is **bit-identical** to the 1-rank run given the same batches.  Costs ``W`` gradient buffers of
  traffic and memory per round: meant for verification and for small models.

Every rank ends each iteration with identical parameters; results are identical on every rank.
"""
from __future__ import annotations

import hashlib
import json
import zlib
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .. import distributed
from ..distributed import DistributedError
from ..models.base import ModelAdapter, iter_batches, num_samples, select_batch

Tensor = torch.Tensor

DP_REDUCTIONS = ("allreduce", "exact")


class DataParallel:
    """Which batches this rank runs and how the gradients are combined (see the module docstring).

    ``data_parallel``: None (default) = on when a process group with more than one rank is active; True =
    on (a 1-rank group or no group runs as one process); False = off (every rank runs the whole loop).
    """

    def __init__(self, method: str, data_parallel: Optional[bool] = None, dp_reduction: str = "allreduce"):
        if dp_reduction not in DP_REDUCTIONS:
            raise ValueError(f"{method}: dp_reduction must be one of {DP_REDUCTIONS}, got {dp_reduction!r}")
        if data_parallel not in (None, True, False):
            raise ValueError(f"{method}: data_parallel must be None, True or False, got {data_parallel!r}")
        self.method = method
        self.reduction = dp_reduction
        on = distributed.is_distributed() if data_parallel is None else bool(data_parallel)
        self.active = bool(on and distributed.is_distributed())
        self.world = distributed.world_size() if self.active else 1
        self.rank = distributed.rank() if self.active else 0

    @property
    def exact(self) -> bool:
        return self.active and self.reduction == "exact"

    def describe(self) -> Dict[str, object]:
        return {"active": self.active, "world_size": self.world,
                "reduction": self.reduction if self.active else None}

    def mine(self, j: int) -> bool:
        """Whether global batch ``j`` of an iteration runs on this rank."""
        return j % self.world == self.rank

    def all_reduce_(self, flat: Tensor) -> Tensor:
        """Sum one flat buffer across the ranks in place (one collective)."""
        if self.active:
            distributed.guarded(f"{self.method}: all_reduce", distributed.all_reduce_sum_, flat)
        return flat

    def exact_rounds(self, n: int, compute: Callable[[int], Tensor], consume: Callable[[int, Tensor], None],
                     like: Tensor) -> None:
        """For every global batch ``j < n`` in order, ``consume(j, vector)`` on every rank, where ``vector`` is
        ``compute(j)`` (a 1-D tensor, dtype and device of ``like``) as the owning rank computed it: one
        exact all_gather per round of ``world`` batches."""
        W = self.world
        for a in range(0, n, W):
            j = a + self.rank
            local = compute(j).reshape(-1).to(like.dtype) if j < n else like.new_empty(0)
            parts = distributed.guarded(f"{self.method}: all_gather", distributed.all_gather_tensor, local)
            for r, vec in enumerate(parts):
                if a + r < n:
                    consume(a + r, vec)

    def check_batches(self, batches: Sequence, what: str) -> None:
        """Raise :class:`DistributedError` on every rank unless every rank drew the same batch list
        (``[(task, ids), ...]``): a fingerprint (crc32 of the tasks and ids) is compared, one small collective."""
        if not self.active:
            return
        crc = 0
        for item in batches:
            task, ids = item[-2], item[-1]
            crc = zlib.crc32(str(task).encode(), crc)
            crc = zlib.crc32(ids.numpy().tobytes(), crc)
        self.check_same((len(batches), crc), f"{what} (a batch sampler must be a pure function of its arguments "
                        "under data parallelism)")

    def accuracy(self, adapter: ModelAdapter, params, task, inputs, labels: Tensor, batch_size: int) -> float:
        """:func:`calm_fast.models.accuracy` with the evaluation batches split across the ranks (batch ``i`` on
        rank ``i % W``) and the correct counts summed (integers: the same value as one process)."""
        from ..models.base import accuracy

        if not self.active:
            return accuracy(adapter, params, task, inputs, labels, batch_size)

        def reduce(count: Tensor) -> Tensor:
            return distributed.guarded(f"{self.method}: all_reduce", distributed.all_reduce_sum_, count)

        return accuracy(adapter, params, task, inputs, labels, batch_size, which=self.mine, reduce=reduce)

    def check_same_run(self, settings: Mapping[str, Any], tensors: Sequence[Tuple[str, Sequence[int]]],
                       sizes: Sequence[int]) -> None:
        """Raise :class:`DistributedError` on every rank unless every rank was called with the same settings,
        the same trained tensors (names and shapes) and the same number of samples per task: one digest
        compared once, before the first batch, so that ranks called differently (another learning rate, a
        data file that differs on one node) stop instead of training a mixture."""
        if not self.active:
            return
        h = hashlib.blake2b(digest_size=16)
        h.update(json.dumps({k: settings[k] for k in sorted(settings)}, default=str).encode())
        h.update(json.dumps([[n, list(sh)] for n, sh in tensors]).encode())
        h.update(json.dumps([int(n) for n in sizes]).encode())
        self.check_same(h.hexdigest(), "the method's settings, tensors and data sizes (every rank must be "
                        "called with the same arguments)")

    def check_same(self, value, what: str) -> None:
        """Raise on every rank when ranks disagree on ``value`` (a small picklable value): the batch lists
        must be the same on every rank."""
        if not self.active:
            return
        values = distributed.guarded(f"{self.method}: all_gather_object", distributed.all_gather_object, value)
        if any(v != values[0] for v in values[1:]):
            raise DistributedError(f"{self.method}: the ranks disagree on {what}")


@torch.no_grad()
def sharded_logits(dp: DataParallel, adapter: ModelAdapter, params, task, inputs, batch_size: int = 256) -> Tensor:
    """:func:`calm_fast.models.predict_logits` with the evaluation batches split across the ranks (batch ``i``
    on rank ``i % W``) and the logits gathered exactly: the same batches as one process, so the same bits."""
    from ..models.base import predict_logits

    if not dp.active:
        return predict_logits(adapter, params, task, inputs, batch_size)
    if hasattr(params, "as_dict"):
        params = params.as_dict()
    batches = list(iter_batches(num_samples(inputs), batch_size))
    mine = [adapter.logits(params, task, select_batch(inputs, ids, adapter.device)).float()
            for i, ids in enumerate(batches) if dp.mine(i)]
    C = torch.tensor([mine[0].shape[1] if mine else -1], dtype=torch.int64, device=adapter.device)
    classes = {int(c) for c in distributed.guarded(f"{dp.method}: all_gather", distributed.all_gather_tensor, C)} - {-1}
    if len(classes) != 1:
        raise DistributedError(f"{dp.method}: the ranks computed logits with different class counts {sorted(classes)}")
    (C,) = classes
    dev = adapter.device
    local = torch.cat([z.reshape(-1) for z in mine]).to(dev) if mine else torch.empty(0, device=dev)
    parts = distributed.guarded(f"{dp.method}: all_gather", distributed.all_gather_tensor, local)
    per_rank = [p.view(-1, C) for p in parts]
    cursor = [0] * dp.world
    out: List[Tensor] = []
    for i, ids in enumerate(batches):
        r = i % dp.world
        out.append(per_rank[r][cursor[r]:cursor[r] + ids.numel()])
        cursor[r] += ids.numel()
    return torch.cat(out) if out else torch.empty(0)


def layer_owners(costs: Sequence[int], shard_layers: Optional[bool], method: str) -> Optional[List[int]]:
    """The rank of each layer (:func:`calm_fast.distributed.assign_by_cost` over ``costs``) when the layers are
    sharded, else None.  ``shard_layers``: None = shard when a process group with more than one rank is
    active; False = every rank computes every layer; True = shard (one process: nothing to shard)."""
    if shard_layers not in (None, True, False):
        raise ValueError(f"{method}: shard_layers must be None, True or False, got {shard_layers!r}")
    on = distributed.is_distributed() if shard_layers is None else bool(shard_layers)
    if not (on and distributed.is_distributed()):
        return None
    return distributed.assign_by_cost([int(c) for c in costs], distributed.world_size())


def gather_layer_results(owner: Sequence[int], keys: Sequence[str], deltas: Dict[str, Tensor],
                         losses: Dict[str, Tensor], delta_shapes: Sequence[Sequence[int]], steps: int,
                         order: Sequence[int], method: str, device=None) -> Tuple[Dict[str, Tensor], Dict[str, Tensor]]:
    """DOGE's layer-sharded stage: every layer's δ (``delta_shapes[l]``) and loss curve (``steps`` values),
    computed on its owning rank (``deltas``/``losses``: this rank's, by key), exactly on every rank, as float64
    dicts keyed in ``order`` (layer indices: the 1-process order of the dicts)."""
    local: Dict[int, Tensor] = {}
    for l, key in enumerate(keys):
        if key in deltas:
            local[2 * l], local[2 * l + 1] = deltas[key], losses[key]
    L = len(keys)
    shapes = [s for l in range(L) for s in (tuple(delta_shapes[l]), (int(steps),))]
    items = gather_items([owner[i // 2] for i in range(2 * L)], local, torch.float64, shapes, method, device)
    return {keys[l]: items[2 * l] for l in order}, {keys[l]: items[2 * l + 1] for l in order}


def gather_items(owner: Sequence[int], local: Dict[int, Tensor], dtype: torch.dtype,
                 shapes: Sequence[Sequence[int]], method: str, device=None) -> List[Tensor]:
    """Work items computed on their owning ranks (``local``: item -> tensor on this rank), exactly, on every
    rank: one all_gather of each rank's items concatenated in item order (values cast to ``dtype`` for the
    transfer: use a dtype that holds them exactly)."""
    import math

    rank = distributed.rank()
    mine = [i for i in range(len(owner)) if owner[i] == rank]
    missing = [i for i in mine if i not in local]
    if missing:
        raise RuntimeError(f"{method}: items {missing[:5]} of rank {rank} were not computed")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    flat = (torch.cat([local[i].reshape(-1).to(dev, dtype) for i in mine]) if mine
            else torch.empty(0, dtype=dtype, device=dev))
    parts = distributed.guarded(f"{method}: all_gather", distributed.all_gather_tensor, flat)
    out: List[Optional[Tensor]] = [None] * len(owner)
    cursor = [0] * len(parts)
    for i, r in enumerate(owner):
        n = math.prod(shapes[i])
        out[i] = parts[r][cursor[r]:cursor[r] + n].view(*shapes[i])
        cursor[r] += n
    if any(c != p.numel() for c, p in zip(cursor, parts)):
        raise DistributedError(f"{method}: the ranks sent {[p.numel() for p in parts]} values, expected {cursor}")
    return out  # type: ignore[return-value]
