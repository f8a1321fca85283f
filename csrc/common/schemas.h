// Every op schema of calm_fast, in one list.  registration.cpp defines them in the `calm_fast`
// namespace; the emulator module (csrc/testing/emu_module.cpp) defines the same list in `calm_fast_emu`
// so that the CUDA sources, compiled for the CPU emulator, are exercised through identical signatures.
//
// Conventions shared by all merge ops (see calm_fast/ops.py for the Python-side documentation):
//   inputs   T*L tensors, task-major (inputs[t*L + l] is task t's tensor l); all of one dtype
//            (float32, bfloat16 or float16), contiguous, same device.
//   base     either empty (inputs are task vectors tau) or L tensors theta_0 (inputs are fine-tuned
//            weights; tau = input - base is computed on the fly in fp32, never stored).
//   weights / thresholds / dare_keys are [T, L] tensors (float32 / float32 / int64).
//   DARE: an element of task t, tensor l, flat index i is kept iff philox(key[t,l], i) >= p
//         (a counter-based generator: the same mask on any device, thread count or order).
//   out_float: outputs in float32 instead of the input dtype.  Arithmetic is always fp32.
//   Every merge op also returns `nonfinite`: an int64 scalar counting the inf/NaN tau values that enter
//   the merge, i.e. after DARE's drop and rescale (a dropped inf/NaN is not counted; a survivor whose
//   rescale overflows is); the Python layer turns a non-zero count into an error naming the tensor.
//
// abs_histogram_: hist[t, bin] += #{elements of task t whose |tau| key falls in bin}; level 0 (prefix
//   None): hist is [T, 32768], bin = key >> 16; level 1: hist is [T, 65536], only elements with
//   key >> 16 == prefix[t] count, bin = key & 0xffff (prefix[t] < 0 skips task t).
// abs_bracket: the one-pass select of resident thresholds.  lo, hi: float32 [T] magnitudes (lo <= hi,
//   predicted from a sample).  Returns counts int64 [T, 4] = #{|tau| < lo}, #{|tau| == lo},
//   #{lo < |tau| < hi}, #{|tau| == hi and hi > lo}, and candidates float32 [T, capacity] holding the
//   |tau| values strictly inside (lo, hi) (the first `capacity` found, in unspecified order; the
//   rest of a row is unspecified).  Exact for any input: a caller whose k-th value is not pinned by
//   these counts falls back to abs_histogram_.
// abs_kth_per_tensor: float32 [T, L]: the ks[t, l]-th smallest |tau| (1-indexed, in the key order above)
//   of task t's tensor l alone, for every pair in one call (per-tensor thresholds); ks int64 [T, L] with
//   0 <= ks[t, l] <= numel(l), and ks[t, l] == 0 gives 0.  CPU only (the Python layer loops over
//   tensors with abs_bracket / abs_histogram_ on other devices).
// weighted_merge: out_l = base_l + scale * sum_t weights[t,l] * keep * tau_t  (keep from DARE,
//   thresholds and masks); without base the merged task vector.
// ties_merge: trim (|tau| >= thresholds[t,l], or > when strict), weight, elect, disjoint
//   sum/mean/max, out = base + scale * merged.  Where the elected sign is exactly 0 but trimmed values
//   are non-zero ("cancelled"), zero_sign[l] is used; returns (out, sign_sums[L] = sum of elected
//   signs, positions[P] = the flat indices of the cancelled elements in ascending order, all of them
//   when there are at most max_positions (P = sum(cancel_count)), else none (P = 0: all or nothing, the
//   same on every device and thread count), patch[P, 3] = the fp32 output there for a zero sign of +1,
//   -1 and 0, cancel_count[L], nonfinite).
// consensus_merge: masks m_t = |tau_t| > tall_lambdas[t] |mtl - tau_t| (mtl = sum_t tau_t unless given),
//   out = base + alpha * (count(m) >= min_count ? mtl : 0); optional bit-packed per-task masks.
//
// CALM mask training (ALGORITHMS.md §8; per-element formulas in common/elementwise.h, calm_*).  Lists of
// L tensors matched element by element with R (L float32 mask logits, any shapes); every other list
// has L tensors of R's shapes (or is empty where optional), one dtype per list (float32, bfloat16 or
// float16; A float32), contiguous, on R's device.  Arithmetic in fp32; sigma is calm_sigmoid (the same
// bits on every device).  interp_mode: "fused" theta = base + tau_prev + s (tau_new - tau_prev), "faithful"
// base + (1 - s) tau_prev + s tau_new (the official order), "round" base + (m ? tau_new : tau_prev)
// with s = sigma(R), m = round(s) (half to even: m = 1 iff s > 0.5).  NaN/inf propagate (no checks).
// calm_interpolate: theta per interp_mode; base may be empty (then the interpolated task vector).  Output
//   dtype: base's (float32 with out_float); without base the promotion of tau_prev's and tau_new's.
// calm_accumulate_: A += eta * g * (tau_new - tau_prev), faithful A += eta * (-g tau_prev + g tau_new).
// calm_mask_step_: d = s (1 - s); R <- (R - A d) + reg, faithful R - (A d - reg), reg = alpha d if R > 0
//   else -alpha d; A <- 0; when theta is non-empty, theta <- the interpolation (interp_mode) at the new R, in
//   theta's dtype (base may be empty; tau_prev and tau_new are then required).  Returns int64 [2]:
//   (#elements with m = 1 after the step, #elements whose m changed).
// calm_binarize_merge: tau_next = m ? tau_new : tau_prev exactly (dtype: promotion of the two) and the
//   int64 count of elements taking tau_new.
//
// DOGE_TA (ALGORITHMS.md §9.1; per-row and per-element math in common/doge_math.h).  float32 or float64,
// contiguous, one device.
// doge_row_grad_: for B same-shape layers, tau [B, T, m, n], delta [B, m, n], e [B, T, m], lam_sum [B]:
//   q_j[a] = <tau_j[a, :], delta[a, :]>, r_j[a] = e_j[a] - Lambda q_j[a], grad[a, :] (written, [B, m, n]) =
//   -2 Lambda sum_j r_j[a] tau_j[a, :]; returns the loss sum_{j, a} r_j[a]^2 per layer (float64 [B]).
// doge_adam_: one torch.optim.Adam step in place (no weight decay / amsgrad / maximize); the host passes
//   neg_step_size = -lr / (1 - beta1^k) and bias_correction2_sqrt = (1 - beta2^k) ** 0.5 as Python computes them.
//
// coef_grad (AdaMerging, ALGORITHMS.md §6): out float32 [T, L], out[t, l] = <grads[l], keep * tau_{t,l}> with
//   inputs / base / num_tasks / thresholds / strict / masks exactly as weighted_merge (no DARE); grads: L
//   contiguous tensors of float32 or the inputs' dtype (one dtype for the list), grads[l] with the numel of
//   tensor l.  Summation order fixed (common/coef_grad.h), so the result is the same bits on every thread
//   count and on CPU and CUDA.
#pragma once

