// CPU kernel of coef_grad (AdaMerging's coefficient gradient, ALGORITHMS.md §6; schema in common/schemas.h):
// out[t, l] = <grads[l], keep * tau_{t,l}> for every task t and tensor l in one pass over the list.
//
// Work is split into the merge kernels' units (up to 64K elements of one tensor); a unit is walked in spans
// of 8 of the 1024-element blocks of common/coef_grad.h.  Per span the gradient is converted to fp32 once
// (one read), then each task's tau (one read of each input element, base converted with it) is trimmed /
// masked and dotted with it block by block in the 32-lane order of common/coef_grad.h; a block's fp64 sum goes
// to its own slot of a [T, blocks] buffer, so no thread ever adds into a shared value.  A final serial
// step combines each (t, l)'s block sums in the fixed lane order: the result does not depend on the
// thread count (and equals the CUDA kernel's bit for bit).
//
// The 32 fp32 lane accumulators are a straight loop over k that -O3 vectorises into four 8-lane adds (no
// FMA: -ffp-contract=off), so no hand-written AVX2 core is needed here; the fp32 conversions of bf16 /
// fp16 tiles use the AVX2 converters of cpu_common.h (same bits as the scalar ones).  fp32 inputs without
// masks skip the staging tile (fp32_block_dot: subtract, trim and dot in one loop); CALM_FAST_CPU_SIMD=0
// keeps the staged loop everywhere (the tests compare the two bit for bit).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "common/coef_grad.h"
#include "cpu/cpu_common.h"

