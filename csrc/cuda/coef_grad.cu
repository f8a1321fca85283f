// CUDA kernel of coef_grad (AdaMerging's coefficient gradient, ALGORITHMS.md §6; schema in common/schemas.h;
// CPU version in csrc/cpu/coef_grad_cpu.cpp, whose results these equal bit for bit).
//
// The summation order is common/coef_grad.h's, mapped onto warps:
//   coef_block_kernel    one warp per 1024-element block of one tensor (blocks of 8 warps grid-stride over the
//                        list's blocks; a block's tensor is found by binary search over the block starts, as
//                        the merge kernels do).  Lane k holds the gradient of elements k + 32 j (j < 32) in
//                        registers (read once), then per task t sums g * v over its 32 elements in fp32
//                        (v = kept tau, exactly the merge's load_tau / trim_keep / mask rules), and the warp's
//                        xor butterfly over the fp64 lane sums is the fixed tree; lane 0 stores the block's
//                        sum in its own slot of a [T, blocks] fp64 buffer (no atomics: deterministic).
//   coef_combine_kernel  one warp per (t, l): lane k sums that pair's block sums k, k + 32, ... in fp64, the
//                        butterfly again, lane 0 writes float(total).
// Products and sums are written with __fmul_rn / __fadd_rn (never contracted into FMAs), so every rounding is
// the CPU kernel's.
//
// Bytes moved per element of the model: T b (inputs) + b (base, if any) + g (grads: 4, or b) read, plus the
// masks (T bytes bool / T/8 packed); writes and the second kernel are O(blocks * T) = 8 T bytes per 1024
// elements (< 1 %).  Loads are coalesced (a warp reads 32 consecutive elements per instruction, 32 in flight
// per lane per task).  e.g. T = 8 fp32 with base: 40 B per element, 88M parameters = 3.5 GB: ~1.2 ms at
// 3 TB/s of HBM3.
#include "cuda/cuda_compat.cuh"
#include "cuda/block_ops.cuh"
#include "cuda/device_table.cuh"

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/coef_grad.h"
#include "common/elementwise.h"
#include "common/tensor_list.h"
#include "cpu/cpu_common.h"  // CF_DISPATCH_FLOAT: the same host-side dispatch as the CPU op

namespace calm_fast {
namespace cuda_coef {  // own namespace: all .cu files share one translation unit under the emulator

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kPerLane = static_cast<int>(kCoefBlock / kCoefLanes);  // 32 elements per lane and block
constexpr int kBlocksPerSm = 8;



// Device view of the host-built int64 table (all sections point into one device tensor).
struct Table {
  const int64_t* in;     // [T*L] input pointers, task-major
  const int64_t* base;   // [L] base pointers, 0 without a base
  const int64_t* grad;   // [L] gradient pointers
  const int64_t* mask;   // [T*L] mask pointers (0 without masks)
  const int64_t* numel;  // [L]
  const int64_t* start;  // [L+1] first block of tensor l
};

struct Args {
  const float* thresholds;  // [T, L] or null
  bool strict;
  int mask_kind;  // 0 none, 1 bool, 2 packed
  double* partial;  // [T, blocks]
  float* out;       // [T, L]
};

template <typename scalar_t, typename grad_t>
__global__ void __launch_bounds__(kThreads) coef_block_kernel(Table tab, int64_t T, int64_t L, int64_t blocks, Args a) {
  const unsigned lane = lane_id();
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * kWarps + warp_id(); c < blocks;
       c += static_cast<int64_t>(gridDim.x) * kWarps) {  // warp-uniform
    const Chunk ch = chunk_of(tab, L, c, kCoefBlock);
    const scalar_t* bs = as_ptr<const scalar_t>(tab.base[ch.l]);
    const grad_t* gp = as_ptr<const grad_t>(tab.grad[ch.l]);
    float g[kPerLane];
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int64_t i = ch.begin + lane + int64_t{j} * kCoefLanes;
      g[j] = i < ch.end ? static_cast<float>(gp[i]) : 0.f;
    }
    for (int64_t t = 0; t < T; ++t) {
      const int64_t ti = t * L + ch.l;
      const scalar_t* in = as_ptr<const scalar_t>(tab.in[ti]);
      const float thr = a.thresholds != nullptr ? a.thresholds[ti] : 0.f;
      const uint8_t* m = a.mask_kind != 0 ? as_ptr<const uint8_t>(tab.mask[ti]) : nullptr;
      float acc = 0.f;
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) {
        const int64_t i = ch.begin + lane + int64_t{j} * kCoefLanes;
        if (i >= ch.end) continue;  // = the CPU's +0 padding: a lane sum from +0 is never -0
        float v = load_tau(in, bs, i);
        if (a.thresholds != nullptr) v = trim_keep(v, thr, a.strict) ? v : 0.f;
        if (a.mask_kind == 1) {
          v = m[i] != 0 ? v : 0.f;
        } else if (a.mask_kind == 2) {
          v = ((m[i >> 3] >> (i & 7)) & 1) ? v : 0.f;
        }
        acc = add_rn(acc, mul_rn(g[j], v));
      }
      const double s = warp_allreduce(static_cast<double>(acc), SumOp{});  // the tree of common/coef_grad.h
      if (lane == 0) a.partial[t * blocks + c] = s;
    }
  }
}

