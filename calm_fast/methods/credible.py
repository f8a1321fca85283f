"""CALM's class-balanced entropy-minimisation credible sampling.

From the logits a teacher gives every unlabeled sample of a task, keep the samples the teacher is most
sure about, class by class, and label them with the teacher's prediction:

1. ``p_i = exp(z_i) / Σ_c exp(z_ic)`` in float64 (no max-subtraction, the official formula) and
   ``H_i = −Σ_c p_ic · ln(p_ic + 1e-9)``;
2. pseudo-label ``ŷ_i = argmax_c z_ic`` (first index on ties);
3. per predicted class ``c`` (``I_c = {i : ŷ_i = c}``) keep the ``floor(ratio · |I_c|)`` samples of
   lowest entropy; a class predicted once is dropped (``floor(ratio) = 0``), a class never predicted
   contributes nothing.  ``class_balanced=False`` is the official ``standard=1`` variant: the global
   lowest-entropy ``floor(ratio · n)``.

Choices (documented differences from the official NumPy code, none of which changes a result on
ordinary logits):

* **Ties in entropy** are broken by sample index (a *stable* sort).  NumPy's default quicksort, used by
  the official code, orders ties arbitrarily; on inputs without exact entropy ties both keep the same set.
* **Overflow**: a row whose literal softmax is not finite (a logit above ~709 overflows ``exp`` in
  float64, giving NaN) is recomputed with the max subtracted first.  Rows that do not overflow keep the
  literal formula, so their entropies are bit-identical to the official ones.  Non-finite logits (NaN,
  ±inf) are an error.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

Tensor = torch.Tensor

ENTROPY_EPS = 1e-9


@dataclass
class CredibleSet:
    """The credible samples of one task.

    Attributes:
        ids: int64 sample indices into the task's unlabeled inputs, ascending.
        labels: int64 pseudo-labels of those samples (the teacher's argmax), aligned with ``ids``.
        num_samples: number of unlabeled samples the set was drawn from.
        num_classes: number of logit columns.
    """

    ids: Tensor
    labels: Tensor
    num_samples: int
    num_classes: int

    def __len__(self) -> int:
        return int(self.ids.numel())

    def class_counts(self) -> Tensor:
        """How many credible samples carry each pseudo-label."""
        return torch.bincount(self.labels, minlength=self.num_classes)


def entropies(logits: np.ndarray) -> np.ndarray:
    """Float64 entropies of the rows of ``logits`` (§8.2 step 1; overflowing rows max-subtracted)."""
    z = np.asarray(logits, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        e = np.exp(z)
        p = e / np.sum(e, axis=1, keepdims=True)
        h = -np.sum(p * np.log(p + ENTROPY_EPS), axis=1)
    bad = ~np.isfinite(h)
    if bad.any():
        zb = z[bad] - z[bad].max(axis=1, keepdims=True)
        eb = np.exp(zb)
        pb = eb / np.sum(eb, axis=1, keepdims=True)
        h[bad] = -np.sum(pb * np.log(pb + ENTROPY_EPS), axis=1)
    return h


def credible_samples(logits: Tensor, ratio: float, *, class_balanced: bool = True,
                     task: Optional[str] = None) -> CredibleSet:
    """Select the credible samples of one task from its teacher logits ``[n, C]`` (see module docstring).

    Raises ``ValueError`` on bad logits (not 2-D, non-finite), on ``ratio`` outside ``(0, 1]`` and when
    the selection is empty (ratio too small for the class sizes).
    """
    name = f"task {task!r}" if task is not None else "credible_samples"
    if not (0.0 < float(ratio) <= 1.0):
        raise ValueError(f"{name}: ratio must be in (0, 1], got {ratio}")
    if not isinstance(logits, Tensor):
        logits = torch.as_tensor(logits)
    if logits.dim() != 2 or logits.shape[1] < 1:
        raise ValueError(f"{name}: logits must be [num_samples, num_classes], got shape {list(logits.shape)}")
    z = logits.detach().cpu().double().numpy()
    n, C = z.shape
    if n == 0:
        raise ValueError(f"{name}: no unlabeled samples")
    if not np.isfinite(z).all():
        raise ValueError(f"{name}: the teacher logits contain NaN or inf")
    h = entropies(z)
    pred = np.argmax(z, axis=1)
    ratio = float(ratio)
    if class_balanced:
        keep = []
        for c in range(C):
            members = np.flatnonzero(pred == c)  # ascending index: the stable sort breaks ties by index
            k = math.floor(ratio * members.size)
            if k > 0:
                order = np.argsort(h[members], kind="stable")
                keep.append(members[order[:k]])
        ids = np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)
    else:
        k = math.floor(ratio * n)
        ids = np.sort(np.argsort(h, kind="stable")[:k])
    if ids.size == 0:
        raise ValueError(f"{name}: the credible set is empty (ratio={ratio} keeps floor(ratio * class size) = 0 "
                         f"samples of every predicted class among {n}); raise the ratio or give more data")
    ids_t = torch.from_numpy(ids.astype(np.int64))
    labels_t = torch.from_numpy(pred[ids].astype(np.int64))
    return CredibleSet(ids=ids_t, labels=labels_t, num_samples=n, num_classes=C)
