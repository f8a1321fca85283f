"""The adapter layer shared by the data-based methods (CALM, AdaMerging, DOGE + AdaMerging).

A *model adapter* owns "merged tensors in, per-task logits out".  Methods own the loop (what to merge,
which batches, when to step); adapters own the network; data comes as per-task unlabeled inputs.

Two pieces live here:

* :class:`FlatParams` holds the tensors a method merges/trains through as **views into one flat fp32
  buffer**, and their gradients as views into a second flat buffer.  ``backward()`` accumulates straight
  into those gradient views (each view is preset as the leaf's ``.grad``, so autograd adds in place), so
  the fused ops (``calm_accumulate_``, the AdaMerging coefficient gradient) read the gradient of the
  whole model in place, and ``calm_mask_step_`` can rewrite the parameters in place: no per-tensor copy,
  no ``load_state_dict`` per step.
* :class:`ModelAdapter`, the interface every adapter implements: ``param_names`` (the state-dict keys
  the method merges, in a fixed order), ``task_names``, and ``logits(params, task, inputs)`` which runs
  the network with ``torch.func.functional_call`` on the given tensors and the task's head.

Inputs of a task are a tensor whose first dimension indexes samples, or a mapping of such tensors
(e.g. ``input_ids`` and ``attention_mask``); :func:`select_batch` and :func:`num_samples` handle both.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch

Tensor = torch.Tensor
Inputs = Union[Tensor, Mapping[str, Tensor]]


class FlatParams:
    """Named tensors stored as views into one flat buffer, with gradients in a second flat buffer.

    ``tensors[i]`` (shape ``shapes[i]``) is a leaf that requires grad and views ``data``;
    its ``.grad`` is preset to the matching view of ``grad``, so every ``backward()`` through
    ``tensors`` *adds* into ``grad`` in place (call :meth:`zero_grad_` between batches when the sum
    is not wanted).  Writing into ``data`` (or any view) under ``torch.no_grad()`` changes what the
    network sees on the next forward.

    Keep the ``.grad`` attributes as they are: ``optimizer.zero_grad(set_to_none=True)`` or
    ``module.zero_grad()`` would detach them from the flat buffer; use :meth:`zero_grad_`.

    ``grad_extra`` trailing slots follow ``grad`` in the same allocation (``grad_and_extra`` covers both):
    the data-parallel trainers put the iteration's loss sums there, so gradients and losses are summed
    across ranks by one collective over ``grad_and_extra``.  :meth:`zero_grad_` leaves them alone.
    """

    def __init__(self, names: Sequence[str], shapes: Sequence[Sequence[int]], *,
                 device: Optional[Union[str, torch.device]] = None, dtype: torch.dtype = torch.float32,
                 grad_extra: int = 0):
        if len(names) != len(shapes):
            raise ValueError(f"FlatParams: {len(names)} names but {len(shapes)} shapes")
        if len(set(names)) != len(names):
            raise ValueError("FlatParams: duplicate names")
        self.names: List[str] = list(names)
        self.shapes: List[Tuple[int, ...]] = [tuple(int(s) for s in sh) for sh in shapes]
        sizes = [math.prod(sh) for sh in self.shapes]
        self.offsets: List[int] = [0]
        for n in sizes:
            self.offsets.append(self.offsets[-1] + n)
        self.data = torch.zeros(self.offsets[-1], device=device, dtype=dtype)
        if grad_extra < 0:
            raise ValueError(f"FlatParams: grad_extra must be >= 0, got {grad_extra}")
        self.grad_and_extra = torch.zeros(self.offsets[-1] + int(grad_extra), device=device, dtype=dtype)
        self.grad = self.grad_and_extra[:self.offsets[-1]]
        self.grad_extra = self.grad_and_extra[self.offsets[-1]:]
        self.tensors: List[Tensor] = []
        self.grads: List[Tensor] = []
        for i, sh in enumerate(self.shapes):
            a, b = self.offsets[i], self.offsets[i + 1]
            t = self.data[a:b].view(sh)
            t.requires_grad_(True)
            g = self.grad[a:b].view(sh)
            t.grad = g
            self.tensors.append(t)
            self.grads.append(g)

    @classmethod
    def from_tensors(cls, named: Mapping[str, Tensor], names: Optional[Sequence[str]] = None, *,
                     device=None, dtype: torch.dtype = torch.float32) -> "FlatParams":
        """A buffer holding copies of ``named[k]`` for ``k`` in ``names`` (default: all, in order)."""
        names = list(named.keys()) if names is None else list(names)
        first = named[names[0]] if names else None
        dev = device if device is not None else (first.device if first is not None else None)
        fp = cls(names, [named[k].shape for k in names], device=dev, dtype=dtype)
        fp.copy_([named[k] for k in names])
        return fp

    def __len__(self) -> int:
        return len(self.names)

    @property
    def numel(self) -> int:
        return self.offsets[-1]

    @property
    def device(self) -> torch.device:
        return self.data.device

    def as_dict(self) -> Dict[str, Tensor]:
        """``{name: tensor}`` for ``torch.func.functional_call`` (the tensors themselves, not copies)."""
        return dict(zip(self.names, self.tensors))

    @torch.no_grad()
    def copy_(self, values: Sequence[Tensor]) -> "FlatParams":
        """Overwrite the parameters with ``values`` (same order and shapes; any float dtype)."""
        if len(values) != len(self.tensors):
            raise ValueError(f"FlatParams.copy_: {len(values)} values for {len(self.tensors)} tensors")
        for name, t, v in zip(self.names, self.tensors, values):
            if tuple(v.shape) != tuple(t.shape):
                raise ValueError(f"FlatParams.copy_: {name}: shape {tuple(v.shape)} != {tuple(t.shape)}")
            t.copy_(v)
        return self

    @torch.no_grad()
    def zero_grad_(self) -> None:
        """Zero the gradient buffer in place (one memset; the ``.grad`` views stay attached)."""
        self.grad.zero_()

    def check_grads_attached(self) -> None:
        """Raise if some code replaced or dropped a ``.grad`` view (gradients would no longer land in ``grad``)."""
        for name, t, g in zip(self.names, self.tensors, self.grads):
            if t.grad is None or t.grad.data_ptr() != g.data_ptr():
                raise RuntimeError(f"FlatParams: the gradient of {name!r} is no longer a view of the flat "
                                   "buffer (was zero_grad(set_to_none=True) or an optimizer used on it?)")


class ModelAdapter(ABC):
    """Merged tensors in, per-task logits out.

    Subclasses define :attr:`task_names`, :meth:`param_names` and :meth:`logits`.  ``params`` passed to
    :meth:`logits` maps every name of :meth:`param_names` to a tensor (typically ``FlatParams.as_dict()``);
    everything else the network needs (buffers, frozen weights, the heads) belongs to the adapter.
    Gradients flow to ``params`` only.
    """

    task_names: List[str]

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    def task_index(self, task: Union[int, str]) -> int:
        if isinstance(task, str):
            try:
                return self.task_names.index(task)
            except ValueError:
                raise KeyError(f"unknown task {task!r}; tasks: {self.task_names}") from None
        if not 0 <= int(task) < self.num_tasks:
            raise IndexError(f"task index {task} out of range for {self.num_tasks} tasks")
        return int(task)

    @abstractmethod
    def param_names(self) -> List[str]:
        """State-dict keys of the merged tensors the network is run with (fixed order)."""

    @abstractmethod
    def logits(self, params: Mapping[str, Tensor], task: Union[int, str], inputs: Inputs) -> Tensor:
        """``[batch, num_classes(task)]`` logits of task ``task`` for ``inputs`` with weights ``params``."""

    def num_classes(self, task: Union[int, str]) -> Optional[int]:
        """Number of classes of the task's head, when the adapter knows it (used to validate data)."""
        return None

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")


