"""``calm-fast`` command line: ``merge`` (flags or a mergekit-like YAML), ``demo``, and extension commands.

    calm-fast merge --base BASE --model FT1 --model FT2 --method ties --density 0.2 --out merged/
    calm-fast merge --config merge.yaml [--dry-run] [flags override the file]
    calm-fast demo [--profile quick|default|full] [--dir DIR]   (calm_fast.default: real encoder, real tasks)
    calm-fast demo-synthetic [--dir DIR]                          (small models built in code)
    calm-fast bench [--n N] [--tasks T]   (kernel benchmark report; small sizes by default)

Exit codes: 0 success; 1 internal error; 2 bad usage or configuration; 3 unreadable input (missing
file or shard, corrupt header, bad index); 4 the models do not line up (missing tensors, shape
mismatch; see ``--on-mismatch``); 5 inf/NaN in a task vector; 6 the output cannot be written (exists,
is or overlaps an input, another run is writing it, disk full); 130 interrupted.

The output (shards, index, config and tokenizer files) is staged in a hidden folder beside ``--out`` and
published with one rename when complete (``--overwrite`` swaps the whole folder atomically); a failed run
leaves no output.

YAML schema (``--config``), mergekit-like; checked with a typed schema (calm_fast/config.py) before
anything is opened.  Types are strict: booleans are true/false (a quoted "false" or "no" is a string and
an error), numbers are unquoted finite numbers (.nan and .inf are errors; 1e-3 is a number), unknown keys
are errors naming the closest valid key; every such error exits 2.  Relative paths in the file (base_model,
model, output) are relative to the file's folder; paths given as flags are relative to the working
directory.  Flags override the file.

    format: calm-fast             # optional; without it the keys decide (see "mergekit format" below)
    merge_method: ties            # task_arithmetic|ta, ties|ties_merging, dare|dare_linear, dare_ties,
                                  # consensus|tall|consensus_ties   (alias key: method)
    base_model: path/to/base      # (alias: base)
    models:
      - model: path/to/ft1        # file, sharded index, HF folder, .pt/.bin, PEFT LoRA adapter folder
        parameters:               # per-model: weight, density
          weight: 1.0             # number | [per-layer gradient] | [{filter: substr|"re:regex", value: ...}]
          density: 0.2            # TIES trim density of this model
      - path/to/ft2               # a bare path is allowed
    parameters:                   # method parameters (names as in calm_fast.<method>; defaults from there)
      scaling: 0.3                # number (aliases: lambda, scale)
      density: 0.2                # number, or one per model
      merge: sum                  # sum | mean | max   (alias: merge_func)
      mode: global                # global | per_tensor
      p: 0.5                      # DARE drop rate (alias: drop_rate);  rescale: true|false;
      combine: task_arithmetic    # DARE: task_arithmetic | ties
      tall_lambdas: 0.6           # consensus: number, or one per model;  min_count: 2 (alias: k);
      alpha: 0.3                  # consensus;  mtl: sum|ties;  ties_density (alias ties_k);  ties_merge
      weight: 1.0                 # default weight spec of models that give none
    weights: [1.0, 0.5]           # instead of per-model weights: a number, one spec per model, or
                                  # {tensor name: [one number per model]}
    dtype: bfloat16               # output dtype if out_dtype is absent (arithmetic is always fp32)
    out_dtype: bfloat16           # float32 | bfloat16 | float16 (fp32, bf16, fp16)
    include: [regex, ...]         # merged tensors (re.search); the others are copied from the base
    exclude: [regex, ...]
    on_mismatch: error            # error | skip | pad | truncate
    output: path/to/out           # folder or .safetensors file (alias: out)
    shard_size: 5GB               # (alias: max_shard_size)
    memory_budget: 1GiB
    seed: 0                       # DARE seed, integer (also accepted under parameters)
    trust_pickle: false           # true | false
    nonfinite: error              # error | propagate
    prefetch: true                # true | false
    copy_config: true             # true | false
    metadata: {key: value}        # extra safetensors metadata

In-memory methods (calm_fast/cli_methods.py): ``--method calm`` (unlabeled data + a model adapter; its file
names ``adapter:`` hf-encoder | open-clip | module:function and ``tasks: {name: {model, data, eval,
teacher_logits, num_classes, head, classnames}}``; ``parameters:`` every keyword of calm_fast.calm; schema in
calm_fast/data_config.py), the AdaMerging family with the same file (``--method adamerging | adamerging_pp |
doge_adamerging``; ``parameters:`` the keywords of calm_fast.adamerging / doge_adamerging) and ``--method
doge_ta`` (``base_model``, ``models``, ``include``/``exclude``,
``parameters: {eta, subspace, density, steps, lr, betas, eps, dtype, subspace_solver}``).  Data errors
(missing data for a task, head class counts, labels, unknown task in the schedule, an empty credible set)
exit 2; ``--device`` picks where they run.

A config in mergekit's format (mergekit's keys only: merge_method, base_model, models[].parameters,
parameters, slices, dtype, out_dtype, tokenizer_source) is read with mergekit's semantics and defaults
(per-tensor, lambda 1.0, mergekit's normalisation; methods linear, task_arithmetic, ties, dare_linear,
dare_ties, breadcrumbs[_ties], della[_linear], model_stock, slerp, nuslerp, passthrough); a file with
calm-fast keys (weights, include, parameters.scaling/merge/mode/p, ...) is calm-fast's own format; the
top-level key 'format: mergekit' or 'format: calm-fast' decides explicitly (README: "mergekit configs").

Other commands:

    calm-fast bench [--n N] [--tasks T] [--dtype D] [--device cpu|cuda] [--out FILE.json]
                                  # kernel benchmark report (fused ops vs the PyTorch reference)
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

#: extension subcommands: name -> module providing ``main(argv: list[str]) -> int`` (e.g. ``bench``)
EXTERNAL_COMMANDS: Dict[str, str] = {"bench": "calm_fast.bench"}
_COMMAND_HELP = {"bench": "kernel benchmark report: the fused ops vs the plain-PyTorch reference (small sizes by "
                          "default)"}

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_INPUT, EXIT_MISMATCH, EXIT_NONFINITE, EXIT_OUTPUT = 0, 1, 2, 3, 4, 5, 6
EXIT_DISTRIBUTED = 7  # a rank failed or a collective timed out (calm_fast.distributed.DistributedError)
EXIT_INTERRUPTED = 130


def _err(msg: str) -> None:
    print(f"calm-fast: error: {msg}", file=sys.stderr)


# ------------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------------
def _finite_float(text: str) -> float:
    """argparse type of the number flags: a finite float (``nan``/``inf`` are usage errors, exit 2)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if v != v or v in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def _csv_numbers(text: Optional[str], flag: str):
    """'0.2' -> 0.2, '0.2,0.3' -> [0.2, 0.3] (finiteness is checked with the other parameters)."""
    from .io.errors import ConfigError

    if text is None:
        return None
    try:
        vals = [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag}: expected a number or comma-separated numbers, got {text!r}") from None
    if not vals:
        raise ConfigError(f"{flag}: expected a number or comma-separated numbers, got {text!r}")
    return vals[0] if len(vals) == 1 else vals


