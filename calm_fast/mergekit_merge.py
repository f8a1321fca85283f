"""Run a mergekit-format config (:mod:`calm_fast.mergekit_config`) tensor by tensor, straight to shards.

Memory: one output tensor's inputs at a time (plus mergekit's per-tensor temporaries), whatever the
model size; the inputs are memory-mapped safetensors (or any format :func:`calm_fast.io.open_checkpoint`
reads).  Everything is staged in an :class:`calm_fast.io.AtomicOutput` and published with one rename:
the shards, ``config.json`` (its ``dtype``/``torch_dtype`` set to the output dtype, its layer count set
for ``slices`` configs), the tokenizer files of the donor model (``tokenizer_source``, else the base,
else the first model, as mergekit does), ``mergekit_config.yml`` (the config as given) and a short
``README.md`` model card.

Random methods (dare_*, della*) draw each mask with calm_fast's counter-based Philox generator, keyed
by ``(seed, input index, output tensor name)``: the result does not depend on the order, the device or
the number of threads, and ``seed`` (default 0) reproduces it.  mergekit draws from torch's global RNG, so these
masks differ from mergekit's draws (same distribution and rescaling).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from .io.errors import ConfigError, MismatchError
from .io.formats import DTYPE_ALIASES, Checkpoint, format_bytes, is_lora_adapter, open_checkpoint
from .io.publish import AtomicOutput
from .io.writer import OutputSpec, SafetensorsWriter
from .mergekit_config import (MergekitConfig, TensorPlan, input_order, layer_of, plan_tensors, resolve,
                              total_output_layers)
from .methods.mergekit_methods import METHODS, Entry, merge_tensor

#: tokenizer (and generation) files copied from the donor model, as mergekit's tokenizer copy does
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
                   "added_tokens.json", "merges.txt", "vocab.json", "vocab.txt", "chat_template.jinja",
                   "chat_template.json", "generation_config.json")
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


@dataclass
class MergekitResult:
    """What :func:`merge_mergekit` did: the plan, output paths and timings."""

    method: str
    plans: List[TensorPlan]
    paths: List[str] = field(default_factory=list)
    timings: Dict[str, float] = field(default_factory=dict)
    bytes_written: int = 0
    seed: int = 0
    notes: List[str] = field(default_factory=list)

    def describe(self) -> str:
        models = sorted({i.model for p in self.plans for i in p.inputs})
        lines = [f"mergekit-format merge: method {self.method}, {len(self.plans)} output tensors from "
                 f"{len(models)} model(s):"]
        lines += [f"  {m}" for m in models]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def summary(self) -> str:
        return (f"merged {len(self.plans)} tensors ({self.method}, mergekit semantics) in "
                f"{self.timings.get('total', 0.0):.2f}s; wrote {format_bytes(self.bytes_written)}")


def _dtype(name: Optional[str]) -> Optional[torch.dtype]:
    if name is None:
        return None
    return DTYPE_ALIASES[str(name).lower().replace("torch.", "")]


def _folder(path: str) -> Optional[Path]:
    p = Path(path)
    if p.is_dir():
        return p
    if p.is_file() and (p.name.endswith(".safetensors") or p.name.endswith(".index.json")):
        return p.parent
    return None


def _read_json(path: Path) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            v = json.load(f)
        return v if isinstance(v, dict) else None
    except (OSError, ValueError):
        return None


def _num_layers(path: str, ck: Checkpoint) -> int:
    folder = _folder(path)
    cfg = _read_json(folder / "config.json") if folder is not None else None
    if cfg:
        for k in _LAYER_KEYS:
            if isinstance(cfg.get(k), int):
                return int(cfg[k])
        text = cfg.get("text_config")
        if isinstance(text, dict):
            for k in _LAYER_KEYS:
                if isinstance(text.get(k), int):
                    return int(text[k])
    idx = [layer_of(n) for n in ck.keys()]
    idx = [i for i in idx if i is not None]
    return max(idx) + 1 if idx else 0


def _key(seed: int, name: str, index: int) -> int:
    """Philox key of input ``index`` of output tensor ``name`` (the DARE key of calm_fast's kernels)."""
    from .ops import dare_keys

    return int(dare_keys(seed, [name], index + 1)[index, 0])


def _check_counts(method: str, plan: TensorPlan, base: Optional[str]) -> None:
    spec = METHODS[method]
    n = len(plan.inputs)
    has_base = any(i.is_base for i in plan.inputs)
    if spec.base == "required" and not has_base:
        raise ConfigError(f"mergekit's '{method}' needs a base model (base_model) among its inputs"
                          + (" (with slices, list the base as one of the slice's sources)" if base else ""))
    if spec.base == "optional" and base and not has_base:
        raise ConfigError(f"'{method}': the base model {base} is not one of the slice's sources")
    if n < spec.min_inputs or (spec.max_inputs is not None and n > spec.max_inputs):
        want = (f"exactly {spec.min_inputs}" if spec.max_inputs == spec.min_inputs else
                f"at most {spec.max_inputs}" if spec.max_inputs is not None else f"at least {spec.min_inputs}")
        extra = ""
        if method == "passthrough":
            extra = " (passthrough copies one source per slice: use slices with one source each, and no base_model)"
        if method == "slerp":
            extra = " (slerp interpolates the base and one other model)"
        if method == "model_stock":
            extra = " (model_stock needs the base and at least two models besides the base)"
        raise ConfigError(f"mergekit's '{method}' takes {want} input model(s) per tensor, got {n} for "
                          f"{plan.name}{extra}")
    if method == "nuslerp":
        others = sum(not i.is_base for i in plan.inputs)
        if others != 2:
            raise ConfigError(f"mergekit's 'nuslerp' merges exactly two models besides the base, got {others}")


def _resolve_params(method: str, plan: TensorPlan) -> tuple:
    spec = METHODS[method]
    shared = {}
    for name, (scope, typ, default) in spec.params.items():
        if scope == "shared":
            shared[name] = resolve(name, typ, default, plan.shared_blocks, plan.name, plan.t, plan.name)
    per_input = []
    for inp in plan.inputs:
        p = {}
        for name, (scope, typ, default) in spec.params.items():
            if scope == "input" or (scope == "non_base" and not inp.is_base):
                where = f"{inp.model} ({inp.name})"
                if inp.is_base and scope == "input":
                    where += (" — the base_model is one of this method's inputs, as in mergekit: give it a "
                              f"'{name}' (in 'parameters' or by listing it in 'models'), or drop base_model")
                p[name] = resolve(name, typ, default, inp.blocks, inp.name, plan.t, where)
        per_input.append(p)
    return shared, per_input


def _donor(cfg: MergekitConfig) -> str:
    if cfg.tokenizer_source not in (None, "base"):
        return cfg.tokenizer_source
    if cfg.base_model:
        return cfg.base_model
    if cfg.models:
        return cfg.models[0].model
    return cfg.slices[0].sources[0].model


def _vocab_of(folder: Optional[Path]) -> Optional[Any]:
    """The vocabulary a model's tokenizer defines (for the tokenizer_source check), or None."""
    if folder is None:
        return None
    tj = _read_json(folder / "tokenizer.json")
    if tj is not None:
        return json.dumps({"model": tj.get("model"), "added": tj.get("added_tokens")}, sort_keys=True)
    for name in ("tokenizer.model", "vocab.json", "vocab.txt"):
        p = folder / name
        if p.is_file():
            return hashlib.sha256(p.read_bytes()).hexdigest()
    return None


def _check_tokenizer_source(cfg: MergekitConfig, models: Sequence[str]) -> None:
    """``tokenizer_source`` is supported when every model already uses the donor's vocabulary (mergekit then
    leaves the embeddings as they are); building a union or remapping vocabularies is refused."""
    if cfg.tokenizer_source is None:
        return
    donor = _donor(cfg)
    ref = _vocab_of(_folder(donor))
    if ref is None:
        raise ConfigError(f"tokenizer_source: {cfg.tokenizer_source}: no tokenizer files in {donor}")
    for m in models:
        v = _vocab_of(_folder(m))
        if v is not None and v != ref:
            raise ConfigError(f"tokenizer_source: {m} has a different vocabulary from {donor}; remapping "
                              "embeddings between vocabularies (mergekit's tokenizer merge) is not supported by "
                              "calm-fast")
    tj = _read_json(_folder(donor) / "tokenizer.json") or {}
    vocab = (tj.get("model") or {}).get("vocab")
    size = (len(vocab) if isinstance(vocab, (dict, list)) else 0) + len(
        [t for t in tj.get("added_tokens") or [] if isinstance(vocab, dict) and t.get("content") not in vocab])
    conf = _read_json(_folder(donor) / "config.json") or {}
    if vocab is not None and isinstance(conf.get("vocab_size"), int) and conf["vocab_size"] != size:
        raise ConfigError(f"tokenizer_source: the tokenizer of {donor} has {size} tokens but its embeddings have "
                          f"{conf['vocab_size']} rows; mergekit resizes the embeddings to the tokenizer there, "
                          "which calm-fast does not support")


def model_card(cfg: MergekitConfig, config_text: str, name: str) -> str:
    """A short README.md for the output (what mergekit writes: the method, the models, the config)."""
    models = []
    for p in ([cfg.base_model] if cfg.base_model else []) + [m for m, _ in (input_order(cfg) if cfg.models else [])] + [
            s.model for sl in (cfg.slices or []) for s in sl.sources]:
        if p and p not in models:
            models.append(p)
    lines = ["---", "tags:", "- merge", "- calm-fast", "- mergekit", "---", f"# {name}", "",
             "This model was merged with [calm-fast](https://github.com/) from a mergekit-format configuration, "
             "with mergekit's semantics.", "", "## Merge details", "",
             f"Merge method: `{cfg.merge_method}`" + (f", base model `{cfg.base_model}`." if cfg.base_model else "."),
             "", "Models merged:", ""]
    lines += [f"* `{m}`" for m in models]
    lines += ["", "## Configuration", "", "```yaml", config_text.rstrip(), "```", ""]
    return "\n".join(lines)


def _out_config(cfg: MergekitConfig, out_dtype: Optional[torch.dtype]) -> Optional[bytes]:
    src = cfg.base_model or (input_order(cfg)[0][0] if cfg.models else cfg.slices[0].sources[0].model)
    folder = _folder(src)
    conf = _read_json(folder / "config.json") if folder is not None else None
    if conf is None:
        return None
    if out_dtype is not None:
        name = str(out_dtype).replace("torch.", "")
        present = [k for k in ("dtype", "torch_dtype") if k in conf]
        for k in present or ("dtype", "torch_dtype"):
            conf[k] = name
    layers = total_output_layers(cfg)
    if layers is not None:
        target = conf.get("text_config") if isinstance(conf.get("text_config"), dict) and not any(
            k in conf for k in _LAYER_KEYS) else conf
        for k in _LAYER_KEYS:
            if k in target:
                target[k] = layers
                break
        else:
            target["num_hidden_layers"] = layers
    return (json.dumps(conf, indent=2) + "\n").encode()


def merge_mergekit(cfg: MergekitConfig, output: Optional[str] = None, *, out_dtype: Optional[str] = None,
                   overwrite: bool = False, dry_run: bool = False, shard_size: Any = "5GB",
                   trust_pickle: bool = False, copy_files: bool = True, seed: int = 0,
                   config_text: Optional[str] = None, progress: bool = False, fsync: bool = True) -> MergekitResult:
    """Merge with mergekit's semantics (see the module docstring).

    Args:
        cfg: a validated config (:func:`calm_fast.mergekit_config.validate_mergekit`, paths absolute).
        output: the output folder (or ``.safetensors`` file); ``None`` only with ``dry_run``.
        out_dtype: overrides the config's ``out_dtype`` (the dtype the tensors are saved in).
        overwrite, shard_size, trust_pickle: as for :func:`calm_fast.streaming.merge_checkpoints`.
        copy_files: stage ``config.json``, tokenizer files, ``mergekit_config.yml`` and ``README.md``.
        seed: seed of the random sparsifications (dare_*, della*), recorded in the metadata.
        config_text: the config as the user wrote it (saved as ``mergekit_config.yml``).
        dry_run: validate and plan (headers only); read no tensor data and write nothing.
    """
    t0 = time.perf_counter()
    method = cfg.merge_method
    work_dtype = _dtype(cfg.dtype)
    save_dtype = _dtype(out_dtype) if out_dtype is not None else _dtype(cfg.out_dtype)
    if cfg.models:
        paths = [p for p, _ in input_order(cfg)]
    else:
        paths = [src.model for s in cfg.slices for src in s.sources]
        paths += [s.base_model for s in cfg.slices if s.base_model]
        if cfg.base_model:
            paths.append(cfg.base_model)
    paths = list(dict.fromkeys(paths))
    cks: Dict[str, Checkpoint] = {}
    try:
        for p in paths:
            lora_base = cfg.base_model if is_lora_adapter(p) else None
            cks[p] = open_checkpoint(p, trust_pickle=trust_pickle, lora_base=lora_base)
        ref = cfg.base_model or paths[0]
        names = list(cks[ref].keys())
        layers = {p: _num_layers(p, ck) for p, ck in cks.items()}
        plans = plan_tensors(cfg, names, layers)
        _check_tokenizer_source(cfg, paths)
        specs = []
        for plan in plans:
            _check_counts(method, plan, cfg.base_model)
            infos = []
            for inp in plan.inputs:
                ck = cks[inp.model]
                if inp.name not in ck:
                    raise MismatchError(f"{inp.model} has no tensor {inp.name!r} (needed for {plan.name})")
                infos.append(ck.info(inp.name))
            shapes = {tuple(i.shape) for i in infos}
            if len(shapes) != 1:
                raise MismatchError(f"tensor size mismatch for {plan.name}: " + ", ".join(
                    f"{inp.model}: {tuple(i.shape)}" for inp, i in zip(plan.inputs, infos)))
            _resolve_params(method, plan)  # every parameter resolves (a missing weight is an error now)
            floating = all(i.dtype.is_floating_point for i in infos)
            if not floating:
                dt = infos[0].dtype
            else:
                dt = work_dtype or _promoted([i.dtype for i in infos])
                dt = save_dtype or dt
            specs.append(OutputSpec(plan.name, tuple(infos[0].shape), dt))
        result = MergekitResult(method=method, plans=plans, seed=seed)
        if METHODS[method].random:
            result.notes.append(f"random masks drawn with calm-fast's Philox generator (seed {seed}); "
                                "mergekit's global-RNG "
                                "draws differ, the statistics are the same")
        result.timings["plan"] = time.perf_counter() - t0
        if dry_run:
            result.timings["total"] = time.perf_counter() - t0
            return result
        if not output:
            raise ConfigError("no output (use --out or 'output' in the config), or --dry-run")
        meta = {"calm_fast.method": f"mergekit:{method}", "calm_fast.seed": str(seed)}
        for k, v in (cfg.metadata or {}).items():
            meta[str(k)] = v if isinstance(v, str) else json.dumps(v)
        text = config_text if config_text is not None else _yaml_of(cfg)
        protect = [p for p in paths]
        with AtomicOutput(output, overwrite=overwrite, protect=protect, fsync=fsync) as out:
            with SafetensorsWriter(output, specs, metadata=meta, max_shard_size=shard_size, output=out,
                                   fsync=fsync) as writer:
                bar = _progress(len(plans), progress)
                for plan, spec in zip(plans, specs):
                    entries = []
                    shared, per_input = _resolve_params(method, plan)
                    for j, (inp, params) in enumerate(zip(plan.inputs, per_input)):
                        x = cks[inp.model].read(inp.name)
                        if work_dtype is not None and x.is_floating_point():
                            x = x.to(work_dtype)
                        key = _key(seed, plan.name, j) if METHODS[method].random else None
                        entries.append(Entry(x, inp.is_base, params, key))
                    if all(e.tensor.is_floating_point() for e in entries):
                        dt = _promoted([e.tensor.dtype for e in entries])
                        for e in entries:
                            e.tensor = e.tensor.to(dt)
                    merged = merge_tensor(method, entries, shared)
                    writer.write(plan.name, merged.to(spec.dtype) if merged.is_floating_point() else merged)
                    result.bytes_written += spec.nbytes
                    del entries, merged
                    if bar is not None:
                        bar.update(1)
                if bar is not None:
                    bar.close()
                result.paths = writer.commit()
            if copy_files:
                conf = _out_config(cfg, save_dtype or work_dtype)
                if conf is not None:
                    out.write_bytes("config.json", conf)
                    result.paths.append(out.final_path("config.json"))
                donor = _folder(_donor(cfg))
                if donor is not None:
                    for name in TOKENIZER_FILES:
                        f = donor / name
                        if f.is_file() and not out.single_file:
                            out.write_bytes(name, f.read_bytes())
                            result.paths.append(out.final_path(name))
                if not out.single_file:
                    out.write_bytes("mergekit_config.yml", text.encode("utf-8"))
                    out.write_bytes("README.md", model_card(cfg, text, Path(output).name).encode("utf-8"))
                    result.paths += [out.final_path("mergekit_config.yml"), out.final_path("README.md")]
    finally:
        for ck in cks.values():
            try:
                ck.close()
            except Exception:  # pragma: no cover - best effort
                pass
    result.timings["total"] = time.perf_counter() - t0
    return result


def _promoted(dtypes: Sequence[torch.dtype]) -> torch.dtype:
    dt = dtypes[0]
    for d in dtypes[1:]:
        dt = torch.promote_types(dt, d)
    return dt


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc="merging (mergekit semantics)", unit="tensor", file=sys.stderr)


