// Hand-vectorised AVX2 cores of the CPU kernels' hot loops, on fp32 rows.
//
// Why by hand: the generic tile loops (the compiler's auto-vectorisation over SoA tiles) run every
// step as its own pass over a 1024-element tile, so the working set leaves L1 and each element is
// loaded and stored several times; the TIES pass also needs a left-packing store for the rare
// candidates of the bracket select, which compilers do not emit.  These cores keep one 8-lane vector
// of every task in registers (or a T x 8 scratch row in L1) and touch each input element once.
//
// They compute exactly what the generic loops compute, in the same order, with the same IEEE
// semantics (ordered compares, no FMA: the build uses -ffp-contract=off), so both paths are bitwise
// equal; the tests run both (CALM_FAST_CPU_SIMD=0 selects the generic loops) against the reference.
// Each core handles n = a multiple of 8 elements; callers run the generic loop on the tail.
#pragma once

#include <cstdint>
#include <cstdlib>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

#if defined(__AVX2__)
#include <immintrin.h>
#define CALM_FAST_HAVE_AVX2 1
#endif

namespace calm_fast {
namespace cpu {

// Whether the AVX2 cores run: compiled in (the build's -march has AVX2) and not disabled with
// CALM_FAST_CPU_SIMD=0.  Read on every op call (a getenv is nothing next to an op) so tests can flip it.
inline bool simd_enabled() {
#if defined(CALM_FAST_HAVE_AVX2)
  const char* e = std::getenv("CALM_FAST_CPU_SIMD");
  return !(e != nullptr && e[0] == '0');
#else
  return false;
#endif
}

#if defined(CALM_FAST_HAVE_AVX2)
namespace avx2 {

inline int64_t hsum_epi32(__m256i v) {
  alignas(32) int32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), v);
  int64_t s = 0;
  for (int i = 0; i < 8; ++i) s += lanes[i];
  return s;
}

// A lane mask (all-ones lanes) counted into int32 lanes: c - (-1) = c + 1.
inline __m256i count_lanes(__m256i c, __m256 mask) { return _mm256_sub_epi32(c, _mm256_castps_si256(mask)); }
inline __m256i count_lanes(__m256i c, __m256i mask) { return _mm256_sub_epi32(c, mask); }

inline __m256 abs_ps(__m256 x) { return _mm256_and_ps(x, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff))); }

// The trim rule on magnitudes: |x| >= t (P1), or |x| > t when strict (P2); NaN never kept.
inline __m256 trim_mask(__m256 a, __m256 t, bool strict) {
  return strict ? _mm256_cmp_ps(a, t, _CMP_GT_OQ) : _mm256_cmp_ps(a, t, _CMP_GE_OQ);
}

// Lanes holding inf or NaN (|x| bits >= 0x7f800000).
inline __m256i nonfinite_lanes(__m256 a /* |x| */) {
  return _mm256_cmpgt_epi32(_mm256_castps_si256(a), _mm256_set1_epi32(0x7f7fffff));
}

// Left-packing: for an 8-bit lane mask, the lane indices of its set bits, packed low (one byte each).
struct PackTable {
  uint64_t idx[256];
  PackTable() {
    for (int m = 0; m < 256; ++m) {
      uint64_t v = 0;
      int k = 0;
      for (int b = 0; b < 8; ++b)
        if ((m >> b) & 1) v |= static_cast<uint64_t>(b) << (8 * k++);
      idx[m] = v;
    }
  }
};

inline const PackTable& pack_table() {
  static const PackTable table;
  return table;
}

// Stores the lanes of `v` selected by `mask` (8-bit) contiguously at dst (writes 8 lanes: dst needs
// 8 - popcount slack) and returns how many were selected.
inline int left_pack(int32_t* dst, __m256i v, int mask) {
  const __m256i perm = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(pack_table().idx[mask])));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm256_permutevar8x32_epi32(v, perm));
  return __builtin_popcount(static_cast<unsigned>(mask));
}