def load_config(path: str):
    """Read and validate a merge YAML file (:class:`calm_fast.config.MergeConfig`; paths made absolute
    against the file's folder)."""
    from .config import load_config as load

    return load(path)


def build_merge_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """Combine the YAML file (if any) and the command-line flags (flags win) into merge_checkpoints kwargs.
    Everything is validated (the file by its schema, the combined method parameters once more) before
    any model is opened."""
    from .config import MergeConfig, parse_yaml, validate_parameters, weight_spec
    from .io.errors import ConfigError

    cfg = load_config(args.config) if args.config else MergeConfig()
    params: Dict[str, Any] = cfg.parameters.model_dump(exclude_unset=True) if cfg.parameters is not None else {}
    if params.pop("normalize", False):
        raise ConfigError("'normalize: true' (mergekit's weight normalisation) is not supported; "
                          "use merge: mean for TIES or scale the weights yourself")
    params.pop("int8_mask", None)
    default_weight = params.pop("weight", None)
    if cfg.seed is not None:
        params.setdefault("seed", cfg.seed)

    # models and per-model parameters (paths are already absolute: relative to the config file)
    model_paths: List[Any] = []
    model_weights: List[Any] = []
    model_density: List[Any] = []
    for entry in cfg.models or []:
        mp = entry.parameters
        model_paths.append(entry.model)
        model_weights.append(mp.weight if mp is not None else None)
        model_density.append(mp.density if mp is not None else None)
    if args.model:
        model_paths = list(args.model)
        model_weights = [None] * len(model_paths)
        model_density = [None] * len(model_paths)

    method = args.method or cfg.merge_method
    if not method:
        raise ConfigError("no merge method (use --method or 'merge_method' in the config)")
    from .mergekit_config import refuse_mergekit_method

    refuse_mergekit_method(method)  # e.g. 'linear': only in a mergekit-format config
    base = args.base or cfg.base_model
    if not base:
        raise ConfigError("no base model (use --base or 'base_model' in the config)")
    if not model_paths:
        raise ConfigError("no models to merge (use --model or 'models' in the config)")

    # method parameters given as flags
    flag_params = {
        "scaling": args.scaling, "density": _csv_numbers(args.density, "--density"), "merge": args.merge,
        "mode": args.mode, "p": args.p, "seed": args.seed, "rescale": args.rescale, "combine": args.combine,
        "tall_lambdas": _csv_numbers(args.tall_lambdas, "--tall-lambdas"), "min_count": args.min_count,
        "alpha": args.alpha, "mtl": args.mtl, "ties_density": args.ties_density, "ties_merge": args.ties_merge,
    }
    set_params: Dict[str, Any] = {}
    for kv in args.set or []:
        if "=" not in kv:
            raise ConfigError(f"--set expects KEY=VALUE, got {kv!r}")
        k, v = kv.split("=", 1)
        set_params[k.strip()] = parse_yaml(v, f"--set {k.strip()}")
    set_params = validate_parameters(set_params, prefix="--set ")  # aliases folded, types checked
    set_params.pop("int8_mask", None)
    if set_params.pop("normalize", False):
        raise ConfigError("--set normalize=true (mergekit's weight normalisation) is not supported")
    if "weight" in set_params:
        default_weight = set_params.pop("weight")
    flag_params.update(set_params)
    for k, v in flag_params.items():
        if v is not None:
            params[k] = v
    params = validate_parameters(params, prefix="parameter ")  # the combined values: flags are checked like the file
    if any(d is not None for d in model_density) and args.density is None:
        glob = params.get("density")
        if isinstance(glob, list):
            raise ConfigError("density given both per model and as a list")
        params["density"] = [d if d is not None else glob for d in model_density]
        if any(d is None for d in params["density"]):
            from .streaming import resolve_method

            default = resolve_method(method, {})[1].get("density")
            params["density"] = [d if d is not None else default for d in params["density"]]

    # weights
    weights: Any = None
    if args.weights is not None:
        weights = _csv_numbers(args.weights, "--weights")
        try:
            weights = [weight_spec(w) for w in weights] if isinstance(weights, list) else weight_spec(weights)
        except ValueError as e:
            raise ConfigError(f"--weights: {e}") from None
    elif cfg.weights is not None:
        weights = cfg.weights
    elif any(w is not None for w in model_weights) or default_weight is not None:
        weights = [w if w is not None else (default_weight if default_weight is not None else 1.0)
                   for w in model_weights]
        if all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):
            weights = [float(w) for w in weights]

    def pick(flag, value, default=None):
        if flag is not None:
            return flag
        return value if value is not None else default

    kwargs = dict(
        base=base, models=model_paths, method=method, output=pick(args.out, cfg.output),
        out_dtype=pick(args.out_dtype, cfg.out_dtype), dtype=pick(args.dtype, cfg.dtype),
        include=args.include or cfg.include, exclude=args.exclude or cfg.exclude, weights=weights,
        on_mismatch=pick(args.on_mismatch, cfg.on_mismatch, "error"),
        memory_budget=pick(args.memory_budget, cfg.memory_budget, "1GiB"),
        max_shard_size=pick(args.shard_size, cfg.shard_size, "5GB"),
        trust_pickle=True if args.trust_pickle else pick(None, cfg.trust_pickle, False),
        nonfinite=pick(args.nonfinite, cfg.nonfinite, "error"),
        prefetch=pick(False if args.no_prefetch else None, cfg.prefetch, True),
        copy_config=pick(False if args.no_copy_config else None, cfg.copy_config, True),
        metadata=cfg.metadata,
        dry_run=args.dry_run, overwrite=args.overwrite,
    )
    kwargs.update(params)
    return kwargs


