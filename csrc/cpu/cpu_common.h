// Helpers shared by the CPU kernels: dtype dispatch, work splitting, per-thread reductions.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common/elementwise.h"
#include "common/tensor_list.h"
#include "cpu/simd_avx2.h"

namespace calm_fast {
namespace cpu {

// Elements processed per tile: the SoA scratch of a tile (T rows of kTile floats) stays in L1/L2.
constexpr int64_t kTile = 1024;
// Elements per parallel work unit.
constexpr int64_t kUnit = 1 << 16;

// One unit of parallel work: elements [begin, end) of tensor l.
struct Unit {
  int64_t l, begin, end;
};

inline std::vector<Unit> make_units(const TaskList& tl) {
  std::vector<Unit> units;
  for (int64_t l = 0; l < tl.L; ++l) {
    for (int64_t b = 0; b < tl.numel[l]; b += kUnit) units.push_back({l, b, std::min(tl.numel[l], b + kUnit)});
  }
  return units;
}

// Runs the lambda body with `scalar_t` bound to the list's dtype (float32, bfloat16, float16 only:
// fewer instantiations than AT_DISPATCH_FLOATING_TYPES_AND2, which adds double).
#define CF_DISPATCH_FLOAT(stype, ...)                                                 \
  [&] {                                                                               \
    switch (stype) {                                                                  \
      case at::kFloat: { using scalar_t = float; return __VA_ARGS__(); }              \
      case at::kBFloat16: { using scalar_t = c10::BFloat16; return __VA_ARGS__(); }   \
      case at::kHalf: { using scalar_t = c10::Half; return __VA_ARGS__(); }           \
      default: TORCH_CHECK(false, "calm_fast: unsupported dtype ", stype);            \
    }                                                                                 \
  }()

template <typename scalar_t>
inline std::vector<const scalar_t*> data_ptrs(at::TensorList xs) {
  std::vector<const scalar_t*> p(xs.size());
  for (size_t i = 0; i < xs.size(); ++i) p[i] = xs[i].data_ptr<scalar_t>();
  return p;
}

inline DareParams make_dare(double p, bool rescale) {
  DareParams d;
  d.p = static_cast<float>(p);
  d.inv_keep = (rescale && p < 1.0) ? static_cast<float>(1.0 / (1.0 - p)) : 1.f;
  if (rescale && p >= 1.0) d.inv_keep = 0.f;  // everything dropped: 0, never inf * 0
  return d;
}

// dst[0, n) = float(in[i0 + j]) - float(base[i0 + j]) (no subtraction without a base): one tile
// converted to fp32, 8 lanes at a time with `simd` (the same bits as the scalar conversions).
template <typename scalar_t>
inline void convert_tile(const scalar_t* in, const scalar_t* base, int64_t i0, int64_t n, float* dst, bool simd) {
  int64_t j0 = 0;  // elements already converted by the AVX2 loop
#if defined(CALM_FAST_HAVE_AVX2)
  if (simd && avx2::Convert8<scalar_t>::value) {
    j0 = n & ~int64_t{7};
    avx2::load_rows8(in + i0, base != nullptr ? base + i0 : nullptr, j0, dst);
  }
#endif
  if (base != nullptr) {
    for (int64_t j = j0; j < n; ++j) dst[j] = static_cast<float>(in[i0 + j]) - static_cast<float>(base[i0 + j]);
  } else {
    for (int64_t j = j0; j < n; ++j) dst[j] = static_cast<float>(in[i0 + j]);
  }
}

// Loads tile [i0, i0 + n) of one task's tau into `dst` (fp32), applying DARE, and returns the number of
// non-finite values in the result, i.e. of the values that enter the merge: counted after DARE, so a
// dropped inf/NaN is not counted and a survivor whose 1/(1-p) rescale overflows is.  `simd` converts 8
// lanes at a time and lets the DARE words come from the 8-block AVX2 Philox (same values either way).
template <typename scalar_t>
inline int64_t load_tau_tile(const scalar_t* in, const scalar_t* base, int64_t i0, int64_t n, const DareParams& d,
                             uint64_t key, float* dst, bool simd = false) {
  int64_t nonfinite = 0;
  convert_tile(in, base, i0, n, dst, simd);
  if (d.p > 0.f) {
    // Same values as dare_apply(dst[j], d, key, i0 + j), one Philox block per 4 elements (tiles start
    // at multiples of 4), in two vectorisable loops.
    alignas(64) uint32_t words[kTile];
    const int64_t blocks = (n + 3) / 4;
    const uint64_t first = static_cast<uint64_t>(i0) >> 2;
    int64_t b = 0;
#if defined(CALM_FAST_HAVE_AVX2)
    if (simd)
      for (; b + 8 <= blocks; b += 8) avx2::philox8(first + static_cast<uint64_t>(b), key, words + 4 * b);
#endif
    for (; b < blocks; ++b) {
      const Philox4 r = philox4x32_10(first + static_cast<uint64_t>(b), key);
      words[4 * b] = r.w[0];
      words[4 * b + 1] = r.w[1];
      words[4 * b + 2] = r.w[2];
      words[4 * b + 3] = r.w[3];
    }
    const DareParams dd = d;  // a local copy: no aliasing with dst, so the loop vectorises
    for (int64_t j = 0; j < n; ++j) dst[j] = dare_apply_word(dst[j], dd, words[j]);
  }
  for (int64_t j = 0; j < n; ++j) nonfinite += is_nonfinite(dst[j]);
  return nonfinite;
}

// The base of tile [i0, i0 + n) as fp32: in place for fp32, else converted into `buf`; null without a base.
template <typename scalar_t>
inline const float* base_row(const scalar_t* base, int64_t i0, int64_t n, float* buf) {
  if (base == nullptr) return nullptr;
  if (std::is_same<scalar_t, float>::value) return reinterpret_cast<const float*>(base) + i0;
  convert_tile<scalar_t>(base, nullptr, i0, n, buf, /*simd=*/true);  // only called on the AVX2 paths
  return buf;
}

// Where the AVX2 paths read every task's tau for one tile.  In place (no DARE, a dtype the vector
// loads convert): the inputs themselves, typed, with the fp32 base row subtracted by the core (the same
// fp32 subtraction load_tau_tile does) -- each input element is read once, by the core.  Otherwise
// (DARE): fp32 rows filled by load_tau_tile.  `run(f)` calls f(src, tau_base) with the right pointers.
template <typename scalar_t>
struct TileSource {
  bool in_place;
  std::vector<const scalar_t*> typed;
  std::vector<const float*> rows;
  std::vector<float> row_buf, base_buf;
  const float* base = nullptr;  // fp32 base of the tile (null without a base)

