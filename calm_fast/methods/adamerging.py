"""AdaMerging (ALGORITHMS.md §6): merging coefficients learned by entropy minimisation on unlabeled data.

``adamerging(pretrained, finetuned, adapter, unlabeled_inputs)`` learns the coefficients λ of

    θ_l(λ) = θ0_l + Σ_t λ_{t,l} τ_{t,l},        τ_t = θ_t − θ0 (fp32),

* ``granularity="layer"`` (default): one λ per (task, merged tensor) -- a "layer" is one state-dict entry,
  as in the official layer-wise code (which zips one coefficient with every tensor of the state dict) and
  in FusionBench (one per trainable parameter tensor);
* ``granularity="task"``: one λ per task, shared by every tensor.

Objective: for each task, the Shannon entropy of the softmax of its head's logits, averaged over a batch
of the task's unlabeled inputs, summed over the batches drawn for the task and over the tasks (the official
code sums the losses and runs one backward; FusionBench runs one backward per task -- the same gradient).
Each step draws new batches, computes the gradient of the objective with respect to λ and takes one Adam
step (lr 1e-3, betas (0.9, 0.999), no weight decay).  With ``clamp=True`` the network runs with
``clamp(λ, 0, 1)`` and the gradient is zero where λ is outside [0, 1] (torch.clamp's rule: the bounds
themselves pass the gradient).

Presets (:data:`PRESETS`; every setting can still be overridden one by one):

=================  ==========================================  ==============================================
setting            ``"official"`` (EnnengYang/AdaMerging)       ``"fusion_bench"`` (``adamerging/clip.yaml``)
=================  ==========================================  ==============================================
init               0.3                                          0.3
clamp              [0, 1]                                       none
steps              500                                          1000
batches per step   2 batches of 16 per task, from a fresh       1 batch of 16 per task, consecutive batches of
                   shuffle every step                           a shuffled pass over the data (reshuffled at
                                                                each new pass, the last batch of a pass
                                                                smaller): ``sampler="cycle"``
entropy            −Σ softmax · log_softmax (exact)             −Σ p · log(p + 1e-8)
=================  ==========================================  ==============================================

``mode="adamerging_pp"`` is AdaMerging++: each τ_t is replaced by its TIES "selected entries" before the
coefficients are learned (the official ``ties_merging_split``, K = 20 %, ``dis-sum``): per task the entries
with ``|τ_t| >=`` the task's global P1 threshold over all merged tensors (``density``, default 0.2), then
only those agreeing with the elected sign ``γ = sign(Σ_t trimmed τ_t)`` (an element whose trimmed values
cancel exactly takes the global majority sign of all elected signs).  The selection is kept as bit-packed
masks (1 bit per element and task) applied inside the fused ops; no trimmed copy is stored.

Which tensors are merged: every floating key of the pretrained state dict selected by ``include`` /
``exclude`` (default: all; non-floating entries are copied from θ0, unselected floating keys keep θ0).
Merged keys the adapter does not run (a CLIP text tower left in the state dict) get a zero gradient: in
layer-wise mode their λ stays at ``init`` (as in the official logs), in task-wise mode they share the learned
λ_t.  Keys the adapter runs but that are not selected are run at θ0.

How it is fast (the semantics above are the reference's, ``calm_fast.reference.adamerging_reference``):

* the merged weights are rebuilt every step by one fused ``weighted_merge`` call over all run tensors
  with the [T, L] coefficient table (τ computed on the fly from θ_t and θ0, never stored), and copied
  into the adapter's flat parameter buffer (:class:`calm_fast.models.FlatParams`) by one
  ``torch._foreach_copy_`` (``weighted_merge`` has no ``out=``);
* the backward passes of all batches accumulate into one flat gradient buffer;
* the coefficient gradient ∂L/∂λ_{t,l} = <∂L/∂θ_l, τ_{t,l}> of every (task, tensor) pair is one fused
  ``coef_grad`` pass (no autograd graph through the merge, no Python loop over tensors);
* Adam on the small λ tensor.  On a GPU nothing is read back to the host during a step (losses stay on
  the device; the progress bar's postfix reads one number at most once per second).  Keep the unlabeled
  inputs on the adapter's device: batches are then gathered there without a host sync (inputs on the CPU
  are copied over batch by batch, a synchronous copy).

Data parallel: under ``torch.distributed`` (``torchrun``) every rank calls with the same arguments; each
step's batches are dealt out across the ranks and the flat gradient buffer (with the per-task loss sums)
is all-reduced once per step (``dp_reduction="allreduce"``), or the per-batch gradients are gathered and
added in the single-process order (``"exact"``: bit-identical to one process).

Rounding: the merge computes ``θ0 + Σ_t λ_t τ_t`` (the sum over tasks first) where the official code adds
``θ0 + λ_1 τ_1 + λ_2 τ_2 + ...`` left to right; the gradient is a dot product in a different order than
autograd's.  Results agree to rounding (see tests/test_adamerging.py for the measured tolerance).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .. import ops, selection
from ..models.base import FlatParams, Inputs, ModelAdapter, num_samples, select_batch
from ._common import Patterns, Prepared, StateDict, check_fraction, check_nonfinite, check_params, prepare
from ._data import task_arguments
from ._parallel import DataParallel
from .calm import RandomBatchSampler

Tensor = torch.Tensor
BatchSampler = Callable[[int, str, int], Sequence[Tensor]]

__all__ = ["adamerging", "AdaMergingResult", "PRESETS", "ShuffledBatchSampler", "CyclingBatchSampler",
           "entropy_loss", "ties_selection_masks"]

#: Named default settings: the official code's and FusionBench's (see the module docstring).
PRESETS: Dict[str, Dict[str, Any]] = {
    "official": dict(steps=500, lr=1e-3, betas=(0.9, 0.999), init=0.3, clamp=True, batch_size=16,
                     batches_per_task=2, sampler="reshuffle", entropy_eps=None),
    "fusion_bench": dict(steps=1000, lr=1e-3, betas=(0.9, 0.999), init=0.3, clamp=False, batch_size=16,
                         batches_per_task=1, sampler="cycle", entropy_eps=1e-8),
}
MODES = ("adamerging", "adamerging_pp")
GRANULARITIES = ("layer", "task")
SAMPLERS = ("reshuffle", "cycle")


# ------------------------------------------------------------------------------------------------
# Objective and batches
# ------------------------------------------------------------------------------------------------
def entropy_loss(logits: Tensor, eps: Optional[float] = None) -> Tensor:
    """Mean over the batch of the softmax entropy of ``logits`` [batch, classes], in fp32.

    ``eps=None``: ``−Σ softmax(z) · log_softmax(z)`` (the official code, exact); a number:
    ``−Σ p · log(p + eps)`` (FusionBench, eps = 1e-8)."""
    z = logits.float()
    if z.dim() != 2:
        raise ValueError(f"adamerging: logits must be [batch, classes], got shape {list(z.shape)}")
    if eps is None:
        return -(z.softmax(1) * z.log_softmax(1)).sum(1).mean(0)
    p = z.softmax(-1)
    return -(p * torch.log(p + eps)).sum(-1).mean()


class ShuffledBatchSampler:
    """The official code's batches: every step, a fresh shuffle of the task's samples cut into batches of
    ``batch_size``, of which the first ``batches_per_task`` are used (fewer when the data is smaller).
    Each shuffle is seeded from ``(seed, step, task)`` (calm's :class:`RandomBatchSampler`), so the batches
    do not depend on the order of the calls."""

    def __init__(self, seed: int = 0, batch_size: int = 16, batches_per_task: int = 2):
        self._inner = RandomBatchSampler(seed, batch_size, batches_per_task)
        self.seed, self.batch_size, self.batches_per_task = int(seed), int(batch_size), int(batches_per_task)

    def __call__(self, step: int, task: str, n: int) -> List[Tensor]:
        return self._inner(0, step, task, torch.arange(n))

    def __repr__(self) -> str:
        return f"ShuffledBatchSampler(seed={self.seed}, batch_size={self.batch_size}, " \
               f"batches_per_task={self.batches_per_task})"


class CyclingBatchSampler:
    """FusionBench's batches: consecutive batches of ``batch_size`` through a shuffled pass over the task's
    samples (the last batch of a pass holds the remainder), a new shuffle for every pass -- an endless
    shuffled data loader; ``batches_per_task`` consecutive batches per step.  Pass ``p`` of a task is
    shuffled with a seed from ``(seed, pass, task)``: a pure function of (step, task)."""

    def __init__(self, seed: int = 0, batch_size: int = 16, batches_per_task: int = 1):
        if batch_size < 1 or batches_per_task < 1:
            raise ValueError("adamerging: batch_size and batches_per_task must be >= 1")
        self._shuffle = RandomBatchSampler(seed, batch_size, 1 << 30)
        self.seed, self.batch_size, self.batches_per_task = int(seed), int(batch_size), int(batches_per_task)

    def __call__(self, step: int, task: str, n: int) -> List[Tensor]:
        per_pass = math.ceil(n / self.batch_size)
        out = []
        for j in range(self.batches_per_task):
            index = step * self.batches_per_task + j
            batches = self._shuffle(1, index // per_pass, task, torch.arange(n))
            out.append(batches[index % per_pass])
        return out

    def __repr__(self) -> str:
        return f"CyclingBatchSampler(seed={self.seed}, batch_size={self.batch_size}, " \
               f"batches_per_task={self.batches_per_task})"


def gather_batch(inputs: Inputs, ids: Tensor, device: torch.device) -> Inputs:
    """Rows ``ids`` (CPU int64) of a task's inputs, on ``device``.  Inputs that already live on ``device`` are
    gathered there with the ids sent asynchronously (no host sync); inputs elsewhere are gathered where they
    are and copied over (a synchronous copy on a GPU: keep the data on the adapter's device to avoid it)."""
    first = inputs if isinstance(inputs, Tensor) else next(iter(inputs.values()))
    if first.device == torch.device(device) and first.device.type != "cpu":
        ids = ids.to(device, non_blocking=True)
    return select_batch(inputs, ids, device)


def _check_batches(batches: Sequence[Tensor], n: int, task: str, step: int, method: str) -> List[Tensor]:
    """Batches from a sampler as CPU int64 id tensors, each non-empty and inside [0, n)."""
    out = []
    for b in batches:
        ids = torch.as_tensor(b).reshape(-1).to("cpu", torch.int64)
        if ids.numel() == 0:
            raise ValueError(f"{method}: the batch sampler returned an empty batch (step {step}, task {task!r})")
        if int(ids.min()) < 0 or int(ids.max()) >= n:
            raise ValueError(f"{method}: the batch sampler returned sample ids outside [0, {n}) for task {task!r} "
                             f"(step {step})")
        out.append(ids)
    if not out:
        raise ValueError(f"{method}: the batch sampler returned no batch (step {step}, task {task!r})")
    return out


# ------------------------------------------------------------------------------------------------
# AdaMerging++: the TIES selection as bit-packed masks
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def ties_selection_masks(prep: Prepared, density: float) -> Tuple[Tensor, List[Tensor]]:
    """The official ``ties_merging_split`` selection of every task vector, as masks.

    Returns (thresholds [T] fp32, T*L bit-packed uint8 masks in ``prep``'s task-major layout, on the inputs'
    devices): mask_{t,l} = (|τ| >= thr_t) and τ agrees with the elected sign γ = sign(Σ_t trimmed τ_t)
    (``γ > 0``: τ > 0, else τ < 0; γ = 0 where trimmed values cancel exactly takes the global majority sign
    μ = sign(Σ γ); a still-zero γ keeps the negative entries, the reference's ``else`` branch).  The
    thresholds are P1 (``(n − floor(density·n))``-th smallest |τ_t| over all merged tensors, ties kept).
    Setup cost: two passes over the task vectors, one tensor at a time (no T·N temporary)."""
    T, L = prep.T, prep.L
    if density >= 1.0:
        thr = torch.zeros(T)
    else:
        k = selection.topk_fraction_to_k(prep.numel(), density)
        thr = selection.kth_smallest_abs(prep.inputs, prep.base, T, [k] * T, groups=prep.groups).float().cpu()

    def trimmed(l: int) -> List[Tensor]:
        out = []
        for t in range(T):
            x = prep.inputs[t * L + l]
            tau = x.float() - prep.base[l].float()
            out.append(torch.where(tau.abs() >= float(thr[t]), tau, torch.zeros_like(tau)))
        return out

    signs: List[Tensor] = []
    total = 0
    for l in range(L):
        v = trimmed(l)
        s = v[0].clone()
        for x in v[1:]:
            s += x
        g = torch.sign(s).to(torch.int8)
        total += int(g.sum(dtype=torch.int64))
        signs.append(g)
    mu = (total > 0) - (total < 0)
    masks: List[Optional[Tensor]] = [None] * (T * L)
    for l in range(L):
        g = signs[l]
        if mu != 0:
            g = torch.where(g == 0, torch.full_like(g, mu), g)
        v = trimmed(l)
        for t in range(T):
            keep = torch.where(g > 0, v[t] > 0, v[t] < 0)
            masks[t * L + l] = ops.pack_mask(keep).to(prep.inputs[t * L + l].device)
        signs[l] = None  # free as we go
    return thr, masks  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------
# Result
# ------------------------------------------------------------------------------------------------
@dataclass
class AdaMergingResult:
    """What :func:`adamerging` (and :func:`calm_fast.doge_adamerging`) returns.

    Attributes:
        state_dict: the merged model (the pretrained key order and dtypes; non-floating and unmerged keys are
            θ0's tensors).
        lambdas: the learned coefficients actually used, ``[T, L]`` fp32 with columns in ``keys`` order
            (clamped when ``clamp``; in task-wise mode every column is the same).
        raw_lambdas: the optimised parameter before clamping (``[T, L]`` layer-wise, ``[T]`` task-wise).
        keys: the merged tensors (columns of ``lambdas``).
        task_names: the tasks (rows of ``lambdas``).
        loss: per step, the objective (sum over tasks and batches of the batch-mean entropy) at the step's
            coefficients, before the update.
        entropy: per step and task, the mean batch entropy of the task ``[steps, T]``.
        evaluations: accuracies on ``eval_data`` (``{"step": s, "accuracy": {...}}``; step 0 = initial
            coefficients, ``steps`` = final).
        config: every setting and the named semantic choices.
        timings: seconds (``total_s``, ``setup_s``, ``network_s``: forward/backward and batch drawing,
            ``merge_s``: merge + coefficient gradient + Adam; host clock, so on a GPU mostly launch time).
    """

    state_dict: Dict[str, Tensor]
    lambdas: Tensor
    raw_lambdas: Tensor
    keys: List[str]
    task_names: List[str]
    loss: List[float]
    entropy: List[List[float]]
    evaluations: List[Dict[str, Any]]
    config: Dict[str, Any]
    timings: Dict[str, float] = field(default_factory=dict)
    method: str = "adamerging"

    def lambda_dict(self) -> Dict[str, Tensor]:
        """``{key: [T] coefficients}``."""
        return {k: self.lambdas[:, i] for i, k in enumerate(self.keys)}

    def record(self) -> Dict[str, Any]:
        """The JSON-serialisable part (settings, coefficients, curves, evaluations, timings)."""
        return {"method": self.method, "config": self.config, "keys": self.keys, "task_names": self.task_names,
                "lambdas": self.lambdas.tolist(), "loss": self.loss, "entropy": self.entropy,
                "evaluations": self.evaluations, "timings": self.timings}

    def _extra_tensors(self) -> Dict[str, Tensor]:
        return {"lambdas": self.lambdas.contiguous(), "raw_lambdas": self.raw_lambdas.contiguous()}

    def save(self, directory: Union[str, os.PathLike], overwrite: bool = False) -> str:
        """Write ``model.safetensors`` (the merged state dict), ``<method>_lambdas.safetensors`` (the
        coefficient tables, plus DOGE's δ and λ for ``doge_adamerging``) and ``<method>_record.json`` into
        ``directory``, staged and published with one rename (:class:`calm_fast.io.AtomicOutput`), so the
        folder holds the complete result or is left as it was.  An existing ``directory`` is an error
        unless ``overwrite``.  Returns the directory's path."""
        from ..io.writer import save_state_dict
        from ..io.publish import AtomicOutput

        with AtomicOutput(directory, overwrite=overwrite, single_file=False) as out:
            model = {k: v.detach() for k, v in self.state_dict.items()}
            save_state_dict(model, "model.safetensors", metadata={"format": "pt", "method": self.method}, output=out)
            extra = {k: v.detach().cpu().contiguous() for k, v in self._extra_tensors().items()}
            save_state_dict(extra, f"{self.method}_lambdas.safetensors", output=out)
            out.write_bytes(f"{self.method}_record.json", json.dumps(self.record(), indent=1, default=str).encode())
        return str(out.target)


# ------------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------------
def resolve_settings(preset: Optional[str], method: str, **given) -> Dict[str, Any]:
    """The preset's settings overridden by every argument that is not None; validated."""
    if preset is None:
        preset = "official"
    if preset not in PRESETS:
        raise ValueError(f"{method}: preset must be one of {sorted(PRESETS)}, got {preset!r}")
    s = dict(PRESETS[preset])
    s.update({k: v for k, v in given.items() if v is not None})
    s["preset"] = preset
    if int(s["steps"]) < 0:
        raise ValueError(f"{method}: steps must be >= 0, got {s['steps']}")
    if int(s["batch_size"]) < 1 or int(s["batches_per_task"]) < 1:
        raise ValueError(f"{method}: batch_size and batches_per_task must be >= 1")
    if s["sampler"] not in SAMPLERS:
        raise ValueError(f"{method}: sampler must be one of {SAMPLERS}, got {s['sampler']!r}")
    if not float(s["lr"]) > 0:
        raise ValueError(f"{method}: lr must be > 0, got {s['lr']}")
    b1, b2 = (float(x) for x in s["betas"])
    if not (0 <= b1 < 1 and 0 <= b2 < 1):
        raise ValueError(f"{method}: betas must be in [0, 1), got {s['betas']}")
    s["betas"] = (b1, b2)
    check_params(method, init=s["init"], lr=s["lr"],
                 entropy_eps=s["entropy_eps"] if s["entropy_eps"] is not None else 0.0)
    return s


# ------------------------------------------------------------------------------------------------
# The training loop shared by adamerging and doge_adamerging
# ------------------------------------------------------------------------------------------------
@dataclass
class MergeGroup:
    """One fused merge/gradient call per step: run tensors ``cols`` (a contiguous range of the flat buffer's
    tensors, one dtype).

    ``merge_inputs``/``merge_base``/``merge_T`` go to ``weighted_merge`` (``prepend_base``: the first ``len(cols)``
    inputs are θ0 as a pseudo task of weight 1 and the rest task vectors, for inputs that are task vectors);
    ``grad_inputs``/``grad_base``/``masks`` go to ``coef_grad``."""

    cols: range
    merge_inputs: List[Tensor]
    merge_base: List[Tensor]
    merge_T: int
    prepend_base: bool
    grad_inputs: List[Tensor]
    grad_base: List[Tensor]
    masks: Optional[List[Tensor]] = None


class CoefficientTrainer:
    """AdaMerging's loop: λ (``[T, L]`` layer-wise over all merged keys, or ``[T]``) trained by Adam on the
    entropy of the adapter's heads, the run tensors merged into a :class:`FlatParams` buffer each step.

    Data parallel (``data_parallel``/``dp_reduction``, see :func:`adamerging`): the step's batches (every
    task's, in task order) are dealt out, batch ``j`` to rank ``j % world``; the flat gradient buffer and the
    per-task loss sums (its ``T`` trailing slots) are summed by one all-reduce per step (``"allreduce"``),
    or the per-batch gradients are gathered and added in the single-process order (``"exact"``); then every
    rank computes the same coefficient gradient and Adam step."""

    def __init__(self, *, method: str, adapter: ModelAdapter, run_keys: Sequence[str], run_cols: Sequence[int],
                 num_keys: int, groups: Sequence[MergeGroup], constant: Mapping[str, Tensor],
                 data: Mapping[str, Inputs], settings: Mapping[str, Any], granularity: str, seed: int,
                 batch_sampler: Optional[BatchSampler], data_parallel: Optional[bool] = None,
                 dp_reduction: str = "allreduce"):
        self.method = method
        self.dp = DataParallel(method, data_parallel, dp_reduction)
        self.adapter = adapter
        self.tasks = list(adapter.task_names)
        self.T = len(self.tasks)
        self.device = adapter.device
        self.s = settings
        self.granularity = granularity
        self.groups = list(groups)
        self.fp = FlatParams(list(run_keys), _shapes(self.groups), device=self.device, grad_extra=self.T)
        self.params = {**constant, **self.fp.as_dict()}   # built once: the same tensor objects every step
        self.run_cols = torch.as_tensor(list(run_cols), dtype=torch.int64, device=self.device)
        self.num_keys = int(num_keys)
        self.data = data
        if batch_sampler is None:
            cls = ShuffledBatchSampler if settings["sampler"] == "reshuffle" else CyclingBatchSampler
            batch_sampler = cls(seed, int(settings["batch_size"]), int(settings["batches_per_task"]))
        self.sampler = batch_sampler
        self.dp.check_same_run({**settings, "method": method, "granularity": granularity, "seed": seed,
                                "tasks": self.tasks, "run_cols": list(run_cols), "num_keys": self.num_keys,
                                "reduction": dp_reduction},
                               list(zip(self.fp.names, self.fp.shapes)), [num_samples(data[t]) for t in self.tasks
                                                                         if t in data])
        shape = (self.T, self.num_keys) if granularity == "layer" else (self.T,)
        self.raw = torch.full(shape, float(settings["init"]), dtype=torch.float32, device=self.device)
        self.raw.requires_grad_(True)
        self.opt = torch.optim.Adam([self.raw], lr=float(settings["lr"]), betas=settings["betas"], eps=1e-8,
                                    weight_decay=0.0)
        self._ones = {id(g): torch.ones(1, len(g.cols), dtype=torch.float32, device=self.device)
                      for g in self.groups if g.prepend_base}

    # -- coefficients ------------------------------------------------------------------------------
    def effective(self) -> Tensor:
        """λ as the network sees it (clamped when asked), ``[T, L]`` over all merged keys (no graph)."""
        with torch.no_grad():
            lam = self.raw.clamp(0.0, 1.0) if self.s["clamp"] else self.raw.detach()
            if self.granularity == "task":
                lam = lam[:, None].expand(self.T, self.num_keys)
            return lam.contiguous()

    def _run_table(self) -> Tensor:
        """``[T, L_run]`` coefficients of the run tensors, in flat-buffer order."""
        with torch.no_grad():
            lam = self.raw.clamp(0.0, 1.0) if self.s["clamp"] else self.raw.detach()
            if self.granularity == "task":
                return lam[:, None].expand(self.T, len(self.fp)).contiguous()
            return lam.index_select(1, self.run_cols)

    # -- one merge into the flat buffer --------------------------------------------------------------
    @torch.no_grad()
    def merge_into_buffer(self, table: Tensor) -> None:
        outs: List[Tensor] = []
        for g in self.groups:
            w = table[:, g.cols.start:g.cols.stop]
            if g.prepend_base:
                w = torch.cat([self._ones[id(g)], w])
            # the raw op: the wrapper's int() of the non-finite count would sync the device every step
            # (the inputs were checked once at setup)
            o, _ = ops._ops().weighted_merge(g.merge_inputs, g.merge_base, g.merge_T, w.contiguous(), 1.0, None,
                                             False, g.masks or [], 0.0, None, True, True)
            outs.extend(o)
        # one C++ call copies every output into its view of the flat buffer (weighted_merge has no out=)
        torch._foreach_copy_(self.fp.tensors, outs)

    def coefficient_grad(self) -> Tensor:
        """``[T, L_run]`` ∂L/∂λ from the flat gradient buffer (one fused pass per group)."""
        parts = []
        for g in self.groups:
            grads = self.fp.grads[g.cols.start:g.cols.stop]
            parts.append(ops.coef_grad(grads, g.grad_inputs, g.grad_base or None, self.T, masks=g.masks))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    # -- the loop ----------------------------------------------------------------------------------
    def run(self, *, callback=None, progress: bool = False, evals=None, eval_every: int = 0,
            eval_batch_size: int = 256) -> Dict[str, Any]:
        steps = int(self.s["steps"])
        T, dev, eps = self.T, self.device, self.s["entropy_eps"]
        losses = torch.zeros(steps, dtype=torch.float32, device=dev)
        ent = torch.zeros(steps, T, dtype=torch.float32, device=dev)
        evaluations: List[Dict[str, Any]] = []
        t_network = t_merge = 0.0
        if evals:
            evaluations.append({"step": 0, "accuracy": self.evaluate(evals, eval_batch_size)})
        bar = None
        if progress and self.dp.rank == 0:
            from tqdm.auto import tqdm
            bar = tqdm(total=steps, desc=self.method, leave=False)
        last_post = time.monotonic()
        sizes = {t: num_samples(self.data[t]) for t in self.tasks}
        for step in range(steps):
            ta = time.perf_counter()
            self.merge_into_buffer(self._run_table())
            tb = time.perf_counter()
            self.fp.zero_grad_()
            total = torch.zeros((), dtype=torch.float32, device=dev)
            for ti, (acc, n_batches) in enumerate(self._network_step(step, sizes, eps)):
                ent[step, ti] = acc / n_batches
                total += acc
            losses[step] = total
            tc = time.perf_counter()
            grad = self.coefficient_grad()
            with torch.no_grad():
                if self.granularity == "task":
                    g = grad.sum(1)
                else:
                    g = torch.zeros(T, self.num_keys, dtype=torch.float32, device=dev)
                    g.index_copy_(1, self.run_cols, grad)
                if self.s["clamp"]:  # torch.clamp's backward: the gradient passes on [0, 1], bounds included
                    g = g * ((self.raw >= 0.0) & (self.raw <= 1.0))
            self.raw.grad = g
            self.opt.step()
            self.raw.grad = None
            td = time.perf_counter()
            t_merge += (tb - ta) + (td - tc)
            t_network += tc - tb
            if callback is not None:
                callback(step=step, lambdas=self.raw, metrics={"loss": losses[step], "entropy": ent[step]})
            if evals and eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
                evaluations.append({"step": step + 1, "accuracy": self.evaluate(evals, eval_batch_size)})
            if bar is not None:
                bar.update(1)
                if time.monotonic() - last_post >= 1.0 or step == steps - 1:
                    bar.set_postfix(entropy=f"{float(losses[step]):.4g}")
                    last_post = time.monotonic()
        if bar is not None:
            bar.close()
        if evals:
            evaluations.append({"step": steps, "accuracy": self.evaluate(evals, eval_batch_size)})
        return {"loss": losses.cpu().tolist(), "entropy": ent.cpu().tolist(), "evaluations": evaluations,
                "network_s": t_network, "merge_s": t_merge}

    def _network_step(self, step: int, sizes: Mapping[str, int], eps) -> List[Tuple[Tensor, int]]:
        """Forward/backward of the step's batches (data parallel: this rank's share, then the combination
        across ranks): afterwards ``fp.grad`` holds the gradient summed over every batch; returns per task
        (sum of its batch losses, number of its batches)."""
        dev, N, dp = self.device, self.fp.numel, self.dp
        flat: List[Tuple[int, str, Tensor]] = []
        counts: List[int] = []
        for ti, t in enumerate(self.tasks):
            batches = _check_batches(self.sampler(step, t, sizes[t]), sizes[t], t, step, self.method)
            flat.extend((ti, t, ids) for ids in batches)
            counts.append(len(batches))
        if step == 0:  # every rank must have drawn the same batches
            dp.check_batches(flat, "the batches of step 0")
        accs = [torch.zeros((), dtype=torch.float32, device=dev) for _ in self.tasks]

        def batch_loss(j: int) -> Tensor:
            _, t, ids = flat[j]
            x = gather_batch(self.data[t], ids, dev)
            loss = entropy_loss(self.adapter.logits(self.params, t, x), eps)
            loss.backward()
            return loss.detach()

        if dp.exact:
            total_grad = torch.zeros(N, dtype=torch.float32, device=dev)

            def compute(j: int) -> Tensor:
                self.fp.zero_grad_()
                loss = batch_loss(j)
                return torch.cat([self.fp.grad, loss.reshape(1)])

            def consume(j: int, vec: Tensor) -> None:  # the single-process order of the sums
                total_grad.add_(vec[:N])
                accs[flat[j][0]] += vec[N]

            dp.exact_rounds(len(flat), compute, consume, self.fp.grad)
            self.fp.grad.copy_(total_grad)
        else:  # one process: every batch; data parallel: this rank's batches, then ONE collective
            for j in range(len(flat)):
                if dp.mine(j):
                    accs[flat[j][0]] += batch_loss(j)
            if dp.active:  # gradients and per-task loss sums at once
                extra = self.fp.grad_extra
                extra.copy_(torch.stack(accs))
                dp.all_reduce_(self.fp.grad_and_extra)
                accs = [extra[ti].clone() for ti in range(self.T)]
                extra.zero_()
        return list(zip(accs, counts))

    @torch.no_grad()
    def evaluate(self, evals: Mapping[str, Any], batch_size: int) -> Dict[str, float]:
        """Top-1 accuracy per task (and the mean) with the current coefficients."""
        self.merge_into_buffer(self._run_table())
        acc = {t: self.dp.accuracy(self.adapter, self.params, t, pair[0], torch.as_tensor(pair[1]), batch_size)
               for t, pair in evals.items()}
        if acc:
            acc["mean"] = sum(acc.values()) / len(acc)
        return acc


def _shapes(groups: Sequence[MergeGroup]) -> List[Tuple[int, ...]]:
    """Shapes of the run tensors in flat-buffer order (from the gradient inputs of task 0)."""
    out = []
    for g in groups:
        out.extend(tuple(x.shape) for x in g.grad_inputs[:len(g.cols)])
    return out


# ------------------------------------------------------------------------------------------------
# The method
# ------------------------------------------------------------------------------------------------
def adamerging(pretrained: StateDict, finetuned: Union[Mapping[str, StateDict], Sequence[StateDict]],
               adapter: ModelAdapter, unlabeled_inputs: Union[Mapping[str, Inputs], Sequence[Inputs]], *,
               preset: Optional[str] = "official", mode: str = "adamerging", granularity: str = "layer",
               steps: Optional[int] = None, lr: Optional[float] = None, betas: Optional[Tuple[float, float]] = None,
               init: Optional[float] = None, clamp: Optional[bool] = None, batch_size: Optional[int] = None,
               batches_per_task: Optional[int] = None, sampler: Optional[str] = None,
               entropy_eps: Union[None, float, str] = "preset", density: float = 0.2,
               include: Patterns = None, exclude: Patterns = None, seed: int = 0,
               batch_sampler: Optional[BatchSampler] = None, callback: Optional[Callable[..., Any]] = None,
               eval_data: Optional[Mapping[str, Any]] = None, eval_every: int = 0, eval_batch_size: int = 256,
               progress: bool = True, nonfinite: str = "error", data_parallel: Optional[bool] = None,
               dp_reduction: str = "allreduce") -> AdaMergingResult:
    """Merge fine-tuned models with AdaMerging (or AdaMerging++): see the module docstring for the method,
    the presets and how it is fast.

    Args:
        pretrained: θ0 state dict.
        finetuned: fine-tuned state dicts, ``{task: state_dict}`` or a list in ``adapter.task_names`` order.
        adapter: runs the network with merged tensors and a task's head (:class:`calm_fast.models.ModelAdapter`);
            the training runs on its device.
        unlabeled_inputs: per task, the unlabeled samples (a tensor or a mapping of tensors, first dimension =
            samples), ``{task: inputs}`` or a list in task order.  Every task needs data.
        preset: ``"official"`` (default) or ``"fusion_bench"``: the defaults of the settings below.
        mode: ``"adamerging"`` or ``"adamerging_pp"`` (TIES-selected task vectors, ``density`` kept per task).
        granularity: ``"layer"`` (one λ per task and tensor) or ``"task"`` (one λ per task).
        steps, lr, betas, init, clamp, batch_size, batches_per_task, sampler, entropy_eps: override the
            preset (``sampler``: ``"reshuffle"`` or ``"cycle"``; ``entropy_eps``: None for the exact entropy,
            a number for ``log(p + eps)``).
        include / exclude: regexes selecting the merged keys (default: every floating key).
        seed: seeds the default batch sampler.
        batch_sampler: ``(step, task, num_samples) -> [ids, ...]``: the sample ids of each batch of a task at a
            step (0-based), replacing the preset's sampler.
        callback: ``callback(step=, lambdas=, metrics=)`` after every step; ``lambdas`` is the live raw
            parameter (clone to keep), ``metrics`` maps ``loss`` and ``entropy`` (per task) to device tensors.
        eval_data: optional ``{task: (inputs, labels)}``: accuracy at the start, every ``eval_every`` steps
            (0: never) and at the end.
        progress: a tqdm progress bar.
        nonfinite: ``"error"`` (default) or ``"propagate"`` for inf/NaN task-vector values.
        data_parallel: run on the ranks of the active ``torch.distributed`` process group (e.g. started by
            ``torchrun``; every rank calls with the same arguments).  None (default): on when a group with
            more than one rank is active; False: every rank runs alone.  Each step's batches (every task's, in
            task order) are dealt out, batch ``j`` to rank ``j % world``; evaluations split their batches the
            same way and sum the correct counts; every rank returns the same result (the CLI writes it from
            rank 0).  The batch sampler must be a pure function of its arguments (the default ones are).
        dp_reduction: ``"allreduce"`` (default: one all-reduce per step of the flat gradient buffer with the
            per-task loss sums in trailing slots; equal to the 1-process run to float rounding of the
            gradient sum) or ``"exact"`` (per-batch gradients gathered exactly and added in the
            single-process order: bit-identical to the 1-process run, at W gradient buffers of traffic per
            round of W batches).

    Returns:
        :class:`AdaMergingResult`.

    Raises:
        ValueError: missing data for a task, mismatched state dicts (names, shapes, dtypes), an adapter
            running a tensor that is not a floating key of θ0, bad settings.
    """
    method = "adamerging"
    t_start = time.perf_counter()
    if mode not in MODES:
        raise ValueError(f"{method}: mode must be one of {MODES}, got {mode!r}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"{method}: granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if eval_every < 0:
        raise ValueError(f"{method}: eval_every must be >= 0")
    given = dict(steps=steps, lr=lr, betas=betas, init=init, clamp=clamp, batch_size=batch_size,
                 batches_per_task=batches_per_task, sampler=sampler)
    s = resolve_settings(preset, method, **given)
    if entropy_eps != "preset":
        s["entropy_eps"] = entropy_eps
        check_params(method, entropy_eps=entropy_eps if entropy_eps is not None else 0.0)
    if mode == "adamerging_pp":
        density = check_fraction("density", density, True, method)
    tasks, ft, data, evals = task_arguments(adapter, finetuned, unlabeled_inputs, eval_data, method)

    prep = prepare(pretrained, [ft[t] for t in tasks], include=include, exclude=exclude, method=method)
    if prep.L == 0:
        raise ValueError(f"{method}: no floating key to merge (include={include!r}, exclude={exclude!r})")
    T, L = prep.T, prep.L
    # Columns of the λ table: the merged keys in the pretrained state dict's order (the official layer index).
    key_set = set(prep.keys)
    keys = [k for k in prep.order if k in key_set]
    col_of = {k: i for i, k in enumerate(keys)}
    run_names = list(adapter.param_names())
    unknown = [k for k in run_names if k not in pretrained or not pretrained[k].is_floating_point()]
    if unknown:
        raise ValueError(f"{method}: the adapter runs tensors {unknown[:5]} that are not floating tensors of the "
                         "pretrained state dict")
    device = adapter.device

    # Non-finite task-vector values and the AdaMerging++ selection (setup, once).
    t0 = time.perf_counter()
    for g in prep.groups:
        _, bad = ops.weighted_merge(prep.group_inputs(g), prep.group_base(g), T, 0.0, out_float=True)
        check_nonfinite(bad, prep, g, nonfinite, method)
    masks = None
    thresholds = None
    if mode == "adamerging_pp":
        thresholds, masks = ties_selection_masks(prep, density)

    # Run tensors: merged ones in the flat buffer (grouped by dtype), the others fixed at θ0.
    merged_run = [k for k in run_names if k in key_set]
    groups: List[MergeGroup] = []
    run_keys: List[str] = []
    for g in prep.groups:
        ls = [l for l in g if prep.keys[l] in set(merged_run)]
        ls.sort(key=lambda l: col_of[prep.keys[l]])
        if not ls:
            continue
        a = len(run_keys)
        run_keys.extend(prep.keys[l] for l in ls)
        inputs = [prep.inputs[t * L + l].to(device) for t in range(T) for l in ls]
        base = [prep.base[l].to(device) for l in ls]
        gm = [masks[t * L + l].to(device) for t in range(T) for l in ls] if masks is not None else None
        groups.append(MergeGroup(cols=range(a, len(run_keys)), merge_inputs=inputs, merge_base=base, merge_T=T,
                                 prepend_base=False, grad_inputs=inputs, grad_base=base, masks=gm))
    if not run_keys:
        raise ValueError(f"{method}: the adapter runs none of the merged tensors (include={include!r}, "
                         f"exclude={exclude!r}), so there is no coefficient to learn")
    constant = {k: pretrained[k].to(device) for k in run_names if k not in key_set}
    trainer = CoefficientTrainer(method=method, adapter=adapter, run_keys=run_keys,
                                 run_cols=[col_of[k] for k in run_keys], num_keys=len(keys), groups=groups,
                                 constant=constant, data=data, settings=s, granularity=granularity, seed=seed,
                                 batch_sampler=batch_sampler, data_parallel=data_parallel,
                                 dp_reduction=dp_reduction)
    t_setup = time.perf_counter() - t0
    out = trainer.run(callback=callback, progress=progress, evals=evals, eval_every=eval_every,
                      eval_batch_size=eval_batch_size)

    # Final model: every merged key with the final coefficients, one fused pass per dtype group.
    lam = trainer.effective().cpu()
    table = lam[:, [col_of[k] for k in prep.keys]]  # prep (sorted) order
    merged: Dict[str, Tensor] = {}
    for g in prep.groups:
        dev = prep.inputs[g[0]].device
        gm = [masks[t * L + l].to(dev) for t in range(T) for l in g] if masks is not None else None
        o, _ = ops.weighted_merge(prep.group_inputs(g), prep.group_base(g), T, table[:, g].contiguous().to(dev),
                                  masks=gm)
        merged.update({prep.keys[l]: x for l, x in zip(g, o)})
    state = {k: merged[k] if k in merged else prep.passthrough[k] for k in prep.order
             if k in merged or k in prep.passthrough}
    config = {
        **{k: (list(v) if isinstance(v, tuple) else v) for k, v in s.items()},
        "mode": mode, "granularity": granularity, "density": float(density) if mode == "adamerging_pp" else None,
        "seed": int(seed), "batch_sampler": repr(trainer.sampler), "num_tasks": T, "num_keys": len(keys),
        "run_keys": len(run_keys), "not_run_keys": [k for k in keys if k not in set(run_keys)],
        "run_at_theta0": sorted(constant), "device": str(device), "data_parallel": trainer.dp.describe(),
        "ties_thresholds": thresholds.tolist() if thresholds is not None else None,
        "choices": _choices(s, mode, granularity),
    }
    timings = {"setup_s": t_setup, "network_s": out["network_s"], "merge_s": out["merge_s"],
               "total_s": time.perf_counter() - t_start}
    return AdaMergingResult(state_dict=state, lambdas=lam, raw_lambdas=trainer.raw.detach().cpu().clone(), keys=keys,
                            task_names=tasks, loss=out["loss"], entropy=out["entropy"],
                            evaluations=out["evaluations"], config=config, timings=timings)


def _choices(s: Mapping[str, Any], mode: str, granularity: str) -> Dict[str, str]:
    """The named semantic choices of a run (recorded in the result's config)."""
    out = {
        "layer": ("one coefficient per task and state-dict tensor (official layer-wise)" if granularity == "layer"
                  else "one coefficient per task, shared by every tensor"),
        "objective": "sum over tasks and batches of the batch-mean softmax entropy",
        "entropy": ("-sum softmax*log_softmax (official)" if s["entropy_eps"] is None
                    else f"-sum p*log(p + {s['entropy_eps']}) (FusionBench)"),
        "clamp": "network runs with clamp(lambda, 0, 1), gradient zero outside [0, 1]" if s["clamp"] else "none",
        "batches": ("fresh shuffle per step, first batches" if s["sampler"] == "reshuffle"
                    else "consecutive batches of an endless shuffled loader"),
        "merge_order": "theta0 + sum_t lambda_t tau_t (sum over tasks first)",
        "not_run_keys": "zero gradient: layer-wise lambda stays at init, task-wise shares lambda_t",
    }
    if mode == "adamerging_pp":
        out["ties"] = ("P1 global trim per task over all merged keys, then entries agreeing with the elected sign "
                       "(zero elections: global majority sign), no aggregation")
    return out
