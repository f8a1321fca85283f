"""Configs in mergekit's format, read with mergekit's semantics and defaults (ALGORITHMS.md §12).

A merge YAML is either calm-fast's own format (:mod:`calm_fast.config`: exact whole-model methods, λ
defaults of the papers) or mergekit's (this module: everything per tensor, mergekit's defaults).  The
two share ``merge_method``, ``base_model`` and ``models``, so the format is decided by the keys
(:func:`detect_format`):

1. an explicit top-level ``format: mergekit`` or ``format: calm-fast`` decides;
2. otherwise a key or method only mergekit has (``slices``, ``tokenizer_source``, ``tokenizer``,
   ``chat_template``, ``modules``; ``parameters`` such as ``normalize``, ``int8_mask``, ``t``, ``gamma``,
   ``epsilon``; per-model parameters other than ``weight``/``density``; methods such as ``linear``,
   ``slerp``, ``breadcrumbs``, ``della``, ``model_stock``, ``passthrough``) makes it mergekit's;
3. otherwise a key or method only calm-fast has (``weights``, ``include``, ``exclude``, ``out_dtype``
   with ``dtype``..., ``parameters.scaling``/``merge``/``mode``/``p``/..., methods ``ties_merging``,
   ``dare``, ``consensus``, ...) makes it calm-fast's;
4. a config with only the shared keys (``merge_method: ties`` + ``base_model`` + ``models`` with
   ``weight``/``density`` + ``dtype``) is mergekit's: that is what mergekit users bring.

A config with markers of both formats is an error naming them.

Semantics (mergekit 0.1.5): parameters are resolved per output tensor, the most specific first
(a slice source's / model's ``parameters``, then the slice's, then the top-level ``parameters``, then
the method's default); a value may be a number, a list (a gradient, interpolated piecewise-linearly
over the layer's position ``t = i / (n − 1)`` in its slice; tensors outside the layers use ``t = 0``) or
a list of ``{filter, value}`` entries (the first whose ``filter`` is a substring of the tensor name, or
has no filter / ``*``, wins).  ``dtype`` is the working dtype (inputs are cast to it), ``out_dtype`` the
saved dtype.  With ``models`` and a ``base_model`` that is not listed, the base is appended as the last
input (so ``linear`` includes it and needs a weight for it, exactly as mergekit does).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from .io.errors import ConfigError
from .methods.mergekit_methods import METHODS, REQUIRED, UNSUPPORTED_METHODS

FORMAT_KEY = "format"
FORMATS = ("mergekit", "calm-fast")

#: keys of the top level that only mergekit has
MERGEKIT_ONLY_KEYS = ("slices", "tokenizer_source", "tokenizer", "chat_template", "modules")
#: top-level ``parameters`` keys that only mergekit uses
MERGEKIT_ONLY_PARAMS = ("normalize", "int8_mask", "t", "gamma", "epsilon", "filter_wise", "nuslerp_row_wise",
                        "nuslerp_flatten", "scale")
#: calm-fast keys with a calm-fast meaning (their presence makes a config calm-fast's)
CALM_ONLY_KEYS = ("weights", "include", "exclude", "on_mismatch", "nonfinite", "seed", "memory_budget",
                  "prefetch", "copy_config")
CALM_ONLY_PARAMS = ("scaling", "scale", "lambda_", "merge", "merge_func", "mode", "p", "drop_rate", "seed",
                    "combine", "tall_lambdas", "min_count", "k", "alpha", "mtl", "ties_density", "ties_k",
                    "ties_merge")
#: calm-fast method names (and aliases) that mergekit does not have
CALM_ONLY_METHODS = ("ta", "ties_merging", "dare", "dare_merging", "consensus", "tall", "consensus_ties",
                     "consensus_merging", "calm", "doge", "doge_ta", "credible")
#: keys accepted in a mergekit-format config that only steer the run (no effect on the numbers)
RUN_KEYS = ("output", "out", "shard_size", "max_shard_size", "trust_pickle", "metadata")


# ------------------------------------------------------------------------------------------------
# Detection
# ------------------------------------------------------------------------------------------------
def _markers(data: Mapping[str, Any]) -> Tuple[List[str], List[str]]:
    mk, cf = [], []
    for k in MERGEKIT_ONLY_KEYS:
        if k in data:
            mk.append(k)
    method = data.get("merge_method", data.get("method"))
    if isinstance(method, str):
        m = method.strip().lower()
        if m in METHODS and m not in ("task_arithmetic", "ties", "dare_ties", "dare_linear"):
            mk.append(f"merge_method: {method}")
        if m in UNSUPPORTED_METHODS:
            mk.append(f"merge_method: {method}")
        if m in CALM_ONLY_METHODS:
            cf.append(f"merge_method: {method}")
    params = data.get("parameters")
    if isinstance(params, Mapping):
        mk += [f"parameters.{k}" for k in MERGEKIT_ONLY_PARAMS if k in params and k != "scale"]
        cf += [f"parameters.{k}" for k in CALM_ONLY_PARAMS if k in params]
    for i, m in enumerate(data.get("models") or []):
        if isinstance(m, Mapping) and isinstance(m.get("parameters"), Mapping):
            extra = sorted(set(m["parameters"]) - {"weight", "density"})
            mk += [f"models[{i}].parameters.{k}" for k in extra]
    for k in CALM_ONLY_KEYS:
        if k in data:
            cf.append(k)
    return mk, cf


def detect_format(data: Any) -> str:
    """``'mergekit'`` or ``'calm-fast'`` for a parsed config mapping (rules: see the module docstring).
    Raises :class:`ConfigError` for a config that mixes both formats' keys."""
    if not isinstance(data, Mapping):
        return "calm-fast"  # calm_fast.config reports the error
    explicit = data.get(FORMAT_KEY)
    if explicit is not None:
        if explicit not in FORMATS:
            raise ConfigError(f"format: expected one of {', '.join(FORMATS)}, got {explicit!r}")
        return str(explicit)
    mk, cf = _markers(data)
    if mk and cf:
        raise ConfigError(f"the config mixes mergekit keys ({', '.join(mk)}) with calm-fast keys ({', '.join(cf)}); "
                          "use one format (add 'format: mergekit' or 'format: calm-fast' to say which)")
    if cf:
        return "calm-fast"
    if mk or "models" in data or "slices" in data:
        return "mergekit"
    return "calm-fast"


