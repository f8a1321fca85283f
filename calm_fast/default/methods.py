"""The rows of the embedded default's table: reference rows and merging methods, as a registry.

Every entry is a :class:`Method` whose ``run(ctx)`` returns, for each task, the encoder tensors and the
head to evaluate with.  The merging methods call calm_fast's public API on the encoder state dicts
(θ0 and the fine-tuned encoders, restricted to the tensors that fine-tuning changed, i.e. the support of
the task vectors; the other tensors are θ0's) and evaluate the one merged encoder with each task's own
head.  Their hyperparameters are fixed in advance: the library defaults (the FusionBench/AdaMerging
settings), never tuned on the test split.  The same seed is used for every method.

Rows, in table order: the references (individual fine-tuned, pretrained + task heads, linear probe,
multi-task training), then task arithmetic, TIES, DARE, consensus/TALL, DOGE_TA (data-free; its key
filter adapted to BERT's names) and, from :mod:`.network_methods`, CALM (unlabeled test inputs, through
the Hugging Face adapter) and AdaMerging (only when ``calm_fast.adamerging`` exists).  Settings that
depend on the time budget (CALM's iterations, DOGE's steps, multi-task training's steps) come from the
profile (``ctx.profile``); each row records the settings it ran with.  A row may read the test
*inputs* (``ctx.test_tokens``) but never the test labels.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

import calm_fast
from calm_fast.methods.doge import ETA_TEXT

from .encoder import Encoder, StateDict, Tokens
from .finetune import Finetuned
from .profiles import Profile
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
    profile: Optional[Profile] = None
    progress: bool = False
    train_tokens: List[Tokens] = field(default_factory=list)  # for the multi-task-training row
    cache_root: Optional[Path] = None  # where trained rows (multi-task training) are cached
    #: shared by the rows of one run (e.g. the Hugging Face adapter that CALM and AdaMerging both use)
    cache: Dict[str, object] = field(default_factory=dict)

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


def _multitask(ctx: Context) -> Result:
    from .multitask import prepare_multitask

    if ctx.profile is None or ctx.cache_root is None or len(ctx.train_tokens) != len(ctx.tasks):
        raise ValueError("the multi-task-training row needs the profile, the training inputs and the cache folder")

    def bar(desc: str, total: int):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, leave=False, disable=not ctx.progress, dynamic_ncols=True)

    enc, heads, record = prepare_multitask(ctx.encoder, ctx.tasks, ctx.train_tokens, ctx.profile, ctx.cache_root, bar)
    info = {"settings": {"steps_per_task": record["steps_per_task"], "steps": record["steps"]},
            **{k: record.get(k) for k in ("trained_now", "train_seconds", "path", "first_losses", "last_losses")}}
    return Result([enc] * len(ctx.tasks), heads, info)


register_method(Method("multitask", "multi-task training", "reference", {}, _multitask,
                       "one encoder fine-tuned on all tasks at once (same layers, same steps and batches per "
                       "task as the individual runs, round-robin), a head per task"))


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
# DOGE_TA (data-free): FusionBench's key filter adapted to BERT's key names
# ------------------------------------------------------------------------------------------------
#: the six weight matrices of a BERT block: attention query/key/value/output, FFN in/out.  FusionBench's
#: filter ("encoder" and "weight" in the key, no "layer_norm") written for CLIP also selects BERT's
#: ``...LayerNorm.weight`` (BERT capitalises it), which are 1-D and not linear layers; it does not select
#: the pooler (no "encoder" in ``pooler.dense.weight``), so the pooler, biases, LayerNorms and embeddings
#: keep θ0 as in DOGE, where only the linear layers of the encoder blocks are merged.
DOGE_BERT_INCLUDE = (r"^encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|"
                     r"intermediate\.dense|output\.dense)\.weight$")


def doge_settings(ctx: Context) -> Dict[str, object]:
    return {"eta": ETA_TEXT, "steps": ctx.profile.doge_steps if ctx.profile else 400,
            "include": DOGE_BERT_INCLUDE}


def _doge(ctx: Context) -> Result:
    settings = doge_settings(ctx)
    keys = ctx.merge_keys  # layers no task changed have τ = 0 (λ undefined): they keep θ0 anyway
    res = calm_fast.doge_ta({k: ctx.base[k] for k in keys}, [{k: f.encoder[k] for k in keys} for f in ctx.finetuned],
                            **settings)
    merged = dict(ctx.base)
    merged.update(res.merged)
    losses = {k: [float(v[0]), float(v[-1])] for k, v in res.losses.items() if v.numel()}
    info = {"settings": settings, "merged_keys": res.keys,
            "loss_first_last_sum": [sum(v[0] for v in losses.values()), sum(v[1] for v in losses.values())]}
    return Result([merged] * len(ctx.finetuned), ctx.heads(), info)


register_method(Method("doge_ta", "DOGE_TA", "merge",
                       {"eta": 0.15, "subspace": 6, "density": 0.3, "lr": 1e-4, "steps": "the profile's",
                        "include": "the 6 weight matrices of each BERT block"}, _doge,
                       "text η 0.15; attention/FFN weight matrices of the fine-tuned blocks (pooler, biases, "
                       "LayerNorms keep θ0, as DOGE does); projected-Adam steps from the profile"))

# ------------------------------------------------------------------------------------------------
# rows that run the network (CALM; AdaMerging when calm_fast has it): .network_methods registers them
# ------------------------------------------------------------------------------------------------
PENDING = {"adamerging": "AdaMerging", "calm": "CALM", "doge_ta": "DOGE_TA"}


def pending_methods() -> List[str]:
    """Labels of the methods planned for this table but not in this version."""
    return [label for name, label in PENDING.items() if name not in METHODS]


def select_methods(names: Optional[List[str]] = None) -> List[Method]:
    if not names:
        return list(METHODS.values())
    planned = [PENDING[n] for n in names if n in PENDING and n not in METHODS]
    if planned:
        raise ValueError(f"method(s) {', '.join(planned)} not available in this version of calm_fast; "
                         f"available: {', '.join(METHODS)}")
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}")
    return [METHODS[n] for n in names]


from . import network_methods  # noqa: E402,F401 - registers CALM (and AdaMerging) after the rows above