def _exit_code(e: BaseException) -> int:
    from .io.errors import CalmFastIOError

    from .distributed import DistributedError

    if isinstance(e, CalmFastIOError):
        return e.exit_code
    if isinstance(e, DistributedError):
        return EXIT_DISTRIBUTED
    return EXIT_INTERNAL


# ------------------------------------------------------------------------------------------------
# merge
# ------------------------------------------------------------------------------------------------
def _add_merge_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("inputs")
    g.add_argument("-c", "--config", help="mergekit-like YAML file (flags override it)")
    g.add_argument("--base", help="base (pretrained) model: file, sharded index, HF folder, .pt/.bin")
    g.add_argument("--model", action="append", help="fine-tuned model (repeat); a PEFT LoRA adapter folder is "
                   "applied to the base")
    g.add_argument("--trust-pickle", action="store_true", help="allow arbitrary pickles in .pt/.bin inputs "
                   "(e.g. open_clip ImageEncoder checkpoints); never for untrusted files")
    m = p.add_argument_group("method")
    m.add_argument("-m", "--method", help="task_arithmetic|ta, ties, dare|dare_linear, dare_ties, consensus|tall, "
                   "consensus_ties (streaming); calm (with data, see --config), doge_ta (in memory)")
    m.add_argument("--scaling", "--lambda", type=_finite_float, help="scaling of the merged task vector")
    m.add_argument("--density", help="TIES trim density (fraction kept), or one per model: 0.2,0.3,...")
    m.add_argument("--merge", choices=("sum", "mean", "max"), help="TIES disjoint merge")
    m.add_argument("--mode", choices=("global", "per_tensor"), help="TIES threshold scope")
    m.add_argument("--p", "--drop-rate", dest="p", type=_finite_float, help="DARE drop probability")
    m.add_argument("--seed", type=int, help="DARE seed (recorded in the output metadata)")
    m.add_argument("--rescale", dest="rescale", action="store_true", default=None, help="DARE: rescale by 1/(1-p)")
    m.add_argument("--no-rescale", dest="rescale", action="store_false", help="DARE: do not rescale")
    m.add_argument("--combine", choices=("task_arithmetic", "ties"), help="DARE: combine with TA or TIES")
    m.add_argument("--tall-lambdas", help="consensus: TALL lambda, or one per model")
    m.add_argument("--min-count", type=int, help="consensus: minimum number of agreeing task masks")
    m.add_argument("--alpha", type=_finite_float, help="consensus: scaling of the kept multi-task vector")
    m.add_argument("--mtl", choices=("sum", "ties"), help="consensus: multi-task vector")
    m.add_argument("--ties-density", type=_finite_float, help="consensus with mtl=ties: TIES density")
    m.add_argument("--ties-merge", choices=("sum", "mean", "max"), help="consensus with mtl=ties: TIES merge")
    m.add_argument("--weights", help="per-model weights: w1,w2,... (per-layer specs: use the YAML)")
    m.add_argument("--set", action="append", metavar="KEY=VALUE", help="any other method parameter")
    s = p.add_argument_group("selection and output")
    s.add_argument("--include", action="append", metavar="REGEX", help="merge only matching tensors (repeat)")
    s.add_argument("--exclude", action="append", metavar="REGEX", help="copy matching tensors from the base")
    s.add_argument("-o", "--out", help="output folder (sharded safetensors) or .safetensors file")
    s.add_argument("--out-dtype", help="dtype of the merged tensors: float32|bfloat16|float16 (default: the base's)")
    s.add_argument("--dtype", help="synonym of --out-dtype when that is not given (mergekit's name)")
    s.add_argument("--shard-size", help="maximum shard size (default 5GB)")
    s.add_argument("--on-mismatch", choices=("error", "skip", "pad", "truncate"),
                   help="missing tensors / shape mismatches: error (default), skip (zero delta), pad, truncate")
    s.add_argument("--nonfinite", choices=("error", "propagate"), help="inf/NaN task-vector values")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output")
    s.add_argument("--no-copy-config", action="store_true", help="do not copy config/tokenizer files of a HF base")
    r = p.add_argument_group("run")
    r.add_argument("--dry-run", action="store_true", help="validate, print the plan and a memory estimate; "
                   "read no tensor data and write nothing")
    r.add_argument("--memory-budget", help="buffer memory for the streaming groups (default 1GiB)")
    r.add_argument("--no-prefetch", action="store_true", help="do not read ahead in a background thread")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument("-q", "--quiet", action="store_true", help="print only errors and the mismatch report")
    r.add_argument("--json", metavar="FILE", help="write a JSON summary (plan, timings, outputs) to FILE")
    r.add_argument("--debug", action="store_true", help="show tracebacks")
    r.add_argument("--distributed", action="store_true", help="run on the ranks that torchrun started (implied "
                   "when launched by torchrun with more than one rank; an error without torchrun)")
    from .cli_methods import add_arguments as add_in_memory_method_arguments

    add_in_memory_method_arguments(p)


