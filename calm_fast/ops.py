"""Typed wrappers over ``torch.ops.calm_fast.*`` (schemas: csrc/common/schemas.h).

These are the low-level, list-based building blocks.  Conventions (shared by every op):

* ``inputs`` is a task-major list of ``T * L`` tensors: ``inputs[t * L + l]`` is task ``t``'s tensor ``l``.
  One dtype per call (float32, bfloat16 or float16), one device, contiguous.
* ``base`` is ``None``/empty (the inputs are task vectors) or ``L`` tensors ``theta_0`` (the inputs are
  fine-tuned weights; ``tau = input - base`` is computed on the fly in fp32 and never stored).
* Per-(task, tensor) parameters are ``[T, L]`` tensors; scalars and per-task lists are broadcast.
* DARE: an element is kept iff ``philox(key[t, l], flat_index) >= p`` (counter-based: identical masks on
  every device, thread count and order).  Keys come from :func:`dare_keys`.
* Arithmetic is fp32; outputs are in the input dtype unless ``out_float``.

The merging methods (calm_fast.methods) compose these; most users never call them directly.
"""
from __future__ import annotations

import hashlib
from typing import Optional, Sequence, Tuple, Union

import torch

from ._backend import _load

Tensor = torch.Tensor
TableLike = Union[float, int, Sequence[float], Sequence[Sequence[float]], Tensor]

HIST_HIGH_BINS = 1 << 15
HIST_LOW_BINS = 1 << 16


def _ops():
    """The op namespace of the active backend (native ops, or the reference fallback)."""
    if _load() == "reference":
        from . import reference

        return reference.ReferenceOps
    return torch.ops.calm_fast


def as_table(value: TableLike, T: int, L: int, dtype: torch.dtype, device, name: str) -> Tensor:
    """Broadcast a scalar, a per-task sequence or a [T, L] table to a contiguous [T, L] tensor."""
    t = torch.as_tensor(value, dtype=dtype)
    if t.dim() == 0:
        t = t.expand(T, L)
    elif t.dim() == 1:
        if t.numel() != T:
            raise ValueError(f"{name}: expected one value per task ({T}), got {t.numel()}")
        t = t[:, None].expand(T, L)
    elif tuple(t.shape) != (T, L):
        raise ValueError(f"{name}: expected shape [{T}, {L}], got {list(t.shape)}")
    return t.contiguous().to(device)


def dare_keys(seed: int, names: Sequence[str], num_tasks: int, device=None) -> Tensor:
    """[T, L] int64 keys of the DARE generator, derived from (seed, task index, tensor name).

    Keys depend on names, not positions, so a tensor gets the same mask whether it is merged alone,
    streamed from a file, or merged with the whole model on any device.
    """
    keys = torch.empty(num_tasks, len(names), dtype=torch.int64)
    for t in range(num_tasks):
        for l, name in enumerate(names):
            digest = hashlib.blake2b(f"{int(seed)}/{t}/{name}".encode(), digest_size=8).digest()
            keys[t, l] = int.from_bytes(digest, "little", signed=True)
    return keys.to(device) if device is not None else keys


def _base_list(base: Optional[Sequence[Tensor]]) -> list:
    return list(base) if base else []


def _device(inputs: Sequence[Tensor]):
    return inputs[0].device if len(inputs) else torch.device("cpu")


def abs_histogram_(
    hist: Tensor,
    inputs: Sequence[Tensor],
    base: Optional[Sequence[Tensor]],
    num_tasks: int,
    prefix: Optional[Tensor] = None,
    dare_p: float = 0.0,
    dare_keys: Optional[Tensor] = None,
    dare_rescale: bool = True,
) -> None:
    """Accumulate magnitude-key histograms in place (level 0 if ``prefix`` is None, else level 1).

    ``hist`` is int64 ``[T, 32768]`` (level 0: bin = key >> 16 of fp32 |tau|) or ``[T, 65536]``
    (level 1: bin = key & 0xffff, counting only keys with key >> 16 == prefix[t]).
    """
    _ops().abs_histogram_(hist, list(inputs), _base_list(base), num_tasks, prefix, float(dare_p), dare_keys,
                          bool(dare_rescale))


