// CUDA kernels of the fused merge ops: weighted_merge (task arithmetic, masks, DARE), ties_merge and
// consensus_merge (CPU versions: csrc/cpu/merge_cpu.cpp; results are bit-identical to them).
//
// Tensor lists: the host builds one int64 table (pointers of the T*L inputs, the L bases and outputs,
// per-op extra pointers, per-tensor numel, flat offset and first chunk) and copies it to the device
// once; each op is ONE launch over all L tensors.  A chunk is kChunk = 1024 consecutive elements of
// one tensor (tensors own ceil(numel / kChunk) chunks, so chunks never straddle tensors); blocks of
// 256 threads grid-stride over the chunks (grid = min(chunks, 8 * SMs)) and find a chunk's tensor by
// binary search over the chunk starts.  Inside a chunk thread x owns the kPerThread elements
// begin + j * 256 + x (coalesced; loads for the 4 elements are issued together, t outer, j inner).
//
// One thread per element holds all T values of that element; the per-element arithmetic is the shared
// code of common/elementwise.h (load_tau, dare_apply / philox4x32_10 + word_to_uniform, trim_keep,
// ties_element, tall_mask, is_nonfinite) plus products and sums written with mul_rn / add_rn, which
// nvcc never contracts into FMAs (the CPU build does not contract either: -ffp-contract=off), so every
// float is rounded exactly as on the CPU.
//
// Reductions: per-thread int64 counters, reduced per block and added with one 64-bit atomicAdd per
// block (negative sign sums as two's complement); ties' per-tensor sign sums and cancel counts are
// flushed whenever the block's next chunk belongs to another tensor.  Integer sums: order-independent.
//
// Bytes moved per element of the merged model (b = bytes per input element, o = bytes per output
// element: b, or 4 with out_float; reads of the same element by a second loop hit L1/L2):
//   weighted_merge   T*b  (+ b base)  (+ T masks: 1 B bool or 1/8 B packed)       + o written
//   ties_merge       T*b  (+ b base)                                              + o written
//   consensus_merge  T*b  (+ b base)  (+ 4 B given mtl)                            + o written
//                                                                    (+ T/8 B packed masks written)
// e.g. T = 8 bf16 with base: 18 B read + 2 B written = 20 B per element; at ~3 TB/s of achievable
// HBM3 bandwidth (H100 SXM) that is ~150 G elements/s.  Everything else is O(1) per chunk (table
// entries, per-(t, l) parameters) or O(grid) (atomics).  DARE adds one Philox-4x32-10 block per 4
// task elements (dare_words4 in cuda/dare.cuh: ~100 integer ops per block + a 4-shuffle transpose), an estimated
// ~0.5e12 task elements/s on an H100: bf16 DARE merges are compute-bound at roughly half the
// bandwidth bound above, fp32 ones near it.  ties_merge of up to 16 tasks stages the trimmed values
// in shared memory (ties_element reads each twice); of more tasks it recomputes them from L1/L2.
#include "cuda/cuda_compat.cuh"
#include "cuda/block_ops.cuh"
#include "cuda/dare.cuh"
#include "cuda/device_table.cuh"

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <type_traits>
#include <vector>

#include "common/elementwise.h"
#include "common/tensor_list.h"
#include "cpu/cpu_common.h"  // make_dare, CF_DISPATCH_FLOAT: the very same host-side helpers as the CPU ops

