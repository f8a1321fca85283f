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
"""
from __future__ import annotations

import inspect
import json
import math
import os
import re
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from . import ops, selection
from .io.errors import CheckpointError, ConfigError, MismatchError, NonFiniteError, OutputError
from .io.formats import (MERGEABLE_DTYPES, Checkpoint, LoraCheckpoint, element_size, format_bytes,
                         is_lora_adapter, open_checkpoint, parse_dtype, parse_size)
from .io.publish import AtomicOutput
from .io.writer import DictWriter, OutputSink, OutputSpec, SafetensorsWriter, copy_aux_files, plan_shards
from .methods._common import check_finite, resolve_out_dtype

Tensor = torch.Tensor

# ------------------------------------------------------------------------------------------------
# Methods: names, aliases and parameters (taken from calm_fast.methods so the semantics stay in one place)
# ------------------------------------------------------------------------------------------------
_METHOD_ALIASES: Dict[str, Tuple[str, Dict[str, Any]]] = {
    "task_arithmetic": ("task_arithmetic", {}), "ta": ("task_arithmetic", {}),
    "ties_merging": ("ties_merging", {}), "ties": ("ties_merging", {}),
    "dare_merging": ("dare_merging", {}), "dare": ("dare_merging", {"combine": "task_arithmetic"}),
    "dare_linear": ("dare_merging", {"combine": "task_arithmetic"}),
    "dare_ta": ("dare_merging", {"combine": "task_arithmetic"}),
    "dare_task_arithmetic": ("dare_merging", {"combine": "task_arithmetic"}),
    "dare_ties": ("dare_merging", {"combine": "ties"}),
    "consensus_merging": ("consensus_merging", {}), "consensus": ("consensus_merging", {}),
    "tall": ("consensus_merging", {}), "consensus_ties": ("consensus_merging", {"mtl": "ties"}),
}
_PARAM_ALIASES = {"lambda": "scaling", "lambda_": "scaling", "scale": "scaling", "drop_rate": "p",
                  "k": "min_count", "merge_func": "merge", "ties_k": "ties_density"}
# arguments of the in-memory functions that are not method parameters
_NOT_PARAMS = {"pretrained", "finetuned", "task_vectors", "include", "exclude", "out_dtype", "nonfinite",
               "return_masks", "weights"}
METHOD_NAMES = sorted(_METHOD_ALIASES)


def _method_function(canonical: str) -> Callable:
    from . import methods

    return getattr(methods, canonical)


def method_defaults(canonical: str) -> Dict[str, Any]:
    """The method's parameters and their defaults, read from the in-memory function's signature."""
    sig = inspect.signature(_method_function(canonical))
    return {k: p.default for k, p in sig.parameters.items()
            if k not in _NOT_PARAMS and p.default is not inspect.Parameter.empty}


def resolve_method(method: str, params: Mapping[str, Any]) -> Tuple[str, Dict[str, Any]]:
    """(canonical method name, complete parameters) for a method name or alias and user parameters.
    Unknown methods or parameters raise :class:`ConfigError`."""
    key = str(method).lower().replace("-", "_")
    if key not in _METHOD_ALIASES:
        raise ConfigError(f"unknown merge method {method!r}; known: {', '.join(METHOD_NAMES)}")
    canonical, implied = _METHOD_ALIASES[key]
    full = method_defaults(canonical)
    full.update(implied)
    unknown = []
    for k, v in params.items():
        k2 = _PARAM_ALIASES.get(k, k)
        if k2 not in full:
            unknown.append(k)
            continue
        if k2 in implied and v != implied[k2]:
            raise ConfigError(f"method {method!r} implies {k2}={implied[k2]!r}, got {v!r}")
        full[k2] = v
    if unknown:
        raise ConfigError(f"{canonical}: unknown parameter(s) {unknown}; valid: {sorted(full)}")
    return canonical, full


def _uses_ties(canonical: str, p: Mapping[str, Any]) -> bool:
    return canonical == "ties_merging" or (canonical == "dare_merging" and p.get("combine") == "ties") or (
        canonical == "consensus_merging" and p.get("mtl") == "ties")


def _needs_global_threshold(canonical: str, p: Mapping[str, Any]) -> bool:
    if canonical == "consensus_merging":
        return p.get("mtl") == "ties" and float(p.get("ties_density", 1.0)) < 1.0
    if not _uses_ties(canonical, p):
        return False
    dens = p.get("density")
    dens = list(dens) if isinstance(dens, (list, tuple)) else [dens]
    return p.get("mode", "global") == "global" and any(float(d) < 1.0 for d in dens)


# ------------------------------------------------------------------------------------------------
# Per-model / per-layer weights (mergekit-style specs)
# ------------------------------------------------------------------------------------------------
_LAYER_RE = re.compile(r"\.(\d+)(?:\.|$)")
_PRE_RE = re.compile(r"embed|wte|wpe|tok|patch|pos|cls|class_embedding|conv1|stem", re.IGNORECASE)


def layer_index(name: str) -> Optional[int]:
    """The first dotted integer of a tensor name (``model.layers.12.mlp...`` -> 12), or None."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def layer_position(name: str, num_layers: int) -> float:
    """t in [0, 1] of a tensor for gradients: ``i / (num_layers - 1)`` for layer ``i``; tensors outside the
    layers sit at t = 0 if their name looks like an input-side tensor (embeddings, patch/position
    embeddings, class token, stem) and at t = 1 otherwise (final norm, heads)."""
    i = layer_index(name)
    if i is None:
        return 0.0 if _PRE_RE.search(name) else 1.0
    return 0.0 if num_layers <= 1 else min(1.0, i / (num_layers - 1))


def _gradient(values: Sequence[float], t: float) -> float:
    vals = [float(v) for v in values]
    if len(vals) == 1:
        return vals[0]
    x = t * (len(vals) - 1)
    i = min(int(math.floor(x)), len(vals) - 2)
    f = x - i
    return vals[i] * (1.0 - f) + vals[i + 1] * f


