// CPU kernels of DOGE_TA's projected optimisation (ALGORITHMS.md §9.1; schemas in common/schemas.h):
//   doge_row_grad_  the closed-form gradient G = -2 Lambda sum_j r_j tau_j[a, :] and the loss sum r_j^2, for
//                   a batch of B same-shape layers, one parallel work item per row (b, a);
//   doge_adam_      torch.optim.Adam's step, one pass over param / exp_avg / exp_avg_sq / grad.
// The arithmetic is common/doge_math.h's, in the CUDA kernels' order, so both give the same bits.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/doge_checks.h"
#include "common/doge_math.h"

namespace calm_fast {
namespace cpu {
namespace {

// <x, y> over n elements in the kDogeLanes-lane order of common/doge_math.h.
template <typename S>
S lane_dot(const S* x, const S* y, int64_t n) {
  S p[kDogeLanes];
  for (int k = 0; k < kDogeLanes; ++k) p[k] = S(0);
  int64_t i = 0;
  for (; i + kDogeLanes <= n; i += kDogeLanes) {
    for (int k = 0; k < kDogeLanes; ++k) p[k] = p[k] + x[i + k] * y[i + k];
  }
  for (int k = 0; i + k < n; ++k) p[k] = p[k] + x[i + k] * y[i + k];
  for (int s = kDogeLanes / 2; s > 0; s /= 2) {
    for (int k = 0; k < s; ++k) p[k] = p[k] + p[k + s];
  }
  return p[0];
}

template <typename S>
void row_grad_impl(const DogeRowShape& s, S* G, const S* tau, const S* delta, const S* e, const S* lam,
                   double* loss) {
  const int64_t B = s.B, T = s.T, m = s.m, n = s.n, rows = B * m;
  std::vector<S> row_loss(static_cast<size_t>(rows));
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, T * n));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    std::vector<S> r(static_cast<size_t>(T));
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t b = row / m, a = row % m;
      const S L = lam[b];
      const S* d = delta + row * n;
      auto tau_row = [&](int64_t j) { return tau + ((b * T + j) * m + a) * n; };
      for (int64_t j = 0; j < T; ++j) r[j] = doge_residual(e[(b * T + j) * m + a], L, lane_dot(tau_row(j), d, n));
      // G[a, :] = c * sum_j r_j tau_j[a, :], the sum in task order starting from r_0 tau_0.
      S* g = G + row * n;
      const S* t0 = tau_row(0);
      const S r0v = r[0];
      for (int64_t i = 0; i < n; ++i) g[i] = r0v * t0[i];
      for (int64_t j = 1; j < T; ++j) {
        const S* tj = tau_row(j);
        const S rj = r[j];
        for (int64_t i = 0; i < n; ++i) g[i] = g[i] + rj * tj[i];
      }
      const S c = S(-2) * L;
      for (int64_t i = 0; i < n; ++i) g[i] = c * g[i];
      S rl = S(0);
      for (int64_t j = 0; j < T; ++j) rl = rl + r[j] * r[j];
      row_loss[row] = rl;
    }
  });
  for (int64_t b = 0; b < B; ++b) {
    double acc = 0.0;
    for (int64_t a = 0; a < m; ++a) acc += static_cast<double>(row_loss[b * m + a]);
    loss[b] = acc;
  }
}

at::Tensor doge_row_grad_cpu(at::Tensor grad, const at::Tensor& tau, const at::Tensor& delta, const at::Tensor& e,
                             const at::Tensor& lam_sum) {
  const DogeRowShape s = check_doge_row_grad(grad, tau, delta, e, lam_sum);
  at::Tensor loss = at::zeros({s.B}, tau.options().dtype(at::kDouble));
  if (s.B * s.m == 0) return loss;
  if (tau.scalar_type() == at::kFloat) {
    row_grad_impl<float>(s, grad.data_ptr<float>(), tau.data_ptr<float>(), delta.data_ptr<float>(),
                         e.data_ptr<float>(), lam_sum.data_ptr<float>(), loss.data_ptr<double>());
  } else {
    row_grad_impl<double>(s, grad.data_ptr<double>(), tau.data_ptr<double>(), delta.data_ptr<double>(),
                          e.data_ptr<double>(), lam_sum.data_ptr<double>(), loss.data_ptr<double>());
  }
  return loss;
}

template <typename S>
void adam_impl(S* p, S* m, S* v, const S* g, int64_t n, const DogeAdamConsts<S>& k) {
  at::parallel_for(0, n, int64_t{1} << 15, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) doge_adam_element(p[i], m[i], v[i], g[i], k);
  });
}

void doge_adam_cpu(at::Tensor param, at::Tensor exp_avg, at::Tensor exp_avg_sq, const at::Tensor& grad, double beta1,
                   double beta2, double neg_step_size, double bias_correction2_sqrt, double eps) {
  check_doge_adam(param, exp_avg, exp_avg_sq, grad);
  const int64_t n = param.numel();
  if (n == 0) return;
  if (param.scalar_type() == at::kFloat) {
    adam_impl<float>(param.data_ptr<float>(), exp_avg.data_ptr<float>(), exp_avg_sq.data_ptr<float>(),
                     grad.data_ptr<float>(), n,
                     doge_adam_consts<float>(beta1, beta2, neg_step_size, bias_correction2_sqrt, eps));
  } else {
    adam_impl<double>(param.data_ptr<double>(), exp_avg.data_ptr<double>(), exp_avg_sq.data_ptr<double>(),
                      grad.data_ptr<double>(), n,
                      doge_adam_consts<double>(beta1, beta2, neg_step_size, bias_correction2_sqrt, eps));
  }
}

}  // namespace
}  // namespace cpu
}  // namespace calm_fast

TORCH_LIBRARY_IMPL(calm_fast, CPU, m) {
  m.impl("doge_row_grad_", &calm_fast::cpu::doge_row_grad_cpu);
  m.impl("doge_adam_", &calm_fast::cpu::doge_adam_cpu);
}
