"""open_clip CLIP: the image tower is merged, each task has a fixed (zero-shot) classification head.

This is the setup of the task-vector literature (task arithmetic, TIES, AdaMerging, CALM on the 8 vision
tasks): every task fine-tuned the image tower of the same CLIP model; the heads are built once from the
*pretrained* model's text tower and never change.

**Merged tensors**: the image tower's parameters, named as in the open_clip model's state dict
(``visual.conv1.weight``, ``visual.transformer.resblocks.0.attn.in_proj_weight``, ...).

**Heads and logits**, exactly as the literature's ``ClassificationHead(normalize=True, weights)``:
``logits = (f / ||f||) @ W.T + b`` where ``f`` is the image tower's output and ``W`` ``[C, D]``.  A zero-shot
head (:func:`zeroshot_head`) is built as that code builds it: for each class, the text embeddings of every
prompt template, each L2-normalised, averaged, normalised again, and the whole ``[C, D]`` matrix scaled
by ``exp(logit_scale)`` of the model (≈ 100 for trained CLIP models), bias 0.  So the logits are the
usual ``100 · cos(image, class)``.  Heads may also be given as tensors (``[C, D]`` weight, or
``(weight, bias)``), e.g. the literature's ``head_<task>.pt`` files via :func:`load_classification_head`.

Checkpoints: fine-tuned image towers come as state dicts or files (``.pt`` / ``.safetensors``, read by
:mod:`calm_fast.io`; the literature's pickled ``ImageEncoder`` files need ``trust_pickle=True``).  Their
keys may be the open_clip model's (``visual.*``), the ``ImageEncoder`` wrapper's (``model.visual.*``) or
the image tower's own (``conv1.weight``, ...); :func:`visual_state_dict` maps all of them to ``visual.*``.
"""
from __future__ import annotations

import contextlib
import copy
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..io.errors import CheckpointError, MismatchError
from .base import Inputs, LoadedModels, ModelAdapter, check_state_dicts, resolve_task_names, split_per_task

Tensor = torch.Tensor
PathLike = Union[str, os.PathLike]
HeadSpec = Union[Tensor, Tuple[Tensor, Optional[Tensor]], nn.Module]
Template = Union[str, Callable[[str], str]]

VISUAL = "visual."