// ---------------------------------------------------------------------------------------------
// dtype conversions of 8 lanes, bit-identical to c10's scalar ones: bf16 -> fp32 is the bf16 bits as
// the high half; fp32 -> bf16 rounds to nearest even with NaN -> 0x7FC0 (c10::BFloat16's rule); fp16
// uses F16C, the very instructions c10::Half converts with when the build has F16C.
// ---------------------------------------------------------------------------------------------
template <typename T>
struct Convert8 : std::false_type {};
template <>
struct Convert8<float> : std::true_type {};
template <>
struct Convert8<c10::BFloat16> : std::true_type {};
#if defined(__F16C__)
template <>
struct Convert8<c10::Half> : std::true_type {};
#endif

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(c10::BFloat16* p, __m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i bias = _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)),
                                        _mm256_set1_epi32(0x7FFF));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  // 32 -> 16 bits: packus works within 128-bit halves; gather the two useful quarters.
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
#if defined(__F16C__)
inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline void store8(c10::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
#endif

// dst[0, n8) = float(in[0, n8)) (- float(base[0, n8))); n8 a multiple of 8.
template <typename scalar_t>
inline void load_rows8(const scalar_t* in, const scalar_t* base, int64_t n8, float* dst) {
  // Tiles of one task are read in short bursts between the other tasks' bursts: prefetch the same
  // task's next tile so the hardware stream never restarts cold.
  constexpr int64_t kAhead = 4096 / sizeof(scalar_t);
  constexpr int64_t kLine = 64 / sizeof(scalar_t);
  if (base != nullptr) {
    for (int64_t j = 0; j < n8; j += 8) {
      if ((j & (kLine - 1)) == 0) {
        __builtin_prefetch(in + j + kAhead);
        __builtin_prefetch(base + j + kAhead);
      }
      _mm256_storeu_ps(dst + j, _mm256_sub_ps(load8(in + j), load8(base + j)));
    }
  } else {
    for (int64_t j = 0; j < n8; j += 8) {
      if ((j & (kLine - 1)) == 0) __builtin_prefetch(in + j + kAhead);
      _mm256_storeu_ps(dst + j, load8(in + j));
    }
  }
}

// Task t's tau on 8 lanes: the row value, minus the fp32 base row when the rows are fine-tuned weights
// read in place (the same fp32 subtraction load_tau_tile does).
template <typename in_t>
inline __m256 load_tau8(const in_t* row, const float* tau_base, int64_t j) {
  const __m256 x = load8(row + j);
  return tau_base != nullptr ? _mm256_sub_ps(x, _mm256_loadu_ps(tau_base + j)) : x;
}

template <typename out_t>
inline void store_rows8(const float* v, int64_t n8, out_t* out) {
  for (int64_t j = 0; j < n8; j += 8) store8(out + j, _mm256_loadu_ps(v + j));
}

// ---------------------------------------------------------------------------------------------
// abs_bracket: counts of the magnitude keys of x[0, n) against [klo, khi] (both < 0x7fffffff, so
// key <= k is key < k + 1 in int32), and the keys strictly inside packed into `cand` as |x| floats
// (cand needs n + 8 slots).  Returns the number of candidates written.
// ---------------------------------------------------------------------------------------------
struct BracketCounts {
  int64_t below = 0, at_lo = 0, inside = 0, at_hi = 0;
};

inline int64_t bracket_row(const float* x, int64_t n, int32_t klo, int32_t khi, bool distinct, BracketCounts& c,
                           float* cand) {
  const __m256i lo = _mm256_set1_epi32(klo), lo1 = _mm256_set1_epi32(klo + 1);
  const __m256i hi = _mm256_set1_epi32(khi), hi1 = _mm256_set1_epi32(khi + 1);
  const __m256i absmask = _mm256_set1_epi32(0x7fffffff);
  __m256i lt_lo = _mm256_setzero_si256(), le_lo = lt_lo, lt_hi = lt_lo, le_hi = lt_lo;
  int32_t* out = reinterpret_cast<int32_t*>(cand);
  int64_t m = 0;
  for (int64_t j = 0; j < n; j += 8) {
    const __m256i key = _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + j)), absmask);
    const __m256i a = _mm256_cmpgt_epi32(lo, key), b = _mm256_cmpgt_epi32(lo1, key);
    const __m256i d = _mm256_cmpgt_epi32(hi, key), e = _mm256_cmpgt_epi32(hi1, key);
    lt_lo = count_lanes(lt_lo, a);
    le_lo = count_lanes(le_lo, b);
    lt_hi = count_lanes(lt_hi, d);
    le_hi = count_lanes(le_hi, e);
    const int inside = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_andnot_si256(b, d)));  // klo < key < khi
    if (inside != 0) m += left_pack(out + m, key, inside);
  }
  const int64_t below = hsum_epi32(lt_lo), le = hsum_epi32(le_lo);
  c.below += below;
  c.at_lo += le - below;
  if (distinct) {
    const int64_t lt_h = hsum_epi32(lt_hi);
    c.inside += lt_h - le;
    c.at_hi += hsum_epi32(le_hi) - lt_h;
  }
  return m;
}

