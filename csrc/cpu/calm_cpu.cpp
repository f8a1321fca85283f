// CPU kernels of the CALM mask-training ops (ALGORITHMS.md §8; schemas and semantics in
// common/schemas.h): calm_interpolate, calm_accumulate_, calm_mask_step_ and calm_binarize_merge.
// Each is one at::parallel_for over all L tensors, reading and writing every element once.
//
// Layout as merge_cpu.cpp: units of up to 64K elements of one tensor, processed in tiles of 1024.  A
// tile of each operand is an fp32 row: the tensor itself when it is fp32 (R, A and fp32 lists are
// read and written in place), else a conversion into a stack buffer (one dtype switch per tile, not
// per element).  The per-element math is calm_sigmoid / calm_theta / calm_accumulate /
// calm_update_logit of common/elementwise.h, called from straight loops specialised on the mode, so
// the results are those of the CUDA kernels bit for bit.
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <atomic>
#include <string>

#include "cpu/cpu_common.h"

namespace calm_fast {
namespace cpu {
namespace {

std::vector<Unit> calm_units(const CalmLists& cl) {
  std::vector<Unit> units;
  for (int64_t l = 0; l < cl.L; ++l) {
    for (int64_t b = 0; b < cl.numel[l]; b += kUnit) units.push_back({l, b, std::min(cl.numel[l], b + kUnit)});
  }
  return units;
}

// One list's data pointers and dtype code (null pointers for an empty optional list).
struct ListPtrs {
  std::vector<void*> p;
  int code = kCodeF32;
  bool present() const { return !p.empty(); }
};

ListPtrs list_ptrs(at::TensorList xs) {
  ListPtrs lp;
  lp.p.resize(xs.size());
  for (size_t i = 0; i < xs.size(); ++i) lp.p[i] = xs[i].data_ptr();
  if (!xs.empty()) lp.code = dtype_code(xs[0].scalar_type());
  return lp;
}

// fp32 view of elements [i0, i0 + n) of a tensor with dtype `code`: the tensor itself for fp32, else
// its values converted into `buf`.
const float* load_row(const void* p, int code, int64_t i0, int64_t n, float* buf) {
  if (code == kCodeF32) return static_cast<const float*>(p) + i0;
  if (code == kCodeBF16) {
    const c10::BFloat16* x = static_cast<const c10::BFloat16*>(p) + i0;
    for (int64_t j = 0; j < n; ++j) buf[j] = static_cast<float>(x[j]);
  } else {
    const c10::Half* x = static_cast<const c10::Half*>(p) + i0;
    for (int64_t j = 0; j < n; ++j) buf[j] = static_cast<float>(x[j]);
  }
  return buf;
}

// Where to compute an output tile: in place for fp32 outputs, else `buf` (then store_row converts).
float* out_row(void* p, int code, int64_t i0, float* buf) {
  return code == kCodeF32 ? static_cast<float*>(p) + i0 : buf;
}

void store_row(void* p, int code, int64_t i0, int64_t n, const float* v) {
  if (code == kCodeBF16) {
    store_tile(static_cast<c10::BFloat16*>(p), i0, n, v);
  } else if (code == kCodeF16) {
    store_tile(static_cast<c10::Half*>(p), i0, n, v);
  }  // fp32 was computed in place
}

// theta of a tile from s = sigma(R) (calm_theta with the mode and the base as template constants, so
// each loop is straight-line code).
template <int kMode, bool kBase>
void theta_loop(int64_t n, const float* b, const float* p, const float* q, const float* s, float* o) {
  for (int64_t j = 0; j < n; ++j) o[j] = calm_theta(kBase, kBase ? b[j] : 0.f, p[j], q[j], s[j], kMode);
}

void theta_tile(int mode, int64_t n, const float* b, const float* p, const float* q, const float* s, float* o) {
  const bool base = b != nullptr;
  switch (mode) {
    case kCalmFused: return base ? theta_loop<kCalmFused, true>(n, b, p, q, s, o)
                                 : theta_loop<kCalmFused, false>(n, b, p, q, s, o);
    case kCalmFaithful: return base ? theta_loop<kCalmFaithful, true>(n, b, p, q, s, o)
                                    : theta_loop<kCalmFaithful, false>(n, b, p, q, s, o);
    default: return base ? theta_loop<kCalmRound, true>(n, b, p, q, s, o)
                         : theta_loop<kCalmRound, false>(n, b, p, q, s, o);
  }
}

void sigmoid_tile(int64_t n, const float* r, float* s) {
  for (int64_t j = 0; j < n; ++j) s[j] = calm_sigmoid(r[j]);
}


// --------------------------------------------------------------------------------------------------
// calm_interpolate
// --------------------------------------------------------------------------------------------------
std::vector<at::Tensor> calm_interpolate_cpu(at::TensorList base, at::TensorList tau_prev, at::TensorList tau_new,
                                             at::TensorList R, c10::string_view mode, bool out_float) {
  constexpr const char* op = "calm_fast.calm_interpolate";
  CalmInterpolateArgs args = check_calm_interpolate(op, base, tau_prev, tau_new, R, std::string(mode), out_float);
  const CalmLists& cl = args.cl;
  const int mode_code = args.mode;
  std::vector<at::Tensor> out = std::move(args.out);
  const ListPtrs b = list_ptrs(base), p = list_ptrs(tau_prev), q = list_ptrs(tau_new), o = list_ptrs(out);
  const std::vector<Unit> units = calm_units(cl);
  at::parallel_for(0, static_cast<int64_t>(units.size()), 1, [&](int64_t u0, int64_t u1) {
    alignas(64) float bb[kTile], pb[kTile], qb[kTile], sb[kTile], ob[kTile];
    for (int64_t u = u0; u < u1; ++u) {
      const Unit& w = units[u];
      const float* r = R[w.l].data_ptr<float>();
      for (int64_t i0 = w.begin; i0 < w.end; i0 += kTile) {
        const int64_t n = std::min(kTile, w.end - i0);
        const float* bt_row = b.present() ? load_row(b.p[w.l], b.code, i0, n, bb) : nullptr;
        const float* pr = load_row(p.p[w.l], p.code, i0, n, pb);
        const float* qr = load_row(q.p[w.l], q.code, i0, n, qb);
        float* dst = out_row(o.p[w.l], o.code, i0, ob);
        sigmoid_tile(n, r + i0, sb);
        theta_tile(mode_code, n, bt_row, pr, qr, sb, dst);
        store_row(o.p[w.l], o.code, i0, n, dst);
      }
    }
  });
  return out;
}

// --------------------------------------------------------------------------------------------------
// calm_accumulate_
// --------------------------------------------------------------------------------------------------
template <bool kFaithful>
void accumulate_loop(int64_t n, float* a, const float* g, const float* p, const float* q, float eta) {
  for (int64_t j = 0; j < n; ++j) a[j] = calm_accumulate(a[j], g[j], p[j], q[j], eta, kFaithful);
}

void calm_accumulate_cpu(at::TensorList A, at::TensorList grad, at::TensorList tau_prev, at::TensorList tau_new,
                         double eta, bool faithful) {
  constexpr const char* op = "calm_fast.calm_accumulate_";
  const CalmLists cl = check_calm_accumulate(op, A, grad, tau_prev, tau_new);
  const ListPtrs g = list_ptrs(grad), p = list_ptrs(tau_prev), q = list_ptrs(tau_new);
  const float eta_f = static_cast<float>(eta);
  const std::vector<Unit> units = calm_units(cl);
  at::parallel_for(0, static_cast<int64_t>(units.size()), 1, [&](int64_t u0, int64_t u1) {
    alignas(64) float gb[kTile], pb[kTile], qb[kTile];
    for (int64_t u = u0; u < u1; ++u) {
      const Unit& w = units[u];
      float* a = A[w.l].data_ptr<float>();
      for (int64_t i0 = w.begin; i0 < w.end; i0 += kTile) {
        const int64_t n = std::min(kTile, w.end - i0);
        const float* gr = load_row(g.p[w.l], g.code, i0, n, gb);
        const float* pr = load_row(p.p[w.l], p.code, i0, n, pb);
        const float* qr = load_row(q.p[w.l], q.code, i0, n, qb);
        if (faithful) {
          accumulate_loop<true>(n, a + i0, gr, pr, qr, eta_f);
        } else {
          accumulate_loop<false>(n, a + i0, gr, pr, qr, eta_f);
        }
      }
    }
  });
}

// --------------------------------------------------------------------------------------------------
// calm_mask_step_
// --------------------------------------------------------------------------------------------------
// Updates a tile of R, zeroes A, leaves sigma(new R) in s_new; returns (#on after, #flipped) through
// on / flips.
template <bool kFaithful>
void step_loop(int64_t n, float* r, float* a, float alpha, float* s_new, int64_t& on, int64_t& flips) {
  int64_t on_t = 0, flips_t = 0;
  for (int64_t j = 0; j < n; ++j) {
    const float s = calm_sigmoid(r[j]);
    const float rn = calm_update_logit(r[j], a[j], s, alpha, kFaithful);
    const float sn = calm_sigmoid(rn);
    r[j] = rn;
    a[j] = 0.f;
    s_new[j] = sn;
    on_t += calm_mask_on(sn);
    flips_t += calm_mask_on(sn) != calm_mask_on(s);
  }
  on += on_t;
  flips += flips_t;
}

at::Tensor calm_mask_step_cpu(at::TensorList R, at::TensorList A, double alpha, bool faithful, at::TensorList theta,
                              at::TensorList base, at::TensorList tau_prev, at::TensorList tau_new,
                              c10::string_view mode) {
  constexpr const char* op = "calm_fast.calm_mask_step_";
  const CalmStepArgs args = check_calm_mask_step(op, R, A, theta, base, tau_prev, tau_new, std::string(mode));
  const CalmLists& cl = args.cl;
  const int mode_code = args.mode;
  const bool rewrite = args.rewrite;
  const ListPtrs th = list_ptrs(theta), b = list_ptrs(base), p = list_ptrs(tau_prev), q = list_ptrs(tau_new);
  const float alpha_f = static_cast<float>(alpha);
  const std::vector<Unit> units = calm_units(cl);
  std::atomic<int64_t> on_total{0}, flips_total{0};
  at::parallel_for(0, static_cast<int64_t>(units.size()), 1, [&](int64_t u0, int64_t u1) {
    alignas(64) float bb[kTile], pb[kTile], qb[kTile], sb[kTile], ob[kTile];
    int64_t on = 0, flips = 0;
    for (int64_t u = u0; u < u1; ++u) {
      const Unit& w = units[u];
      float* r = R[w.l].data_ptr<float>();
      float* a = A[w.l].data_ptr<float>();
      for (int64_t i0 = w.begin; i0 < w.end; i0 += kTile) {
        const int64_t n = std::min(kTile, w.end - i0);
        if (faithful) {
          step_loop<true>(n, r + i0, a + i0, alpha_f, sb, on, flips);
        } else {
          step_loop<false>(n, r + i0, a + i0, alpha_f, sb, on, flips);
        }
        if (!rewrite) continue;
        const float* bt_row = b.present() ? load_row(b.p[w.l], b.code, i0, n, bb) : nullptr;
        const float* pr = load_row(p.p[w.l], p.code, i0, n, pb);
        const float* qr = load_row(q.p[w.l], q.code, i0, n, qb);
        float* dst = out_row(th.p[w.l], th.code, i0, ob);
        theta_tile(mode_code, n, bt_row, pr, qr, sb, dst);
        store_row(th.p[w.l], th.code, i0, n, dst);
      }
    }
    on_total += on;
    flips_total += flips;
  });
  at::Tensor counts = at::empty({2}, at::kLong);
  counts.data_ptr<int64_t>()[0] = on_total.load();
  counts.data_ptr<int64_t>()[1] = flips_total.load();
  return counts;
}

// --------------------------------------------------------------------------------------------------
// calm_binarize_merge
// --------------------------------------------------------------------------------------------------
std::tuple<std::vector<at::Tensor>, at::Tensor> calm_binarize_merge_cpu(at::TensorList tau_prev,
                                                                        at::TensorList tau_new, at::TensorList R) {
  constexpr const char* op = "calm_fast.calm_binarize_merge";
  CalmBinarizeArgs args = check_calm_binarize(op, tau_prev, tau_new, R);
  const CalmLists& cl = args.cl;
  std::vector<at::Tensor> out = std::move(args.out);
  const ListPtrs p = list_ptrs(tau_prev), q = list_ptrs(tau_new), o = list_ptrs(out);
  const std::vector<Unit> units = calm_units(cl);
  std::atomic<int64_t> taken{0};
  at::parallel_for(0, static_cast<int64_t>(units.size()), 1, [&](int64_t u0, int64_t u1) {
    alignas(64) float pb[kTile], qb[kTile], sb[kTile], ob[kTile];
    int64_t count = 0;
    for (int64_t u = u0; u < u1; ++u) {
      const Unit& w = units[u];
      const float* r = R[w.l].data_ptr<float>();
      for (int64_t i0 = w.begin; i0 < w.end; i0 += kTile) {
        const int64_t n = std::min(kTile, w.end - i0);
        const float* pr = load_row(p.p[w.l], p.code, i0, n, pb);
        const float* qr = load_row(q.p[w.l], q.code, i0, n, qb);
        float* dst = out_row(o.p[w.l], o.code, i0, ob);
        sigmoid_tile(n, r + i0, sb);
        theta_loop<kCalmRound, false>(n, nullptr, pr, qr, sb, dst);
        for (int64_t j = 0; j < n; ++j) count += calm_mask_on(sb[j]);
        store_row(o.p[w.l], o.code, i0, n, dst);
      }
    }
    taken += count;
  });
  return {out, at::scalar_tensor(taken.load(), at::kLong)};
}

}  // namespace
}  // namespace cpu
}  // namespace calm_fast

TORCH_LIBRARY_IMPL(calm_fast, CPU, m) {
  m.impl("calm_interpolate", &calm_fast::cpu::calm_interpolate_cpu);
  m.impl("calm_accumulate_", &calm_fast::cpu::calm_accumulate_cpu);
  m.impl("calm_mask_step_", &calm_fast::cpu::calm_mask_step_cpu);
  m.impl("calm_binarize_merge", &calm_fast::cpu::calm_binarize_merge_cpu);
}