# ------------------------------------------------------------------------------------------------
# Schema (mergekit's, strict: an unknown key is an error naming the closest one)
# ------------------------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_setting(v: Any, where: str = "") -> Any:
    """A mergekit parameter setting: scalar, gradient list, or list of {filter, value}."""
    if isinstance(v, bool) or isinstance(v, (int, float, str)):
        return v
    if isinstance(v, dict):
        v = [v]
    if isinstance(v, list):
        if not v:
            raise ValueError("an empty list is not a parameter value")
        if all(isinstance(x, dict) for x in v):
            out = []
            for i, x in enumerate(v):
                bad = sorted(set(x) - {"filter", "value"})
                if bad or "value" not in x:
                    raise ValueError(f"entry {i}: expected keys 'filter' (optional) and 'value', got {sorted(x)}")
                if "filter" in x and x["filter"] is not None and not isinstance(x["filter"], str):
                    raise ValueError(f"entry {i}: filter must be a string")
                out.append({"filter": x.get("filter"), "value": _check_setting(x["value"])})
            return out
        if all(isinstance(x, (bool, int, float, str)) for x in v):
            return list(v)
    raise ValueError(f"expected a number, a list of numbers (a gradient) or a list of {{filter, value}}, got {v!r}")


def _check_params(v: Any) -> Optional[Dict[str, Any]]:
    if v is None:
        return None
    if not isinstance(v, dict):
        raise ValueError(f"parameters must be a mapping, got {v!r}")
    out = {}
    for k, x in v.items():
        try:
            out[str(k)] = _check_setting(x)
        except ValueError as e:
            raise ValueError(f"{k}: {e}") from None
    return out


class _HasParams(_Strict):
    parameters: Optional[Dict[str, Any]] = None

    @field_validator("parameters", mode="before")
    @classmethod
    def _params(cls, v):
        return _check_params(v)


class MKModel(_HasParams):
    model: str

    @model_validator(mode="before")
    @classmethod
    def _bare(cls, data):
        return {"model": data} if isinstance(data, str) else data


class MKSliceSource(_HasParams):
    model: str
    layer_range: Tuple[int, int]


class MKSlice(_HasParams):
    sources: List[MKSliceSource]
    base_model: Optional[str] = None
    residual_weight: Optional[float] = None


