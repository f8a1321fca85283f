// CUDA kernels of DOGE_TA's projected optimisation (ALGORITHMS.md §9.1; schemas in common/schemas.h; CPU
// versions in csrc/cpu/doge_cpu.cpp, whose results these equal bit for bit).
//
// doge_row_grad_: one warp per row (b, a) of a batch of B same-shape layers (every layer of one shape in
//   ONE launch: 400 iterations are 400 launches per shape, not 400 x layers).  Lane k reads elements
//   k, k + 32, ... of tau_j[a, :] and delta[a, :] (coalesced), the 32 partial dot products are combined by
//   warp_allreduce (xor butterfly: the tree of common/doge_math.h on every lane), each lane then holds
//   r_j = e_j - Lambda q_j; lane 0 parks the T residuals in shared memory for the gradient pass
//   G[a, i] = -2 Lambda sum_j r_j tau_j[a, i] (tau's row is then read a second time, mostly from L1/L2)
//   and writes the row's sum of r_j^2.  A second tiny launch sums the row losses of each layer in row
//   order (fp64), as the CPU does.
//   Bytes per iteration: 2 T b reads of tau (b = 4 fp32), b of delta, b written of G per element.
// doge_adam_: elementwise grid-stride loop, 16 B read + 12 B written per fp32 element.
#include "cuda/cuda_compat.cuh"
#include "cuda/block_ops.cuh"

#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>

#include "common/doge_checks.h"
#include "common/doge_math.h"

namespace calm_fast {
namespace cuda_doge {  // own namespace: all .cu files share one translation unit under the emulator

constexpr int kRowThreads = 256;  // 8 warps = 8 rows per block
constexpr int kRowWarps = kRowThreads / kWarpSize;
constexpr int kAdamThreads = 256;
constexpr int kBlocksPerSm = 8;

template <typename S>
__global__ void __launch_bounds__(kRowThreads) row_grad_kernel(S* G, const S* tau, const S* delta, const S* e,
                                                               const S* lam, S* row_loss, int64_t B, int64_t T,
                                                               int64_t m, int64_t n) {
  CF_DYNAMIC_SHARED(unsigned char, smem_raw);
  S* rbuf = reinterpret_cast<S*>(smem_raw) + static_cast<int64_t>(warp_id()) * T;  // this warp's T residuals
  const unsigned lane = lane_id();
  const int64_t rows = B * m;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kRowWarps + warp_id(); row < rows;
       row += static_cast<int64_t>(gridDim.x) * kRowWarps) {
    const int64_t b = row / m, a = row % m;
    const S L = lam[b];
    const S* d = delta + row * n;
    S rl = S(0);
    for (int64_t j = 0; j < T; ++j) {
      const S* t = tau + ((b * T + j) * m + a) * n;
      S p = S(0);
      for (int64_t i = lane; i < n; i += kWarpSize) p = p + t[i] * d[i];
      const S q = warp_allreduce(p, SumOp{});
      const S r = doge_residual(e[(b * T + j) * m + a], L, q);
      rl = rl + r * r;
      if (lane == 0) rbuf[j] = r;
    }
    __syncwarp();
    const S c = S(-2) * L;
    S* g = G + row * n;
    for (int64_t i = lane; i < n; i += kWarpSize) {
      S acc = rbuf[0] * tau[((b * T) * m + a) * n + i];
      for (int64_t j = 1; j < T; ++j) acc = acc + rbuf[j] * tau[((b * T + j) * m + a) * n + i];
      g[i] = c * acc;
    }
    if (lane == 0) row_loss[row] = rl;
    __syncwarp();  // rbuf is rewritten by this warp's next row
  }
}

// loss[b] = sum over rows a (in order, fp64) of row_loss[b, a]: one thread per layer.
template <typename S>
__global__ void layer_loss_kernel(const S* row_loss, double* loss, int64_t B, int64_t m) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  double acc = 0.0;
  for (int64_t a = 0; a < m; ++a) acc += static_cast<double>(row_loss[b * m + a]);
  loss[b] = acc;
}

template <typename S>
__global__ void __launch_bounds__(kAdamThreads) adam_kernel(S* p, S* m, S* v, const S* g, int64_t n,
                                                            DogeAdamConsts<S> k) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    S pi = p[i], mi = m[i], vi = v[i];
    doge_adam_element(pi, mi, vi, g[i], k);
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
  }
}

