// CUDA kernels of the CALM mask-training ops (ALGORITHMS.md §8; schemas and semantics in
// common/schemas.h; CPU versions in csrc/cpu/calm_cpu.cpp, whose results these equal bit for bit).
//
// Each op is ONE launch over all L tensors (a ViT has ~200): the host uploads one int64 table holding,
// per operand list, the L data pointers, plus per-tensor numel and first chunk; blocks of 256 threads
// grid-stride over chunks of 1024 elements (a chunk never straddles two tensors) and find a chunk's
// tensor by binary search, exactly as merge.cu.  Thread x of a chunk owns elements begin + j*256 + x,
// j < 4 (coalesced).  Each list has one dtype, passed as a code (common/tensor_list.h) and switched on
// per load/store: one kernel per op serves every fp32/bf16/fp16 combination.
//
// The per-element math is calm_sigmoid / calm_theta / calm_accumulate / calm_update_logit of
// common/elementwise.h, written with __f*_rn (never contracted into FMAs), so every float is rounded as
// on the CPU.  Counts (mask-step on/flip counts, binarize's count): per-thread int64, one block
// reduction and one 64-bit atomicAdd per block: integer sums, so the order does not matter.
//
// Bytes moved per element (b_x = bytes per element of list x; R and A fp32):
//   calm_interpolate      read 4 (R) + b_prev + b_new (+ b_base),            write b_out
//   calm_accumulate_      read 4 (A) + b_grad + b_prev + b_new,              write 4 (A)
//   calm_mask_step_       read 8 (R, A),                                     write 8 (R, A)
//     with theta rewrite  + read b_prev + b_new (+ b_base),                  + write b_theta
//   calm_binarize_merge   read 4 (R) + b_prev + b_new,                       write b_out
// e.g. the fused step with a bf16 theta_0 and fp32 taus: 8 + 10 read, 8 + 2 written = 28 B per element;
// ViT-B/32 (88M) in ~0.8 ms at ~3 TB/s.  The arithmetic (~40 flops and one division per sigmoid, two
// sigmoids in the step) stays below the memory time on an H100.
#include "cuda/cuda_compat.cuh"
#include "cuda/block_ops.cuh"
#include "cuda/device_table.cuh"

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <type_traits>
#include <vector>

#include "common/elementwise.h"
#include "common/tensor_list.h"

