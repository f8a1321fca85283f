"""The merge configuration (``calm-fast merge --config FILE``): a typed schema, checked with pydantic.

Every key of the YAML file is validated before anything is opened:

* types are strict: ``trust_pickle: "false"`` or ``rescale: "no"`` (quoted, so strings) are errors, never
  truthy; an integer field rejects ``true`` and ``1.5``; a number field rejects strings;
* numbers must be finite (``.nan`` / ``.inf`` are errors);
* unknown keys are errors, naming the key and the closest valid one;
* the method-parameter aliases (``lambda`` → ``scaling``, ``drop_rate`` → ``p``, ``k`` → ``min_count``,
  ``merge_func`` → ``merge``, ``ties_k`` → ``ties_density``) and top-level aliases (``method``, ``base``,
  ``out``, ``max_shard_size``) are accepted; giving a key and its alias both is an error.

Relative paths in the file (``base_model``, every ``model``, ``output``) are relative to the file's folder,
whatever the working directory (:func:`resolve_paths`).  The YAML is read as YAML 1.2 reads numbers:
``1e-3`` is a float (PyYAML's YAML 1.1 rules would make it the string ``"1e-3"``).

Errors are :class:`calm_fast.io.ConfigError` (the CLI exits 2) with a one-paragraph message.
"""
from __future__ import annotations

import difflib
import math
import os
import re
from typing import Annotated, Any, Dict, List, Literal, Mapping, Optional, Union

from pydantic import (BaseModel, ConfigDict, Field, JsonValue, PlainValidator, StrictBool, StrictInt, StrictStr,
                      ValidationError, field_validator, model_validator)

from .io.errors import ConfigError

# ------------------------------------------------------------------------------------------------
# Value types with one clear error each (plain validators: a union would report every branch)
# ------------------------------------------------------------------------------------------------


def _describe(v: Any) -> str:
    kind = {str: "a string", bool: "a boolean", type(None): "null", list: "a list", dict: "a mapping"}.get(
        type(v), type(v).__name__)
    text = repr(v)
    return f"{text[:60]}{'...' if len(text) > 60 else ''} ({kind})"