// ---------------------------------------------------------------------------------------------
// weighted_merge: out[j] = base[j] + scale * sum_t w_t * keep_t(j) * tau_t[j]  (or scale * sum without
// a base), t ascending from an fp32 zero, exactly as the generic loop.  keep_t: |tau| >= thr_t
// (> when strict) when thr != nullptr.  Counts non-finite tau into *nonfinite when it is not null
// (the rows were not loaded by load_tau_tile, which counts them itself).
// ---------------------------------------------------------------------------------------------
template <typename in_t>
inline void weighted_row(const in_t* const* src, const float* tau_base, int T, int64_t n, const float* w,
                         const float* thr, bool strict, float scale, const float* base, float* out,
                         int64_t* nonfinite) {
  const __m256 vscale = _mm256_set1_ps(scale);
  __m256i nf = _mm256_setzero_si256();
  for (int64_t j = 0; j < n; j += 8) {
    __m256 acc = _mm256_setzero_ps();
    for (int t = 0; t < T; ++t) {
      __m256 x = load_tau8(src[t], tau_base, j);
      if (nonfinite != nullptr) nf = count_lanes(nf, nonfinite_lanes(abs_ps(x)));
      if (thr != nullptr) {
        const __m256 th = _mm256_broadcast_ss(thr + t);
        x = _mm256_and_ps(trim_mask(abs_ps(x), th, strict), x);
      }
      acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_broadcast_ss(w + t), x));
    }
    acc = _mm256_mul_ps(vscale, acc);
    if (base != nullptr) acc = _mm256_add_ps(_mm256_loadu_ps(base + j), acc);
    _mm256_storeu_ps(out + j, acc);
  }
  if (nonfinite != nullptr) *nonfinite += hsum_epi32(nf);
}