namespace calm_fast {
namespace cuda_merge {  // not `cuda`: selection.cu shares one translation unit with this file under the emulator

constexpr int kThreads = 256;
constexpr int kPerThread = 4;  // dare_words4 handles exactly 4 rows
constexpr int64_t kChunk = int64_t{kThreads} * kPerThread;  // a multiple of 32 (and of 8: packed mask bytes)
constexpr int kBlocksPerSm = 8;
constexpr unsigned kFullMask = 0xffffffffu;



__device__ __forceinline__ void atomic_add_i64(int64_t* p, int64_t v) {
  atomicAdd(reinterpret_cast<unsigned long long*>(p), static_cast<unsigned long long>(v));
}

// Device view of the host-built int64 table (all sections point into one device tensor).
struct Table {
  const int64_t* in;      // [T*L] input pointers, task-major
  const int64_t* base;    // [L] base pointers, 0 without a base
  const int64_t* out;     // [L] output pointers
  const int64_t* aux;     // [T*L] weighted: mask pointers; consensus: packed mask outputs (0 when none)
  const int64_t* mtl;     // [L] consensus: the given mtl tensors (0 when none)
  const int64_t* numel;   // [L]
  const int64_t* offset;  // [L] flat index of tensor l's element 0
  const int64_t* start;   // [L+1] first chunk of tensor l (exclusive prefix sum of chunk counts)
};

// Sums v over the block and adds it to *dst with one atomic (all threads of the block must call).
// `scratch`: kBlockScratch int64 of shared memory (block_ops.cuh).
__device__ __forceinline__ void block_add_i64(int64_t v, int64_t* dst, int64_t* scratch) {
  const int64_t s = block_reduce_sum(v, scratch);
  if (threadIdx.x == 0 && s != 0) atomic_add_i64(dst, s);
}

// --------------------------------------------------------------------------------------------------
// weighted_merge
// --------------------------------------------------------------------------------------------------
struct WeightedArgs {
  const float* weights;     // [T, L]
  const float* thresholds;  // [T, L] or null
  const int64_t* dare_keys; // [T, L] or null
  DareParams dare;
  float scale;
  int mask_kind;  // 0 none, 1 bool, 2 packed
  bool strict;
  int64_t* nonfinite;
};

template <typename scalar_t, typename out_t>
__global__ void __launch_bounds__(kThreads) weighted_kernel(Table tab, int64_t T, int64_t L, int64_t chunks, WeightedArgs a) {
  __shared__ int64_t scratch[kBlockScratch];
  int64_t nonfinite = 0;
  for (int64_t c = blockIdx.x; c < chunks; c += gridDim.x) {
    const Chunk ch = chunk_of(tab, L, c, kChunk);
    const scalar_t* bs = as_ptr<const scalar_t>(tab.base[ch.l]);
    int64_t idx[kPerThread];
    bool valid[kPerThread];
    float acc[kPerThread];
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      idx[j] = ch.begin + int64_t{j} * blockDim.x + threadIdx.x;
      valid[j] = idx[j] < ch.end;
      acc[j] = 0.f;
    }
    for (int64_t t = 0; t < T; ++t) {
      const int64_t ti = t * L + ch.l;
      const scalar_t* in = as_ptr<const scalar_t>(tab.in[ti]);
      const float w = a.weights[ti];
      const float thr = a.thresholds != nullptr ? a.thresholds[ti] : 0.f;
      const uint64_t key = a.dare_keys != nullptr ? static_cast<uint64_t>(a.dare_keys[ti]) : 0u;
      const uint8_t* m = a.mask_kind != 0 ? as_ptr<const uint8_t>(tab.aux[ti]) : nullptr;
      float v[kPerThread];
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) v[j] = valid[j] ? load_tau(in, bs, idx[j]) : 0.f;
      uint32_t words[kPerThread] = {0u, 0u, 0u, 0u};
      if (a.dare.p > 0.f) dare_words4(idx, key, words);  // block-uniform
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) {
        if (!valid[j]) continue;
        // Counted after DARE (as on the CPU): what enters the merge, not a dropped inf/NaN.
        float x = dare_apply_word(v[j], a.dare, words[j]);
        nonfinite += is_nonfinite(x);
        if (a.thresholds != nullptr) x = trim_keep(x, thr, a.strict) ? x : 0.f;
        if (a.mask_kind == 1) {
          x = m[idx[j]] != 0 ? x : 0.f;
        } else if (a.mask_kind == 2) {
          x = ((m[idx[j] >> 3] >> (idx[j] & 7)) & 1) ? x : 0.f;
        }
        acc[j] = add_rn(acc[j], mul_rn(w, x));
      }
    }
    out_t* out = as_ptr<out_t>(tab.out[ch.l]);
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      if (!valid[j]) continue;
      const float r = bs != nullptr ? add_rn(static_cast<float>(bs[idx[j]]), mul_rn(a.scale, acc[j]))
                                    : mul_rn(a.scale, acc[j]);
      out[idx[j]] = static_cast<out_t>(r);
    }
  }
  block_add_i64(nonfinite, a.nonfinite, scratch);
}

