"""DOGE_TA, data-free: task-aware layer coefficients, a learned shared correction δ
optimised by projected Adam, a top-K trim of the original task vectors, and the merge.

How it is fast (the semantics are the reference's): layers of one shape are stacked and optimised
together, and each Adam iteration is three fused steps per shape instead of ~50 small autograd kernels
per layer:

1. ``ops.doge_row_grad_``: the closed-form gradient ``G = -2Λ Σ_j r_j τ_j[a, :]`` with
   ``r_j[a] = e_j[a] - Λ <τ_j[a, :], δ[a, :]>`` (``e_j`` precomputed once, in fp64), and the loss;
2. the projection off the shared subspace in low-rank form ``G - U (Uᵀ G)`` (two batched GEMMs; the
   m × m projector of the reference is never formed);
3. ``ops.doge_adam_``: torch.optim.Adam's step (lr, betas, ε and bias correction as torch computes them).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from .. import distributed, ops, selection
from ._common import Patterns, StateDict, check_fraction, prepare
from ._parallel import gather_layer_results, layer_owners

Tensor = torch.Tensor

#: FusionBench's key filter (§0.3) as one regex: keys containing "encoder" and "weight", not "layer_norm".
DOGE_INCLUDE = r"^(?=.*encoder)(?=.*weight)(?!.*layer_norm)"
#: The paper's global coefficient η for vision and for language models.
ETA_VISION = 0.07
ETA_TEXT = 0.15


@dataclass
class DogeResult:
    """What :func:`doge_ta` computed.

    merged: the merged state dict (every key of the pretrained one; unfiltered keys are θ0).
    delta: key -> the learned correction δ (``dtype``, the tensor's shape).
    lambdas: key -> the T coefficients λ_{t,l} = η / ||τ_{t,l}||_F (``dtype``).
    thresholds: the T top-K trim thresholds (``|τ_t| >= threshold`` is kept).
    losses: key -> float64 tensor [steps], the loss before each Adam step.
    keys: the merged (filtered) keys, sorted.
    """

    merged: Dict[str, Tensor]
    delta: Dict[str, Tensor]
    lambdas: Dict[str, Tensor]
    thresholds: Tensor
    losses: Dict[str, Tensor] = field(default_factory=dict)
    keys: List[str] = field(default_factory=list)

    def lambda_table(self) -> Tensor:
        """The λ table as a [T, L] tensor, columns in ``keys`` order."""
        return torch.stack([self.lambdas[k] for k in self.keys], dim=1)

    @property
    def state_dict(self) -> Dict[str, Tensor]:
        """The merged state dict (``merged``), under the name the other methods' results use."""
        return self.merged

    def save(self, directory: Union[str, os.PathLike], overwrite: bool = False) -> str:
        """Write ``model.safetensors`` (the merged state dict), ``doge_ta_delta.safetensors`` (δ per key, the
        [T, L] λ table and the T thresholds) and ``doge_ta_record.json`` (keys, λ table, thresholds, first
        and last loss per key) into ``directory``, staged and published with one rename
        (:class:`calm_fast.io.AtomicOutput`): the folder holds the complete result or is left as it was.
        An existing ``directory`` is an error unless ``overwrite``.  Returns its path."""
        from ..io.writer import save_state_dict
        from ..io.publish import AtomicOutput

        extra = {f"delta.{k}": self.delta[k].detach().cpu().contiguous() for k in self.keys}
        extra["lambdas"] = self.lambda_table().detach().cpu().contiguous()
        extra["thresholds"] = self.thresholds.detach().cpu().contiguous()
        record = {"method": "doge_ta", "keys": self.keys, "lambdas": self.lambda_table().tolist(),
                  "thresholds": self.thresholds.tolist(),
                  "loss_first_last": {k: [float(v[0]), float(v[-1])] for k, v in self.losses.items() if v.numel()}}
        with AtomicOutput(directory, overwrite=overwrite, single_file=False) as out:
            save_state_dict({k: v.detach() for k, v in self.merged.items()}, "model.safetensors",
                            metadata={"format": "pt", "method": "doge_ta"}, output=out)
            save_state_dict(extra, "doge_ta_delta.safetensors", output=out)
            out.write_bytes("doge_ta_record.json", json.dumps(record, indent=1).encode())
        return str(out.target)


SUBSPACE_SOLVERS = ("svd", "gram")


def _top_left_vectors(x: Tensor, k: int, solver: str) -> Tensor:
    """The first k left singular vectors of each matrix of a stack x [N, m, n] (k <= min(m, n)).

    "svd": torch.linalg.svd (the reference's computation).  "gram": eigh of the min(m, n)-sized Gram matrix
    (x xᵀ when m <= n, else xᵀ x and U = x V / σ): ~2.5x faster per ViT-B/32 block on a CPU, but its error on a singular
    vector grows like eps·σ1²/gap instead of eps·σ1/gap."""
    if solver == "svd":
        return torch.linalg.svd(x, full_matrices=False)[0][..., :k]
    m, n = x.shape[-2:]
    if m <= n:
        _, vecs = torch.linalg.eigh(x @ x.transpose(-1, -2))
        return vecs.flip(-1)[..., :k]
    vals, vecs = torch.linalg.eigh(x.transpose(-1, -2) @ x)
    V = vecs.flip(-1)[..., :k]
    sigma = vals.flip(-1)[..., :k].clamp_min(0).sqrt()
    return (x @ V) / sigma.clamp_min(torch.finfo(x.dtype).tiny)[..., None, :]


def shared_subspace(tau: Tensor, subspace: int, solver: str = "svd") -> Tensor:
    """U_r [B, m, r] for a stack ``tau`` [B, T, m, n] of same-shape layers (§9.1 step B): per task the first
    k = floor(K / T) left singular vectors (K = min(m, n)) side by side in an m × K matrix (the remaining
    K - T k columns zero), then the first r = floor(K / subspace) left singular vectors of that matrix.
    Thin SVDs by torch.linalg in tau's dtype (``solver="svd"``), or Gram-matrix eigh (``"gram"``)."""
    if solver not in SUBSPACE_SOLVERS:
        raise ValueError(f"doge_ta: subspace_solver must be one of {SUBSPACE_SOLVERS}, got {solver!r}")
    B, T, m, n = tau.shape
    K = min(m, n)
    k = K // T
    r = K // subspace
    stacked = torch.zeros(B, m, K, dtype=tau.dtype, device=tau.device)
    if k > 0:
        U = _top_left_vectors(tau.reshape(B * T, m, n), k, solver)
        stacked[:, :, :T * k] = U.reshape(B, T, m, k).permute(0, 2, 1, 3).reshape(B, m, T * k)
        del U
    if r == 0:
        return torch.zeros(B, m, 0, dtype=tau.dtype, device=tau.device)
    return _top_left_vectors(stacked, r, solver).contiguous()


def row_constants(tau: Tensor, lam: Tensor) -> Tuple[Tensor, Tensor]:
    """(e [B, T, m], Λ [B]) of a stack: Λ = Σ_t λ_t, S = Σ_t λ_t τ_t, e_j[a] = <τ_j[a,:], τ_j[a,:] - S[a,:]>.
    Computed in fp64 one layer at a time and rounded once to tau's dtype."""
    B, T, m, n = tau.shape
    e = torch.empty(B, T, m, dtype=tau.dtype, device=tau.device)
    for b in range(B):
        t64 = tau[b].double()
        S = torch.einsum("t,tmn->mn", lam[b].double(), t64)
        e[b] = (t64 * (t64 - S)).sum(-1).to(tau.dtype)
    return e, lam.sum(1).contiguous()


def optimise_delta(tau: Tensor, lam: Tensor, U: Tensor, steps: int, lr: float, betas: Tuple[float, float],
                   eps: float) -> Tuple[Tensor, Tensor]:
    """δ [B, m, n] after ``steps`` projected Adam steps for a stack of same-shape layers; and the loss
    before each step ([steps, B], float64)."""
    B, T, m, n = tau.shape
    e, lam_sum = row_constants(tau, lam)
    delta = torch.zeros(B, m, n, dtype=tau.dtype, device=tau.device)
    exp_avg, exp_avg_sq, grad = torch.zeros_like(delta), torch.zeros_like(delta), torch.empty_like(delta)
    Ut = U.transpose(1, 2)
    W = torch.empty(B, U.shape[2], n, dtype=tau.dtype, device=tau.device)
    losses = torch.empty(steps, B, dtype=torch.float64, device=tau.device)
    for step in range(1, steps + 1):
        losses[step - 1] = ops.doge_row_grad_(grad, tau, delta, e, lam_sum)
        if U.shape[2] > 0:
            torch.bmm(Ut, grad, out=W)            # Uᵀ G   [B, r, n]
            grad.baddbmm_(U, W, alpha=-1.0)       # G - U (Uᵀ G)
        ops.doge_adam_(delta, exp_avg, exp_avg_sq, grad, step, lr=lr, betas=betas, eps=eps)
    return delta, losses


def check_doge_keys(prep, include, exclude, method: str) -> None:
    """DOGE merges 2-D weight matrices: the filter must select at least one key, and only 2-D ones."""
    if prep.L == 0:
        raise ValueError(f"{method}: no key matches the filter (include={include!r}, exclude={exclude!r})")
    for l, key in enumerate(prep.keys):
        if prep.inputs[l].dim() != 2:
            raise ValueError(f"{method}: {key!r} has shape {tuple(prep.inputs[l].shape)}; DOGE merges 2-D weight "
                             "matrices only (exclude this key or narrow `include`)")


def doge_ta(pretrained: Optional[StateDict], finetuned: Sequence[StateDict], *, eta: float = ETA_VISION,
            subspace: int = 6, density: float = 0.3, steps: int = 400, lr: float = 1e-4,
            betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, include: Patterns = DOGE_INCLUDE,
            exclude: Patterns = None, task_vectors: bool = False, dtype: torch.dtype = torch.float32,
            device=None, out_dtype: Optional[torch.dtype] = None, subspace_solver: str = "svd",
            shard_layers: Optional[bool] = None) -> DogeResult:
    """DOGE_TA (data-free DOGE, FusionBench's ``doge_ta``), exactly as its code computes it.

    For every merged key l (a 2-D m × n weight) and task t, with τ_{t,l} = θ_t − θ0 (in ``dtype``):

    * λ_{t,l} = eta / ||τ_{t,l}||_F (eta 0.07 for vision, 0.15 for language models: ``ETA_VISION`` /
      ``ETA_TEXT``).  A layer whose task vector is exactly zero for some task has no defined λ (the
      reference produces inf/NaN): this raises ValueError naming it; exclude such keys.
    * shared subspace: per-task thin SVDs, their first floor(K/T) left singular vectors stacked (K =
      min(m, n)), a second thin SVD, its first r = floor(K / subspace) vectors U_r (``subspace`` is a
      divisor, default 6).  The projection acts on the output (row) dimension.
    * δ_l (shared by the tasks, init 0) minimises Σ_j Σ_a <τ_j[a,:], τ_j[a,:] − M[a,:]>² with
      M = Σ_t λ_t (τ_t + δ), by ``steps`` Adam steps (lr, betas, eps; bias correction as torch.optim.Adam)
      on the gradient projected off U_r: G − U_r (U_rᵀ G).  Layers are independent (each its own Adam).
    * trim: per task one global P1 threshold over all merged keys (the (n − floor(density·n))-th smallest
      |τ_t| of the original task vectors; every |τ| >= it is kept, ties included).
    * merge: θ_l = θ0_l + Σ_t λ_{t,l} (τ_{t,l} + δ_l) ⊙ mask_{t,l}; every other key keeps θ0.

    Args:
        pretrained, finetuned: state dicts (θ0 and the θ_t; or τ_t with ``task_vectors=True``).
        include, exclude: regexes selecting the merged keys (default: FusionBench's filter, keys containing
            "encoder" and "weight" but not "layer_norm", i.e. the q/k/v/out/fc1/fc2 matrices of a HF CLIP
            vision encoder).  Every selected key must be a 2-D floating tensor.
        dtype: the arithmetic precision, float32 (the reference's) or float64.
        device: where to optimise (default: the pretrained tensors' device).  CUDA uses the CUDA kernels.
        out_dtype: dtype of the merged tensors (default: the pretrained tensor's).
        subspace_solver: "svd" (default: torch.linalg.svd, the reference's computation) or "gram" (eigh of the
            K × K Gram matrices: ~2.5x faster setup on a CPU; less accurate singular vectors where the
            spectrum has no clear gap, where the subspace is ill-defined anyway).
        shard_layers: under ``torch.distributed`` (e.g. ``torchrun``; every rank calls with the same
            arguments), the δ optimisations -- independent per layer -- are split across the ranks
            (:func:`calm_fast.distributed.assign_by_cost`, cost m·n·T per layer), each rank runs its layers
            (same-shape layers stacked as in one process) and the δ and loss curves are gathered exactly;
            the trim and the merge then run on every rank.  Every rank returns the same result, equal bit
            for bit to the 1-process run.  None (default): shard when a group with more than one rank is
            active; False: every rank computes everything.

    Returns a :class:`DogeResult` (merged state dict, δ, λ, trim thresholds, loss curves).
    """
    method = "doge_ta"
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{method}: dtype must be torch.float32 or torch.float64, got {dtype}")
    density = check_fraction("density", density, True, method)
    if int(subspace) < 1:
        raise ValueError(f"{method}: subspace must be a positive integer (a divisor of min(m, n)), got {subspace}")
    if subspace_solver not in SUBSPACE_SOLVERS:
        raise ValueError(f"{method}: subspace_solver must be one of {SUBSPACE_SOLVERS}, got {subspace_solver!r}")
    if int(steps) < 0:
        raise ValueError(f"{method}: steps must be >= 0, got {steps}")
    prep = prepare(pretrained, finetuned, task_vectors=task_vectors, include=include, exclude=exclude, method=method)
    check_doge_keys(prep, include, exclude, method)
    T, L = prep.T, prep.L
    dev = torch.device(device) if device is not None else prep.inputs[0].device

    def tau_of(t: int, l: int) -> Tensor:
        x = prep.inputs[t * L + l].to(dev)
        if prep.base is None:
            return x.to(dtype)
        if dtype == torch.float32:
            return x.float() - prep.base[l].to(dev).float()  # fl32(θ_t − θ0), the reference's τ
        return x.double() - prep.base[l].to(dev).double()

    # λ table, with the zero-layer check.
    lambdas: Dict[str, Tensor] = {}
    for l, key in enumerate(prep.keys):
        norms = torch.stack([torch.norm(tau_of(t, l)) for t in range(T)])
        zero = (norms == 0).nonzero().reshape(-1).tolist()
        if zero:
            raise ValueError(f"{method}: the task vector of model {zero[0]} is exactly zero on {key!r}, so "
                             "λ = eta / ||τ|| is undefined (the reference gives inf/NaN); exclude this key")
        if not bool(torch.isfinite(norms).all()):
            raise ValueError(f"{method}: {key!r} holds inf or NaN in a task vector")
        lambdas[key] = eta / norms

    # δ per shape group (all layers of one shape stacked: one launch per step and shape).
    groups: Dict[Tuple[int, int], List[int]] = {}
    for l in range(L):
        groups.setdefault(tuple(prep.inputs[l].shape), []).append(l)
    deltas: Dict[str, Tensor] = {}
    losses: Dict[str, Tensor] = {}
    owner = layer_owners([prep.inputs[l].numel() * T for l in range(L)], shard_layers, method)
    for shape, ls in groups.items():
        if owner is not None:
            ls = [l for l in ls if owner[l] == distributed.rank()]
            if not ls:
                continue
        tau = torch.stack([torch.stack([tau_of(t, l) for t in range(T)]) for l in ls]).contiguous()
        lam = torch.stack([lambdas[prep.keys[l]] for l in ls]).to(dtype).contiguous()
        U = shared_subspace(tau, int(subspace), subspace_solver)
        delta, loss = optimise_delta(tau, lam, U, int(steps), float(lr), (float(betas[0]), float(betas[1])),
                                     float(eps))
        del tau, U
        for i, l in enumerate(ls):
            deltas[prep.keys[l]] = delta[i]
            losses[prep.keys[l]] = loss[:, i].cpu()
    if owner is not None:  # every layer's δ and loss curve, exactly, on every rank (the 1-process dict order)
        deltas, losses = gather_layer_results(owner, prep.keys, deltas, losses,
                                              [prep.inputs[l].shape for l in range(L)], steps,
                                              [l for ls in groups.values() for l in ls], method, dev)
        deltas = {k: v.to(dtype) for k, v in deltas.items()}
        losses = {k: v.cpu() for k, v in losses.items()}

    # Trim thresholds (P1, global per task over the original task vectors) and the merge.
    thresholds = _thresholds(prep, density, dtype, tau_of)
    merged: Dict[str, Tensor] = {}
    for l, key in enumerate(prep.keys):
        acc = None
        for t in range(T):
            tau = tau_of(t, l)
            masked = torch.where(tau.abs() >= thresholds[t].to(tau), tau + deltas[key], torch.zeros_like(tau))
            term = lambdas[key][t] * masked
            acc = term if acc is None else acc + term
        if prep.base is not None:
            acc = prep.base[l].to(dev).to(dtype) + acc
        elif prep.pretrained is not None:
            acc = prep.pretrained[key].to(dev).to(dtype) + acc
        want = out_dtype if out_dtype is not None else (
            prep.pretrained[key].dtype if prep.pretrained is not None else dtype)
        merged[key] = acc.to(want)
    result_sd = {}
    for key in prep.order:  # the pretrained key order; unmerged keys are θ0 (or absent without θ0)
        if key in merged:
            result_sd[key] = merged[key]
        elif key in prep.passthrough:
            result_sd[key] = prep.passthrough[key]
    return DogeResult(merged=result_sd, delta=deltas, lambdas=lambdas, thresholds=thresholds, losses=losses,
                      keys=list(prep.keys))


def _thresholds(prep, density: float, dtype: torch.dtype, tau_of) -> Tensor:
    """[T] P1 thresholds.  fp32: calm_fast.selection over the task vectors in place (exact, equal to
    torch.kthvalue on the concatenation); fp64: torch.kthvalue on the concatenated fp64 |τ|."""
    T, L = prep.T, prep.L
    n = prep.numel()
    k = selection.topk_fraction_to_k(n, density)
    if k == 0:
        return torch.zeros(T, dtype=dtype)
    if dtype == torch.float32:  # τ = fl32(θ_t − θ0) on the fly, as tau_of computes it
        return selection.kth_smallest_abs(prep.inputs, prep.base, T, [k] * T, groups=prep.groups).to(dtype)
    out = torch.empty(T, dtype=dtype)
    for t in range(T):
        flat = torch.cat([tau_of(t, l).reshape(-1) for l in range(L)]).abs()
        out[t] = flat.kthvalue(k).values.cpu()
    return out