namespace calm_fast {
namespace cuda_calm {  // own namespace: all .cu files share one translation unit under the emulator

constexpr int kThreads = 256;
constexpr int kPerThread = 4;
constexpr int64_t kChunk = int64_t{kThreads} * kPerThread;
constexpr int kBlocksPerSm = 8;
constexpr int kSlots = 6;  // the most operand lists of one op (calm_mask_step_: R, A, theta, base, prev, new)


// Device view of the host-built table: slot k holds L pointers (0 for an absent optional list).
struct Table {
  const int64_t* ptr[kSlots];
  const int64_t* numel;  // [L]
  const int64_t* start;  // [L+1] first chunk of tensor l
};

__device__ __forceinline__ float load_any(int64_t p, int code, int64_t i) {
  if (code == kCodeBF16) return static_cast<float>(as_ptr<const c10::BFloat16>(p)[i]);
  if (code == kCodeF16) return static_cast<float>(as_ptr<const c10::Half>(p)[i]);
  return as_ptr<const float>(p)[i];
}

__device__ __forceinline__ void store_any(int64_t p, int code, int64_t i, float v) {
  if (code == kCodeBF16) {
    as_ptr<c10::BFloat16>(p)[i] = static_cast<c10::BFloat16>(v);
  } else if (code == kCodeF16) {
    as_ptr<c10::Half>(p)[i] = static_cast<c10::Half>(v);
  } else {
    as_ptr<float>(p)[i] = v;
  }
}

__device__ __forceinline__ void block_add_i64(int64_t v, int64_t* dst, int64_t* scratch) {
  const int64_t s = block_reduce_sum(v, scratch);
  if (threadIdx.x == 0 && s != 0) atomicAdd(reinterpret_cast<unsigned long long*>(dst), static_cast<unsigned long long>(s));
}

// Scalars and dtype codes of a launch (code[k] describes the list in table slot k; slots per kernel below).
struct Args {
  int code[kSlots];
  bool has_base;   // slot of the base is non-null
  bool faithful;
  float scalar;    // eta (accumulate) or alpha (mask step)
  int64_t* counts; // [2] (mask step) or [1] (binarize), else null
};

// Compile time.  With their element loop unrolled 4x (as in merge.cu), the sigmoid-heavy kernels made
// NVVM spend minutes per architecture: > 10 min for interpolate with a runtime mode, 135 s for one
// mask-step instantiation even with the mode a constant (measured, sm_90 alone).  So the interpolation
// mode is a template parameter and the interpolate / mask-step loops are not unrolled (12-15 s).  The
// unroll is not needed for memory-level parallelism there: each element already issues 3-6 independent
// loads (R, A, base, taus).  accumulate and binarize keep the unroll (they compile in seconds).
// kNoTheta: calm_mask_step_ without the theta rewrite.
constexpr int kNoTheta = -1;

// Calls body(std::integral_constant<int, kMode>{}) for a runtime mode (CalmMode, or kNoTheta).
template <class Body>
void dispatch_mode(int mode, const Body& body) {
  switch (mode) {
    case kCalmFused: body(std::integral_constant<int, kCalmFused>{}); break;
    case kCalmFaithful: body(std::integral_constant<int, kCalmFaithful>{}); break;
    case kCalmRound: body(std::integral_constant<int, kCalmRound>{}); break;
    default: body(std::integral_constant<int, kNoTheta>{}); break;
  }
}

// --------------------------------------------------------------------------------------------------
// calm_interpolate: slots base, tau_prev, tau_new, R, out
// --------------------------------------------------------------------------------------------------
template <int kMode>
__global__ void __launch_bounds__(kThreads) interpolate_kernel(Table tab, int64_t L, int64_t chunks, Args a) {
  for (int64_t c = blockIdx.x; c < chunks; c += gridDim.x) {
    const Chunk ch = chunk_of(tab, L, c, kChunk);
    const int64_t pb = tab.ptr[0][ch.l], pp = tab.ptr[1][ch.l], pn = tab.ptr[2][ch.l], pr = tab.ptr[3][ch.l],
                  po = tab.ptr[4][ch.l];
#pragma unroll 1  // see "Compile time" above
    for (int j = 0; j < kPerThread; ++j) {
      const int64_t i = ch.begin + int64_t{j} * blockDim.x + threadIdx.x;
      if (i >= ch.end) continue;
      const float s = calm_sigmoid(as_ptr<const float>(pr)[i]);
      const float b = a.has_base ? load_any(pb, a.code[0], i) : 0.f;
      const float v = calm_theta(a.has_base, b, load_any(pp, a.code[1], i), load_any(pn, a.code[2], i), s, kMode);
      store_any(po, a.code[4], i, v);
    }
  }
}

// --------------------------------------------------------------------------------------------------
// calm_accumulate_: slots A, grad, tau_prev, tau_new
// --------------------------------------------------------------------------------------------------
__global__ void __launch_bounds__(kThreads) accumulate_kernel(Table tab, int64_t L, int64_t chunks, Args a) {
  for (int64_t c = blockIdx.x; c < chunks; c += gridDim.x) {
    const Chunk ch = chunk_of(tab, L, c, kChunk);
    float* A = as_ptr<float>(tab.ptr[0][ch.l]);
    const int64_t pg = tab.ptr[1][ch.l], pp = tab.ptr[2][ch.l], pn = tab.ptr[3][ch.l];
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int64_t i = ch.begin + int64_t{j} * blockDim.x + threadIdx.x;
      if (i >= ch.end) continue;
      A[i] = calm_accumulate(A[i], load_any(pg, a.code[1], i), load_any(pp, a.code[2], i), load_any(pn, a.code[3], i),
                             a.scalar, a.faithful);
    }
  }
}

// --------------------------------------------------------------------------------------------------
// calm_mask_step_: slots R, A, theta, base, tau_prev, tau_new
// --------------------------------------------------------------------------------------------------
template <int kMode>  // an interpolation mode, or kNoTheta
__global__ void __launch_bounds__(kThreads) mask_step_kernel(Table tab, int64_t L, int64_t chunks, Args a) {
  __shared__ int64_t scratch[kBlockScratch];
  int64_t on = 0, flips = 0;
  for (int64_t c = blockIdx.x; c < chunks; c += gridDim.x) {
    const Chunk ch = chunk_of(tab, L, c, kChunk);
    float* R = as_ptr<float>(tab.ptr[0][ch.l]);
    float* A = as_ptr<float>(tab.ptr[1][ch.l]);
    const int64_t pt = tab.ptr[2][ch.l], pb = tab.ptr[3][ch.l], pp = tab.ptr[4][ch.l], pn = tab.ptr[5][ch.l];
#pragma unroll 1  // see "Compile time" above
    for (int j = 0; j < kPerThread; ++j) {
      const int64_t i = ch.begin + int64_t{j} * blockDim.x + threadIdx.x;
      if (i >= ch.end) continue;
      const float r = R[i];
      const float s = calm_sigmoid(r);
      const float rn = calm_update_logit(r, A[i], s, a.scalar, a.faithful);
      const float sn = calm_sigmoid(rn);
      R[i] = rn;
      A[i] = 0.f;
      on += calm_mask_on(sn);
      flips += calm_mask_on(sn) != calm_mask_on(s);
      if (kMode != kNoTheta) {
        const float b = a.has_base ? load_any(pb, a.code[3], i) : 0.f;
        store_any(pt, a.code[2], i,
                  calm_theta(a.has_base, b, load_any(pp, a.code[4], i), load_any(pn, a.code[5], i), sn, kMode));
      }
    }
  }
  block_add_i64(on, a.counts, scratch);
  block_add_i64(flips, a.counts + 1, scratch);
}

// --------------------------------------------------------------------------------------------------
// calm_binarize_merge: slots tau_prev, tau_new, R, out
// --------------------------------------------------------------------------------------------------
__global__ void __launch_bounds__(kThreads) binarize_kernel(Table tab, int64_t L, int64_t chunks, Args a) {
  __shared__ int64_t scratch[kBlockScratch];
  int64_t taken = 0;
  for (int64_t c = blockIdx.x; c < chunks; c += gridDim.x) {
    const Chunk ch = chunk_of(tab, L, c, kChunk);
    const int64_t pp = tab.ptr[0][ch.l], pn = tab.ptr[1][ch.l], pr = tab.ptr[2][ch.l], po = tab.ptr[3][ch.l];
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int64_t i = ch.begin + int64_t{j} * blockDim.x + threadIdx.x;
      if (i >= ch.end) continue;
      const bool m = calm_mask_on(calm_sigmoid(as_ptr<const float>(pr)[i]));
      taken += m;
      // Exactly tau_prev or tau_new (only the selected one is read).
      store_any(po, a.code[3], i, m ? load_any(pn, a.code[1], i) : load_any(pp, a.code[0], i));
    }
  }
  block_add_i64(taken, a.counts, scratch);
}

