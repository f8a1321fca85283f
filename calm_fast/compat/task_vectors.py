"""Drop-in replacement for ``TaskVector`` of mlfoundations/task_vectors (``src/task_vectors.py``).

Change one import::

    # from task_vectors import TaskVector
    from calm_fast.compat.task_vectors import TaskVector

    tv = TaskVector(pretrained_checkpoint, finetuned_checkpoint)      # paths (or modules / state dicts)
    model = sum(task_vectors).apply_to(pretrained_checkpoint, scaling_coef=0.8)
    model = (-tv).apply_to(pretrained_checkpoint, scaling_coef=0.5)  # forgetting

Same semantics as the original:

* ``TaskVector(pretrained_checkpoint, finetuned_checkpoint)``: ``vector[key] = finetuned - pretrained``
  for every key of the pretrained state dict except int64 and uint8 entries (which are skipped); or
  ``TaskVector(vector=state_dict)`` wraps an existing task vector (not copied).
* ``a + b``: keys of ``a`` that ``b`` also has (a warning names the others, which are dropped);
  ``sum(list_of_task_vectors)`` works (``0 + tv`` is ``tv``); ``-a`` negates every entry.
* ``apply_to(pretrained_checkpoint, scaling_coef=1.0)``: ``pretrained + scaling_coef * vector`` for
  every key of the pretrained state dict present in the vector; the other keys keep the pretrained
  value (the original loads with ``strict=False``).  Given a path, it returns the model loaded from it
  (or a state dict if the file holds one); given an ``nn.Module``, a modified *deep copy* (the argument
  stays pretrained, as a path would); given a state dict, a new state dict.
* results are bit-identical to the original's expressions (``ft - ptm``, ``a + b``, ``-a``, and
  ``ptm + c * tv`` rounded twice in fp32).  The fused ops compute them one dtype group at a time, in one
  pass over all tensors (``apply_to``: one read of θ0 and τ and one write instead of two passes and a
  temporary per tensor); where a single fp32 rounding would differ from the original's arithmetic
  (``apply_to`` on fp16/bf16, mixed dtypes or devices) plain torch computes the original expression.

Loading: a path is loaded with ``torch.load``.  The original checkpoints are pickled ``nn.Module``
objects, which ``torch.load`` (``weights_only=True``, the default since torch 2.6) refuses.  With
``weights_only=None`` (default) the file is first loaded safely; only if that fails because it holds
pickled objects is it loaded again with ``weights_only=False``, which **executes code from the file**:
passing a path here means you trust it, exactly as the original does.  Pass ``weights_only=True`` to
refuse pickled objects (state-dict files only).  In-memory modules and state dicts are never pickled.

Deviations: the original prints its warnings; here they are ``warnings.warn`` (``apply_to`` warns only
about floating-point keys missing from the vector: the int64/uint8 buffers that construction skips are
expected there).  ``a - b`` (used in the original README's task analogies, but missing from the
original class) is supported and equals ``a + (-b)``.  A missing checkpoint raises ``ValueError``
(the original asserts).
"""
from __future__ import annotations

import copy
import os
import pickle
import warnings
from collections.abc import Mapping
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .. import ops

Tensor = torch.Tensor
_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_SKIPPED_DTYPES = (torch.int64, torch.uint8)

__all__ = ["TaskVector", "load_checkpoint"]


def load_checkpoint(checkpoint, weights_only: Optional[bool] = None):
    """The object behind ``checkpoint``: a path is ``torch.load``-ed (see the module doc for
    ``weights_only``); anything else is returned as is."""
    if not isinstance(checkpoint, (str, os.PathLike)):
        return checkpoint
    if weights_only is not None:
        return torch.load(checkpoint, weights_only=weights_only)
    try:
        return torch.load(checkpoint, weights_only=True)
    except pickle.UnpicklingError:
        # A pickled nn.Module (the task_vectors / open_clip checkpoints): the caller passed this path
        # as a trusted checkpoint, as the original API requires.
        return torch.load(checkpoint, weights_only=False)


def _state_dict(obj) -> Mapping:
    if isinstance(obj, Mapping):
        return obj
    if hasattr(obj, "state_dict") and callable(obj.state_dict):
        return obj.state_dict()
    raise TypeError(f"expected a checkpoint path, an nn.Module or a state dict, got {type(obj).__name__}")


