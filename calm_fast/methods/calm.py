"""CALM: consensus-aware localized merging, end to end on a real network.

``calm(pretrained, finetuned, adapter, unlabeled_inputs)`` runs the whole method:

1. **Credible sampling** (§8.2, :mod:`.credible`): a teacher labels every unlabeled sample of each task;
   per predicted class the lowest-entropy ``floor(ratio · |I_c|)`` samples are kept with their
   pseudo-labels.  Teacher: by default each task's own fine-tuned model (``θ0 + τ_t`` run through the
   adapter with the task's head); or precomputed logits (``teacher_logits``).
2. **Schedule** (§8.3): groups of tasks.  The first group is merged by task arithmetic
   (``τ^(0) = 0.3 · Σ_t τ_t`` on every floating tensor, summed left to right in group order, then times
   the fp32 constant); every later group holds exactly one task, merged into the running task vector by
   mask optimisation.  Default: all tasks but the last two by TA, then the last two one at a time (the
   official run's shape); ``"random"`` picks the two sequential tasks at random (the paper), seeded.
3. **Mask optimisation** (§8.4-8.7) per later step: ``R`` = ``+bias`` on the strict top
   ``int(sparsity · N)`` of ``|τ_new|``, ``-bias`` elsewhere; each iteration runs the network at
   ``θ(R) = θ0 + τ_prev + σ(R) ⊙ (τ_new − τ_prev)`` on the credible batches of every seen task (two
   batches each, one when the credible set fits one batch), accumulates
   ``A = η Σ_batches ∂L/∂θ ⊙ (τ_new − τ_prev)`` and steps
   ``R ← R − A ⊙ d + α · sgn⁺(R) ⊙ d`` (``d = σ(R)(1 − σ(R))``, ``sgn⁺(0) = −1``), all with the fused
   ops of :mod:`calm_fast.ops` working in place on a flat parameter/gradient buffer.  The step ends with
   ``τ^(s) = τ_new where round(σ(R)) = 1 else τ_prev`` on the masked tensors.  Tensors the adapter does
   not run (not in ``adapter.param_names()``, e.g. a CLIP text tower) are merged as
   ``0.5 · (τ_prev + τ_new)`` (§8.7).  The result is ``θ0 + τ^(last)``.

Modes (recorded in ``CalmResult.config["choices"]``):

* ``faithful=True`` reproduces the official code's arithmetic order (§8.8b): interpolation
  ``θ0 + (1 − s) τ_prev + s τ_new``, gradients zeroed per batch and accumulated batch by batch as
  ``η (−g τ_prev + g τ_new)``, update grouped ``R − (A d − α·where(R > 0, d, −d))``.  Given the same
  batches, the masks (and R, bit for bit, with the same sigmoid) are the official ones.
* default (``faithful=False``): the fused forms — ``θ0 + τ_prev + s Δ``, the gradients of all batches of
  an iteration summed by autograd into the flat buffer and accumulated once (``η (Σ g) Δ``, one pass
  over N instead of one per batch), update ``(R − A d) + reg``.  Same mathematics, different last-bit
  rounding; the binary masks agree on well-separated problems.
* ``batch_reduction="sum"`` (default, both modes) is the official behaviour: ``A`` is the *sum* over the
  batches drawn (its intended averaging divisor never exceeds 1), the setting with which ``η = 1e7`` was
  tuned.  ``"mean"`` divides by the number of batches (the evident intent; a smaller effective step).
* Official quirks not reproduced (named in the metadata): a first group of exactly two tasks is merged
  by TA like any other first group (the official code would run the mask procedure between them); a
  later group with several tasks is an error (the official code silently used its last task); the
  evaluation inside the loop works (the official one raises at its first call, §8.6).

Hooks: ``seed`` (the default batch sampler and the random schedule), ``batch_sampler`` (a callable
``(step, iteration, task, credible_ids) -> list of 1-D int64 tensors of sample ids``), ``callback``
(called after every iteration with the step, the iteration, the live mask logits R and the metrics as
device tensors), ``eval_data`` (labelled data per task: accuracy of the binarised model every
``eval_every`` iterations and of every step's merged model).

Data parallel: under ``torch.distributed`` (``torchrun``) every rank calls :func:`calm` with the same
arguments; each iteration's batches are dealt out across the ranks and the gradients combined by one
all-reduce per iteration (``dp_reduction="allreduce"``, equal to one process to rounding) or by exact
gathers added in the single-process order (``"exact"``, bit-identical); see ``data_parallel`` /
``dp_reduction`` and :mod:`calm_fast.methods._parallel`.

Host/device: when the adapter runs on a GPU nothing is read back during an iteration (the ops return
device tensors; losses and counts stay on the device until the step ends).  The exceptions are opt-in:
the progress bar's postfix (loss, on-count) is read at most once per second while the bar is shown,
evaluation reads one count per task, and a callback may read what it likes.  Batches of inputs are
moved to the device as they are drawn (keep ``unlabeled_inputs`` on the device to avoid it).
"""
from __future__ import annotations