def _yaml_of(cfg: MergekitConfig) -> str:
    import yaml

    data = cfg.model_dump(exclude_none=True, exclude={"output", "shard_size", "trust_pickle", "metadata", "format"})
    return yaml.safe_dump(data, sort_keys=False)


def load_mergekit_config(path: str) -> tuple:
    """Read, validate and resolve a mergekit-format file: ``(config, text)``."""
    from .config import parse_yaml
    from .mergekit_config import resolve_mergekit_paths, validate_mergekit

    with open(path, encoding="utf-8") as f:
        text = f.read()
    data = parse_yaml(text, str(path))
    cfg = validate_mergekit(data, str(path))
    return resolve_mergekit_paths(cfg, os.path.dirname(os.path.abspath(path))), text


# ------------------------------------------------------------------------------------------------
# Command line (``calm-fast merge --config`` hands a mergekit-format file over to this)
# ------------------------------------------------------------------------------------------------
#: ``calm-fast merge`` flags that define a calm-fast merge; with a mergekit-format config the file does
_CALM_FLAGS = {"base": "--base", "model": "--model", "method": "--method", "scaling": "--scaling",
               "density": "--density", "merge": "--merge", "mode": "--mode", "p": "--p", "rescale": "--rescale",
               "combine": "--combine", "tall_lambdas": "--tall-lambdas", "min_count": "--min-count",
               "alpha": "--alpha", "mtl": "--mtl", "ties_density": "--ties-density", "ties_merge": "--ties-merge",
               "weights": "--weights", "set": "--set", "include": "--include", "exclude": "--exclude",
               "on_mismatch": "--on-mismatch", "nonfinite": "--nonfinite"}


