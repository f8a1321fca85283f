// Host-side argument checking and bookkeeping shared by the CPU and CUDA implementations of every
// merge op (one copy of each check, so both backends reject the same inputs with the same message).
#pragma once

// The minimal ATen headers (not <ATen/ATen.h>, which declares every op: slower compiles, nvcc above all).
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "common/elementwise.h"

namespace calm_fast {

// The validated shape of a task-major tensor list: inputs[t * L + l], t < T, l < L.
struct TaskList {
  int64_t T = 0;
  int64_t L = 0;
  bool has_base = false;
  at::ScalarType dtype = at::kFloat;
  at::Device device = at::Device(at::kCPU);
  std::vector<int64_t> numel;    // per tensor l
  std::vector<int64_t> offset;   // exclusive prefix sum of numel (flat index of tensor l's element 0)
  int64_t total = 0;             // sum of numel over l
};

inline bool is_supported_float(at::ScalarType s) {
  return s == at::kFloat || s == at::kBFloat16 || s == at::kHalf;
}

// Validates inputs/base (see csrc/common/schemas.h) and returns the list's shape.
inline TaskList check_task_list(const char* op, at::TensorList inputs, at::TensorList base, int64_t num_tasks) {
  TORCH_CHECK(num_tasks >= 1, op, ": num_tasks must be >= 1, got ", num_tasks);
  TORCH_CHECK(static_cast<int64_t>(inputs.size()) % num_tasks == 0, op, ": got ", inputs.size(),
              " input tensors, not a multiple of num_tasks=", num_tasks);
  TaskList tl;
  tl.T = num_tasks;
  tl.L = static_cast<int64_t>(inputs.size()) / num_tasks;
  tl.has_base = !base.empty();
  TORCH_CHECK(!tl.has_base || static_cast<int64_t>(base.size()) == tl.L, op, ": base has ", base.size(),
              " tensors but inputs hold ", tl.L, " tensors per task");
  if (tl.L == 0) return tl;
  tl.dtype = inputs[0].scalar_type();
  tl.device = inputs[0].device();
  TORCH_CHECK(is_supported_float(tl.dtype), op, ": inputs must be float32, bfloat16 or float16, got ", tl.dtype);
  auto check_one = [&](const at::Tensor& x, const at::Tensor& ref, const std::string& what) {
    TORCH_CHECK(x.defined(), op, ": ", what, " is undefined");
    TORCH_CHECK(x.scalar_type() == tl.dtype, op, ": ", what, " has dtype ", x.scalar_type(), " but inputs[0] has ",
                tl.dtype, " (one dtype per call; the Python layer groups tensors by dtype)");
    TORCH_CHECK(x.device() == tl.device, op, ": ", what, " is on ", x.device(), " but inputs[0] is on ", tl.device);
    TORCH_CHECK(x.is_contiguous(), op, ": ", what, " must be contiguous");
    TORCH_CHECK(x.sizes().equals(ref.sizes()), op, ": ", what, " has shape ", x.sizes(), " but task 0's tensor has ",
                ref.sizes());
  };
  tl.numel.resize(tl.L);
  tl.offset.resize(tl.L);
  for (int64_t l = 0; l < tl.L; ++l) {
    const at::Tensor& ref = inputs[l];
    for (int64_t t = 0; t < tl.T; ++t) {
      check_one(inputs[t * tl.L + l], ref, "inputs[" + std::to_string(t * tl.L + l) + "] (task " + std::to_string(t) +
                                              ", tensor " + std::to_string(l) + ")");
    }
    if (tl.has_base) check_one(base[l], ref, "base[" + std::to_string(l) + "]");
    tl.numel[l] = ref.numel();
    tl.offset[l] = tl.total;
    tl.total += ref.numel();
  }
  return tl;
}

// A [T, L] table of per-(task, tensor) parameters (weights, thresholds, DARE keys).
inline at::Tensor check_table(const char* op, const char* name, const at::Tensor& x, const TaskList& tl,
                              at::ScalarType dtype) {
  TORCH_CHECK(x.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(x.scalar_type() == dtype, op, ": ", name, " must have dtype ", dtype, ", got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2 && x.size(0) == tl.T && x.size(1) == tl.L, op, ": ", name, " must have shape [", tl.T,
              ", ", tl.L, "], got ", x.sizes());
  TORCH_CHECK(tl.L == 0 || x.device() == tl.device, op, ": ", name, " is on ", x.device(), " but inputs are on ",
              tl.device);
  return x.contiguous();
}

inline at::Tensor check_vector(const char* op, const char* name, const at::Tensor& x, int64_t n,
                               at::ScalarType dtype, const TaskList& tl) {
  TORCH_CHECK(x.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(x.scalar_type() == dtype, op, ": ", name, " must have dtype ", dtype, ", got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 1 && x.size(0) == n, op, ": ", name, " must have shape [", n, "], got ", x.sizes());
  TORCH_CHECK(tl.L == 0 || x.device() == tl.device, op, ": ", name, " is on ", x.device(), " but inputs are on ",
              tl.device);
  return x.contiguous();
}

inline void check_dare(const char* op, double p, const c10::optional<at::Tensor>& keys, const TaskList& tl) {
  TORCH_CHECK(p >= 0.0 && p <= 1.0, op, ": dare_p must be in [0, 1], got ", p);
  TORCH_CHECK(p == 0.0 || keys.has_value(), op, ": dare_p > 0 needs dare_keys");
  if (keys.has_value()) check_table(op, "dare_keys", *keys, tl, at::kLong);
}

inline at::ScalarType out_dtype(const TaskList& tl, bool out_float) { return out_float ? at::kFloat : tl.dtype; }

// Outputs shaped like tensor l of task 0 (or the base), on the inputs' device.
// A fresh large CPU buffer is first touched by the kernel that fills it, one page fault per 4 KiB page:
// on a VM that costs as much as the merge itself (measured: 0.10 s vs 0.03 s to allocate and fill
// 352 MB).  Asking Linux for transparent huge pages on its 2 MiB-aligned interior cuts the faults
// 512x.  A hint only: a no-op where THP is disabled, for CUDA tensors, or for memory already mapped.
inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  if (!t.device().is_cpu() || t.nbytes() < 4 * kHuge) return;
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t first = (p + kHuge - 1) & ~(kHuge - 1), last = (p + t.nbytes()) & ~(kHuge - 1);
  if (last > first) (void)madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

inline std::vector<at::Tensor> alloc_outputs(at::TensorList inputs, const TaskList& tl, bool out_float) {
  std::vector<at::Tensor> out;
  out.reserve(tl.L);
  for (int64_t l = 0; l < tl.L; ++l) {
    out.push_back(at::empty(inputs[l].sizes(), inputs[l].options().dtype(out_dtype(tl, out_float))));
    advise_huge_pages(out.back());
  }
  return out;
}

inline int ties_merge_code(const char* op, const std::string& merge) {
  if (merge == "sum") return 0;
  if (merge == "mean") return 1;
  if (merge == "max") return 2;
  TORCH_CHECK(false, op, ": merge must be 'sum', 'mean' or 'max', got '", merge, "'");
  return -1;
}

// Packed masks: one uint8 per 8 elements, element i is bit (i % 8) of byte i / 8 (little-endian bits).
inline int64_t packed_bytes(int64_t n) { return (n + 7) / 8; }

// abs_histogram_'s accumulator: int64 [T, bins] (bins by level), contiguous, on the inputs' device.
inline void check_histogram(const char* op, const at::Tensor& hist, const TaskList& tl, int64_t num_tasks,
                            bool level1) {
  const int64_t bins = level1 ? kHistLowBins : kHistHighBins;
  TORCH_CHECK(hist.scalar_type() == at::kLong && hist.dim() == 2 && hist.size(0) == num_tasks &&
                  hist.size(1) == bins && hist.is_contiguous(),
              op, ": hist must be a contiguous int64 tensor of shape [", num_tasks, ", ", bins, "], got ",
              hist.scalar_type(), " ", hist.sizes());
  TORCH_CHECK(tl.L == 0 || hist.device() == tl.device, op, ": hist is on ", hist.device(),
              " but the inputs are on ", tl.device, " (hist must be on the inputs' device)");
}

// abs_bracket's bounds: float32 [T] each, 0 <= lo <= hi.  Returns host (CPU) copies of (lo, hi): the
// checks need the values, and the kernels need their keys (T floats; a sync on a GPU).
inline std::pair<at::Tensor, at::Tensor> check_bracket(const char* op, const at::Tensor& lo, const at::Tensor& hi,
                                                       int64_t capacity, int64_t num_tasks, const TaskList& tl) {
  TORCH_CHECK(capacity >= 0, op, ": capacity must be >= 0");
  const at::Tensor lo_h = check_vector(op, "lo", lo, num_tasks, at::kFloat, tl).to(at::kCPU);
  const at::Tensor hi_h = check_vector(op, "hi", hi, num_tasks, at::kFloat, tl).to(at::kCPU);
  for (int64_t t = 0; t < num_tasks; ++t) {
    const float a = lo_h.data_ptr<float>()[t], b = hi_h.data_ptr<float>()[t];
    TORCH_CHECK(a >= 0.f && b >= a, op, ": need 0 <= lo <= hi, got lo[", t, "]=", a, " hi[", t, "]=", b);
  }
  return {lo_h, hi_h};
}

// consensus_merge's extra arguments: tall_lambdas float32 [T] (returned contiguous), mtl empty or L
// contiguous float32 tensors matching the inputs, min_count >= 0.
inline at::Tensor check_consensus(const char* op, const at::Tensor& tall_lambdas, at::TensorList mtl,
                                  int64_t min_count, const TaskList& tl) {
  const at::Tensor lam = check_vector(op, "tall_lambdas", tall_lambdas, tl.T, at::kFloat, tl);
  TORCH_CHECK(mtl.empty() || static_cast<int64_t>(mtl.size()) == tl.L, op, ": mtl must be empty or hold L=", tl.L,
              " tensors, got ", mtl.size());
  for (size_t l = 0; l < mtl.size(); ++l) {
    TORCH_CHECK(mtl[l].scalar_type() == at::kFloat && mtl[l].is_contiguous() && mtl[l].device() == tl.device &&
                    mtl[l].numel() == tl.numel[l],
                op, ": mtl[", l, "] must be a contiguous float32 tensor with ", tl.numel[l], " elements on ", tl.device);
  }
  TORCH_CHECK(min_count >= 0, op, ": min_count must be >= 0, got ", min_count);
  return lam;
}

// consensus_merge's optional bit-packed masks: T*L uint8 tensors of packed_bytes(numel) (empty if not asked).
inline std::vector<at::Tensor> alloc_packed_masks(at::TensorList inputs, const TaskList& tl, bool wanted) {
  std::vector<at::Tensor> masks;
  if (wanted) {
    for (int64_t i = 0; i < tl.T * tl.L; ++i)
      masks.push_back(at::empty({packed_bytes(tl.numel[i % tl.L])}, inputs[0].options().dtype(at::kByte)));
  }
  return masks;
}

// Explicit masks for weighted_merge: empty, or T*L tensors, all bool (one per element, same shape as
// the input) or all uint8 packed (packed_bytes(numel) bytes).  Returns 0 = none, 1 = bool, 2 = packed.
inline int check_masks(const char* op, at::TensorList masks, const TaskList& tl) {
  if (masks.empty()) return 0;
  TORCH_CHECK(static_cast<int64_t>(masks.size()) == tl.T * tl.L, op, ": masks must be empty or hold T*L=",
              tl.T * tl.L, " tensors, got ", masks.size());
  const bool packed = masks[0].scalar_type() == at::kByte;
  for (int64_t i = 0; i < tl.T * tl.L; ++i) {
    const at::Tensor& m = masks[i];
    const int64_t l = i % tl.L;
    TORCH_CHECK(m.scalar_type() == (packed ? at::kByte : at::kBool), op, ": masks[", i, "] has dtype ",
                m.scalar_type(), "; masks must be all bool or all uint8 (bit-packed)");
    TORCH_CHECK(m.device() == tl.device, op, ": masks[", i, "] is on ", m.device(), " but inputs are on ", tl.device);
    TORCH_CHECK(m.is_contiguous(), op, ": masks[", i, "] must be contiguous");
    const int64_t want = packed ? packed_bytes(tl.numel[l]) : tl.numel[l];
    TORCH_CHECK(m.numel() == want, op, ": masks[", i, "] (task ", i / tl.L, ", tensor ", l, ") has ", m.numel(),
                " elements, expected ", want, packed ? " packed bytes" : "");
  }
  return packed ? 2 : 1;
}

// ---------------------------------------------------------------------------------------------------
// CALM ops (csrc/common/schemas.h): lists of L tensors matched element by element with the mask logits
// R.  Each list has one dtype, passed to the kernels as a code (the CUDA kernels switch on it per
// tensor, the CPU kernels per tile), so base, taus and grads may each be fp32, bf16 or fp16 without a
// template instantiation per combination.
// ---------------------------------------------------------------------------------------------------
enum DtypeCode : int { kCodeF32 = 0, kCodeBF16 = 1, kCodeF16 = 2 };

inline int dtype_code(at::ScalarType s) {
  return s == at::kBFloat16 ? kCodeBF16 : (s == at::kHalf ? kCodeF16 : kCodeF32);
}

struct CalmLists {
  const char* name = "R";  // the list the others are matched with (R, or A for calm_accumulate_)
  int64_t L = 0;
  at::Device device = at::Device(at::kCPU);
  std::vector<int64_t> numel;  // per tensor l
  int64_t total = 0;
};

// R (named `name`): L contiguous float32 tensors on one device.  Fixes L, the shapes and the device.
inline CalmLists check_calm_logits(const char* op, const char* name, at::TensorList R) {
  CalmLists cl;
  cl.name = name;
  cl.L = static_cast<int64_t>(R.size());
  if (cl.L > 0) cl.device = R[0].device();
  cl.numel.resize(cl.L);
  for (int64_t l = 0; l < cl.L; ++l) {
    const at::Tensor& x = R[l];
    TORCH_CHECK(x.defined(), op, ": ", name, "[", l, "] is undefined");
    TORCH_CHECK(x.scalar_type() == at::kFloat, op, ": ", name, "[", l, "] must be float32, got ", x.scalar_type());
    TORCH_CHECK(x.device() == cl.device, op, ": ", name, "[", l, "] is on ", x.device(), " but ", name, "[0] is on ",
                cl.device);
    TORCH_CHECK(x.is_contiguous(), op, ": ", name, "[", l, "] must be contiguous");
    cl.numel[l] = x.numel();
    cl.total += x.numel();
  }
  return cl;
}

// Another list: exactly L tensors (or, when not `required`, none), each shaped like R[l] (R: the list
// check_calm_logits validated, named cl.name in messages), on R's device,
// contiguous; one dtype for the whole list, float32 only when `fp32_only`.  Returns that dtype (float32
// for an empty optional list).
inline at::ScalarType check_calm_list(const char* op, const char* name, at::TensorList xs, at::TensorList R,
                                      const CalmLists& cl, bool required, bool fp32_only) {
  if (xs.empty() && !required) return at::kFloat;
  TORCH_CHECK(static_cast<int64_t>(xs.size()) == cl.L, op, ": ", name, " has ", xs.size(), " tensors but ", cl.name,
              " has ", cl.L);
  if (cl.L == 0) return at::kFloat;
  const at::ScalarType dtype = xs[0].defined() ? xs[0].scalar_type() : at::kFloat;
  for (int64_t l = 0; l < cl.L; ++l) {
    const at::Tensor& x = xs[l];
    TORCH_CHECK(x.defined(), op, ": ", name, "[", l, "] is undefined");
    if (fp32_only) {
      TORCH_CHECK(x.scalar_type() == at::kFloat, op, ": ", name, "[", l, "] must be float32, got ", x.scalar_type());
    } else {
      TORCH_CHECK(is_supported_float(x.scalar_type()), op, ": ", name, "[", l,
                  "] must be float32, bfloat16 or float16, got ", x.scalar_type());
      TORCH_CHECK(x.scalar_type() == dtype, op, ": ", name, "[", l, "] has dtype ", x.scalar_type(), " but ", name,
                  "[0] has ", dtype, " (one dtype per list)");
    }
    TORCH_CHECK(x.device() == cl.device, op, ": ", name, "[", l, "] is on ", x.device(), " but ", cl.name, "[", l,
                "] is on ", cl.device);
    TORCH_CHECK(x.is_contiguous(), op, ": ", name, "[", l, "] must be contiguous");
    TORCH_CHECK(x.sizes().equals(R[l].sizes()), op, ": ", name, "[", l, "] has shape ", x.sizes(), " but ", cl.name,
                "[", l, "] has shape ", R[l].sizes());
  }
  return dtype;
}

// A list written in place must not share memory with tensor l of another operand (the kernels read
// and write element by element, so aliasing would silently mix old and new values).
inline void check_calm_no_alias(const char* op, const char* name, at::TensorList out,
                                std::initializer_list<std::pair<const char*, at::TensorList>> others) {
  for (const auto& other : others) {
    if (other.second.empty()) continue;
    for (size_t l = 0; l < out.size() && l < other.second.size(); ++l) {
      const at::MemOverlapStatus st = at::get_overlap_status(out[l], other.second[l]);
      TORCH_CHECK(st != at::MemOverlapStatus::Full && st != at::MemOverlapStatus::Partial, op, ": ", name, "[", l,
                  "] shares memory with ", other.first, "[", l, "]");
    }
  }
}

inline int calm_mode_code(const char* op, const std::string& mode) {
  if (mode == "fused") return kCalmFused;
  if (mode == "faithful") return kCalmFaithful;
  if (mode == "round") return kCalmRound;
  TORCH_CHECK(false, op, ": mode must be 'fused', 'faithful' or 'round', got '", mode, "'");
  return -1;
}

// Output dtype of calm_interpolate / calm_binarize_merge: base's (float32 with out_float), else the
// promotion of the two task-vector dtypes (bf16 with fp16 gives float32), so tau values stay exact.
inline at::ScalarType calm_out_dtype(bool has_base, at::ScalarType base, at::ScalarType prev, at::ScalarType next,
                                     bool out_float) {
  if (out_float) return at::kFloat;
  if (has_base) return base;
  return prev == next ? prev : at::kFloat;
}

// Outputs shaped like the logits R (fp32 R; `dtype` by the op's rule), with the huge-page hint on CPU.
inline std::vector<at::Tensor> alloc_like_logits(at::TensorList R, at::ScalarType dtype) {
  std::vector<at::Tensor> out;
  out.reserve(R.size());
  for (const at::Tensor& r : R) {
    out.push_back(at::empty(r.sizes(), r.options().dtype(dtype)));
    advise_huge_pages(out.back());
  }
  return out;
}

// The argument checks of each CALM op, one copy for the CPU and the CUDA kernels.
struct CalmInterpolateArgs {
  CalmLists cl;
  int mode;
  std::vector<at::Tensor> out;
};

inline CalmInterpolateArgs check_calm_interpolate(const char* op, at::TensorList base, at::TensorList tau_prev,
                                                  at::TensorList tau_new, at::TensorList R, const std::string& mode,
                                                  bool out_float) {
  const CalmLists cl = check_calm_logits(op, "R", R);
  const int mode_code = calm_mode_code(op, mode);
  const at::ScalarType bt = check_calm_list(op, "base", base, R, cl, false, false);
  const at::ScalarType pt = check_calm_list(op, "tau_prev", tau_prev, R, cl, true, false);
  const at::ScalarType nt = check_calm_list(op, "tau_new", tau_new, R, cl, true, false);
  return {cl, mode_code, alloc_like_logits(R, calm_out_dtype(!base.empty(), bt, pt, nt, out_float))};
}

inline CalmLists check_calm_accumulate(const char* op, at::TensorList A, at::TensorList grad, at::TensorList tau_prev,
                                       at::TensorList tau_new) {
  const CalmLists cl = check_calm_logits(op, "A", A);
  check_calm_list(op, "grad", grad, A, cl, true, false);
  check_calm_list(op, "tau_prev", tau_prev, A, cl, true, false);
  check_calm_list(op, "tau_new", tau_new, A, cl, true, false);
  check_calm_no_alias(op, "A", A, {{"grad", grad}, {"tau_prev", tau_prev}, {"tau_new", tau_new}});
  return cl;
}

struct CalmStepArgs {
  CalmLists cl;
  int mode;
  bool rewrite;  // theta is rewritten in the same pass
};

inline CalmStepArgs check_calm_mask_step(const char* op, at::TensorList R, at::TensorList A, at::TensorList theta,
                                         at::TensorList base, at::TensorList tau_prev, at::TensorList tau_new,
                                         const std::string& mode) {
  const CalmLists cl = check_calm_logits(op, "R", R);
  const int mode_code = calm_mode_code(op, mode);
  check_calm_list(op, "A", A, R, cl, true, true);
  const bool rewrite = !theta.empty();
  check_calm_list(op, "theta", theta, R, cl, false, false);
  check_calm_list(op, "base", base, R, cl, false, false);
  check_calm_list(op, "tau_prev", tau_prev, R, cl, rewrite, false);
  check_calm_list(op, "tau_new", tau_new, R, cl, rewrite, false);
  TORCH_CHECK(rewrite || (base.empty() && tau_prev.empty() && tau_new.empty()), op,
              ": base / tau_prev / tau_new are only used to rewrite theta, but theta is empty");
  check_calm_no_alias(op, "R", R, {{"A", A}, {"theta", theta}, {"base", base}, {"tau_prev", tau_prev},
                                    {"tau_new", tau_new}});
  check_calm_no_alias(op, "A", A, {{"theta", theta}, {"base", base}, {"tau_prev", tau_prev}, {"tau_new", tau_new}});
  check_calm_no_alias(op, "theta", theta, {{"base", base}, {"tau_prev", tau_prev}, {"tau_new", tau_new}});
  return {cl, mode_code, rewrite};
}

struct CalmBinarizeArgs {
  CalmLists cl;
  std::vector<at::Tensor> out;
};

inline CalmBinarizeArgs check_calm_binarize(const char* op, at::TensorList tau_prev, at::TensorList tau_new,
                                            at::TensorList R) {
  const CalmLists cl = check_calm_logits(op, "R", R);
  const at::ScalarType pt = check_calm_list(op, "tau_prev", tau_prev, R, cl, true, false);
  const at::ScalarType nt = check_calm_list(op, "tau_new", tau_new, R, cl, true, false);
  return {cl, alloc_like_logits(R, calm_out_dtype(false, pt, pt, nt, false))};
}

}  // namespace calm_fast
