"""State-dict plumbing shared by every merging method: validation, key filters, dtype groups, the
non-finite policy and the assembly of the merged state dict.

Rules (the same for every method):
* every floating key of the pretrained state dict must be present, with the same shape, dtype and
  device, in every fine-tuned state dict (or task vector); a fine-tuned key absent from the pretrained
  one is an error too.  Nothing is skipped silently: the error names the key, the model and the problem.
* non-floating entries (integer buffers, e.g. position ids) are copied from the pretrained state dict
  untouched; so are floating keys excluded by ``include``/``exclude`` (they keep θ0).
* arithmetic is fp32; outputs are in the pretrained tensor's dtype unless ``out_dtype`` is given.
* inf/NaN in a task vector (or the base) raises ``ValueError`` by default (``nonfinite="propagate"``
  lets them through); the check costs nothing extra: the kernels count them while merging.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Union

import torch

Tensor = torch.Tensor
StateDict = Mapping[str, Tensor]
Patterns = Optional[Union[str, Sequence[str]]]


def _patterns(p: Patterns) -> List[re.Pattern]:
    if p is None:
        return []
    if isinstance(p, str):
        p = [p]
    return [re.compile(x) for x in p]


@dataclass
class Prepared:
    """Validated inputs of one merge, as the task-major tensor lists the fused ops take."""

    keys: List[str]                     # merged keys (sorted), L of them
    T: int
    inputs: List[Tensor]                # T * L, task-major
    base: Optional[List[Tensor]]        # L tensors (fine-tuned inputs) or None (task-vector inputs)
    pretrained: Optional[StateDict]
    passthrough: Dict[str, Tensor]      # keys copied unchanged from the pretrained state dict
    order: List[str]                    # key order of the result (the pretrained state dict's order)
    groups: List[List[int]] = field(default_factory=list)  # indices into keys sharing one dtype

    @property
    def L(self) -> int:
        return len(self.keys)

    def group_inputs(self, g: Sequence[int]) -> List[Tensor]:
        return [self.inputs[t * self.L + l] for t in range(self.T) for l in g]

    def group_base(self, g: Sequence[int]) -> Optional[List[Tensor]]:
        return [self.base[l] for l in g] if self.base is not None else None

    def numel(self) -> int:
        return sum(self.inputs[l].numel() for l in range(self.L))


def prepare(pretrained: Optional[StateDict], finetuned: Sequence[StateDict], *, task_vectors: bool = False,
            include: Patterns = None, exclude: Patterns = None, method: str = "merge") -> Prepared:
    """Validate and arrange the inputs of a merge (see the module docstring for the rules)."""
    if isinstance(finetuned, Mapping) or not isinstance(finetuned, Sequence):
        raise TypeError(f"{method}: `finetuned` must be a list of state dicts, got {type(finetuned).__name__}")
    if len(finetuned) == 0:
        raise ValueError(f"{method}: need at least one fine-tuned model (or task vector), got an empty list")
    if pretrained is None and not task_vectors:
        raise ValueError(f"{method}: `pretrained` is required unless task_vectors=True")
    ref = pretrained if pretrained is not None else finetuned[0]
    inc, exc = _patterns(include), _patterns(exclude)
    for i, ft in enumerate(finetuned):
        if not isinstance(ft, Mapping):
            raise TypeError(f"{method}: finetuned[{i}] is a {type(ft).__name__}, not a state dict")
        missing = [k for k in ref if ref[k].is_floating_point() and k not in ft]
        extra = [k for k in ft if k not in ref]
        if missing or extra:
            raise ValueError(
                f"{method}: model {i} does not match the {'pretrained' if pretrained is not None else 'first'} "
                f"state dict: missing {missing[:5]}{'...' if len(missing) > 5 else ''} "
                f"extra {extra[:5]}{'...' if len(extra) > 5 else ''}")

    keys, passthrough = [], {}
    for k in ref:
        x = ref[k]
        if not isinstance(x, Tensor):
            raise TypeError(f"{method}: {k!r} is a {type(x).__name__}, not a tensor")
        selected = x.is_floating_point() and (not inc or any(p.search(k) for p in inc)) and not any(
            p.search(k) for p in exc)
        if not selected:
            if pretrained is not None:
                passthrough[k] = x
            continue
        if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"{method}: {k!r} has dtype {x.dtype}; supported: float32, bfloat16, float16")
        for i, ft in enumerate(finetuned):
            y = ft[k]
            if not isinstance(y, Tensor):
                raise TypeError(f"{method}: model {i} {k!r} is a {type(y).__name__}, not a tensor")
            if y.shape != x.shape:
                raise ValueError(f"{method}: shape mismatch for {k!r}: model {i} has {tuple(y.shape)}, "
                                 f"expected {tuple(x.shape)}")
            if y.dtype != x.dtype:
                raise ValueError(f"{method}: dtype mismatch for {k!r}: model {i} has {y.dtype}, expected {x.dtype} "
                                 "(convert the models to one dtype first)")
            if y.device != x.device:
                raise ValueError(f"{method}: device mismatch for {k!r}: model {i} is on {y.device}, expected {x.device}")
        keys.append(k)
    keys.sort()  # the flatten order of the references (sorted keys)

    T = len(finetuned)
    inputs = [finetuned[t][k].contiguous() for t in range(T) for k in keys]
    base = [pretrained[k].contiguous() for k in keys] if (pretrained is not None and not task_vectors) else None
    by_dtype: Dict[torch.dtype, List[int]] = {}
    for l, k in enumerate(keys):
        by_dtype.setdefault(ref[k].dtype, []).append(l)
    return Prepared(keys=keys, T=T, inputs=inputs, base=base, pretrained=pretrained, passthrough=passthrough,
                    order=list(ref.keys()), groups=list(by_dtype.values()))


def out_float_for(prep: Prepared, g: Sequence[int], out_dtype: Optional[torch.dtype]) -> bool:
    """Ask the kernel for fp32 output whenever the final dtype differs from the inputs' (one rounding)."""
    in_dtype = prep.inputs[g[0]].dtype
    return (out_dtype is not None and out_dtype != in_dtype) or (prep.base is None and prep.pretrained is not None)