def abs_bracket(
    inputs: Sequence[Tensor],
    base: Optional[Sequence[Tensor]],
    num_tasks: int,
    lo: Tensor,
    hi: Tensor,
    capacity: int,
    dare_p: float = 0.0,
    dare_keys: Optional[Tensor] = None,
    dare_rescale: bool = True,
) -> Tuple[Tensor, Tensor]:
    """One pass pinning each task's |tau| distribution between ``lo[t] <= hi[t]`` (float32 [T]).

    Returns ``counts`` int64 [T, 4] = (#|tau| < lo, #|tau| == lo, #lo < |tau| < hi, #|tau| == hi > lo)
    and ``candidates`` float32 [T, capacity]: the |tau| values strictly inside, the first ``capacity``
    found (row t is valid up to min(counts[t, 2], capacity)).
    """
    return _ops().abs_bracket(list(inputs), _base_list(base), num_tasks, lo, hi, int(capacity), float(dare_p),
                              dare_keys, bool(dare_rescale))


def abs_kth_per_tensor(
    inputs: Sequence[Tensor],
    base: Optional[Sequence[Tensor]],
    num_tasks: int,
    ks: Tensor,
    dare_p: float = 0.0,
    dare_keys: Optional[Tensor] = None,
    dare_rescale: bool = True,
) -> Tensor:
    """float32 ``[T, L]``: the ``ks[t, l]``-th smallest ``|tau|`` (1-indexed) of task t's tensor l alone,
    for every (task, tensor) pair in one call; ``ks`` int64 ``[T, L]``, ``ks[t, l] == 0`` gives 0.

    The per-tensor thresholds of TIES / DARE-TIES (``mode='per_tensor'``), selected exactly on fp32
    magnitude keys as :func:`abs_histogram_` counts them (DARE applied).  Native on the CPU only:
    :func:`calm_fast.selection.kth_smallest_abs_per_tensor` picks it there and loops over tensors elsewhere.
    """
    return _ops().abs_kth_per_tensor(list(inputs), _base_list(base), num_tasks, ks, float(dare_p), dare_keys,
                                     bool(dare_rescale))


def has_abs_kth_per_tensor(device) -> bool:
    """Whether :func:`abs_kth_per_tensor` runs for tensors on ``device`` (CPU native ops, or the reference)."""
    return torch.device(device).type == "cpu" or _load() == "reference"


def weighted_merge(
    inputs: Sequence[Tensor],
    base: Optional[Sequence[Tensor]],
    num_tasks: int,
    weights: TableLike = 1.0,
    scale: float = 1.0,
    thresholds: Optional[TableLike] = None,
    strict: bool = False,
    masks: Optional[Sequence[Tensor]] = None,
    dare_p: float = 0.0,
    dare_keys: Optional[Tensor] = None,
    dare_rescale: bool = True,
    out_float: bool = False,
) -> Tuple[list, int]:
    """``out_l = base_l + scale * sum_t weights[t,l] * keep_t * tau_t`` for every tensor l.

    ``keep`` combines DARE, the magnitude trim (``|tau| >= thresholds[t,l]``, ``>`` when strict) and
    explicit masks (bool, or uint8 bit-packed).  Returns (outputs, number of non-finite tau values that
    enter the merge: counted after DARE, so an inf/NaN that DARE drops is not counted, and a survivor whose
    ``1/(1-p)`` rescale overflows is; a non-finite base element every task drops passes into the output
    as the base does, uncounted).
    """
    T = num_tasks
    L = len(inputs) // T if T else 0
    dev = _device(inputs)
    w = as_table(weights, T, L, torch.float32, dev, "weights")
    thr = None if thresholds is None else as_table(thresholds, T, L, torch.float32, dev, "thresholds")
    out, nonfinite = _ops().weighted_merge(list(inputs), _base_list(base), T, w, float(scale), thr, bool(strict),
                                           list(masks or []), float(dare_p), dare_keys, bool(dare_rescale),
                                           bool(out_float))
    return list(out), int(nonfinite)


