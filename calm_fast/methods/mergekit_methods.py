"""mergekit's merge methods, one output tensor at a time (the parity rules of ALGORITHMS.md §12).

Each function takes the inputs of one output tensor as :class:`Entry` objects (in mergekit's input
order: the ``models`` list, with a ``base_model`` that is not listed appended last), the shared
parameters (``normalize``, ``lambda``, ``t``, ...) and each entry's own resolved parameters
(``weight``, ``density``, ...), all already resolved for this tensor (filters and per-layer gradients:
:mod:`calm_fast.mergekit_config`).  Inputs arrive in one dtype (the config's ``dtype`` if given, else
the promoted dtype of the inputs), exactly as mergekit aligns them.

Arithmetic order follows mergekit's, so fp32 results are bitwise equal to mergekit 0.1.5's for the
deterministic methods on the same torch build:

* generalized task arithmetic (task_arithmetic, ties, dare_*, breadcrumbs*, della*) works in the input
  dtype: deltas stacked, weights as a tensor of that dtype, sums with ``sum(dim=0)``;
* linear, slerp accumulate in fp32 (fp64 for fp64 inputs) and return the input dtype;
* nuslerp and model_stock work in the input dtype.

The random sparsifications (dare_*, della*) draw with calm_fast's Philox generator under each entry's
``key`` (derived from the seed, the input's index and the tensor name), so their masks differ from
mergekit's global-RNG draws; the distribution and the rescaling are mergekit's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import torch

from .mergekit_sparsify import sparsify

Tensor = torch.Tensor


@dataclass
class Entry:
    """One input of an output tensor: its tensor, whether it is the base model, its own parameters."""

    tensor: Tensor
    is_base: bool = False
    params: Dict[str, Any] = field(default_factory=dict)
    key: Optional[int] = None    # Philox key of the random sparsifications (dare_*, della*)


@dataclass(frozen=True)
class GTAVariant:
    """A member of mergekit's generalized task arithmetic family."""

    sparsification: Optional[str]
    consensus: bool
    default_normalize: bool
    default_rescale: bool


GTA_METHODS: Dict[str, GTAVariant] = {
    "task_arithmetic": GTAVariant(None, False, False, False),
    "ties": GTAVariant("magnitude", True, True, False),
    "dare_ties": GTAVariant("random", True, False, True),
    "dare_linear": GTAVariant("random", False, False, True),
    "breadcrumbs": GTAVariant("magnitude_outliers", False, False, False),
    "breadcrumbs_ties": GTAVariant("magnitude_outliers", True, False, False),
    "della": GTAVariant("della_magprune", True, True, True),
    "della_linear": GTAVariant("della_magprune", False, False, True),
}


def _base(entries: Sequence[Entry], method: str) -> Entry:
    for e in entries:
        if e.is_base:
            return e
    raise ValueError(f"{method} needs a base model (base_model)")