def _print_phase_table(result) -> None:
    t = result.timings
    total = t.get("total", 0.0) or 1e-9
    print("phase      seconds   share")
    for k in ("plan", "read", "select", "merge", "write", "patch"):
        if k in t:
            print(f"{k:<8} {t[k]:>9.2f} {100 * t[k] / total:>6.1f}%")
    print(f"{'total':<8} {total:>9.2f}")
    print("(read = time waiting for input data; with prefetch most reading overlaps select/merge)")


def cmd_merge(args: argparse.Namespace) -> int:
    from . import distributed as D

    created = _join_ranks(args)
    try:
        return _merge(args)
    finally:
        if created:
            D.leave()


def _join_ranks(args: argparse.Namespace) -> bool:
    """Join the process group when ``torchrun`` started this process (``--distributed`` is then implied;
    without torchrun it is a usage error).  Returns whether this call created the group (and so leaves it)."""
    from . import distributed as D

    if not D.launched_by_torchrun():
        if getattr(args, "distributed", False):
            from .io.errors import ConfigError

            raise ConfigError("--distributed: not launched by torchrun (RANK, WORLD_SIZE, MASTER_ADDR and "
                              "MASTER_PORT are not set); run e.g. torchrun --nproc-per-node 2 -m calm_fast.cli "
                              "merge ... (or drop --distributed for a one-process merge)")
        return False
    import torch.distributed as dist

    was = dist.is_available() and dist.is_initialized()
    try:
        D.init_from_env()
    except (RuntimeError, ValueError) as e:
        raise D.DistributedError(f"could not join the torchrun process group: {e}") from e
    return not was