def coef_grad(
    grads: Sequence[Tensor],
    inputs: Sequence[Tensor],
    base: Optional[Sequence[Tensor]],
    num_tasks: int,
    thresholds: Optional[TableLike] = None,
    strict: bool = False,
    masks: Optional[Sequence[Tensor]] = None,
) -> Tensor:
    """``out[t, l] = <grads[l], keep_{t,l} * tau_{t,l}>`` for every task t and tensor l, float32 ``[T, L]``.

    The coefficient gradient of AdaMerging (``merged_l = base_l + sum_t lambda[t, l] * keep * tau_{t,l}``,
    so ``dLoss/dlambda[t, l]`` is this dot product with ``grads[l] = dLoss/dmerged_l``), AdaMerging++ (trimmed
    tau) and DOGE + AdaMerging (masked tau), for all (t, l) in one pass that reads every gradient and input
    element once.

    ``inputs`` / ``base`` / ``num_tasks`` / ``thresholds`` / ``strict`` / ``masks`` mean exactly what they mean
    in :func:`weighted_merge` (same list order, ``tau = input - base`` in fp32 when a base is given, ``keep``
    from the magnitude trim ``|tau| >= thresholds[t, l]`` (``>`` when strict) and the bool or bit-packed
    masks; no DARE).  ``grads`` holds ``L`` tensors of float32 or the inputs' dtype (one dtype for the list),
    ``grads[l]`` with the number of elements of tensor ``l`` (any shape: views into one flat gradient buffer
    are read in place; non-contiguous ones are copied), or ``None`` for a tensor the loss does not reach
    (autograd's ``None`` gradient): that column of the result is exactly 0.

    Accumulation: fp32 products, fp32 partial sums of at most 32 products each, everything above that in
    fp64, in a fixed order, so the result is identical (bit for bit) for any thread count and on CPU and
    CUDA, and within ``34 * 2**-24 * sum|g * keep * tau| + 2**-24 * |exact|`` of the exact dot product.
    inf / NaN propagate (an element dropped by the trim or mask still contributes ``g * 0``, as in torch).
    """
    T = num_tasks
    if T < 1:
        raise ValueError(f"coef_grad: num_tasks must be >= 1, got {T}")
    if not len(inputs):
        if len(grads):
            raise ValueError(f"coef_grad: inputs is empty but grads holds {len(grads)} tensors")
        return torch.zeros(T, 0, dtype=torch.float32)
    L = len(inputs) // T
    dev = _device(inputs)
    thr = None if thresholds is None else as_table(thresholds, T, L, torch.float32, dev, "thresholds")
    grads = list(grads)
    if len(grads) == L and any(g is None for g in grads):
        # A tensor the loss does not reach (autograd's None, e.g. open_clip's unused text leftovers): its
        # column is exactly 0; the op runs on the other columns only (list slicing, no tensor copies).
        keep = [l for l in range(L) if grads[l] is not None]
        out = torch.zeros(T, L, dtype=torch.float32, device=dev)
        if keep:
            sub = lambda xs: [xs[t * L + l] for t in range(T) for l in keep]  # noqa: E731
            out[:, keep] = _ops().coef_grad(
                _dense([grads[l] for l in keep]), sub(list(inputs)), [base[l] for l in keep] if base else [], T,
                None if thr is None else thr[:, keep].contiguous(), bool(strict), sub(list(masks)) if masks else [])
        return out
    return _ops().coef_grad(_dense(grads), list(inputs), _base_list(base), T, thr, bool(strict), list(masks or []))