def generalized_task_arithmetic(method: str, entries: Sequence[Entry], shared: Mapping[str, Any]) -> Tensor:
    """task_arithmetic / ties / dare_* / breadcrumbs* / della* for one tensor.

    τ_i = x_i − base, sparsified with the entry's ``density`` (and ``gamma``/``epsilon``), rescaled to
    its L1 norm when ``rescale``; multiplied by ``weight``; with consensus, only the entries whose sign
    equals the sign of Σ wτ (zero counts as +) are summed and the divisor is the sum of their weights;
    ``normalize`` divides by the divisor, ``lambda`` scales; result ``base + mixed`` in the base dtype.
    """
    v = GTA_METHODS[method]
    base = _base(entries, method).tensor
    others = [e for e in entries if not e.is_base]
    if not others:
        return base
    deltas = base.new_empty((len(others), *base.shape))
    for i, e in enumerate(others):
        delta = e.tensor - base
        if v.sparsification is not None:
            delta = sparsify(delta, density=e.params["density"], method=v.sparsification,
                             rescale_norm="l1" if shared["rescale"] else None,
                             gamma=e.params.get("gamma", 0), epsilon=e.params.get("epsilon", 0),
                             key=e.key)
        deltas[i] = delta
    weights = torch.tensor([e.params["weight"] for e in others], dtype=deltas.dtype, device=deltas.device)
    weights = weights.reshape((len(others),) + (1,) * base.dim())
    deltas.mul_(weights)
    if v.consensus:
        # majority sign of the weighted sum (a zero sum counts as +1); zeros never agree
        majority = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
        mask = deltas.sign() == majority
        mixed = (deltas * mask).sum(dim=0)
        divisor = (weights * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if shared["normalize"]:
        mixed /= divisor
    if shared["lambda"] != 1:
        mixed *= shared["lambda"]
    return (base + mixed).to(base.dtype)


def _accumulation_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def linear(entries: Sequence[Entry], shared: Mapping[str, Any]) -> Tensor:
    """Σ w_i x_i over every input (the base included when it is an input), divided by Σ w_i when
    ``normalize`` (default true); fp32 accumulation in input order, result in the input dtype."""
    first = entries[0].tensor
    if not first.is_floating_point():
        raise TypeError("linear merging needs floating-point tensors")
    acc = _accumulation_dtype(first)
    w = torch.tensor([e.params["weight"] for e in entries], dtype=acc)
    out = torch.zeros_like(first, dtype=acc)
    for e, c in zip(entries, w.unbind(0)):
        out.addcmul_(e.tensor, c)
    if shared["normalize"]:
        out.div_(w.sum())
    return out.to(first.dtype)


_SLERP_CHUNK = 1024 * 1024


def slerp(t: float, v0: Tensor, v1: Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8) -> Tensor:
    """Spherical interpolation of two whole tensors (flattened), fp32 accumulation; nearly colinear
    (|cos| > ``dot_threshold``) or antipodal pairs interpolate linearly.  Norms and the dot product
    are accumulated over chunks of 2^20 elements, as mergekit does for one tensor."""
    acc = _accumulation_dtype(v0)
    a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    tt = torch.tensor([float(t)], dtype=torch.float32).to(acc).reshape(-1, 1)
    n = a.shape[1]
    if n == 0:
        return ((1 - tt) * a + tt * b).reshape(v0.shape).to(v0.dtype)
    starts = range(0, n, _SLERP_CHUNK)

    def chunk(x, s):
        return x[:, s:s + _SLERP_CHUNK].to(acc)

    na = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(chunk(a, s), dim=1, keepdim=True)
                                               for s in starts]), dim=0)
    nb = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(chunk(b, s), dim=1, keepdim=True)
                                               for s in starts]), dim=0)
    na = torch.where(na > eps, na, 1)
    nb = torch.where(nb > eps, nb, 1)
    dot = torch.stack([((chunk(a, s) / na) * (chunk(b, s) / nb)).sum(dim=1, keepdim=True)
                       for s in starts]).sum(dim=0).clamp(-1, 1)
    lin = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(lin, 0, dot))
    sin_theta = torch.sin(theta)
    ca = torch.where(lin, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    cb = torch.where(lin, tt, torch.sin(tt * theta) / sin_theta)
    out = torch.empty_like(a)
    for s in starts:
        out[:, s:s + _SLERP_CHUNK] = ca * chunk(a, s) + cb * chunk(b, s)
    return out.reshape(v0.shape)


def slerp_merge(entries: Sequence[Entry], shared: Mapping[str, Any]) -> Tensor:
    """mergekit ``slerp``: the base (t = 0) and exactly one other model (t = 1)."""
    base = _base(entries, "slerp")
    others = [e for e in entries if not e.is_base]
    if len(entries) != 2 or len(others) != 1:
        raise ValueError(f"slerp merges exactly two models (the base and one other), got {len(entries)}")
    if not base.tensor.is_floating_point():
        raise TypeError("slerp needs floating-point tensors")
    return slerp(shared["t"], base.tensor, others[0].tensor)


def nuslerp(t: float, v0: Tensor, v1: Tensor, dim: int = -1, eps: float = 1e-8, flatten: bool = False) -> Tensor:
    """mergekit's NuSLERP interpolation (per row along ``dim``, or of the flattened tensors)."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)

    def unit(x):
        return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-7)

    cos = torch.sum(unit(v0) * unit(v1), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps ** 2
    theta = torch.acos(torch.where(colinear, 0, cos))
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * v0 + t * v1, out)
    if dim != -1 and not flatten:
        out = out.transpose(dim, -1)
    return out.reshape(shape)


def nuslerp_merge(entries: Sequence[Entry], shared: Mapping[str, Any]) -> Tensor:
    """mergekit ``nuslerp``: two non-base models with weights w0, w1 (t = w1 / (w0 + w1), 0.5 when the sum
    is ~0); with a base, the two task vectors are interpolated and added to it."""
    others = [e for e in entries if not e.is_base]
    if len(others) != 2:
        raise ValueError(f"nuslerp merges exactly two non-base models, got {len(others)}")
    w = [e.params["weight"] for e in others]
    total = sum(w)
    t = 0.5 if abs(total) < 1e-6 else w[1] / total
    dim = 0 if shared["nuslerp_row_wise"] else -1
    flat = shared["nuslerp_flatten"]
    base = next((e.tensor for e in entries if e.is_base), None)
    if base is not None:
        return base + nuslerp(t, others[0].tensor - base, others[1].tensor - base, dim=dim, flatten=flat)
    return nuslerp(t, others[0].tensor, others[1].tensor, dim=dim, flatten=flat)


def model_stock(entries: Sequence[Entry], shared: Mapping[str, Any]) -> Tensor:
    """Model Stock: t = N·cosθ / (1 + (N−1)·cosθ) from the mean pairwise cosine of the offsets from the
    base (per tensor, or per row with ``filter_wise``); result t·mean(models) + (1−t)·base (the base
    where the denominator is ~0)."""
    base = _base(entries, "model_stock").tensor
    ws = [e.tensor for e in entries if not e.is_base]
    if len(ws) < 2:
        raise ValueError(f"model_stock needs at least two models besides the base, got {len(ws)}")
    shape = base.shape
    if shared["filter_wise"]:
        if base.dim() == 1:
            base, ws = base.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        base, ws = base.reshape(-1), [w.reshape(-1) for w in ws]
    offsets = [w - base for w in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    denom = 1 + (n - 1) * cos
    singular = denom.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), (n * cos) / torch.where(singular, torch.ones_like(denom), denom))
    mean = sum(ws) / n
    return (t * mean + (1 - t) * base).reshape(shape)


def passthrough(entries: Sequence[Entry], shared: Mapping[str, Any]) -> Tensor:
    """Copy the single input (times its ``scale`` when given)."""
    if len(entries) != 1:
        raise ValueError(f"passthrough takes exactly one input per tensor (one source per slice), got {len(entries)}")
    e = entries[0]
    scale = e.params.get("scale")
    return e.tensor if scale is None else e.tensor * scale


# ------------------------------------------------------------------------------------------------
# Method table: parameters (name -> (scope, default)) and the function
# ------------------------------------------------------------------------------------------------
REQUIRED = object()
#: scope 'shared': one value per tensor; 'input': every input (the base too); 'non_base': every non-base input


@dataclass(frozen=True)
class MethodSpec:
    name: str
    fn: Callable[[Sequence[Entry], Mapping[str, Any]], Tensor]
    params: Dict[str, tuple]          # name -> (scope, type, default or REQUIRED)
    base: str                         # 'required' | 'optional' | 'ignored'
    min_inputs: int = 1
    max_inputs: Optional[int] = None
    random: bool = False


def _gta_spec(name: str) -> MethodSpec:
    v = GTA_METHODS[name]
    params = {"int8_mask": ("shared", bool, False), "normalize": ("shared", bool, v.default_normalize),
              "rescale": ("shared", bool, v.default_rescale), "lambda": ("shared", float, 1.0),
              "weight": ("non_base", float, REQUIRED), "density": ("non_base", float, 1.0)}
    if v.sparsification == "magnitude_outliers":
        params["gamma"] = ("non_base", float, 0.01)
    if v.sparsification == "della_magprune":
        params["epsilon"] = ("non_base", float, 0.15)
    return MethodSpec(name, lambda entries, shared, _m=name: generalized_task_arithmetic(_m, entries, shared),
                      params, base="required", random=v.sparsification in ("random", "della_magprune"))


METHODS: Dict[str, MethodSpec] = {name: _gta_spec(name) for name in GTA_METHODS}
METHODS.update({
    "linear": MethodSpec("linear", linear, {"weight": ("input", float, REQUIRED), "normalize": ("shared", bool, True)},
                         base="ignored"),
    "slerp": MethodSpec("slerp", slerp_merge, {"t": ("shared", float, REQUIRED)}, base="required",
                        min_inputs=2, max_inputs=2),
    "nuslerp": MethodSpec("nuslerp", nuslerp_merge, {"weight": ("non_base", float, REQUIRED),
                                                     "nuslerp_row_wise": ("shared", bool, False),
                                                     "nuslerp_flatten": ("shared", bool, True)}, base="optional"),
    "model_stock": MethodSpec("model_stock", model_stock, {"filter_wise": ("shared", bool, False)},
                              base="required", min_inputs=3),
    "passthrough": MethodSpec("passthrough", passthrough, {"scale": ("input", float, None)}, base="ignored",
                              max_inputs=1),
})

#: mergekit methods calm_fast does not implement (refused by name)
UNSUPPORTED_METHODS = ("multislerp", "karcher", "sce", "nearswap", "arcee_fusion", "ram", "ramplus_tl",
                       "task_arithmetic_sce")


def merge_tensor(method: str, entries: Sequence[Entry], shared: Mapping[str, Any]) -> Tensor:
    """The merged tensor of ``entries`` by mergekit's ``method`` (non-floating tensors: the first input,
    which must agree with every other input, as mergekit requires)."""
    if not all(e.tensor.is_floating_point() for e in entries):
        first = entries[0].tensor
        if any(e.tensor.dtype != first.dtype or not torch.equal(e.tensor, first) for e in entries[1:]):
            raise ValueError("a non-floating buffer differs between the inputs")
        return first.clone()
    return METHODS[method].fn(entries, shared)


def layer_t(index: int, count: int) -> float:
    """mergekit's gradient position of layer ``index`` of ``count`` in a slice: index / (count − 1)."""
    return index / (count - 1) if count > 1 else 1.0

