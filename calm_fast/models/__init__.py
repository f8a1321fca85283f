"""Model adapters: run a real network with merged tensors, per-task heads (see :mod:`.base`).

* :class:`GenericAdapter` — any ``nn.Module`` or functional forward plus one head per task.
* :class:`HFEncoderAdapter` (:func:`load_hf_encoder`, :func:`hf_encoder_from_modules`) — a Hugging Face
  encoder shared by all tasks, each task's own classification head (needs ``transformers``).
* :class:`OpenCLIPAdapter` (:func:`open_clip_from_state_dicts`, :func:`zeroshot_head`) — a CLIP image
  tower, zero-shot / given heads on normalised features (needs ``open_clip_torch``).
* :class:`FlatParams` — merged tensors and their gradients as views into flat buffers.
* :class:`LoadedModels` — what the loaders return: adapter, pretrained and fine-tuned merged tensors.
* :func:`evaluate`, :func:`accuracies`, :func:`accuracy`, :func:`predict_logits` — per-task evaluation.

``transformers`` and ``open_clip`` are imported only when a function that needs them is called.
"""
from .base import (FlatParams, LoadedModels, ModelAdapter, accuracy, check_state_dicts, correct_count, iter_batches,
                   num_samples, predict_logits, select_batch)
from .evaluation import accuracies, evaluate, split_task_data
from .generic import GenericAdapter
from .hf import HFEncoderAdapter, encoder_state_dict, hf_encoder_from_modules, load_hf_encoder
from .open_clip import (OpenCLIPAdapter, load_classification_head, open_clip_from_state_dicts, visual_state_dict,
                        zeroshot_head)

__all__ = ["FlatParams", "ModelAdapter", "LoadedModels", "GenericAdapter", "HFEncoderAdapter", "OpenCLIPAdapter",
           "load_hf_encoder", "hf_encoder_from_modules", "encoder_state_dict", "open_clip_from_state_dicts",
           "zeroshot_head", "load_classification_head", "visual_state_dict", "accuracy", "accuracies", "evaluate",
           "correct_count", "split_task_data", "check_state_dicts", "predict_logits", "select_batch", "num_samples",
           "iter_batches"]