// --------------------------------------------------------------------------------------------------
// ties_merge
// --------------------------------------------------------------------------------------------------
struct TiesArgs {
  const float* thresholds;  // [T, L]
  const float* weights;     // [T, L]
  const int64_t* zero_sign; // [L]
  const int64_t* dare_keys; // [T, L] or null
  DareParams dare;
  float scale;
  int merge;
  bool strict;
  int64_t max_positions;
  int64_t* positions;              // [max_positions]
  float* patch;                    // [max_positions, 3]
  unsigned long long* next_slot;   // slots handed out (stops growing once past max_positions)
  int64_t* sign_sum;               // [L]
  int64_t* cancel;                 // [L]
  int64_t* nonfinite;              // scalar
};

// Lists of up to kStageMaxT tasks stage every element's trimmed, weighted values in shared memory
// (T * kChunk floats: 4 KiB per task, 64 KiB at most), each thread in its own slots, so that
// ties_element, which reads every value twice, reads them there; longer lists recompute them (with
// DARE: one Philox block per element and read) from the inputs (L1/L2 hits) instead.
constexpr int64_t kStageMaxT = 16;
constexpr size_t kDefaultSmem = 48 * 1024;

template <typename scalar_t, typename out_t>
__global__ void __launch_bounds__(kThreads) ties_kernel(Table tab, int64_t T, int64_t L, int64_t chunks, TiesArgs a) {
  __shared__ int64_t scratch[kBlockScratch];
  CF_DYNAMIC_SHARED(float, staged);  // [T][kPerThread][blockDim] when T <= kStageMaxT
  const bool use_stage = T <= kStageMaxT;
  int64_t nonfinite = 0, sign_sum = 0, cancel = 0;  // the latter two for the current tensor
  const int lane = static_cast<int>(threadIdx.x & 31u);
  int64_t c = blockIdx.x;
  Chunk ch;
  if (c < chunks) ch = chunk_of(tab, L, c, kChunk);
  while (c < chunks) {  // block-uniform
    const scalar_t* bs = as_ptr<const scalar_t>(tab.base[ch.l]);
    out_t* out = as_ptr<out_t>(tab.out[ch.l]);
    const float zs = static_cast<float>(a.zero_sign[ch.l]);
    int64_t idx[kPerThread];
    bool valid[kPerThread];
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      idx[j] = ch.begin + int64_t{j} * blockDim.x + threadIdx.x;
      valid[j] = idx[j] < ch.end;
    }
    auto dare_key = [&](int64_t ti) -> uint64_t {
      return a.dare_keys != nullptr ? static_cast<uint64_t>(a.dare_keys[ti]) : 0u;
    };
    // Task t's trimmed, weighted value of tau after DARE (the CPU kernel's `vals`).
    auto trim_weight = [&](float v, int64_t ti) -> float {
      return trim_keep(v, a.thresholds[ti], a.strict) ? mul_rn(v, a.weights[ti]) : 0.f;
    };
    // First read of the chunk (t outer, kPerThread loads in flight): counts the non-finite tau values
    // after DARE (as the CPU: what enters the merge) and stages the values, or brings the chunk into
    // L1/L2 for the reloads.
    for (int64_t t = 0; t < T; ++t) {
      const int64_t ti = t * L + ch.l;
      const scalar_t* in = as_ptr<const scalar_t>(tab.in[ti]);
      float v[kPerThread];
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) v[j] = valid[j] ? load_tau(in, bs, idx[j]) : 0.f;
      uint32_t words[kPerThread] = {0u, 0u, 0u, 0u};
      if (a.dare.p > 0.f) dare_words4(idx, dare_key(ti), words);  // block-uniform
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) {
        const float d = valid[j] ? dare_apply_word(v[j], a.dare, words[j]) : 0.f;
        nonfinite += is_nonfinite(d);
        if (use_stage) staged[(t * kPerThread + j) * blockDim.x + threadIdx.x] = valid[j] ? trim_weight(d, ti) : 0.f;
      }
    }