import json
import math
import os
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from .. import calm_ops, ops
from ..models.base import FlatParams, Inputs, ModelAdapter, num_samples, select_batch
from ._common import StateDict, prepare
from ._data import check_eval_data, per_task
from ._parallel import DataParallel, sharded_logits
from .credible import CredibleSet, credible_samples

Tensor = torch.Tensor
Schedule = Union[None, str, Sequence[Sequence[Union[str, int]]]]
BatchSampler = Callable[[int, int, str, Tensor], Sequence[Tensor]]

__all__ = ["calm", "CalmResult", "RandomBatchSampler", "resolve_schedule", "CredibleSet", "credible_samples"]


# ------------------------------------------------------------------------------------------------
# Schedule and batches
# ------------------------------------------------------------------------------------------------
def resolve_schedule(schedule: Schedule, task_names: Sequence[str], seed: int = 0) -> List[List[int]]:
    """The schedule as groups of task indices (see :func:`calm`); raises ``ValueError`` on bad input.

    ``None``: ``[all but the last two], [second to last], [last]`` (two tasks: ``[t0], [t1]``; one task:
    TA only).  ``"random"``: two tasks drawn with ``numpy.random.default_rng(seed)`` are merged one at a
    time (in draw order) after the TA group of the others.  A list of groups: task names or indices;
    every task exactly once; groups after the first hold one task each.
    """
    T = len(task_names)
    if T == 0:
        raise ValueError("calm: the adapter has no tasks")
    if schedule is None:
        if T == 1:
            return [[0]]
        if T == 2:
            return [[0], [1]]
        return [list(range(T - 2)), [T - 2], [T - 1]]
    if isinstance(schedule, str):
        if schedule != "random":
            raise ValueError(f"calm: schedule must be None, 'random' or a list of task groups, got {schedule!r}")
        if T == 1:
            return [[0]]
        picks = [int(i) for i in np.random.default_rng(seed).choice(T, size=min(2, T - 1), replace=False)]
        rest = [i for i in range(T) if i not in picks]
        return [rest] + [[p] for p in picks]
    groups: List[List[int]] = []
    for gi, group in enumerate(schedule):
        if isinstance(group, (str, int)):
            group = [group]
        idx = []
        for t in group:
            if isinstance(t, str):
                if t not in task_names:
                    raise ValueError(f"calm: the schedule names unknown task {t!r}; tasks: {list(task_names)}")
                idx.append(task_names.index(t))
            else:
                if not 0 <= int(t) < T:
                    raise ValueError(f"calm: the schedule names task index {t}, but there are {T} tasks")
                idx.append(int(t))
        if not idx:
            raise ValueError(f"calm: schedule group {gi} is empty")
        if gi > 0 and len(idx) > 1:
            raise ValueError(f"calm: schedule group {gi} has {len(idx)} tasks; every group after the first merges "
                             "exactly one task (the official code silently used the last task of such a group): "
                             "split it into single-task groups")
        groups.append(idx)
    if not groups:
        raise ValueError("calm: the schedule is empty")
    flat = [i for g in groups for i in g]
    dup = sorted({task_names[i] for i in flat if flat.count(i) > 1})
    if dup:
        raise ValueError(f"calm: the schedule lists {dup} more than once")
    missing = [task_names[i] for i in range(T) if i not in flat]
    if missing:
        raise ValueError(f"calm: the schedule leaves out tasks {missing}; list every task of the adapter once")
    return groups


class RandomBatchSampler:
    """The default batch sampler: a fresh shuffle of the credible set per (step, iteration, task), cut into
    batches of ``batch_size``, of which the first ``batches_per_task`` are used (fewer when the set is
    smaller: one batch when it fits in one).  Each shuffle is seeded from ``(seed, step, iteration, task)``,
    so results do not depend on the order of the calls."""

    def __init__(self, seed: int = 0, batch_size: int = 128, batches_per_task: int = 2):
        if batch_size < 1 or batches_per_task < 1:
            raise ValueError("calm: batch_size and batches_per_task must be >= 1")
        self.seed, self.batch_size, self.batches_per_task = int(seed), int(batch_size), int(batches_per_task)

    def __call__(self, step: int, iteration: int, task: str, credible_ids: Tensor) -> List[Tensor]:
        words = [self.seed & 0xFFFFFFFF, self.seed >> 32 & 0xFFFFFFFF, step, iteration, zlib.crc32(task.encode())]
        key = int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0] >> 1)
        perm = torch.randperm(int(credible_ids.numel()), generator=torch.Generator().manual_seed(key))
        n, b = perm.numel(), self.batch_size
        return [credible_ids[perm[i * b:(i + 1) * b]] for i in range(min(self.batches_per_task, math.ceil(n / b)))]