class MergekitConfig(_HasParams):
    """A mergekit merge configuration (plus the run keys calm-fast accepts: output, shard_size, ...)."""

    merge_method: str
    base_model: Optional[str] = None
    models: Optional[List[MKModel]] = None
    slices: Optional[List[MKSlice]] = None
    dtype: Optional[str] = None
    out_dtype: Optional[str] = None
    tokenizer_source: Optional[str] = None
    format: Optional[str] = None
    output: Optional[str] = None
    shard_size: Optional[Union[int, str]] = None
    trust_pickle: Optional[bool] = None
    metadata: Optional[Dict[str, Any]] = None

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data):
        if isinstance(data, dict):
            data = dict(data)
            for a, c in (("out", "output"), ("max_shard_size", "shard_size")):
                if a in data:
                    if c in data:
                        raise ValueError(f"'{a}' is an alias of '{c}': give only one of them")
                    data[c] = data.pop(a)
        return data


_UNSUPPORTED_KEYS = {"tokenizer": "the 'tokenizer' block (vocabulary merging / added tokens)",
                     "chat_template": "chat_template", "modules": "multi-module configs ('modules')"}


def validate_mergekit(data: Mapping[str, Any], where: str = "config") -> MergekitConfig:
    """Validate a mergekit-format mapping; anything calm-fast does not implement is refused with a
    message naming the feature."""
    data = dict(data)
    for k, what in _UNSUPPORTED_KEYS.items():
        if k in data and data[k] is not None:
            raise ConfigError(f"{where}: mergekit's {what} is not supported by calm-fast")
    try:
        cfg = MergekitConfig.model_validate(data)
    except ValidationError as e:
        from .config import describe_errors

        raise ConfigError(f"{where}: {describe_errors(e, MergekitConfig)}") from None
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    method = cfg.merge_method.strip().lower()
    if method in UNSUPPORTED_METHODS:
        raise ConfigError(f"{where}: mergekit's merge_method '{cfg.merge_method}' is not supported by calm-fast "
                          f"(supported: {', '.join(sorted(METHODS))})")
    if method not in METHODS:
        raise ConfigError(f"{where}: unknown merge_method '{cfg.merge_method}' for a mergekit-format config "
                          f"(supported: {', '.join(sorted(METHODS))})")
    if (cfg.models is None) == (cfg.slices is None):
        raise ConfigError(f"{where}: give exactly one of 'models' or 'slices'")
    if not (cfg.models or cfg.slices):
        raise ConfigError(f"{where}: '{'models' if cfg.models is not None else 'slices'}' is empty")
    if not all(s.sources for s in cfg.slices or []):
        raise ConfigError(f"{where}: every slice needs at least one source")
    if cfg.tokenizer_source == "union":
        raise ConfigError(f"{where}: tokenizer_source: union (vocabulary merging) is not supported by calm-fast; "
                          "use tokenizer_source: base or a model whose tokenizer all models share")
    for s in cfg.slices or []:
        if s.residual_weight is not None:
            raise ConfigError(f"{where}: slices[].residual_weight is not supported by calm-fast")
    for name in ("dtype", "out_dtype"):
        v = getattr(cfg, name)
        if v is not None:
            from .io.formats import DTYPE_ALIASES

            if v.lower().replace("torch.", "") not in DTYPE_ALIASES:
                raise ConfigError(f"{where}: {name}: expected float32, bfloat16 or float16, got {v!r}")
    spec = METHODS[method]
    known = set(spec.params)
    for scope_name, params in _all_param_blocks(cfg):
        unknown = sorted(set(params or {}) - known)
        if unknown:
            raise ConfigError(f"{where}: {scope_name}: parameter(s) {', '.join(unknown)} are not parameters of "
                              f"mergekit's '{method}' (its parameters: {', '.join(sorted(known)) or 'none'})")
        for name, setting in (params or {}).items():
            try:
                _check_leaves(setting, spec.params[name][1], name)
            except ConfigError as e:
                raise ConfigError(f"{where}: {scope_name}.{name}: {str(e).split(': ', 1)[-1]}") from None
    return cfg.model_copy(update={"merge_method": method})


def _check_leaves(setting: Any, typ: type, name: str) -> None:
    """Type-check every value of a setting (each filter entry, each gradient point) before any tensor is read."""
    if isinstance(setting, list) and setting and all(isinstance(x, dict) for x in setting):
        for cond in setting:
            _check_leaves(cond["value"], typ, name)
    elif isinstance(setting, list):
        for x in setting:
            _cast(x, typ, name)
    else:
        _cast(setting, typ, name)


def _all_param_blocks(cfg: MergekitConfig):
    yield "parameters", cfg.parameters
    for i, m in enumerate(cfg.models or []):
        yield f"models[{i}].parameters", m.parameters
    for i, s in enumerate(cfg.slices or []):
        yield f"slices[{i}].parameters", s.parameters
        for j, src in enumerate(s.sources):
            yield f"slices[{i}].sources[{j}].parameters", src.parameters


