"""Method names, aliases, parameters and their checks, per-model / per-layer weights, and the engine's
tunable constants (read at call time as ``params.X``, so they can be changed on this module)."""
from __future__ import annotations

import inspect
import math
import re
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..io.errors import ConfigError
from ..methods._common import check_finite

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
    from .. import methods

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
    from ..methods._common import per_key_table

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
