// Host-side argument checks of the DOGE ops, shared by the CPU and CUDA implementations (one copy, so
// both backends reject the same inputs with the same message).  Shapes: see common/schemas.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace calm_fast {

struct DogeRowShape {
  int64_t B = 0, T = 0, m = 0, n = 0;
};

inline void doge_check_tensor(const char* op, const char* what, const at::Tensor& x, const at::Tensor& ref) {
  TORCH_CHECK(x.defined(), op, ": ", what, " is undefined");
  TORCH_CHECK(x.scalar_type() == ref.scalar_type(), op, ": ", what, " has dtype ", x.scalar_type(), ", expected ",
              ref.scalar_type(), " (one dtype per call)");
  TORCH_CHECK(x.device() == ref.device(), op, ": ", what, " is on ", x.device(), ", expected ", ref.device());
  TORCH_CHECK(x.is_contiguous(), op, ": ", what, " must be contiguous");
}

// grad [B, m, n] (written), tau [B, T, m, n], delta [B, m, n], e [B, T, m], lam_sum [B]; float32 or float64.
inline DogeRowShape check_doge_row_grad(const at::Tensor& grad, const at::Tensor& tau, const at::Tensor& delta,
                                        const at::Tensor& e, const at::Tensor& lam_sum) {
  const char* op = "doge_row_grad_";
  TORCH_CHECK(tau.defined() && tau.dim() == 4, op, ": tau must be [B, T, m, n], got ", tau.sizes());
  TORCH_CHECK(tau.scalar_type() == at::kFloat || tau.scalar_type() == at::kDouble, op,
              ": tensors must be float32 or float64, got ", tau.scalar_type());
  doge_check_tensor(op, "tau", tau, tau);
  DogeRowShape s{tau.size(0), tau.size(1), tau.size(2), tau.size(3)};
  TORCH_CHECK(s.T >= 1, op, ": tau holds no task (T = 0)");
  doge_check_tensor(op, "grad", grad, tau);
  doge_check_tensor(op, "delta", delta, tau);
  doge_check_tensor(op, "e", e, tau);
  doge_check_tensor(op, "lam_sum", lam_sum, tau);
  TORCH_CHECK(grad.dim() == 3 && grad.size(0) == s.B && grad.size(1) == s.m && grad.size(2) == s.n, op,
              ": grad must be [B, m, n] = [", s.B, ", ", s.m, ", ", s.n, "], got ", grad.sizes());
  TORCH_CHECK(delta.dim() == 3 && delta.size(0) == s.B && delta.size(1) == s.m && delta.size(2) == s.n, op,
              ": delta must be [B, m, n] = [", s.B, ", ", s.m, ", ", s.n, "], got ", delta.sizes());
  TORCH_CHECK(e.dim() == 3 && e.size(0) == s.B && e.size(1) == s.T && e.size(2) == s.m, op,
              ": e must be [B, T, m] = [", s.B, ", ", s.T, ", ", s.m, "], got ", e.sizes());
  TORCH_CHECK(lam_sum.dim() == 1 && lam_sum.size(0) == s.B, op, ": lam_sum must be [B] = [", s.B, "], got ",
              lam_sum.sizes());
  TORCH_CHECK(!grad.is_same(delta) && !grad.is_same(tau), op, ": grad must not alias delta or tau");
  return s;
}

// param, exp_avg, exp_avg_sq (written) and grad: one shape, float32 or float64, contiguous.
inline void check_doge_adam(const at::Tensor& param, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                            const at::Tensor& grad) {
  const char* op = "doge_adam_";
  TORCH_CHECK(param.defined(), op, ": param is undefined");
  TORCH_CHECK(param.scalar_type() == at::kFloat || param.scalar_type() == at::kDouble, op,
              ": tensors must be float32 or float64, got ", param.scalar_type());
  doge_check_tensor(op, "param", param, param);
  doge_check_tensor(op, "exp_avg", exp_avg, param);
  doge_check_tensor(op, "exp_avg_sq", exp_avg_sq, param);
  doge_check_tensor(op, "grad", grad, param);
  TORCH_CHECK(exp_avg.sizes() == param.sizes() && exp_avg_sq.sizes() == param.sizes() && grad.sizes() == param.sizes(),
              op, ": param ", param.sizes(), ", exp_avg ", exp_avg.sizes(), ", exp_avg_sq ", exp_avg_sq.sizes(),
              " and grad ", grad.sizes(), " must have one shape");
}

}  // namespace calm_fast