def ties_merge(
    inputs: Sequence[Tensor],
    base: Optional[Sequence[Tensor]],
    num_tasks: int,
    thresholds: TableLike,
    merge: str = "sum",
    scale: float = 1.0,
    weights: TableLike = 1.0,
    zero_sign: Union[int, Sequence[int], Tensor] = 1,
    strict: bool = False,
    dare_p: float = 0.0,
    dare_keys: Optional[Tensor] = None,
    dare_rescale: bool = True,
    out_float: bool = False,
    max_positions: int = 1 << 20,
):
    """One fused TIES pass; see :func:`calm_fast.methods.ties.ties_merging` for the full method.

    Returns ``(outputs, sign_sums[L], positions[P], patch[P, 3], cancel_count[L], nonfinite)``:
    ``positions`` are the flat indices (over the concatenated tensors) of the elements whose elected sign
    is exactly 0 while some trimmed value is not ("cancelled"), in ascending order, and ``patch`` the fp32
    output there for a zero sign of +1, -1 and 0.  All or nothing: every cancelled position when there are
    at most ``max_positions`` of them (``P == cancel_count.sum()``), else none (``P == 0``; the caller
    re-runs the pass with the known zero sign) -- the same on every device and thread count.
    ``nonfinite`` counts as in :func:`weighted_merge` (after DARE).
    """
    T = num_tasks
    L = len(inputs) // T if T else 0
    dev = _device(inputs)
    thr = as_table(thresholds, T, L, torch.float32, dev, "thresholds")
    w = as_table(weights, T, L, torch.float32, dev, "weights")
    zs = torch.as_tensor(zero_sign, dtype=torch.int64)
    zs = (zs.expand(L) if zs.dim() == 0 else zs).contiguous().to(dev)
    out, sign_sums, positions, patch, cancel, nonfinite = _ops().ties_merge(
        list(inputs), _base_list(base), T, thr, bool(strict), w, merge, float(scale), zs, float(dare_p), dare_keys,
        bool(dare_rescale), bool(out_float), int(max_positions))
    return list(out), sign_sums, positions, patch, cancel, int(nonfinite)


def consensus_merge(
    inputs: Sequence[Tensor],
    base: Optional[Sequence[Tensor]],
    num_tasks: int,
    tall_lambdas: Union[float, Sequence[float], Tensor] = 0.6,
    mtl: Optional[Sequence[Tensor]] = None,
    min_count: int = 2,
    alpha: float = 1.0,
    return_masks: bool = False,
    out_float: bool = False,
):
    """Consensus merge; returns ``(outputs, packed_masks (T*L uint8, empty unless asked), nonfinite)``."""
    T = num_tasks
    dev = _device(inputs)
    lam = torch.as_tensor(tall_lambdas, dtype=torch.float32)
    lam = (lam.expand(T) if lam.dim() == 0 else lam).contiguous().to(dev)
    out, masks, nonfinite = _ops().consensus_merge(list(inputs), _base_list(base), T, lam, list(mtl or []),
                                                   int(min_count), float(alpha), bool(return_masks),
                                                   bool(out_float))
    return list(out), list(masks), int(nonfinite)


def unpack_mask(packed: Tensor, numel: int) -> Tensor:
    """Bit-packed uint8 mask (element i = bit i % 8 of byte i // 8) -> bool tensor of ``numel`` elements."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.reshape(-1, 1) >> shifts) & 1
    return bits.reshape(-1)[:numel].bool()


def pack_mask(mask: Tensor) -> Tensor:
    """bool tensor -> bit-packed uint8 (the inverse of :func:`unpack_mask`)."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = (1 << torch.arange(8, dtype=torch.int32, device=flat.device)).to(torch.uint8)
    return (flat.reshape(-1, 8) * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)


# ---------------------------------------------------------------------------------------------
# CALM mask training.  Lists of L tensors matched element by element with the mask
# logits R (float32, any shapes); each other list holds L tensors of R's shapes, one dtype per list
# (float32, bfloat16 or float16; A float32).  sigma is calm_fast's own fp32 sigmoid (identical bits on
# CPU and CUDA, within 2 ulp of the exact value); arithmetic is fp32.  Interpolation modes:
#   "fused"     theta = base + tau_prev + s * (tau_new - tau_prev)        (default; one rounding less)
#   "faithful"  theta = base + (1 - s) * tau_prev + s * tau_new            (the official code's order)
#   "round"     theta = base + (tau_new if m else tau_prev), m = round(s)  (binarised model, §8.6-8.7)
# with s = sigma(R) and m = round(s) half to even, i.e. m = 1 iff s > 0.5 (R > 8.94e-8).  NaN and inf
# propagate by IEEE rules, as in the reference formulas (no checks, no counts).  The wrappers accept
# empty lists (L = 0); the raw ops need at least one tensor for the dispatcher to pick a device.
# ---------------------------------------------------------------------------------------------
CALM_MODES = ("fused", "faithful", "round")