int64_t grid_for(int64_t work_blocks, int device) {
  return std::max<int64_t>(1, std::min<int64_t>(work_blocks, int64_t{cf_num_sms(device)} * kBlocksPerSm));
}

template <typename S>
void row_grad_launch(const DogeRowShape& s, at::Tensor& grad, const at::Tensor& tau, const at::Tensor& delta,
                     const at::Tensor& e, const at::Tensor& lam_sum, at::Tensor& loss) {
  const int device = tau.device().index();
  const int64_t rows = s.B * s.m;
  at::Tensor row_loss = at::zeros({rows}, tau.options());
  const size_t smem = static_cast<size_t>(kRowWarps) * static_cast<size_t>(s.T) * sizeof(S);
  TORCH_CHECK(smem <= 48 * 1024, "doge_row_grad_: too many tasks for one launch (T = ", s.T, ")");
  CF_LAUNCH(row_grad_kernel<S>, grid_for((rows + kRowWarps - 1) / kRowWarps, device), kRowThreads, smem,
            cf_current_stream(device), grad.data_ptr<S>(), tau.data_ptr<S>(), delta.data_ptr<S>(), e.data_ptr<S>(),
            lam_sum.data_ptr<S>(), row_loss.data_ptr<S>(), s.B, s.T, s.m, s.n);
  CF_LAUNCH(layer_loss_kernel<S>, (s.B + 127) / 128, 128, 0, cf_current_stream(device), row_loss.data_ptr<S>(),
            loss.data_ptr<double>(), s.B, s.m);
}

at::Tensor doge_row_grad_cuda(at::Tensor grad, const at::Tensor& tau, const at::Tensor& delta, const at::Tensor& e,
                              const at::Tensor& lam_sum) {
  const DogeRowShape s = check_doge_row_grad(grad, tau, delta, e, lam_sum);
  CF_DEVICE_GUARD(tau.device().index());
  at::Tensor loss = at::zeros({s.B}, tau.options().dtype(at::kDouble));
  if (s.B * s.m == 0) return loss;
  if (tau.scalar_type() == at::kFloat) {
    row_grad_launch<float>(s, grad, tau, delta, e, lam_sum, loss);
  } else {
    row_grad_launch<double>(s, grad, tau, delta, e, lam_sum, loss);
  }
  return loss;
}

template <typename S>
void adam_launch(at::Tensor& param, at::Tensor& exp_avg, at::Tensor& exp_avg_sq, const at::Tensor& grad,
                 const DogeAdamConsts<S>& k) {
  const int device = param.device().index();
  const int64_t n = param.numel();
  CF_LAUNCH(adam_kernel<S>, grid_for((n + kAdamThreads - 1) / kAdamThreads, device), kAdamThreads, 0,
            cf_current_stream(device), param.data_ptr<S>(), exp_avg.data_ptr<S>(), exp_avg_sq.data_ptr<S>(),
            grad.data_ptr<S>(), n, k);
}

void doge_adam_cuda(at::Tensor param, at::Tensor exp_avg, at::Tensor exp_avg_sq, const at::Tensor& grad, double beta1,
                    double beta2, double neg_step_size, double bias_correction2_sqrt, double eps) {
  check_doge_adam(param, exp_avg, exp_avg_sq, grad);
  if (param.numel() == 0) return;
  CF_DEVICE_GUARD(param.device().index());
  if (param.scalar_type() == at::kFloat) {
    adam_launch<float>(param, exp_avg, exp_avg_sq, grad,
                       doge_adam_consts<float>(beta1, beta2, neg_step_size, bias_correction2_sqrt, eps));
  } else {
    adam_launch<double>(param, exp_avg, exp_avg_sq, grad,
                        doge_adam_consts<double>(beta1, beta2, neg_step_size, bias_correction2_sqrt, eps));
  }
}

}  // namespace cuda_doge
}  // namespace calm_fast

CF_CUDA_LIBRARY_IMPL(m) {
  m.impl("doge_row_grad_", &calm_fast::cuda_doge::doge_row_grad_cuda);
  m.impl("doge_adam_", &calm_fast::cuda_doge::doge_adam_cuda);
}
