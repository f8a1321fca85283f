// CPU kernels of the fused merge ops: weighted_merge (task arithmetic, masks, DARE), ties_merge and
// consensus_merge.  Each reads every input element once and writes each output element once.
//
// Layout: the work is split into units of up to 64K elements of one tensor l; a unit is processed in
// tiles of 1024 elements held as fp32 structure-of-arrays rows (one row per task), so every inner loop
// is a straight loop over j that the compiler vectorises.  The arithmetic is the same, in the same
// order, as the per-element functions in common/elementwise.h that the CUDA kernels call.
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <mutex>

#include "cpu/cpu_common.h"
#include "cpu/simd_avx2.h"

namespace calm_fast {
namespace cpu {
namespace {

struct Reductions {
  std::mutex mutex;
  int64_t nonfinite = 0;
};

template <typename scalar_t>
const scalar_t* base_ptr_or_null(const std::vector<const scalar_t*>& base, const TaskList& tl, int64_t l) {
  return tl.has_base ? base[l] : nullptr;
}

// --------------------------------------------------------------------------------------------------
// weighted_merge
// --------------------------------------------------------------------------------------------------
template <typename scalar_t, typename out_t>
int64_t weighted_impl(at::TensorList inputs, at::TensorList base, const TaskList& tl, const float* weights,
                      float scale, const float* thresholds, bool strict, at::TensorList masks, int mask_kind,
                      const DareParams& dare, const int64_t* keys, std::vector<at::Tensor>& out) {
  const auto in_ptr = data_ptrs<scalar_t>(inputs);
  const auto bs_ptr = data_ptrs<scalar_t>(base);
  std::vector<out_t*> out_ptr(tl.L);
  for (int64_t l = 0; l < tl.L; ++l) out_ptr[l] = out[l].data_ptr<out_t>();
  const std::vector<Unit> units = make_units(tl);
  const bool fast = simd_enabled() && mask_kind == 0;
  Reductions red;
  at::parallel_for(0, static_cast<int64_t>(units.size()), 1, [&](int64_t u0, int64_t u1) {
    alignas(64) float acc[kTile];
    alignas(64) float tau[kTile];
    int64_t nonfinite = 0;
    std::vector<float> wcol(tl.T), tcol(tl.T);
    TileSource<scalar_t> src(fast ? tl.T : 0, dare);
    for (int64_t u = u0; u < u1; ++u) {
      const Unit& w = units[u];
      const scalar_t* bs = base_ptr_or_null(bs_ptr, tl, w.l);
#if defined(CALM_FAST_HAVE_AVX2)
      if (fast) {
        table_column(weights, tl, w.l, wcol.data());
        if (thresholds != nullptr) table_column(thresholds, tl, w.l, tcol.data());
        const float* thr = thresholds != nullptr ? tcol.data() : nullptr;
        for (int64_t i0 = w.begin; i0 < w.end; i0 += kTile) {
          const int64_t n = std::min(kTile, w.end - i0);
          nonfinite += src.load(in_ptr, bs, tl, w.l, i0, n, dare, keys);
          const float* brow = src.base;
          float* dst = std::is_same<out_t, float>::value ? reinterpret_cast<float*>(out_ptr[w.l]) + i0 : acc;
          const int64_t done = n & ~int64_t{7};
          src.run([&](auto rows, const float* tau_base) {
            avx2::weighted_row(rows, tau_base, static_cast<int>(tl.T), done, wcol.data(), thr, strict, scale, brow,
                               dst, src.in_place ? &nonfinite : nullptr);
          });
          for (int64_t j = done; j < n; ++j) {  // tail of the tensor: the generic formula per element
            float a = 0.f;
            for (int64_t t = 0; t < tl.T; ++t) {
              float v = src.tau(t, j);
              if (src.in_place) nonfinite += is_nonfinite(v);
              if (thr != nullptr) v = trim_keep(v, thr[t], strict) ? v : 0.f;
              a += wcol[t] * v;
            }
            dst[j] = brow != nullptr ? brow[j] + scale * a : scale * a;
          }
          if (!std::is_same<out_t, float>::value) store_tile(out_ptr[w.l], i0, n, acc, /*simd=*/true);
        }
        continue;
      }
#endif
      for (int64_t i0 = w.begin; i0 < w.end; i0 += kTile) {
        const int64_t n = std::min(kTile, w.end - i0);
        for (int64_t j = 0; j < n; ++j) acc[j] = 0.f;
        for (int64_t t = 0; t < tl.T; ++t) {
          const int64_t tl_idx = t * tl.L + w.l;
          nonfinite += load_tau_tile(in_ptr[tl_idx], bs, i0, n, dare, keys ? static_cast<uint64_t>(keys[tl_idx]) : 0u,
                                     tau);
          if (thresholds != nullptr) {
            const float thr = thresholds[tl_idx];
            for (int64_t j = 0; j < n; ++j) tau[j] = trim_keep(tau[j], thr, strict) ? tau[j] : 0.f;
          }
          if (mask_kind == 1) {
            const bool* m = masks[tl_idx].data_ptr<bool>() + i0;
            for (int64_t j = 0; j < n; ++j) tau[j] = m[j] ? tau[j] : 0.f;
          } else if (mask_kind == 2) {
            const uint8_t* m = masks[tl_idx].data_ptr<uint8_t>();
            for (int64_t j = 0; j < n; ++j) {
              const int64_t i = i0 + j;
              tau[j] = ((m[i >> 3] >> (i & 7)) & 1) ? tau[j] : 0.f;
            }
          }
          const float wt = weights[tl_idx];
          for (int64_t j = 0; j < n; ++j) acc[j] += wt * tau[j];
        }
        if (bs != nullptr) {
          for (int64_t j = 0; j < n; ++j) acc[j] = static_cast<float>(bs[i0 + j]) + scale * acc[j];
        } else {
          for (int64_t j = 0; j < n; ++j) acc[j] = scale * acc[j];
        }
        store_tile(out_ptr[w.l], i0, n, acc);
      }
    }
    std::lock_guard<std::mutex> lock(red.mutex);
    red.nonfinite += nonfinite;
  });
  return red.nonfinite;
}

std::tuple<std::vector<at::Tensor>, at::Tensor> weighted_merge_cpu(
    at::TensorList inputs, at::TensorList base, int64_t num_tasks, const at::Tensor& weights, double scale,
    const c10::optional<at::Tensor>& thresholds, bool strict, at::TensorList masks, double dare_p,
    const c10::optional<at::Tensor>& dare_keys, bool dare_rescale, bool out_float) {
  constexpr const char* op = "calm_fast.weighted_merge";
  const TaskList tl = check_task_list(op, inputs, base, num_tasks);
  const at::Tensor w = check_table(op, "weights", weights, tl, at::kFloat);
  const at::Tensor thr = thresholds.has_value() ? check_table(op, "thresholds", *thresholds, tl, at::kFloat) : at::Tensor();
  const int mask_kind = check_masks(op, masks, tl);
  check_dare(op, dare_p, dare_keys, tl);
  const at::Tensor keys = dare_keys.has_value() ? dare_keys->contiguous() : at::Tensor();
  std::vector<at::Tensor> out = alloc_outputs(inputs, tl, out_float);
  int64_t nonfinite = 0;
  if (tl.L > 0) {
    const DareParams dare = make_dare(dare_p, dare_rescale);
    CF_DISPATCH_FLOAT(tl.dtype, [&] {
      auto run = [&](auto out_tag) {
        using out_t = decltype(out_tag);
        nonfinite = weighted_impl<scalar_t, out_t>(
            inputs, base, tl, w.data_ptr<float>(), static_cast<float>(scale),
            thr.defined() ? thr.data_ptr<float>() : nullptr, strict, masks, mask_kind, dare,
            keys.defined() ? keys.data_ptr<int64_t>() : nullptr, out);
      };
      if (out_float) run(float{}); else run(scalar_t{});
    });
  }
  return {out, at::scalar_tensor(nonfinite, at::kLong)};
}

// --------------------------------------------------------------------------------------------------
// ties_merge
// --------------------------------------------------------------------------------------------------
struct TiesReductions {
  std::mutex mutex;
  int64_t nonfinite = 0;
  std::vector<int64_t> sign_sum, cancel_count;
  std::vector<int64_t> positions;
  std::vector<float> patch;  // 3 per position
  // Cancelled positions claimed by all threads together: once past max_positions, the op returns none
  // (all or nothing), so threads stop recording; the per-thread lists stay within max_positions + 1.
  std::atomic<int64_t> claimed{0};