def resolve_mergekit_paths(cfg: MergekitConfig, folder: str) -> MergekitConfig:
    """Relative model paths and ``output`` made absolute against the config file's folder."""
    from .config import _resolve

    upd: Dict[str, Any] = {}
    if cfg.base_model:
        upd["base_model"] = _resolve(cfg.base_model, folder)
    if cfg.output:
        upd["output"] = _resolve(cfg.output, folder)
    if cfg.tokenizer_source not in (None, "base"):
        upd["tokenizer_source"] = _resolve(cfg.tokenizer_source, folder)
    if cfg.models:
        upd["models"] = [m.model_copy(update={"model": _resolve(m.model, folder)}) for m in cfg.models]
    if cfg.slices:
        upd["slices"] = [s.model_copy(update={
            "base_model": _resolve(s.base_model, folder) if s.base_model else None,
            "sources": [src.model_copy(update={"model": _resolve(src.model, folder)}) for src in s.sources]})
            for s in cfg.slices]
    return cfg.model_copy(update=upd)


# ------------------------------------------------------------------------------------------------
# Parameter resolution
# ------------------------------------------------------------------------------------------------
def _cast(value: Any, typ: type, name: str) -> Any:
    if value is None:
        return None
    # strict, as calm-fast's own schema: a quoted "false" or "0.5" is a string, never a value
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"parameter {name}: expected true or false, got {value!r}"
                          + (" (a quoted value is a string)" if isinstance(value, str) else ""))
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"parameter {name}: expected a number, got {value!r}"
                          + (" (a quoted value is a string)" if isinstance(value, str) else ""))
    v = float(value)
    if v != v or v in (float("inf"), float("-inf")):
        raise ConfigError(f"parameter {name}: expected a finite number, got {value!r}")
    return v


def evaluate_setting(setting: Any, tensor_name: str, t: float, typ: type, name: str) -> Any:
    """The value of one setting for a tensor at gradient position ``t`` (None when no filter matches)."""
    if isinstance(setting, list) and setting and all(isinstance(x, dict) for x in setting):
        for cond in setting:
            f = cond.get("filter")
            if f is None or f == "*" or (tensor_name and f in tensor_name):
                return evaluate_setting(cond["value"], tensor_name, t, typ, name)
        return None
    if isinstance(setting, list):
        values = [_cast(x, typ, name) for x in setting]
        if typ is bool:
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return _cast((1 - frac) * values[i0] + frac * values[i1], typ, name)
    return _cast(setting, typ, name)


def resolve(name: str, typ: type, default: Any, blocks: Sequence[Optional[Mapping[str, Any]]], tensor_name: str,
            t: float, where: str) -> Any:
    """The first non-None value of ``name`` in ``blocks`` (most specific first), else the default."""
    for b in blocks:
        if b is not None and name in b:
            v = evaluate_setting(b[name], tensor_name, t, typ, name)
            if v is not None:
                return v
    if default is REQUIRED:
        raise ConfigError(f"missing required parameter '{name}' for {where}")
    return default


@dataclass
class TensorInput:
    """One input of an output tensor in the plan."""

    model: str           # path of the model
    name: str            # tensor name in that model
    is_base: bool
    blocks: Tuple[Optional[Mapping[str, Any]], ...]   # parameter blocks, most specific first


@dataclass
class TensorPlan:
    """One output tensor: its name, its inputs and the gradient position t."""

    name: str
    inputs: List[TensorInput]
    t: float
    shared_blocks: Tuple[Optional[Mapping[str, Any]], ...]


_LAYER_RE = re.compile(r"(^|\.)(layers|h|blocks|block|layer)\.(\d+)\.")
_PRE_RE = re.compile(r"embed|wte|wpe|word_embeddings|position_embeddings")


def layer_of(name: str) -> Optional[int]:
    """The transformer layer index in a tensor name (``model.layers.3.mlp...`` -> 3), else None."""
    m = _LAYER_RE.search(name)
    return int(m.group(3)) if m else None


def rename_layer(name: str, index: int) -> str:
    m = _LAYER_RE.search(name)
    return name[:m.start(3)] + str(index) + name[m.end(3):]


def is_pre_layer(name: str) -> bool:
    """Tensors before the layers (embeddings) come from the first slice, the others from the last."""
    return bool(_PRE_RE.search(name))


def input_order(cfg: MergekitConfig) -> List[Tuple[str, Optional[Mapping[str, Any]]]]:
    """(model path, its parameters) in mergekit's input order for a ``models`` config."""
    out = [(m.model, m.parameters) for m in cfg.models]
    if cfg.base_model and all(m.model != cfg.base_model for m in cfg.models):
        out.append((cfg.base_model, None))
    return out