# ------------------------------------------------------------------------------------------------
# Result
# ------------------------------------------------------------------------------------------------
@dataclass
class CalmResult:
    """What :func:`calm` returns.

    Attributes:
        state_dict: the merged model ``θ0 + τ_final`` (pretrained key order and dtypes; non-floating
            entries copied from θ0).
        task_vector: ``τ_final`` in fp32 for every merged floating key.
        masks: per mask-optimisation step, ``{"step", "task", "packed", "numel", "on"}`` — the binary mask
            ``round(σ(R))`` over the masked tensors concatenated in ``mask_names`` order, bit-packed
            (:func:`calm_fast.ops.pack_mask` layout: element i = bit i % 8 of byte i // 8).
        mask_names / mask_shapes: the masked tensors (``adapter.param_names()``) and their shapes.
        credible: per task, its :class:`CredibleSet` (sample ids and pseudo-labels).
        steps: per step, metrics and timings (``loss``/``on``/``flips`` per iteration, evaluations).
        config: every setting, the resolved schedule and the named choices of the mode that ran.
    """

    state_dict: Dict[str, Tensor]
    task_vector: Dict[str, Tensor]
    masks: List[Dict[str, Any]]
    mask_names: List[str]
    mask_shapes: List[List[int]]
    credible: Dict[str, CredibleSet]
    steps: List[Dict[str, Any]]
    config: Dict[str, Any]
    timings: Dict[str, float] = field(default_factory=dict)

    def mask(self, step: int) -> Dict[str, Tensor]:
        """The binary mask of the ``step``-th mask-optimisation step (0-based) as ``{name: bool tensor}``."""
        rec = self.masks[step]
        flat = ops.unpack_mask(rec["packed"], rec["numel"])
        out, a = {}, 0
        for name, shape in zip(self.mask_names, self.mask_shapes):
            n = math.prod(shape)
            out[name] = flat[a:a + n].reshape(shape)
            a += n
        return out

    def record(self) -> Dict[str, Any]:
        """The JSON-serialisable part: configuration, per-step metrics, timings, mask counts, credible sizes."""
        return {
            "method": "calm",
            "config": self.config,
            "steps": self.steps,
            "timings": self.timings,
            "masks": [{k: v for k, v in m.items() if k != "packed"} for m in self.masks],
            "mask_names": self.mask_names,
            "mask_shapes": self.mask_shapes,
            "credible": {t: {"size": len(c), "num_samples": c.num_samples, "num_classes": c.num_classes}
                         for t, c in self.credible.items()},
        }

    def save(self, directory: Union[str, os.PathLike], overwrite: bool = False) -> str:
        """Write ``model.safetensors`` (the merged state dict), ``calm_masks.safetensors`` (packed masks per
        step, credible ids and pseudo-labels per task) and ``calm_record.json`` into ``directory``.

        The three files are staged in a hidden folder beside ``directory`` and published with one rename
        (:class:`calm_fast.io.AtomicOutput`: exclusive lock, no symlink followed, an existing folder
        swapped atomically), so ``directory`` either holds the complete result or is left as it was.
        An existing ``directory`` is an error unless ``overwrite``.  Returns the directory's path.
        """
        from ..io.writer import save_state_dict
        from ..io.publish import AtomicOutput

        with AtomicOutput(directory, overwrite=overwrite, single_file=False) as out:
            model = {k: v.detach() for k, v in self.state_dict.items()}
            save_state_dict(model, "model.safetensors", metadata={"format": "pt", "method": "calm"}, output=out)
            extra = {f"mask.step{i}.{m['task']}": m["packed"].cpu().contiguous() for i, m in enumerate(self.masks)}
            for t, c in self.credible.items():
                extra[f"credible.{t}.ids"] = c.ids.contiguous()
                extra[f"credible.{t}.labels"] = c.labels.contiguous()
            save_state_dict(extra, "calm_masks.safetensors", output=out)
            out.write_bytes("calm_record.json", json.dumps(self.record(), indent=1, default=str).encode())
        return str(out.target)


# ------------------------------------------------------------------------------------------------
# Validation helpers
# ------------------------------------------------------------------------------------------------
def _check_classes(adapter: ModelAdapter, task: str, C: int, where: str) -> None:
    expected = adapter.num_classes(task)
    if expected is not None and int(expected) != int(C):
        raise ValueError(f"calm: task {task!r}: {where} has {C} classes but the adapter's head has {expected}")