#pragma unroll 1
    for (int j = 0; j < kPerThread; ++j) {
      const int64_t i = idx[j];
      auto load = [&](int t) -> float {
        if (use_stage) return staged[(t * kPerThread + j) * blockDim.x + threadIdx.x];
        const int64_t ti = t * L + ch.l;
        return trim_weight(dare_apply(load_tau(as_ptr<const scalar_t>(tab.in[ti]), bs, i), a.dare, dare_key(ti), i), ti);
      };
      bool cancelled = false;
      float b = 0.f;
      if (valid[j]) {
        int gamma = 0;
        const float r = ties_element(load, static_cast<int>(T), a.merge, zs, gamma, cancelled);
        if (bs != nullptr) b = static_cast<float>(bs[i]);
        out[i] = static_cast<out_t>(bs != nullptr ? add_rn(b, mul_rn(a.scale, r)) : mul_rn(a.scale, r));
        sign_sum += gamma;
        cancel += cancelled;
      }
      // Exact cancellations (rare): one slot counter per warp, the outputs for zero signs +1, -1, 0.
      const unsigned who = __ballot_sync(kFullMask, cancelled);
      if (who != 0u) {  // warp-uniform
        const int leader = __ffs(static_cast<int>(who)) - 1;
        unsigned long long first = 0;
        if (lane == leader) {
          const unsigned long long cap = static_cast<unsigned long long>(a.max_positions);
          first = *static_cast<volatile unsigned long long*>(a.next_slot) < cap
                      ? atomicAdd(a.next_slot, static_cast<unsigned long long>(__popc(who)))
                      : cap;
        }
        first = __shfl_sync(kFullMask, first, leader);
        if (cancelled) {
          const unsigned long long slot = first + static_cast<unsigned long long>(__popc(who & ((1u << lane) - 1u)));
          if (slot < static_cast<unsigned long long>(a.max_positions)) {
            a.positions[slot] = tab.offset[ch.l] + i;
            const float zsigns[3] = {1.f, -1.f, 0.f};
            for (int k = 0; k < 3; ++k) {
              int g_unused = 0;
              bool c_unused = false;
              const float r = ties_element(load, static_cast<int>(T), a.merge, zsigns[k], g_unused, c_unused);
              a.patch[slot * 3 + k] = bs != nullptr ? add_rn(b, mul_rn(a.scale, r)) : mul_rn(a.scale, r);
            }
          }
        }
      }
    }
    // Next chunk of this block; flush the per-tensor counters when it belongs to another tensor.
    const int64_t l = ch.l;
    c += gridDim.x;
    if (c < chunks) ch = chunk_of(tab, L, c, kChunk);
    if (c >= chunks || ch.l != l) {  // block-uniform
      block_add_i64(sign_sum, a.sign_sum + l, scratch);
      block_add_i64(cancel, a.cancel + l, scratch);
      sign_sum = 0;
      cancel = 0;
    }
  }
  block_add_i64(nonfinite, a.nonfinite, scratch);
}

// --------------------------------------------------------------------------------------------------
// consensus_merge
// --------------------------------------------------------------------------------------------------
struct ConsensusArgs {
  const float* lambdas;  // [T]
  int64_t min_count;
  float alpha;
  bool masks;  // write the packed per-task masks (table aux)
  int64_t* nonfinite;
};

