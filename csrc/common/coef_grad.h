// coef_grad (AdaMerging's coefficient gradient, ALGORITHMS.md §6): out[t, l] = <grads[l], keep * tau_{t,l}>.
// Shared by the CPU kernel (csrc/cpu/coef_grad_cpu.cpp) and the CUDA kernel (csrc/cuda/coef_grad.cu): the
// argument checks and the summation order, which both follow exactly, so the result is the same bits on
// every thread count, grid and device.
//
// Summation order of one (t, l) pair (n = numel of tensor l):
//   1. p_i = float(g_i) * v_i, one fp32 rounding, where v_i = tau_i (fp32: float(x_i) - float(base_i), as
//      weighted_merge) if kept by the trim (|tau| >= threshold, > when strict) and the mask, else 0.
//   2. Blocks of kCoefBlock = 1024 consecutive elements (the last one shorter).  In block b, lane k < 32 sums
//      p_{1024 b + k + 32 j}, j = 0, 1, ..., 31 ascending (indices past n skipped), in fp32 starting from +0.
//      The 32 lane sums are converted to fp64 and combined by the tree s[k] = s[k] + s[k + h] for
//      h = 16, 8, 4, 2, 1: the block sum B_b (fp64).  (A warp's xor butterfly gives exactly this tree.)
//   3. The block sums of the tensor: lane k sums B_{k + 32 j}, j ascending, in fp64 from +0, then the same
//      tree; out[t, l] = float(total) (round to nearest).  An empty tensor gives 0.
// Error bound against the exact dot product: each fp32 lane adds at most 32 products, so
//   |out - exact| <= (34 u32 + 50 u64) * sum_i |g_i v_i| + u32 |exact|,  u32 = 2^-24, u64 = 2^-53
// (products and 31 additions in fp32, the rest in fp64).  inf / NaN propagate by IEEE rules (a dropped
// element contributes g * 0, which is NaN where g is inf or NaN, as torch computes g * (keep * tau)).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>
#include <vector>

#include "common/tensor_list.h"

namespace calm_fast {

constexpr int64_t kCoefBlock = 1024;  // elements per block (a multiple of 32: 32 lanes x 32 elements)
constexpr int kCoefLanes = 32;

inline int64_t coef_blocks(int64_t numel) { return (numel + kCoefBlock - 1) / kCoefBlock; }

// The argument checks of coef_grad (one copy for CPU and CUDA).  Returns the validated list shape, the
// mask kind (0 none, 1 bool, 2 packed) and the thresholds table (undefined when absent).
struct CoefGradArgs {
  TaskList tl;
  int mask_kind = 0;
  at::Tensor thresholds;
  at::ScalarType grad_dtype = at::kFloat;
  std::vector<int64_t> start;  // [L + 1] first block of tensor l (exclusive prefix sum of block counts)
};

inline CoefGradArgs check_coef_grad(at::TensorList grads, at::TensorList inputs, at::TensorList base,
                                    int64_t num_tasks, const c10::optional<at::Tensor>& thresholds,
                                    at::TensorList masks) {
  constexpr const char* op = "calm_fast.coef_grad";
  CoefGradArgs a;
  a.tl = check_task_list(op, inputs, base, num_tasks);
  const TaskList& tl = a.tl;
  TORCH_CHECK(static_cast<int64_t>(grads.size()) == tl.L, op, ": grads has ", grads.size(),
              " tensors but inputs hold ", tl.L, " tensors per task");
  if (thresholds.has_value()) a.thresholds = check_table(op, "thresholds", *thresholds, tl, at::kFloat);
  a.mask_kind = check_masks(op, masks, tl);
  if (tl.L > 0) {
    a.grad_dtype = grads[0].scalar_type();
    TORCH_CHECK(a.grad_dtype == at::kFloat || a.grad_dtype == tl.dtype, op, ": grads must be float32 or the inputs' ",
                "dtype (", tl.dtype, "), got ", a.grad_dtype);
  }
  for (int64_t l = 0; l < tl.L; ++l) {
    const at::Tensor& g = grads[l];
    TORCH_CHECK(g.defined(), op, ": grads[", l, "] is undefined");
    TORCH_CHECK(g.scalar_type() == a.grad_dtype, op, ": grads[", l, "] has dtype ", g.scalar_type(),
                " but grads[0] has ", a.grad_dtype, " (one dtype per list)");
    TORCH_CHECK(g.device() == tl.device, op, ": grads[", l, "] is on ", g.device(), " but inputs are on ", tl.device);
    TORCH_CHECK(g.is_contiguous(), op, ": grads[", l, "] must be contiguous");
    TORCH_CHECK(g.numel() == tl.numel[l], op, ": grads[", l, "] has shape ", g.sizes(), " (", g.numel(),
                " elements) but tensor ", l, " has shape ", inputs[l].sizes(), " (", tl.numel[l], " elements)");
  }
  a.start.assign(static_cast<size_t>(tl.L + 1), 0);
  for (int64_t l = 0; l < tl.L; ++l) a.start[l + 1] = a.start[l] + coef_blocks(tl.numel[l]);
  return a;
}

// Step 2's / 3's tree over 32 fp64 lane sums (destroys s; returns the sum).
inline double coef_lane_tree(double* s) {
  for (int h = kCoefLanes / 2; h > 0; h /= 2)
    for (int k = 0; k < h; ++k) s[k] = s[k] + s[k + h];
  return s[0];
}

// Step 3 on the host: the total of nb block sums (fp64), in the lane order above.
inline double coef_combine_blocks(const double* blocks, int64_t nb) {
  double s[kCoefLanes];
  for (int k = 0; k < kCoefLanes; ++k) s[k] = 0.0;
  for (int64_t b = 0; b < nb; ++b) s[b % kCoefLanes] = s[b % kCoefLanes] + blocks[b];
  return coef_lane_tree(s);
}

}  // namespace calm_fast