# ------------------------------------------------------------------------------------------------
# The method
# ------------------------------------------------------------------------------------------------
def calm(pretrained: StateDict, finetuned: Union[Mapping[str, StateDict], Sequence[StateDict]], adapter: ModelAdapter,
         unlabeled_inputs: Union[Mapping[str, Inputs], Sequence[Inputs], None], *,
         schedule: Schedule = None, ratio: float = 0.9, class_balanced: bool = True,
         teacher_logits: Union[Mapping[str, Tensor], Sequence[Tensor], None] = None,
         iterations: int = 100, batch_size: int = 128, batches_per_task: int = 2, eta: float = 1e7,
         alpha: float = 1.0, sparsity: float = 1e-5, sigmoid_bias: float = 5.0, ta_scaling: float = 0.3,
         faithful: bool = False, batch_reduction: str = "sum", seed: int = 0,
         batch_sampler: Optional[BatchSampler] = None,
         callback: Optional[Callable[..., Any]] = None,
         eval_data: Optional[Mapping[str, Any]] = None, eval_every: int = 10,
         progress: bool = True, eval_batch_size: int = 256, data_parallel: Optional[bool] = None,
         dp_reduction: str = "allreduce") -> CalmResult:
    """Merge fine-tuned models with CALM (see the module docstring for the algorithm and the modes).

    Args:
        pretrained: θ0 state dict.
        finetuned: fine-tuned state dicts, as ``{task: state_dict}`` or a list in ``adapter.task_names`` order.
        adapter: runs the network with merged tensors and a task's head (:class:`calm_fast.models.ModelAdapter`);
            its ``param_names()`` are the masked tensors, its device is where the training runs.
        unlabeled_inputs: per task, the unlabeled samples (a tensor or a mapping of tensors, first
            dimension = samples), as ``{task: inputs}`` or a list in task order.
        schedule: task groups (see :func:`resolve_schedule`): ``None``, ``"random"`` or e.g.
            ``[["a", "b", "c"], ["d"], ["e"]]``.
        ratio: credible fraction per predicted class (the paper: 0.9 vision, 0.8 text).
        class_balanced: per-class selection (official ``standard=0``); False: global lowest entropy.
        teacher_logits: optional precomputed ``[n, C]`` logits per task; default: the task's fine-tuned model.
        iterations, batch_size, batches_per_task, eta, alpha, sparsity, sigmoid_bias, ta_scaling: §8 settings
            (defaults: 100, 128, 2, 1e7, 1, 1e-5, 5, 0.3).
        faithful: the official arithmetic order (§8.8b); default: the fused forms.
        batch_reduction: ``"sum"`` (official) or ``"mean"`` over the batches of an iteration.
        seed: seeds the default batch sampler and the ``"random"`` schedule.
        batch_sampler: ``(step, iteration, task, credible_ids) -> [ids, ...]``, sample ids (indices into the
            task's unlabeled inputs, members of its credible set) of each batch; ``step`` counts the
            mask-optimisation steps from 1.
        callback: ``callback(step=, iteration=, task=, R=, metrics=)`` after every iteration; ``R`` is the live
            list of mask-logit tensors (clone to keep), ``metrics`` maps ``loss`` (mean batch loss), ``on``
            (entries with mask 1) and ``flips`` to 0-d device tensors.
        eval_data: optional ``{task: (inputs, labels)}``; accuracy of the binarised model every
            ``eval_every`` iterations (0: never inside the loop) and of each step's merged model.
        progress: tqdm progress bars (rank 0 only under data parallelism).
        data_parallel: run on the ranks of the active ``torch.distributed`` process group (started e.g. by
            ``torchrun``; every rank calls :func:`calm` with the same arguments).  None (default): on when a
            group with more than one rank is active; False: every rank runs the whole method alone.  Each
            iteration's batches (all seen tasks' batches in the single-process order) are dealt out,
            batch ``j`` to rank ``j % world``; the teacher's credible-sample pass is split by evaluation
            batch and its logits gathered exactly; evaluations split their batches and sum the correct
            counts.  Every rank returns the same result; only the caller decides who writes it (the CLI:
            rank 0).  The batch sampler must be a pure function of its arguments (the default one is).
        dp_reduction: how the ranks' gradients are combined each iteration: ``"allreduce"`` (default: each
            rank sums its batches, then ONE all-reduce of the flat gradient buffer with the loss in a
            trailing slot — the faithful mode reduces the per-batch accumulator instead; equal to the
            1-process run to float rounding of the gradient sum, the binary masks identical unless a
            logit sits within rounding of 0) or ``"exact"`` (per-batch gradients gathered and added in the
            single-process order: bit-identical to the 1-process run, at W gradient buffers of traffic and
            memory per round of W batches).

    Returns:
        :class:`CalmResult`.

    Raises:
        ValueError: missing data for a task, a class count that does not match the adapter's head, a
            schedule naming an unknown task, an empty credible set, bad settings, mismatched state dicts.
    """
    t_start = time.perf_counter()
    tasks = list(adapter.task_names)
    if batch_reduction not in ("sum", "mean"):
        raise ValueError(f"calm: batch_reduction must be 'sum' or 'mean', got {batch_reduction!r}")
    if not (0.0 < float(ratio) <= 1.0):
        raise ValueError(f"calm: ratio must be in (0, 1], got {ratio}")
    if iterations < 0 or eval_every < 0:
        raise ValueError("calm: iterations and eval_every must be >= 0")
    dp = DataParallel("calm", data_parallel, dp_reduction)
    groups = resolve_schedule(schedule, tasks, seed)
    sequential = [g[0] for g in groups[1:]]
    needs_data = [tasks[i] for g in groups for i in g] if sequential else []

    ft = per_task(finetuned, tasks, "finetuned", tasks, "calm")
    data = per_task(unlabeled_inputs, tasks, "unlabeled data", needs_data, "calm")
    given_logits = per_task(teacher_logits, tasks, "teacher_logits", needs_data if teacher_logits is not None else [],
                            "calm")
    evals = per_task(eval_data, tasks, "eval_data", [], "calm")

    prep = prepare(pretrained, [ft[t] for t in tasks], method="calm")
    masked = list(adapter.param_names())
    not_merged = [k for k in masked if k not in prep.keys]
    if not_merged:
        raise ValueError(f"calm: the adapter runs tensors {not_merged[:5]} that are not floating tensors of the "
                         "pretrained state dict")
    masked_set = set(masked)
    frozen = [k for k in prep.order if k in prep.keys and k not in masked_set]
    device = adapter.device

    # Validate the data against the adapter before any work.
    for t in needs_data:
        if num_samples(data[t]) == 0:
            raise ValueError(f"calm: task {t!r} has no unlabeled samples")
        if t in given_logits:
            z = given_logits[t]
            if z.dim() != 2:
                raise ValueError(f"calm: teacher_logits[{t!r}] must be [num_samples, num_classes], got {list(z.shape)}")
            if num_samples(data[t]) != z.shape[0]:
                raise ValueError(f"calm: task {t!r}: {z.shape[0]} teacher logits for {num_samples(data[t])} samples")
            _check_classes(adapter, t, z.shape[1], "teacher_logits")
    check_eval_data(adapter, evals, "calm")

    dp.check_same_run({"tasks": tasks, "schedule": groups, "ratio": ratio, "class_balanced": class_balanced,
                       "iterations": iterations, "batch_size": batch_size, "batches_per_task": batches_per_task,
                       "eta": eta, "alpha": alpha, "sparsity": sparsity, "sigmoid_bias": sigmoid_bias,
                       "ta_scaling": ta_scaling, "faithful": faithful, "batch_reduction": batch_reduction,
                       "seed": seed, "teacher_logits": sorted(given_logits), "reduction": dp_reduction},
                      [(k, tuple(pretrained[k].shape)) for k in masked], [num_samples(data[t]) for t in needs_data])
    base_cpu = [pretrained[k] for k in masked]
    same_dtype = len({x.dtype for x in base_cpu}) <= 1
    base = [x.to(device) if same_dtype else x.to(device, torch.float32) for x in base_cpu]
    fp = FlatParams(masked, [x.shape for x in base], device=device, grad_extra=1)  # slot: the loss sum
    theta_views = [fp.data[a:b].view(sh) for a, b, sh in zip(fp.offsets[:-1], fp.offsets[1:], fp.shapes)]

    def tau_of(t: str, keys: Sequence[str], dev) -> List[Tensor]:
        """τ_t = θ_t − θ0 per tensor (fp32), as the official TaskVector computes it."""
        if dev is None:
            return [ft[t][k].float() - pretrained[k].float() for k in keys]
        return [ft[t][k].to(dev).float() - pretrained[k].to(dev).float() for k in keys]

    # ---- 1. credible sets -------------------------------------------------------------------------
    t0 = time.perf_counter()
    credible: Dict[str, CredibleSet] = {}
    for t in needs_data:
        if t in given_logits:
            z = torch.as_tensor(given_logits[t])
        else:
            fp.copy_([ft[t][k] for k in masked])  # the fine-tuned weights themselves
            z = sharded_logits(dp, adapter, fp.as_dict(), t, data[t], eval_batch_size)
            _check_classes(adapter, t, z.shape[1], "the fine-tuned model's logits")
        credible[t] = credible_samples(z, ratio, class_balanced=class_balanced, task=t)
    t_credible = time.perf_counter() - t0

    # ---- 2. step 0: task arithmetic on every merged tensor ----------------------------------------
    scale = torch.tensor(float(ta_scaling), dtype=torch.float32)
    group0 = [tasks[i] for i in groups[0]]

    def ta_sum(keys: Sequence[str], dev) -> List[Tensor]:
        acc = tau_of(group0[0], keys, dev)
        for t in group0[1:]:
            acc = [a + d for a, d in zip(acc, tau_of(t, keys, dev))]  # left to right, in group order
        return [a * scale for a in acc]  # a 0-d fp32 tensor: the fp32 constant, as the official code

    tau_prev = ta_sum(masked, device)
    frozen_prev = ta_sum(frozen, None) if frozen else []
    steps: List[Dict[str, Any]] = [{"step": 0, "tasks": group0, "kind": "task_arithmetic"}]
    if evals:
        steps[0]["accuracy"] = _evaluate(adapter, masked, [b.float() + p for b, p in zip(base, tau_prev)], evals,
                                         eval_batch_size, dp)

    sampler = batch_sampler if batch_sampler is not None else RandomBatchSampler(seed, batch_size, batches_per_task)
    mode = "faithful" if faithful else "fused"
    masks: List[Dict[str, Any]] = []
    labels_of: Dict[str, Tensor] = {}
    for t, c in credible.items():
        full = torch.full((c.num_samples,), -1, dtype=torch.int64)
        full[c.ids] = c.labels
        labels_of[t] = full

    # ---- 3. one mask-optimisation step per later group --------------------------------------------
    for s, new_idx in enumerate(sequential, start=1):
        t_step = time.perf_counter()
        new_task = tasks[new_idx]
        seen = [tasks[i] for g in groups[:s + 1] for i in g]
        tau_new = tau_of(new_task, masked, device)
        R = calm_ops.init_mask_logits(tau_new, fraction=sparsity, bias=sigmoid_bias)
        with torch.no_grad():
            fp.copy_(ops.calm_interpolate(base, tau_prev, tau_new, R, mode, out_float=True))
        # after the temporary above: lower peak; one trailing slot for the loss (data-parallel faithful mode)
        A_store = torch.zeros(fp.numel + 1, dtype=torch.float32, device=device)
        A_flat = A_store[:fp.numel]
        G_exact = torch.zeros(fp.numel, dtype=torch.float32, device=device) if dp.exact and not faithful else None
        A = [A_flat[a:b].view(sh) for a, b, sh in zip(fp.offsets[:-1], fp.offsets[1:], fp.shapes)]
        losses = torch.zeros(iterations, dtype=torch.float32, device=device)
        counts = torch.zeros(iterations, 2, dtype=torch.int64, device=device)
        evals_in_loop: List[Dict[str, Any]] = []
        t_network = t_update = 0.0
        bar = None
        if progress and dp.rank == 0:
            from tqdm.auto import tqdm
            bar = tqdm(total=iterations, desc=f"CALM step {s}/{len(sequential)} ({new_task})", leave=False)
        last_post = time.monotonic()
        for it in range(iterations):
            ta = time.perf_counter()
            drawn = [(t, _check_batches(sampler(s, it, t, credible[t].ids), labels_of[t], t, s, it)) for t in seen]
            nb = sum(len(b) for _, b in drawn)
            eta_eff = float(eta) / nb if batch_reduction == "mean" else float(eta)
            loss_acc = torch.zeros((), dtype=torch.float32, device=device)
            params = fp.as_dict()
            fp.zero_grad_()
            flat_batches = [(t, ids) for t, batches in drawn for ids in batches]
            if it == 0:  # once per step: every rank must have drawn the same batches (no-op in one process)
                dp.check_batches(flat_batches, f"the batches of step {s}")

            def batch_loss(j: int) -> Tensor:
                t, ids = flat_batches[j]
                x = select_batch(data[t], ids, device)
                y = labels_of[t].index_select(0, ids).to(device, non_blocking=True)
                loss = F.cross_entropy(adapter.logits(params, t, x), y)
                loss.backward()
                return loss.detach()

            if dp.exact:
                def compute(j: int) -> Tensor:
                    fp.zero_grad_()
                    loss = batch_loss(j)
                    return torch.cat([fp.grad, loss.reshape(1)])

                def consume(j: int, vec: Tensor) -> None:
                    nonlocal loss_acc
                    if faithful:  # the single-process order: per batch, accumulate into A
                        fp.grad.copy_(vec[:fp.numel])
                        ops.calm_accumulate_(A, fp.grads, tau_prev, tau_new, eta_eff, faithful=True)
                    else:         # the single-process order: gradients summed batch by batch
                        G_exact.add_(vec[:fp.numel])
                    loss_acc += vec[fp.numel]

                if G_exact is not None:
                    G_exact.zero_()
                dp.exact_rounds(nb, compute, consume, fp.grad)
                if not faithful:
                    fp.grad.copy_(G_exact)
            else:  # one process: every batch; data parallel: this rank's batches, then ONE collective
                for j in range(nb):
                    if not dp.mine(j):
                        continue
                    if faithful:
                        fp.zero_grad_()
                    loss_acc += batch_loss(j)
                    if faithful:  # (data parallel: this rank's part of A; A is zero at the start of an iteration)
                        tc = time.perf_counter()
                        ops.calm_accumulate_(A, fp.grads, tau_prev, tau_new, eta_eff, faithful=True)
                        t_update += time.perf_counter() - tc
                        ta += time.perf_counter() - tc  # not network time
                if dp.active:  # the summed gradients (or, faithful, the accumulator) and the loss sum at once
                    buf = A_store if faithful else fp.grad_and_extra
                    buf[-1] = loss_acc
                    dp.all_reduce_(buf)
                    loss_acc = buf[-1].clone()
                    buf[-1] = 0.0
            tb = time.perf_counter()
            if not faithful:
                ops.calm_accumulate_(A, fp.grads, tau_prev, tau_new, eta_eff, faithful=False)
            stats = ops.calm_mask_step_(R, A, alpha, faithful, theta=theta_views, base=base, tau_prev=tau_prev,
                                        tau_new=tau_new, mode=mode)
            losses[it] = loss_acc / nb
            counts[it] = stats
            t_update += time.perf_counter() - tb
            t_network += tb - ta
            if callback is not None:
                callback(step=s, iteration=it, task=new_task, R=R,
                         metrics={"loss": losses[it], "on": counts[it, 0], "flips": counts[it, 1]})
            if evals and eval_every and (it + 1) % eval_every == 0:
                rounded = ops.calm_interpolate(base, tau_prev, tau_new, R, "round", out_float=True)
                evals_in_loop.append({"iteration": it, "accuracy": _evaluate(adapter, masked, rounded, evals,
                                                                             eval_batch_size, dp)})
                del rounded
            if bar is not None:
                bar.update(1)
                if time.monotonic() - last_post >= 1.0 or it == iterations - 1:
                    bar.set_postfix(loss=f"{float(losses[it]):.4g}", on=int(counts[it, 0]))
                    last_post = time.monotonic()
        if bar is not None:
            bar.close()

        del A, A_flat, A_store, G_exact  # free before the merged task vector is allocated
        tau_next, n_on = ops.calm_binarize_merge(tau_prev, tau_new, R)
        on_flat = torch.cat([(calm_ops.sigmoid(r) > 0.5).reshape(-1) for r in R])
        masks.append({"step": s, "task": new_task, "packed": ops.pack_mask(on_flat).cpu(), "numel": int(on_flat.numel()),
                      "on": int(n_on)})
        del on_flat
        frozen_new = tau_of(new_task, frozen, None) if frozen else []
        frozen_prev = [0.5 * (p + n) for p, n in zip(frozen_prev, frozen_new)]
        tau_prev = tau_next
        del tau_new, R
        step_rec: Dict[str, Any] = {
            "step": s, "task": new_task, "seen": seen, "kind": "mask", "on": int(n_on),
            "loss": losses.cpu().tolist(), "on_count": counts[:, 0].cpu().tolist(),
            "flips": counts[:, 1].cpu().tolist(), "evaluations": evals_in_loop,
        }
        if evals:
            step_rec["accuracy"] = _evaluate(adapter, masked, [b.float() + p for b, p in zip(base, tau_prev)], evals,
                                             eval_batch_size, dp)
        # network_s: forward + backward (+ drawing batches); mask_update_s: accumulate + mask step.  Host
        # clock: on a GPU these are mostly launch times (step_s includes the step's final synchronisation).
        step_rec["timings"] = {"step_s": time.perf_counter() - t_step, "network_s": t_network,
                               "mask_update_s": t_update}
        steps.append(step_rec)

    # ---- 4. result ---------------------------------------------------------------------------------
    task_vector: Dict[str, Tensor] = {}
    for k, p in zip(masked, tau_prev):
        task_vector[k] = p.to(pretrained[k].device)
    for k, p in zip(frozen, frozen_prev):
        task_vector[k] = p.to(pretrained[k].device)
    state: Dict[str, Tensor] = {}
    for k in prep.order:
        x = pretrained[k]
        if k in task_vector:
            state[k] = (x.float() + task_vector[k]).to(x.dtype)
        elif k in prep.passthrough:
            state[k] = x
    if evals:
        with torch.no_grad():
            final_acc = _evaluate(adapter, masked, [b.float() + p for b, p in zip(base, tau_prev)], evals,
                                  eval_batch_size, dp)
    else:
        final_acc = None
    config = {
        "schedule": [[tasks[i] for i in g] for g in groups], "ratio": float(ratio), "class_balanced": bool(class_balanced),
        "teacher": "teacher_logits" if teacher_logits is not None else "finetuned",
        "iterations": int(iterations), "batch_size": int(batch_size), "batches_per_task": int(batches_per_task),
        "eta": float(eta), "alpha": float(alpha), "sparsity": float(sparsity), "sigmoid_bias": float(sigmoid_bias),
        "ta_scaling": float(ta_scaling), "faithful": bool(faithful), "batch_reduction": batch_reduction,
        "seed": int(seed), "batch_sampler": "default" if batch_sampler is None else repr(batch_sampler),
        "eval_every": int(eval_every), "num_masked": fp.numel, "masked_tensors": len(masked),
        "frozen_tensors": frozen, "device": str(device), "data_parallel": dp.describe(),
        "choices": _choices(faithful, batch_reduction),
    }
    if final_acc is not None:
        config_final = {"accuracy": final_acc}
    else:
        config_final = {}
    timings = {"credible_s": t_credible, "total_s": time.perf_counter() - t_start}
    steps.append({"final": True, **config_final})
    return CalmResult(state_dict=state, task_vector=task_vector, masks=masks, mask_names=masked,
                      mask_shapes=[list(s) for s in fp.shapes], credible=credible, steps=steps, config=config,
                      timings=timings)