template <typename scalar_t, typename out_t>
__global__ void __launch_bounds__(kThreads) consensus_kernel(Table tab, int64_t T, int64_t L, int64_t chunks, ConsensusArgs a) {
  __shared__ int64_t scratch[kBlockScratch];
  int64_t nonfinite = 0;
  const int lane = static_cast<int>(threadIdx.x & 31u);
  for (int64_t c = blockIdx.x; c < chunks; c += gridDim.x) {  // block-uniform
    const Chunk ch = chunk_of(tab, L, c, kChunk);
    const scalar_t* bs = as_ptr<const scalar_t>(tab.base[ch.l]);
    const float* given = as_ptr<const float>(tab.mtl[ch.l]);
    int64_t idx[kPerThread];
    bool valid[kPerThread];
    float m[kPerThread];
    int count[kPerThread];
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      idx[j] = ch.begin + int64_t{j} * blockDim.x + threadIdx.x;
      valid[j] = idx[j] < ch.end;
      m[j] = 0.f;
      count[j] = 0;
    }
    if (given != nullptr) {
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) m[j] = valid[j] ? given[idx[j]] : 0.f;
    } else {
      for (int64_t t = 0; t < T; ++t) {  // mtl = sum_t tau_t, t ascending from 0.f as on the CPU
        const scalar_t* in = as_ptr<const scalar_t>(tab.in[t * L + ch.l]);
#pragma unroll
        for (int j = 0; j < kPerThread; ++j) {
          if (valid[j]) m[j] = add_rn(m[j], load_tau(in, bs, idx[j]));
        }
      }
    }
    for (int64_t t = 0; t < T; ++t) {  // block-uniform (the ballots below need every lane)
      const int64_t ti = t * L + ch.l;
      const scalar_t* in = as_ptr<const scalar_t>(tab.in[ti]);
      const float lam = a.lambdas[t];
      float v[kPerThread];
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) v[j] = valid[j] ? load_tau(in, bs, idx[j]) : 0.f;
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) {
        bool bit = false;
        if (valid[j]) {
          nonfinite += is_nonfinite(v[j]);
          bit = tall_mask(v[j], m[j], lam);
          count[j] += bit;
        }
        if (a.masks) {
          // Lanes hold 32 consecutive elements starting at a multiple of 32: byte k of the ballot is
          // packed byte (first / 8 + k), written by lane k alone.
          const unsigned word = __ballot_sync(kFullMask, bit);
          const int64_t first = idx[j] - lane;
          if (lane < 4 && first + 8 * lane < ch.end) {
            as_ptr<uint8_t>(tab.aux[ti])[(first >> 3) + lane] = static_cast<uint8_t>(word >> (8 * lane));
          }
        }
      }
    }
    out_t* out = as_ptr<out_t>(tab.out[ch.l]);
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      if (!valid[j]) continue;
      const float kept = count[j] >= a.min_count ? m[j] : 0.f;
      const float r = bs != nullptr ? add_rn(static_cast<float>(bs[idx[j]]), mul_rn(a.alpha, kept))
                                    : mul_rn(a.alpha, kept);
      out[idx[j]] = static_cast<out_t>(r);
    }
  }
  block_add_i64(nonfinite, a.nonfinite, scratch);
}

// --------------------------------------------------------------------------------------------------
// Host side
// --------------------------------------------------------------------------------------------------
inline int64_t ptr_bits(const at::Tensor& x) { return reinterpret_cast<int64_t>(x.data_ptr()); }

// Builds the table on the host and copies it to the inputs' device once (stream-ordered; under the
// emulator the device is the CPU and the copy a no-op).  `dev` must outlive the launch call only:
// the caching allocator frees it in stream order.
struct DeviceTable {
  at::Tensor dev;
  Table tab;
  int64_t chunks = 0;
};

inline DeviceTable make_table(const TaskList& tl, at::TensorList inputs, at::TensorList base,
                              const std::vector<at::Tensor>& out, at::TensorList aux, at::TensorList mtl) {
  const int64_t T = tl.T, L = tl.L;
  // in[T*L] | base[L] | out[L] | aux[T*L] | mtl[L] | numel[L] | offset[L] | start[L+1]
  std::vector<int64_t> h(static_cast<size_t>(2 * T * L + 6 * L + 1), 0);
  int64_t* p_in = h.data();
  int64_t* p_base = p_in + T * L;
  int64_t* p_out = p_base + L;
  int64_t* p_aux = p_out + L;
  int64_t* p_mtl = p_aux + T * L;
  int64_t* p_numel = p_mtl + L;
  int64_t* p_offset = p_numel + L;
  int64_t* p_start = p_offset + L;
  for (int64_t i = 0; i < T * L; ++i) {
    p_in[i] = ptr_bits(inputs[i]);
    p_aux[i] = aux.empty() ? 0 : ptr_bits(aux[i]);
  }
  for (int64_t l = 0; l < L; ++l) {
    p_base[l] = tl.has_base ? ptr_bits(base[l]) : 0;
    p_out[l] = ptr_bits(out[l]);
    p_mtl[l] = mtl.empty() ? 0 : ptr_bits(mtl[l]);
    p_numel[l] = tl.numel[l];
    p_offset[l] = tl.offset[l];
    p_start[l + 1] = p_start[l] + (tl.numel[l] + kChunk - 1) / kChunk;
  }
  DeviceTable t;
  t.chunks = p_start[L];
  t.dev = upload_table(h, tl.device);
  const int64_t* d = t.dev.data_ptr<int64_t>();
  t.tab.in = d;
  t.tab.base = d + T * L;
  t.tab.out = t.tab.base + L;
  t.tab.aux = t.tab.out + L;
  t.tab.mtl = t.tab.aux + T * L;
  t.tab.numel = t.tab.mtl + L;
  t.tab.offset = t.tab.numel + L;
  t.tab.start = t.tab.offset + L;
  return t;
}

