"""The configuration of the in-memory methods of ``calm-fast merge``: the data-based ones (CALM; the
AdaMerging family plugs in the same way) and DOGE_TA.  A typed schema, checked with pydantic, like
:mod:`calm_fast.config` (whose value types and error wording it reuses).

A data-based method needs a network and unlabeled data, not only state dicts, so its file names a
*model adapter* and, per task, the fine-tuned checkpoint and the data::

    merge_method: calm
    base_model: models/bert-base            # the pretrained model (a HF folder for hf-encoder)
    adapter: hf-encoder                     # hf-encoder | open-clip | module:function  (or a mapping, below)
    tasks:                                  # one entry per task, in this order
      sst2:
        model: models/bert-sst2             # the fine-tuned checkpoint
        data: data/sst2_unlabeled.txt       # unlabeled inputs: .txt (one example per line), .pt, .safetensors,
                                            # or module:function
        eval: {data: data/sst2_test.txt, labels: data/sst2_test_labels.txt}   # optional, labelled
        num_classes: 2                      # optional: the head must have this many classes
    parameters: {ratio: 0.8, iterations: 100, schedule: [[sst2, mnli], [qnli], [rte]]}
    output: merged/

Relative paths are relative to the file's folder.  Everything is validated before anything is opened;
errors are :class:`calm_fast.io.ConfigError` (exit 2).  The method's ``parameters`` are checked by its
own schema (:class:`CalmParameters`, :class:`DogeParameters`, or one derived from the method's signature
with :func:`schema_from_signature`): every keyword of the Python function that a YAML file can express,
strictly typed (``"0.5"`` and ``true`` are not numbers; ``.nan`` is an error).
"""
from __future__ import annotations

import collections.abc
import inspect
import os
import re
import typing
from typing import Annotated, Any, Callable, Dict, Iterable, List, Literal, Mapping, Optional, Tuple, Type, Union

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, JsonValue, StrictBool, StrictInt, StrictStr,
                      ValidationError, create_model, field_validator, model_validator)

from .config import (DType, Number, PathStr, Patterns, Size, _describe, _fold_aliases, _Strict, describe_errors)
from .io.errors import ConfigError

#: ``module.sub:function`` (an entry point); a path that exists as a file always wins over this reading
ENTRY_POINT = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
ADAPTER_TYPES = ("hf-encoder", "open-clip")


def is_entry_point(text: str, folder: Optional[str] = None) -> bool:
    """Whether ``text`` names a ``module:function`` entry point (and not an existing file)."""
    if not isinstance(text, str) or not ENTRY_POINT.match(text):
        return False
    return not os.path.exists(text if folder is None or os.path.isabs(text) else os.path.join(folder, text))


PositiveInt = Annotated[StrictInt, Field(ge=1)]
NonNegInt = Annotated[StrictInt, Field(ge=0)]


# ------------------------------------------------------------------------------------------------
# Adapter and data
# ------------------------------------------------------------------------------------------------
class AdapterSpec(_Strict):
    """``adapter:`` — which network runs the tasks.  A bare string is the ``type``.

    type: ``hf-encoder`` (base and task models are Hugging Face folders written by ``save_pretrained``;
    the encoder is merged, each task keeps its classification head), ``open-clip`` (the image tower is
    merged; heads are zero-shot from class names or given as files), or ``module:function``, an entry
    point returning a :class:`calm_fast.models.LoadedModels` or a :class:`calm_fast.models.ModelAdapter`.
    """

    type: StrictStr
    dtype: Optional[DType] = None               # of the network (default float32)
    # hf-encoder
    tokenizer: Optional[PathStr] = None         # a folder with tokenizer files (default: the model folders')
    max_length: Optional[PositiveInt] = None    # truncation length of text data (default: the tokenizer's)
    # open-clip
    architecture: Optional[StrictStr] = None    # an open_clip model name (open_clip.create_model, no download)
    model_config_: Optional[Dict[StrictStr, JsonValue]] = Field(None, alias="model_config")  # open_clip.CLIP kwargs
    templates: Optional[List[StrictStr]] = None  # prompt templates of zero-shot heads ("a photo of a {}.")
    normalize: Optional[StrictBool] = None       # L2-normalise image features before the heads (default true)
    # module:function
    options: Optional[Dict[StrictStr, JsonValue]] = None  # extra keyword arguments of the entry point

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True, populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"type": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _keys_of_type(self) -> "AdapterSpec":
        kind = self.type
        if kind not in ADAPTER_TYPES and not ENTRY_POINT.match(kind):
            raise ValueError(f"type: expected hf-encoder, open-clip or a module:function entry point, got {kind!r}")
        own = {"hf-encoder": {"tokenizer", "max_length"},
               "open-clip": {"architecture", "model_config_", "templates", "normalize"}}.get(kind, {"options"})
        foreign = [("model_config" if k == "model_config_" else k) for k in
                   ("tokenizer", "max_length", "architecture", "model_config_", "templates", "normalize", "options")
                   if getattr(self, k) is not None and k not in own]
        if foreign:
            raise ValueError(f"{foreign} do not apply to a {kind} adapter")
        if kind == "open-clip" and (self.architecture is None) == (self.model_config_ is None):
            raise ValueError("an open-clip adapter needs exactly one of 'architecture' (an open_clip model name) "
                             "and 'model_config' (open_clip.CLIP keyword arguments)")
        return self

    @property
    def is_entry_point(self) -> bool:
        return self.type not in ADAPTER_TYPES


