// DOGE_TA's per-row and per-element arithmetic (ALGORITHMS.md §9.1), shared verbatim by the CPU kernels
// (csrc/cpu/doge_cpu.cpp), the CUDA kernels (csrc/cuda/doge.cu) and the emulated CUDA build, so that
// "CUDA == CPU, bit for bit" depends on indexing alone.
//
// Row reduction order (doge_row_grad_): a row of n elements is summed in kDogeLanes = 32 strided partial
// sums (lane k adds elements k, k + 32, k + 64, ... in that order, starting from 0), then combined by the
// tree p[k] = p[k] + p[k + s] for s = 16, 8, 4, 2, 1 (a warp's xor-butterfly gives exactly this on every
// lane, since each pair adds the same two values).
//
// Adam (doge_adam_) reproduces torch.optim.Adam's single-tensor CPU step (no weight decay, no amsgrad):
//   exp_avg.lerp_(g, 1 - beta1)        ATen's lerp: m + w (g - m) as ONE fused multiply-add (w < 0.5, i.e.
//                                      beta1 > 0.5, the case checked against torch), else g - (g - m)(1 - w)
//                                      (ATen's scalar formula; not checked bit for bit)
//   exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)   v beta2, then fma((1 - beta2) g, g, v beta2)
//   denom = exp_avg_sq.sqrt() / bias_correction2_sqrt + eps
//   param.addcdiv_(exp_avg, denom, value=-step_size)          p + (-step_size * m) / denom
// with every Python-float scalar rounded to the tensor dtype, as ATen does.  (These orders were read off
// torch 2.x's CPU kernels by probing; tests/test_doge_ops.py checks them against torch.optim.Adam.)  The
// square root is the correctly rounded one; torch's vectorised CPU sqrt is off by one ulp on some inputs,
// so the parameter can differ from torch.optim.Adam by an ulp where that happens (m and v never do).
#pragma once

#include <cmath>
#include <cstdint>

#include "common/elementwise.h"  // CF_HD

namespace calm_fast {

constexpr int kDogeLanes = 32;

CF_HD float cf_fma(float a, float b, float c) { return ::fmaf(a, b, c); }
CF_HD double cf_fma(double a, double b, double c) { return ::fma(a, b, c); }
CF_HD float cf_sqrt(float a) { return ::sqrtf(a); }
CF_HD double cf_sqrt(double a) { return ::sqrt(a); }

// The scalars of one Adam step, rounded to the tensor dtype S (built on the host from doubles).
template <typename S>
struct DogeAdamConsts {
  S w1;          // 1 - beta1 (lerp weight)
  S one_minus_w1;  // 1 - w1, used when w1 >= 0.5
  bool small;    // |w1| < 0.5
  S beta2;
  S c2;          // 1 - beta2
  S neg_step;    // -lr / (1 - beta1^k)
  S bc2_sqrt;    // (1 - beta2^k) ** 0.5
  S eps;
};

template <typename S>
inline DogeAdamConsts<S> doge_adam_consts(double beta1, double beta2, double neg_step, double bc2_sqrt, double eps) {
  DogeAdamConsts<S> k;
  k.w1 = static_cast<S>(1.0 - beta1);
  k.one_minus_w1 = static_cast<S>(1) - k.w1;
  k.small = (k.w1 < static_cast<S>(0.5)) && (k.w1 > static_cast<S>(-0.5));
  k.beta2 = static_cast<S>(beta2);
  k.c2 = static_cast<S>(1.0 - beta2);
  k.neg_step = static_cast<S>(neg_step);
  k.bc2_sqrt = static_cast<S>(bc2_sqrt);
  k.eps = static_cast<S>(eps);
  return k;
}

// One element of Adam, in place.
template <typename S>
CF_HD void doge_adam_element(S& p, S& m, S& v, S g, const DogeAdamConsts<S>& k) {
  const S mn = k.small ? cf_fma(k.w1, g - m, m) : g - (g - m) * k.one_minus_w1;
  const S vn = cf_fma(k.c2 * g, g, v * k.beta2);
  const S denom = cf_sqrt(vn) / k.bc2_sqrt + k.eps;
  p = p + (k.neg_step * mn) / denom;
  m = mn;
  v = vn;
}

// r_j = e_j - Lambda q_j (the per-row residual of task j), one expression for every backend.
template <typename S>
CF_HD S doge_residual(S e, S lam, S q) {
  return e - lam * q;
}

}  // namespace calm_fast