def check_nonfinite(count: int, prep: Prepared, g: Sequence[int], policy: str, method: str) -> None:
    """Raise naming the first tensor holding inf/NaN when the kernels counted any (policy 'error')."""
    if count == 0 or policy == "propagate":
        return
    if policy != "error":
        raise ValueError(f"{method}: nonfinite must be 'error' or 'propagate', got {policy!r}")
    for l in g:
        for t in range(prep.T):
            if not bool(torch.isfinite(prep.inputs[t * prep.L + l]).all()):
                raise ValueError(f"{method}: model {t} tensor {prep.keys[l]!r} contains inf or NaN "
                                 "(pass nonfinite='propagate' to merge it anyway)")
        if prep.base is not None and not bool(torch.isfinite(prep.base[l]).all()):
            raise ValueError(f"{method}: pretrained tensor {prep.keys[l]!r} contains inf or NaN "
                             "(pass nonfinite='propagate' to merge it anyway)")
    raise ValueError(f"{method}: {count} task-vector values are inf or NaN (overflow in fine-tuned - pretrained?); "
                     "pass nonfinite='propagate' to merge anyway")


def finish(prep: Prepared, merged: Dict[str, Tensor], out_dtype: Optional[torch.dtype]) -> Dict[str, Tensor]:
    """Assemble the result in the pretrained key order: merged keys (+ θ0 when the inputs were task
    vectors), passthrough keys unchanged, dtypes as requested."""
    result: Dict[str, Tensor] = {}
    for k in prep.order:
        if k in merged:
            x = merged[k]
            if prep.base is None and prep.pretrained is not None:
                x = prep.pretrained[k].float() + x.float()
            want = out_dtype if out_dtype is not None else (
                prep.pretrained[k].dtype if prep.pretrained is not None else x.dtype)
            result[k] = x if x.dtype == want else x.to(want)
        elif k in prep.passthrough:
            result[k] = prep.passthrough[k]
    return result


