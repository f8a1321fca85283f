"""``calm-fast merge`` for the in-memory methods: the data-based ones (``--method calm``; AdaMerging and its
variants register here the same way) and data-free DOGE_TA (``--method doge_ta``).

Unlike the streaming methods these hold the models in memory and, for the data-based ones, run a network
on unlabeled data through a model adapter.  The flow is the same for every data-based method:

1. the file (:class:`calm_fast.data_config.DataMergeConfig`) and the flags (they win) are validated; the
   method's parameters by its schema;
2. cheap checks before anything is loaded: the schedule names known tasks, every task that needs data has
   some, every path exists, the output can be written (and ``--json``);
3. the adapter and the data are loaded and checked against each other: heads' class counts, labels, the
   network runs on one sample of each task, a ratio so small that a credible set must be empty;
4. ``--dry-run`` prints the plan and a memory estimate and stops (nothing is written);
5. the method runs; the output folder is staged and published with one rename
   (:class:`calm_fast.io.AtomicOutput`): the base checkpoint with the merged tensors replaced
   (``model.safetensors``, sharded above ``shard_size``; ``config.json`` and tokenizer files copied from a
   base folder), the method's JSON record and its extra files.  A failed run leaves no output.

Registering a data-based method is one entry of :data:`DATA_METHODS`: the Python function (same adapter and
unlabeled-input arguments as :func:`calm_fast.calm`), and optionally its parameter schema (default: derived
from the function's signature), keywords implied by the method name, and hooks.  For example::

    "adamerging_pp": DataMethod("calm_fast.methods.adamerging:adamerging", fixed={"mode": "adamerging_pp"}),
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Type

import torch

from .data_config import (CalmParameters, DataMergeConfig, DogeMergeConfig, DogeParameters, EntrySource,
                          resolve_data_paths, resolve_doge_paths, schema_from_signature, validate,
                          validate_parameters)
from .distributed import DistributedError
from .io.errors import CheckpointError, ConfigError, MismatchError

Tensor = torch.Tensor

#: keywords of a data-based method that never come from the file's ``parameters``
DATA_KEYWORDS = ("teacher_logits", "eval_data", "batch_sampler", "callback", "progress", "data_parallel",
                 "shard_layers")


class DataError(ConfigError):
    """The data does not fit the models or the settings (exit 2): missing data for a task, labels outside
    a head's classes, an empty credible set, a network that cannot run on the data."""


# ------------------------------------------------------------------------------------------------
# The registry
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataMethod:
    """A data-based method of the CLI.

    function: ``module:function``, called as ``function(pretrained, finetuned, adapter, unlabeled_inputs,
        **parameters)`` (plus ``eval_data``, ``teacher_logits``, ``progress`` when it accepts them); its
        result has the merged state dict as ``.state_dict`` (or ``.merged``) and optionally ``record()``.
    parameters: the strict schema of the parameters a file may give (default: from the signature).
    fixed: keywords the method name implies (an error if the file gives another value).
    needs_data: ``(parameters, task names) -> tasks that need unlabeled data`` (default: all).
    check: ``(parameters, {task: num_samples}, {task: teacher logits}) -> None``, raising :class:`DataError`.
    plan: ``(parameters, task names) -> lines`` for the dry run (e.g. the schedule).
    extra_files: ``(result, AtomicOutput) -> [paths]``: files written beside the model (the record is written
        for every method as ``<name>_record.json``).
    working_buffers: peak working memory beyond the inputs, in fp32 copies of the merged tensors.
    """

    function: str
    parameters: Optional[Type] = None
    fixed: Mapping[str, Any] = field(default_factory=dict)
    needs_data: Optional[Callable[[Mapping[str, Any], List[str]], List[str]]] = None
    check: Optional[Callable[..., None]] = None
    plan: Optional[Callable[[Mapping[str, Any], List[str]], List[str]]] = None
    extra_files: Optional[Callable[[Any, Any], List[str]]] = None
    working_buffers: float = 4.0

    def resolve(self) -> Callable:
        mod, _, attr = self.function.partition(":")
        return getattr(importlib.import_module(mod), attr)

    def schema(self) -> Type:
        if self.parameters is not None:
            return self.parameters
        return schema_from_signature(self.resolve(), skip=DATA_KEYWORDS)

    def defaults(self) -> Dict[str, Any]:
        sig = inspect.signature(self.resolve())
        return {k: p.default for k, p in sig.parameters.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty
                and k not in DATA_KEYWORDS}

    def accepts(self, keyword: str) -> bool:
        return keyword in inspect.signature(self.resolve()).parameters


# -- CALM's hooks ----------------------------------------------------------------------------------
def _calm_groups(params: Mapping[str, Any], tasks: List[str]) -> List[List[int]]:
    from .methods.calm import resolve_schedule

    try:
        return resolve_schedule(params.get("schedule"), tasks, int(params.get("seed", 0)))
    except ValueError as e:
        raise ConfigError(f"parameters.schedule: {e}") from None


def _calm_needs_data(params: Mapping[str, Any], tasks: List[str]) -> List[str]:
    groups = _calm_groups(params, tasks)
    return [tasks[i] for g in groups for i in g] if len(groups) > 1 else []


def min_credible_class(ratio: float) -> int:
    """The smallest class size k with floor(ratio · k) >= 1 (smaller classes keep no credible sample)."""
    k = max(1, math.ceil(1.0 / ratio))
    while math.floor(ratio * k) < 1:
        k += 1
    while k > 1 and math.floor(ratio * (k - 1)) >= 1:
        k -= 1
    return k


