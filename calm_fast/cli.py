"""``calm-fast`` command line: ``merge`` (flags or a mergekit-like YAML), ``demo``, and extension commands.

    calm-fast merge --base BASE --model FT1 --model FT2 --method ties --density 0.2 --out merged/
    calm-fast merge --config merge.yaml [--dry-run] [flags override the file]
    calm-fast demo [--profile quick|default|full] [--dir DIR]   (calm_fast.default: real encoder, real tasks)
    calm-fast demo-synthetic [--dir DIR]                          (small models built in code)

Exit codes: 0 success; 1 internal error; 2 bad usage or configuration; 3 unreadable input (missing
file or shard, corrupt header, bad index); 4 the models do not line up (missing tensors, shape
mismatch; see ``--on-mismatch``); 5 inf/NaN in a task vector; 6 the output cannot be written (exists,
disk full); 130 interrupted.

YAML schema (``--config``), mergekit-like::

    merge_method: ties            # task_arithmetic|ta, ties|ties_merging, dare|dare_linear, dare_ties,
                                  # consensus|tall|consensus_ties   (alias key: method)
    base_model: path/to/base      # (alias: base)
    models:
      - model: path/to/ft1        # file, sharded index, HF folder, .pt/.bin, PEFT LoRA adapter folder
        parameters:
          weight: 1.0             # number | [per-layer gradient] | [{filter: substr|"re:regex", value: ...}]
          density: 0.2            # TIES trim density of this model
      - path/to/ft2               # a bare path is allowed
    parameters:                   # method parameters (names as in calm_fast.<method>; defaults from there)
      scaling: 0.3                # (alias: lambda)
      density: 0.2
      merge: sum
      weight: 1.0                 # default weight spec of models that give none
    dtype: bfloat16               # output dtype if out_dtype is absent (arithmetic is always fp32)
    out_dtype: bfloat16
    include: [regex, ...]         # merged tensors (re.search); the others are copied from the base
    exclude: [regex, ...]
    on_mismatch: error            # error | skip | pad | truncate
    output: path/to/out           # folder or .safetensors file
    shard_size: 5GB
    memory_budget: 1GiB
    seed: 0                       # DARE seed (also accepted under parameters)
    trust_pickle: false
    nonfinite: error              # error | propagate
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

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_INPUT, EXIT_MISMATCH, EXIT_NONFINITE, EXIT_OUTPUT = 0, 1, 2, 3, 4, 5, 6
EXIT_INTERRUPTED = 130

_TOP_KEYS = {"merge_method", "method", "base_model", "base", "models", "parameters", "dtype", "out_dtype", "include",
             "exclude", "on_mismatch", "output", "out", "shard_size", "max_shard_size", "memory_budget", "seed",
             "trust_pickle", "nonfinite", "weights", "prefetch", "copy_config", "metadata"}
_MERGEKIT_UNSUPPORTED = {"slices": "layer slicing/passthrough", "tokenizer_source": "tokenizer merging",
                         "tokenizer": "tokenizer merging", "chat_template": "chat templates",
                         "modules": "module-wise configs"}
_IGNORED = {"int8_mask": "a mergekit memory option; calm_fast never materialises masks"}


def _err(msg: str) -> None:
    print(f"calm-fast: error: {msg}", file=sys.stderr)


# ------------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------------
def _csv_numbers(text: Optional[str]):
    if text is None:
        return None
    vals = [float(x) for x in str(text).split(",") if x.strip()]
    return vals[0] if len(vals) == 1 else vals


def _yaml_scalar(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


def load_config(path: str) -> Dict[str, Any]:
    """Parse and check a merge YAML file (unknown keys are errors)."""
    import yaml

    from .io.errors import ConfigError

    try:
        with open(path) as f:
            cfg = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror or e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    for k in list(cfg):
        if k in _MERGEKIT_UNSUPPORTED:
            raise ConfigError(f"{path}: '{k}' ({_MERGEKIT_UNSUPPORTED[k]}) is not supported by calm-fast")
        if k in _IGNORED:
            print(f"calm-fast: note: ignoring '{k}' ({_IGNORED[k]})", file=sys.stderr)
            cfg.pop(k)
    unknown = sorted(set(cfg) - _TOP_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; valid: {sorted(_TOP_KEYS)}")
    # relative paths are relative to the config file
    cfg["_dir"] = str(Path(path).resolve().parent)
    return cfg


def _resolve_rel(p: Any, base_dir: Optional[str]) -> Any:
    if isinstance(p, str) and base_dir and not os.path.isabs(p) and not os.path.exists(p):
        cand = os.path.join(base_dir, p)
        if os.path.exists(cand):
            return cand
    return p


def build_merge_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """Combine the YAML file (if any) and the command-line flags (flags win) into merge_checkpoints kwargs."""
    from .io.errors import ConfigError

    cfg = load_config(args.config) if args.config else {}
    cdir = cfg.get("_dir")
    params: Dict[str, Any] = dict(cfg.get("parameters") or {})
    if not isinstance(params, dict):
        raise ConfigError("'parameters' must be a mapping")
    if "normalize" in params:
        if params.pop("normalize"):
            raise ConfigError("'normalize: true' (mergekit's weight normalisation) is not supported; "
                              "use merge: mean for TIES or scale the weights yourself")
    if "int8_mask" in params:
        params.pop("int8_mask")
    default_weight = params.pop("weight", None)
    if "seed" in cfg:
        params.setdefault("seed", cfg["seed"])

    # models and per-model parameters
    model_paths: List[Any] = []
    model_weights: List[Any] = []
    model_density: List[Any] = []
    for i, entry in enumerate(cfg.get("models") or []):
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry:
            raise ConfigError(f"models[{i}]: expected a path or a mapping with 'model'")
        bad = set(entry) - {"model", "parameters"}
        if bad:
            raise ConfigError(f"models[{i}]: unknown key(s) {sorted(bad)}")
        mp = dict(entry.get("parameters") or {})
        bad = set(mp) - {"weight", "density"}
        if bad:
            raise ConfigError(f"models[{i}].parameters: unknown key(s) {sorted(bad)} (per-model: weight, density)")
        model_paths.append(_resolve_rel(entry["model"], cdir))
        model_weights.append(mp.get("weight"))
        model_density.append(mp.get("density"))
    if args.model:
        model_paths = list(args.model)
        model_weights = [None] * len(model_paths)
        model_density = [None] * len(model_paths)

    method = args.method or cfg.get("merge_method") or cfg.get("method")
    if not method:
        raise ConfigError("no merge method (use --method or 'merge_method' in the config)")
    base = args.base or _resolve_rel(cfg.get("base_model", cfg.get("base")), cdir)
    if not base:
        raise ConfigError("no base model (use --base or 'base_model' in the config)")
    if not model_paths:
        raise ConfigError("no models to merge (use --model or 'models' in the config)")

    # method parameters given as flags
    flag_params = {
        "scaling": args.scaling, "density": _csv_numbers(args.density), "merge": args.merge, "mode": args.mode,
        "p": args.p, "seed": args.seed, "rescale": args.rescale, "combine": args.combine,
        "tall_lambdas": _csv_numbers(args.tall_lambdas), "min_count": args.min_count, "alpha": args.alpha,
        "mtl": args.mtl, "ties_density": args.ties_density, "ties_merge": args.ties_merge,
    }
    for kv in args.set or []:
        if "=" not in kv:
            raise ConfigError(f"--set expects KEY=VALUE, got {kv!r}")
        k, v = kv.split("=", 1)
        flag_params[k.strip()] = _yaml_scalar(v)
    for k, v in flag_params.items():
        if v is not None:
            params[k] = v
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
        w = _csv_numbers(args.weights)
        weights = w
    elif cfg.get("weights") is not None:
        weights = cfg["weights"]
    elif any(w is not None for w in model_weights) or default_weight is not None:
        weights = [w if w is not None else (default_weight if default_weight is not None else 1.0)
                   for w in model_weights]
        if all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):
            weights = [float(w) for w in weights]

    def pick(flag, *keys, default=None):
        if flag is not None:
            return flag
        for k in keys:
            if cfg.get(k) is not None:
                return cfg[k]
        return default

    def as_list(x):
        if x is None:
            return None
        return [x] if isinstance(x, str) else list(x)

    include = args.include if args.include else as_list(cfg.get("include"))
    exclude = args.exclude if args.exclude else as_list(cfg.get("exclude"))
    out = pick(args.out, "output", "out")
    kwargs = dict(
        base=base, models=model_paths, method=method, output=out,
        out_dtype=pick(args.out_dtype, "out_dtype"), dtype=pick(args.dtype, "dtype"),
        include=include, exclude=exclude, weights=weights,
        on_mismatch=pick(args.on_mismatch, "on_mismatch", default="error"),
        memory_budget=pick(args.memory_budget, "memory_budget", default="1GiB"),
        max_shard_size=pick(args.shard_size, "shard_size", "max_shard_size", default="5GB"),
        trust_pickle=bool(pick(args.trust_pickle or None, "trust_pickle", default=False)),
        nonfinite=pick(args.nonfinite, "nonfinite", default="error"),
        prefetch=bool(pick(False if args.no_prefetch else None, "prefetch", default=True)),
        copy_config=bool(pick(False if args.no_copy_config else None, "copy_config", default=True)),
        metadata=cfg.get("metadata"),
        dry_run=args.dry_run, overwrite=args.overwrite,
    )
    kwargs.update(params)
    return kwargs


def _exit_code(e: BaseException) -> int:
    from .io.errors import CalmFastIOError

    if isinstance(e, CalmFastIOError):
        return e.exit_code
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
                   "consensus_ties")
    m.add_argument("--scaling", "--lambda", type=float, help="scaling of the merged task vector")
    m.add_argument("--density", help="TIES trim density (fraction kept), or one per model: 0.2,0.3,...")
    m.add_argument("--merge", choices=("sum", "mean", "max"), help="TIES disjoint merge")
    m.add_argument("--mode", choices=("global", "per_tensor"), help="TIES threshold scope")
    m.add_argument("--p", "--drop-rate", dest="p", type=float, help="DARE drop probability")
    m.add_argument("--seed", type=int, help="DARE seed (recorded in the output metadata)")
    m.add_argument("--rescale", dest="rescale", action="store_true", default=None, help="DARE: rescale by 1/(1-p)")
    m.add_argument("--no-rescale", dest="rescale", action="store_false", help="DARE: do not rescale")
    m.add_argument("--combine", choices=("task_arithmetic", "ties"), help="DARE: combine with TA or TIES")
    m.add_argument("--tall-lambdas", help="consensus: TALL lambda, or one per model")
    m.add_argument("--min-count", type=int, help="consensus: minimum number of agreeing task masks")
    m.add_argument("--alpha", type=float, help="consensus: scaling of the kept multi-task vector")
    m.add_argument("--mtl", choices=("sum", "ties"), help="consensus: multi-task vector")
    m.add_argument("--ties-density", type=float, help="consensus with mtl=ties: TIES density")
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
    from .streaming import merge_checkpoints

    kwargs = build_merge_kwargs(args)
    if not kwargs.get("output") and not args.dry_run:
        from .io.errors import ConfigError

        raise ConfigError("no output (use --out or 'output' in the config), or --dry-run")
    progress = not args.no_progress and not args.quiet and sys.stderr.isatty()
    result = merge_checkpoints(progress=progress, **kwargs)
    plan = result.plan
    if args.dry_run or not args.quiet:
        print(plan.describe())  # includes every mismatch action
    else:
        for line in plan.report:  # never silent, even with --quiet
            print(f"mismatch: {line}", file=sys.stderr)
    if plan.report:
        print(f"calm-fast: {len(plan.report)} mismatch action(s) (on_mismatch={kwargs['on_mismatch']})"
              f"{' would be' if args.dry_run else ' were'} taken; see the 'mismatch:' lines", file=sys.stderr)
    if args.dry_run:
        target = kwargs.get("output")
        print(f"dry run: {'would write ' + str(target) + ', ' if target else ''}"
              f"{len(plan.out_specs)} tensors; no tensor data was read and nothing was written")
    elif not args.quiet:
        print(result.summary())
        _print_phase_table(result)
        print("wrote: " + ", ".join(result.paths[:4]) + (f" (+{len(result.paths) - 4} more)" if len(result.paths) > 4 else ""))
    if args.json:
        info = {"method": plan.method, "params": _jsonable(plan.params), "dry_run": args.dry_run,
                "report": plan.report, "notes": plan.notes, "timings": result.timings, "paths": result.paths,
                "bytes_read": result.bytes_read, "bytes_written": result.bytes_written, "passes": result.passes,
                "memory_estimate": plan.memory_estimate(), "zero_sign": result.zero_sign, "patched": result.patched}
        Path(args.json).write_text(json.dumps(info, indent=2) + "\n")
    return EXIT_OK


def _jsonable(x):
    from .streaming import _jsonable as j

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
                        description="Merge checkpoints with bounded memory. " + (__doc__ or "").split("YAML schema")[0],
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
        sub.add_parser(name, help=f"(extension: {EXTERNAL_COMMANDS[name]}) run `calm-fast {name} --help`",
                       add_help=False)
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
        from . import __version__, backend

        b = backend()
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