namespace calm_fast {
namespace cpu {
namespace {

// One task's full 1024-element block of fp32 inputs in a single pass (no staging): v = x - b, the trim,
// acc[k] += g * v, the same operations in the same order as the staged loop below (so the same bits), with
// one load of x (and b, g from L1) per element.  kTrim: 0 none, 1 |v| >= thr, 2 |v| > thr.
template <bool kBase, int kTrim>
inline void fp32_block_dot(const float* __restrict__ x, const float* __restrict__ b, const float* __restrict__ g,
                           float thr, float* __restrict__ acc) {
  for (int64_t j0 = 0; j0 < kCoefBlock; j0 += kCoefLanes) {
    for (int k = 0; k < kCoefLanes; ++k) {
      float v = kBase ? x[j0 + k] - b[j0 + k] : x[j0 + k];
      if (kTrim == 1) v = std::fabs(v) >= thr ? v : 0.f;
      if (kTrim == 2) v = std::fabs(v) > thr ? v : 0.f;
      acc[k] = acc[k] + g[j0 + k] * v;
    }
  }
}

template <bool kBase>
inline void fp32_block_dot(const float* x, const float* b, const float* g, const float* thr, bool strict,
                           float* acc) {
  if (thr == nullptr) {
    fp32_block_dot<kBase, 0>(x, b, g, 0.f, acc);
  } else if (strict) {
    fp32_block_dot<kBase, 2>(x, b, g, *thr, acc);
  } else {
    fp32_block_dot<kBase, 1>(x, b, g, *thr, acc);
  }
}

// Elements of one tensor handled per task before moving to the next task (kUnit is a multiple of it).
constexpr int64_t kSpanBlocks = 8;
constexpr int64_t kSpan = kSpanBlocks * kCoefBlock;
static_assert(kUnit % kSpan == 0, "work units must hold whole spans");

template <typename scalar_t, typename grad_t>
void coef_grad_impl(const CoefGradArgs& a, at::TensorList grads, at::TensorList inputs, at::TensorList base,
                    bool strict, at::TensorList masks, double* partial) {
  const TaskList& tl = a.tl;
  const int64_t NB = a.start[tl.L];
  const auto in_ptr = data_ptrs<scalar_t>(inputs);
  const auto bs_ptr = data_ptrs<scalar_t>(base);
  const auto g_ptr = data_ptrs<grad_t>(grads);
  const float* thresholds = a.thresholds.defined() ? a.thresholds.data_ptr<float>() : nullptr;
  const std::vector<Unit> units = make_units(tl);  // units start at multiples of kUnit, a multiple of kCoefBlock
  const bool simd = simd_enabled();
  at::parallel_for(0, static_cast<int64_t>(units.size()), 1, [&](int64_t u0, int64_t u1) {
    // g holds a span of kSpanBlocks blocks: each task's stream is then read kSpan contiguous elements at a
    // time (32 KiB of fp32) instead of one 4 KiB block, so the hardware prefetchers keep streaming across
    // page boundaries (two consecutive quiet runs at 88M x 8, 1 thread: 0.173 s -> 0.145 s; noisy VM).
    // Block results do not depend on the loop order.
    std::vector<float> g_buf(static_cast<size_t>(kSpan));
    float* g = g_buf.data();
    alignas(64) float v[kCoefBlock], acc[kCoefLanes];
    double s[kCoefLanes];
    for (int64_t u = u0; u < u1; ++u) {
      const Unit& w = units[u];
      const scalar_t* bs = tl.has_base ? bs_ptr[w.l] : nullptr;
      for (int64_t s0 = w.begin; s0 < w.end; s0 += kSpan) {
        const int64_t ns = std::min(kSpan, w.end - s0);
        const int64_t ns32 = (ns + kCoefLanes - 1) / kCoefLanes * kCoefLanes;
        convert_tile(g_ptr[w.l], static_cast<const grad_t*>(nullptr), s0, ns, g, simd);
        // Padding to whole 32-element rows: products +0, and adding +0 to a lane sum changes nothing
        // (a sum that starts at +0 is never -0), i.e. the same as skipping the missing elements.
        for (int64_t j = ns; j < ns32; ++j) g[j] = 0.f;
        for (int64_t t = 0; t < tl.T; ++t) {
          const int64_t ti = t * tl.L + w.l;
          for (int64_t i0 = s0; i0 < s0 + ns; i0 += kCoefBlock) {
            const int64_t n = std::min(kCoefBlock, s0 + ns - i0);
            const int64_t n32 = (n + kCoefLanes - 1) / kCoefLanes * kCoefLanes;
            const int64_t blk = a.start[w.l] + i0 / kCoefBlock;
            const float* gb = g + (i0 - s0);
            for (int k = 0; k < kCoefLanes; ++k) acc[k] = 0.f;
            // fp32 inputs, no masks, a whole block: the single-pass loop (~2.6x the staged one in cache).
            if (std::is_same<scalar_t, float>::value && a.mask_kind == 0 && n == kCoefBlock && simd) {
              const float* x = reinterpret_cast<const float*>(in_ptr[ti]) + i0;
              const float* b = bs != nullptr ? reinterpret_cast<const float*>(bs) + i0 : nullptr;
              const float* thr = thresholds != nullptr ? thresholds + ti : nullptr;
              if (b != nullptr) fp32_block_dot<true>(x, b, gb, thr, strict, acc);
              else fp32_block_dot<false>(x, nullptr, gb, thr, strict, acc);
            } else {
              convert_tile(in_ptr[ti], bs, i0, n, v, simd);
              for (int64_t j = n; j < n32; ++j) v[j] = 0.f;
              if (thresholds != nullptr) {
                const float thr = thresholds[ti];
                for (int64_t j = 0; j < n; ++j) v[j] = trim_keep(v[j], thr, strict) ? v[j] : 0.f;
              }
              if (a.mask_kind == 1) {
                const bool* m = masks[ti].data_ptr<bool>() + i0;
                for (int64_t j = 0; j < n; ++j) v[j] = m[j] ? v[j] : 0.f;
              } else if (a.mask_kind == 2) {
                const uint8_t* m = masks[ti].data_ptr<uint8_t>();
                for (int64_t j = 0; j < n; ++j) {
                  const int64_t i = i0 + j;
                  v[j] = ((m[i >> 3] >> (i & 7)) & 1) ? v[j] : 0.f;
                }
              }
              for (int64_t j0 = 0; j0 < n32; j0 += kCoefLanes) {
                const float* gj = gb + j0;
                const float* vj = v + j0;
                for (int k = 0; k < kCoefLanes; ++k) acc[k] = acc[k] + gj[k] * vj[k];
              }
            }
            for (int k = 0; k < kCoefLanes; ++k) s[k] = static_cast<double>(acc[k]);
            partial[t * NB + blk] = coef_lane_tree(s);
          }
        }
      }
    }
  });
}

at::Tensor coef_grad_cpu(at::TensorList grads, at::TensorList inputs, at::TensorList base, int64_t num_tasks,
                         const c10::optional<at::Tensor>& thresholds, bool strict, at::TensorList masks) {
  const CoefGradArgs a = check_coef_grad(grads, inputs, base, num_tasks, thresholds, masks);
  const TaskList& tl = a.tl;
  at::Tensor out = at::empty({tl.T, tl.L}, at::TensorOptions().dtype(at::kFloat).device(tl.device));
  if (tl.L == 0) return out;
  const int64_t NB = a.start[tl.L];
  std::vector<double> partial(static_cast<size_t>(tl.T * NB));
  CF_DISPATCH_FLOAT(tl.dtype, [&] {
    if (a.grad_dtype == at::kFloat) {
      coef_grad_impl<scalar_t, float>(a, grads, inputs, base, strict, masks, partial.data());
    } else {
      coef_grad_impl<scalar_t, scalar_t>(a, grads, inputs, base, strict, masks, partial.data());
    }
  });
  float* o = out.data_ptr<float>();
  for (int64_t t = 0; t < tl.T; ++t) {
    for (int64_t l = 0; l < tl.L; ++l) {
      const double* blocks = partial.data() + t * NB + a.start[l];
      o[t * tl.L + l] = static_cast<float>(coef_combine_blocks(blocks, a.start[l + 1] - a.start[l]));
    }
  }
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace calm_fast

TORCH_LIBRARY_IMPL(calm_fast, CPU, m) { m.impl("coef_grad", &calm_fast::cpu::coef_grad_cpu); }
