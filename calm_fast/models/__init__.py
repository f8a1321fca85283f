"""Model adapters: run a real network with merged tensors, per-task heads (see :mod:`.base`).

* :class:`GenericAdapter` — any ``nn.Module`` or functional forward plus one head per task.
* :class:`FlatParams` — merged tensors and their gradients as views into flat buffers.
* :func:`accuracy`, :func:`predict_logits` — per-task evaluation in batches.
"""
from .base import FlatParams, ModelAdapter, accuracy, iter_batches, num_samples, predict_logits, select_batch
from .generic import GenericAdapter

__all__ = ["FlatParams", "ModelAdapter", "GenericAdapter", "accuracy", "predict_logits", "select_batch",
           "num_samples", "iter_batches"]