def per_key_table(values, prep: Prepared, name: str) -> Optional[Tensor]:
    """Per-task weights as a [T, L] table: a number, T numbers, or a mapping key -> T numbers
    (layer-wise coefficients; keys not in the mapping get 1.0).  None -> None."""
    if values is None:
        return None
    if isinstance(values, Mapping):
        table = torch.ones(prep.T, prep.L, dtype=torch.float32)
        unknown = [k for k in values if k not in prep.keys]
        if unknown:
            raise ValueError(f"{name}: keys not merged by this call: {unknown[:5]}")
        for l, k in enumerate(prep.keys):
            if k in values:
                v = torch.as_tensor(values[k], dtype=torch.float32).reshape(-1)
                if v.numel() == 1:
                    v = v.expand(prep.T)
                if v.numel() != prep.T:
                    raise ValueError(f"{name}[{k!r}]: need {prep.T} values, got {v.numel()}")
                table[:, l] = v
        return table
    t = torch.as_tensor(values, dtype=torch.float32)
    if t.dim() == 0:
        return t.expand(prep.T, prep.L).contiguous()
    if t.dim() == 1 and t.numel() == prep.T:
        return t[:, None].expand(prep.T, prep.L).contiguous()
    if t.dim() == 2 and tuple(t.shape) == (prep.T, prep.L):
        return t.contiguous()
    raise ValueError(f"{name}: expected a number, {prep.T} per-task values or a [T, L]=[{prep.T}, {prep.L}] table, "
                     f"got shape {list(t.shape)}")


def sub_table(table: Tensor, g: Sequence[int], device) -> Tensor:
    return table[:, list(g)].contiguous().to(device)


def check_fraction(name: str, value: float, lo_open: bool, method: str) -> float:
    value = float(value)
    ok = (0.0 < value <= 1.0) if lo_open else (0.0 <= value <= 1.0)
    if not ok:
        raise ValueError(f"{method}: {name} must be in {'(0, 1]' if lo_open else '[0, 1]'}, got {value}")
    return value



def check_finite(name: str, value, method: str) -> None:
    """Raise ``ValueError`` unless every number in ``value`` (a number, a sequence, a tensor or a mapping
    key -> numbers; None is allowed) is a finite real number.  Run before any computation, so a NaN
    ``scaling`` or ``weights`` entry never produces a silently all-NaN model."""
    if value is None:
        return
    if isinstance(value, Tensor):
        if value.is_complex() or not bool(torch.isfinite(value).all()):
            raise ValueError(f"{method}: {name} must be finite real numbers, got {value}")
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            check_finite(f"{name}[{k!r}]", v, method)
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_finite(f"{name}[{i}]", v, method)
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)  # numpy scalars and the like
        except (TypeError, ValueError):
            raise ValueError(f"{method}: {name} must be a number, got {value!r}") from None
    if not math.isfinite(float(value)):
        raise ValueError(f"{method}: {name} must be a finite number, got {value}")


def resolve_out_dtype(out_dtype, method: str) -> Optional[torch.dtype]:
    """``out_dtype`` as a floating ``torch.dtype``: a dtype, its name (``"bfloat16"``, ``"bf16"``,
    ``"float16"``, ``"fp32"``...) or None (keep each pretrained tensor's dtype).  Integer, bool and complex
    dtypes are errors (a merged weight is never an integer)."""
    if out_dtype is None:
        return None
    if isinstance(out_dtype, str):
        from ..io.formats import parse_dtype  # lazy: keeps `import calm_fast` light

        try:
            return parse_dtype(out_dtype)
        except ValueError as e:
            raise ValueError(f"{method}: out_dtype: {e}") from None
    if not isinstance(out_dtype, torch.dtype):
        raise ValueError(f"{method}: out_dtype must be a torch dtype or its name, got {out_dtype!r}")
    if not out_dtype.is_floating_point:
        raise ValueError(f"{method}: out_dtype must be a floating dtype (float32, bfloat16, float16), got "
                         f"{out_dtype}")
    return out_dtype


def check_params(method: str, *, out_dtype=None, **numbers) -> Optional[torch.dtype]:
    """The checks every method runs first: each keyword of ``numbers`` finite (see :func:`check_finite`),
    ``out_dtype`` resolved (see :func:`resolve_out_dtype`).  Returns the resolved ``out_dtype``."""
    for name, value in numbers.items():
        check_finite(name, value, method)
    return resolve_out_dtype(out_dtype, method)