@dataclass
class LoadedModels:
    """What a loader returns: the adapter plus the merged tensors of the base and of each fine-tuned model.

    ``pretrained`` and every ``finetuned[t]`` map exactly ``adapter.param_names()`` (same order) to
    tensors, so a method builds task vectors as ``finetuned[t][k] - pretrained[k]``.  Unpacks as
    ``adapter, pretrained, finetuned = loaded``.
    """

    adapter: ModelAdapter
    pretrained: Dict[str, Tensor]
    finetuned: List[Dict[str, Tensor]]

    def __iter__(self):
        return iter((self.adapter, self.pretrained, self.finetuned))

    @property
    def task_names(self) -> List[str]:
        return list(self.adapter.task_names)


def split_per_task(items, task_names: Optional[Sequence[str]], owner: str, what: str) -> Tuple[Optional[List[str]], list]:
    """Per-task arguments come as ``{task: item}`` or as a list (in ``task_names`` order, if given).

    Returns ``(task_names, items)``: the mapping's keys (which must equal ``task_names`` when both are
    given) or ``task_names`` as given (possibly None), and the items as a non-empty list.
    """
    if isinstance(items, Mapping):
        if task_names is not None and list(task_names) != list(items.keys()):
            raise ValueError(f"{owner}: task_names disagree with the keys of `{what}`")
        task_names = list(items.keys())
        items = list(items.values())
    else:
        items = list(items)
    if not items:
        raise ValueError(f"{owner}: at least one entry of `{what}` is needed (one per task)")
    return (None if task_names is None else list(task_names)), items


def resolve_task_names(task_names: Optional[Sequence[str]], n: int, owner: str, what: str) -> List[str]:
    """``task_names`` checked against ``n`` per-task items (``task0``, ``task1``, ... when None); unique."""
    names = list(task_names) if task_names is not None else [f"task{i}" for i in range(n)]
    if len(names) != n:
        raise ValueError(f"{owner}: {len(names)} task names for {n} {what}")
    if len(set(names)) != len(names):
        raise ValueError(f"{owner}: duplicate task names {names}")
    return names