def plan_tensors(cfg: MergekitConfig, names: Sequence[str], num_layers: Mapping[str, int]) -> List[TensorPlan]:
    """The output tensors of a config: ``names`` are the reference model's tensor names (in order) and
    ``num_layers`` the number of layers of each model (by path)."""
    glob = cfg.parameters
    plans: List[TensorPlan] = []
    if cfg.models:
        order = input_order(cfg)
        ref = cfg.base_model or order[0][0]
        n = num_layers[ref]
        for name in names:
            li = layer_of(name)
            t = 0.0 if li is None else (li / (n - 1) if n > 1 else 1.0)
            inputs = [TensorInput(p, name, p == cfg.base_model, (params, glob)) for p, params in order]
            plans.append(TensorPlan(name, inputs, t, (glob,)))
        return plans
    slices = cfg.slices
    for i, s in enumerate(slices):
        lengths = {src.layer_range[1] - src.layer_range[0] for src in s.sources}
        if len(lengths) != 1:
            raise ConfigError(f"slices[{i}]: all sources of a slice must have the same number of layers, got "
                              f"{[src.layer_range for src in s.sources]}")
        for src in s.sources:
            a, b = src.layer_range
            if not (0 <= a <= b <= num_layers[src.model]):
                raise ConfigError(f"slices[{i}]: layer_range {[a, b]} is outside {src.model}'s "
                                  f"{num_layers[src.model]} layers")

    def slice_inputs(s: MKSlice, name_for) -> List[TensorInput]:
        base = s.base_model or cfg.base_model
        # mergekit does not add the base to a slice's sources: a method that needs it must list it
        return [TensorInput(src.model, name_for(src), src.model == base, (src.parameters, s.parameters, glob))
                for src in s.sources]

    layer_names = [nm for nm in names if layer_of(nm) is not None]
    ref_layer = min((layer_of(nm) for nm in layer_names), default=0)
    template = [nm for nm in layer_names if layer_of(nm) == ref_layer]
    pre = [nm for nm in names if layer_of(nm) is None and is_pre_layer(nm)]
    post = [nm for nm in names if layer_of(nm) is None and not is_pre_layer(nm)]
    for name in pre:
        plans.append(TensorPlan(name, slice_inputs(slices[0], lambda src, n=name: n), 0.0,
                                (slices[0].parameters, glob)))
    out_layer = 0
    for s in slices:
        count = s.sources[0].layer_range[1] - s.sources[0].layer_range[0]
        for off in range(count):
            t = off / (count - 1) if count > 1 else 1.0
            for tmpl in template:
                out_name = rename_layer(tmpl, out_layer)

                def name_for(src, tmpl=tmpl, off=off):
                    return rename_layer(tmpl, src.layer_range[0] + off)

                plans.append(TensorPlan(out_name, slice_inputs(s, name_for), t, (s.parameters, glob)))
            out_layer += 1
    for name in post:
        plans.append(TensorPlan(name, slice_inputs(slices[-1], lambda src, n=name: n), 0.0,
                                (slices[-1].parameters, glob)))
    return plans


def total_output_layers(cfg: MergekitConfig) -> Optional[int]:
    """The number of layers of the output of a ``slices`` config (None for a ``models`` config)."""
    if not cfg.slices:
        return None
    return sum(s.sources[0].layer_range[1] - s.sources[0].layer_range[0] for s in cfg.slices)


def refuse_mergekit_method(method: str) -> None:
    """A calm-fast-format merge (flags or a calm-fast config) naming a method only mergekit configs have:
    a clear error saying where that method lives (not "no base model")."""
    m = str(method).strip().lower()
    if m in METHODS and m not in ("task_arithmetic", "ties", "dare_ties", "dare_linear"):
        raise ConfigError(f"'{method}' is one of mergekit's methods: write it as a mergekit-format config "
                          "(merge_method, base_model, models with parameters; see the README's 'mergekit configs') "
                          "and run calm-fast merge --config FILE")
    if m in UNSUPPORTED_METHODS:
        raise ConfigError(f"mergekit's merge method '{method}' is not supported by calm-fast")


def is_ambiguous(data: Any) -> bool:
    """True for a config read as mergekit's only because it has no key of either format alone (rule 4)."""
    if not isinstance(data, Mapping) or data.get(FORMAT_KEY) is not None:
        return False
    mk, cf = _markers(data)
    return not mk and not cf
