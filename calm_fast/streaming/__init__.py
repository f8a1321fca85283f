"""Bounded-memory merging of checkpoints on disk: tensor by tensor, in a few passes, straight to shards.

:func:`merge_checkpoints` runs the methods of :mod:`calm_fast.methods` (same parameters, same defaults,
bit-identical results) on models that need not fit in memory::

    from calm_fast.streaming import merge_checkpoints
    merge_checkpoints("base/", ["ft1/", "ft2/", "ft3/"], "ties_merging", output="merged/",
                      density=0.2, merge="sum", scaling=0.3)

How it runs
-----------
* **Plan** (no tensor data read): open and validate every checkpoint (headers, shard indexes), line
  the tensors up by name, apply the mismatch policy, resolve per-model / per-layer weights, and cut the
  merged tensors into *groups* whose buffers fit the memory budget.  A tensor larger than the budget is
  split into flat *pieces* (every op used here is elementwise once thresholds are known); DARE tensors
  and resized (pad/truncate) tensors are kept whole, because the DARE generator is indexed by the
  element's position inside its tensor.
* **Passes**: one group at a time is read (``pread`` into reused buffers, the next group prefetched
  by a background thread), handed to the fused ops of :mod:`calm_fast.ops` as task-major lists, and
  released.  Elementwise methods (task arithmetic, DARE, consensus) need one pass.  A global trim
  threshold (TIES, DARE-TIES, consensus with ``mtl='ties'``) is exact: pass 1 accumulates the level-0
  magnitude histograms of :class:`calm_fast.selection.ThresholdFinder`, pass 2 the level-1 histograms,
  pass 3 merges.  TIES's global majority sign (needed only where trimmed values cancel exactly) is
  learnt during pass 3; the few cancelled elements are recorded with their output for every possible
  sign and patched in the (still temporary) output files afterwards, exactly as the in-memory method
  patches its tensors.
* **Output**: each merged piece is written to its final place in its shard as soon as it is computed
  (:class:`calm_fast.io.SafetensorsWriter`), inside a hidden staging folder beside the output; the
  index, config and tokenizer files are staged beside the shards, and the folder is published with one
  rename once everything is complete and synced (:class:`calm_fast.io.AtomicOutput`).

Peak memory is the group buffers (``memory_budget``, split between the group being merged and the one
being prefetched) plus small histograms: independent of the model size and of the number of models.

Package layout (one job per module): :mod:`.params` (methods, parameters, weights, tunable constants),
:mod:`.plan` (the plan: tensors, pieces, groups), :mod:`.reader` (reading and prefetching groups),
:mod:`.runtime` (timer, background writer, progress), :mod:`.engine` with :mod:`.thresholds` and
:mod:`.merge_step` (the passes), :mod:`.merge` (:func:`merge_checkpoints`) and :mod:`.distributed` (the
same merge sharded over ``torch.distributed`` ranks).
"""
from __future__ import annotations

# the public names only; the engine's internals and tunable constants live in their modules
# (tests set the constants on calm_fast.streaming.params, where the engine reads them at call time)
from .merge import StreamResult, input_paths, merge_checkpoints
from .params import METHOD_NAMES, MISMATCH_POLICIES, layer_index, layer_position, method_defaults, resolve_method, weight_for
from .plan import MergePlan, Piece, TensorPlan, build_plan

__all__ = ["merge_checkpoints", "build_plan", "StreamResult", "MergePlan", "TensorPlan", "Piece", "resolve_method",
           "method_defaults", "weight_for", "layer_index", "layer_position", "input_paths", "METHOD_NAMES",
           "MISMATCH_POLICIES"]