def _merge(args: argparse.Namespace) -> int:
    from . import cli_methods
    from . import distributed as D
    from .streaming import merge_checkpoints

    method = cli_methods.peek_method(args)
    if cli_methods.handles(method):  # in-memory methods (calm, doge_ta): their own config schema and flow
        return cli_methods.run(args, method)
    distributed = D.is_distributed()
    if args.config:  # a config in mergekit's format means what mergekit means (calm_fast/mergekit_merge.py)
        from .mergekit_merge import config_format, run_mergekit_cli

        if config_format(args.config) == "mergekit":
            if distributed:
                from .io.errors import ConfigError

                raise ConfigError("a mergekit-format config runs in one process; the distributed streaming merge "
                                  "takes calm-fast's config format (method/base/models/parameters) or flags")
            return run_mergekit_cli(args)

    kwargs = build_merge_kwargs(args)
    if not kwargs.get("output") and not args.dry_run:
        from .io.errors import ConfigError

        raise ConfigError("no output (use --out or 'output' in the config), or --dry-run")
    lead = D.rank() == 0  # on several ranks, rank 0 reports for all
    progress = lead and not args.no_progress and not args.quiet and sys.stderr.isatty()
    report = _JsonReport(args.json, args.dry_run, kwargs.get("output")) if (args.json and lead) else None
    try:
        # the report is written (to a temporary file) before the output is published, so nothing can fail
        # after the output appears; it is renamed into place once the merge returns
        result = merge_checkpoints(progress=progress, before_publish=report.stage if report else None,
                                   distributed=distributed, **kwargs)
        if report is not None:
            report.finish(result)
    finally:
        if report is not None:
            report.discard()
    if not lead:
        return EXIT_OK
    plan = result.plan
    on_ranks = f" on {result.world_size} ranks" if distributed else ""
    if args.dry_run or not args.quiet:
        print(plan.describe())  # includes every mismatch action
        if distributed:
            from .streaming.distributed import describe_shards

            print(describe_shards(result.rank_plans))
    else:
        for line in plan.report:  # never silent, even with --quiet
            print(f"mismatch: {line}", file=sys.stderr)
    if plan.report:
        print(f"calm-fast: {len(plan.report)} mismatch action(s) (on_mismatch={kwargs['on_mismatch']})"
              f"{' would be' if args.dry_run else ' were'} taken; see the 'mismatch:' lines", file=sys.stderr)
    if args.dry_run:
        target = kwargs.get("output")
        print(f"dry run: {'would write ' + str(target) + ', ' if target else ''}"
              f"{len(plan.out_specs)} tensors{on_ranks}; no tensor data was read and nothing was written")
    elif not args.quiet:
        print(result.summary() + (f" | {result.world_size} ranks" if distributed else ""))
        _print_phase_table(result)
        print("wrote: " + ", ".join(result.paths[:4]) + (f" (+{len(result.paths) - 4} more)" if len(result.paths) > 4 else ""))
    return EXIT_OK