// ---------------------------------------------------------------------------------------------
// ties_merge: trim (|tau| >= thr_t, > when strict), weight, elect (sign of the sum, t ascending),
// disjoint sum/mean/max, scale, add the base -- common/elementwise.h's ties_element on 8 lanes.
// `scratch` holds T x 8 floats (the trimmed, weighted values of one vector).  For every element whose
// elected sign is exactly 0 while some trimmed value is not, on_cancel(j) is called after its output
// is stored (rare; the caller records it for the zero-sign patch).  Returns the sum of the elected
// signs (+1/-1/0) over the row.
// ---------------------------------------------------------------------------------------------
template <typename in_t, class OnCancel>
inline int64_t ties_row(const in_t* const* src, const float* tau_base, int T, int64_t n, const float* thr,
                        const float* w, bool strict,
                        int merge, float scale, float zero_sign, const float* base, float* out, int64_t* nonfinite,
                        float* scratch, OnCancel&& on_cancel) {
  const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.f), minus_one = _mm256_set1_ps(-1.f);
  const __m256 vzs = _mm256_set1_ps(zero_sign), vscale = _mm256_set1_ps(scale);
  __m256i nf = _mm256_setzero_si256(), npos = nf, nneg = nf;
  for (int64_t j = 0; j < n; j += 8) {
    __m256 s = zero, any = zero;
    for (int t = 0; t < T; ++t) {
      const __m256 x = load_tau8(src[t], tau_base, j);
      const __m256 a = abs_ps(x);
      if (nonfinite != nullptr) nf = count_lanes(nf, nonfinite_lanes(a));
      const __m256 keep = trim_mask(a, _mm256_broadcast_ss(thr + t), strict);
      const __m256 v = _mm256_and_ps(keep, _mm256_mul_ps(x, _mm256_broadcast_ss(w + t)));
      _mm256_storeu_ps(scratch + 8 * t, v);
      s = _mm256_add_ps(s, v);
      any = _mm256_or_ps(any, _mm256_cmp_ps(v, zero, _CMP_NEQ_UQ));  // v != 0 (NaN counts, as in C)
    }
    const __m256 gp = _mm256_cmp_ps(s, zero, _CMP_GT_OQ), gn = _mm256_cmp_ps(s, zero, _CMP_LT_OQ);
    npos = count_lanes(npos, gp);
    nneg = count_lanes(nneg, gn);
    const __m256 elected = _mm256_or_ps(gp, gn);
    const __m256 gamma = _mm256_or_ps(_mm256_and_ps(gp, one), _mm256_and_ps(gn, minus_one));
    const __m256 g = _mm256_blendv_ps(vzs, gamma, elected);  // resolved sign
    const __m256 keep_pos = _mm256_cmp_ps(g, zero, _CMP_GT_OQ);
    __m256 acc = zero, cnt = zero, mx = zero;
    for (int t = 0; t < T; ++t) {
      const __m256 v = _mm256_loadu_ps(scratch + 8 * t);
      const __m256 keep =
          _mm256_blendv_ps(_mm256_cmp_ps(v, zero, _CMP_LT_OQ), _mm256_cmp_ps(v, zero, _CMP_GT_OQ), keep_pos);
      const __m256 kept = _mm256_and_ps(keep, v);
      acc = _mm256_add_ps(acc, kept);
      cnt = _mm256_add_ps(cnt, _mm256_and_ps(keep, one));
      mx = _mm256_max_ps(mx, abs_ps(kept));
    }
    __m256 res;
    if (merge == 0) {
      res = acc;
    } else if (merge == 1) {
      res = _mm256_div_ps(acc, _mm256_max_ps(cnt, one));
    } else {
      res = _mm256_mul_ps(g, mx);
    }
    res = _mm256_mul_ps(vscale, res);
    if (base != nullptr) res = _mm256_add_ps(_mm256_loadu_ps(base + j), res);
    _mm256_storeu_ps(out + j, res);
    int cancelled = _mm256_movemask_ps(_mm256_andnot_ps(elected, any));
    while (cancelled != 0) {
      const int b = __builtin_ctz(static_cast<unsigned>(cancelled));
      on_cancel(j + b);
      cancelled &= cancelled - 1;
    }
  }
  if (nonfinite != nullptr) *nonfinite += hsum_epi32(nf);
  return hsum_epi32(npos) - hsum_epi32(nneg);
}