#define CALM_FAST_OP_SCHEMAS(X)                                                                      \
  X("build_info() -> str")                                                                           \
  X("abs_histogram_(Tensor(a!) hist, Tensor[] inputs, Tensor[] base, int num_tasks, Tensor? prefix, " \
    "float dare_p, Tensor? dare_keys, bool dare_rescale) -> ()")                                     \
  X("abs_bracket(Tensor[] inputs, Tensor[] base, int num_tasks, Tensor lo, Tensor hi, int capacity, "    \
    "float dare_p, Tensor? dare_keys, bool dare_rescale) -> (Tensor, Tensor)")                       \
  X("abs_kth_per_tensor(Tensor[] inputs, Tensor[] base, int num_tasks, Tensor ks, float dare_p, "     \
    "Tensor? dare_keys, bool dare_rescale) -> Tensor")                                               \
  X("weighted_merge(Tensor[] inputs, Tensor[] base, int num_tasks, Tensor weights, float scale, "    \
    "Tensor? thresholds, bool strict, Tensor[] masks, float dare_p, Tensor? dare_keys, "             \
    "bool dare_rescale, bool out_float) -> (Tensor[], Tensor)")                                      \
  X("ties_merge(Tensor[] inputs, Tensor[] base, int num_tasks, Tensor thresholds, bool strict, "     \
    "Tensor weights, str merge, float scale, Tensor zero_sign, float dare_p, Tensor? dare_keys, "    \
    "bool dare_rescale, bool out_float, int max_positions) "                                         \
    "-> (Tensor[], Tensor, Tensor, Tensor, Tensor, Tensor)")                                         \
  X("consensus_merge(Tensor[] inputs, Tensor[] base, int num_tasks, Tensor tall_lambdas, "           \
    "Tensor[] mtl, int min_count, float alpha, bool return_masks, bool out_float) "                  \
    "-> (Tensor[], Tensor[], Tensor)")                                                               \
  X("calm_interpolate(Tensor[] base, Tensor[] tau_prev, Tensor[] tau_new, Tensor[] R, str interp_mode, " \
    "bool out_float) -> Tensor[]")                                                                   \
  X("calm_accumulate_(Tensor(a!)[] A, Tensor[] grad, Tensor[] tau_prev, Tensor[] tau_new, float eta, " \
    "bool faithful) -> ()")                                                                          \
  X("calm_mask_step_(Tensor(a!)[] R, Tensor(b!)[] A, float alpha, bool faithful, Tensor(c!)[] theta, " \
    "Tensor[] base, Tensor[] tau_prev, Tensor[] tau_new, str interp_mode) -> Tensor")               \
  X("calm_binarize_merge(Tensor[] tau_prev, Tensor[] tau_new, Tensor[] R) -> (Tensor[], Tensor)")       \
  X("doge_row_grad_(Tensor(a!) grad, Tensor tau, Tensor delta, Tensor e, Tensor lam_sum) -> Tensor")  \
  X("doge_adam_(Tensor(a!) param, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor grad, float beta1, " \
    "float beta2, float neg_step_size, float bias_correction2_sqrt, float eps) -> ()")             \
  X("coef_grad(Tensor[] grads, Tensor[] inputs, Tensor[] base, int num_tasks, Tensor? thresholds, bool strict, " \
    "Tensor[] masks) -> Tensor")