def config_format(path: str) -> str:
    """'mergekit' or 'calm-fast' for a config file (see :func:`calm_fast.mergekit_config.detect_format`)."""
    from .config import parse_yaml
    from .mergekit_config import detect_format

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError):
        return "calm-fast"  # calm_fast.config reports the problem
    return detect_format(parse_yaml(text, str(path)))


def run_mergekit_cli(args) -> int:
    """``calm-fast merge --config FILE`` for a mergekit-format FILE (the run flags apply; the flags that
    define a calm-fast merge are refused: the file defines the merge)."""
    from .io.publish import atomic_write_file

    given = [flag for dest, flag in _CALM_FLAGS.items() if getattr(args, dest, None) not in (None, False, [])]
    if given:
        raise ConfigError(f"{args.config} is a mergekit-format config: it defines the merge, so {', '.join(given)} "
                          "cannot be combined with it (edit the file, or write a calm-fast config)")
    if getattr(args, "memory_budget", None) is not None:
        print("calm-fast: note: --memory-budget does not apply to a mergekit-format merge (it holds one output "
              "tensor's inputs at a time)", file=sys.stderr)
    cfg, text = load_mergekit_config(args.config)
    from .config import parse_yaml
    from .mergekit_config import is_ambiguous

    if is_ambiguous(parse_yaml(text, str(args.config))) and not args.quiet:
        print(f"calm-fast: note: {args.config} has only keys mergekit and calm-fast share: it is read as a mergekit "
              "config, with mergekit's semantics (lambda 1, per-tensor trim, ...); add 'format: calm-fast' for "
              "calm-fast's own", file=sys.stderr)
    output = args.out or cfg.output
    if not output and not args.dry_run:
        raise ConfigError("no output (use --out or 'output' in the config), or --dry-run")
    out_dtype = args.out_dtype or args.dtype
    if out_dtype is not None and out_dtype.lower().replace("torch.", "") not in DTYPE_ALIASES:
        raise ConfigError(f"--out-dtype: expected float32, bfloat16 or float16, got {out_dtype!r}")
    progress = not args.no_progress and not args.quiet and sys.stderr.isatty()
    result = merge_mergekit(cfg, output, out_dtype=out_dtype, overwrite=args.overwrite, dry_run=args.dry_run,
                            shard_size=args.shard_size or cfg.shard_size or "5GB",
                            trust_pickle=bool(args.trust_pickle or cfg.trust_pickle),
                            copy_files=not args.no_copy_config, seed=0 if args.seed is None else args.seed,
                            config_text=text, progress=progress)
    if args.dry_run or not args.quiet:
        print(result.describe())
    if args.dry_run:
        print(f"dry run: {'would write ' + str(output) + ', ' if output else ''}{len(result.plans)} tensors; "
              "no tensor data was read and nothing was written")
    elif not args.quiet:
        print(result.summary())
        print("wrote: " + ", ".join(result.paths[:4]) + (f" (+{len(result.paths) - 4} more)"
                                                         if len(result.paths) > 4 else ""))
    if args.json:
        info = {"format": "mergekit", "method": result.method, "dry_run": bool(args.dry_run), "seed": result.seed,
                "tensors": len(result.plans), "paths": result.paths, "timings": result.timings,
                "bytes_written": result.bytes_written, "notes": result.notes}
        atomic_write_file(args.json, (json.dumps(info, indent=2) + "\n").encode(), overwrite=True)
    return 0
