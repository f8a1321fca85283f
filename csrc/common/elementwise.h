// Per-element math shared verbatim by the CPU kernels (csrc/cpu), the CUDA kernels (csrc/cuda) and the
// emulated CUDA build.  Keeping one copy of every formula is what makes "CUDA == CPU, bit for bit" a
// property of indexing alone, which the emulator tests then check.
//
// Nothing here allocates, throws or touches torch: plain functions on floats and integers.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define CF_HD __host__ __device__ __forceinline__
#elif defined(CALM_FAST_EMULATE_CUDA)
#define CF_HD inline
#else
#define CF_HD inline __attribute__((always_inline))
#endif

namespace calm_fast {

// ---------------------------------------------------------------------------------------------
// Magnitude keys.  For IEEE floats, clearing the sign bit gives an unsigned integer that is monotone
// in |x| (+0 == -0 -> 0, denormals < normals < inf < NaN).  All selection works on fp32 keys: bf16 and
// fp16 convert to fp32 exactly, so a threshold over a mixed list equals torch.kthvalue on the
// fp32-promoted concatenation, and equals it on an all-bf16 (or all-fp16) concatenation too.
// ---------------------------------------------------------------------------------------------
constexpr int kHistHighBins = 1 << 15;  // level 0: key >> 16  (the sign bit is already cleared)
constexpr int kHistLowBins = 1 << 16;   // level 1: key & 0xffff, only for keys whose high part == prefix
constexpr uint32_t kNonFiniteKey = 0x7f800000u;  // keys >= this are inf or NaN

CF_HD uint32_t float_bits(float v) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(v);
#else
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  return u;
#endif
}

CF_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
#endif
}

CF_HD uint32_t abs_key(float v) { return float_bits(v) & 0x7fffffffu; }

CF_HD bool is_nonfinite(float v) { return abs_key(v) >= kNonFiniteKey; }

// ---------------------------------------------------------------------------------------------
// Philox-4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11), used as a
// counter-based generator.  Element i of a tensor uses word (i & 3) of the block for counter i >> 2
// under that tensor's 64-bit key: every element gets its own 32 random bits, a block serves four
// consecutive elements (4x fewer rounds on the CPU), and the value depends only on (key, i).
// ---------------------------------------------------------------------------------------------
CF_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

struct Philox4 {
  uint32_t w[4];
};