class EntrySource(_Strict):
    """A data entry point with options: ``{entry: module:function, options: {...}}``."""

    entry: StrictStr
    options: Optional[Dict[StrictStr, JsonValue]] = None

    @field_validator("entry")
    @classmethod
    def _entry(cls, v: str) -> str:
        if not ENTRY_POINT.match(v):
            raise ValueError(f"expected module:function, got {v!r}")
        return v


#: a data source: a path (.txt, .pt/.pth, .safetensors) or ``module:function``, or an :class:`EntrySource`
DataSource = Union[PathStr, EntrySource]


class EvalSpec(_Strict):
    """``eval:`` of a task: labelled data.  ``labels`` may be left out when ``data`` holds a tensor named
    ``labels`` (a .pt dict / safetensors file) or an entry point returns ``(inputs, labels)``."""

    data: DataSource
    labels: Optional[DataSource] = None


class TaskEntry(_Strict):
    """One task: its fine-tuned checkpoint, unlabeled data, optional labelled data and head settings."""

    model: PathStr
    data: Optional[DataSource] = None
    eval: Optional[EvalSpec] = None
    teacher_logits: Optional[DataSource] = None   # precomputed [n, C] logits instead of the fine-tuned teacher
    num_classes: Optional[PositiveInt] = None     # the head must have exactly this many classes
    # open-clip heads: one of them
    head: Optional[PathStr] = None                # a [C, D] weight file (or the literature's head_<task>.pt)
    classnames: Optional[List[StrictStr]] = None  # zero-shot head from the model's text tower
    templates: Optional[List[StrictStr]] = None   # this task's templates (default: the adapter's)

    @model_validator(mode="before")
    @classmethod
    def _bare_path(cls, data: Any) -> Any:
        return {"model": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _one_head(self) -> "TaskEntry":
        if self.head is not None and self.classnames is not None:
            raise ValueError("give either 'head' (a weight file) or 'classnames' (a zero-shot head), not both")
        return self


TOP_LEVEL_ALIASES = {"method": "merge_method", "base": "base_model", "out": "output", "max_shard_size": "shard_size"}


class _MethodFile(_Strict):
    """The keys every in-memory method's file has (the method, base, output and how it is written)."""

    merge_method: Optional[StrictStr] = None
    base_model: Optional[PathStr] = None
    parameters: Optional[Dict[StrictStr, Any]] = None
    output: Optional[PathStr] = None
    out_dtype: Optional[DType] = None
    dtype: Optional[DType] = None
    shard_size: Optional[Size] = None
    device: Optional[StrictStr] = None
    trust_pickle: Optional[StrictBool] = None
    copy_config: Optional[StrictBool] = None
    metadata: Optional[Dict[StrictStr, JsonValue]] = None

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data: Any) -> Any:
        return _fold_aliases(data, TOP_LEVEL_ALIASES)


class DataMergeConfig(_MethodFile):
    """The whole file of a data-based method.  ``parameters`` is checked by the method's own schema."""

    adapter: Optional[AdapterSpec] = None
    tasks: Optional[Dict[StrictStr, TaskEntry]] = None
    seed: Optional[StrictInt] = None

    @field_validator("tasks")
    @classmethod
    def _some_tasks(cls, v):
        if v is not None and not v:
            raise ValueError("expected at least one task")
        return v


