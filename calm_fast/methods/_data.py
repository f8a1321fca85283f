"""Argument checks shared by the data-based methods (CALM, AdaMerging, DOGE + AdaMerging)."""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Sequence, Tuple

import torch

from ..models.base import ModelAdapter, num_samples


def per_task(value, task_names: Sequence[str], what: str, required: Sequence[str], method: str) -> Dict[str, Any]:
    """A mapping task -> value from a mapping or a sequence in adapter task order."""
    if value is None:
        out: Dict[str, Any] = {}
    elif isinstance(value, Mapping):
        unknown = [k for k in value if k not in task_names]
        if unknown:
            raise ValueError(f"{method}: {what} names unknown tasks {unknown}; tasks: {list(task_names)}")
        out = dict(value)
    else:
        value = list(value)
        if len(value) != len(task_names):
            raise ValueError(f"{method}: {what} has {len(value)} entries for {len(task_names)} tasks "
                             f"{list(task_names)}")
        out = dict(zip(task_names, value))
    missing = [t for t in required if out.get(t) is None]
    if missing:
        raise ValueError(f"{method}: {what} is missing for tasks {missing}")
    return out


def check_eval_data(adapter: ModelAdapter, evals: Mapping[str, Any], method: str) -> None:
    for t, pair in evals.items():
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"{method}: eval_data[{t!r}] must be (inputs, labels)")
        labels = torch.as_tensor(pair[1])
        if int(labels.shape[0]) != num_samples(pair[0]):
            raise ValueError(f"{method}: eval_data[{t!r}] has {num_samples(pair[0])} inputs but "
                             f"{int(labels.shape[0])} labels")
        C = adapter.num_classes(t)
        if labels.numel() and C is not None and (int(labels.max()) >= C or int(labels.min()) < 0):
            raise ValueError(f"{method}: eval_data[{t!r}] has labels outside [0, {C}) of the adapter's head")


def task_arguments(adapter: ModelAdapter, finetuned, unlabeled_inputs, eval_data, method: str
                   ) -> Tuple[List[str], Dict[str, Any], Dict[str, Any], Dict[str, Any]]:
    """The per-task arguments of an entropy-minimising method, checked: every task has a fine-tuned model
    and non-empty unlabeled data; eval data (optional) is (inputs, labels) within the heads' classes.
    Returns ``(tasks, finetuned, unlabeled, evals)`` keyed by the adapter's task names."""
    tasks = list(adapter.task_names)
    ft = per_task(finetuned, tasks, "finetuned", tasks, method)
    data = per_task(unlabeled_inputs, tasks, "unlabeled data", tasks, method)
    for t in tasks:
        if num_samples(data[t]) == 0:
            raise ValueError(f"{method}: task {t!r} has no unlabeled samples")
    evals = per_task(eval_data, tasks, "eval_data", [], method)
    check_eval_data(adapter, evals, method)
    return tasks, ft, data, evals
