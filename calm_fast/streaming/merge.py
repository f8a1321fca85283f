"""merge_checkpoints: plan, run the engine into a sink, stage and publish the output."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch

from .. import distributed as D
from ..io.errors import ConfigError
from ..io.formats import Checkpoint, parse_dtype
from ..io.publish import AtomicOutput
from ..io.writer import DictWriter, OutputSink, SafetensorsWriter, copy_aux_files, plan_shards
from .engine import _run_engine
from .params import _jsonable
from .plan import MergePlan, build_plan
from .distributed import CHECK_INTERVAL_S, Comm, RankShard, check_same_plan, shard_plan
from .runtime import StreamResult, _Timer

Tensor = torch.Tensor


def _default_metadata(plan: MergePlan, sources: Mapping[str, Any], extra: Optional[Mapping[str, Any]]) -> Dict[str, str]:
    try:
        from .. import __version__ as version
    except Exception:  # pragma: no cover
        version = "unknown"
    meta = {
        "calm_fast.method": plan.method,
        "calm_fast.params": json.dumps(_jsonable(plan.params), sort_keys=True),
        "calm_fast.version": str(version),
        "torch.version": torch.__version__,
    }
    if "seed" in plan.params:
        meta["calm_fast.seed"] = str(plan.params["seed"])
    for k, v in sources.items():
        if v is not None:
            meta[f"calm_fast.{k}"] = v if isinstance(v, str) else json.dumps(_jsonable(v))
    if plan.base.aliases:
        meta["calm_fast.aliases"] = json.dumps(plan.base.aliases, sort_keys=True)
    if plan.report:
        meta["calm_fast.mismatch_actions"] = json.dumps(plan.report)
    for k, v in (extra or {}).items():
        meta[str(k)] = v if isinstance(v, str) else json.dumps(_jsonable(v))
    return meta


def _describe_source(x) -> Optional[str]:
    if isinstance(x, (str, os.PathLike)):
        return str(x)
    if isinstance(x, Checkpoint):
        return x.description
    return type(x).__name__


def merge_checkpoints(base, models: Sequence, method: str = "ties_merging", *, output=None, out_dtype=None,
                      dtype=None, include=None, exclude=None, weights=None, on_mismatch: str = "error",
                      memory_budget: Union[int, str] = "1GiB", max_shard_size: Union[None, int, str] = "5GB",
                      dry_run: bool = False, overwrite: bool = False, progress: bool = False,
                      trust_pickle: bool = False, nonfinite: str = "error", prefetch: bool = True,
                      copy_config: bool = True, metadata: Optional[Mapping[str, Any]] = None, device=None,
                      before_publish: Optional[Callable[["StreamResult"], None]] = None,
                      distributed: Optional[bool] = None, **params) -> StreamResult:
    """Merge checkpoints with bounded memory; results equal the in-memory ``calm_fast.<method>`` bit for bit.

    Args:
        base: the pretrained model θ0: a path (safetensors file, sharded index, HF folder, ``.pt``/``.bin``), a
            state dict or an ``nn.Module``.
        models: the fine-tuned models θ_t, same kinds; PEFT LoRA adapter folders are applied to ``base``.
        method: ``task_arithmetic`` (``ta``), ``ties_merging`` (``ties``), ``dare_merging`` (``dare``,
            ``dare_linear``; ``dare_ties`` = DARE + TIES), ``consensus_merging`` (``consensus``, ``tall``).
        **params: the method's parameters, with the names and defaults of the in-memory function
            (``scaling``, ``density``, ``merge``, ``mode``, ``p``, ``seed``, ``rescale``, ``combine``,
            ``tall_lambdas``, ``min_count``, ``alpha``, ``mtl``, ``ties_density``, ``ties_merge``).  Extension:
            for TIES, ``density`` may hold one value per model.
        output: a folder (sharded as needed) or a ``.safetensors`` file; ``None`` returns the merged state dict
            in ``result.state_dict`` instead (memory is then the size of the output).
        out_dtype: dtype of the merged tensors (default: the base's); ``dtype`` is accepted as a synonym
            (mergekit's name; arithmetic is always fp32).  Tensors copied from the base keep their dtype.
        include / exclude: regexes (``re.search``) selecting the merged floating tensors; the others are
            copied from the base.
        weights: per-model multipliers: a number, one per model, a ``[T, L]`` table over the sorted merged
            names, a mapping ``name -> T numbers``, or one mergekit-style spec per model (number, per-layer
            gradient list, or ``[{filter, value}, ...]``).
        on_mismatch: 'error' (default: any missing tensor or shape mismatch raises, naming the tensors),
            'skip' (the model contributes a zero delta to that tensor; tensors the base lacks are left out),
            'pad' (every version zero/base-padded to the largest shape), 'truncate' (cut to the smallest).
            Every action is listed in ``result.report`` (and printed by the CLI).
        memory_budget: bytes for the group buffers (both prefetch slots together); tensors above it are
            processed in slices.
        max_shard_size: shard size of a folder output.
        dry_run: plan, validate and estimate only; nothing is read beyond headers and nothing is written
            (the output checks below still run).
        overwrite: replace an existing output, as a whole (a folder is swapped for the new one atomically; a
            folder holding anything but model files is refused).  Without it an existing output (other than
            an empty folder) is an error, raised before any work.  An output that is, contains or is inside
            an input (symlinks resolved) is always refused.
        trust_pickle: allow arbitrary pickles in ``.pt``/``.bin`` inputs (open_clip ImageEncoder files).
        nonfinite: 'error' (inf/NaN in a task vector raises, naming the tensor) or 'propagate'.
        prefetch: read the next group in a background thread while merging the current one.
        copy_config: copy ``config.json``/tokenizer files when the base is a Hugging Face folder.
        metadata: extra safetensors metadata (the method, parameters, seed and versions are always written).
        device: run the ops on this device (e.g. 'cuda'); pieces are read on the CPU and copied over.
            Not yet tuned (no pinned buffers / overlapped copies); CPU is the tested path.
        progress: tqdm progress bars (bytes read, ETA) per pass on stderr.
        before_publish: called with the result once every output file is staged and complete, just before
            the output is published (with one rename); an exception in it discards the output.  The CLI
            writes its ``--json`` report here, so that no check can fail after the output appears.  In a
            distributed merge it runs on rank 0 only.
        distributed: shard the merge across the ranks of ``torch.distributed`` (launched by ``torchrun``).
            ``None`` (default): when a process group with more than one rank exists; ``True``: required (the
            process group is joined from the ``torchrun`` environment if needed); ``False``: never.  Every
            rank calls this function with the same arguments; each merges its share of the tensors (whole
            tensors, balanced by bytes) and writes them into the shared staging folder; the global statistics
            are summed across ranks, so the output is bit-identical to the one-process merge.  Rank 0 writes
            the index and publishes once every rank has finished; a failed or killed rank makes every other
            rank raise :class:`calm_fast.distributed.DistributedError` and nothing is published (the failed
            rank raises its own error and leaves the process group, so that no rank waits for it).  A folder
            output must be on a filesystem every rank sees (multi-node: a shared filesystem).  With
            ``output=None`` every rank receives the whole state dict.

    Output: every file (shards, index, ``config.json`` and tokenizer files) is written into a hidden
    staging folder beside ``output`` and published with one rename (see :class:`calm_fast.io.AtomicOutput`),
    under an exclusive lock: a concurrent run on the same output fails at once with :class:`OutputError`.
    """
    t_start = time.perf_counter()
    if dtype is not None and out_dtype is None:
        out_dtype = dtype
    try:
        out_dtype = parse_dtype(out_dtype)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if nonfinite not in ("error", "propagate"):
        raise ConfigError(f"nonfinite must be 'error' or 'propagate', got {nonfinite!r}")
    timer = _Timer()
    t0 = time.perf_counter()
    plan = build_plan(base, models, method, out_dtype=out_dtype, include=include, exclude=exclude, weights=weights,
                      on_mismatch=on_mismatch, memory_budget=memory_budget, prefetch=prefetch,
                      trust_pickle=trust_pickle, **params)
    timer.add("plan", time.perf_counter() - t0)
    result = StreamResult(plan, dry_run=dry_run)
    comm = _comm_for(distributed)
    shard = None
    if comm is not None:
        check_same_plan(comm, plan, {"output": os.path.abspath(output) if output is not None else None,
                                     "nonfinite": nonfinite, "dry_run": dry_run, "overwrite": overwrite})
        shards = shard_plan(plan, comm.world_size)
        shard = shards[comm.rank]
        result.rank, result.world_size = comm.rank, comm.world_size
        result.rank_plans = [sh.stats for sh in shards]
    publisher: Optional[AtomicOutput] = None
    try:
        if output is not None:
            single = Path(output).suffix == ".safetensors"
            try:
                plan_shards(plan.out_specs, None if single else max_shard_size)
            except ValueError as e:
                raise ConfigError(str(e)) from e
            publisher = AtomicOutput(output, overwrite=overwrite, single_file=single,
                                     protect=input_paths([base] + list(models), [plan.base] + plan.models))
            publisher.check()  # output = an input, an existing output: refused before any work (dry runs too)
        if dry_run:
            result.timings = dict(timer.t, total=time.perf_counter() - t_start)
            return result
        meta = _default_metadata(plan, {"base": _describe_source(base),
                                        "models": [_describe_source(m) for m in models],
                                        "out_dtype": str(out_dtype).replace("torch.", "") if out_dtype else None,
                                        "include": include, "exclude": exclude,
                                        "on_mismatch": on_mismatch if plan.report else None}, metadata)
        if comm is not None:
            _merge_distributed(plan, shard, comm, result, timer, publisher, output, meta, base, single if output
                               is not None else False, max_shard_size, overwrite, copy_config, out_dtype, progress,
                               nonfinite, device, prefetch, before_publish, t_start)
        elif publisher is None:
            sink: OutputSink = DictWriter(plan.out_specs)
            result.state_dict = _run_engine(plan, sink, timer, result, progress, nonfinite, device, prefetch)
        else:
            # everything (shards, index, config and tokenizer files) is staged in one hidden folder and
            # published with one rename after the last check; any failure before that leaves no output
            with publisher:
                sink = SafetensorsWriter(output, plan.out_specs, metadata=meta, output=publisher,
                                         max_shard_size=None if single else max_shard_size, overwrite=overwrite)
                paths = list(_run_engine(plan, sink, timer, result, progress, nonfinite, device, prefetch))
                _stage_rest_and_publish(publisher, result, paths, base, copy_config and not single, out_dtype,
                                        before_publish, timer, t_start)
    finally:
        for ck, src in zip([plan.base] + plan.models, [base] + list(models)):
            if not isinstance(src, Checkpoint):
                ck.close()
    result.timings = dict(timer.t, total=time.perf_counter() - t_start)
    return result


def input_paths(sources: Sequence[Any], checkpoints: Sequence[Checkpoint] = ()) -> List[str]:
    """The paths an output must stay clear of: every input given as a path (a folder, or a file; for a
    sharded index its folder, where the shards are) and every file the opened checkpoints read."""
    out: List[str] = []
    for src in sources:
        if isinstance(src, (str, os.PathLike)):
            p = Path(src)
            out.append(str(p))
            if p.is_file() and p.name.endswith(".index.json"):
                out.append(str(p.parent))
        elif isinstance(src, Checkpoint):
            out.extend(src.paths)
    for ck in checkpoints:
        out.extend(getattr(ck, "paths", []) or [])
        base = getattr(ck, "base", None)  # a LoRA adapter reads its base too
        if isinstance(base, Checkpoint):
            out.extend(base.paths)
    return list(dict.fromkeys(out))


def _comm_for(distributed: Optional[bool]) -> Optional[Comm]:
    if distributed is None:
        return Comm() if D.is_distributed() else None
    if not distributed:
        return None
    if not D.is_distributed() and D.launched_by_torchrun():
        D.init_from_env()
    if D.is_distributed():
        return Comm()
    if D.world_size() == 1 and D.launched_by_torchrun():
        return None  # torchrun with one process: the one-process merge
    raise ConfigError("distributed=True needs torch.distributed: launch with torchrun (e.g. torchrun "
                      "--nproc-per-node 2 -m calm_fast.cli merge ...) or initialise a process group first")


def _stage_rest_and_publish(publisher: AtomicOutput, result: StreamResult, paths: List[str], base: Any,
                            copy_config: bool, out_dtype, before_publish: Optional[Callable], timer: _Timer,
                            t_start: float) -> None:
    """After the shards are complete: stage the base's config/tokenizer files, let ``before_publish`` stage
    its report (the last thing that may fail), then publish the staging folder with one rename."""
    result.paths = paths
    src = base if isinstance(base, (str, os.PathLike)) else None
    if copy_config and src is not None and Path(src).is_dir():
        result.paths += copy_aux_files(src, publisher, out_dtype)
    if before_publish is not None:
        result.timings = dict(timer.t, total=time.perf_counter() - t_start)
        before_publish(result)
    t0 = time.perf_counter()
    publisher.publish()
    timer.add("write", time.perf_counter() - t0)


def _merge_distributed(plan: MergePlan, shard: RankShard, comm: Comm, result: StreamResult, timer: _Timer,
                       publisher: Optional[AtomicOutput], output, meta, base, single: bool, max_shard_size,
                       overwrite: bool, copy_config: bool, out_dtype, progress: bool, nonfinite: str, device,
                       prefetch: bool, before_publish, t_start: float) -> None:
    """One rank's part of a distributed merge (see :func:`merge_checkpoints`)."""
    rank = comm.rank
    staging: Optional[str] = None
    try:
        if publisher is None:  # in memory: every rank merges its tensors, then every rank gets all of them
            sink: OutputSink = DictWriter([s for s in plan.out_specs if s.name in shard.names])
            mine = _run_engine(plan, sink, timer, result, progress, nonfinite, device, prefetch, shard, comm)
            parts = comm.gather_object(mine, "the gather of the merged tensors")
            merged: Dict[str, Tensor] = {}
            for part in parts:
                merged.update(part)
            result.state_dict = {s.name: merged[s.name] for s in plan.out_specs}
            _gather_stats(comm, result)
            return
        if rank == 0:
            publisher.open()  # the lock, the checks and the hidden staging folder
            try:
                sink = SafetensorsWriter(output, plan.out_specs, metadata=meta, output=publisher,
                                         max_shard_size=None if single else max_shard_size, overwrite=overwrite,
                                         owned=shard.names, index=False)
            except BaseException as e:
                comm.broadcast_object(("error", f"rank 0 could not create the output: {type(e).__name__}: {e}"),
                                      "sharing the staging folder")
                raise
            staging = str(publisher.staging)
            comm.broadcast_object(("ok", staging, dict(sink.metadata)), "sharing the staging folder")
        else:
            hello = comm.broadcast_object(None, "sharing the staging folder")
            if hello[0] != "ok":
                raise D.DistributedError(f"rank {rank}: {hello[1]}")
            staging = hello[1]
            sink = SafetensorsWriter(output, plan.out_specs, metadata=hello[2], attach=staging,
                                     max_shard_size=None if single else max_shard_size, owned=shard.names, index=False)
        # every rank writes its tensors into the shared files, then syncs and closes them
        paths = list(_run_engine(plan, sink, timer, result, progress, nonfinite, device, prefetch, shard, comm))
        # the collective that confirms every rank finished its shards: nothing is published before it
        _gather_stats(comm, result)
        if rank == 0:
            try:
                sink.write_index()  # the index and the metadata last
                _stage_rest_and_publish(publisher, result, paths, base, copy_config and not single, out_dtype,
                                        before_publish, timer, t_start)
            except BaseException as e:
                comm.broadcast_object(("error", f"rank 0 could not publish the output: {type(e).__name__}: {e}"),
                                      "publishing")
                raise
            comm.broadcast_object(("ok", result.paths), "publishing")
        else:
            final = comm.broadcast_object(None, "publishing")
            if final[0] != "ok":
                raise D.DistributedError(f"rank {rank}: {final[1]}")
            result.paths = list(final[1])
    except BaseException as e:
        if not isinstance(e, D.DistributedError):
            comm.fail(f"rank {rank} failed: {type(e).__name__}: {e}")
            if rank != 0:  # (rank 0 hosts the store that carries the message: it leaves below, after cleaning up)
                comm.abort()
        elif rank != 0 and staging is not None:
            # rank 0 discards the staging folder; if it is the one that died, the survivors do
            shutil.rmtree(staging, ignore_errors=True)
        if publisher is not None and rank == 0:
            publisher.discard()
        if rank == 0 and not isinstance(e, D.DistributedError):
            time.sleep(min(2.0, 4 * CHECK_INTERVAL_S))  # let the others read the message from the store first
            comm.abort()
        raise


def _gather_stats(comm: Comm, result: StreamResult) -> None:
    mine = {"bytes_read": result.bytes_read, "patched": result.patched, "remerged": result.remerged,
            "bracket_fallbacks": result.bracket_fallbacks}
    every = comm.gather_object(mine, "the confirmation that every rank finished")
    result.bytes_read = sum(x["bytes_read"] for x in every)
    result.patched = sum(x["patched"] for x in every)
    result.remerged = sum(x["remerged"] for x in every)
    result.bracket_fallbacks = max(x["bracket_fallbacks"] for x in every)
    result.rank_bytes_read = [x["bytes_read"] for x in every]
