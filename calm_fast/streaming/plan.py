"""The plan of a streaming merge: which tensors are merged or copied, how they line up across the models
(mismatch policies), and how they are cut into groups and pieces that fit the memory budget."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .. import ops
from ..io.errors import CheckpointError, ConfigError, MismatchError
from ..io.formats import (MERGEABLE_DTYPES, Checkpoint, LoraCheckpoint, element_size, format_bytes,
                          is_lora_adapter, open_checkpoint, parse_size)
from ..io.writer import OutputSpec
from ..methods._common import resolve_out_dtype
from . import params as P
from .params import (MISMATCH_POLICIES, _check_patterns, _jsonable, _needs_global_threshold, _validate_params,
                     _weights_table, resolve_method)

Tensor = torch.Tensor


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
        return 2 if P.BRACKET_SELECT else 3

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