def _dense(xs: Optional[Sequence[Tensor]]) -> list:
    """A read-only operand list, made contiguous (a no-op for the usual contiguous tensors)."""
    return [x.contiguous() for x in xs] if xs else []


def calm_interpolate(
    base: Optional[Sequence[Tensor]],
    tau_prev: Sequence[Tensor],
    tau_new: Sequence[Tensor],
    R: Sequence[Tensor],
    mode: str = "fused",
    out_float: bool = False,
) -> list:
    """The interpolated model of CALM for every tensor l (mode: see ``CALM_MODES`` above).

    ``base`` (theta_0) may be ``None``: the result is then the interpolated task vector.  Output dtype:
    base's (float32 with ``out_float``); without base, the promotion of tau_prev's and tau_new's dtypes.
    """
    if not len(R):
        return []
    return list(_ops().calm_interpolate(_dense(base), _dense(tau_prev), _dense(tau_new), list(R), str(mode),
                                        bool(out_float)))


def calm_accumulate_(
    A: Sequence[Tensor],
    grad: Sequence[Tensor],
    tau_prev: Sequence[Tensor],
    tau_new: Sequence[Tensor],
    eta: float,
    faithful: bool = False,
) -> None:
    """One batch of CALM's gradient accumulation, in place on the float32 accumulators ``A``:
    ``A += eta * grad * (tau_new - tau_prev)``, or with ``faithful`` the official order
    ``A += eta * (-grad * tau_prev + grad * tau_new)``.  ``grad`` may be views into one flat buffer."""
    if not len(A):
        return
    _ops().calm_accumulate_(list(A), _dense(grad), _dense(tau_prev), _dense(tau_new), float(eta), bool(faithful))


def calm_mask_step_(
    R: Sequence[Tensor],
    A: Sequence[Tensor],
    alpha: float = 1.0,
    faithful: bool = False,
    theta: Optional[Sequence[Tensor]] = None,
    base: Optional[Sequence[Tensor]] = None,
    tau_prev: Optional[Sequence[Tensor]] = None,
    tau_new: Optional[Sequence[Tensor]] = None,
    mode: Optional[str] = None,
) -> Tensor:
    """CALM's mask update (§8.5 step 4) in one pass, in place:

    ``d = s (1 - s)``, ``reg = alpha * d`` where ``R > 0`` else ``-alpha * d``;
    ``R <- (R - A d) + reg`` (``faithful``: ``R - (A d - reg)``, the official grouping); ``A <- 0``;
    and, when ``theta`` is given, ``theta <- calm_interpolate(base, tau_prev, tau_new, new R, mode)``
    written into ``theta`` in its own dtype (``mode`` defaults to "faithful" if ``faithful`` else "fused").

    Returns an int64 tensor ``[2]`` on R's device (no host sync): the number of elements whose binary
    mask round(sigma(R)) is 1 after the step, and the number whose mask changed in this step.
    """
    if mode is None:
        mode = "faithful" if faithful else "fused"
    if not len(R):
        return torch.zeros(2, dtype=torch.int64)
    return _ops().calm_mask_step_(list(R), list(A), float(alpha), bool(faithful), list(theta or []), _dense(base),
                                  _dense(tau_prev), _dense(tau_new), str(mode))


def calm_binarize_merge(tau_prev: Sequence[Tensor], tau_new: Sequence[Tensor], R: Sequence[Tensor]) -> Tuple[list, int]:
    """The merged task vector of a CALM step (§8.7): ``tau_new`` where round(sigma(R)) == 1, else ``tau_prev``,
    exactly (each element is one of the two values, in the promotion of their dtypes).  Returns
    ``(tau_next, number of elements taken from tau_new)``."""
    if not len(R):
        return [], 0
    out, count = _ops().calm_binarize_merge(_dense(tau_prev), _dense(tau_new), list(R))
    return list(out), int(count)


