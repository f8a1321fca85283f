"""merge_checkpoints: plan, run the engine into a sink, stage and publish the output."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch

from ..io.errors import ConfigError
from ..io.formats import Checkpoint, parse_dtype
from ..io.publish import AtomicOutput
from ..io.writer import DictWriter, OutputSink, SafetensorsWriter, copy_aux_files, plan_shards
from .engine import _run_engine
from .params import _jsonable
from .plan import MergePlan, build_plan
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
                      **params) -> StreamResult:
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
            writes its ``--json`` report here, so that no check can fail after the output appears.

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
        if publisher is None:
            sink: OutputSink = DictWriter(plan.out_specs)
            result.state_dict = _run_engine(plan, sink, timer, result, progress, nonfinite, device, prefetch)
        else:
            # everything (shards, index, config and tokenizer files) is staged in one hidden folder and
            # published with one rename after the last check; any failure before that leaves no output
            with publisher:
                sink = SafetensorsWriter(output, plan.out_specs, metadata=meta, output=publisher,
                                         max_shard_size=None if single else max_shard_size, overwrite=overwrite)
                result.paths = list(_run_engine(plan, sink, timer, result, progress, nonfinite, device, prefetch))
                src = base if isinstance(base, (str, os.PathLike)) else None
                if copy_config and src is not None and Path(src).is_dir() and not single:
                    result.paths += copy_aux_files(src, publisher, out_dtype)
                if before_publish is not None:
                    result.timings = dict(timer.t, total=time.perf_counter() - t_start)
                    before_publish(result)
                t0 = time.perf_counter()
                publisher.publish()
                timer.add("write", time.perf_counter() - t0)
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