def finite_number(v: Any, what: str = "a finite number") -> float:
    """A real number (int or float, not bool, not a string), finite, as float."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        hint = " (quoted values are strings: write the number without quotes)" if isinstance(v, str) else ""
        raise ValueError(f"expected {what}, got {_describe(v)}{hint}")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"expected {what}, got {v}")
    return v


def _number_or_list(v: Any) -> Union[float, List[float]]:
    if isinstance(v, list):
        if not v:
            raise ValueError("expected a number or a non-empty list of numbers, got []")
        return [finite_number(x, "a finite number in the list") for x in v]
    return finite_number(v, "a finite number or a list of finite numbers")


_WEIGHT_SPEC_HELP = ("a number, a list of numbers (a per-layer gradient) or a list of {filter, value} entries "
                     "(filter: a substring or 're:regex'; an entry without filter is the default)")


def weight_spec(v: Any) -> Any:
    """A mergekit-style weight spec (see ``calm_fast.streaming.weight_for``), numbers checked finite."""
    if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
        out = []
        for i, entry in enumerate(v):
            bad = sorted(set(entry) - {"filter", "value"})
            if bad or "value" not in entry:
                raise ValueError(f"entry {i}: expected keys 'filter' (optional) and 'value', got {sorted(entry)}")
            e: Dict[str, Any] = {}
            if "filter" in entry:
                if not isinstance(entry["filter"], str):
                    raise ValueError(f"entry {i}: filter must be a string, got {_describe(entry['filter'])}")
                if entry["filter"].startswith("re:"):
                    _compile(entry["filter"][3:])
                e["filter"] = entry["filter"]
            try:
                e["value"] = weight_spec(entry["value"])
            except ValueError as err:
                raise ValueError(f"entry {i} value: {err}") from None
            out.append(e)
        return out
    if isinstance(v, list):
        if not v:
            raise ValueError(f"expected {_WEIGHT_SPEC_HELP}, got []")
        return [finite_number(x, "a finite number in the per-layer list") for x in v]
    if isinstance(v, float):
        return finite_number(v)  # a float that is not finite: say so
    try:
        return finite_number(v)
    except ValueError:
        raise ValueError(f"expected {_WEIGHT_SPEC_HELP}, got {_describe(v)}") from None


def _weights(v: Any) -> Any:
    """Top-level ``weights``: a number, one spec (or [L] row) per model, or a mapping tensor -> numbers."""
    if isinstance(v, dict):
        out = {}
        for k, x in v.items():
            if not isinstance(k, str):
                raise ValueError(f"tensor names must be strings, got {_describe(k)}")
            try:
                out[k] = _number_or_list(x)
            except ValueError as err:
                raise ValueError(f"{k!r}: {err}") from None
        return out
    if isinstance(v, list):
        out = []
        for i, x in enumerate(v):
            try:
                out.append(None if x is None else weight_spec(x))
            except ValueError as err:
                raise ValueError(f"model {i}: {err}") from None
        return out
    return finite_number(v, "a number, one weight spec per model, or a mapping tensor name -> weights")


def _compile(pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"invalid regular expression {pattern!r}: {e}") from None


def _patterns(v: Any) -> List[str]:
    vals = [v] if isinstance(v, str) else v
    if not isinstance(vals, list) or not all(isinstance(x, str) for x in vals):
        raise ValueError(f"expected a regex or a list of regexes (strings), got {_describe(v)}")
    for x in vals:
        _compile(x)
    return list(vals)


def _dtype(v: Any) -> str:
    from .io.formats import DTYPE_ALIASES

    if not isinstance(v, str) or v.lower().replace("torch.", "") not in DTYPE_ALIASES:
        raise ValueError(f"expected one of float32, bfloat16, float16 (or fp32, bf16, fp16), got {_describe(v)}")
    return str(DTYPE_ALIASES[v.lower().replace("torch.", "")]).replace("torch.", "")


def _size(v: Any) -> Union[int, str]:
    from .io.formats import parse_size

    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise ValueError(f"expected a size such as 5GB, 512MiB or a number of bytes, got {_describe(v)}")
    try:
        n = parse_size(v)
    except (ValueError, TypeError):
        n = None
    if n is None or n <= 0:
        raise ValueError(f"expected a positive size such as 5GB, 512MiB or a number of bytes, got {_describe(v)}")
    return v


def _path(v: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f"expected a path (a non-empty string), got {_describe(v)}")
    return v


Number = Annotated[float, PlainValidator(finite_number)]
NumberOrList = Annotated[Union[float, List[float]], PlainValidator(_number_or_list)]
WeightSpec = Annotated[Any, PlainValidator(weight_spec)]
Weights = Annotated[Any, PlainValidator(_weights)]
Patterns = Annotated[List[str], PlainValidator(_patterns)]
DType = Annotated[str, PlainValidator(_dtype)]
Size = Annotated[Union[int, str], PlainValidator(_size)]
PathStr = Annotated[str, PlainValidator(_path)]
MergeRule = Literal["sum", "mean", "max"]


# ------------------------------------------------------------------------------------------------
# The schema
# ------------------------------------------------------------------------------------------------
def _fold_aliases(data: Any, aliases: Mapping[str, str]) -> Any:
    """Rename alias keys to their canonical name (before validation); a key and its alias both: error."""
    if not isinstance(data, dict):
        return data
    out = dict(data)
    for alias, canonical in aliases.items():
        if alias in out:
            if canonical in out:
                raise ValueError(f"'{alias}' is an alias of '{canonical}': give only one of them")
            out[canonical] = out.pop(alias)
    return out


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)


#: parameter aliases (the same as calm_fast.streaming's)
PARAMETER_ALIASES = {"lambda": "scaling", "lambda_": "scaling", "scale": "scaling", "drop_rate": "p",
                     "k": "min_count", "merge_func": "merge", "ties_k": "ties_density"}


class Parameters(_Strict):
    """Method parameters (``parameters:`` in the file, ``--set`` and the method flags on the command line).
    Which of them a method takes is checked against the method afterwards."""

    scaling: Optional[Number] = None
    density: Optional[NumberOrList] = None
    merge: Optional[MergeRule] = None
    mode: Optional[Literal["global", "per_tensor"]] = None
    p: Optional[Number] = None
    seed: Optional[StrictInt] = None
    rescale: Optional[StrictBool] = None
    combine: Optional[Literal["task_arithmetic", "ties"]] = None
    tall_lambdas: Optional[NumberOrList] = None
    min_count: Optional[Annotated[StrictInt, Field(ge=0)]] = None
    alpha: Optional[Number] = None
    mtl: Optional[Literal["sum", "ties"]] = None
    ties_density: Optional[Number] = None
    ties_merge: Optional[MergeRule] = None
    weight: Optional[WeightSpec] = None        # default weight spec of the models that give none
    normalize: Optional[StrictBool] = None     # mergekit's; only false is supported
    int8_mask: Optional[StrictBool] = None     # mergekit's memory option; ignored

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data: Any) -> Any:
        return _fold_aliases(data, PARAMETER_ALIASES)


class ModelParameters(_Strict):
    weight: Optional[WeightSpec] = None
    density: Optional[Number] = None


class ModelEntry(_Strict):
    model: PathStr
    parameters: Optional[ModelParameters] = None

    @model_validator(mode="before")
    @classmethod
    def _bare_path(cls, data: Any) -> Any:
        return {"model": data} if isinstance(data, str) else data


TOP_LEVEL_ALIASES = {"method": "merge_method", "base": "base_model", "out": "output", "max_shard_size": "shard_size"}
#: mergekit keys calm-fast does not implement (an error naming the feature, not "unknown key")
MERGEKIT_UNSUPPORTED = {"slices": "layer slicing/passthrough", "tokenizer_source": "tokenizer merging",
                        "tokenizer": "tokenizer merging", "chat_template": "chat templates",
                        "modules": "module-wise configs"}
#: mergekit keys that are accepted and ignored (a note is printed)
IGNORED = {"int8_mask": "a mergekit memory option; calm_fast never materialises masks"}


class MergeConfig(_Strict):
    """The whole file.  Every field is optional here: what a merge needs (method, base, models, output) is
    checked once the command-line flags are combined with the file."""

    merge_method: Optional[StrictStr] = None
    base_model: Optional[PathStr] = None
    models: Optional[List[ModelEntry]] = None
    parameters: Optional[Parameters] = None
    weights: Optional[Weights] = None
    dtype: Optional[DType] = None
    out_dtype: Optional[DType] = None
    include: Optional[Patterns] = None
    exclude: Optional[Patterns] = None
    on_mismatch: Optional[Literal["error", "skip", "pad", "truncate"]] = None
    output: Optional[PathStr] = None
    shard_size: Optional[Size] = None
    memory_budget: Optional[Size] = None
    seed: Optional[StrictInt] = None
    trust_pickle: Optional[StrictBool] = None
    nonfinite: Optional[Literal["error", "propagate"]] = None
    prefetch: Optional[StrictBool] = None
    copy_config: Optional[StrictBool] = None
    metadata: Optional[Dict[StrictStr, JsonValue]] = None
    format: Optional[Literal["calm-fast"]] = None  # 'mergekit' files go to calm_fast.mergekit_config

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data: Any) -> Any:
        return _fold_aliases(data, TOP_LEVEL_ALIASES)

    @field_validator("parameters", mode="before")
    @classmethod
    def _params_mapping(cls, v: Any) -> Any:
        return {} if v is None else v


# ------------------------------------------------------------------------------------------------
# Error messages
# ------------------------------------------------------------------------------------------------
def _valid_keys(model: type, loc: tuple) -> List[str]:
    """The valid keys at an error location (for 'did you mean')."""
    cur: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        fields = getattr(cur, "model_fields", None)
        if not fields or part not in fields:
            return []
        ann = fields[part].annotation
        cur = _model_in(ann)
        if cur is None:
            return []
    keys = list(getattr(cur, "model_fields", {}))
    if cur is Parameters:
        keys += list(PARAMETER_ALIASES)
    if cur is MergeConfig:
        keys += list(TOP_LEVEL_ALIASES)
    return keys


def _model_in(ann: Any) -> Optional[type]:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for a in getattr(ann, "__args__", ()) or ():
        m = _model_in(a)
        if m is not None:
            return m
    return None


def _loc_text(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def describe_errors(err: ValidationError, model: type, prefix: str = "") -> str:
    """One paragraph for all the errors of a validation."""
    parts = []
    for e in err.errors(include_url=False):
        loc = tuple(e["loc"])
        where = prefix + _loc_text(loc) if loc else prefix.rstrip(". ")
        if e["type"] == "extra_forbidden":
            key = str(loc[-1])
            valid = _valid_keys(model, loc)
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else (f"; valid keys: {', '.join(sorted(valid))}"
                                                                     if valid else "")
            parts.append(f"{where}: unknown key '{key}'{hint}")
            continue
        msg = e["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        elif "input" in e and e["type"] not in ("missing",):
            hint = " (write true or false; a quoted value is a string)" if (
                e["type"] == "bool_type" and isinstance(e["input"], str)) else ""
            msg = f"{msg[0].lower()}{msg[1:]}, got {_describe(e['input'])}{hint}"
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts)


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------
def _yaml_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        """SafeLoader reading floats as YAML 1.2 does (``1e-3``) and refusing duplicate keys."""

    Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
        list("-+0123456789."))

    def mapping(loader, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            try:
                seen.add(key)
            except TypeError:
                pass
        return loader.construct_mapping(node, deep=deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return Loader


def parse_yaml(text: str, where: str = "<string>") -> Any:
    """YAML text -> Python objects (YAML 1.2 floats, duplicate keys refused); errors are ConfigError."""
    import yaml

    try:
        return yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None)
        if mark is not None and problem:
            raise ConfigError(f"{where}: invalid YAML at line {mark.line + 1}, column {mark.column + 1}: "
                              f"{problem}") from None
        raise ConfigError(f"{where}: invalid YAML: {' '.join(str(e).split())}") from None


def validate_config(data: Any, where: str = "config") -> MergeConfig:
    """Validate a parsed config mapping against :class:`MergeConfig` (ConfigError naming every problem)."""
    import sys

    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys (merge_method, base_model, models, ...) at the top "
                          f"level, got {_describe(data)}")
    data = dict(data)
    for k in list(data):
        if k in MERGEKIT_UNSUPPORTED:
            raise ConfigError(f"{where}: '{k}' ({MERGEKIT_UNSUPPORTED[k]}) is mergekit's and is not supported in a "
                              "calm-fast-format config (this one has calm-fast keys or 'format: calm-fast'); "
                              "write a mergekit-format config to use it (README: 'mergekit configs')")
        if k in IGNORED:
            print(f"calm-fast: note: ignoring '{k}' ({IGNORED[k]})", file=sys.stderr)
            data.pop(k)
    try:
        return MergeConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{where}: {describe_errors(e, MergeConfig)}") from None
    except ValueError as e:  # raised by an alias fold before pydantic wraps it
        raise ConfigError(f"{where}: {e}") from None


def validate_parameters(params: Mapping[str, Any], prefix: str = "parameters.") -> Dict[str, Any]:
    """Validate method parameters (from the file and/or the command line); returns the given ones, aliases
    folded into their canonical names."""
    try:
        p = Parameters.model_validate(dict(params))
    except ValidationError as e:
        raise ConfigError(describe_errors(e, Parameters, prefix=prefix)) from None
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return p.model_dump(exclude_unset=True)


def load_config(path: Union[str, os.PathLike]) -> MergeConfig:
    """Read and validate a merge YAML file; relative paths in it are resolved against its folder."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config {path} is not UTF-8 text ({e.reason})") from None
    cfg = validate_config(parse_yaml(text, str(path)), str(path))
    return resolve_paths(cfg, os.path.dirname(os.path.abspath(path)))


def _resolve(p: Optional[str], folder: str) -> Optional[str]:
    if p is None:
        return None
    p = os.path.expanduser(p)
    return p if os.path.isabs(p) else os.path.normpath(os.path.join(folder, p))


def resolve_paths(cfg: MergeConfig, folder: str) -> MergeConfig:
    """The config with ``base_model``, every ``model`` and ``output`` made absolute against ``folder``
    (the config file's folder; never the working directory)."""
    update: Dict[str, Any] = {}
    if cfg.base_model is not None:
        update["base_model"] = _resolve(cfg.base_model, folder)
    if cfg.output is not None:
        update["output"] = _resolve(cfg.output, folder)
    if cfg.models is not None:
        update["models"] = [m.model_copy(update={"model": _resolve(m.model, folder)}) for m in cfg.models]
    return cfg.model_copy(update=update)