def _filter_match(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return pattern in name


def weight_for(spec: Any, name: str, num_layers: int) -> float:
    """Evaluate one weight spec for a tensor: a number; a list of numbers (a gradient over the layers); or
    a list of ``{filter: substring-or-'re:regex', value: spec}`` entries (first match wins; an entry
    without ``filter`` is the default)."""
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return float(spec)
    if isinstance(spec, (list, tuple)) and spec and all(isinstance(v, (int, float)) for v in spec):
        return _gradient(spec, layer_position(name, num_layers))
    if isinstance(spec, (list, tuple)) and all(isinstance(v, Mapping) for v in spec):
        for entry in spec:
            bad = set(entry) - {"filter", "value"}
            if bad or "value" not in entry:
                raise ConfigError(f"weight entry {dict(entry)!r}: expected keys 'filter' (optional) and 'value'")
            if "filter" not in entry or _filter_match(str(entry["filter"]), name):
                return weight_for(entry["value"], name, num_layers)
        raise ConfigError(f"no weight entry matches tensor {name!r} and there is no default entry (one without "
                          "'filter')")
    raise ConfigError(f"invalid weight spec {spec!r}: use a number, a list of numbers (per-layer gradient) or a "
                      "list of {filter, value} entries")


def _is_simple_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# ------------------------------------------------------------------------------------------------
# The plan
# ------------------------------------------------------------------------------------------------
MISMATCH_POLICIES = ("error", "skip", "pad", "truncate")
#: TIES: how many exactly-cancelled elements are remembered (with their three possible outputs) for the
#: patch after the merge pass; groups beyond it are merged again if the global sign turns out not +1.
MAX_RECORDED_POSITIONS = 1 << 22
#: global thresholds: try the one-pass bracket select first (see _Engine._global_thresholds)
BRACKET_SELECT = True
#: |tau| values sampled per task to predict the bracket, and contiguous slices read per tensor for it
SAMPLE_SIZE = 1 << 18
SAMPLE_RUNS = 32
#: memory for the bracket's candidates (all tasks); None: the group budget (at least 1 MiB).  Beyond it,
#: the tasks that no longer fit use the radix passes.
BRACKET_CANDIDATE_BYTES: Optional[Union[int, str]] = None
#: selection method for per-tensor thresholds of resident pieces (both exact; see selection.kth_smallest_abs;
#: the two-pass radix count is cheaper than the sampled bracket for one tensor at a time)
PER_TENSOR_SELECT = "radix"


@dataclass
class TensorPlan:
    """What happens to one tensor of the output."""

    name: str
    action: str                      # 'merge' or 'copy' (the base's tensor, unchanged)
    shape: Tuple[int, ...]           # output shape
    base_dtype: torch.dtype
    out_dtype: torch.dtype
    compute_dtype: torch.dtype = torch.float32
    col: int = -1                    # column in the [T, L] tables (sorted merged keys)
    src_keys: List[str] = field(default_factory=list)           # per model: the key to read (tied aliases)
    adjust: List[Optional[str]] = field(default_factory=list)  # per source (base, models): None/'zero'/'pad'/'truncate'
    chunkable: bool = True
    src_bytes: int = 0               # bytes per element over the sources read (base + models)

    @property
    def numel(self) -> int:
        return int(math.prod(self.shape))


@dataclass
class Piece:
    """Elements [start, stop) of the flattened tensor ``plan``."""

    plan: TensorPlan
    start: int
    stop: int

    @property
    def numel(self) -> int:
        return self.stop - self.start

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.stop == self.plan.numel


@dataclass
class MergePlan:
    method: str
    params: Dict[str, Any]
    base: Checkpoint
    models: List[Checkpoint]
    tensors: List[TensorPlan]        # every output tensor, in processing (storage) order
    merged_keys: List[str]           # sorted: the column order of weight / threshold tables
    weights: Optional[Tensor]        # [T, L] float32 or None
    groups: List[List[Piece]]        # merge groups
    copy_groups: List[List[Piece]]
    report: List[str]
    notes: List[str]
    group_budget: int
    prefetch: bool
    out_specs: List[OutputSpec]

    @property
    def T(self) -> int:
        return len(self.models)

    @property
    def num_passes(self) -> int:
        """Passes over the inputs when the threshold bracket hits (2 more when it misses)."""
        if not _needs_global_threshold(self.method, self.params):
            return 1
        return 2 if BRACKET_SELECT else 3

    def merged_numel(self) -> int:
        return sum(t.numel for t in self.tensors if t.action == "merge")

    def input_bytes_per_pass(self) -> int:
        n = 0
        for g in self.groups:
            for p in g:
                n += p.numel * (element_size(self.base.info(p.plan.name).dtype) +
                                sum(element_size(m.info(k).dtype) if k is not None else 0
                                    for m, k in zip(self.models, p.plan.src_keys)))
        return n

    def copy_bytes(self) -> int:
        return sum(p.numel * element_size(p.plan.base_dtype) for g in self.copy_groups for p in g)

    def output_bytes(self) -> int:
        return sum(s.nbytes for s in self.out_specs)

    def largest_group_bytes(self) -> int:
        return max([_group_cost(g, self.T) for g in self.groups + self.copy_groups] or [0])

    def memory_estimate(self) -> int:
        """Working memory of the merge: the buffers of the largest group (twice with prefetch: the
        group being merged and the next one), its outputs and fp32 temporaries, and the histograms."""
        slots = 2 if self.prefetch else 1
        hist = 2 * self.T * (ops.HIST_LOW_BINS + ops.HIST_HIGH_BINS) * 8
        return slots * self.largest_group_bytes() + hist

    def describe(self) -> str:
        lines = [f"method: {self.method} " + json.dumps(_jsonable(self.params), sort_keys=True),
                 f"base:   {self.base.summary()}"]
        for i, m in enumerate(self.models):
            lines.append(f"model {i}: {m.summary()}")
        n_merge = sum(1 for t in self.tensors if t.action == "merge")
        n_copy = len(self.tensors) - n_merge
        pieces = sum(len(g) for g in self.groups)
        split = sum(1 for t in self.tensors if t.action == "merge" and not _is_whole_in(t, self.groups))
        lines.append(f"tensors: {n_merge} merged ({self.merged_numel():,} elements per model), {n_copy} copied "
                     f"from the base unchanged")
        how = {1: "merge pass only", 2: "1 threshold pass (sampled bracket; +2 radix passes if it misses) + 1 merge "
                  "pass", 3: "2 threshold passes + 1 merge pass"}[self.num_passes]
        lines.append(f"passes over the inputs: {self.num_passes} ({how}), "
                     f"{len(self.groups)} groups, {pieces} pieces ({split} tensors split into slices)")
        lines.append(f"reads: {format_bytes(self.input_bytes_per_pass())} per pass, "
                     f"{format_bytes(self.input_bytes_per_pass() * self.num_passes + self.copy_bytes())} in total")
        lines.append(f"output: {len(self.out_specs)} tensors, {format_bytes(self.output_bytes())}")
        lines.append(f"memory estimate: {format_bytes(self.memory_estimate())} working set "
                     f"(group budget {format_bytes(self.group_budget)}{', x2 with prefetch' if self.prefetch else ''}), "
                     f"plus the Python/torch baseline")
        for n in self.notes:
            lines.append(f"note: {n}")
        for r in self.report:
            lines.append(f"mismatch: {r}")
        return "\n".join(lines)


def _is_whole_in(t: TensorPlan, groups: List[List[Piece]]) -> bool:
    for g in groups:
        for p in g:
            if p.plan is t:
                return p.whole
    return True


def _jsonable(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.tolist()
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.dtype):
        return str(x).replace("torch.", "")
    return x


def _piece_cost_per_element(t: TensorPlan, T: int, method: str, params: Mapping[str, Any]) -> int:
    """Bytes of buffers per element of a piece: the inputs as stored (base + T models), fp32 copies when
    the sources' dtypes differ, the kernel output (fp32 worst case) and its cast to the output dtype,
    and the fp32 TIES vector of consensus-TIES."""
    per = t.src_bytes if t.src_bytes else 4 * (T + 1)
    if t.compute_dtype == torch.float32 and t.src_bytes != 4 * (T + 1):
        per += 4 * (T + 1)            # converted copies
    per += 4 + element_size(t.out_dtype)
    if method == "consensus_merging" and params.get("mtl") == "ties":
        per += 8
    return per


def _group_cost(g: List[Piece], T: int) -> int:
    return sum(p.numel * getattr(p, "_cost", 4 * (T + 3)) for p in g)


def _check_patterns(p, name) -> List[re.Pattern]:
    if p is None:
        return []
    if isinstance(p, str):
        p = [p]
    out = []
    for x in p:
        try:
            out.append(re.compile(x))
        except re.error as e:
            raise ConfigError(f"invalid {name} pattern {x!r}: {e}") from e
    return out


def _open_source(src, base_ck: Optional[Checkpoint], trust_pickle: bool, what: str) -> Checkpoint:
    if isinstance(src, (str, os.PathLike)) and is_lora_adapter(src):
        if base_ck is None:
            raise CheckpointError(f"{what} {src} is a LoRA adapter and needs a base model")
        return LoraCheckpoint(src, base_ck, trust_pickle=trust_pickle)
    return open_checkpoint(src, trust_pickle=trust_pickle)


def build_plan(base, models: Sequence, method: str = "ties_merging", *, out_dtype=None, include=None, exclude=None,
               weights=None, on_mismatch: str = "error", memory_budget: Union[int, str] = "1GiB",
               prefetch: bool = True, trust_pickle: bool = False, chunk: bool = True,
               **params) -> MergePlan:
    """Open and validate the inputs and plan the merge (reads headers only; see :func:`merge_checkpoints`)."""
    canonical, p = resolve_method(method, params)
    if on_mismatch not in MISMATCH_POLICIES:
        raise ConfigError(f"on_mismatch must be one of {MISMATCH_POLICIES}, got {on_mismatch!r}")
    if isinstance(models, (str, os.PathLike, Mapping, torch.nn.Module)) or not isinstance(models, Sequence):
        raise ConfigError("models must be a list of models")
    if len(models) == 0:
        raise ConfigError("need at least one model to merge")
    if base is None:
        raise ConfigError("a base (pretrained) model is required")
    if not isinstance(trust_pickle, bool):  # "false" is truthy: never let a string enable pickle loading
        raise ConfigError(f"trust_pickle must be True or False, got {trust_pickle!r}")
    try:
        out_dtype = resolve_out_dtype(out_dtype, canonical)  # a name, or a floating dtype
    except ValueError as e:
        raise ConfigError(str(e)) from e
    inc, exc = _check_patterns(include, "include"), _check_patterns(exclude, "exclude")
    budget = parse_size(memory_budget)
    if budget is None or budget < 1024:
        raise ConfigError(f"memory_budget must be at least 1 KiB, got {memory_budget!r}")
    _validate_params(canonical, p, len(models))

    opened: List[Tuple[Checkpoint, Any]] = []
    try:
        base_ck = open_checkpoint(base, trust_pickle=trust_pickle)
        opened.append((base_ck, base))
        model_cks = []
        for i, m in enumerate(models):
            model_cks.append(_open_source(m, base_ck, trust_pickle, f"model {i}"))
            opened.append((model_cks[-1], m))
        return _plan(base_ck, model_cks, canonical, p, out_dtype, inc, exc, weights, on_mismatch, budget, prefetch,
                     chunk)
    except BaseException:
        for ck, src in opened:
            if not isinstance(src, Checkpoint):
                ck.close()
        raise


def _plan(base_ck: Checkpoint, model_cks: List[Checkpoint], canonical: str, p: Dict[str, Any], out_dtype, inc, exc,
          weights, on_mismatch: str, budget: int, prefetch: bool, chunk: bool) -> MergePlan:
    T = len(model_cks)
    report: List[str] = []
    notes: List[str] = []
    problems: List[str] = []

    base_keys = base_ck.keys()
    base_set = set(base_keys)
    # tensors only the models have
    for i, m in enumerate(model_cks):
        extra = [k for k in m.keys() if k not in base_set and k not in base_ck.aliases]
        if extra:
            msg = f"model {i} has {len(extra)} tensor(s) the base does not: {extra[:5]}{' ...' if len(extra) > 5 else ''}"
            if on_mismatch == "skip":
                report.append(msg + " -> left out of the output")
            else:
                problems.append(msg)
    if base_ck.aliases:
        notes.append(f"base: {len(base_ck.aliases)} tied tensor(s) stored once: "
                     + ", ".join(f"{a} -> {k}" for a, k in list(base_ck.aliases.items())[:3]))

    plans: List[TensorPlan] = []
    for k in base_keys:
        bi = base_ck.info(k)
        floating = bi.dtype.is_floating_point
        selected = floating and (not inc or any(r.search(k) for r in inc)) and not any(r.search(k) for r in exc)
        if not selected:
            plans.append(TensorPlan(k, "copy", bi.shape, bi.dtype, bi.dtype))
            continue
        if bi.dtype not in MERGEABLE_DTYPES:
            problems.append(f"{k!r} has dtype {str(bi.dtype).replace('torch.', '')}; mergeable: float32, bfloat16, "
                            "float16 (exclude it to copy it from the base)")
            continue
        src_keys, infos = [], []
        for i, m in enumerate(model_cks):
            # a model that stores this tensor tied to another name reads that name
            key = k if k in m else m.aliases.get(k)
            src_keys.append(key)
            infos.append(m.info(key) if key is not None else None)
        shapes = [bi.shape] + [inf.shape if inf is not None else None for inf in infos]
        adjust: List[Optional[str]] = [None] * (T + 1)
        out_shape = bi.shape
        missing = [i for i, inf in enumerate(infos) if inf is None]
        differ = [i for i, inf in enumerate(infos) if inf is not None and inf.shape != bi.shape]
        if missing:
            msg = f"{k!r} is missing from model(s) {missing}"
            if on_mismatch == "error":
                problems.append(msg)
                continue
            for i in missing:
                adjust[i + 1] = "zero"
            report.append(msg + " -> those models contribute an unchanged tensor (zero delta)")
        if differ:
            desc = ", ".join(f"model {i}: {tuple(infos[i].shape)}" for i in differ)
            msg = f"shape mismatch for {k!r}: base {tuple(bi.shape)}, {desc}"
            if on_mismatch == "error":
                problems.append(msg)
                continue
            if on_mismatch == "skip":
                for i in differ:
                    adjust[i + 1] = "zero"
                report.append(msg + f" -> model(s) {differ} left out of this tensor (zero delta)")
            else:
                present = [s for s in shapes if s is not None]
                if len({len(s) for s in present}) != 1:
                    problems.append(msg + " (tensors with different numbers of dimensions cannot be "
                                    + ("padded)" if on_mismatch == "pad" else "truncated)"))
                    continue
                red = max if on_mismatch == "pad" else min
                out_shape = tuple(red(s[d] for s in present) for d in range(len(bi.shape)))
                for j, s in enumerate(shapes):
                    if s is not None and s != out_shape and adjust[j] != "zero":
                        adjust[j] = on_mismatch
                for i in missing:
                    adjust[i + 1] = "zero"
                verb = ("padded to" if on_mismatch == "pad" else "truncated to")
                report.append(msg + f" -> all {verb} {out_shape} "
                              + ("(new entries: 0 in the base, the base's value in models that lack them)"
                                 if on_mismatch == "pad" else "(trailing entries dropped)"))
        # a model whose tensor is not floating where the base's is (an integer buffer stored under a weight's
        # name) cannot be merged as weights: an error, as in the in-memory API (skip: a zero delta, reported)
        not_float = [i for i, inf in enumerate(infos) if inf is not None and adjust[i + 1] != "zero"
                     and not inf.dtype.is_floating_point]
        if not_float:
            desc = ", ".join(f"model {i}: {str(infos[i].dtype).replace('torch.', '')}" for i in not_float)
            msg = f"dtype mismatch for {k!r}: base {str(bi.dtype).replace('torch.', '')}, {desc}"
            if on_mismatch != "skip":
                problems.append(msg + " (a non-floating tensor cannot be merged as weights)")
                continue
            for i in not_float:
                adjust[i + 1] = "zero"
                infos[i] = None
            report.append(msg + f" -> model(s) {not_float} left out of this tensor (zero delta)")
        dtypes = {bi.dtype} | {inf.dtype for inf in infos if inf is not None}
        compute = bi.dtype if len(dtypes) == 1 else torch.float32
        if len(dtypes) > 1:
            notes.append(f"{k!r}: inputs have dtypes {sorted(str(d).replace('torch.', '') for d in dtypes)}; merged "
                         "from fp32 copies (exact)")
        dare = canonical == "dare_merging" and float(p.get("p", 0.0)) > 0
        src_bytes = element_size(bi.dtype) + sum(element_size(inf.dtype) if inf is not None else 0 for inf in infos)
        plans.append(TensorPlan(k, "merge", tuple(out_shape), bi.dtype, out_dtype or bi.dtype, compute,
                                src_keys=src_keys, adjust=adjust,
                                chunkable=chunk and not dare and all(a in (None, "zero") for a in adjust),
                                src_bytes=src_bytes))
    if problems:
        raise MismatchError(f"{len(problems)} problem(s) lining up the models (on_mismatch={on_mismatch!r}):\n  "
                            + "\n  ".join(problems[:20]) + ("\n  ..." if len(problems) > 20 else "")
                            + ("\nuse on_mismatch='skip'|'pad'|'truncate' (CLI: --on-mismatch) to merge anyway"
                               if on_mismatch == "error" else ""))
    merged_keys = sorted(t.name for t in plans if t.action == "merge")
    if not merged_keys:
        raise ConfigError("no tensor selected for merging (check include/exclude)")
    col = {k: i for i, k in enumerate(merged_keys)}
    for t in plans:
        if t.action == "merge":
            t.col = col[t.name]
    table = _weights_table(weights, merged_keys, T, canonical)
    if table is not None and not bool(torch.isfinite(table).all()):
        raise ConfigError(f"{canonical}: weights must be finite numbers (a weight is inf or NaN)")
    # groups
    slots = 2 if prefetch else 1
    group_budget = max(512, budget // slots)
    groups = _make_groups([t for t in plans if t.action == "merge"], T, canonical, p, group_budget)
    copy_groups = _make_groups([t for t in plans if t.action == "copy"], 0, "copy", {}, group_budget)
    out_specs = [OutputSpec(t.name, t.shape, t.out_dtype) for t in plans]
    return MergePlan(canonical, p, base_ck, model_cks, plans, merged_keys, table, groups, copy_groups, report, notes,
                     group_budget, prefetch, out_specs)


def _validate_params(canonical: str, p: Dict[str, Any], T: int) -> None:
    def frac(name, lo_open):
        v = p[name]
        vals = list(v) if isinstance(v, (list, tuple)) else [v]
        for x in vals:
            try:
                x = float(x)
            except (TypeError, ValueError):
                raise ConfigError(f"{canonical}: {name} must be a number, got {x!r}") from None
            if not ((0.0 < x <= 1.0) if lo_open else (0.0 <= x <= 1.0)):
                raise ConfigError(f"{canonical}: {name} must be in {'(0, 1]' if lo_open else '[0, 1]'}, got {x}")
        if isinstance(v, (list, tuple)) and len(v) != T:
            raise ConfigError(f"{canonical}: {name} needs 1 or {T} values (one per model), got {len(v)}")

    if "density" in p and _uses_ties(canonical, p) and canonical != "consensus_merging":
        frac("density", True)
    if canonical == "dare_merging":
        frac("p", False)
        if p["combine"] not in ("task_arithmetic", "ties"):
            raise ConfigError(f"dare_merging: combine must be 'task_arithmetic' or 'ties', got {p['combine']!r}")
    if "merge" in p and p["merge"] not in ("sum", "mean", "max"):
        raise ConfigError(f"{canonical}: merge must be 'sum', 'mean' or 'max', got {p['merge']!r}")
    if "mode" in p and p["mode"] not in ("global", "per_tensor"):
        raise ConfigError(f"{canonical}: mode must be 'global' or 'per_tensor', got {p['mode']!r}")
    if canonical == "consensus_merging":
        if p["mtl"] not in ("sum", "ties"):
            raise ConfigError(f"consensus_merging: mtl must be 'sum' or 'ties', got {p['mtl']!r}")
        if int(p["min_count"]) < 0:
            raise ConfigError(f"consensus_merging: min_count must be >= 0, got {p['min_count']}")
        lam = p["tall_lambdas"]
        n = len(lam) if isinstance(lam, (list, tuple)) else 1
        if n not in (1, T):
            raise ConfigError(f"consensus_merging: tall_lambdas needs 1 or {T} values, got {n}")
        frac("ties_density", True)
        if p["ties_merge"] not in ("sum", "mean", "max"):
            raise ConfigError(f"consensus_merging: ties_merge must be 'sum', 'mean' or 'max', got {p['ties_merge']!r}")
    for k in ("scaling", "alpha"):
        if k in p and not _is_simple_number(p[k]):
            raise ConfigError(f"{canonical}: {k} must be a number, got {p[k]!r}")
    if "seed" in p and not isinstance(p["seed"], int):
        raise ConfigError(f"{canonical}: seed must be an integer, got {p['seed']!r}")
    for k in ("scaling", "alpha", "tall_lambdas"):  # NaN/inf would silently give an all-NaN model
        try:
            check_finite(k, p.get(k), canonical)
        except ValueError as e:
            raise ConfigError(str(e)) from None


def _weights_table(weights, keys: List[str], T: int, canonical: str) -> Optional[Tensor]:
    """[T, L] float32 per-task, per-tensor weights (None = all ones).  Accepts what the in-memory methods
    accept (a number, T numbers, a [T, L] table over the sorted merged keys, a mapping key -> T numbers)
    and, per model, mergekit-style specs (see :func:`weight_for`)."""
    if weights is None:
        return None
    if canonical == "consensus_merging":
        raise ConfigError("consensus_merging does not take per-model weights")
    from .methods._common import per_key_table

    shim = SimpleNamespace(T=T, L=len(keys), keys=keys)
    if isinstance(weights, (list, tuple)) and len(weights) == T and not all(_is_simple_number(w) for w in weights) \
            and not isinstance(weights, Tensor) and not all(isinstance(w, (list, tuple)) and len(w) == len(keys)
                                                            and all(_is_simple_number(x) for x in w) for w in weights):
        nl = max([layer_index(k) for k in keys if layer_index(k) is not None] or [-1]) + 1
        table = torch.empty(T, len(keys), dtype=torch.float32)
        for t, spec in enumerate(weights):
            spec = 1.0 if spec is None else spec
            for l, k in enumerate(keys):
                table[t, l] = weight_for(spec, k, nl)
        return table
    try:
        return per_key_table(weights, shim, "weights")
    except ValueError as e:
        raise ConfigError(str(e)) from e


def _make_groups(plans: List[TensorPlan], T: int, method: str, params: Mapping[str, Any], budget: int) -> List[List[Piece]]:
    groups: List[List[Piece]] = []
    cur: List[Piece] = []
    cur_cost = 0
    align = 64  # elements per slice, at least
    for t in plans:
        if method == "copy":
            per = element_size(t.base_dtype) * 2
        else:
            per = _piece_cost_per_element(t, T, method, params)
        n = t.numel
        if t.chunkable and n * per > budget:
            step = max(align, (budget // per) // align * align)
            starts = list(range(0, n, step))
        else:
            step, starts = max(n, 1), [0]
        for s in starts:
            piece = Piece(t, s, min(n, s + step))
            piece._cost = per  # type: ignore[attr-defined]
            c = piece.numel * per
            if cur and cur_cost + c > budget:
                groups.append(cur)
                cur, cur_cost = [], 0
            cur.append(piece)
            cur_cost += c
    if cur:
        groups.append(cur)
    return groups


# ------------------------------------------------------------------------------------------------
# Reading groups
# ------------------------------------------------------------------------------------------------
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


def _split_by_dtype(groups: List[List[Piece]]) -> List[List[Piece]]:
    out = []
    for g in groups:
        cur: List[Piece] = []
        for p in g:
            if cur and p.plan.compute_dtype != cur[0].plan.compute_dtype:
                out.append(cur)
                cur = []
            cur.append(p)
        if cur:
            out.append(cur)
    return out


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


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------
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


def _default_metadata(plan: MergePlan, sources: Mapping[str, Any], extra: Optional[Mapping[str, Any]]) -> Dict[str, str]:
    try:
        from . import __version__ as version
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


def _run_engine(plan: MergePlan, sink: OutputSink, timer: _Timer, result: StreamResult, progress: bool,
                nonfinite: str, device, prefetch: bool):
    """Run every pass into ``sink`` and finish it (for a folder: files complete and synced, not yet
    published); returns what the sink's commit returns."""
    with sink:
        engine = _Engine(plan, sink, timer, progress=progress, nonfinite=nonfinite, device=device,
                         async_write=prefetch)
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


class _Engine:
    def __init__(self, plan: MergePlan, sink: OutputSink, timer: _Timer, progress: bool, nonfinite: str, device,
                 async_write: bool = True):
        self.plan, self.sink, self.timer = plan, sink, timer
        self.async_write = async_write
        self.progress, self.nonfinite, self.device = progress, nonfinite, device
        self.reader = _Reader(plan, device)
        self.groups = _split_by_dtype(plan.groups)
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

    # -- thresholds --------------------------------------------------------------------------------------
    def _density(self) -> Tuple[List[float], str]:
        p = self.plan.params
        if self.method == "consensus_merging":
            return [float(p["ties_density"])] * self.T, "global"
        d = p["density"]
        dens = [float(x) for x in d] if isinstance(d, (list, tuple)) else [float(d)] * self.T
        return dens, p.get("mode", "global")

    def _global_thresholds(self, dens: List[float]) -> Tensor:
        """fp32 [T]: each task's exact k-th smallest |tau| over the whole merged model.

        First the one-pass bracket select (as :func:`calm_fast.selection.kth_smallest_abs` does for resident
        tensors): a sample of |tau| read from a few slices of every tensor predicts an interval around the
        k-th value, one ``abs_bracket`` pass counts the elements below / at / inside / at the top of it and
        keeps the ~1% inside, among which the k-th is selected exactly.  Tasks it does not pin (a biased
        sample, or more candidates than half the memory budget) get the two-pass radix count.  Exact
        either way; the sample only decides whether it takes one pass or three."""
        N = self.plan.merged_numel()
        ks = [selection.topk_fraction_to_k(N, d) for d in dens]
        result = torch.full((self.T,), selection.KEEP_ALL, dtype=torch.float32)
        todo = torch.tensor([k > 0 for k in ks], dtype=torch.bool)
        if BRACKET_SELECT and bool(todo.any()):
            result, todo = self._bracket_thresholds(ks, N, todo, result)
        if bool(todo.any()):
            radix = self._radix_thresholds([k if bool(todo[t]) else 0 for t, k in enumerate(ks)])
            result = torch.where(todo, radix, result)
        return result

    def _radix_thresholds(self, ks: List[int]) -> Tensor:
        finder = selection.ThresholdFinder(self.T, ks, dare_p=self.dare_p, dare_rescale=self.rescale)

        def add(loaded: _Loaded) -> None:
            t0 = time.perf_counter()
            finder.add(loaded.inputs(), loaded.base, self._dare_keys(loaded.pieces))
            self.timer.add("select", time.perf_counter() - t0)

        self.passes += 1
        self._pass(f"pass {self.passes} thresholds (radix, coarse)", self.groups, add)
        finder.next_level()
        if bool((finder.k > 0).any()):
            self.passes += 1
            self._pass(f"pass {self.passes} thresholds (radix, exact)", self.groups, add)
        return finder.thresholds()

    def _sample_abs_tau(self, N: int) -> List[Tensor]:
        """Per task, sorted |tau| (fp32, DARE applied) at about SAMPLE_SIZE positions: a few evenly spaced
        contiguous slices of every merged tensor, in proportion to its size (a handful of small reads)."""
        from .reference import philox_uniform  # the kernels' Philox stream, on a few indices

        plan, T = self.plan, self.T
        parts: List[List[Tensor]] = [[] for _ in range(T)]
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # thousands of tiny ops: the intra-op pool only adds overhead here
        try:
            for tp in plan.tensors:
                if tp.action != "merge" or tp.numel == 0 or any(a in ("pad", "truncate") for a in tp.adjust):
                    continue
                n = tp.numel
                s = min(n, max(1, round(SAMPLE_SIZE * n / N)))
                runs = min(SAMPLE_RUNS, s)
                length = max(1, s // runs)
                starts = sorted({min(n - length, j * n // runs) for j in range(runs)})
                b = torch.cat([plan.base.read(tp.name, a, a + length) for a in starts]).float()
                idx = None
                if self.dare_p > 0:
                    idx = torch.cat([torch.arange(a, a + length, dtype=torch.int64) for a in starts])
                    keys = ops.dare_keys(self.seed, [tp.name], T)
                    scale = (1.0 / (1.0 - self.dare_p) if self.dare_p < 1 else 0.0) if self.rescale else 1.0
                for t, m in enumerate(plan.models):
                    if tp.adjust[t + 1] == "zero":
                        v = torch.zeros_like(b)
                    else:
                        v = torch.cat([m.read(tp.src_keys[t], a, a + length) for a in starts]).float() - b
                    if idx is not None:
                        keep = philox_uniform(idx, int(keys[t, 0])) >= self.dare_p
                        v = torch.where(keep, v * torch.tensor(scale, dtype=torch.float32), torch.zeros_like(v))
                    parts[t].append(v.abs())
            return [torch.sort(torch.cat(p)).values if p else torch.zeros(0) for p in parts]
        finally:
            torch.set_num_threads(threads)

    def _bracket_thresholds(self, ks: List[int], N: int, todo: Tensor, result: Tensor) -> Tuple[Tensor, Tensor]:
        t0 = time.perf_counter()
        samples = self._sample_abs_tau(N)
        lo, hi, width = selection.bracket_bounds(samples, ks, N, todo)
        self.timer.add("select", time.perf_counter() - t0)
        counts = torch.zeros(self.T, 4, dtype=torch.int64)
        cands: List[List[Tensor]] = [[] for _ in range(self.T)]
        kept = [0] * self.T
        lost = [False] * self.T
        cap_bytes = parse_size(BRACKET_CANDIDATE_BYTES) if BRACKET_CANDIDATE_BYTES is not None else \
            max(self.plan.group_budget, 1 << 20)
        cap_total = cap_bytes // 4  # fp32 candidates kept, all tasks together

        def bracket(loaded: _Loaded) -> None:
            t1 = time.perf_counter()
            n_g = sum(p.numel for p in loaded.pieces)
            capacity = min(n_g, int(2 * width * n_g) + 4096)
            ins = loaded.inputs()
            dev = ins[0].device if ins else lo.device
            keys = self._dare_keys(loaded.pieces)
            c, cand = ops.abs_bracket(ins, loaded.base, self.T, lo.to(dev), hi.to(dev), capacity, self.dare_p,
                                      keys.to(dev) if keys is not None else None, self.rescale)
            c, cand = c.cpu(), cand.cpu()  # counts and candidates are small: resolve on the host
            counts.add_(c)
            for t in range(self.T):
                inside = int(c[t, 2])
                if lost[t] or inside == 0:
                    continue
                if inside > capacity or sum(kept) + inside > cap_total:
                    lost[t] = True  # this task's candidates are incomplete: it falls back to the radix count
                    kept[t] = 0
                    cands[t] = []
                    continue
                cands[t].append(cand[t, :inside].clone())
                kept[t] += inside
            self.timer.add("select", time.perf_counter() - t1)

        self.passes += 1
        self._pass(f"pass {self.passes} thresholds (bracket)", self.groups, bracket)
        t2 = time.perf_counter()
        pools = [None if lost[t] else (torch.cat(cands[t]) if cands[t] else torch.zeros(0)) for t in range(self.T)]
        still = selection.resolve_bracket(counts, pools, ks, todo, lo, hi, result)
        self.timer.add("select", time.perf_counter() - t2)
        self.bracket_fallbacks = int(still.sum())
        return result, still

    def _per_tensor_thresholds_split(self, dens: List[float]) -> Dict[str, Tensor]:
        """Per-tensor thresholds of the tensors that are processed in slices (two passes over just them)."""
        split = {}
        for g in self.groups:
            for p in g:
                if not p.whole:
                    split.setdefault(p.plan.name, []).append(p)
        if not split or all(d >= 1.0 for d in dens):
            return {}
        finders, keep_none = {}, {}
        for name, pieces in split.items():
            n = pieces[0].plan.numel
            ranks = [selection.exact_k_rank(n, d) for d in dens]  # PEFT/mergekit: exactly floor(d*n) kept
            keep_none[name] = [t for t, r in enumerate(ranks) if r == selection.KEEP_NONE_RANK]
            finders[name] = selection.ThresholdFinder(self.T, [n if r == selection.KEEP_NONE_RANK else r for r in ranks],
                                                      dare_p=self.dare_p, dare_rescale=self.rescale)
        groups = [[p] for pieces in split.values() for p in pieces]

        def add(loaded: _Loaded) -> None:
            t0 = time.perf_counter()
            p = loaded.pieces[0]
            finders[p.plan.name].add(loaded.inputs(), loaded.base, self._dare_keys(loaded.pieces))
            self.timer.add("select", time.perf_counter() - t0)

        self._pass("per-tensor thresholds of split tensors (coarse)", groups, add)
        for f in finders.values():
            f.next_level()
        self._pass("per-tensor thresholds of split tensors (exact)", groups, add)
        out = {}
        for name, f in finders.items():
            thr = f.thresholds().clone()
            thr[keep_none[name]] = float("inf")  # k == 0: nothing kept
            out[name] = thr
        return out

    def _thresholds_for(self, loaded: _Loaded, dens: List[float], mode: str, global_thr: Optional[Tensor],
                        split_thr: Dict[str, Tensor]) -> Tensor:
        L = len(loaded.pieces)
        if all(d >= 1.0 for d in dens):
            return torch.zeros(self.T, L)
        if mode == "global":
            return global_thr[:, None].expand(self.T, L).contiguous()
        t0 = time.perf_counter()
        table = torch.zeros(self.T, L)
        dk = self._dare_keys(loaded.pieces)
        for j, piece in enumerate(loaded.pieces):
            if piece.plan.name in split_thr:
                table[:, j] = split_thr[piece.plan.name]
                continue
            n = piece.numel
            if n == 0:
                continue
            ranks = [selection.exact_k_rank(n, d) for d in dens]  # PEFT/mergekit: exactly floor(d*n) kept
            ks = [n if r == selection.KEEP_NONE_RANK else r for r in ranks]
            sub = [loaded.models[t][j] for t in range(self.T)]
            table[:, j] = selection.kth_smallest_abs(sub, [loaded.base[j]], self.T, ks, dare_p=self.dare_p,
                                                     dare_keys=dk[:, [j]].contiguous() if dk is not None else None,
                                                     dare_rescale=self.rescale, method=PER_TENSOR_SELECT)
            for t, r in enumerate(ranks):
                if r == selection.KEEP_NONE_RANK:
                    table[t, j] = float("inf")  # k == 0: nothing kept
        self.timer.add("select", time.perf_counter() - t0)
        return table

    # -- main -------------------------------------------------------------------------------------------
    def run(self) -> None:
        self.writer = _AsyncWriter(self.sink, self.timer, enabled=self.async_write)
        try:
            self._run()
            self.writer.flush()
        finally:
            self.writer.close()

    def _run(self) -> None:
        plan = self.plan
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
        self.position_budget = MAX_RECORDED_POSITIONS
        npass = self.passes + 1
        self.passes += 1

        def merge(loaded: _Loaded) -> None:
            thr = self._thresholds_for(loaded, dens, mode, global_thr, split_thr) if self.ties else None
            self._merge_group(loaded, thr, zero_sign=1, record=True)

        self._pass(f"pass {npass} merge", self.groups, merge)
        # TIES: the global majority sign, and the patch of exactly cancelled elements
        if self.ties:
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
        if plan.copy_groups:
            def copy(loaded: _Loaded) -> None:
                # synchronous: the tensors are views of the read buffers, which are reused
                self.writer.flush()
                self.writer._write([(p.plan.name, b.reshape(p.plan.shape) if p.whole else b, p.start)
                                    for p, b in zip(loaded.pieces, loaded.base)])

            self._pass("copy unmerged tensors", plan.copy_groups, copy, base_only=True)

    def _merge_group(self, loaded: _Loaded, thr: Optional[Tensor], zero_sign: int, record: bool) -> None:
        p = self.plan.params
        T = self.T
        inputs, base = loaded.inputs(), loaded.base
        out_float = self._out_float(loaded)
        t0 = time.perf_counter()
        if self.method == "task_arithmetic" or (self.method == "dare_merging" and p["combine"] == "task_arithmetic"):
            out, bad = ops.weighted_merge(inputs, base, T, self._table(self.weights, loaded.pieces),
                                          scale=float(p["scaling"]), dare_p=self.dare_p,
                                          dare_keys=self._dare_keys(loaded.pieces), dare_rescale=self.rescale,
                                          out_float=out_float)
            self.timer.add("merge", time.perf_counter() - t0)
            self._check_nonfinite(bad, loaded)
            self._emit(loaded, out)
            return
        if self.method in ("ties_merging", "dare_merging"):
            res = ops.ties_merge(inputs, base, T, thr, merge=p["merge"], scale=float(p["scaling"]),
                                 weights=self._table(self.weights, loaded.pieces), zero_sign=zero_sign,
                                 dare_p=self.dare_p, dare_keys=self._dare_keys(loaded.pieces),
                                 dare_rescale=self.rescale, out_float=out_float,
                                 max_positions=max(0, self.position_budget) if record else 0)
            self.timer.add("merge", time.perf_counter() - t0)
            outputs, sign_sums, positions, patch, cancel, bad = res
            self._check_nonfinite(bad, loaded)
            if record:
                self._record(loaded, sign_sums, positions, patch, cancel, [o.dtype for o in outputs])
            self._emit(loaded, outputs)
            return
        # consensus
        lam = torch.as_tensor(p["tall_lambdas"], dtype=torch.float32).reshape(-1)
        lam = lam.expand(T).contiguous() if lam.numel() == 1 else lam
        given = None
        if p["mtl"] == "ties":
            res = ops.ties_merge(inputs, base, T, thr, merge=p["ties_merge"], scale=1.0, weights=1.0,
                                 zero_sign=zero_sign, out_float=False if loaded.dtype == torch.float32 else True,
                                 max_positions=max(0, self.position_budget) if record else 0)
            tm, sign_sums, positions, patch, cancel, bad = res
            self._check_nonfinite(bad, loaded)
            given = [(o - b.float()).contiguous() for o, b in zip(tm, base)]
        out, _, bad = ops.consensus_merge(inputs, base, T, lam, mtl=given, min_count=int(p["min_count"]),
                                          alpha=float(p["alpha"]), return_masks=False, out_float=out_float)
        self.timer.add("merge", time.perf_counter() - t0)
        self._check_nonfinite(bad, loaded)
        if p["mtl"] == "ties" and record:
            # alternatives of the consensus output at the cancelled positions, for every zero sign
            alt = self._consensus_alternatives(loaded, positions, patch, lam, out_float)
            self._record(loaded, sign_sums, positions, alt, cancel, [o.dtype for o in out])
        self._emit(loaded, out)

    def _consensus_alternatives(self, loaded: _Loaded, positions: Tensor, patch: Tensor, lam: Tensor,
                                out_float: bool) -> Tensor:
        """[P, 3] consensus outputs at the cancelled positions for zero signs +1, -1, 0 (elementwise, so
        computing them on the gathered elements gives exactly what a full pass would)."""
        P = positions.numel()
        if P == 0:
            return patch
        p = self.plan.params
        flat_in = [torch.cat([x.reshape(-1) for x in per]) for per in loaded.models]
        flat_b = torch.cat([b.reshape(-1) for b in loaded.base])
        pos = positions.to(flat_b.device)
        g_in = [x[pos].contiguous() for x in flat_in]
        g_b = flat_b[pos].contiguous()
        cols = []
        for c in range(3):
            mtl = (patch[:, c].to(torch.float32) - g_b.float()).contiguous()
            o, _, _ = ops.consensus_merge(g_in, [g_b], self.T, lam, mtl=[mtl], min_count=int(p["min_count"]),
                                          alpha=float(p["alpha"]), return_masks=False, out_float=True)
            cols.append(o[0].float())
        del flat_in, flat_b
        return torch.stack(cols, dim=1)

    def _record(self, loaded: _Loaded, sign_sums: Tensor, positions: Tensor, patch: Tensor, cancel: Tensor,
                out_dtypes: List[torch.dtype]) -> None:
        self.sign_total += int(sign_sums.sum())
        n_cancel = int(cancel.sum())
        if n_cancel == 0:
            return
        if n_cancel > positions.numel():
            self.overflow_groups.append(loaded.pieces)
            self.position_budget = 0
            return
        self.position_budget -= positions.numel()
        self.records.append((loaded.pieces, positions.cpu(), patch.cpu(), out_dtypes))

    def _apply_patch(self, pieces: List[Piece], positions: Tensor, values: Tensor, mu: int,
                     out_dtypes: List[torch.dtype]) -> None:
        # bookkeeping in numpy: tiny torch ops pay intra-op thread-pool overheads that dominate here
        import numpy as np

        column = {1: 0, -1: 1, 0: 2}[mu]
        numels = np.array([p.numel for p in pieces], dtype=np.int64)
        ends = np.cumsum(numels)
        starts = ends - numels
        pos = positions.numpy()
        which = np.searchsorted(ends, pos, side="right")
        order = np.argsort(which, kind="stable")
        which_sorted = which[order]
        bounds = np.searchsorted(which_sorted, np.arange(len(pieces) + 1), side="left")
        vals = values[:, column].contiguous()
        for j in range(len(pieces)):
            a, b = int(bounds[j]), int(bounds[j + 1])
            if a == b:
                continue
            sel = torch.from_numpy(order[a:b])
            piece = pieces[j]
            idx = torch.from_numpy(pos[order[a:b]] - starts[j] + piece.start)
            # the same roundings as the in-memory patch: fp32 -> kernel output dtype -> output dtype
            v = vals.index_select(0, sel).to(out_dtypes[j]).to(piece.plan.out_dtype)
            self.sink.patch(piece.plan.name, idx, v)
            self.patched += b - a