  // Whether one more cancelled position may be recorded (no atomic traffic once the cap is passed).
  bool claim(int64_t max_positions) {
    if (claimed.load(std::memory_order_relaxed) >= max_positions) return false;
    return claimed.fetch_add(1, std::memory_order_relaxed) < max_positions;
  }
};

template <typename scalar_t, typename out_t>
void ties_impl(at::TensorList inputs, at::TensorList base, const TaskList& tl, const float* thresholds, bool strict,
               const float* weights, int merge, float scale, const int64_t* zero_sign, const DareParams& dare,
               const int64_t* keys, int64_t max_positions, std::vector<at::Tensor>& out, TiesReductions& red) {
  const auto in_ptr = data_ptrs<scalar_t>(inputs);
  const auto bs_ptr = data_ptrs<scalar_t>(base);
  std::vector<out_t*> out_ptr(tl.L);
  for (int64_t l = 0; l < tl.L; ++l) out_ptr[l] = out[l].data_ptr<out_t>();
  const std::vector<Unit> units = make_units(tl);
  red.sign_sum.assign(tl.L, 0);
  red.cancel_count.assign(tl.L, 0);

  const bool fast = simd_enabled();
  at::parallel_for(0, static_cast<int64_t>(units.size()), 1, [&](int64_t u0, int64_t u1) {
    // Generic path: trimmed, weighted tau, row t = task t (the AVX2 path reads through `src` instead).
    std::vector<float> vals(fast ? 0 : static_cast<size_t>(tl.T * kTile));
    // Branch-free SoA tiles: the elected sign is kept as a float (+1, -1, or 0), counts as floats (exact
    // far past any task count), so every loop below vectorises.
    alignas(64) float s[kTile], g[kTile], acc[kTile], mx[kTile], cnt[kTile], res[kTile];
    alignas(64) int32_t gamma[kTile], nonzero[kTile];
    std::vector<int64_t> sign_sum(tl.L, 0), cancel_count(tl.L, 0), positions;
    std::vector<float> patch;
    int64_t nonfinite = 0;
    std::vector<float> tcol(tl.T), wcol(tl.T), scratch(static_cast<size_t>(tl.T * 8));
    TileSource<scalar_t> src(fast ? tl.T : 0, dare);
    for (int64_t u = u0; u < u1; ++u) {
      const Unit& w = units[u];
      const scalar_t* bs = base_ptr_or_null(bs_ptr, tl, w.l);
      const float zs = static_cast<float>(zero_sign[w.l]);
#if defined(CALM_FAST_HAVE_AVX2)
      if (fast) {
        table_column(thresholds, tl, w.l, tcol.data());
        table_column(weights, tl, w.l, wcol.data());
        const int T = static_cast<int>(tl.T);
        for (int64_t i0 = w.begin; i0 < w.end; i0 += kTile) {
          const int64_t n = std::min(kTile, w.end - i0);
          nonfinite += src.load(in_ptr, bs, tl, w.l, i0, n, dare, keys);
          const float* brow = src.base;
          float* dst = std::is_same<out_t, float>::value ? reinterpret_cast<float*>(out_ptr[w.l]) + i0 : res;
          auto trimmed = [&](int64_t j) {
            return [&, j](int t) {
              const float v = src.tau(t, j);
              return trim_keep(v, tcol[t], strict) ? v * wcol[t] : 0.f;
            };
          };
          // An exact cancellation (rare): record the output for every possible zero sign.
          auto record = [&](int64_t j) {
            cancel_count[w.l] += 1;
            if (!red.claim(max_positions)) return;
            positions.push_back(tl.offset[w.l] + i0 + j);
            for (float zsign : {1.f, -1.f, 0.f}) {
              int g_unused;
              bool c_unused;
              const float r = ties_element(trimmed(j), T, merge, zsign, g_unused, c_unused);
              patch.push_back(brow != nullptr ? brow[j] + scale * r : scale * r);
            }
          };
          const int64_t done = n & ~int64_t{7};
          sign_sum[w.l] += src.run([&](auto rows, const float* tau_base) {
            return avx2::ties_row(rows, tau_base, T, done, tcol.data(), wcol.data(), strict, merge, scale, zs, brow,
                                  dst, src.in_place ? &nonfinite : nullptr, scratch.data(), record);
          });
          for (int64_t j = done; j < n; ++j) {  // tail of the tensor: ties_element per element
            if (src.in_place)
              for (int t = 0; t < T; ++t) nonfinite += is_nonfinite(src.tau(t, j));
            int gamma;
            bool cancelled;
            const float r = ties_element(trimmed(j), T, merge, zs, gamma, cancelled);
            sign_sum[w.l] += gamma;
            dst[j] = brow != nullptr ? brow[j] + scale * r : scale * r;
            if (cancelled) record(j);
          }
          if (!std::is_same<out_t, float>::value) store_tile(out_ptr[w.l], i0, n, res, /*simd=*/true);
        }
        continue;
      }
#endif
      for (int64_t i0 = w.begin; i0 < w.end; i0 += kTile) {
        const int64_t n = std::min(kTile, w.end - i0);
        // Trim + weight, and the elected sign's sum (t ascending from 0, as ties_element).
        for (int64_t j = 0; j < n; ++j) { s[j] = 0.f; nonzero[j] = 0; }
        for (int64_t t = 0; t < tl.T; ++t) {
          const int64_t ti = t * tl.L + w.l;
          float* v = vals.data() + t * kTile;
          nonfinite += load_tau_tile(in_ptr[ti], bs, i0, n, dare, keys ? static_cast<uint64_t>(keys[ti]) : 0u, v);
          const float thr = thresholds[ti], wt = weights[ti];
          if (strict) {
            for (int64_t j = 0; j < n; ++j) v[j] = (std::fabs(v[j]) > thr) ? v[j] * wt : 0.f;
          } else {
            for (int64_t j = 0; j < n; ++j) v[j] = (std::fabs(v[j]) >= thr) ? v[j] * wt : 0.f;
          }
          for (int64_t j = 0; j < n; ++j) {
            s[j] += v[j];
            nonzero[j] |= static_cast<int32_t>(v[j] != 0.f);
          }
        }
        int32_t tile_sign = 0;
        for (int64_t j = 0; j < n; ++j) {
          gamma[j] = static_cast<int32_t>(s[j] > 0.f) - static_cast<int32_t>(s[j] < 0.f);
          tile_sign += gamma[j];
          g[j] = gamma[j] != 0 ? static_cast<float>(gamma[j]) : zs;  // resolved sign
        }
        sign_sum[w.l] += tile_sign;
        // Disjoint merge: keep values of the resolved sign (g > 0: positives, else negatives; never 0).
        for (int64_t j = 0; j < n; ++j) { acc[j] = 0.f; mx[j] = 0.f; cnt[j] = 0.f; }
        for (int64_t t = 0; t < tl.T; ++t) {
          const float* v = vals.data() + t * kTile;
          for (int64_t j = 0; j < n; ++j) {
            const bool pos = g[j] > 0.f;
            const bool keep = (pos & (v[j] > 0.f)) | (!pos & (v[j] < 0.f));
            const float kept = keep ? v[j] : 0.f;
            acc[j] += kept;
            cnt[j] += keep ? 1.f : 0.f;
            mx[j] = std::max(mx[j], std::fabs(kept));
          }
        }
        if (merge == kTiesSum) {
          for (int64_t j = 0; j < n; ++j) res[j] = acc[j];
        } else if (merge == kTiesMean) {
          for (int64_t j = 0; j < n; ++j) res[j] = acc[j] / std::max(cnt[j], 1.f);
        } else {
          for (int64_t j = 0; j < n; ++j) res[j] = g[j] * mx[j];
        }
        if (bs != nullptr) {
          for (int64_t j = 0; j < n; ++j) res[j] = static_cast<float>(bs[i0 + j]) + scale * res[j];
        } else {
          for (int64_t j = 0; j < n; ++j) res[j] = scale * res[j];
        }
        store_tile(out_ptr[w.l], i0, n, res);
        // Exact cancellations (rare): record the output for every possible zero sign.
        for (int64_t j = 0; j < n; ++j) {
          if (gamma[j] != 0 || !nonzero[j]) continue;
          cancel_count[w.l] += 1;
          if (!red.claim(max_positions)) continue;
          positions.push_back(tl.offset[w.l] + i0 + j);
          const float b = bs != nullptr ? static_cast<float>(bs[i0 + j]) : 0.f;
          for (float zsign : {1.f, -1.f, 0.f}) {
            auto load = [&](int t) { return vals[t * kTile + j]; };
            int g_unused;
            bool c_unused;
            const float r = ties_element(load, static_cast<int>(tl.T), merge, zsign, g_unused, c_unused);
            patch.push_back(bs != nullptr ? b + scale * r : scale * r);
          }
        }
      }
    }
    std::lock_guard<std::mutex> lock(red.mutex);
    red.nonfinite += nonfinite;
    for (int64_t l = 0; l < tl.L; ++l) {
      red.sign_sum[l] += sign_sum[l];
      red.cancel_count[l] += cancel_count[l];
    }
    red.positions.insert(red.positions.end(), positions.begin(), positions.end());
    red.patch.insert(red.patch.end(), patch.begin(), patch.end());
  });
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ties_merge_cpu(
    at::TensorList inputs, at::TensorList base, int64_t num_tasks, const at::Tensor& thresholds, bool strict,
    const at::Tensor& weights, c10::string_view merge, double scale, const at::Tensor& zero_sign, double dare_p,
    const c10::optional<at::Tensor>& dare_keys, bool dare_rescale, bool out_float, int64_t max_positions) {
  constexpr const char* op = "calm_fast.ties_merge";
  const TaskList tl = check_task_list(op, inputs, base, num_tasks);
  const int merge_code = ties_merge_code(op, std::string(merge));
  const at::Tensor thr = check_table(op, "thresholds", thresholds, tl, at::kFloat);
  const at::Tensor w = check_table(op, "weights", weights, tl, at::kFloat);
  const at::Tensor zs = check_vector(op, "zero_sign", zero_sign, tl.L, at::kLong, tl);
  TORCH_CHECK(max_positions >= 0, op, ": max_positions must be >= 0");
  check_dare(op, dare_p, dare_keys, tl);
  const at::Tensor keys = dare_keys.has_value() ? dare_keys->contiguous() : at::Tensor();
  std::vector<at::Tensor> out = alloc_outputs(inputs, tl, out_float);
  TiesReductions red;
  red.sign_sum.assign(tl.L, 0);
  red.cancel_count.assign(tl.L, 0);
  if (tl.L > 0) {
    const int64_t* zsp = zs.data_ptr<int64_t>();
    for (int64_t l = 0; l < tl.L; ++l)
      TORCH_CHECK(zsp[l] >= -1 && zsp[l] <= 1, op, ": zero_sign[", l, "]=", zsp[l], " is not -1, 0 or +1");
    const DareParams dare = make_dare(dare_p, dare_rescale);
    CF_DISPATCH_FLOAT(tl.dtype, [&] {
      auto run = [&](auto out_tag) {
        using out_t = decltype(out_tag);
        ties_impl<scalar_t, out_t>(inputs, base, tl, thr.data_ptr<float>(), strict, w.data_ptr<float>(), merge_code,
                                   static_cast<float>(scale), zsp, dare,
                                   keys.defined() ? keys.data_ptr<int64_t>() : nullptr, max_positions, out, red);
      };
      if (out_float) run(float{}); else run(scalar_t{});
    });
  }
  // All or nothing: every cancelled position, in ascending flat order, when they number at most
  // max_positions; none otherwise (the caller then re-runs with the known zero sign).  Deterministic for
  // any thread count, and the same rule as the CUDA kernel.
  int64_t total_cancelled = 0;
  for (int64_t l = 0; l < tl.L; ++l) total_cancelled += red.cancel_count[l];
  const int64_t P = total_cancelled <= max_positions ? static_cast<int64_t>(red.positions.size()) : 0;
  TORCH_CHECK(P == 0 || P == total_cancelled, op, ": internal error: recorded ", P, " of ", total_cancelled,
              " cancelled positions");
  at::Tensor positions = at::empty({P}, at::kLong);
  at::Tensor patch = at::empty({P, 3}, at::kFloat);
  if (P > 0) {
    std::vector<int64_t> order(static_cast<size_t>(P));
    for (int64_t i = 0; i < P; ++i) order[i] = i;
    std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return red.positions[a] < red.positions[b]; });
    int64_t* pos = positions.data_ptr<int64_t>();
    float* pat = patch.data_ptr<float>();
    for (int64_t i = 0; i < P; ++i) {
      pos[i] = red.positions[order[i]];
      std::memcpy(pat + 3 * i, red.patch.data() + 3 * order[i], sizeof(float) * 3);
    }
  }
  at::Tensor sign_sum = at::empty({tl.L}, at::kLong), cancel = at::empty({tl.L}, at::kLong);
  for (int64_t l = 0; l < tl.L; ++l) {
    sign_sum.data_ptr<int64_t>()[l] = red.sign_sum[l];
    cancel.data_ptr<int64_t>()[l] = red.cancel_count[l];
  }
  return {out, sign_sum, positions, patch, cancel, at::scalar_tensor(red.nonfinite, at::kLong)};
}

// --------------------------------------------------------------------------------------------------
// consensus_merge
// --------------------------------------------------------------------------------------------------
template <typename scalar_t, typename out_t>
int64_t consensus_impl(at::TensorList inputs, at::TensorList base, const TaskList& tl, const float* lambdas,
                       at::TensorList mtl, int64_t min_count, float alpha, std::vector<at::Tensor>& masks,
                       std::vector<at::Tensor>& out) {
  const auto in_ptr = data_ptrs<scalar_t>(inputs);
  const auto bs_ptr = data_ptrs<scalar_t>(base);
  std::vector<out_t*> out_ptr(tl.L);
  for (int64_t l = 0; l < tl.L; ++l) out_ptr[l] = out[l].data_ptr<out_t>();
  // Units start at multiples of kUnit (a multiple of 8), so each packed byte belongs to one unit.
  const std::vector<Unit> units = make_units(tl);
  const DareParams no_dare;
  const bool fast = simd_enabled();
  // count <= T, so min_count beyond T + 1 behaves as T + 1 (keeps nothing) and fits in int32 lanes.
  const int32_t min_count_i32 = static_cast<int32_t>(std::min<int64_t>(min_count, tl.T + 1));
  Reductions red;
  at::parallel_for(0, static_cast<int64_t>(units.size()), 1, [&](int64_t u0, int64_t u1) {
    alignas(64) float m[kTile], tau[kTile], res[kTile];
    alignas(64) int32_t count[kTile];
    alignas(64) uint8_t bit[kTile];
    int64_t nonfinite = 0;
    TileSource<scalar_t> src(fast ? tl.T : 0, no_dare);
    std::vector<uint8_t*> packed_rows(tl.T);
    for (int64_t u = u0; u < u1; ++u) {
      const Unit& w = units[u];
      const scalar_t* bs = base_ptr_or_null(bs_ptr, tl, w.l);
#if defined(CALM_FAST_HAVE_AVX2)
      if (fast) {
        for (int64_t i0 = w.begin; i0 < w.end; i0 += kTile) {
          const int64_t n = std::min(kTile, w.end - i0);
          nonfinite += src.load(in_ptr, bs, tl, w.l, i0, n, no_dare, nullptr);
          const float* brow = src.base;
          const float* given = mtl.empty() ? nullptr : mtl[w.l].data_ptr<float>() + i0;
          float* dst = std::is_same<out_t, float>::value ? reinterpret_cast<float*>(out_ptr[w.l]) + i0 : res;
          if (!masks.empty())
            for (int64_t t = 0; t < tl.T; ++t) packed_rows[t] = masks[t * tl.L + w.l].data_ptr<uint8_t>() + (i0 >> 3);
          const int64_t done = n & ~int64_t{7};
          src.run([&](auto rows, const float* tau_base) {
            avx2::consensus_row(rows, tau_base, static_cast<int>(tl.T), done, lambdas, given, min_count_i32, alpha,
                                brow, dst, masks.empty() ? nullptr : packed_rows.data(),
                                src.in_place ? &nonfinite : nullptr);
          });
          if (done < n) {  // tail of the tensor (< 8 elements, one partial mask byte): per element
            for (int64_t j = done; j < n; ++j) {
              float mj = 0.f;
              if (given != nullptr) {
                mj = given[j];
              } else {
                for (int64_t t = 0; t < tl.T; ++t) mj += src.tau(t, j);
              }
              int32_t c = 0;
              for (int64_t t = 0; t < tl.T; ++t) {
                const float tau_tj = src.tau(t, j);
                if (src.in_place) nonfinite += is_nonfinite(tau_tj);
                const bool b = tall_mask(tau_tj, mj, lambdas[t]);
                c += b;
                if (!masks.empty()) {
                  uint8_t& byte = packed_rows[t][j >> 3];
                  byte = static_cast<uint8_t>(j == done ? 0 : byte) | static_cast<uint8_t>(b << (j & 7));
                }
              }
              const float kept = c >= min_count ? mj : 0.f;
              dst[j] = brow != nullptr ? brow[j] + alpha * kept : alpha * kept;
            }
          }
          if (!std::is_same<out_t, float>::value) store_tile(out_ptr[w.l], i0, n, res, /*simd=*/true);
        }
        continue;
      }
#endif
      for (int64_t i0 = w.begin; i0 < w.end; i0 += kTile) {
        const int64_t n = std::min(kTile, w.end - i0);
        if (!mtl.empty()) {
          const float* given = mtl[w.l].data_ptr<float>() + i0;
          for (int64_t j = 0; j < n; ++j) m[j] = given[j];
        } else {
          for (int64_t j = 0; j < n; ++j) m[j] = 0.f;
          for (int64_t t = 0; t < tl.T; ++t) {
            load_tau_tile(in_ptr[t * tl.L + w.l], bs, i0, n, no_dare, 0u, tau);
            for (int64_t j = 0; j < n; ++j) m[j] += tau[j];
          }
        }
        for (int64_t j = 0; j < n; ++j) count[j] = 0;
        for (int64_t t = 0; t < tl.T; ++t) {
          nonfinite += load_tau_tile(in_ptr[t * tl.L + w.l], bs, i0, n, no_dare, 0u, tau);
          const float lam = lambdas[t];
          for (int64_t j = 0; j < n; ++j) {
            bit[j] = tall_mask(tau[j], m[j], lam);
            count[j] += bit[j];
          }
          if (!masks.empty()) {
            uint8_t* packed = masks[t * tl.L + w.l].data_ptr<uint8_t>() + (i0 >> 3);
            for (int64_t j = 0; j < n; j += 8) {
              uint8_t byte = 0;
              for (int64_t b = 0; b < 8 && j + b < n; ++b) byte |= static_cast<uint8_t>(bit[j + b] << b);
              packed[j >> 3] = byte;
            }
          }
        }
        for (int64_t j = 0; j < n; ++j) {
          const float kept = count[j] >= min_count ? m[j] : 0.f;
          res[j] = bs != nullptr ? static_cast<float>(bs[i0 + j]) + alpha * kept : alpha * kept;
        }
        store_tile(out_ptr[w.l], i0, n, res);
      }
    }
    std::lock_guard<std::mutex> lock(red.mutex);
    red.nonfinite += nonfinite;
  });
  return red.nonfinite;
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor> consensus_merge_cpu(
    at::TensorList inputs, at::TensorList base, int64_t num_tasks, const at::Tensor& tall_lambdas,
    at::TensorList mtl, int64_t min_count, double alpha, bool return_masks, bool out_float) {
  constexpr const char* op = "calm_fast.consensus_merge";
  const TaskList tl = check_task_list(op, inputs, base, num_tasks);
  const at::Tensor lam = check_consensus(op, tall_lambdas, mtl, min_count, tl);
  std::vector<at::Tensor> out = alloc_outputs(inputs, tl, out_float);
  std::vector<at::Tensor> masks = alloc_packed_masks(inputs, tl, return_masks);
  int64_t nonfinite = 0;
  if (tl.L > 0) {
    CF_DISPATCH_FLOAT(tl.dtype, [&] {
      auto run = [&](auto out_tag) {
        using out_t = decltype(out_tag);
        nonfinite = consensus_impl<scalar_t, out_t>(inputs, base, tl, lam.data_ptr<float>(), mtl, min_count,
                                                    static_cast<float>(alpha), masks, out);
      };
      if (out_float) run(float{}); else run(scalar_t{});
    });
  }
  return {out, masks, at::scalar_tensor(nonfinite, at::kLong)};
}

}  // namespace
}  // namespace cpu
}  // namespace calm_fast

TORCH_LIBRARY_IMPL(calm_fast, CPU, m) {
  m.impl("weighted_merge", &calm_fast::cpu::weighted_merge_cpu);
  m.impl("ties_merge", &calm_fast::cpu::ties_merge_cpu);
  m.impl("consensus_merge", &calm_fast::cpu::consensus_merge_cpu);
}
