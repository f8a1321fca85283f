"""Hugging Face transformers: one shared (merged) encoder, one classification head per task.

The usual GLUE-style setup: every task was fine-tuned from the same pretrained encoder as an
``AutoModelForSequenceClassification`` (BERT, RoBERTa, MiniLM, DistilBERT, ...); merging combines the
encoders, each task keeps its own head.

**Which tensors are merged, which are heads.**  A task model is ``<encoder> + <head>``, the encoder
being the submodule named by the model's ``base_model_prefix`` (``bert``, ``roberta``, ...).  The
merged tensors are the encoder's parameters, named as the encoder names them (the task model's keys with
``<prefix>.`` stripped, e.g. ``encoder.layer.0.attention.self.query.weight``): these are
:meth:`HFEncoderAdapter.param_names`, and the keys of ``pretrained`` / ``finetuned[t]`` in
:class:`~.base.LoadedModels`.  Everything else in a fine-tuned model (``classifier.*``; RoBERTa's
``classifier.dense.*`` + ``classifier.out_proj.*``; DistilBERT's ``pre_classifier.*`` + ``classifier.*``)
is that task's head, kept per task, never merged, never given gradients.  The base may be the plain
pretrained encoder (``AutoModel``) or a sequence-classification model (only its encoder is read; its own
head is ignored); base encoder tensors that the task models' encoder does not have (e.g. RoBERTa's
pooler, which ``RobertaForSequenceClassification`` drops) are not used and are listed in
:attr:`HFEncoderAdapter.unused_pretrained_keys`.

**Forward.**  ``logits(params, task, inputs)`` is the task model's own classification forward (pooler /
``<s>`` token / pre-classifier exactly as its architecture does), in eval mode (dropout off), run with
``torch.func.functional_call`` on ``params`` for the encoder and the task's head tensors.  ``inputs`` is a
mapping of tensors (``input_ids``, ``attention_mask``, ``token_type_ids`` ... as the tokenizer returns
them; a bare tensor is taken as ``input_ids``); :meth:`HFEncoderAdapter.tokenize` turns a list of
strings into one.

Memory: one encoder module (holding the base's weights, also returned as ``pretrained``) plus the heads;
the task models given are never modified.
"""
from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from ..io.errors import CheckpointError, MismatchError
from .base import Inputs, LoadedModels, ModelAdapter, check_state_dicts, resolve_task_names, split_per_task

Tensor = torch.Tensor
PathLike = Union[str, os.PathLike]


def _encoder_prefix(model: nn.Module) -> str:
    prefix = getattr(model, "base_model_prefix", None)
    if not prefix or not isinstance(getattr(model, prefix, None), nn.Module):
        raise TypeError(f"{type(model).__name__} is not a Hugging Face task model with an encoder submodule "
                        "(expected e.g. a *ForSequenceClassification model whose `base_model_prefix` names it)")
    return prefix


def encoder_state_dict(model: Union[nn.Module, Mapping[str, Tensor]],
                       prefix: Optional[str] = None) -> Dict[str, Tensor]:
    """The encoder tensors of ``model`` named as the encoder names them (``<prefix>.`` stripped).

    ``model``: a plain encoder (``AutoModel``: its whole state dict), a task model (its
    ``base_model_prefix`` submodule), or a state dict (keys starting with ``<prefix>.`` are stripped,
    others kept as they are).  Tensors are detached references, not copies.
    """
    if isinstance(model, nn.Module):
        p = getattr(model, "base_model_prefix", None)
        sub = getattr(model, p, None) if p else None
        src = sub if isinstance(sub, nn.Module) else model
        return {k: v.detach() for k, v in src.state_dict(keep_vars=True).items()}
    if prefix is None:
        return dict(model)
    lead = prefix + "."
    stripped = {k[len(lead):]: v for k, v in model.items() if k.startswith(lead)}
    return stripped if stripped else dict(model)