def _choices(faithful: bool, batch_reduction: str) -> Dict[str, str]:
    """The named semantic choices of a run (recorded in the result's metadata)."""
    return {
        "mode": "faithful (official arithmetic order, §8.8b)" if faithful else "fused",
        "interpolation": "theta0 + (1-s)*tau_prev + s*tau_new" if faithful else "theta0 + tau_prev + s*(tau_new-tau_prev)",
        "accumulation": ("per batch: A += eta*(-g*tau_prev + g*tau_new), grads zeroed per batch" if faithful else
                         "grads of all batches summed by autograd, then A += eta*g*(tau_new-tau_prev) once"),
        "update": "R - (A*d - alpha*where(R>0,d,-d))" if faithful else "(R - A*d) + alpha*where(R>0,1,-1)*d",
        "batch_reduction": ("sum over batches (official)" if batch_reduction == "sum" else
                            "mean over batches (eta divided by the number of batches)"),
        "credible_ties": "entropy ties broken by sample index (stable sort)",
        "credible_overflow": "rows whose literal softmax overflows are max-subtracted",
        "first_group": "task arithmetic for any size (official: mask step between two tasks when size 2)",
        "later_groups": "one task each (official silently used the last task of a larger group)",
        "evaluation": "binarised model theta0 + round-mask interpolation (the official call raises)",
    }