class ModelPath(_Strict):
    """A fine-tuned model of DOGE_TA: a path, or ``{model: path}``."""

    model: PathStr

    @model_validator(mode="before")
    @classmethod
    def _bare_path(cls, data: Any) -> Any:
        return {"model": data} if isinstance(data, str) else data


class DogeMergeConfig(_MethodFile):
    """The whole file of ``merge_method: doge_ta`` (data-free; the models as for the other methods)."""

    models: Optional[List[ModelPath]] = None
    include: Optional[Patterns] = None
    exclude: Optional[Patterns] = None


# ------------------------------------------------------------------------------------------------
# Method parameters
# ------------------------------------------------------------------------------------------------
def _fraction(open_low: bool):
    def check(v: float) -> float:
        if not ((0.0 < v) if open_low else (0.0 <= v)) or v > 1.0:
            raise ValueError(f"expected a number in {'(0' if open_low else '[0'}, 1], got {v}")
        return v
    return check


OpenFraction = Annotated[Number, AfterValidator(_fraction(True))]
Fraction = Annotated[Number, AfterValidator(_fraction(False))]
TaskRef = Union[StrictStr, NonNegInt]
ScheduleSpec = Union[Literal["random"], List[Union[TaskRef, List[TaskRef]]]]


class CalmParameters(_Strict):
    """The keywords of :func:`calm_fast.calm` a file can express (defaults: the function's).

    Not here: ``teacher_logits`` and ``eval_data`` (per task, under ``tasks:``), ``batch_sampler`` and
    ``callback`` (Python callables), ``progress`` (``--no-progress``), ``data_parallel`` (implied by the
    launch: on under ``torchrun`` with more than one rank)."""

    schedule: Optional[ScheduleSpec] = None
    ratio: Optional[OpenFraction] = None
    class_balanced: Optional[StrictBool] = None
    iterations: Optional[NonNegInt] = None
    batch_size: Optional[PositiveInt] = None
    batches_per_task: Optional[PositiveInt] = None
    eta: Optional[Number] = None
    alpha: Optional[Number] = None
    sparsity: Optional[Fraction] = None
    sigmoid_bias: Optional[Number] = None
    ta_scaling: Optional[Number] = None
    faithful: Optional[StrictBool] = None
    batch_reduction: Optional[Literal["sum", "mean"]] = None
    seed: Optional[StrictInt] = None
    eval_every: Optional[NonNegInt] = None
    eval_batch_size: Optional[PositiveInt] = None
    dp_reduction: Optional[Literal["allreduce", "exact"]] = None


class DogeParameters(_Strict):
    """The keywords of :func:`calm_fast.doge_ta` a file can express (``include``/``exclude``/``out_dtype``
    /``device`` are top-level keys and flags, as for the other methods)."""

    eta: Optional[Number] = None
    subspace: Optional[PositiveInt] = None
    density: Optional[OpenFraction] = None
    steps: Optional[NonNegInt] = None
    lr: Optional[Number] = None
    betas: Optional[Tuple[Number, Number]] = None
    eps: Optional[Number] = None
    dtype: Optional[Literal["float32", "float64"]] = None
    subspace_solver: Optional[Literal["svd", "gram"]] = None
    include: Optional[Patterns] = None
    exclude: Optional[Patterns] = None

    @field_validator("betas", mode="before")
    @classmethod
    def _list_to_tuple(cls, v):
        return tuple(v) if isinstance(v, list) else v


def _yaml_type(ann: Any) -> Any:
    """The annotation a YAML value can satisfy (finite numbers for floats), or None if it cannot."""
    if ann is float:
        return Number
    if ann in (bool, int, str):
        return {bool: StrictBool, int: StrictInt, str: StrictStr}[ann]
    origin = typing.get_origin(ann)
    if origin is Literal:
        return ann
    if origin is Union:
        parts = [_yaml_type(a) if a is not type(None) else type(None) for a in typing.get_args(ann)]
        return None if any(p is None for p in parts) else Union[tuple(parts)]
    if origin in (tuple, Tuple):
        parts = [_yaml_type(a) for a in typing.get_args(ann)]
        return None if any(p is None for p in parts) or Ellipsis in typing.get_args(ann) else Tuple[tuple(parts)]
    if origin in (list, List, collections.abc.Sequence):  # a YAML list
        (a,) = typing.get_args(ann) or (None,)
        inner = _yaml_type(a) if a is not None else None
        return None if inner is None else List[inner]
    return None


