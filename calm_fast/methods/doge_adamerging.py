"""DOGE with AdaMerging (ALGORITHMS.md §9.2; FusionBench's ``clip_layer_wise_adamerging_doge_ta``).

Two stages, exactly as FusionBench's code computes them (every choice below is that code's):

1. **DOGE corrections, one per task** (data-free).  For every merged key l (a 2-D m × n weight; default
   filter: keys containing "encoder" and "weight" but not "layer_norm") and task t, τ_{t,l} = θ_t − θ0
   (fp32), λ_{t,l} = ``eta`` / ||τ_{t,l}||_F (FusionBench hard-codes 0.07 here whatever the modality; a zero
   layer has no λ and is an error).  Shared subspace as in DOGE_TA but with rank r = floor(min(m, n) / T)
   (not / subspace).  Per-task corrections δ_{t,l} (init 0) minimise
   ``L = Σ_j Σ_a <τ_j[a,:], τ_j[a,:] − M[a,:]>²`` with ``M = Σ_t λ_t τ_t + Σ_t λ_t δ_t``; the gradient of δ_i
   is ``−2 λ_i Σ_j r_j[a] τ_j[a,:]``, projected off the subspace (``G − U(UᵀG)``), and one Adam per layer
   over the T corrections (lr 1e-4, betas (0.9, 0.999), ε 1e-8, 400 steps, bias correction as
   torch.optim.Adam) -- layers are independent.
2. **Trim**: per task one global P1 threshold over all merged keys of the *original* |τ_t| (``density`` 0.3
   kept, ties kept); ``τ'_t = (τ_t + δ_t) ⊙ mask_t`` (masked-out entries are 0, not δ).
3. **Layer-wise AdaMerging** over the merged keys only: ``θ_l = θ0_l + Σ_t w_{t,l} τ'_{t,l}`` (left to right
   over the tasks, as FusionBench adds them), w learned by entropy minimisation (see
   :func:`calm_fast.adamerging`) with FusionBench's AdaMerging settings by default (preset
   ``"fusion_bench"``: init 0.3, no clamp, Adam lr 1e-3, 1000 steps, one batch of 16 per task per step,
   entropy with ``log(p + 1e-8)``).  The DOGE λ is *not* used in the merge.  Every other key keeps θ0.
   Columns of the coefficient table follow the merged keys in sorted order (FusionBench's order).

How it is fast: stage 1 batches all layers of one shape; each Adam iteration is the fused closed-form row
gradient (``ops.doge_row_grad_``, applied to ``D = Σ_i (λ_i/Λ) δ_i`` since ``M = S + Λ D``), the low-rank
projection (two batched GEMMs) and one set of Adam moments.  The T per-task gradients are positive
multiples ``c_i = λ_i / Λ`` of one matrix, so the T Adam states of the reference are ``c_i m`` and
``c_i² v`` of one state (m, v): each δ_i takes the step ``−lr_t · m / (√v̂ + ε / c_i)`` -- the same numbers
in exact arithmetic, with (T + 2) instead of 3T tensors of memory (δ_i stay distinct through ε / c_i, as in
the reference).  Stage 3 is AdaMerging's fused loop on the trimmed vectors τ' (θ0 enters the fused merge
as a pseudo task of weight 1; the coefficient gradient reads τ').
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .. import distributed, ops
from ..models.base import Inputs, ModelAdapter
from ._common import Patterns, StateDict, check_fraction, check_params, prepare
from ._data import task_arguments
from ._parallel import gather_layer_results, layer_owners
from .adamerging import AdaMergingResult, BatchSampler, CoefficientTrainer, MergeGroup, resolve_settings
from .doge import (DOGE_INCLUDE, ETA_VISION, SUBSPACE_SOLVERS, _thresholds, check_doge_keys, row_constants,
                   shared_subspace)

Tensor = torch.Tensor

__all__ = ["doge_adamerging", "DogeAdaMergingResult", "optimise_task_deltas"]


@dataclass
class DogeAdaMergingResult(AdaMergingResult):
    """:class:`AdaMergingResult` plus DOGE's stage-1 outputs.

    delta: key -> the T learned corrections δ_{t,l} ``[T, m, n]`` fp32.
    doge_lambdas: key -> the T coefficients η / ||τ_{t,l}||_F used by the δ objective (not by the merge).
    thresholds: the T top-K trim thresholds (``|τ_t| >= threshold`` is kept).
    doge_losses: key -> float64 tensor [doge_steps], the δ loss before each Adam step.
    """

    delta: Dict[str, Tensor] = field(default_factory=dict)
    doge_lambdas: Dict[str, Tensor] = field(default_factory=dict)
    thresholds: Optional[Tensor] = None
    doge_losses: Dict[str, Tensor] = field(default_factory=dict)
    method: str = "doge_adamerging"

    def _extra_tensors(self) -> Dict[str, Tensor]:
        out = super()._extra_tensors()
        out["doge.thresholds"] = self.thresholds
        for k in self.delta:
            out[f"doge.delta.{k}"] = self.delta[k]
            out[f"doge.lambda.{k}"] = self.doge_lambdas[k]
        return out


def optimise_task_deltas(tau: Tensor, lam: Tensor, U: Tensor, steps: int, lr: float, betas: Tuple[float, float],
                         eps: float) -> Tuple[Tensor, Tensor]:
    """Per-task corrections δ [B, T, m, n] after ``steps`` projected Adam steps for a stack ``tau`` [B, T, m, n]
    of same-shape layers with coefficients ``lam`` [B, T] and subspace bases ``U`` [B, m, r]; and the loss
    before each step ([steps, B], float64).  See the module docstring for the shared-moment form."""
    B, T, m, n = tau.shape
    e, lam_sum = row_constants(tau, lam)
    c = (lam / lam_sum[:, None]).contiguous()          # c_i = λ_i / Λ  [B, T]
    eps_i = (eps / c).to(tau.dtype)                    # per-task ε of the shared-moment Adam
    deltas = torch.zeros(B, T, m, n, dtype=tau.dtype, device=tau.device)
    D = torch.zeros(B, m, n, dtype=tau.dtype, device=tau.device)
    exp_avg, exp_avg_sq, grad = torch.zeros_like(D), torch.zeros_like(D), torch.empty_like(D)
    Ut = U.transpose(1, 2)
    W = torch.empty(B, U.shape[2], n, dtype=tau.dtype, device=tau.device)
    losses = torch.empty(steps, B, dtype=torch.float64, device=tau.device)
    b1, b2 = betas
    for step in range(1, steps + 1):
        if step > 1:  # D = Σ_i c_i δ_i (zero before the first step)
            torch.bmm(c[:, None, :], deltas.view(B, T, m * n), out=D.view(B, 1, m * n))
        losses[step - 1] = ops.doge_row_grad_(grad, tau, D, e, lam_sum)   # G = −2Λ Σ_j r_j τ_j (c_i G is δ_i's)
        if U.shape[2] > 0:
            torch.bmm(Ut, grad, out=W)
            grad.baddbmm_(U, W, alpha=-1.0)
        exp_avg.lerp_(grad, 1 - b1)
        exp_avg_sq.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        neg_step, bc2_sqrt = ops.adam_scalars(step, lr, betas)
        root = exp_avg_sq.sqrt().div_(bc2_sqrt)
        for i in range(T):
            deltas[:, i].addcdiv_(exp_avg, root + eps_i[:, i, None, None], value=neg_step)
    return deltas, losses


def doge_adamerging(pretrained: StateDict, finetuned: Union[Mapping[str, StateDict], Sequence[StateDict]],
                    adapter: ModelAdapter, unlabeled_inputs: Union[Mapping[str, Inputs], Sequence[Inputs]], *,
                    eta: float = ETA_VISION, doge_steps: int = 400, doge_lr: float = 1e-4,
                    doge_betas: Tuple[float, float] = (0.9, 0.999), doge_eps: float = 1e-8, density: float = 0.3,
                    include: Patterns = DOGE_INCLUDE, exclude: Patterns = None, subspace_solver: str = "svd",
                    preset: Optional[str] = "fusion_bench", steps: Optional[int] = None, lr: Optional[float] = None,
                    betas: Optional[Tuple[float, float]] = None, init: Optional[float] = None,
                    clamp: Optional[bool] = None, batch_size: Optional[int] = None,
                    batches_per_task: Optional[int] = None, sampler: Optional[str] = None,
                    entropy_eps: Union[None, float, str] = "preset", seed: int = 0,
                    batch_sampler: Optional[BatchSampler] = None, callback: Optional[Callable[..., Any]] = None,
                    eval_data: Optional[Mapping[str, Any]] = None, eval_every: int = 0, eval_batch_size: int = 256,
                    progress: bool = True, data_parallel: Optional[bool] = None, dp_reduction: str = "allreduce",
                    shard_layers: Optional[bool] = None) -> DogeAdaMergingResult:
    """DOGE + layer-wise AdaMerging (see the module docstring for every step and choice).

    Args:
        pretrained, finetuned, adapter, unlabeled_inputs: as :func:`calm_fast.adamerging`.
        eta: DOGE's global coefficient (λ = eta / ||τ||_F in the δ objective; FusionBench: 0.07).
        doge_steps, doge_lr, doge_betas, doge_eps: the δ optimisation (400, 1e-4, (0.9, 0.999), 1e-8).
        density: fraction of each task vector kept by the trim (0.3).
        include / exclude: the merged keys (default FusionBench's filter); each must be a 2-D floating weight.
        subspace_solver: ``"svd"`` (the reference's) or ``"gram"`` (see :func:`calm_fast.doge_ta`).
        preset, steps, lr, betas, init, clamp, batch_size, batches_per_task, sampler, entropy_eps, seed,
        batch_sampler, callback, eval_data, eval_every, eval_batch_size, progress: the AdaMerging stage, as in
            :func:`calm_fast.adamerging`, default preset ``"fusion_bench"`` (§9.2's settings).
        data_parallel, dp_reduction: the AdaMerging stage on the ranks of an active ``torch.distributed``
            group, as in :func:`calm_fast.adamerging` (default: on when more than one rank is active).
        shard_layers: stage 1's per-layer δ optimisations split across the ranks and gathered exactly, as in
            :func:`calm_fast.doge_ta` (default: when more than one rank is active); bit-identical to one process.

    Returns a :class:`DogeAdaMergingResult`.

    Raises:
        ValueError: a task vector that is exactly zero on a merged key, a merged key that is not 2-D, no key
            matching the filter, missing data for a task, mismatched state dicts, bad settings.
    """
    method = "doge_adamerging"
    t_start = time.perf_counter()
    check_params(method, eta=eta, doge_lr=doge_lr, doge_eps=doge_eps)
    density = check_fraction("density", density, True, method)
    if int(doge_steps) < 0:
        raise ValueError(f"{method}: doge_steps must be >= 0, got {doge_steps}")
    if subspace_solver not in SUBSPACE_SOLVERS:
        raise ValueError(f"{method}: subspace_solver must be one of {SUBSPACE_SOLVERS}, got {subspace_solver!r}")
    if eval_every < 0:
        raise ValueError(f"{method}: eval_every must be >= 0")
    s = resolve_settings(preset, method, steps=steps, lr=lr, betas=betas, init=init, clamp=clamp,
                         batch_size=batch_size, batches_per_task=batches_per_task, sampler=sampler)
    if entropy_eps != "preset":
        s["entropy_eps"] = entropy_eps
    tasks, ft, data, evals = task_arguments(adapter, finetuned, unlabeled_inputs, eval_data, method)

    prep = prepare(pretrained, [ft[t] for t in tasks], include=include, exclude=exclude, method=method)
    check_doge_keys(prep, include, exclude, method)
    T, L = prep.T, prep.L
    run_names = list(adapter.param_names())
    unknown = [k for k in run_names if k not in pretrained or not pretrained[k].is_floating_point()]
    if unknown:
        raise ValueError(f"{method}: the adapter runs tensors {unknown[:5]} that are not floating tensors of the "
                         "pretrained state dict")
    dev = adapter.device

    def tau_of(t: int, l: int) -> Tensor:
        return prep.inputs[t * L + l].to(dev).float() - prep.base[l].to(dev).float()  # fl32(θ_t − θ0)

    # ---- stage 1: λ and the per-task corrections, per shape group ------------------------------------
    t0 = time.perf_counter()
    doge_lambdas: Dict[str, Tensor] = {}
    for l, key in enumerate(prep.keys):
        norms = torch.stack([torch.norm(tau_of(t, l)) for t in range(T)])
        zero = (norms == 0).nonzero().reshape(-1).tolist()
        if zero:
            raise ValueError(f"{method}: the task vector of model {zero[0]} ({tasks[zero[0]]!r}) is exactly zero on "
                             f"{key!r}, so DOGE's λ = eta / ||τ|| is undefined (the reference gives inf/NaN); "
                             "exclude this key")
        if not bool(torch.isfinite(norms).all()):
            raise ValueError(f"{method}: {key!r} holds inf or NaN in a task vector")
        doge_lambdas[key] = eta / norms
    shape_groups: Dict[Tuple[int, int], List[int]] = {}
    for l in range(L):
        shape_groups.setdefault(tuple(prep.inputs[l].shape), []).append(l)
    thresholds = _thresholds(prep, density, torch.float32, tau_of).to(dev)
    trimmed: List[Optional[Tensor]] = [None] * (T * L)   # τ'_{t,l}, task-major
    deltas: Dict[str, Tensor] = {}
    doge_losses: Dict[str, Tensor] = {}
    owner = layer_owners([prep.inputs[l].numel() * T for l in range(L)], shard_layers, method)
    for shape, ls in shape_groups.items():
        if owner is not None:  # this rank's layers; τ' of every layer is built after the gather below
            ls = [l for l in ls if owner[l] == distributed.rank()]
            if not ls:
                continue
        tau = torch.stack([torch.stack([tau_of(t, l) for t in range(T)]) for l in ls]).contiguous()
        lam = torch.stack([doge_lambdas[prep.keys[l]] for l in ls]).float().contiguous()
        U = shared_subspace(tau, T, subspace_solver)     # rank floor(K / T)
        delta, loss = optimise_task_deltas(tau, lam, U, int(doge_steps), float(doge_lr),
                                           (float(doge_betas[0]), float(doge_betas[1])), float(doge_eps))
        del U
        for i, l in enumerate(ls):
            key = prep.keys[l]
            deltas[key] = delta[i].cpu().clone()
            doge_losses[key] = loss[:, i].cpu()
            if owner is not None:
                continue
            for t in range(T):
                x = tau[i, t]
                trimmed[t * L + l] = torch.where(x.abs() >= thresholds[t], x + delta[i, t], torch.zeros_like(x))
        del tau, delta
    if owner is not None:  # δ and loss curve of every layer, exactly, on every rank (the 1-process order)
        order = [l for ls in shape_groups.values() for l in ls]
        deltas, doge_losses = gather_layer_results(owner, prep.keys, deltas, doge_losses,
                                                   [(T,) + tuple(prep.inputs[l].shape) for l in range(L)],
                                                   doge_steps, order, method, dev)
        deltas = {k: v.float().cpu() for k, v in deltas.items()}
        doge_losses = {k: v.cpu() for k, v in doge_losses.items()}
        for l in order:
            key = prep.keys[l]
            d = deltas[key].to(dev)
            for t in range(T):
                x = tau_of(t, l)
                trimmed[t * L + l] = torch.where(x.abs() >= thresholds[t], x + d[t], torch.zeros_like(x))
    theta0 = [prep.base[l].to(dev).float() for l in range(L)]
    t_doge = time.perf_counter() - t0

    # ---- stage 3: layer-wise AdaMerging on τ' ---------------------------------------------------------
    key_set = set(prep.keys)
    run_ls = [l for l, k in enumerate(prep.keys) if k in set(run_names)]
    if not run_ls:
        raise ValueError(f"{method}: the adapter runs none of the merged tensors {list(prep.keys)[:3]}..., so there "
                         "is no coefficient to learn (check `include` / `exclude` against adapter.param_names())")
    groups = []
    if run_ls:
        grad_inputs = [trimmed[t * L + l] for t in range(T) for l in run_ls]
        groups.append(MergeGroup(cols=range(0, len(run_ls)), merge_inputs=[theta0[l] for l in run_ls] + grad_inputs,
                                 merge_base=[], merge_T=T + 1, prepend_base=True, grad_inputs=grad_inputs,
                                 grad_base=[]))
    constant = {k: pretrained[k].to(dev) for k in run_names if k not in key_set}
    trainer = CoefficientTrainer(method=method, adapter=adapter, run_keys=[prep.keys[l] for l in run_ls],
                                 run_cols=run_ls, num_keys=L, groups=groups, constant=constant, data=data,
                                 settings=s, granularity="layer", seed=seed, batch_sampler=batch_sampler,
                                 data_parallel=data_parallel, dp_reduction=dp_reduction)
    out = trainer.run(callback=callback, progress=progress, evals=evals, eval_every=eval_every,
                      eval_batch_size=eval_batch_size)

    # ---- final model ----------------------------------------------------------------------------------
    lam_final = trainer.effective()
    table = torch.cat([torch.ones(1, L, device=dev), lam_final.to(dev)]).contiguous()
    merged_list, _ = ops.weighted_merge(theta0 + [trimmed[i] for i in range(T * L)], None, T + 1, table)
    state: Dict[str, Tensor] = {}
    merged = dict(zip(prep.keys, merged_list))
    for k in prep.order:
        if k in merged:
            state[k] = merged[k].to(pretrained[k].device, pretrained[k].dtype)
        elif k in prep.passthrough:
            state[k] = prep.passthrough[k]
    config = {
        **{k: (list(v) if isinstance(v, tuple) else v) for k, v in s.items()},
        "eta": float(eta), "doge_steps": int(doge_steps), "doge_lr": float(doge_lr), "doge_betas": list(doge_betas),
        "doge_eps": float(doge_eps), "density": float(density), "include": include, "exclude": exclude,
        "subspace_solver": subspace_solver, "subspace_rank": "floor(min(m, n) / T)", "seed": int(seed),
        "batch_sampler": repr(trainer.sampler), "granularity": "layer", "data_parallel": trainer.dp.describe(), "num_tasks": T, "num_keys": L,
        "not_run_keys": [prep.keys[l] for l in range(L) if l not in set(run_ls)],
        "run_at_theta0": sorted(constant), "device": str(dev),
        "choices": {
            "delta": "one correction per task (one Adam per layer over the T corrections, shared-moment form)",
            "projection": "gradient projected off the top floor(K/T) directions of the stacked per-task bases",
            "trim": "P1 global per task on the original |tau| (ties kept); masked entries 0 (not delta)",
            "merge": "theta0 + sum_t w_t * tau'_t left to right; the DOGE lambda is not used in the merge",
            "entropy": ("-sum softmax*log_softmax" if s["entropy_eps"] is None
                        else f"-sum p*log(p + {s['entropy_eps']})"),
            "clamp": "clamp(w, 0, 1)" if s["clamp"] else "none",
        },
    }
    timings = {"doge_s": t_doge, "network_s": out["network_s"], "merge_s": out["merge_s"],
               "total_s": time.perf_counter() - t_start}
    return DogeAdaMergingResult(state_dict=state, lambdas=lam_final.cpu(), raw_lambdas=trainer.raw.detach().cpu().clone(),
                                keys=list(prep.keys), task_names=tasks, loss=out["loss"], entropy=out["entropy"],
                                evaluations=out["evaluations"], config=config, timings=timings, delta=deltas,
                                doge_lambdas={k: v.cpu() for k, v in doge_lambdas.items()},
                                thresholds=thresholds.cpu(), doge_losses=doge_losses)