def _check_batches(batches: Sequence[Tensor], labels: Tensor, task: str, step: int, it: int) -> List[Tensor]:
    """Batches from a sampler as CPU int64 id tensors, each non-empty and inside the credible set."""
    out = []
    for b in batches:
        ids = torch.as_tensor(b).reshape(-1).to("cpu", torch.int64)
        if ids.numel() == 0:
            raise ValueError(f"calm: the batch sampler returned an empty batch (step {step}, iteration {it}, "
                             f"task {task!r})")
        if int(ids.min()) < 0 or int(ids.max()) >= labels.numel() or bool((labels.index_select(0, ids) < 0).any()):
            raise ValueError(f"calm: the batch sampler returned sample ids outside task {task!r}'s credible set "
                             f"(step {step}, iteration {it})")
        out.append(ids)
    if not out:
        raise ValueError(f"calm: the batch sampler returned no batch (step {step}, iteration {it}, task {task!r})")
    return out


def _evaluate(adapter: ModelAdapter, names: Sequence[str], values: Sequence[Tensor], evals: Mapping[str, Any],
              batch_size: int, dp: DataParallel) -> Dict[str, float]:
    """Top-1 accuracy per task with the given merged tensors, and their mean (batches split across the
    data-parallel ranks, counts summed)."""
    params = dict(zip(names, values))
    acc = {t: dp.accuracy(adapter, params, t, pair[0], torch.as_tensor(pair[1]), batch_size)
           for t, pair in evals.items()}
    if acc:
        acc["mean"] = sum(acc.values()) / len(acc)
    return acc