// --------------------------------------------------------------------------------------------------
// Host side
// --------------------------------------------------------------------------------------------------
// The table of up to kSlots lists (an empty list gives null pointers) plus numel and chunk starts.
struct DeviceTable {
  at::Tensor dev;
  Table tab;
  int64_t chunks = 0;
};

inline DeviceTable make_table(const CalmLists& cl, std::initializer_list<at::TensorList> lists) {
  const int64_t L = cl.L;
  // ptr[kSlots][L] | numel[L] | start[L+1]
  std::vector<int64_t> h(static_cast<size_t>(kSlots * L + 2 * L + 1), 0);
  int k = 0;
  for (const at::TensorList& xs : lists) {
    for (int64_t l = 0; l < L && !xs.empty(); ++l) h[k * L + l] = reinterpret_cast<int64_t>(xs[l].data_ptr());
    ++k;
  }
  int64_t* numel = h.data() + kSlots * L;
  int64_t* start = numel + L;
  for (int64_t l = 0; l < L; ++l) {
    numel[l] = cl.numel[l];
    start[l + 1] = start[l] + (cl.numel[l] + kChunk - 1) / kChunk;
  }
  DeviceTable t;
  t.chunks = start[L];
  t.dev = upload_table(h, cl.device);
  const int64_t* d = t.dev.data_ptr<int64_t>();
  for (int s = 0; s < kSlots; ++s) t.tab.ptr[s] = d + s * L;
  t.tab.numel = d + kSlots * L;
  t.tab.start = t.tab.numel + L;
  return t;
}

inline unsigned grid_for(int64_t chunks, int device) {
  const int64_t g = std::min<int64_t>(chunks, int64_t{cf_num_sms(device)} * kBlocksPerSm);
  return static_cast<unsigned>(std::max<int64_t>(g, 1));
}

inline Args make_args(std::initializer_list<at::TensorList> lists) {
  Args a{};
  int k = 0;
  for (const at::TensorList& xs : lists) a.code[k++] = xs.empty() ? kCodeF32 : dtype_code(xs[0].scalar_type());
  return a;
}


std::vector<at::Tensor> calm_interpolate_cuda(at::TensorList base, at::TensorList tau_prev, at::TensorList tau_new,
                                              at::TensorList R, c10::string_view mode, bool out_float) {
  constexpr const char* op = "calm_fast.calm_interpolate";
  CalmInterpolateArgs args = check_calm_interpolate(op, base, tau_prev, tau_new, R, std::string(mode), out_float);
  const CalmLists& cl = args.cl;
  const int mode_code = args.mode;
  std::vector<at::Tensor> out = std::move(args.out);
  if (cl.total == 0) return out;
  CF_DEVICE_GUARD(cl.device.index());
  const DeviceTable table = make_table(cl, {base, tau_prev, tau_new, R, out});
  Args a = make_args({base, tau_prev, tau_new, R, out});
  a.has_base = !base.empty();
  const int device = cl.device.index();
  dispatch_mode(mode_code, [&](auto mode_c) {
    constexpr int kMode = decltype(mode_c)::value;
    if constexpr (kMode != kNoTheta) {
      auto kernel = interpolate_kernel<kMode>;
      CF_LAUNCH(kernel, grid_for(table.chunks, device), kThreads, 0, cf_current_stream(device), table.tab, cl.L,
                table.chunks, a);
    }
  });
  return out;
}