__global__ void __launch_bounds__(kThreads) coef_combine_kernel(const int64_t* start, int64_t T, int64_t L,
                                                                  int64_t blocks, const double* partial, float* out) {
  const int64_t pair = static_cast<int64_t>(blockIdx.x) * kWarps + warp_id();  // t * L + l
  if (pair >= T * L) return;  // warp-uniform
  const int64_t t = pair / L, l = pair % L;
  const double* p = partial + t * blocks + start[l];
  const int64_t nb = start[l + 1] - start[l];
  double s = 0.0;
  for (int64_t b = lane_id(); b < nb; b += kCoefLanes) s = s + p[b];
  s = warp_allreduce(s, SumOp{});
  if (lane_id() == 0) out[pair] = static_cast<float>(s);
}

inline int64_t ptr_bits(const at::Tensor& x) { return reinterpret_cast<int64_t>(x.data_ptr()); }

at::Tensor coef_grad_cuda(at::TensorList grads, at::TensorList inputs, at::TensorList base, int64_t num_tasks,
                          const c10::optional<at::Tensor>& thresholds, bool strict, at::TensorList masks) {
  const CoefGradArgs ca = check_coef_grad(grads, inputs, base, num_tasks, thresholds, masks);
  const TaskList& tl = ca.tl;
  const int64_t T = tl.T, L = tl.L;
  at::Tensor out = at::empty({T, L}, at::TensorOptions().dtype(at::kFloat).device(tl.device));
  if (L == 0) return out;
  CF_DEVICE_GUARD(tl.device.index());
  // in[T*L] | base[L] | grad[L] | mask[T*L] | numel[L] | start[L+1]
  std::vector<int64_t> h(static_cast<size_t>(2 * T * L + 4 * L + 1), 0);
  int64_t* p_in = h.data();
  int64_t* p_base = p_in + T * L;
  int64_t* p_grad = p_base + L;
  int64_t* p_mask = p_grad + L;
  int64_t* p_numel = p_mask + T * L;
  int64_t* p_start = p_numel + L;
  for (int64_t i = 0; i < T * L; ++i) {
    p_in[i] = ptr_bits(inputs[i]);
    p_mask[i] = masks.empty() ? 0 : ptr_bits(masks[i]);
  }
  for (int64_t l = 0; l < L; ++l) {
    p_base[l] = tl.has_base ? ptr_bits(base[l]) : 0;
    p_grad[l] = ptr_bits(grads[l]);
    p_numel[l] = tl.numel[l];
  }
  for (int64_t l = 0; l <= L; ++l) p_start[l] = ca.start[l];
  const int64_t blocks = ca.start[L];
  const at::Tensor dev = upload_table(h, tl.device);
  const int64_t* d = dev.data_ptr<int64_t>();
  Table tab;
  tab.in = d;
  tab.base = tab.in + T * L;
  tab.grad = tab.base + L;
  tab.mask = tab.grad + L;
  tab.numel = tab.mask + T * L;
  tab.start = tab.numel + L;
  at::Tensor partial = at::empty({T, std::max<int64_t>(blocks, 1)}, out.options().dtype(at::kDouble));
  Args a;
  a.thresholds = ca.thresholds.defined() ? ca.thresholds.data_ptr<float>() : nullptr;
  a.strict = strict;
  a.mask_kind = ca.mask_kind;
  a.partial = partial.data_ptr<double>();
  a.out = out.data_ptr<float>();
  const int device = tl.device.index();
  const cf_stream_t stream = cf_current_stream(device);
  if (blocks > 0) {
    const int64_t grid = std::max<int64_t>(
        1, std::min<int64_t>((blocks + kWarps - 1) / kWarps, int64_t{cf_num_sms(device)} * kBlocksPerSm));
    CF_DISPATCH_FLOAT(tl.dtype, [&] {
      if (ca.grad_dtype == at::kFloat) {
        auto kernel = coef_block_kernel<scalar_t, float>;
        CF_LAUNCH(kernel, grid, kThreads, 0, stream, tab, T, L, blocks, a);
      } else {
        auto kernel = coef_block_kernel<scalar_t, scalar_t>;
        CF_LAUNCH(kernel, grid, kThreads, 0, stream, tab, T, L, blocks, a);
      }
    });
  }
  CF_LAUNCH(coef_combine_kernel, (T * L + kWarps - 1) / kWarps, kThreads, 0, stream, tab.start, T, L, blocks,
            a.partial, a.out);
  return out;
}

}  // namespace cuda_coef
}  // namespace calm_fast

CF_CUDA_LIBRARY_IMPL(m) { m.impl("coef_grad", &calm_fast::cuda_coef::coef_grad_cuda); }