# ---------------------------------------------------------------------------------------------
# DOGE_TA: the closed-form gradient of a batch of same-shape layers, and Adam.
# float32 or float64 tensors, contiguous, one device.  The DOGE method (calm_fast.methods.doge) runs
# doge_row_grad_ -> low-rank projection (two batched GEMMs) -> doge_adam_ per iteration and shape.
# ---------------------------------------------------------------------------------------------
def doge_row_grad_(grad: Tensor, tau: Tensor, delta: Tensor, e: Tensor, lam_sum: Tensor) -> Tensor:
    """DOGE's gradient for ``B`` same-shape layers, written into ``grad`` ([B, m, n]).

    ``tau`` [B, T, m, n] task vectors, ``delta`` [B, m, n], ``e`` [B, T, m] with
    ``e_j[a] = ||tau_j[a, :]||^2 - <tau_j[a, :], S[a, :]>`` (``S = sum_t lambda_t tau_t``), ``lam_sum`` [B]
    (``Lambda = sum_t lambda_t``).  Per row: ``q_j = <tau_j[a, :], delta[a, :]>``, ``r_j = e_j - Lambda q_j``,
    ``grad[a, :] = -2 Lambda sum_j r_j tau_j[a, :]``.  Returns the loss ``sum_{j, a} r_j^2`` per layer
    (float64 [B], at ``delta`` before any update).  No autograd graph; identical bits on CPU and CUDA.
    """
    return _ops().doge_row_grad_(grad, tau, delta, e, lam_sum)


def adam_scalars(step: int, lr: float, betas: Tuple[float, float]) -> Tuple[float, float]:
    """(-step_size, bias_correction2_sqrt) of Adam step ``step`` (1-based), computed as torch.optim.Adam does."""
    beta1, beta2 = betas
    bias_correction1 = 1 - beta1 ** float(step)
    bias_correction2 = 1 - beta2 ** float(step)
    step_size = lr / bias_correction1
    return -step_size, bias_correction2 ** 0.5