@contextlib.contextmanager
def _eval_mode(module: nn.Module):
    """Run ``module`` in eval mode, then restore every submodule's own training flag."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, t in flags:
            m.training = t


def _head_tensors(head: HeadSpec, where: str) -> Tuple[Tensor, Optional[Tensor]]:
    if isinstance(head, nn.Module):
        w, b = getattr(head, "weight", None), getattr(head, "bias", None)
    elif isinstance(head, Tensor):
        w, b = head, None
    elif isinstance(head, (tuple, list)) and len(head) == 2:
        w, b = head
    else:
        raise TypeError(f"{where}: a head is a [C, D] weight tensor, a (weight, bias) pair or a linear module, "
                        f"got {type(head).__name__}")
    if not isinstance(w, Tensor) or w.dim() != 2:
        raise ValueError(f"{where}: the head's weight must be a 2-D [classes, dim] tensor")
    if b is not None and (not isinstance(b, Tensor) or tuple(b.shape) != (w.shape[0],)):
        raise ValueError(f"{where}: the head's bias must be a [{w.shape[0]}] tensor")
    return w.detach(), (b.detach() if b is not None else None)


class OpenCLIPAdapter(ModelAdapter):
    """CLIP image tower (merged) + one fixed linear head per task on L2-normalised features.

    Args:
        model: an open_clip model (``open_clip.CLIP`` or anything with an image tower ``model.visual``).
            Its image tower is copied once (eval mode, no grad); ``model`` itself is not modified.
        heads: per task a ``[C, D]`` weight, a ``(weight, bias)`` pair or a linear module (weight ``[C, D]``,
            e.g. the literature's ``ClassificationHead``), as a list or ``{task_name: head}``; see
            :func:`zeroshot_head` to build them from class names.
        task_names: names of the tasks (default ``task0, ...`` or the mapping's keys).
        normalize: divide the image features by their L2 norm before the head (True: what the
            literature's heads do; False for heads trained on raw features).
        dtype / device: of the image tower's non-merged tensors and of the heads.

    ``logits(params, task, images) = (f / ||f||) @ W.T + b`` with ``f = visual(images)`` run by
    ``torch.func.functional_call`` on ``params`` (keys ``visual.*``), in eval mode.  Note that when no
    tensor involved requires grad (evaluation), ``nn.MultiheadAttention`` takes torch's fused inference
    path, whose rounding differs in the last bits from the path taken while training, exactly as for
    the open_clip model itself.
    """

    def __init__(self, model: nn.Module, heads: Union[Sequence[HeadSpec], Mapping[str, HeadSpec]], *,
                 task_names: Optional[Sequence[str]] = None, normalize: bool = True,
                 dtype: torch.dtype = torch.float32, device: Optional[Union[str, torch.device]] = None):
        visual = getattr(model, "visual", None)
        if not isinstance(visual, nn.Module):
            raise TypeError(f"OpenCLIPAdapter: {type(model).__name__} has no image tower `visual`")
        task_names, head_list = split_per_task(heads, task_names, "OpenCLIPAdapter", "heads")
        self.task_names = resolve_task_names(task_names, len(head_list), "OpenCLIPAdapter", "heads")
        dev = torch.device(device) if device is not None else None
        self.visual = copy.deepcopy(visual).to(dtype=dtype, device=dev).eval().requires_grad_(False)
        self._inner = [k for k, _ in self.visual.named_parameters()]
        self._names = [VISUAL + k for k in self._inner]
        self.normalize = bool(normalize)
        self.heads: List[Tuple[Tensor, Optional[Tensor]]] = []
        for name, h in zip(self.task_names, head_list):
            w, b = _head_tensors(h, f"head of task {name!r}")
            dev_ = self.device
            self.heads.append((w.to(dtype=dtype, device=dev_), None if b is None else b.to(dtype=dtype, device=dev_)))

    def param_names(self) -> List[str]:
        return list(self._names)

    def features(self, params: Mapping[str, Tensor], images: Tensor) -> Tensor:
        """Image features (normalised when ``normalize``) with the merged tensors ``params``."""
        tensors = {k: params[n] for k, n in zip(self._inner, self._names)}
        f = torch.func.functional_call(self.visual, tensors, (images,), strict=False)
        if isinstance(f, (tuple, list)):  # towers built with output_tokens=True return (pooled, tokens)
            f = f[0]
        return f / f.norm(dim=-1, keepdim=True) if self.normalize else f

    def logits(self, params: Mapping[str, Tensor], task: Union[int, str], inputs: Inputs) -> Tensor:
        if not isinstance(inputs, Tensor):
            raise TypeError("OpenCLIPAdapter: inputs are an image tensor [batch, 3, H, W]")
        w, b = self.heads[self.task_index(task)]
        return F.linear(self.features(params, inputs), w, b)

    def num_classes(self, task: Union[int, str]) -> Optional[int]:
        return int(self.heads[self.task_index(task)][0].shape[0])

    @property
    def device(self) -> torch.device:
        for t in self.visual.parameters():
            return t.device
        return torch.device("cpu")

    def pretrained_state_dict(self) -> Dict[str, Tensor]:
        """The image tower's own tensors (``visual.*``), i.e. those of the model given (not copies)."""
        return {VISUAL + k: v.detach() for k, v in self.visual.named_parameters()}


# ------------------------------------------------------------------------------------------------
# zero-shot heads
# ------------------------------------------------------------------------------------------------
def default_tokenizer(model: nn.Module):
    """open_clip's own BPE tokenizer (bundled with open_clip: works offline) at the model's context length.

    Right for the original CLIP / OpenCLIP text towers (vocabulary of 49408).  Models with a Hugging Face
    text tower need their own tokenizer (pass ``tokenizer=``).
    """
    from open_clip.tokenizer import SimpleTokenizer

    vocab = getattr(model, "vocab_size", None)
    if vocab is not None and int(vocab) != 49408:
        raise ValueError(f"the model's text vocabulary has {vocab} entries, not the 49408 of open_clip's own "
                         "tokenizer: pass the model's tokenizer (tokenizer=...)")
    return SimpleTokenizer(context_length=int(getattr(model, "context_length", 77)))


def _format(template: Template, classname: str) -> str:
    return template(classname) if callable(template) else template.format(classname)


@torch.no_grad()
def zeroshot_head(model: nn.Module, classnames: Sequence[str], templates: Sequence[Template], *,
                  tokenizer: Optional[Callable[[List[str]], Tensor]] = None, scale: Optional[float] = None,
                  device: Optional[Union[str, torch.device]] = None) -> Tensor:
    """The ``[C, D]`` zero-shot head of the task-vector literature, from the model's own text tower.

    For class ``c``: ``e_c = mean_t(n(encode_text(template_t(c)))); W[c] = scale * n(e_c)`` with ``n`` the
    L2 normalisation, ``scale = exp(model.logit_scale)`` unless given.  Templates are format strings with
    one ``{}`` (``"a photo of a {}."``) or callables ``classname -> prompt``.  The text tower runs in eval
    mode without gradients (the model's modes are restored); the result is fp32 on ``device`` (default:
    the model's).  ``tokenizer``: default :func:`default_tokenizer` (offline).
    """
    if not classnames:
        raise ValueError("zeroshot_head: no class names")
    if not templates:
        raise ValueError("zeroshot_head: no prompt templates")
    if not hasattr(model, "encode_text"):
        raise TypeError(f"zeroshot_head: {type(model).__name__} has no text tower (encode_text)")
    tok = tokenizer if tokenizer is not None else default_tokenizer(model)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model_dev = next(model.parameters()).device
    if scale is None:
        ls = getattr(model, "logit_scale", None)
        if ls is None:
            raise ValueError("zeroshot_head: the model has no logit_scale; pass scale=")
        scale_t = ls.detach().float().exp()
    else:
        scale_t = torch.tensor(float(scale))
    rows = []
    with _eval_mode(model):
        for c in classnames:
            tokens = tok([_format(t, c) for t in templates]).to(model_dev)
            e = model.encode_text(tokens).float()
            e = e / e.norm(dim=-1, keepdim=True)
            e = e.mean(dim=0)
            rows.append(e / e.norm())
    w = torch.stack(rows) * scale_t.to(rows[0].device)
    return w.to(dev)


# ------------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------------
_WRAPPERS = ("", "model.", "module.", "module.model.", "model.module.")


def visual_state_dict(state_dict: Mapping[str, Tensor], names: Sequence[str], where: str = "checkpoint"
                      ) -> Dict[str, Tensor]:
    """``{name: tensor}`` for the ``visual.*`` ``names`` out of a state dict keyed like an open_clip model
    (``visual.*``), the literature's ``ImageEncoder`` (``model.visual.*``), a DataParallel wrapper
    (``module.``) or the image tower itself (``conv1.weight``).  Raises :class:`MismatchError` naming
    the missing tensors."""
    inner = [n[len(VISUAL):] for n in names]
    for lead in _WRAPPERS:
        if all(lead + n in state_dict for n in names):
            return {n: state_dict[lead + n] for n in names}
    for lead in _WRAPPERS:
        if all(lead + k in state_dict for k in inner):
            return {n: state_dict[lead + k] for n, k in zip(names, inner)}
    best = max(_WRAPPERS, key=lambda lead: sum(lead + n in state_dict for n in names))
    missing = [n for n in names if best + n not in state_dict]
    raise MismatchError(f"{where}: not an image tower of this model: no tensor {best}{missing[0]}"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                        + f"; it has e.g. {list(state_dict)[:3]}")


def _read(source: Union[PathLike, Mapping[str, Tensor], nn.Module], trust_pickle: bool) -> Mapping[str, Tensor]:
    if isinstance(source, nn.Module):
        return {k: v.detach() for k, v in source.state_dict(keep_vars=True).items()}
    if isinstance(source, Mapping):
        return source
    from ..io import load_state_dict

    return load_state_dict(source, trust_pickle=trust_pickle)


def load_classification_head(path: Union[PathLike, Mapping[str, Tensor], nn.Module], *, trust_pickle: bool = False
                             ) -> Tuple[Tensor, Optional[Tensor]]:
    """``(weight [C, D], bias [C] or None)`` of a saved linear head: the literature's ``head_<task>.pt``
    (a pickled ``ClassificationHead``: ``trust_pickle=True``), or a state dict / file with ``weight``
    (and ``bias``)."""
    sd = _read(path, trust_pickle)
    if "weight" not in sd:
        raise CheckpointError(f"{path if not isinstance(path, Mapping) else 'head'}: no 'weight' tensor "
                              f"(keys: {list(sd)[:5]})")
    return _head_tensors((sd["weight"], sd.get("bias")), str(path) if isinstance(path, (str, os.PathLike)) else "head")


def open_clip_from_state_dicts(model: nn.Module, finetuned: Union[Sequence[Any], Mapping[str, Any]],
                               heads: Union[Sequence[HeadSpec], Mapping[str, HeadSpec]], *,
                               pretrained: Optional[Union[PathLike, Mapping[str, Tensor], nn.Module]] = None,
                               task_names: Optional[Sequence[str]] = None, normalize: bool = True,
                               trust_pickle: bool = False, dtype: torch.dtype = torch.float32,
                               device: Optional[Union[str, torch.device]] = None) -> LoadedModels:
    """Build an :class:`OpenCLIPAdapter` plus the base's and each task's image-tower tensors.

    Args:
        model: the open_clip model (architecture; its image tower holds the base unless ``pretrained``).
        finetuned: per task a state dict, module or checkpoint file of the fine-tuned image tower (list, or
            ``{task_name: ...}``); keys as :func:`visual_state_dict` accepts.
        heads: one head per task (see :class:`OpenCLIPAdapter`), same order / names.
        pretrained: the base image tower, if not the one of ``model`` (then it is also loaded into the
            adapter's copy, so non-merged tensors come from the base).
        trust_pickle: allow pickled checkpoints (the literature's ``ImageEncoder`` files).

    Returns ``LoadedModels(adapter, pretrained, finetuned)`` with ``visual.*`` keys, on the CPU.
    """
    task_names, sources = split_per_task(finetuned, task_names, "open_clip_from_state_dicts", "finetuned")
    if isinstance(heads, Mapping):
        if task_names is not None and list(heads.keys()) != list(task_names):
            raise ValueError("open_clip_from_state_dicts: the keys of `heads` disagree with the task names")
        task_names = list(heads.keys())
        heads = list(heads.values())
    if len(heads) != len(sources):
        raise ValueError(f"open_clip_from_state_dicts: {len(sources)} fine-tuned models but {len(heads)} heads")
    adapter = OpenCLIPAdapter(model, heads, task_names=task_names, normalize=normalize, dtype=dtype, device=device)
    names = adapter.param_names()
    if pretrained is not None:
        base = visual_state_dict(_read(pretrained, trust_pickle), names, "pretrained")
        with torch.no_grad():
            for (k, t), n in zip(adapter.visual.named_parameters(), names):
                if tuple(base[n].shape) != tuple(t.shape):
                    raise MismatchError(f"pretrained: {n} has shape {tuple(base[n].shape)}, "
                                        f"the model has {tuple(t.shape)}")
                t.copy_(base[n])
    pre = {k: v.cpu() for k, v in adapter.pretrained_state_dict().items()}
    fts = []
    for name, src in zip(adapter.task_names, sources):
        sd = visual_state_dict(_read(src, trust_pickle), names, f"task {name!r}")
        fts.append({k: v.detach().to(device="cpu", dtype=dtype) for k, v in sd.items()})
    check_state_dicts(names, pre, fts, adapter.task_names)
    return LoadedModels(adapter, pre, fts)