def _calm_check(params: Mapping[str, Any], sizes: Mapping[str, int], teacher: Mapping[str, Tensor]) -> None:
    """A ratio so small that a task's credible set must be empty: exact with teacher logits, else when even a
    single predicted class holding every sample would keep none."""
    from .methods.credible import credible_samples

    ratio = float(params["ratio"])
    need = min_credible_class(ratio)
    for t, n in sizes.items():
        if t in teacher:
            try:
                credible_samples(teacher[t], ratio, class_balanced=bool(params["class_balanced"]), task=t)
            except ValueError as e:
                raise DataError(str(e)) from None
        elif n < need:
            raise DataError(f"task {t!r}: the credible set would be empty: ratio={ratio} keeps floor(ratio * "
                            f"class size) = 0 samples of any predicted class smaller than {need}, and the task has "
                            f"{n} unlabeled samples; raise the ratio or give more data")


def _calm_plan(params: Mapping[str, Any], tasks: List[str]) -> List[str]:
    groups = _calm_groups(params, tasks)
    lines = [f"schedule: step 0 task arithmetic ({params['ta_scaling']} x sum) of {[tasks[i] for i in groups[0]]}"]
    for s, g in enumerate(groups[1:], start=1):
        lines.append(f"          step {s} mask optimisation of {tasks[g[0]]!r}: {params['iterations']} iterations, "
                     f"{params['batches_per_task']} batch(es) of {params['batch_size']} per seen task")
    return lines


def _calm_files(result: Any, out: Any) -> List[str]:
    from .io.writer import save_state_dict

    extra = {f"mask.step{i}.{m['task']}": m["packed"].cpu().contiguous() for i, m in enumerate(result.masks)}
    for t, c in result.credible.items():
        extra[f"credible.{t}.ids"] = c.ids.contiguous()
        extra[f"credible.{t}.labels"] = c.labels.contiguous()
    if not extra:
        return []
    save_state_dict(extra, "calm_masks.safetensors", output=out)
    return [out.final_path("calm_masks.safetensors")]


DATA_METHODS: Dict[str, DataMethod] = {
    "calm": DataMethod("calm_fast.methods.calm:calm", CalmParameters, needs_data=_calm_needs_data, check=_calm_check,
                       plan=_calm_plan, extra_files=_calm_files, working_buffers=10.0),
    # the AdaMerging family: the parameter schema is derived from the function signature
    "adamerging": DataMethod("calm_fast.methods.adamerging:adamerging", fixed={"mode": "adamerging"}),
    "adamerging_pp": DataMethod("calm_fast.methods.adamerging:adamerging", fixed={"mode": "adamerging_pp"}),
    "doge_adamerging": DataMethod("calm_fast.methods.doge_adamerging:doge_adamerging"),
}
#: the data-free in-memory methods
DATA_FREE_METHODS = ("doge_ta",)


def method_key(name: Optional[str]) -> Optional[str]:
    return None if not isinstance(name, str) else name.lower().replace("-", "_")


def available(entry: DataMethod) -> bool:
    """Whether the module of a registered method is part of this installation."""
    import importlib.util

    try:
        return importlib.util.find_spec(entry.function.partition(":")[0]) is not None
    except ModuleNotFoundError:
        return False