class _JsonReport:
    """``--json FILE``: checked before the merge, written to a temporary file beside FILE before the output
    is published (``stage``), renamed to FILE after it (``finish``)."""

    def __init__(self, path: str, dry_run: bool, output: Optional[str] = None):
        from .io.errors import ConfigError

        self.path, self.dry_run, self.tmp = Path(path), dry_run, None
        if self.path.is_dir() or not self.path.parent.is_dir():
            raise ConfigError(f"--json {path}: " + ("is a folder" if self.path.is_dir() else
                                                     f"the folder {self.path.parent} does not exist"))
        if output is not None:
            out = Path(os.path.realpath(output))
            if out in Path(os.path.realpath(self.path)).parents:
                raise ConfigError(f"--json {path}: inside the output folder {output}, which is replaced as a whole; "
                                  "write the report elsewhere")
        fd, self.tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".calm-fast-tmp", dir=self.path.parent)
        os.close(fd)

    def stage(self, result) -> None:
        plan = result.plan
        info = {"method": plan.method, "params": _jsonable(plan.params), "dry_run": self.dry_run,
                "report": plan.report, "notes": plan.notes, "timings": result.timings, "paths": result.paths,
                "bytes_read": result.bytes_read, "bytes_written": result.bytes_written, "passes": result.passes,
                "memory_estimate": plan.memory_estimate(), "zero_sign": result.zero_sign, "patched": result.patched}
        if getattr(result, "world_size", 1) > 1:
            info["ranks"] = result.rank_plans
        with open(self.tmp, "w") as f:
            f.write(json.dumps(info, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.staged = True

    def finish(self, result) -> None:
        if not getattr(self, "staged", False):  # dry run or in-memory output: nothing was published
            self.stage(result)
        os.chmod(self.tmp, 0o644)
        os.replace(self.tmp, self.path)
        self.tmp = None

    def discard(self) -> None:
        if self.tmp is not None:
            try:
                os.unlink(self.tmp)
            except OSError:
                pass
            self.tmp = None


def _jsonable(x):
    from .streaming.params import _jsonable as j

    return j(x)


# ------------------------------------------------------------------------------------------------
# demo
# ------------------------------------------------------------------------------------------------
def make_demo_models(num_models: int = 3, dim: int = 64, depth: int = 4, seed: int = 0):
    """A tiny ViT-like state dict and ``num_models`` "fine-tuned" variants with structured deltas
    (task-specific low-rank updates of attention/MLP weights, a few large sparse changes, small noise).
    Returns (base, [finetuned, ...]) as fp32 state dicts."""
    import torch

    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.02):
        return torch.randn(*shape, generator=g) * scale

    base: Dict[str, torch.Tensor] = {
        "patch_embed.proj.weight": rnd(dim, 3, 8, 8), "patch_embed.proj.bias": torch.zeros(dim),
        "cls_token": rnd(1, 1, dim), "pos_embed": rnd(1, 17, dim),
    }
    for i in range(depth):
        p = f"blocks.{i}."
        base.update({
            p + "norm1.weight": torch.ones(dim), p + "norm1.bias": torch.zeros(dim),
            p + "attn.qkv.weight": rnd(3 * dim, dim), p + "attn.qkv.bias": torch.zeros(3 * dim),
            p + "attn.proj.weight": rnd(dim, dim), p + "attn.proj.bias": torch.zeros(dim),
            p + "norm2.weight": torch.ones(dim), p + "norm2.bias": torch.zeros(dim),
            p + "mlp.fc1.weight": rnd(4 * dim, dim), p + "mlp.fc1.bias": torch.zeros(4 * dim),
            p + "mlp.fc2.weight": rnd(dim, 4 * dim), p + "mlp.fc2.bias": torch.zeros(dim),
        })
    base.update({"norm.weight": torch.ones(dim), "norm.bias": torch.zeros(dim), "head.weight": rnd(10, dim),
                 "head.bias": torch.zeros(10), "position_ids": torch.arange(17)})
    models = []
    for t in range(num_models):
        ft = {}
        for k, v in base.items():
            if not v.is_floating_point():
                ft[k] = v.clone()
                continue
            d = rnd(*v.shape, scale=0.002)  # small noise everywhere
            if v.dim() == 2 and ("attn" in k or "mlp" in k):
                # a task-specific low-rank update, strongest in the task's "own" blocks
                layer = int(k.split(".")[1])
                strength = 0.03 if layer % num_models == t else 0.01
                u, w = rnd(v.shape[0], 2, scale=1.0), rnd(2, v.shape[1], scale=1.0)
                d += strength * (u @ w) / 4
            # a few large sparse changes
            mask = torch.rand(v.shape, generator=g) < 0.01
            d += mask * rnd(*v.shape, scale=0.1)
            ft[k] = v + d
        models.append(ft)
    return base, models


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from . import methods
    from .io import save_state_dict
    from .streaming import merge_checkpoints

    keep = args.dir is not None
    root = Path(args.dir) if keep else Path(tempfile.mkdtemp(prefix="calm-fast-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    base, fts = make_demo_models(args.models, seed=args.seed)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    base = {k: v.to(dtype) if v.is_floating_point() else v for k, v in base.items()}
    fts = [{k: v.to(dtype) if v.is_floating_point() else v for k, v in ft.items()} for ft in fts]
    save_state_dict(base, root / "base", overwrite=True)
    paths = []
    for i, ft in enumerate(fts):
        # the first model is sharded, to exercise the index path
        save_state_dict(ft, root / f"finetuned_{i}", overwrite=True, max_shard_size=200_000 if i == 0 else None)
        paths.append(str(root / f"finetuned_{i}"))
    n_params = sum(v.numel() for v in base.values())
    print(f"demo models in {root}: base + {len(fts)} fine-tuned ViT-like models, {n_params:,} parameters each "
          f"({args.dtype})")
    cases = [
        ("task_arithmetic", {"scaling": 0.3}, methods.task_arithmetic, {}),
        ("ties_merging", {"density": 0.2, "merge": "sum", "scaling": 0.3}, methods.ties_merging, {}),
        ("ties_merging", {"density": 0.2, "merge": "mean", "scaling": 1.0, "mode": "per_tensor"},
         methods.ties_merging, {}),
        ("dare_merging", {"p": 0.5, "scaling": 0.3, "seed": 0}, methods.dare_merging, {}),
        ("dare_merging", {"p": 0.5, "scaling": 0.5, "seed": 0, "combine": "ties", "density": 0.2},
         methods.dare_merging, {}),
        ("consensus_merging", {"tall_lambdas": 0.6, "min_count": 2, "alpha": 0.3}, methods.consensus_merging, {}),
        ("consensus_merging", {"mtl": "ties", "alpha": 0.3}, methods.consensus_merging, {}),
    ]
    float_keys = [k for k, v in base.items() if v.is_floating_point()]
    taus = [torch.cat([(ft[k].float() - base[k].float()).reshape(-1) for k in float_keys]) for ft in fts]
    print(f"{'method':<18} {'parameters':<52} {'passes':>6} {'time':>7} {'kept':>6} {'cos(τ_t)':>18}  in-memory")
    all_equal = True
    for i, (name, params, fn, _) in enumerate(cases):
        out = root / f"merged_{i}_{name}"
        t0 = time.perf_counter()
        res = merge_checkpoints(str(root / "base"), paths, name, output=str(out), overwrite=True,
                                memory_budget=args.memory_budget, progress=False, **params)
        dt = time.perf_counter() - t0
        from .io import load_state_dict

        merged = load_state_dict(str(out))
        ref = fn(base, fts, **params)
        equal = all(torch.equal(merged[k], ref[k]) for k in ref) and set(merged) == set(ref)
        all_equal &= equal
        tau_m = torch.cat([(merged[k].float() - base[k].float()).reshape(-1) for k in float_keys])
        kept = float((tau_m != 0).float().mean())
        cos = [float(torch.nn.functional.cosine_similarity(tau_m, t, dim=0)) for t in taus]
        ptxt = ", ".join(f"{k}={v}" for k, v in params.items())
        print(f"{name:<18} {ptxt:<52} {res.passes:>6} {dt:>6.2f}s {kept:>6.1%} "
              f"{' '.join(f'{c:+.2f}' for c in cos):>18}  {'equal' if equal else 'DIFFERENT'}")
    print(f"outputs: {root}/merged_*  (safetensors; metadata records method, parameters, seed, versions)")
    if not keep:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
        print("(temporary directory removed; pass --dir DIR to keep the files)")
    if not all_equal:
        _err("a streaming result differs from the in-memory method")
        return EXIT_INTERNAL
    print("all streaming merges equal the in-memory methods bit for bit")
    return EXIT_OK


# ------------------------------------------------------------------------------------------------
# entry point
# ------------------------------------------------------------------------------------------------
def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="calm-fast", description="Fast, exact, bounded-memory model merging.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="exit codes: 0 ok, 1 internal error, 2 usage/config, 3 unreadable input, "
                                            "4 models do not line up, 5 inf/NaN, 6 output, 130 interrupted")
    parser.add_argument("--version", action="store_true", help="print versions and exit")
    sub = parser.add_subparsers(dest="command")
    pm = sub.add_parser("merge", help="merge checkpoints (streaming, bounded memory)",
                        description="Merge checkpoints with bounded memory. " + (__doc__ or "").split("Other commands:")[0],
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_merge_args(pm)
    sub.add_parser("demo", add_help=False,
                   help="fine-tune a real encoder on real text tasks, merge with every method, print per-task "
                        "accuracy (run `calm-fast demo --help`)")
    pd = sub.add_parser("demo-synthetic",
                        help="build small models in code, merge them with every method, check streaming = in-memory")
    pd.add_argument("--dir", help="keep the demo files in DIR (default: a temporary directory, removed)")
    pd.add_argument("--models", type=int, default=3, help="number of fine-tuned models (default 3)")
    pd.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    pd.add_argument("--seed", type=int, default=0)
    pd.add_argument("--memory-budget", default="64KiB", help="small by default, to exercise slicing")
    pd.add_argument("--debug", action="store_true")
    for name in EXTERNAL_COMMANDS:
        what = _COMMAND_HELP.get(name, f"(extension: {EXTERNAL_COMMANDS[name]})")
        sub.add_parser(name, help=f"{what}; see `calm-fast {name} --help`", add_help=False)
    return parser


def _run_external(name: str, argv: List[str]) -> int:
    try:
        mod = importlib.import_module(EXTERNAL_COMMANDS[name])
    except ModuleNotFoundError as e:
        if e.name and EXTERNAL_COMMANDS[name].startswith(e.name):
            _err(f"the '{name}' command is not available in this version ({EXTERNAL_COMMANDS[name]} is missing)")
            return EXIT_USAGE
        raise
    return int(mod.main(argv) or 0)


def _versions() -> str:
    import torch

    try:
        from . import __version__, backend, cuda_kernels_built

        b = backend()
        b += f"; CUDA kernels {'built' if cuda_kernels_built() else 'not built'}"
        b += f", GPU {'visible' if torch.cuda.is_available() else 'not visible'}"
    except Exception as e:  # pragma: no cover
        __version__, b = "?", f"unavailable ({e})"
    return f"calm-fast {__version__} (backend {b}), torch {torch.__version__}, python {sys.version.split()[0]}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":  # the embedded default has its own parser and error handling
        from .default.command import main as demo_main

        return demo_main(argv[1:])
    if argv and argv[0] in EXTERNAL_COMMANDS:
        try:
            return _run_external(argv[0], argv[1:])
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED
    parser = make_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: 2 on usage errors, 0 for --help
        return int(e.code or 0)
    if args.version:
        print(_versions())
        return EXIT_OK
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    import signal

    def _terminate(signum, frame):  # SIGTERM: clean up like Ctrl-C (temporary files are removed)
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except (ValueError, OSError):  # not in the main thread
        previous = None
    try:
        if args.command == "merge":
            return cmd_merge(args)
        if args.command == "demo-synthetic":
            return cmd_demo(args)
        parser.print_help()
        return EXIT_USAGE
    except KeyboardInterrupt:
        _err("interrupted (no output was finished; temporary files were removed)")
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - map every failure to an exit code with a clear message
        code = _exit_code(e)
        if getattr(args, "debug", False) or code == EXIT_INTERNAL:
            traceback.print_exc()
        _err(str(e) if code != EXIT_INTERNAL else f"internal error: {type(e).__name__}: {e}")
        return code
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