def schema_from_signature(fn: Callable, skip: Iterable[str] = (), name: Optional[str] = None) -> Type[BaseModel]:
    """A strict schema of the keyword-only parameters of ``fn`` whose annotations a YAML value can
    satisfy (bool, int, float — finite —, str, Literal, Optional/Union, tuples and lists of those);
    the others (callables, tensors, mappings) and ``skip`` are left out.  Every field is optional (the
    function's default applies).  Lists are accepted for tuple fields."""
    hints = typing.get_type_hints(fn, include_extras=True)
    fields: Dict[str, Any] = {}
    tuple_fields = []
    for pname, p in inspect.signature(fn).parameters.items():
        if p.kind is not inspect.Parameter.KEYWORD_ONLY or pname in set(skip):
            continue
        t = _yaml_type(hints.get(pname, Any))
        if t is None:
            continue
        if typing.get_origin(t) in (tuple, Tuple) or any(typing.get_origin(a) in (tuple, Tuple)
                                                        for a in typing.get_args(t)):
            tuple_fields.append(pname)
        fields[pname] = (Optional[t], None)

    def lists_to_tuples(cls, data):
        if isinstance(data, dict):
            return {k: tuple(v) if k in tuple_fields and isinstance(v, list) else v for k, v in data.items()}
        return data

    validators = {"_lists": model_validator(mode="before")(classmethod(lists_to_tuples))}
    return create_model(name or f"{fn.__name__}_parameters", __base__=_Strict, __validators__=validators, **fields)


# ------------------------------------------------------------------------------------------------
# Validation and paths
# ------------------------------------------------------------------------------------------------
def validate(schema: Type[BaseModel], data: Any, where: str) -> BaseModel:
    """``schema.model_validate(data)`` with every problem in one :class:`ConfigError` paragraph."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {_describe(data)}")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{where}: {describe_errors(e, schema)}") from None
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def validate_parameters(schema: Type[BaseModel], params: Mapping[str, Any], prefix: str) -> Dict[str, Any]:
    """The given parameters, checked by ``schema`` (only those given are returned)."""
    try:
        return schema.model_validate(dict(params)).model_dump(exclude_unset=True)
    except ValidationError as e:
        raise ConfigError(describe_errors(e, schema, prefix=prefix)) from None


def resolve(p: Optional[str], folder: str) -> Optional[str]:
    """``p`` made absolute against ``folder`` (``~`` expanded); entry points are left as they are."""
    if p is None or is_entry_point(p, folder):
        return p
    p = os.path.expanduser(p)
    return p if os.path.isabs(p) else os.path.normpath(os.path.join(folder, p))


def _resolve_source(src: Any, folder: str) -> Any:
    return resolve(src, folder) if isinstance(src, str) else src


def resolve_data_paths(cfg: DataMergeConfig, folder: str) -> DataMergeConfig:
    """Every path of the file made absolute against its folder (entry points untouched)."""
    tasks = None
    if cfg.tasks is not None:
        tasks = {}
        for name, t in cfg.tasks.items():
            ev = t.eval
            if ev is not None:
                ev = ev.model_copy(update={"data": _resolve_source(ev.data, folder),
                                           "labels": _resolve_source(ev.labels, folder)})
            tasks[name] = t.model_copy(update={
                "model": resolve(t.model, folder), "data": _resolve_source(t.data, folder), "eval": ev,
                "teacher_logits": _resolve_source(t.teacher_logits, folder), "head": resolve(t.head, folder)})
    adapter = cfg.adapter
    if adapter is not None and adapter.tokenizer is not None:
        adapter = adapter.model_copy(update={"tokenizer": resolve(adapter.tokenizer, folder)})
    return cfg.model_copy(update={"base_model": resolve(cfg.base_model, folder), "output": resolve(cfg.output, folder),
                                  "tasks": tasks, "adapter": adapter})


def resolve_doge_paths(cfg: DogeMergeConfig, folder: str) -> DogeMergeConfig:
    models = None if cfg.models is None else [m.model_copy(update={"model": resolve(m.model, folder)})
                                              for m in cfg.models]
    return cfg.model_copy(update={"base_model": resolve(cfg.base_model, folder), "output": resolve(cfg.output, folder),
                                  "models": models})