class HFEncoderAdapter(ModelAdapter):
    """Shared encoder (merged) + the task models' own heads, run functionally.

    Args:
        task_models: the fine-tuned sequence-classification models, a list or ``{task_name: model}``.
            They are not modified; their heads are copied, their encoders are not kept.
        pretrained_encoder: the base encoder's tensors (see :func:`encoder_state_dict`); must hold every
            encoder parameter of the task models, with the same shapes.
        task_names: names of the tasks (default ``task0, ...`` or the mapping's keys).
        tokenizer: used by :meth:`tokenize` (any callable returning a dict of tensors with
            ``return_tensors="pt"``; a Hugging Face tokenizer).
        param_names: the encoder parameters to merge (default: all).  The others keep the base's values in
            every forward and get no gradient, so the backward pass stops at the lowest merged layer:
            pass the tensors fine-tuning changed (``param_names="changed"`` in :func:`load_hf_encoder` /
            :func:`hf_encoder_from_modules`) to skip frozen bottom layers and embeddings.
        dtype: dtype of the encoder's non-merged tensors and of the heads (the merged ``params`` passed to
            :meth:`logits` should have it too).
        device: where the encoder and heads live (``adapter.device``).

    Prefer :func:`load_hf_encoder` (folders) or :func:`hf_encoder_from_modules` (modules), which also
    return the base and fine-tuned encoder tensors.
    """

    def __init__(self, task_models: Union[Sequence[nn.Module], Mapping[str, nn.Module]],
                 pretrained_encoder: Mapping[str, Tensor], *, task_names: Optional[Sequence[str]] = None,
                 tokenizer: Any = None, dtype: torch.dtype = torch.float32,
                 device: Optional[Union[str, torch.device]] = None, param_names: Optional[Sequence[str]] = None):
        task_names, models = split_per_task(task_models, task_names, "HFEncoderAdapter", "task_models")
        self.task_names = resolve_task_names(task_names, len(models), "HFEncoderAdapter", "task models")
        self.prefix = _encoder_prefix(models[0])
        self.tokenizer = tokenizer
        dev = torch.device(device) if device is not None else None

        # The shared encoder: a copy of the first task's encoder architecture holding the base's tensors.
        # Its parameters double as the `pretrained` tensors (no second copy of the base).
        enc0 = getattr(models[0], self.prefix)
        self.encoder = copy.deepcopy(enc0).to(dtype=dtype, device=dev).eval().requires_grad_(False)
        self._names = [k for k, _ in self.encoder.named_parameters()]
        shapes = {k: tuple(v.shape) for k, v in self.encoder.named_parameters()}
        state = dict(pretrained_encoder)
        missing = [k for k in self._names if k not in state]
        if missing:
            raise MismatchError(f"the pretrained model has no encoder tensor {missing[:5]}"
                                + (" ..." if len(missing) > 5 else "") + f" (task models' encoder: "
                                f"{type(enc0).__name__}; is the base the same architecture?)")
        own = self.encoder.state_dict()
        for k in own:
            if k in state and tuple(state[k].shape) != tuple(own[k].shape):
                raise MismatchError(f"pretrained encoder tensor {k}: shape {tuple(state[k].shape)}, the task "
                                    f"models have {tuple(own[k].shape)}")
        with torch.no_grad():
            for k, t in own.items():
                if k in state:
                    t.copy_(state[k])
        self.unused_pretrained_keys: List[str] = sorted(k for k in state if k not in own)

        # Per task: a copy of the task model without its encoder (so only the head is copied), pointing
        # at the shared encoder.
        self._task_models: List[nn.Module] = []
        self._head_keys: List[List[str]] = []
        for name, m in zip(self.task_names, models):
            if _encoder_prefix(m) != self.prefix or type(getattr(m, self.prefix)) is not type(enc0):
                raise MismatchError(f"task {name!r}: a {type(m).__name__} whose encoder is not a "
                                    f"{type(enc0).__name__} like the first task's")
            their = {k: tuple(v.shape) for k, v in getattr(m, self.prefix).named_parameters()}
            if their != shapes:
                diff = sorted(set(their.items()) ^ set(shapes.items()))[:3]
                raise MismatchError(f"task {name!r}: its encoder differs from the first task's ({diff})")
            skel = _copy_without(m, self.prefix).to(dtype=dtype, device=dev).eval().requires_grad_(False)
            skel._modules[self.prefix] = self.encoder
            self._task_models.append(skel)
            self._head_keys.append([k for k in skel.state_dict() if not k.startswith(self.prefix + ".")])
        if param_names is not None:  # merge (and differentiate) only these; the rest stay the base's
            wanted = set(param_names)
            unknown = sorted(wanted - set(self._names))
            if unknown:
                raise ValueError(f"HFEncoderAdapter: param_names {unknown[:5]} are not encoder parameters "
                                 f"(they look like {self._names[:2]})")
            if not wanted:
                raise ValueError("HFEncoderAdapter: param_names is empty")
            self._names = [k for k in self._names if k in wanted]
        self._prefixed = [f"{self.prefix}.{k}" for k in self._names]

    # ---- the interface -------------------------------------------------------------------------
    def param_names(self) -> List[str]:
        return list(self._names)

    def logits(self, params: Mapping[str, Tensor], task: Union[int, str], inputs: Inputs) -> Tensor:
        model = self._task_models[self.task_index(task)]
        tensors = {pk: params[k] for pk, k in zip(self._prefixed, self._names)}
        if isinstance(inputs, Tensor):
            kwargs = {"input_ids": inputs}
        else:  # labels would make the model compute a loss nobody reads
            kwargs = {k: v for k, v in inputs.items() if k != "labels"}
        out = torch.func.functional_call(model, tensors, args=(), kwargs=kwargs, strict=False)
        return out.logits if hasattr(out, "logits") else out[0]

    def num_classes(self, task: Union[int, str]) -> Optional[int]:
        return int(self._task_models[self.task_index(task)].config.num_labels)

    @property
    def device(self) -> torch.device:
        for t in self.encoder.parameters():
            return t.device
        return torch.device("cpu")

    # ---- extras --------------------------------------------------------------------------------
    def pretrained_state_dict(self) -> Dict[str, Tensor]:
        """The base encoder's merged tensors (the shared encoder's own parameters, not copies)."""
        own = dict(self.encoder.named_parameters())
        return {k: own[k].detach() for k in self._names}

    def head_state_dict(self, task: Union[int, str]) -> Dict[str, Tensor]:
        """The task's head tensors, named as in the task model (e.g. ``classifier.weight``)."""
        sd = self._task_models[self.task_index(task)].state_dict()
        return {k: sd[k] for k in self._head_keys[self.task_index(task)]}

    def task_model(self, task: Union[int, str]) -> nn.Module:
        """The task's module (head + the shared encoder, which holds the base's tensors); for inspection."""
        return self._task_models[self.task_index(task)]

    def tokenize(self, texts: Union[str, Sequence[str]], *, max_length: Optional[int] = None,
                 text_pairs: Optional[Sequence[str]] = None, **kwargs) -> Dict[str, Tensor]:
        """Tokenize ``texts`` (and optional second segments) into a dict of CPU tensors, padded and truncated.

        Extra keyword arguments go to the tokenizer (e.g. ``padding="max_length"``).
        """
        if self.tokenizer is None:
            raise ValueError("HFEncoderAdapter.tokenize: no tokenizer (none was found in the model folders; "
                             "pass tokenizer=...)")
        if isinstance(texts, str):
            texts = [texts]
        opts = dict(padding=True, truncation=True, return_tensors="pt")
        if max_length is not None:
            opts["max_length"] = max_length
        opts.update(kwargs)
        args = (list(texts),) if text_pairs is None else (list(texts), list(text_pairs))
        return dict(self.tokenizer(*args, **opts))