def handles(method: Optional[str]) -> bool:
    key = method_key(method)
    return (key in DATA_METHODS and available(DATA_METHODS[key])) or key in DATA_FREE_METHODS


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of the in-memory methods (added to ``calm-fast merge``)."""
    g = p.add_argument_group("in-memory methods (calm, doge_ta)")
    g.add_argument("--device", help="where the method runs: cpu (default), cuda, cuda:1 ...")


def peek_method(args: argparse.Namespace) -> Optional[str]:
    """The method the command asks for: ``--method``, else the config file's ``merge_method``/``method``
    (None when the file cannot be read: the streaming path reports that)."""
    if args.method:
        return args.method
    if not args.config:
        return None
    from .config import parse_yaml

    try:
        data = parse_yaml(Path(args.config).read_text(encoding="utf-8"), str(args.config))
    except (OSError, UnicodeDecodeError, ConfigError):
        return None
    if isinstance(data, dict):
        m = data.get("merge_method", data.get("method"))
        return m if isinstance(m, str) else None
    return None


#: streaming-method flags (dest names) and which in-memory methods accept them
_FOREIGN_FLAGS = {"scaling": "--scaling", "merge": "--merge", "mode": "--mode", "p": "--p", "rescale": "--rescale",
                  "combine": "--combine", "tall_lambdas": "--tall-lambdas", "min_count": "--min-count",
                  "alpha": "--alpha", "mtl": "--mtl", "ties_density": "--ties-density", "ties_merge": "--ties-merge",
                  "weights": "--weights", "on_mismatch": "--on-mismatch", "memory_budget": "--memory-budget",
                  "nonfinite": "--nonfinite", "density": "--density", "seed": "--seed", "model": "--model",
                  "include": "--include", "exclude": "--exclude"}
_DOGE_FLAGS = {"density", "model", "include", "exclude"}
_DATA_FLAGS = {"seed"}


def _refuse_flags(args: argparse.Namespace, allowed: set, method: str) -> None:
    given = [flag for dest, flag in _FOREIGN_FLAGS.items() if dest not in allowed and getattr(args, dest, None)
             not in (None, False, [])]
    if getattr(args, "no_prefetch", False):
        given.append("--no-prefetch")
    if given:
        hint = (" (the fine-tuned models and their data are given per task under 'tasks:' in the config)"
                if "--model" in given else "")
        raise ConfigError(f"{', '.join(given)} do(es) not apply to --method {method}{hint}; use --set KEY=VALUE "
                          "for its parameters")


def _set_params(args: argparse.Namespace) -> Dict[str, Any]:
    from .config import parse_yaml

    out: Dict[str, Any] = {}
    for kv in args.set or []:
        if "=" not in kv:
            raise ConfigError(f"--set expects KEY=VALUE, got {kv!r}")
        k, v = kv.split("=", 1)
        out[k.strip()] = parse_yaml(v, f"--set {k.strip()}")
    return out


def _load_file(args: argparse.Namespace) -> tuple:
    """(parsed YAML mapping, the file's folder) or ({}, cwd) without --config."""
    from .config import parse_yaml

    if not args.config:
        return {}, os.getcwd()
    try:
        text = Path(args.config).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config {args.config}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config {args.config} is not UTF-8 text ({e.reason})") from None
    data = parse_yaml(text, str(args.config))
    if not isinstance(data, dict):
        raise ConfigError(f"{args.config}: expected a mapping of keys at the top level")
    return data, os.path.dirname(os.path.abspath(args.config))


def _flag_path(p: Optional[str]) -> Optional[str]:
    return None if p is None else os.path.abspath(os.path.expanduser(p))


def _dtype(name: Optional[str]) -> Optional[torch.dtype]:
    from .io.formats import parse_dtype

    try:
        return parse_dtype(name)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _json_report(args: argparse.Namespace, output: Optional[str]):
    if not args.json:
        return None
    from .cli import _JsonReport

    class Report(_JsonReport):
        def stage(self, info) -> None:  # info: a JSON-able dict
            with open(self.tmp, "w") as f:
                f.write(json.dumps(info, indent=2, default=str) + "\n")
                f.flush()
                os.fsync(f.fileno())
            self.staged = True

    return Report(args.json, args.dry_run, output)


def run(args: argparse.Namespace, method: str) -> int:
    """``calm-fast merge`` for an in-memory method (returns the exit code; errors are raised as
    :class:`calm_fast.io.CalmFastIOError` for the CLI to map).

    On the ranks ``torchrun`` started (the CLI has joined the process group) every rank runs the method
    data-parallel (CALM, AdaMerging, DOGE + AdaMerging) or layer-sharded (DOGE_TA); rank 0 prints, writes
    the output and ``--json``, the other ranks are quiet.  Rank 0 publishes only after every rank reported
    success, and every rank learns whether the publication succeeded: a failed rank makes the others fail
    with :class:`calm_fast.distributed.DistributedError` (exit 7) and nothing is published."""
    from . import distributed

    key = method_key(method)
    if distributed.rank() != 0:  # rank 0 speaks and writes for everyone
        args.quiet, args.json, args.no_progress = True, None, True
    if key in DATA_FREE_METHODS:
        return run_doge(args)
    return run_data_method(args, key, DATA_METHODS[key])


class _RankWriter:
    """Who writes under torchrun: rank 0 stages the output, then :meth:`agree` collects every rank's
    success before rank 0 publishes, and :meth:`done` tells every rank whether it did."""

    def __init__(self):
        from . import distributed

        self.dist = distributed
        self.on = distributed.is_distributed()
        self.writer = distributed.rank() == 0

    def follow(self) -> None:
        """A rank other than 0: report success, then learn whether rank 0 published."""
        self.agree()
        self.done(True)

    def agree(self) -> None:
        if not self.on:
            return
        oks = self.dist.guarded("merge: agreement before publishing", self.dist.all_gather_object, True)
        if not all(oks):  # pragma: no cover - a failed rank raises instead of reporting False
            raise self.dist.DistributedError("a rank failed before the output was published")

    def publish(self, publisher, report, info: Dict[str, Any]) -> None:
        """Rank 0, output staged: stage the JSON report, wait for every rank's success, publish, and tell
        every rank whether the publication worked."""
        if report is not None:
            report.stage(info)
        self.agree()
        try:
            publisher.publish()
        except BaseException:
            self.done(False)
            raise
        self.done(True)

    def done(self, ok: bool) -> None:
        if not self.on:
            return
        flags = self.dist.guarded("merge: publication", self.dist.all_gather_object, ok)
        if not flags[0]:
            raise self.dist.DistributedError("rank 0 could not publish the output (see its error)")


def _progress(args) -> bool:
    return not args.no_progress and not args.quiet and sys.stderr.isatty()


def _metadata(name: str, params: Mapping[str, Any], sources: Mapping[str, Any],
              extra: Optional[Mapping[str, Any]]) -> Dict[str, str]:
    from . import __version__
    from .streaming.params import _jsonable

    meta = {"calm_fast.method": name, "calm_fast.params": json.dumps(_jsonable(dict(params)), sort_keys=True,
                                                                      default=str),
            "calm_fast.version": str(__version__), "torch.version": torch.__version__}
    for k, v in sources.items():
        if v is not None:
            meta[f"calm_fast.{k}"] = v if isinstance(v, str) else json.dumps(_jsonable(v), default=str)
    for k, v in (extra or {}).items():
        meta[str(k)] = v if isinstance(v, str) else json.dumps(v)
    return meta


# ------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------
def output_state_dict(merged: Mapping[str, Tensor], base_sd: Optional[Mapping[str, Tensor]],
                      out_dtype: Optional[torch.dtype]) -> Dict[str, Tensor]:
    """The model to write: the base checkpoint's tensors (its keys, order and dtypes) with the merged ones
    replaced (found by :func:`calm_fast.data_sources.locate`), or the merged state dict alone without a
    base.  Merged floating tensors are converted to ``out_dtype`` if given, else to the base tensor's dtype."""
    from .data_sources import locate

    if base_sd is None:
        return {k: (v.to(out_dtype) if out_dtype is not None and v.is_floating_point() else v)
                for k, v in merged.items()}
    where = locate(list(merged), list(base_sd), "base_model (writing the merged model)")
    out = dict(base_sd)
    for k, v in merged.items():
        b = base_sd[where[k]]
        if tuple(b.shape) != tuple(v.shape):
            raise MismatchError(f"base_model: {where[k]} has shape {tuple(b.shape)}, the merged {k} has "
                                f"{tuple(v.shape)}")
        want = out_dtype if (out_dtype is not None and v.is_floating_point()) else b.dtype
        out[where[k]] = v.detach().to("cpu", want)
    if out_dtype is not None:
        out = {k: (v.to(out_dtype) if v.is_floating_point() else v) for k, v in out.items()}
    return out


def write_output(out, model: Mapping[str, Tensor], base: Optional[str], *, single: bool, shard_size,
                 copy_config: bool, out_dtype, metadata: Mapping[str, str]) -> List[str]:
    """Stage the model (and a base folder's config/tokenizer files) in the open AtomicOutput ``out``."""
    from .io.writer import save_state_dict
    from .io.writer import copy_aux_files

    paths = save_state_dict(model, out.target, metadata=metadata, output=out,
                            max_shard_size=None if single else shard_size)
    if copy_config and base is not None and Path(base).is_dir() and not single:
        paths += copy_aux_files(base, out, out_dtype)
    return paths


# ------------------------------------------------------------------------------------------------
# Data-based methods
# ------------------------------------------------------------------------------------------------
def _source_text(src: Any) -> str:
    if src is None:
        return "-"
    return f"{src.entry}(...)" if isinstance(src, EntrySource) else str(src)


def _nbytes(x: Any) -> int:
    if isinstance(x, Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, Mapping):
        return sum(_nbytes(v) for v in x.values())
    if isinstance(x, (tuple, list)):
        return sum(_nbytes(v) for v in x)
    return 0


def run_data_method(args: argparse.Namespace, name: str, entry: DataMethod) -> int:
    from .data_sources import DataLoader, build_adapter, check_source
    from .io.formats import format_bytes, open_checkpoint
    from .io.publish import AtomicOutput
    from .models import num_samples, select_batch

    t_start = time.perf_counter()
    _refuse_flags(args, _DATA_FLAGS, name)
    raw, folder = _load_file(args)
    where = str(args.config) if args.config else "config"
    if "models" in raw:
        raise ConfigError(f"{where}: {name} names the fine-tuned models per task, with their data: "
                          "'tasks: {name: {model: PATH, data: PATH}}' instead of 'models:'")
    cfg = resolve_data_paths(validate(DataMergeConfig, raw, where), folder)

    # ---- parameters: the file, then --seed / --set (flags win) ------------------------------------
    schema = entry.schema()
    given = validate_parameters(schema, cfg.parameters or {}, "parameters.")
    if cfg.seed is not None and "seed" in schema.model_fields:
        given.setdefault("seed", cfg.seed)
    flags = _set_params(args)
    if args.seed is not None:
        if "seed" not in schema.model_fields:
            raise ConfigError(f"--seed does not apply to {name}")
        flags["seed"] = args.seed
    given.update(validate_parameters(schema, flags, "--set "))
    for k, v in entry.fixed.items():
        if k in given and given[k] != v:
            raise ConfigError(f"method {name!r} implies {k}={v!r}, got {given[k]!r}")
    params = {**entry.defaults(), **given, **entry.fixed}

    # ---- what to run on ------------------------------------------------------------------------
    if cfg.adapter is None:
        raise ConfigError(f"{where}: no 'adapter' (hf-encoder, open-clip or module:function)")
    if not cfg.tasks:
        raise ConfigError(f"{where}: no 'tasks' (per task: model, data, optional eval)")
    base = _flag_path(args.base) or cfg.base_model
    output = _flag_path(args.out) or cfg.output
    device = args.device or cfg.device
    out_dtype = _dtype(args.out_dtype or args.dtype or cfg.out_dtype or cfg.dtype)
    trust_pickle = bool(args.trust_pickle or cfg.trust_pickle)
    copy_config = False if args.no_copy_config else (True if cfg.copy_config is None else cfg.copy_config)
    shard_size = args.shard_size or cfg.shard_size or "5GB"
    if not output and not args.dry_run:
        raise ConfigError("no output (use --out or 'output' in the config), or --dry-run")
    if output and Path(output).suffix == ".safetensors":
        raise ConfigError(f"{name} writes a folder (the model, its record and extra files): give a folder as output, "
                          f"not {output}")
    tasks = list(cfg.tasks)

    # ---- cheap checks: schedule, data present, paths, output ------------------------------------
    needs = entry.needs_data(params, tasks) if entry.needs_data else list(tasks)
    missing = [t for t in needs if cfg.tasks[t].data is None]
    if missing:
        raise DataError(f"no unlabeled data for task(s) {missing}: give 'data:' under each of them "
                        f"(a .txt/.pt/.safetensors file or a module:function entry point)")
    with_teacher = [t for t in needs if cfg.tasks[t].teacher_logits is not None]
    if with_teacher and len(with_teacher) != len(needs):
        raise DataError(f"teacher_logits given for {with_teacher} but not for "
                        f"{[t for t in needs if t not in with_teacher]}: give them for every task or none")
    _check_device(device)
    if base is None and cfg.adapter.type in ("hf-encoder", "open-clip"):
        raise ConfigError(f"no base model (use --base or 'base_model' in the config): the {cfg.adapter.type} adapter "
                          "reads the pretrained model from it")
    if with_teacher and not entry.accepts("teacher_logits"):
        raise ConfigError(f"{name} takes no teacher_logits (given for {with_teacher})")
    if base is not None and not os.path.exists(base):
        raise CheckpointError(f"base_model: {base} does not exist")
    for t, e in cfg.tasks.items():
        if not os.path.exists(e.model):
            raise CheckpointError(f"task {t!r} model: {e.model} does not exist")
        for what, src in (("data", e.data), ("teacher_logits", e.teacher_logits),
                          ("eval data", e.eval.data if e.eval else None),
                          ("eval labels", e.eval.labels if e.eval else None)):
            if src is not None:
                check_source(src, f"task {t!r} {what}", folder)
    inputs = [p for p in [base] + [e.model for e in cfg.tasks.values()] if p is not None]
    publisher = AtomicOutput(output, overwrite=args.overwrite, single_file=False, protect=inputs) if output else None
    if publisher is not None:
        publisher.check()
    report = _json_report(args, output)
    try:
        # ---- load and check the models and the data -----------------------------------------------
        loaded = build_adapter(cfg.adapter, base, cfg.tasks, folder=folder, device=device, trust_pickle=trust_pickle)
        adapter = loaded.adapter
        pretrained = loaded.pretrained
        finetuned = dict(zip(tasks, loaded.finetuned))
        loader = DataLoader(adapter, folder, cfg.adapter.max_length)
        data = {t: loader.inputs(e.data, t) for t, e in cfg.tasks.items() if e.data is not None}
        evals = {t: loader.eval(e.eval, t) for t, e in cfg.tasks.items() if e.eval is not None}
        teacher = {t: loader.teacher_logits(cfg.tasks[t].teacher_logits, t) for t in with_teacher}
        classes = _check_data(adapter, pretrained, cfg, data, evals, teacher, select_batch, num_samples)
        sizes = {t: num_samples(x) for t, x in data.items()}
        if entry.check is not None:
            entry.check(params, {t: sizes[t] for t in needs}, teacher)

        names = adapter.param_names()
        N = sum(pretrained[k].numel() for k in names)
        elem = max((pretrained[k].element_size() for k in names), default=4)
        base_bytes = 0
        if base is not None:
            with open_checkpoint(base, trust_pickle=trust_pickle) as ck:  # headers only
                base_bytes = ck.total_bytes()
        mem = {"models": (len(tasks) + 1) * N * elem, "base_for_output": base_bytes,
               "working": int(entry.working_buffers * N * 4), "data": _nbytes(data) + _nbytes(evals) + _nbytes(teacher)}
        mem["total"] = sum(mem.values())
        info: Dict[str, Any] = {
            "method": name, "params": params, "dry_run": bool(args.dry_run), "adapter": cfg.adapter.type,
            "adapter_class": type(adapter).__name__, "device": str(adapter.device), "base": base,
            "tasks": {t: {"model": cfg.tasks[t].model, "classes": classes[t], "unlabeled": sizes.get(t),
                          "eval": num_samples(evals[t][0]) if t in evals else None} for t in tasks},
            "merged_tensors": len(names), "merged_parameters": N, "memory_estimate": mem, "output": output,
        }
        from . import distributed as _dist

        if _dist.is_distributed():
            info["ranks"] = _dist.world_size()
        if args.dry_run or not args.quiet:
            print(_describe_data_plan(name, entry, params, cfg, info, format_bytes))
        if args.dry_run:
            info["timings"] = {"total": time.perf_counter() - t_start}
            if report is not None:
                report.finish(info)
            print(f"dry run: {'would write ' + str(output) + ', ' if output else ''}nothing was run and nothing "
                  "was written")
            return 0

        # ---- run ------------------------------------------------------------------------------------
        fn = entry.resolve()
        kwargs = dict(params)
        if evals and entry.accepts("eval_data"):
            kwargs["eval_data"] = evals
        if teacher:
            kwargs["teacher_logits"] = teacher
        if entry.accepts("progress"):
            kwargs["progress"] = _progress(args)
        t0 = time.perf_counter()
        try:
            result = fn(pretrained, finetuned, adapter, data, **kwargs)
        except (ConfigError, CheckpointError, MismatchError, DistributedError):
            raise
        except ValueError as e:
            raise DataError(f"{name}: {e}") from None
        except (RuntimeError, TypeError, IndexError) as e:
            raise DataError(f"{name} failed while running the network: {type(e).__name__}: {e} (check the data's "
                            "shapes and dtypes against the model; --debug shows the traceback)") from e
        info["timings"] = {"method": time.perf_counter() - t0}
        merged = getattr(result, "state_dict", None)
        if not isinstance(merged, Mapping):
            merged = result.merged
        record = result.record() if hasattr(result, "record") else {}

        # ---- write (rank 0 under torchrun, after every rank succeeded) -------------------------------
        from .io import load_state_dict

        ranks = _RankWriter()
        if not ranks.writer:
            ranks.follow()
            return 0
        t0 = time.perf_counter()
        base_sd = load_state_dict(base, trust_pickle=trust_pickle) if base is not None else None
        model = output_state_dict(merged, base_sd, out_dtype)
        meta = _metadata(name, params, {"base": base, "models": {t: cfg.tasks[t].model for t in tasks},
                                        "adapter": cfg.adapter.type}, cfg.metadata)
        with publisher, _output_errors(output):
            paths = write_output(publisher, model, base, single=False, shard_size=shard_size, copy_config=copy_config,
                                 out_dtype=out_dtype, metadata=meta)
            if entry.extra_files is not None:
                paths += entry.extra_files(result, publisher)
            publisher.write_bytes(f"{name}_record.json", json.dumps(record, indent=1, default=str).encode())
            paths.append(publisher.final_path(f"{name}_record.json"))
            info["timings"]["write"] = time.perf_counter() - t0
            info["timings"]["total"] = time.perf_counter() - t_start
            info["paths"] = paths
            info["record"] = {k: record.get(k) for k in ("steps", "timings") if k in record}
            ranks.publish(publisher, report, info)
        if report is not None:
            report.finish(info)
    finally:
        if report is not None:
            report.discard()
    if not args.quiet:
        _print_result(name, record, info)
    return 0


def _check_data(adapter, pretrained, cfg: DataMergeConfig, data, evals, teacher, select_batch, num_samples
                ) -> Dict[str, Optional[int]]:
    """Heads against the config and the data: declared class counts, the network runs on the first samples of
    each task, teacher logits and labels fit the head.  Returns the class count per task."""
    classes: Dict[str, Optional[int]] = {}
    params = {k: pretrained[k].to(adapter.device) for k in adapter.param_names()}
    for t, e in cfg.tasks.items():
        C = adapter.num_classes(t)
        probe = data.get(t, evals[t][0] if t in evals else None)
        if probe is not None:
            n = num_samples(probe)
            if n == 0:
                raise DataError(f"task {t!r}: no samples in its {'unlabeled' if t in data else 'eval'} data")
            ids = torch.arange(min(2, n))
            try:
                with torch.no_grad():
                    z = adapter.logits(params, t, select_batch(probe, ids, adapter.device))
            except (RuntimeError, TypeError, ValueError, IndexError, KeyError) as err:
                raise DataError(f"task {t!r}: the network cannot run on its data: {type(err).__name__}: "
                                f"{str(err).strip().splitlines()[0][:300] if str(err).strip() else ''}") from None
            if z.dim() != 2:
                raise DataError(f"task {t!r}: the network returns logits of shape {list(z.shape)}, "
                                "not [batch, classes]")
            if C is not None and int(z.shape[1]) != int(C):  # pragma: no cover - adapters agree with themselves
                raise DataError(f"task {t!r}: the head returns {z.shape[1]} logits but declares {C} classes")
            C = int(z.shape[1])
        if e.num_classes is not None and C is not None and C != e.num_classes:
            raise DataError(f"task {t!r}: the head has {C} classes but the config says num_classes: {e.num_classes}")
        if t in teacher:
            z = teacher[t]
            if int(z.shape[0]) != num_samples(data[t]):
                raise DataError(f"task {t!r}: {z.shape[0]} teacher logits for {num_samples(data[t])} unlabeled samples")
            if C is not None and int(z.shape[1]) != C:
                raise DataError(f"task {t!r}: the teacher logits have {z.shape[1]} classes but the head has {C}")
        if t in evals:
            x, y = evals[t]
            if int(y.shape[0]) != num_samples(x):
                raise DataError(f"task {t!r}: {num_samples(x)} eval inputs but {y.shape[0]} labels")
            if y.numel() and C is not None and (int(y.max()) >= C or int(y.min()) < 0):
                raise DataError(f"task {t!r}: the eval labels range over [{int(y.min())}, {int(y.max())}] but the head "
                                f"has {C} classes (labels must be in [0, {C}))")
        classes[t] = C
    return classes


def _describe_data_plan(name: str, entry: DataMethod, params, cfg: DataMergeConfig, info, format_bytes) -> str:
    tasks = list(cfg.tasks)
    lines = [f"method: {name} ({entry.function.replace(':', '.')})",
             f"adapter: {cfg.adapter.type} ({info['adapter_class']}), device {info['device']}",
             f"base: {info['base'] or '(from the adapter entry point)'}",
             f"tasks ({len(tasks)}):"]
    for t in tasks:
        e, ti = cfg.tasks[t], info["tasks"][t]
        lines.append(f"  {t}: model {e.model}; head {ti['classes'] if ti['classes'] is not None else '?'} classes; "
                     f"unlabeled {ti['unlabeled'] if ti['unlabeled'] is not None else 'none'}"
                     f"{' (' + _source_text(e.data) + ')' if e.data is not None else ''}"
                     f"{'; eval ' + str(ti['eval']) if ti['eval'] is not None else ''}"
                     f"{'; teacher logits given' if e.teacher_logits is not None else ''}")
    lines.append(f"merged tensors: {info['merged_tensors']} ({info['merged_parameters']:,} parameters)")
    if info.get("ranks"):
        lines.append(f"distributed: {info['ranks']} ranks (torchrun): each iteration's batches split across them, "
                     f"gradients combined by dp_reduction={params.get('dp_reduction', 'allreduce')}; rank 0 writes")
    if entry.plan is not None:
        lines += entry.plan(params, tasks)
    shown = {k: v for k, v in params.items() if k != "schedule"}
    lines.append("settings: " + ", ".join(f"{k}={v}" for k, v in shown.items()))
    m = info["memory_estimate"]
    lines.append(f"memory estimate: {format_bytes(m['total'])} = models {format_bytes(m['models'])} + base read for "
                 f"the output {format_bytes(m['base_for_output'])} + working buffers ~{entry.working_buffers:g} N fp32 "
                 f"{format_bytes(m['working'])} + data {format_bytes(m['data'])} (network activations not included)")
    if info["output"]:
        lines.append(f"output: {info['output']} (model.safetensors, {name}_record.json"
                     f"{', config/tokenizer files' if info['base'] and Path(info['base']).is_dir() else ''})")
    return "\n".join(lines)


def _print_result(name: str, record: Mapping[str, Any], info: Mapping[str, Any]) -> None:
    steps = record.get("steps") or []
    for s in steps:
        acc = s.get("accuracy")
        if "final" in s:
            if acc:
                print("final accuracy: " + ", ".join(f"{k} {v:.4f}" for k, v in acc.items()))
            continue
        what = f"step {s.get('step')}: {s.get('kind', '')} {s.get('task', s.get('tasks', ''))}"
        if "on" in s:
            what += f", mask on {s['on']:,}"
        if acc:
            what += " | accuracy " + ", ".join(f"{k} {v:.4f}" for k, v in acc.items())
        print(what)
    t = info.get("timings", {})
    print(f"{name}: {t.get('method', 0):.2f} s, write {t.get('write', 0):.2f} s")
    paths = info.get("paths", [])
    print("wrote: " + ", ".join(paths[:4]) + (f" (+{len(paths) - 4} more)" if len(paths) > 4 else ""))


# ------------------------------------------------------------------------------------------------
# DOGE_TA (data-free)
# ------------------------------------------------------------------------------------------------
def run_doge(args: argparse.Namespace) -> int:
    from .io.formats import format_bytes, load_state_dict, open_checkpoint
    from .io.publish import AtomicOutput
    from .methods import doge_ta
    from .methods._common import prepare
    from .methods.doge import DOGE_INCLUDE
    from .streaming import input_paths

    t_start = time.perf_counter()
    name = "doge_ta"
    _refuse_flags(args, _DOGE_FLAGS, name)
    raw, folder = _load_file(args)
    where = str(args.config) if args.config else "config"
    cfg = resolve_doge_paths(validate(DogeMergeConfig, raw, where), folder)
    given = validate_parameters(DogeParameters, cfg.parameters or {}, "parameters.")
    flags = _set_params(args)
    if args.density is not None:
        flags["density"] = _density_flag(args.density)
    given.update(validate_parameters(DogeParameters, flags, "--set "))
    file_params = set(cfg.parameters or {})
    for k in ("include", "exclude"):
        if getattr(cfg, k) is not None:
            if k in file_params:
                raise ConfigError(f"{where}: {k!r} given both at the top level and under parameters")
            given[k] = getattr(cfg, k)
        if getattr(args, k):
            given[k] = list(getattr(args, k))
    defaults = DataMethod("calm_fast.methods.doge:doge_ta").defaults()
    defaults.update({"include": DOGE_INCLUDE, "exclude": None, "dtype": "float32"})
    params = {**{k: v for k, v in defaults.items() if k not in ("task_vectors", "device", "out_dtype", "shard_layers")},
              **given}

    base = _flag_path(args.base) or cfg.base_model
    models = [_flag_path(m) for m in args.model] if args.model else [m.model for m in cfg.models or []]
    output = _flag_path(args.out) or cfg.output
    device = args.device or cfg.device
    out_dtype = _dtype(args.out_dtype or args.dtype or cfg.out_dtype or cfg.dtype)
    trust_pickle = bool(args.trust_pickle or cfg.trust_pickle)
    copy_config = False if args.no_copy_config else (True if cfg.copy_config is None else cfg.copy_config)
    shard_size = args.shard_size or cfg.shard_size or "5GB"
    if not base:
        raise ConfigError("no base model (use --base or 'base_model' in the config)")
    if not models:
        raise ConfigError("no models to merge (use --model or 'models' in the config)")
    if not output and not args.dry_run:
        raise ConfigError("no output (use --out or 'output' in the config), or --dry-run")
    single = bool(output) and Path(output).suffix == ".safetensors"
    _check_device(device)

    # ---- headers only: the filter, shapes and the memory estimate ---------------------------------
    cks = []
    try:
        base_ck = open_checkpoint(base, trust_pickle=trust_pickle)
        cks.append(base_ck)
        for m in models:
            cks.append(open_checkpoint(m, trust_pickle=trust_pickle, lora_base=base_ck))

        def meta_sd(ck):
            return {k: torch.empty(ck.info(k).shape, dtype=ck.info(k).dtype, device="meta") for k in ck.keys()}

        try:
            prep = prepare(meta_sd(cks[0]), [meta_sd(c) for c in cks[1:]], include=params["include"],
                           exclude=params["exclude"], method=name)
        except ValueError as e:
            raise MismatchError(str(e)) from None
        if not prep.keys:
            raise ConfigError(f"{name}: no tensor matches the filter (include={params['include']!r}, "
                              f"exclude={params['exclude']!r})")
        not2d = [k for l, k in enumerate(prep.keys) if prep.inputs[l].dim() != 2]
        if not2d:
            raise ConfigError(f"{name}: {not2d[0]!r} has shape {tuple(prep.inputs[prep.keys.index(not2d[0])].shape)}; "
                              "DOGE merges 2-D weight matrices only: narrow include or add an exclude")
        T = len(models)
        N = sum(prep.inputs[l].numel() for l in range(prep.L))
        groups: Dict[tuple, int] = {}
        for l in range(prep.L):
            groups[tuple(prep.inputs[l].shape)] = groups.get(tuple(prep.inputs[l].shape), 0) + 1
        wb = 8 if params.get("dtype") == "float64" else 4
        largest = max(c * math.prod(s) for s, c in groups.items())
        total_in = sum(c.total_bytes() for c in cks)
        mem = {"models": total_in, "largest_shape_group": (T + 5) * largest * wb, "output": cks[0].total_bytes()}
        mem["total"] = sum(mem.values())
    finally:
        for c in cks:
            c.close()
    publisher = None
    if output:
        publisher = AtomicOutput(output, overwrite=args.overwrite, single_file=single,
                                 protect=input_paths([base] + models))
        publisher.check()
    report = _json_report(args, output)
    try:
        info: Dict[str, Any] = {"method": name, "params": params, "dry_run": bool(args.dry_run), "base": base,
                                "models": models, "merged_tensors": prep.L, "merged_parameters": N,
                                "shape_groups": {"x".join(map(str, s)): c for s, c in groups.items()},
                                "memory_estimate": mem, "output": output}
        if args.dry_run or not args.quiet:
            print(f"method: {name} (calm_fast.doge_ta), {T} models, base {base}")
            print(f"merged tensors: {prep.L} 2-D matrices ({N:,} parameters) in {len(groups)} shape group(s): "
                  + ", ".join(f"{c} x {s[0]}x{s[1]}" for s, c in groups.items()))
            print(f"other tensors: {len(prep.passthrough)} copied from the base")
            print("settings: " + ", ".join(f"{k}={v}" for k, v in params.items()))
            print(f"memory estimate: {format_bytes(mem['total'])} = models {format_bytes(mem['models'])} + largest "
                  f"shape group (T+5 copies, {'fp64' if wb == 8 else 'fp32'}) "
                  f"{format_bytes(mem['largest_shape_group'])}"
                  f" + output {format_bytes(mem['output'])}")
        if args.dry_run:
            info["timings"] = {"total": time.perf_counter() - t_start}
            if report is not None:
                report.finish(info)
            print(f"dry run: {'would write ' + str(output) + ', ' if output else ''}no tensor data was read and "
                  "nothing was written")
            return 0
        base_sd = load_state_dict(base, trust_pickle=trust_pickle)
        fts = [load_state_dict(m, trust_pickle=trust_pickle, lora_base=base) for m in models]
        kwargs = {k: v for k, v in params.items()}
        kwargs["dtype"] = getattr(torch, kwargs.get("dtype") or "float32")
        if "betas" in kwargs:
            kwargs["betas"] = tuple(kwargs["betas"])
        t0 = time.perf_counter()
        try:
            result = doge_ta(base_sd, fts, out_dtype=out_dtype, device=device, **kwargs)
        except DistributedError:
            raise
        except ValueError as e:
            raise DataError(str(e)) from None
        ranks = _RankWriter()
        if not ranks.writer:
            ranks.follow()
            return 0
        info["timings"] = {"method": time.perf_counter() - t0}
        record = {"method": name, "params": params, "keys": result.keys,
                  "lambdas": {k: result.lambdas[k].tolist() for k in result.keys},
                  "thresholds": result.thresholds.tolist(),
                  "final_loss": {k: float(v[-1]) for k, v in result.losses.items() if v.numel()}}
        meta = _metadata(name, params, {"base": base, "models": models}, cfg.metadata)
        t0 = time.perf_counter()
        with publisher, _output_errors(output):
            paths = write_output(publisher, result.merged, base, single=single, shard_size=shard_size,
                                 copy_config=copy_config, out_dtype=out_dtype, metadata=meta)
            if not single:
                publisher.write_bytes("doge_ta_record.json", json.dumps(record, indent=1).encode())
                paths.append(publisher.final_path("doge_ta_record.json"))
            info["timings"].update(write=time.perf_counter() - t0, total=time.perf_counter() - t_start)
            info["paths"] = paths
            ranks.publish(publisher, report, info)
        if report is not None:
            report.finish(info)
    finally:
        if report is not None:
            report.discard()
    if not args.quiet:
        t = info["timings"]
        print(f"{name}: {t['method']:.2f} s, write {t['write']:.2f} s")
        print("wrote: " + ", ".join(paths[:4]) + (f" (+{len(paths) - 4} more)" if len(paths) > 4 else ""))
    return 0


def _check_device(device: Optional[str]) -> None:
    """A device name torch understands, and a visible GPU for a CUDA device."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device/device: {device!r} is not a device name (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r}: no CUDA GPU is visible here (use --device cpu)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")


@contextlib.contextmanager
def _output_errors(output):
    """An OSError while the output is staged (disk full, permissions) is an OutputError (exit 6)."""
    from .io.errors import CalmFastIOError, OutputError

    try:
        yield
    except OSError as e:
        if isinstance(e, CalmFastIOError):
            raise
        raise OutputError(f"writing the output {output} failed: {e.strerror or e}") from e


def _density_flag(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"--density: expected one number for doge_ta, got {text!r}") from None
