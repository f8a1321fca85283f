"""The rows of the embedded default's table: reference rows and merging methods, as a registry.

Every entry is a :class:`Method` whose ``run(ctx)`` returns, for each task, the encoder tensors and the
head to evaluate with.  The merging methods call calm_fast's public API on the encoder state dicts
(θ0 and the fine-tuned encoders, restricted to the tensors that fine-tuning changed, i.e. the support of
the task vectors; the other tensors are θ0's) and evaluate the one merged encoder with each task's own
head.  Their hyperparameters are fixed in advance: the library defaults (the FusionBench/AdaMerging
settings), never tuned on the test split.  The same seed is used for every method.

Methods that need more than weights (CALM: unlabeled test inputs; AdaMerging: unlabeled test inputs
and entropy minimisation; DOGE) join as one entry each with :func:`register_method`; ``ctx`` gives them
the encoder (:class:`.encoder.Encoder`, whose ``bert`` is a plain ``torch.nn.Module`` for
``calm_fast.models`` adapters), the heads and the tokenized val/test inputs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

import calm_fast

from .encoder import Encoder, StateDict, Tokens
from .finetune import Finetuned
from .tasks import TaskData


@dataclass
class Context:
    """What a method may use.  Labels of val/test are in ``tasks``; a method must not read test labels."""
    encoder: Encoder
    base: StateDict
    finetuned: List[Finetuned]
    probe_heads: List[StateDict]
    tasks: List[TaskData]
    val_tokens: List[Tokens]
    test_tokens: List[Tokens]  # unlabeled test inputs (for test-time methods such as CALM and AdaMerging)
    seed: int
    merge_keys: List[str] = field(default_factory=list)

    def heads(self) -> List[StateDict]:
        return [f.head for f in self.finetuned]


@dataclass
class Result:
    """Per task: the encoder tensors (all of θ0's keys) and the head to evaluate."""
    encoders: List[StateDict]
    heads: List[StateDict]
    info: Dict[str, object] = field(default_factory=dict)


@dataclass
class Method:
    name: str
    label: str
    kind: str  # 'reference' or 'merge'
    params: Dict[str, object]
    run: Callable[[Context], Result]
    note: str = ""


METHODS: Dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add a row (reference or merging method) to the table; rows keep registration order."""
    if method.kind not in ("reference", "merge"):
        raise ValueError(f"method kind must be 'reference' or 'merge', not {method.kind!r}")
    METHODS[method.name] = method
    return method


# ------------------------------------------------------------------------------------------------
# reference rows
# ------------------------------------------------------------------------------------------------
def _finetuned(ctx: Context) -> Result:
    return Result([f.encoder for f in ctx.finetuned], ctx.heads())


def _pretrained(ctx: Context) -> Result:
    return Result([ctx.base] * len(ctx.finetuned), ctx.heads())


def _probe(ctx: Context) -> Result:
    return Result([ctx.base] * len(ctx.finetuned), list(ctx.probe_heads))


register_method(Method("finetuned", "individual fine-tuned", "reference", {}, _finetuned,
                       "each task's own fine-tuned encoder (the upper bound of merging)"))
register_method(Method("pretrained", "pretrained + task heads", "reference", {}, _pretrained,
                       "θ0 with each task's fine-tuned head (zero-shot-like: what merging starts from)"))
register_method(Method("linear_probe", "linear probe", "reference", {}, _probe,
                       "θ0 with a head trained on its frozen features"))


# ------------------------------------------------------------------------------------------------
# data-free merging methods (calm_fast's public API)
# ------------------------------------------------------------------------------------------------
def merge_with(fn: Callable, **params) -> Callable[[Context], Result]:
    """A table row from a calm_fast merging function ``fn(pretrained, finetuned, **params)``."""

    def run(ctx: Context) -> Result:
        keys = ctx.merge_keys
        merged_part = fn({k: ctx.base[k] for k in keys}, [{k: f.encoder[k] for k in keys} for f in ctx.finetuned],
                         **params)
        merged = dict(ctx.base)
        merged.update(merged_part)
        return Result([merged] * len(ctx.finetuned), ctx.heads())

    return run


def _dare(ctx: Context) -> Result:
    return merge_with(calm_fast.dare_merging, **_DARE, seed=ctx.seed)(ctx)  # the run's seed


_TA = {"scaling": 0.3}
_TIES = {"density": 0.2, "merge": "sum", "scaling": 0.3}
_DARE = {"p": 0.5, "scaling": 0.3}
_CONSENSUS = {"tall_lambdas": 0.6, "min_count": 2, "alpha": 0.3}
register_method(Method("task_arithmetic", "task arithmetic", "merge", _TA, merge_with(calm_fast.task_arithmetic, **_TA)))
register_method(Method("ties", "TIES", "merge", _TIES, merge_with(calm_fast.ties_merging, **_TIES)))
register_method(Method("dare", "DARE (+TA)", "merge", {**_DARE, "seed": "the run seed"}, _dare))
register_method(Method("consensus", "consensus / TALL", "merge", _CONSENSUS,
                       merge_with(calm_fast.consensus_merging, **_CONSENSUS)))

# ------------------------------------------------------------------------------------------------
# HOOKS — methods of the other issues, one entry each when they land (not faked here):
#   register_method(Method("adamerging", "AdaMerging", "merge", {...}, run_adamerging))
#   register_method(Method("calm", "CALM", "merge", {...}, run_calm))
#   register_method(Method("doge", "DOGE", "merge", {...}, run_doge))
# where run_x(ctx) builds its model with calm_fast.models (ctx.encoder.bert + ctx.heads()), uses only
# ctx.test_tokens' inputs (never labels) or ctx.val_tokens, and returns Result([merged] * T, ctx.heads()).
# ------------------------------------------------------------------------------------------------
PENDING = {"adamerging": "AdaMerging", "calm": "CALM", "doge": "DOGE"}


def pending_methods() -> List[str]:
    """Labels of the methods planned for this table but not in this version."""
    return [label for name, label in PENDING.items() if name not in METHODS]


def select_methods(names: Optional[List[str]] = None) -> List[Method]:
    if not names:
        return list(METHODS.values())
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}")
    return [METHODS[n] for n in names]
