"""The generic adapter: any ``nn.Module`` (or functional ``forward(params, inputs)``) plus one head per task."""
from __future__ import annotations

from typing import Callable, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .base import Inputs, ModelAdapter, resolve_task_names, split_per_task

Tensor = torch.Tensor
Head = Callable[[Tensor], Tensor]


class GenericAdapter(ModelAdapter):
    """Run ``module`` with merged tensors through ``torch.func.functional_call``, then task ``t``'s head.

    Args:
        module: the shared network, producing features from inputs (a tensor is passed positionally, a
            mapping as keyword arguments).  Its own parameters and buffers are used for every tensor that
            is not merged; the module is never modified.
        heads: one head per task, or a mapping ``{task_name: head}``.  A head is an ``nn.Module``, a
            function, a ``[C, D]`` weight tensor (``f @ W.T``) or a ``(weight, bias)`` pair
            (``f @ W.T + b``).  Heads are fixed (not merged) and never receive gradients: tensors are
            detached once here, and an ``nn.Module`` head runs on detached views of its own parameters
            (``torch.func.functional_call``), so its ``.grad`` stays untouched and the module is not
            modified.  (A plain function is called as it is; it should not close over tensors that
            require grad.)
        param_names: the merged tensors (state-dict keys of ``module``).  Default: every floating
            parameter of ``module``, in ``named_parameters()`` order.  The module's other parameters
            are used as they are but detached, so they never accumulate gradients either.
        task_names: names of the tasks (default ``task0, task1, ...`` or the mapping's keys).
        normalize_features: divide features by their L2 norm before the head (the CLIP / task-vector
            convention: ``logits = (f / ||f||) W^T + b``).
        forward: alternative to ``module``: a function ``forward(params, inputs) -> features`` receiving
            the merged tensors by name (then ``param_names`` is required).

    The module runs in the mode it is in: call ``module.eval()`` first to switch dropout off.
    """

    def __init__(self, module: Optional[nn.Module], heads: Union[Sequence[Head], Mapping[str, Head]], *,
                 param_names: Optional[Sequence[str]] = None, task_names: Optional[Sequence[str]] = None,
                 normalize_features: bool = False,
                 forward: Optional[Callable[[Mapping[str, Tensor], Inputs], Tensor]] = None):
        if (module is None) == (forward is None):
            raise ValueError("GenericAdapter: give exactly one of `module` and `forward`")
        task_names, head_list = split_per_task(heads, task_names, "GenericAdapter", "heads")
        self.task_names = resolve_task_names(task_names, len(head_list), "GenericAdapter", "heads")
        self.heads: List[Head] = [self._as_callable(h) for h in head_list]
        self._head_objs = head_list
        self._num_classes = [_head_classes(h) for h in head_list]
        self.module = module
        self._forward = forward
        self.normalize_features = bool(normalize_features)
        if module is not None:
            available = dict(module.named_parameters())
            if param_names is None:
                param_names = [k for k, v in available.items() if v.is_floating_point()]
            missing = [k for k in param_names if k not in available and k not in dict(module.named_buffers())]
            if missing:
                raise KeyError(f"GenericAdapter: the module has no tensor named {missing[:5]}")
        elif param_names is None:
            raise ValueError("GenericAdapter: `param_names` is required with a functional `forward`")
        self._param_names = list(param_names)
        if len(set(self._param_names)) != len(self._param_names):
            raise ValueError("GenericAdapter: duplicate names in `param_names`")
        # The module's parameters that are not merged, detached once (views, no copy): passing them to
        # functional_call keeps autograd from computing (and storing) gradients nobody asked for.
        merged = set(self._param_names)
        self._frozen = ({k: v.detach() for k, v in module.named_parameters() if k not in merged}
                        if module is not None else {})

    @staticmethod
    def _as_callable(h) -> Head:
        if isinstance(h, Tensor):
            h = (h, None)
        if isinstance(h, (tuple, list)) and len(h) == 2:
            w, b = h
            bad_bias = b is not None and (not isinstance(b, Tensor) or b.dim() != 1)
            if not isinstance(w, Tensor) or w.dim() != 2 or bad_bias:
                raise TypeError("GenericAdapter: a (weight, bias) head needs a 2-D weight and a 1-D bias (or None)")
            w = w.detach()
            b = b.detach() if b is not None else None

            def linear(f: Tensor, w=w, b=b) -> Tensor:
                out = f @ w.t()
                return out + b if b is not None else out
            return linear
        if isinstance(h, nn.Module):
            frozen = {k: v.detach() for k, v in h.named_parameters()}

            def module_head(f: Tensor, h=h, frozen=frozen) -> Tensor:
                return torch.func.functional_call(h, frozen, (f,), strict=False)
            return module_head
        if not callable(h):
            raise TypeError(f"GenericAdapter: a head must be callable, a weight tensor or a (weight, bias) pair, "
                            f"got {type(h).__name__}")
        return h

    def param_names(self) -> List[str]:
        return list(self._param_names)

    def features(self, params: Mapping[str, Tensor], inputs: Inputs) -> Tensor:
        """The shared network's output for ``inputs`` with ``params`` (normalised if asked)."""
        if self._forward is not None:
            f = self._forward(params, inputs)
        else:
            tensors = {**self._frozen, **{k: params[k] for k in self._param_names}}
            if isinstance(inputs, Mapping):
                f = torch.func.functional_call(self.module, tensors, args=(), kwargs=dict(inputs), strict=False)
            else:
                f = torch.func.functional_call(self.module, tensors, (inputs,), strict=False)
        if self.normalize_features:
            f = f / f.norm(dim=-1, keepdim=True)
        return f

    def logits(self, params: Mapping[str, Tensor], task: Union[int, str], inputs: Inputs) -> Tensor:
        return self.heads[self.task_index(task)](self.features(params, inputs))

    def num_classes(self, task: Union[int, str]) -> Optional[int]:
        return self._num_classes[self.task_index(task)]

    @property
    def device(self) -> torch.device:
        if self.module is not None:
            for t in self.module.parameters():
                return t.device
        return torch.device("cpu")


def _head_classes(h) -> Optional[int]:
    """Output size of a head when it can be read off: a weight tensor or pair, a module with
    ``out_features`` (``nn.Linear`` and subclasses), an ``nn.Sequential`` ending in one, or a module whose
    ``weight`` is 2-D (``[C, D]``).  ``None`` for plain functions and other modules."""
    if isinstance(h, Tensor):
        return int(h.shape[0]) if h.dim() == 2 else None
    if isinstance(h, (tuple, list)) and len(h) == 2 and isinstance(h[0], Tensor):
        return int(h[0].shape[0])
    if isinstance(h, nn.Sequential) and len(h) > 0:
        for layer in reversed(list(h)):
            c = _head_classes(layer)
            if c is not None:
                return c
            if any(True for _ in layer.parameters()):
                return None  # a parameterised layer of unknown output size comes last
        return None
    if isinstance(h, nn.Module):
        out = getattr(h, "out_features", None)
        if isinstance(out, int):
            return out
        w = getattr(h, "weight", None)
        if isinstance(w, Tensor) and w.dim() == 2:
            return int(w.shape[0])
    return None