CF_HD Philox4 philox4x32_10(uint64_t counter, uint64_t key) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0u, c3 = 0u;
  uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(0xD2511F53u, c0, hi0, lo0);
    mulhilo32(0xCD9E8D57u, c2, hi1, lo1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// 32-bit word -> uniform in [0, 1) on a 2^-24 grid (exact in fp32).
CF_HD float word_to_uniform(uint32_t w) { return static_cast<float>(w >> 8) * (1.0f / 16777216.0f); }

// The uniform of element `index` under `key`.
CF_HD float philox_uniform(uint64_t index, uint64_t key) {
  const Philox4 b = philox4x32_10(index >> 2, key);
  return word_to_uniform(b.w[index & 3]);
}

// DARE drop-and-rescale of one element.  Kept iff u >= p (p = 0 keeps all, p = 1 drops all).
// With rescale the survivor is multiplied by 1/(1-p); p == 1 gives 0, never NaN.
struct DareParams {
  float p = 0.f;          // drop probability; <= 0 disables DARE
  float inv_keep = 1.f;   // 1/(1-p) when rescaling, else 1
};

// DARE of one element given its 32-bit Philox word (word index & 3 of the block of counter index >> 2):
// the single formula behind dare_apply, the CPU tile loop (one block per 4 elements) and the CUDA
// kernels (dare_words4 in cuda/dare.cuh).
CF_HD float dare_apply_word(float v, const DareParams& d, uint32_t word) {
  if (d.p <= 0.f) return v;
  return (word_to_uniform(word) >= d.p) ? v * d.inv_keep : 0.f;
}

CF_HD float dare_apply(float v, const DareParams& d, uint64_t key, int64_t index) {
  if (d.p <= 0.f) return v;
  const uint64_t i = static_cast<uint64_t>(index);
  return dare_apply_word(v, d, philox4x32_10(i >> 2, key).w[i & 3]);
}

// tau of one element: the input itself, or input - base (fp32) when the inputs are fine-tuned weights.
template <typename scalar_t>
CF_HD float load_tau(const scalar_t* in, const scalar_t* base, int64_t i) {
  float v = static_cast<float>(in[i]);
  if (base != nullptr) v -= static_cast<float>(base[i]);
  return v;
}

// Trim rule: P1 keeps |x| >= t (ties kept), P2 ("strict", CALM/L&S) keeps |x| > t (ties dropped).
CF_HD bool trim_keep(float v, float threshold, bool strict) {
  const float a = v < 0.f ? -v : v;
  return strict ? (a > threshold) : (a >= threshold);
}

// ---------------------------------------------------------------------------------------------
// TIES elect + disjoint merge of one element (ALGORITHMS.md §2, steps 2-3).
//   `load(t)` returns task t's trimmed (and weighted) value.
//   zero_sign is the sign used where the elected sign is exactly 0 (the global majority mu).
// Sets `gamma` to the unresolved elected sign and `cancelled` when gamma == 0 while some trimmed
// value is non-zero: only there does the result depend on zero_sign.
// ---------------------------------------------------------------------------------------------
enum TiesMerge : int { kTiesSum = 0, kTiesMean = 1, kTiesMax = 2 };

template <class Load>
CF_HD float ties_element(const Load& load, int num_tasks, int merge, float zero_sign, int& gamma,
                         bool& cancelled) {
  float s = 0.f;
  bool any_nonzero = false;
  for (int t = 0; t < num_tasks; ++t) {
    const float v = load(t);
    s += v;
    any_nonzero |= (v != 0.f);
  }
  gamma = (s > 0.f) - (s < 0.f);
  cancelled = (gamma == 0) && any_nonzero;
  const float g = gamma != 0 ? static_cast<float>(gamma) : zero_sign;
  float acc = 0.f, mx = 0.f;
  int count = 0;
  for (int t = 0; t < num_tasks; ++t) {
    const float v = load(t);
    // gamma > 0 keeps positives, otherwise (gamma < 0, or an unresolved 0) negatives; zeros never.
    const bool keep = (g > 0.f) ? (v > 0.f) : (v < 0.f);
    if (keep) {
      acc += v;
      count += 1;
      const float a = v < 0.f ? -v : v;
      mx = a > mx ? a : mx;
    }
  }
  if (merge == kTiesSum) return acc;
  if (merge == kTiesMean) return acc / static_cast<float>(count > 1 ? count : 1);
  return g * mx;
}

// Consensus / TALL mask of one task at one element (ALGORITHMS.md §4): |tau_t| > lambda_t |mtl - tau_t|.
CF_HD bool tall_mask(float tau, float mtl, float lambda_t) {
  const float a = tau < 0.f ? -tau : tau;
  const float d = mtl - tau;
  const float b = d < 0.f ? -d : d;
  return a > lambda_t * b;
}

// ---------------------------------------------------------------------------------------------
// CALM mask training (ALGORITHMS.md §8).  Everything below is fp32 with every product, sum and
// quotient rounded on its own (f_mul / f_add / f_sub / f_div: __f*_rn on the device, plain operators
// on the host, where the build has -ffp-contract=off), so CPU, CUDA and the emulator agree bit for bit.
// ---------------------------------------------------------------------------------------------
CF_HD float f_mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
CF_HD float f_add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
CF_HD float f_sub(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
CF_HD float f_div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

// e^y for y <= 0 (and NaN -> NaN), from + - * only: expf / __expf differ between glibc and CUDA in the
// last bit, which would make sigma, hence R after 100 steps and the binary masks, device-dependent.
// Branch-free (selects only), so the CPU tile loops can vectorise it.
//   y = k ln2 + r, k = round(y / ln2), |r| <= ln2 / 2 (Cody-Waite: ln2 = kLn2Hi + kLn2Lo, where kLn2Hi
//   has 15 significant bits, so k * kLn2Hi is exact for |k| <= 150 and y - k * kLn2Hi is exact by
//   Sterbenz); e^r = 1 + (r + r^2 q(r)), q the Taylor series of (e^r - 1 - r) / r^2 to degree 6
//   (truncation < 0.01 ulp); e^y = e^r * 2^(k+64) * 2^-64: the first product is exact, the second
//   rounds once, also when the result is subnormal.  Below -104 the result rounds to +0 anyway.
// Accuracy: < 1 ulp in our tests (tests/test_calm_ops.py measures it against fp64).
CF_HD float calm_exp_nonpos(float y) {
  const bool nan = !(y == y);
  float yc = nan ? 0.f : y;  // keep NaN out of the float -> int conversion below
  yc = yc < -104.f ? -104.f : yc;
  constexpr float kLog2e = 1.44269502f;
  constexpr float kRound = 12582912.f;  // 1.5 * 2^23: x + kRound - kRound rounds x to an integer
  constexpr float kLn2Hi = 0.693145751953125f;
  constexpr float kLn2Lo = 1.42860682e-6f;
  const float kf = f_sub(f_add(f_mul(yc, kLog2e), kRound), kRound);  // in [-150, 0]
  const float r = f_sub(f_sub(yc, f_mul(kf, kLn2Hi)), f_mul(kf, kLn2Lo));
  float q = 1.f / 40320.f;
  q = f_add(f_mul(q, r), 1.f / 5040.f);
  q = f_add(f_mul(q, r), 1.f / 720.f);
  q = f_add(f_mul(q, r), 1.f / 120.f);
  q = f_add(f_mul(q, r), 1.f / 24.f);
  q = f_add(f_mul(q, r), 1.f / 6.f);
  q = f_add(f_mul(q, r), 0.5f);
  const float er = f_add(1.f, f_add(r, f_mul(f_mul(r, r), q)));
  const int k = static_cast<int>(kf);  // exact: kf is an integral float
  const float scale = bits_float(static_cast<uint32_t>(k + 64 + 127) << 23);  // 2^(k+64), a normal float
  const float res = f_mul(f_mul(er, scale), bits_float(0x1f800000u));      // * 2^-64
  return nan ? y : res;
}

// The logistic sigmoid of the CALM ops (one definition for CPU, CUDA and the emulator).
//   x >= 0: 1 / (1 + s);  x < 0: s / (1 + s);  s = e^-|x| in (0, 1], so nothing overflows and tiny
//   results keep their relative accuracy.  The rounding error of d = 1 + s is recovered exactly
//   (e = s - (d - 1), Fast2Sum since 1 >= s) and removed to first order: num / (d + e) ~= q - q e / d
//   with q = num / d and 1 / d = q (x >= 0) or 1 - q (x < 0): that takes the worst error from 2.3 to 1.9 ulp.
//   sigma(+-0) = 0.5 exactly, sigma(+inf) = 1, sigma(-inf) = +0, sigma(NaN) = NaN; subnormal below
//   x ~ -87.3.  Max error < 2 ulp against fp64 over every 61st float (1.86 ulp; the exp part
//   < 0.94 ulp); tests/test_calm_ops.py checks the bound.  Not monotone at the ulp level (nor is torch's).
CF_HD float calm_sigmoid(float x) {
  const bool neg = x < 0.f;
  const float s = calm_exp_nonpos(neg ? x : -x);
  const float d = f_add(1.f, s);
  const float e = f_sub(s, f_sub(d, 1.f));
  const float q = f_div(neg ? s : 1.f, d);
  const float inv_d = neg ? f_sub(1.f, q) : q;
  return f_sub(q, f_mul(f_mul(q, e), inv_d));
}

// The binary mask m = round(sigma(R)) of ALGORITHMS.md §8.7, given s = sigma(R): torch.round rounds
// half to even (P3), and s is in [0, 1], so m = 1 exactly when s > 0.5 (s == 0.5, i.e. R == 0 or tiny,
// gives 0; NaN gives 0).  With calm_sigmoid that is R > 8.94e-8 (= 1.5 * 2^-24; checked monotone there).
CF_HD bool calm_mask_on(float s) { return s > 0.5f; }

// Interpolation modes (names in tensor_list.h: "fused", "faithful", "round").
enum CalmMode : int { kCalmFused = 0, kCalmFaithful = 1, kCalmRound = 2 };

// theta of one element from s = sigma(R):
//   fused     (b +) p + s (n - p)                    the cheap form, ALGORITHMS.md §8.5 / §8.9
//   faithful  (b +) (1 - s) p + s n                  the official code's order (§8.8b), left to right
//   round     (b +) (m ? n : p), m = calm_mask_on(s)  exactly tau_prev or tau_new (§8.7); equal to the
//             official (1 - m) p + m n except for signed zeros and inf/NaN in the unselected operand
// b = theta_0 when has_base (added first, as `theta0 + ... ` is evaluated), p = tau_prev, n = tau_new.
CF_HD float calm_theta(bool has_base, float b, float p, float n, float s, int mode) {
  if (mode == kCalmRound) {
    const float v = calm_mask_on(s) ? n : p;
    return has_base ? f_add(b, v) : v;
  }
  if (mode == kCalmFaithful) {
    const float lo = f_mul(f_sub(1.f, s), p);
    return f_add(has_base ? f_add(b, lo) : lo, f_mul(s, n));
  }
  const float bp = has_base ? f_add(b, p) : p;
  return f_add(bp, f_mul(s, f_sub(n, p)));
}

// One batch of the gradient accumulation (§8.5 step 3): A + eta * g * (n - p), or, faithful (§8.8b),
// A + eta * (-g p + g n).
CF_HD float calm_accumulate(float a, float g, float p, float n, float eta, bool faithful) {
  const float gd = faithful ? f_add(f_mul(-g, p), f_mul(g, n)) : f_mul(g, f_sub(n, p));
  return f_add(a, f_mul(eta, gd));
}

// The mask-logit update (§8.5 step 4) given s = sigma(r):  d = s (1 - s), reg = +-alpha d (+ iff r > 0,
// so r == 0 and NaN count as negative);  default (r - a d) + reg,  faithful r - (a d - reg).
CF_HD float calm_update_logit(float r, float a, float s, float alpha, bool faithful) {
  const float d = f_mul(s, f_sub(1.f, s));
  const float ad = f_mul(alpha, d);
  const float reg = r > 0.f ? ad : -ad;
  return faithful ? f_sub(r, f_sub(f_mul(a, d), reg)) : f_add(f_sub(r, f_mul(a, d)), reg);
}

}  // namespace calm_fast