def _combine(terms: Sequence[Tuple[float, Mapping]], keys: Sequence[str], exact_any_dtype: bool) -> Dict[str, Tensor]:
    """``sum_i c_i * d_i[key]`` for every key, in term order, as the original computes it.

    Keys whose tensors share one fused dtype and device across all terms go through one
    :func:`calm_fast.ops.weighted_merge` call per (dtype, device) group (fp32 arithmetic, sequential in
    term order, one rounding at the end).  That equals torch's expression when the result is fp32, or for
    any dtype when ``exact_any_dtype`` (the caller's expression rounds once in fp32 as well: ``a + b``,
    ``a - b``).  The other keys are computed by the torch expression itself.
    """
    out: Dict[str, Tensor] = {}
    groups: Dict[Tuple[torch.dtype, torch.device], List[str]] = {}
    for k in keys:
        xs = [d[k] for _, d in terms]
        x0 = xs[0]
        fusable = (all(isinstance(x, Tensor) for x in xs) and x0.dtype in _FUSED_DTYPES
                   and (exact_any_dtype or x0.dtype == torch.float32) and x0.numel() > 0
                   and all(x.dtype == x0.dtype and x.device == x0.device and x.shape == x0.shape for x in xs))
        if fusable:
            groups.setdefault((x0.dtype, x0.device), []).append(k)
        else:
            acc = None
            for c, d in terms:
                v = d[k] if c == 1 else (-d[k] if c == -1 else c * d[k])
                acc = v if acc is None else acc + v
            out[k] = acc
    T = len(terms)
    for (_, _), ks in groups.items():
        inputs = [d[k].contiguous() for _, d in terms for k in ks]
        merged, _ = ops.weighted_merge(inputs, None, T, weights=[float(c) for c, _ in terms], scale=1.0)
        out.update(zip(ks, merged))
    return {k: out[k] for k in keys}


class TaskVector:
    """A task vector ``finetuned - pretrained`` (see the module doc)."""

    def __init__(self, pretrained_checkpoint=None, finetuned_checkpoint=None, vector=None, *,
                 weights_only: Optional[bool] = None):
        if vector is not None:
            self.vector = vector
            return
        if pretrained_checkpoint is None or finetuned_checkpoint is None:
            raise ValueError("TaskVector needs pretrained_checkpoint and finetuned_checkpoint, or vector=")
        with torch.no_grad():
            pretrained = _state_dict(load_checkpoint(pretrained_checkpoint, weights_only))
            finetuned = _state_dict(load_checkpoint(finetuned_checkpoint, weights_only))
            keys = [k for k in pretrained if pretrained[k].dtype not in _SKIPPED_DTYPES]
            missing = [k for k in keys if k not in finetuned]
            if missing:
                raise KeyError(f"keys of the pretrained checkpoint missing from the fine-tuned one: {missing[:5]}")
            self.vector = _combine([(1, finetuned), (-1, pretrained)], keys, exact_any_dtype=True)

    def __add__(self, other):
        """Add two task vectors (keys of ``self`` present in both)."""
        return self._binary(other, 1)

    def __sub__(self, other):
        """``self + (-other)`` (an extension: the original defines no ``-`` between task vectors)."""
        return self._binary(other, -1)

    def _binary(self, other, sign: int):
        other_vector = getattr(other, "vector", None)  # duck-typed: the original's TaskVector works too
        if not isinstance(other_vector, Mapping):
            return NotImplemented
        keys = [k for k in self.vector if k in other_vector]
        dropped = [k for k in self.vector if k not in other_vector]
        if dropped:
            warnings.warn(f"Warning, keys {dropped} are not present in both task vectors.")
        with torch.no_grad():
            return TaskVector(vector=_combine([(1, self.vector), (sign, other_vector)], keys, exact_any_dtype=True))

    def __radd__(self, other):
        if other is None or isinstance(other, int):
            return self
        return self.__add__(other)

    def __neg__(self):
        """Negate a task vector."""
        with torch.no_grad():
            return TaskVector(vector={k: -v for k, v in self.vector.items()})

    def apply_to(self, pretrained_checkpoint, scaling_coef=1.0, *, weights_only: Optional[bool] = None):
        """``pretrained + scaling_coef * vector`` (see the module doc for what is returned)."""
        obj = load_checkpoint(pretrained_checkpoint, weights_only)
        from_path = isinstance(pretrained_checkpoint, (str, os.PathLike))
        is_module = isinstance(obj, torch.nn.Module)
        if is_module and not from_path:
            obj = copy.deepcopy(obj)
        pretrained = _state_dict(obj)
        keys = [k for k in pretrained if k in self.vector]
        missing = [k for k in pretrained if k not in self.vector and _is_float(pretrained[k])]
        if missing:
            warnings.warn(f"Warning: keys {missing} are present in the pretrained state dict but not in the "
                          "task vector")
        with torch.no_grad():
            new = _combine([(1, pretrained), (scaling_coef, self.vector)], keys, exact_any_dtype=False)
        if is_module:
            obj.load_state_dict(new, strict=False)
            return obj
        return {k: new.get(k, v) for k, v in pretrained.items()}


def _is_float(x) -> bool:
    return isinstance(x, Tensor) and x.is_floating_point()