  TileSource(int64_t T, const DareParams& d)
      : in_place(d.p <= 0.f
#if defined(CALM_FAST_HAVE_AVX2)
                 && avx2::Convert8<scalar_t>::value
#endif
                 ),
        typed(T), rows(T), row_buf(in_place ? 0 : T * kTile), base_buf(kTile) {}

  // Points at tile [i0, i0 + n) of tensor l; returns the non-finite count load_tau_tile saw (rows mode).
  int64_t load(const std::vector<const scalar_t*>& in, const scalar_t* bs, const TaskList& tl, int64_t l, int64_t i0,
               int64_t n, const DareParams& d, const int64_t* keys) {
    base = base_row(bs, i0, n, base_buf.data());
    int64_t nonfinite = 0;
    for (int64_t t = 0; t < tl.T; ++t) {
      const int64_t ti = t * tl.L + l;
      if (in_place) {
        typed[t] = in[ti] + i0;
        continue;
      }
      float* r = row_buf.data() + t * kTile;
      nonfinite += load_tau_tile(in[ti], bs, i0, n, d, keys != nullptr ? static_cast<uint64_t>(keys[ti]) : 0u, r,
                                 /*simd=*/true);
      rows[t] = r;
    }
    return nonfinite;
  }

  // tau of task t at tile element j (the scalar tails).
  float tau(int64_t t, int64_t j) const {
    if (!in_place) return rows[t][j];
    const float x = static_cast<float>(typed[t][j]);
    return base != nullptr ? x - base[j] : x;
  }

  template <class F>
  auto run(F&& f) const {
    return in_place ? f(typed.data(), base) : f(rows.data(), static_cast<const float*>(nullptr));
  }
};

// Column l of a [T, L] table as T contiguous values.
inline void table_column(const float* table, const TaskList& tl, int64_t l, float* dst) {
  for (int64_t t = 0; t < tl.T; ++t) dst[t] = table[t * tl.L + l];
}

// out[i0, i0 + n) = v converted to out_t (`simd`: 8 lanes at a time, the same bits).
template <typename out_t>
inline void store_tile(out_t* out, int64_t i0, int64_t n, const float* v, bool simd = false) {
  int64_t j0 = 0;
#if defined(CALM_FAST_HAVE_AVX2)
  if (simd && avx2::Convert8<out_t>::value) {
    j0 = n & ~int64_t{7};
    avx2::store_rows8(v, j0, out + i0);
  }
#else
  (void)simd;
#endif
  for (int64_t j = j0; j < n; ++j) out[i0 + j] = static_cast<out_t>(v[j]);
}

}  // namespace cpu
}  // namespace calm_fast