// ---------------------------------------------------------------------------------------------
// consensus_merge: m = mtl (or sum_t tau_t, t ascending), TALL bits |tau_t| > lambda_t |m - tau_t|,
// count >= min_count keeps m; out = base + alpha * kept.  Packed masks: byte j/8 of row t gets the 8
// bits of elements j..j+7 (element j + b is bit b) when masks != nullptr.
// ---------------------------------------------------------------------------------------------
template <typename in_t>
inline void consensus_row(const in_t* const* src, const float* tau_base, int T, int64_t n, const float* lambdas,
                          const float* mtl,
                          int32_t min_count, float alpha, const float* base, float* out, uint8_t* const* masks,
                          int64_t* nonfinite) {
  const __m256 valpha = _mm256_set1_ps(alpha);
  const __m256i need = _mm256_set1_epi32(min_count - 1);  // count >= min_count  <=>  count > min_count - 1
  __m256i nf = _mm256_setzero_si256();
  for (int64_t j = 0; j < n; j += 8) {
    __m256 m;
    if (mtl != nullptr) {
      m = _mm256_loadu_ps(mtl + j);
    } else {
      m = _mm256_setzero_ps();
      for (int t = 0; t < T; ++t) m = _mm256_add_ps(m, load_tau8(src[t], tau_base, j));
    }
    __m256i count = _mm256_setzero_si256();
    for (int t = 0; t < T; ++t) {
      const __m256 tau = load_tau8(src[t], tau_base, j);
      const __m256 a = abs_ps(tau);
      if (nonfinite != nullptr) nf = count_lanes(nf, nonfinite_lanes(a));
      const __m256 b = abs_ps(_mm256_sub_ps(m, tau));
      const __m256 bit = _mm256_cmp_ps(a, _mm256_mul_ps(_mm256_broadcast_ss(lambdas + t), b), _CMP_GT_OQ);
      count = count_lanes(count, bit);
      if (masks != nullptr) masks[t][j >> 3] = static_cast<uint8_t>(_mm256_movemask_ps(bit));
    }
    const __m256 kept = _mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(count, need)), m);
    __m256 res = _mm256_mul_ps(valpha, kept);
    if (base != nullptr) res = _mm256_add_ps(_mm256_loadu_ps(base + j), res);
    _mm256_storeu_ps(out + j, res);
  }
  if (nonfinite != nullptr) *nonfinite += hsum_epi32(nf);
}

// ---------------------------------------------------------------------------------------------
// Philox-4x32-10 (common/elementwise.h's philox4x32_10) of the 8 consecutive counters first .. first+7
// under one key, 8 blocks per instruction: words[4 b + i] = word i of block b, the layout
// load_tau_tile's DARE loop reads.  Integer arithmetic only, so identical to the scalar generator.
// ---------------------------------------------------------------------------------------------
inline void mulhilo8(__m256i m, __m256i c, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(m, c);                         // 64-bit products, lanes 0 2 4 6
  const __m256i odd = _mm256_mul_epu32(m, _mm256_srli_epi64(c, 32));  // lanes 1 3 5 7
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

inline void philox8(uint64_t first, uint64_t key, uint32_t* words) {
  alignas(32) uint32_t lo32[8], hi32[8];
  for (int b = 0; b < 8; ++b) {
    const uint64_t c = first + static_cast<uint64_t>(b);
    lo32[b] = static_cast<uint32_t>(c);
    hi32[b] = static_cast<uint32_t>(c >> 32);
  }
  __m256i c0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(lo32));
  __m256i c1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(hi32));
  __m256i c2 = _mm256_setzero_si256(), c3 = c2;
  uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  for (int r = 0; r < 10; ++r) {
    __m256i hi0, lo0, hi1, lo1;
    mulhilo8(m0, c0, hi0, lo0);
    mulhilo8(m1, c2, hi1, lo1);
    c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(k0)));
    c1 = lo1;
    c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  alignas(32) uint32_t w[4][8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(w[0]), c0);
  _mm256_store_si256(reinterpret_cast<__m256i*>(w[1]), c1);
  _mm256_store_si256(reinterpret_cast<__m256i*>(w[2]), c2);
  _mm256_store_si256(reinterpret_cast<__m256i*>(w[3]), c3);
  for (int b = 0; b < 8; ++b)
    for (int i = 0; i < 4; ++i) words[4 * b + i] = w[i][b];
}

}  // namespace avx2
#endif  // CALM_FAST_HAVE_AVX2

}  // namespace cpu
}  // namespace calm_fast
