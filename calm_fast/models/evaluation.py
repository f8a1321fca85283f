"""Per-task evaluation on labelled data: accuracy per task and their mean, with one host sync.

Usable inside a training loop (every N iterations) and at the end: everything runs under
``torch.no_grad()`` (nothing reaches the gradient buffer of a :class:`~.base.FlatParams`), the counts of
correct predictions stay on the adapter's device batch after batch, and only the final result crosses
to the host (:func:`evaluate`), or nothing does (:func:`accuracies`, for loops that want to log later).

A task's data is ``(inputs, labels)`` or a mapping with ``"inputs"`` and ``"labels"``; ``inputs`` as
everywhere (a tensor or a mapping of tensors, first dimension = samples).
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Tuple, Union

import torch

from .base import FlatParams, Inputs, ModelAdapter, correct_count, num_samples

Tensor = torch.Tensor
TaskData = Union[Tuple[Inputs, Tensor], Mapping[str, Any]]
Params = Union[FlatParams, Mapping[str, Tensor]]


def split_task_data(data: TaskData, where: str = "data") -> Tuple[Inputs, Tensor]:
    """``(inputs, labels)`` of one task's labelled data (a pair or a mapping with inputs/labels)."""
    if isinstance(data, Mapping) and "inputs" in data and "labels" in data:
        inputs, labels = data["inputs"], data["labels"]
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        inputs, labels = data
    else:
        raise TypeError(f"{where}: expected (inputs, labels) or {{'inputs': ..., 'labels': ...}}, "
                        f"got {type(data).__name__}")
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.is_floating_point():
        raise ValueError(f"{where}: labels must be a 1-D integer tensor")
    n = num_samples(inputs)
    if int(labels.shape[0]) != n:
        raise ValueError(f"{where}: {n} inputs but {int(labels.shape[0])} labels")
    if n == 0:
        raise ValueError(f"{where}: no samples")
    return inputs, labels


def _check_labels(adapter: ModelAdapter, task, labels: Tensor, where: str) -> None:
    c = adapter.num_classes(task)
    if c is not None and labels.device.type == "cpu" and labels.numel():  # a free check on host labels only
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= c:
            raise ValueError(f"{where}: labels span [{lo}, {hi}] but the task's head has {c} classes")


@torch.no_grad()
def accuracies(adapter: ModelAdapter, params: Params, datasets: Mapping[Union[int, str], TaskData], *,
               batch_size: int = 256) -> Tuple[List[str], Tensor]:
    """Task names and their top-1 accuracies as one float64 tensor on the adapter's device (no host sync)."""
    if not datasets:
        raise ValueError("evaluate: no labelled data given")
    names: List[str] = []
    correct: List[Tensor] = []
    counts: List[int] = []
    for task, data in datasets.items():
        name = adapter.task_names[adapter.task_index(task)]
        where = f"evaluation data of task {name!r}"
        inputs, labels = split_task_data(data, where)
        _check_labels(adapter, task, labels, where)
        names.append(name)
        correct.append(correct_count(adapter, params, task, inputs, labels, batch_size))
        counts.append(int(labels.shape[0]))
    if len(set(names)) != len(names):
        raise ValueError(f"evaluate: a task is given twice ({names})")
    acc = torch.stack(correct).double() / torch.tensor(counts, dtype=torch.float64, device=correct[0].device)
    return names, acc


def evaluate(adapter: ModelAdapter, params: Params, datasets: Mapping[Union[int, str], TaskData], *,
             batch_size: int = 256) -> Dict[str, float]:
    """Top-1 accuracy of every task in ``datasets`` and their unweighted mean.

    Returns ``{task_name: accuracy, ..., "mean": mean over the evaluated tasks}`` (a task may not be
    named ``"mean"``).  Tasks are keyed by name or index; only the tasks given are evaluated.
    One host sync, at the end.
    """
    names, acc = accuracies(adapter, params, datasets, batch_size=batch_size)
    if "mean" in names:
        raise ValueError("evaluate: a task named 'mean' clashes with the mean's key; rename the task")
    values = acc.tolist()
    out = dict(zip(names, values))
    out["mean"] = sum(values) / len(values)
    return out