void calm_accumulate_cuda(at::TensorList A, at::TensorList grad, at::TensorList tau_prev, at::TensorList tau_new,
                          double eta, bool faithful) {
  constexpr const char* op = "calm_fast.calm_accumulate_";
  const CalmLists cl = check_calm_accumulate(op, A, grad, tau_prev, tau_new);
  if (cl.total == 0) return;
  CF_DEVICE_GUARD(cl.device.index());
  const DeviceTable table = make_table(cl, {A, grad, tau_prev, tau_new});
  Args a = make_args({A, grad, tau_prev, tau_new});
  a.faithful = faithful;
  a.scalar = static_cast<float>(eta);
  const int device = cl.device.index();
  CF_LAUNCH(accumulate_kernel, grid_for(table.chunks, device), kThreads, 0, cf_current_stream(device), table.tab,
            cl.L, table.chunks, a);
}

at::Tensor calm_mask_step_cuda(at::TensorList R, at::TensorList A, double alpha, bool faithful, at::TensorList theta,
                               at::TensorList base, at::TensorList tau_prev, at::TensorList tau_new,
                               c10::string_view mode) {
  constexpr const char* op = "calm_fast.calm_mask_step_";
  const CalmStepArgs args = check_calm_mask_step(op, R, A, theta, base, tau_prev, tau_new, std::string(mode));
  const CalmLists& cl = args.cl;
  const int mode_code = args.mode;
  const bool rewrite = args.rewrite;
  at::Tensor counts = at::zeros({2}, at::TensorOptions().dtype(at::kLong).device(cl.device));
  if (cl.total == 0) return counts;
  CF_DEVICE_GUARD(cl.device.index());
  const DeviceTable table = make_table(cl, {R, A, theta, base, tau_prev, tau_new});
  Args a = make_args({R, A, theta, base, tau_prev, tau_new});
  a.has_base = !base.empty();
  a.faithful = faithful;
  a.scalar = static_cast<float>(alpha);
  a.counts = counts.data_ptr<int64_t>();
  const int device = cl.device.index();
  dispatch_mode(rewrite ? mode_code : kNoTheta, [&](auto mode_c) {
    auto kernel = mask_step_kernel<decltype(mode_c)::value>;
    CF_LAUNCH(kernel, grid_for(table.chunks, device), kThreads, 0, cf_current_stream(device), table.tab, cl.L,
              table.chunks, a);
  });
  return counts;
}

std::tuple<std::vector<at::Tensor>, at::Tensor> calm_binarize_merge_cuda(at::TensorList tau_prev,
                                                                         at::TensorList tau_new, at::TensorList R) {
  constexpr const char* op = "calm_fast.calm_binarize_merge";
  CalmBinarizeArgs args = check_calm_binarize(op, tau_prev, tau_new, R);
  const CalmLists& cl = args.cl;
  std::vector<at::Tensor> out = std::move(args.out);
  at::Tensor count = at::zeros({}, at::TensorOptions().dtype(at::kLong).device(cl.device));
  if (cl.total == 0) return {out, count};
  CF_DEVICE_GUARD(cl.device.index());
  const DeviceTable table = make_table(cl, {tau_prev, tau_new, R, out});
  Args a = make_args({tau_prev, tau_new, R, out});
  a.counts = count.data_ptr<int64_t>();
  const int device = cl.device.index();
  CF_LAUNCH(binarize_kernel, grid_for(table.chunks, device), kThreads, 0, cf_current_stream(device), table.tab,
            cl.L, table.chunks, a);
  return {out, count};
}

}  // namespace cuda_calm
}  // namespace calm_fast

CF_CUDA_LIBRARY_IMPL(m) {
  m.impl("calm_interpolate", &calm_fast::cuda_calm::calm_interpolate_cuda);
  m.impl("calm_accumulate_", &calm_fast::cuda_calm::calm_accumulate_cuda);
  m.impl("calm_mask_step_", &calm_fast::cuda_calm::calm_mask_step_cuda);
  m.impl("calm_binarize_merge", &calm_fast::cuda_calm::calm_binarize_merge_cuda);
}
