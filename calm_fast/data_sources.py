"""Turn the data/adapter part of a data-based merge config (:mod:`calm_fast.data_config`) into objects:
the model adapter with the base and fine-tuned tensors, and per task the unlabeled inputs, labelled eval
data and optional teacher logits.

Data files:

* ``.pt`` / ``.pth`` (``torch.load(weights_only=True)``) and ``.safetensors``: a tensor, or a mapping of
  tensors sharing their first (sample) dimension (e.g. ``input_ids`` + ``attention_mask``).  A mapping
  with a single tensor is that tensor.  In eval data, a tensor named ``labels`` is the labels.
* ``.txt``: one example per line (blank lines skipped), tokenized by the adapter's tokenizer (text
  models: ``hf-encoder``, or an entry-point adapter with a ``tokenize(texts, max_length=)`` method); as
  labels: one integer per line.
* ``module:function`` (or ``{entry: module:function, options: {...}}``): called with the keywords among
  ``task``, ``split`` (``"unlabeled"``, ``"eval"``, ``"labels"``, ``"teacher_logits"``), ``adapter`` and the
  options that its signature accepts; returns inputs (eval: ``(inputs, labels)`` or inputs when
  ``labels`` is given separately).  Entry-point modules are imported with the config file's folder and the
  working directory on ``sys.path``.

Errors: an unreadable or missing file is :class:`~calm_fast.io.errors.CheckpointError` (exit 3); a bad
entry point or content of the wrong kind is :class:`~calm_fast.io.errors.ConfigError` (exit 2).
"""
from __future__ import annotations

import importlib
import inspect
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .data_config import AdapterSpec, EntrySource, EvalSpec, TaskEntry, is_entry_point
from .io.errors import CheckpointError, ConfigError, MismatchError

Tensor = torch.Tensor
DATA_SUFFIXES = (".pt", ".pth", ".safetensors", ".txt")


class EntryPointError(ConfigError):
    """A ``module:function`` entry point cannot be imported, or it raised (exit 2)."""