def check_state_dicts(names: Sequence[str], pretrained: Mapping[str, Tensor],
                      finetuned: Sequence[Mapping[str, Tensor]], task_names: Sequence[str]) -> None:
    """Raise :class:`~calm_fast.io.errors.MismatchError` unless every state dict holds ``names`` with the
    base's shapes (what a loader promises in :class:`LoadedModels`)."""
    from ..io.errors import MismatchError

    for label, sd in [("pretrained", pretrained)] + [(f"task {t!r}", f) for t, f in zip(task_names, finetuned)]:
        missing = [k for k in names if k not in sd]
        if missing:
            raise MismatchError(f"{label}: no tensor named {missing[:5]}" + (" ..." if len(missing) > 5 else ""))
        bad = [k for k in names if tuple(sd[k].shape) != tuple(pretrained[k].shape)]
        if bad:
            k = bad[0]
            raise MismatchError(f"{label}: {k} has shape {tuple(sd[k].shape)}, "
                                f"the base has {tuple(pretrained[k].shape)}")


def num_samples(inputs: Inputs) -> int:
    """Number of samples (first dimension) of a tensor or of every tensor of a mapping (must agree)."""
    if isinstance(inputs, Tensor):
        return int(inputs.shape[0])
    sizes = {k: int(v.shape[0]) for k, v in inputs.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"inputs disagree on the number of samples: {sizes}")
    return next(iter(sizes.values()))


def select_batch(inputs: Inputs, ids: Tensor, device: Optional[torch.device] = None) -> Inputs:
    """Rows ``ids`` of a tensor or of every tensor of a mapping, moved to ``device``."""
    if isinstance(inputs, Tensor):
        out = inputs.index_select(0, ids.to(inputs.device))
        return out.to(device) if device is not None else out
    return {k: select_batch(v, ids, device) for k, v in inputs.items()}


def iter_batches(n: int, batch_size: int) -> Iterator[Tensor]:
    """Consecutive index batches ``[0, b), [b, 2b), ...`` over ``n`` samples."""
    for a in range(0, n, batch_size):
        yield torch.arange(a, min(a + batch_size, n))


@torch.no_grad()
def predict_logits(adapter: ModelAdapter, params: Union[FlatParams, Mapping[str, Tensor]], task: Union[int, str],
                   inputs: Inputs,
                   batch_size: int = 256) -> Tensor:
    """Logits of every sample of ``inputs`` (in order), computed in batches without a graph."""
    if isinstance(params, FlatParams):
        params = params.as_dict()
    outs = [adapter.logits(params, task, select_batch(inputs, ids, adapter.device)).float()
            for ids in iter_batches(num_samples(inputs), batch_size)]
    return torch.cat(outs) if outs else torch.empty(0)


@torch.no_grad()
def correct_count(adapter: ModelAdapter, params: Union["FlatParams", Mapping[str, Tensor]], task: Union[int, str],
                  inputs: Inputs, labels: Tensor, batch_size: int = 256,
                  which: Optional[Callable[[int], bool]] = None) -> Tensor:
    """Number of correct top-1 predictions, an int64 scalar on the adapter's device (no host sync).
    ``which(i)``: count only the batches ``i`` it accepts (a data-parallel rank's share)."""
    if isinstance(params, FlatParams):
        params = params.as_dict()
    dev = adapter.device
    correct = torch.zeros((), dtype=torch.int64, device=dev)
    for i, ids in enumerate(iter_batches(num_samples(inputs), batch_size)):
        if which is not None and not which(i):
            continue
        pred = adapter.logits(params, task, select_batch(inputs, ids, dev)).argmax(-1)
        correct += (pred == labels.index_select(0, ids.to(labels.device)).to(pred.device)).sum()
    return correct


@torch.no_grad()
def accuracy(adapter: ModelAdapter, params: Mapping[str, Tensor], task: Union[int, str], inputs: Inputs,
             labels: Tensor, batch_size: int = 256,
             which: Optional[Callable[[int], bool]] = None,
             reduce: Optional[Callable[[Tensor], Tensor]] = None) -> float:
    """Top-1 accuracy of task ``task`` on labelled data (one host sync at the end).  Data-parallel use:
    ``which`` selects this rank's batches and ``reduce`` sums the int64 count across the ranks (exact)."""
    n = num_samples(inputs)
    if int(labels.shape[0]) != n:
        raise ValueError(f"accuracy: {n} inputs but {int(labels.shape[0])} labels")
    if n == 0:
        raise ValueError("accuracy: no samples")
    count = correct_count(adapter, params, task, inputs, labels, batch_size, which)
    if reduce is not None:
        count = reduce(count)
    return int(count) / n