def doge_adam_(param: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, grad: Tensor, step: int, lr: float = 1e-4,
               betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
    """One ``torch.optim.Adam`` step (no weight decay, amsgrad or maximize) in place, in one pass.

    ``step`` is the 1-based step count (bias correction).  ``exp_avg`` and ``exp_avg_sq`` are the same
    numbers as torch.optim.Adam's state, bit for bit; ``param`` too, except where torch's vectorised CPU
    square root is one ulp off the correctly rounded one this op uses (then ``param`` differs by about an
    ulp of the step).
    """
    neg_step, bc2_sqrt = adam_scalars(step, lr, betas)
    _ops().doge_adam_(param, exp_avg, exp_avg_sq, grad, float(betas[0]), float(betas[1]), neg_step, bc2_sqrt,
                      float(eps))


# ---------------------------------------------------------------------------------------------
# Fake (meta) implementations: shapes and dtypes only, for torch.compile and opcheck.
# ---------------------------------------------------------------------------------------------
def _register_fakes() -> None:
    lib = "calm_fast"
    if not hasattr(torch.ops, lib) or not hasattr(torch.ops.calm_fast, "weighted_merge"):
        return

    def _outs(inputs, num_tasks, out_float):
        L = len(inputs) // num_tasks
        return [torch.empty_like(inputs[l], dtype=torch.float32 if out_float else inputs[l].dtype) for l in range(L)]

    def _scalar(like_list):
        dev = like_list[0].device if like_list else torch.device("cpu")
        return torch.empty((), dtype=torch.int64, device=dev)

    @torch.library.register_fake("calm_fast::abs_histogram_")
    def _(hist, inputs, base, num_tasks, prefix, dare_p, dare_keys, dare_rescale):
        return None

    @torch.library.register_fake("calm_fast::abs_bracket")
    def _(inputs, base, num_tasks, lo, hi, capacity, dare_p, dare_keys, dare_rescale):
        dev = lo.device
        return (torch.empty(num_tasks, 4, dtype=torch.int64, device=dev),
                torch.empty(num_tasks, capacity, dtype=torch.float32, device=dev))

    @torch.library.register_fake("calm_fast::abs_kth_per_tensor")
    def _(inputs, base, num_tasks, ks, dare_p, dare_keys, dare_rescale):
        return torch.empty(num_tasks, len(inputs) // num_tasks if num_tasks else 0, dtype=torch.float32,
                           device=ks.device)

    @torch.library.register_fake("calm_fast::weighted_merge")
    def _(inputs, base, num_tasks, weights, scale, thresholds, strict, masks, dare_p, dare_keys, dare_rescale,
          out_float):
        return _outs(inputs, num_tasks, out_float), _scalar(inputs)

    if hasattr(torch.ops.calm_fast, "coef_grad"):  # absent from a _C built before the op existed
        @torch.library.register_fake("calm_fast::coef_grad")
        def _(grads, inputs, base, num_tasks, thresholds, strict, masks):
            L = len(inputs) // num_tasks
            dev = inputs[0].device if inputs else torch.device("cpu")
            return torch.empty(num_tasks, L, dtype=torch.float32, device=dev)

    @torch.library.register_fake("calm_fast::ties_merge")
    def _(inputs, base, num_tasks, thresholds, strict, weights, merge, scale, zero_sign, dare_p, dare_keys,
          dare_rescale, out_float, max_positions):
        L = len(inputs) // num_tasks
        dev = inputs[0].device if inputs else torch.device("cpu")
        ctx = torch.library.get_ctx()
        p = ctx.new_dynamic_size()
        return (_outs(inputs, num_tasks, out_float), torch.empty(L, dtype=torch.int64, device=dev),
                torch.empty(p, dtype=torch.int64, device=dev), torch.empty(p, 3, dtype=torch.float32, device=dev),
                torch.empty(L, dtype=torch.int64, device=dev), _scalar(inputs))

    @torch.library.register_fake("calm_fast::consensus_merge")
    def _(inputs, base, num_tasks, tall_lambdas, mtl, min_count, alpha, return_masks, out_float):
        L = len(inputs) // num_tasks
        masks = []
        if return_masks:
            masks = [inputs[i % L].new_empty(((inputs[i % L].numel() + 7) // 8,), dtype=torch.uint8)
                     for i in range(num_tasks * L)]
        return _outs(inputs, num_tasks, out_float), masks, _scalar(inputs)


    def _calm_out_dtype(base, tau_prev, tau_new, out_float):
        if out_float:
            return torch.float32
        if base:
            return base[0].dtype
        if not tau_prev:
            return torch.float32
        return tau_prev[0].dtype if tau_prev[0].dtype == tau_new[0].dtype else torch.float32

    @torch.library.register_fake("calm_fast::calm_interpolate")
    def _(base, tau_prev, tau_new, R, interp_mode, out_float):
        dt = _calm_out_dtype(base, tau_prev, tau_new, out_float)
        return [torch.empty_like(r, dtype=dt) for r in R]

    @torch.library.register_fake("calm_fast::calm_accumulate_")
    def _(A, grad, tau_prev, tau_new, eta, faithful):
        return None

    @torch.library.register_fake("calm_fast::calm_mask_step_")
    def _(R, A, alpha, faithful, theta, base, tau_prev, tau_new, interp_mode):
        return torch.empty(2, dtype=torch.int64, device=R[0].device if R else torch.device("cpu"))

    @torch.library.register_fake("calm_fast::calm_binarize_merge")
    def _(tau_prev, tau_new, R):
        dt = _calm_out_dtype([], tau_prev, tau_new, False)
        return [torch.empty_like(r, dtype=dt) for r in R], _scalar(R)

    @torch.library.register_fake("calm_fast::doge_row_grad_")
    def _(grad, tau, delta, e, lam_sum):
        return torch.empty(tau.shape[0], dtype=torch.float64, device=tau.device)

    @torch.library.register_fake("calm_fast::doge_adam_")
    def _(param, exp_avg, exp_avg_sq, grad, beta1, beta2, neg_step_size, bias_correction2_sqrt, eps):
        return None