# ------------------------------------------------------------------------------------------------
# Entry points
# ------------------------------------------------------------------------------------------------
def import_entry_point(spec: str, folders: Sequence[str] = ()) -> Any:
    """The object named by ``module.sub:attr.attr`` (``folders`` are tried first on ``sys.path``)."""
    mod_name, _, attr = spec.partition(":")
    added = [f for f in list(folders) + [os.getcwd()] if f and f not in sys.path]
    sys.path[:0] = added
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise EntryPointError(f"entry point {spec}: cannot import module {mod_name!r} ({e}); the config file's "
                              "folder and the working directory are on the import path") from None
    except Exception as e:  # noqa: BLE001 - the user's module failed at import
        raise EntryPointError(f"entry point {spec}: importing {mod_name!r} raised {type(e).__name__}: {e}") from None
    finally:
        for f in added:
            if f in sys.path:
                sys.path.remove(f)
    obj = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise EntryPointError(f"entry point {spec}: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise EntryPointError(f"entry point {spec}: {attr!r} is not callable")
    return obj


def call_entry_point(spec: str, fn: Any, **kwargs) -> Any:
    """Call ``fn`` with the keywords its signature accepts (all of them if it takes ``**kwargs``); any
    exception it raises becomes an :class:`EntryPointError` naming the entry point."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in params}
    try:
        return fn(**kwargs)
    except (ConfigError, CheckpointError, MismatchError):
        raise
    except Exception as e:  # noqa: BLE001 - user code: report it, no traceback
        raise EntryPointError(f"entry point {spec} raised {type(e).__name__}: {e}") from None


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------
def _check_file(path: str, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{what}: {p} does not exist")
    if not p.is_file():
        raise CheckpointError(f"{what}: {p} is not a file")
    if not p.name.endswith(DATA_SUFFIXES):
        raise ConfigError(f"{what}: {p}: unknown data format (expected .txt, .pt, .pth, .safetensors or a "
                          "module:function entry point)")
    return p


def check_source(src: Any, what: str, folder: Optional[str] = None) -> None:
    """Check a data source before anything is loaded: a file exists with a known suffix (entry points are
    checked when called)."""
    if isinstance(src, EntrySource) or (isinstance(src, str) and is_entry_point(src, folder)):
        return
    _check_file(src, what)


def _unwrap(x: Any, what: str) -> Any:
    if isinstance(x, Tensor):
        return x
    if isinstance(x, Mapping):
        if not x or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in x.items()):
            raise ConfigError(f"{what}: expected a tensor or a mapping name -> tensor, got a mapping with "
                              f"{[type(v).__name__ for v in list(x.values())[:3]]}")
        return next(iter(x.values())) if len(x) == 1 else dict(x)
    raise ConfigError(f"{what}: expected a tensor or a mapping name -> tensor, got {type(x).__name__}")


def load_tensor_file(path: str, what: str) -> Any:
    """A tensor or a mapping of tensors from a .pt/.pth (weights only) or .safetensors file."""
    p = _check_file(path, what)
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(p))
        else:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt files raise the loaders' own types
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{what}: {p} cannot be read: {msg}") from None
    if isinstance(obj, Mapping):
        return {k: v for k, v in obj.items()} if obj else obj
    return obj


def read_lines(path: str, what: str) -> List[str]:
    p = _check_file(path, what)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{what}: {p} is not UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise CheckpointError(f"{what}: {p} cannot be read: {e.strerror or e}") from None
    return [line for line in text.splitlines() if line.strip()]


def tokenize(adapter: Any, lines: List[str], max_length: Optional[int], what: str) -> Dict[str, Tensor]:
    tok = getattr(adapter, "tokenize", None)
    if tok is None:
        raise ConfigError(f"{what}: a text file needs a text model whose adapter tokenizes (hf-encoder, or an "
                          f"adapter with a tokenize() method); {type(adapter).__name__} has none")
    if not lines:
        raise ConfigError(f"{what}: the text file has no examples")
    try:
        return dict(tok(lines, max_length=max_length))
    except ValueError as e:  # e.g. no tokenizer in the model folders
        raise ConfigError(f"{what}: {e}") from None


# ------------------------------------------------------------------------------------------------
# Sources
# ------------------------------------------------------------------------------------------------
class DataLoader:
    """Loads the data sources of one config (entry points imported from ``folder``)."""

    def __init__(self, adapter: Any, folder: str, max_length: Optional[int] = None):
        self.adapter, self.folder, self.max_length = adapter, folder, max_length

    def _entry(self, src: Any, task: str, split: str, what: str) -> Any:
        spec, options = (src.entry, src.options or {}) if isinstance(src, EntrySource) else (src, {})
        fn = import_entry_point(spec, [self.folder])
        return call_entry_point(spec, fn, task=task, split=split, adapter=self.adapter, **options)

    def _raw(self, src: Any, task: str, split: str, what: str) -> Any:
        """A source as loaded: tensors / mapping (files), token dict (text) or what an entry point returns."""
        if isinstance(src, EntrySource) or is_entry_point(src, self.folder):
            return self._entry(src, task, split, what)
        if src.endswith(".txt"):
            lines = read_lines(src, what)
            if split == "labels":
                try:
                    return torch.tensor([int(x.strip()) for x in lines], dtype=torch.int64)
                except ValueError:
                    raise ConfigError(f"{what}: {src}: expected one integer label per line") from None
            return tokenize(self.adapter, lines, self.max_length, what)
        return load_tensor_file(src, what)

    def inputs(self, src: Any, task: str, split: str = "unlabeled") -> Any:
        what = f"task {task!r} {split} data"
        return _unwrap(self._raw(src, task, split, what), what)

    def labels(self, src: Any, task: str) -> Tensor:
        what = f"task {task!r} eval labels"
        return _labels(_unwrap(self._raw(src, task, "labels", what), what), what)

    def eval(self, spec: EvalSpec, task: str) -> Tuple[Any, Tensor]:
        what = f"task {task!r} eval data"
        raw = self._raw(spec.data, task, "eval", what)
        if spec.labels is not None:
            return _unwrap(raw, what), self.labels(spec.labels, task)
        if isinstance(raw, tuple) and len(raw) == 2:
            return _unwrap(raw[0], what), _labels(raw[1], what)
        if isinstance(raw, Mapping) and "labels" in raw:
            rest = {k: v for k, v in raw.items() if k != "labels"}
            return _unwrap(rest, what), _labels(raw["labels"], what)
        raise ConfigError(f"{what}: no labels: give 'labels:' (a file or entry point), or store a tensor named "
                          "'labels' in the data file, or return (inputs, labels) from the entry point")

    def teacher_logits(self, src: Any, task: str) -> Tensor:
        what = f"task {task!r} teacher logits"
        z = _unwrap(self._raw(src, task, "teacher_logits", what), what)
        if not isinstance(z, Tensor) or z.dim() != 2 or not z.is_floating_point():
            raise ConfigError(f"{what}: expected one floating [num_samples, num_classes] tensor")
        return z


def _labels(x: Any, what: str) -> Tensor:
    if not isinstance(x, Tensor):
        x = torch.as_tensor(x)
    if x.dim() != 1 or x.is_floating_point() or x.dtype == torch.bool:
        raise ConfigError(f"{what}: labels must be a 1-D integer tensor, got {x.dtype} of shape {list(x.shape)}")
    return x.to(torch.int64)


# ------------------------------------------------------------------------------------------------
# Adapters
# ------------------------------------------------------------------------------------------------
def _torch_dtype(name: Optional[str]) -> torch.dtype:
    return getattr(torch, name) if name else torch.float32


def _missing_extra(e: ImportError, what: str) -> ConfigError:
    return ConfigError(f"the {what} adapter needs an optional library that is not installed ({e}); install "
                       "calm_fast with the models extra: pip install -e \".[models]\"")


def build_adapter(spec: AdapterSpec, base: Optional[str], tasks: Mapping[str, TaskEntry], *, folder: str,
                  device: Optional[str], trust_pickle: bool) -> Any:
    """The :class:`calm_fast.models.LoadedModels` of the config: the adapter with the base's and every task's
    merged tensors (tasks in the config's order)."""
    from .models import LoadedModels, ModelAdapter, check_state_dicts

    dtype = _torch_dtype(spec.dtype)
    names = list(tasks)
    paths = {t: e.model for t, e in tasks.items()}
    if spec.type == "hf-encoder":
        try:
            from .models import load_hf_encoder

            return load_hf_encoder(base, paths, tokenizer=spec.tokenizer, dtype=dtype, device=device)
        except ImportError as e:
            raise _missing_extra(e, "hf-encoder") from None
    if spec.type == "open-clip":
        try:
            return _open_clip(spec, base, tasks, dtype=dtype, device=device, trust_pickle=trust_pickle)
        except ImportError as e:
            raise _missing_extra(e, "open-clip") from None
    fn = import_entry_point(spec.type, [folder])
    out = call_entry_point(spec.type, fn, base=base, models=dict(paths), tasks=names, device=device, dtype=dtype,
                           trust_pickle=trust_pickle, **(spec.options or {}))
    if isinstance(out, LoadedModels):
        loaded = out
    elif isinstance(out, ModelAdapter):
        if base is None:
            raise ConfigError(f"adapter {spec.type} returned a model adapter only: give base_model so that the "
                              "base tensors can be read (or return LoadedModels)")
        from .io import load_state_dict

        pnames = out.param_names()
        pre = _pick(load_state_dict(base, trust_pickle=trust_pickle), pnames, "base_model")
        fts = [_pick(load_state_dict(paths[t], trust_pickle=trust_pickle, lora_base=base), pnames, f"task {t!r}")
               for t in out.task_names]
        check_state_dicts(pnames, pre, fts, out.task_names)
        loaded = LoadedModels(out, pre, fts)
    else:
        raise EntryPointError(f"entry point {spec.type} returned a {type(out).__name__}; expected "
                              "calm_fast.models.LoadedModels or a ModelAdapter")
    if list(loaded.adapter.task_names) != names:
        raise ConfigError(f"adapter {spec.type}: its tasks {list(loaded.adapter.task_names)} are not the config's "
                          f"tasks {names} (same names, same order)")
    return loaded


def locate(names: Sequence[str], keys: Sequence[str], where: str) -> Dict[str, str]:
    """Map each merged tensor name to the key holding it in a checkpoint: the same key, else the one key
    ending in ``.name`` (a wrapper prefix such as ``bert.`` or ``model.``), else the one key that ``name``
    ends with after a dot (``visual.conv1.weight`` in a bare image tower's ``conv1.weight``)."""
    keyset = set(keys)
    out: Dict[str, str] = {}
    for n in names:
        if n in keyset:
            out[n] = n
            continue
        cands = [k for k in keys if k.endswith("." + n)]
        if len(cands) != 1:
            cands = [k for k in keys if n.endswith("." + k)] if not cands else cands
        if len(cands) != 1:
            raise MismatchError(f"{where}: no single tensor for {n!r}"
                                + (f" (candidates {cands[:3]})" if cands else f"; it has e.g. {list(keys)[:3]}"))
        out[n] = cands[0]
    return out


def _pick(sd: Mapping[str, Tensor], names: Sequence[str], where: str) -> Dict[str, Tensor]:
    where_key = locate(names, list(sd), where)
    return {n: sd[where_key[n]] for n in names}


def _open_clip(spec: AdapterSpec, base: Optional[str], tasks: Mapping[str, TaskEntry], *, dtype, device,
               trust_pickle: bool):
    import open_clip

    from .io import load_state_dict
    from .models import load_classification_head, open_clip_from_state_dicts, zeroshot_head

    if base is None:
        raise ConfigError("open-clip: base_model (the pretrained open_clip checkpoint, image and text towers) is "
                          "required")
    if spec.architecture is not None:
        try:
            model = open_clip.create_model(spec.architecture, pretrained=None)
        except RuntimeError as e:
            raise ConfigError(f"open-clip: unknown architecture {spec.architecture!r} ({e})") from None
    else:
        try:
            model = open_clip.CLIP(**spec.model_config_)
        except (TypeError, ValueError, KeyError) as e:
            raise ConfigError(f"open-clip: model_config is not valid for open_clip.CLIP: {e}") from None
    sd = load_state_dict(base, trust_pickle=trust_pickle)
    own = model.state_dict()
    where = locate(list(own), list(sd), "base_model (an open_clip checkpoint)")
    bad = [k for k in own if tuple(sd[where[k]].shape) != tuple(own[k].shape)]
    if bad:
        raise MismatchError(f"base_model: {bad[0]} has shape {tuple(sd[where[bad[0]]].shape)}, the architecture "
                            f"has {tuple(own[bad[0]].shape)}")
    model.load_state_dict({k: sd[where[k]] for k in own})
    model.eval()
    heads = {}
    for t, e in tasks.items():
        if e.head is not None:
            if not Path(e.head).is_file():
                raise CheckpointError(f"task {t!r} head: {e.head} does not exist")
            heads[t] = load_classification_head(e.head, trust_pickle=trust_pickle)
        elif e.classnames is not None:
            templates = e.templates or spec.templates or ["a photo of a {}."]
            heads[t] = zeroshot_head(model, e.classnames, templates)
        else:
            raise ConfigError(f"task {t!r}: an open-clip task needs 'head' (a weight file) or 'classnames' "
                              "(a zero-shot head)")
    return open_clip_from_state_dicts(model, {t: e.model for t, e in tasks.items()}, heads,
                                      normalize=True if spec.normalize is None else spec.normalize,
                                      trust_pickle=trust_pickle, dtype=dtype, device=device)