inline unsigned grid_for(int64_t chunks, int device) {
  const int64_t g = std::min<int64_t>(chunks, int64_t{cf_num_sms(device)} * kBlocksPerSm);
  return static_cast<unsigned>(std::max<int64_t>(g, 1));
}

// Runs body.template operator()<scalar_t, out_t>() for the list's dtype and out_float: five
// instantiations per kernel (out_t = float for fp32 either way).
#define CF_DISPATCH_IN_OUT(dtype, out_float, ...)                                              \
  CF_DISPATCH_FLOAT(dtype, [&] {                                                                \
    if (out_float || std::is_same<scalar_t, float>::value) {                                    \
      using out_t = float;                                                                      \
      __VA_ARGS__();                                                                            \
    } else {                                                                                    \
      using out_t = scalar_t;                                                                   \
      __VA_ARGS__();                                                                            \
    }                                                                                           \
  })

std::tuple<std::vector<at::Tensor>, at::Tensor> weighted_merge_cuda(
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
  const at::Device dev = tl.L > 0 ? tl.device : weights.device();
  at::Tensor nonfinite = at::zeros({}, at::TensorOptions().dtype(at::kLong).device(dev));
  if (tl.L == 0) return {out, nonfinite};
  CF_DEVICE_GUARD(tl.device.index());
  const DeviceTable table = make_table(tl, inputs, base, out, masks, {});
  if (table.chunks == 0) return {out, nonfinite};
  WeightedArgs a;
  a.weights = w.data_ptr<float>();
  a.thresholds = thr.defined() ? thr.data_ptr<float>() : nullptr;
  a.dare_keys = keys.defined() ? keys.data_ptr<int64_t>() : nullptr;
  a.dare = cpu::make_dare(dare_p, dare_rescale);
  a.scale = static_cast<float>(scale);
  a.mask_kind = mask_kind;
  a.strict = strict;
  a.nonfinite = nonfinite.data_ptr<int64_t>();
  const int device = tl.device.index();
  const cf_stream_t stream = cf_current_stream(device);
  const unsigned grid = grid_for(table.chunks, device);
  CF_DISPATCH_IN_OUT(tl.dtype, out_float, [&] {
    auto kernel = weighted_kernel<scalar_t, out_t>;
    CF_LAUNCH(kernel, grid, kThreads, 0, stream, table.tab, tl.T, tl.L, table.chunks, a);
  });
  return {out, nonfinite};
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ties_merge_cuda(
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
  const at::Device dev = tl.L > 0 ? tl.device : thresholds.device();
  const auto i64 = at::TensorOptions().dtype(at::kLong).device(dev);
  at::Tensor sign_sum = at::zeros({tl.L}, i64), cancel = at::zeros({tl.L}, i64);
  at::Tensor nonfinite = at::zeros({}, i64);
  // Slots for at most min(max_positions, elements) cancelled positions; trimmed to the count used.
  const int64_t cap = std::min<int64_t>(max_positions, tl.total);
  at::Tensor positions = at::empty({cap}, i64);
  at::Tensor patch = at::empty({cap, 3}, i64.dtype(at::kFloat));
  if (tl.L > 0) {
    const at::Tensor zs_host = zs.to(at::kCPU);  // validated as on the CPU ([L], small)
    const int64_t* zsp = zs_host.data_ptr<int64_t>();
    for (int64_t l = 0; l < tl.L; ++l)
      TORCH_CHECK(zsp[l] >= -1 && zsp[l] <= 1, op, ": zero_sign[", l, "]=", zsp[l], " is not -1, 0 or +1");
  }
  int64_t used = 0;
  if (tl.L > 0 && tl.total > 0) {
    CF_DEVICE_GUARD(tl.device.index());
    const DeviceTable table = make_table(tl, inputs, base, out, {}, {});
    at::Tensor next_slot = at::zeros({1}, i64);
    TiesArgs a;
    a.thresholds = thr.data_ptr<float>();
    a.weights = w.data_ptr<float>();
    a.zero_sign = zs.data_ptr<int64_t>();
    a.dare_keys = keys.defined() ? keys.data_ptr<int64_t>() : nullptr;
    a.dare = cpu::make_dare(dare_p, dare_rescale);
    a.scale = static_cast<float>(scale);
    a.merge = merge_code;
    a.strict = strict;
    a.max_positions = cap;
    a.positions = positions.data_ptr<int64_t>();
    a.patch = patch.data_ptr<float>();
    a.next_slot = reinterpret_cast<unsigned long long*>(next_slot.data_ptr<int64_t>());
    a.sign_sum = sign_sum.data_ptr<int64_t>();
    a.cancel = cancel.data_ptr<int64_t>();
    a.nonfinite = nonfinite.data_ptr<int64_t>();
    const int device = tl.device.index();
    const cf_stream_t stream = cf_current_stream(device);
    const unsigned grid = grid_for(table.chunks, device);
    const size_t smem = tl.T <= kStageMaxT ? static_cast<size_t>(tl.T * kChunk) * sizeof(float) : 0;
    CF_DISPATCH_IN_OUT(tl.dtype, out_float, [&] {
      auto kernel = ties_kernel<scalar_t, out_t>;
      if (smem > kDefaultSmem) CF_SET_MAX_DYNAMIC_SMEM(kernel, kStageMaxT * kChunk * sizeof(float));
      CF_LAUNCH(kernel, grid, kThreads, smem, stream, table.tab, tl.T, tl.L, table.chunks, a);
    });
    if (cap > 0) {
      // All or nothing (the op's contract, as on the CPU): every cancelled position when they number at
      // most max_positions, else none.  One device-to-host sync for the total.
      const int64_t total = cancel.sum().item<int64_t>();
      used = total <= cap ? total : 0;
    }
  }
  if (used < cap) {
    positions = positions.narrow(0, 0, used).clone();
    patch = patch.narrow(0, 0, used).clone();
  }
  if (used > 1) {  // ascending flat order (slots were handed out in arbitrary warp order)
    const auto sorted = positions.sort();
    positions = std::get<0>(sorted);
    patch = patch.index_select(0, std::get<1>(sorted));
  }
  return {out, sign_sum, positions, patch, cancel, nonfinite};
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor> consensus_merge_cuda(
    at::TensorList inputs, at::TensorList base, int64_t num_tasks, const at::Tensor& tall_lambdas,
    at::TensorList mtl, int64_t min_count, double alpha, bool return_masks, bool out_float) {
  constexpr const char* op = "calm_fast.consensus_merge";
  const TaskList tl = check_task_list(op, inputs, base, num_tasks);
  const at::Tensor lam = check_consensus(op, tall_lambdas, mtl, min_count, tl);
  std::vector<at::Tensor> out = alloc_outputs(inputs, tl, out_float);
  std::vector<at::Tensor> masks = alloc_packed_masks(inputs, tl, return_masks);
  const at::Device dev = tl.L > 0 ? tl.device : tall_lambdas.device();
  at::Tensor nonfinite = at::zeros({}, at::TensorOptions().dtype(at::kLong).device(dev));
  if (tl.L == 0) return {out, masks, nonfinite};
  CF_DEVICE_GUARD(tl.device.index());
  const DeviceTable table = make_table(tl, inputs, base, out, masks, mtl);
  if (table.chunks == 0) return {out, masks, nonfinite};
  ConsensusArgs a;
  a.lambdas = lam.data_ptr<float>();
  a.min_count = min_count;
  a.alpha = static_cast<float>(alpha);
  a.masks = return_masks;
  a.nonfinite = nonfinite.data_ptr<int64_t>();
  const int device = tl.device.index();
  const cf_stream_t stream = cf_current_stream(device);
  const unsigned grid = grid_for(table.chunks, device);
  CF_DISPATCH_IN_OUT(tl.dtype, out_float, [&] {
    auto kernel = consensus_kernel<scalar_t, out_t>;
    CF_LAUNCH(kernel, grid, kThreads, 0, stream, table.tab, tl.T, tl.L, table.chunks, a);
  });
  return {out, masks, nonfinite};
}

}  // namespace cuda_merge
}  // namespace calm_fast

CF_CUDA_LIBRARY_IMPL(m) {
  m.impl("weighted_merge", &calm_fast::cuda_merge::weighted_merge_cuda);
  m.impl("ties_merge", &calm_fast::cuda_merge::ties_merge_cuda);
  m.impl("consensus_merge", &calm_fast::cuda_merge::consensus_merge_cuda);
}