def _copy_without(model: nn.Module, child: str) -> nn.Module:
    """A deep copy of ``model`` whose submodule ``child`` is left out (``None``): copies the head only.
    ``model`` is restored before returning, even on error."""
    kept = model._modules[child]
    model._modules[child] = None
    try:
        return copy.deepcopy(model)
    finally:
        model._modules[child] = kept


def hf_encoder_from_modules(pretrained: Union[nn.Module, Mapping[str, Tensor]],
                            finetuned: Union[Sequence[nn.Module], Mapping[str, nn.Module]], *,
                            task_names: Optional[Sequence[str]] = None, tokenizer: Any = None,
                            dtype: torch.dtype = torch.float32,
                            device: Optional[Union[str, torch.device]] = None,
                            param_names: Union[None, str, Sequence[str]] = None) -> LoadedModels:
    """Build an :class:`HFEncoderAdapter` from in-memory models.

    Args:
        pretrained: the base: the pretrained encoder (``AutoModel``), a sequence-classification model, or
            a state dict of either.
        finetuned: the fine-tuned sequence-classification models (list or ``{task_name: model}``).
        param_names: the encoder tensors to merge: all (None), a list, or ``"changed"``: those that differ
            from the base in at least one task (frozen layers are then neither merged nor backpropagated).

    Returns ``LoadedModels(adapter, pretrained, finetuned)`` whose state dicts map the adapter's
    ``param_names()`` to the base's and each task's encoder tensors, in ``dtype``, on the CPU (references
    to existing tensors where no conversion or move is needed: ``pretrained`` aliases the adapter's
    own encoder parameters, which the forward never reads since ``params`` replaces them).
    """
    task_names, models = split_per_task(finetuned, task_names, "hf_encoder_from_modules", "finetuned")
    prefix = _encoder_prefix(models[0])
    base_sd = encoder_state_dict(pretrained, prefix)
    if isinstance(param_names, str):
        if param_names != "changed":
            raise ValueError(f"hf_encoder_from_modules: param_names must be None, a list or 'changed', "
                             f"not {param_names!r}")
        task_sds = [encoder_state_dict(m) for m in models]
        param_names = [k for k, _ in getattr(models[0], prefix).named_parameters()
                       if k in base_sd and any(not torch.equal(sd[k].to(base_sd[k].dtype), base_sd[k])
                                               for sd in task_sds)]
        if not param_names:
            raise ValueError("hf_encoder_from_modules: no encoder tensor differs from the base in any task")
    adapter = HFEncoderAdapter(models, base_sd, task_names=task_names, tokenizer=tokenizer, dtype=dtype, device=device,
                               param_names=param_names)
    names = adapter.param_names()
    pre = {k: v.cpu() for k, v in adapter.pretrained_state_dict().items()}
    fts = []
    for m in models:
        sd = encoder_state_dict(m)
        fts.append({k: sd[k].detach().to(device="cpu", dtype=dtype) for k in names})
    check_state_dicts(names, pre, fts, adapter.task_names)
    return LoadedModels(adapter, pre, fts)


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' load reports / progress bars for the duration (restores the verbosity)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _check_model_folder(path: PathLike, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"{what}: {p} does not exist (models are read from local folders only, "
                              "never downloaded)")
    if not p.is_dir():
        raise CheckpointError(f"{what}: {p} is not a folder (expected a Hugging Face model folder written "
                              "by save_pretrained)")
    if not (p / "config.json").is_file():
        raise CheckpointError(f"{what}: {p} has no config.json: not a Hugging Face model folder")
    weights = [f for f in p.iterdir() if f.name.endswith((".safetensors", ".bin", ".safetensors.index.json",
                                                          ".bin.index.json"))]
    if not weights:
        raise CheckpointError(f"{what}: {p} holds no weights (*.safetensors / *.bin)")
    return p


def _from_pretrained(auto_cls, folder: Path, what: str, dtype: torch.dtype):
    try:
        with _quiet_transformers():
            return auto_cls.from_pretrained(str(folder), local_files_only=True, dtype=dtype, output_loading_info=True)
    except ImportError:
        raise
    except Exception as e:  # corrupt weights raise the loaders' own types (e.g. SafetensorError)
        msg = str(e).strip().splitlines()[0][:400] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{what}: {folder} cannot be loaded as {auto_cls.__name__}: {msg}") from e


def _load_tokenizer(folders: Sequence[Path]):
    from transformers import AutoTokenizer

    for f in folders:
        if not any((f / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")):
            continue
        try:
            with _quiet_transformers():
                return AutoTokenizer.from_pretrained(str(f), local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"tokenizer: {f} holds tokenizer files that cannot be loaded: "
                                  f"{str(e).splitlines()[0][:300]}") from e
    return None


def load_hf_encoder(pretrained: PathLike, finetuned: Union[Sequence[PathLike], Mapping[str, PathLike]], *,
                    task_names: Optional[Sequence[str]] = None, tokenizer: Any = None,
                    dtype: torch.dtype = torch.float32,
                    device: Optional[Union[str, torch.device]] = None,
                    param_names: Union[None, str, Sequence[str]] = None) -> LoadedModels:
    """Load a base and fine-tuned task models from local folders (``save_pretrained`` output).

    Args:
        pretrained: folder of the base: the pretrained encoder (loaded with ``AutoModel``) or a
            sequence-classification model (its encoder is used).
        finetuned: folders of the fine-tuned ``AutoModelForSequenceClassification`` models, a list
            (task names = folder names unless ``task_names``) or ``{task_name: folder}``.
        tokenizer: a tokenizer object or a folder; default: the first of the base folder and the task
            folders that holds tokenizer files (``None`` if none does: then pass tokenized inputs).
        param_names: the encoder tensors to merge: all (None), a list, or ``"changed"`` (those some task
            changed; see :func:`hf_encoder_from_modules`).

    Only local folders are read (``local_files_only=True``; a name that is not an existing folder is an
    error, never a hub download).  Errors (:class:`~calm_fast.io.errors.CheckpointError`) name the folder:
    missing, not a model folder, no weights, a task folder without a trained classification head, a
    base missing encoder tensors.  Returns ``LoadedModels(adapter, pretrained, finetuned)``.
    """
    from transformers import AutoModel, AutoModelForSequenceClassification

    task_names, dirs = split_per_task(finetuned, task_names, "load_hf_encoder", "finetuned")
    base_dir = _check_model_folder(pretrained, "pretrained model")
    task_dirs = [_check_model_folder(d, f"fine-tuned model {i}") for i, d in enumerate(dirs)]
    if task_names is None:
        task_names = [d.name for d in task_dirs]
        if len(set(task_names)) != len(task_names):
            task_names = [f"task{i}" for i in range(len(task_dirs))]

    models = []
    for name, d in zip(task_names, task_dirs):
        m, info = _from_pretrained(AutoModelForSequenceClassification, d, f"task {name!r}", dtype)
        if info.get("missing_keys"):
            raise CheckpointError(f"task {name!r}: {d} lacks {sorted(info['missing_keys'])[:5]}: not a fine-tuned "
                                  "sequence-classification model (its head would be random)")
        models.append(m.eval())
    prefix = _encoder_prefix(models[0])
    base, info = _from_pretrained(AutoModel, base_dir, "pretrained model", dtype)
    base_sd = encoder_state_dict(base, prefix)
    # Tensors the base folder did not hold were randomly initialised by from_pretrained: never merge them.
    absent = {k[len(prefix) + 1:] if k.startswith(prefix + ".") else k for k in info.get("missing_keys", ())}
    needed = {k for k, _ in getattr(models[0], prefix).named_parameters()}
    if absent & needed:
        raise CheckpointError(f"pretrained model: {base_dir} lacks encoder tensors {sorted(absent & needed)[:5]}")
    if isinstance(tokenizer, (str, os.PathLike)):
        tok_dir = Path(tokenizer)
        if not tok_dir.is_dir():
            raise CheckpointError(f"tokenizer: {tok_dir} is not a folder")
        tokenizer = _load_tokenizer([tok_dir])
        if tokenizer is None:
            raise CheckpointError(f"tokenizer: {tok_dir} holds no tokenizer files")
    elif tokenizer is None:
        tokenizer = _load_tokenizer([base_dir] + task_dirs)
    loaded = hf_encoder_from_modules(base_sd, dict(zip(task_names, models)), tokenizer=tokenizer, dtype=dtype,
                                     device=device, param_names=param_names)
    return loaded
