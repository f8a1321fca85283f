// CUDA kernels of abs_histogram_: the counting pass of the exact global k-th-magnitude selection
// (CPU version and the algorithm: csrc/cpu/selection_cpu.cpp, calm_fast/selection.py).
//
// Level 0 (prefix None): hist[t, key >> 16] += 1 for every element of task t.  One block per SM
//   (grid ~ number of SMs, 1024 threads), each with a private 32768-bin uint32 histogram in 128 KiB of
//   dynamic shared memory.  Tasks are processed one after the other: zero the block histogram,
//   grid-stride over the chunks of all L tensors of task t, flush the non-zero bins into the int64
//   global histogram with one 64-bit atomicAdd each, next task.  Shared-memory atomics are warp-
//   aggregated for the common case of equal keys in a warp (masses of exact zeros, DARE drops), so a
//   tensor of zeros does not serialise 32 lanes on one bank.
// Level 1 (prefix given): only elements with key >> 16 == prefix[t] count, at bin key & 0xffff; they
//   are rare (one level-0 bucket), so they go straight to the global histogram with 64-bit atomics
//   (warp-aggregated the same way).  Tasks with prefix < 0 are skipped without reading their data.
//
// Each thread issues all its loads of a chunk first (16 at level 0, 8 at level 1) before counting.
//
// Bytes moved (b = bytes per stored element, N = elements per task): per task and element, read b
// (2b with a base: the base is re-read for every task); the histogram traffic is O(grid * 32768 * 8 B)
// per task at level 0 and negligible at level 1.  Both levels are bound by the read bandwidth:
// T * N * b (2 T * N * b with a base) bytes, e.g. ~3 TB/s / 2 B = 1.5e12 bf16 task elements/s on an
// H100, provided the shared-memory atomics (~1 per element, a few cycles per warp) keep up, which
// they should at 1024 threads per SM.  DARE: one Philox block per 4 elements (dare_words4), compute-
// bound at roughly 0.5e12 task elements/s (estimate).
//
// Counts are exact integers, so the result is identical to the CPU op whatever the order.
#include "cuda/cuda_compat.cuh"

#include <ATen/ops/from_blob.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/elementwise.h"
#include "common/tensor_list.h"
#include "cpu/cpu_common.h"  // make_dare, CF_DISPATCH_FLOAT: the very same host-side helpers as the CPU op

namespace calm_fast {
namespace cuda_sel {  // not `cuda`: merge.cu shares one translation unit with this file under the emulator

constexpr int kL0Threads = 1024;         // one block per SM (the block histogram takes 128 KiB)
constexpr int kL0PerThread = 16;         // loads in flight per thread (memory-level parallelism); % 4 == 0
constexpr int64_t kL0Chunk = int64_t{kL0Threads} * kL0PerThread;
constexpr int kL1Threads = 256;
constexpr int kL1PerThread = 8;  // % 4 == 0 (dare_words4)
constexpr int64_t kL1Chunk = int64_t{kL1Threads} * kL1PerThread;
constexpr int kL1BlocksPerSm = 8;
constexpr size_t kL0SmemBytes = sizeof(uint32_t) * kHistHighBins;
constexpr unsigned kFullMask = 0xffffffffu;
// A block flushes its uint32 histogram before it could have counted 2^31 elements of one task.
constexpr int64_t kL0FlushEvery = int64_t{1} << 30;

// Device view of the host-built int64 table (all sections point into one device tensor).
struct Table {
  const int64_t* in;      // [T*L] input pointers, task-major
  const int64_t* base;    // [L] base pointers, 0 without a base
  const int64_t* numel;   // [L]
  const int64_t* start;   // [L+1] first chunk of tensor l (exclusive prefix sum of chunk counts)
  const int64_t* task;    // level 1: [A] the tasks to refine (prefix >= 0)
  const int64_t* prefix;  // level 1: [A] their level-0 bucket
};

template <typename T>
__device__ __forceinline__ const T* as_ptr(int64_t v) {
  return reinterpret_cast<const T*>(static_cast<uintptr_t>(v));
}

// The tensor holding chunk c: the last l with start[l] <= c (empty tensors own no chunk).
__device__ __forceinline__ int64_t find_tensor(const int64_t* start, int64_t L, int64_t c) {
  int64_t lo = 0, hi = L - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) >> 1;
    if (start[mid] <= c) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// ---- DARE with one Philox block per 4 elements ----------------------------------------------------
// philox_uniform(i, key) is word i & 3 of the Philox-4x32-10 block of counter i >> 2.  In every kernel
// here a thread's elements are idx[j] = row_j + lane with row_j a multiple of 32, so the 4 lanes
// 4q..4q+3 of a row share one block.  dare_words4 lets each lane compute ONE block (row lane & 3 of
// its group of 4 rows) and hands every lane its word of each row by a 4x4 transpose over 4 shuffles:
// 4x fewer Philox rounds than dare_apply per element, the very same words.  Called by all 32 lanes.
__device__ __forceinline__ void rotate4(uint32_t w[4], unsigned r) {  // w[k] <- w[(k + r) & 3]
  if (r & 1u) {
    const uint32_t t = w[0];
    w[0] = w[1];
    w[1] = w[2];
    w[2] = w[3];
    w[3] = t;
  }
  if (r & 2u) {
    uint32_t t = w[0];
    w[0] = w[2];
    w[2] = t;
    t = w[1];
    w[1] = w[3];
    w[3] = t;
  }
}

__device__ __forceinline__ void dare_words4(const int64_t* idx, uint64_t key, uint32_t* word) {
  const unsigned lane = threadIdx.x & 31u, r = lane & 3u;
  const int64_t mine = r == 0u ? idx[0] : r == 1u ? idx[1] : r == 2u ? idx[2] : idx[3];
  const Philox4 b = philox4x32_10(static_cast<uint64_t>(mine) >> 2, key);
  uint32_t w[4] = {b.w[0], b.w[1], b.w[2], b.w[3]};
  rotate4(w, r);  // lane r sends w[(r - s) & 3] in round s: a compile-time slot after the rotation
  uint32_t got[4];
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    got[s] = __shfl_sync(0xffffffffu, w[(4 - s) & 3], static_cast<int>((lane & ~3u) | ((r + s) & 3u)));
  }
  rotate4(got, (4u - r) & 3u);  // round s brought row (r + s) & 3
#pragma unroll
  for (int j = 0; j < 4; ++j) word[j] = got[j];
}

// dare_apply(v, d, key, i) given the word of element i (same formula, see common/elementwise.h).
__device__ __forceinline__ float dare_apply_word(float v, const DareParams& d, uint32_t word) {
  if (d.p <= 0.f) return v;
  return (word_to_uniform(word) >= d.p) ? v * d.inv_keep : 0.f;
}

// Adds 1 at bin[lane] for every valid lane of the warp, one atomic for the group of lanes that share
// the first valid lane's bin and one per remaining lane.  Called by all 32 lanes (warp-uniform).
template <typename Counter, typename Add>
__device__ __forceinline__ void warp_aggregated_add(Counter* h, uint32_t bin, bool valid, const Add& add) {
  const unsigned pending = __ballot_sync(kFullMask, valid);
  if (pending == 0u) return;
  const int lane = static_cast<int>(threadIdx.x & 31u);
  const int leader = __ffs(static_cast<int>(pending)) - 1;
  const uint32_t lead_bin = __shfl_sync(kFullMask, bin, leader);
  const unsigned same = __ballot_sync(kFullMask, valid && bin == lead_bin);
  if (lane == leader) {
    add(h + lead_bin, static_cast<uint32_t>(__popc(same)));
  } else if (valid && bin != lead_bin) {
    add(h + bin, 1u);
  }
}

// Level 0: per-block shared histogram of the high 15 key bits, one task after the other.
template <typename scalar_t>
__global__ void __launch_bounds__(kL0Threads) hist_level0_kernel(Table tab, int64_t T, int64_t L, int64_t chunks, DareParams dare,
                                   const int64_t* dare_keys, int64_t* hist) {
  CF_DYNAMIC_SHARED(uint32_t, sh);
  auto smem_add = [](uint32_t* p, uint32_t v) { atomicAdd(p, v); };
  for (int64_t t = 0; t < T; ++t) {
    for (int b = threadIdx.x; b < kHistHighBins; b += blockDim.x) sh[b] = 0u;
    __syncthreads();
    unsigned long long* ht = reinterpret_cast<unsigned long long*>(hist + t * kHistHighBins);
    auto flush = [&] {
      for (int b = threadIdx.x; b < kHistHighBins; b += blockDim.x) {
        const uint32_t v = sh[b];
        if (v != 0u) {
          atomicAdd(ht + b, static_cast<unsigned long long>(v));
          sh[b] = 0u;
        }
      }
    };
    int64_t since_flush = 0;
    for (int64_t c = blockIdx.x; c < chunks; c += gridDim.x) {  // block-uniform
      const int64_t l = find_tensor(tab.start, L, c);
      const int64_t begin = (c - tab.start[l]) * kL0Chunk;
      const int64_t end = std::min(tab.numel[l], begin + kL0Chunk);
      const scalar_t* in = as_ptr<scalar_t>(tab.in[t * L + l]);
      const scalar_t* bs = as_ptr<scalar_t>(tab.base[l]);
      const uint64_t key = dare_keys != nullptr ? static_cast<uint64_t>(dare_keys[t * L + l]) : 0u;
      int64_t idx[kL0PerThread];
      float v[kL0PerThread];
#pragma unroll
      for (int j = 0; j < kL0PerThread; ++j) {  // all loads first: kL0PerThread in flight per thread
        idx[j] = begin + int64_t{j} * blockDim.x + threadIdx.x;
        v[j] = idx[j] < end ? load_tau(in, bs, idx[j]) : 0.f;
      }
      if (dare.p > 0.f) {  // block-uniform
        uint32_t words[kL0PerThread];
#pragma unroll
        for (int j = 0; j < kL0PerThread; j += 4) dare_words4(idx + j, key, words + j);
#pragma unroll
        for (int j = 0; j < kL0PerThread; ++j) v[j] = dare_apply_word(v[j], dare, words[j]);
      }
#pragma unroll
      for (int j = 0; j < kL0PerThread; ++j) warp_aggregated_add(sh, abs_key(v[j]) >> 16, idx[j] < end, smem_add);
      since_flush += kL0Chunk;
      if (since_flush >= kL0FlushEvery) {  // block-uniform; only for > 2^30 elements per block and task
        __syncthreads();
        flush();
        __syncthreads();
        since_flush = 0;
      }
    }
    __syncthreads();
    flush();
    __syncthreads();
  }
}

// Level 1: the low 16 key bits of the elements inside bucket prefix[t], straight to global memory.
// Virtual chunk v in [0, A * chunks): active task v / chunks, chunk v % chunks.
template <typename scalar_t>
__global__ void __launch_bounds__(kL1Threads) hist_level1_kernel(Table tab, int64_t L, int64_t chunks, int64_t virtual_chunks, DareParams dare,
                                   const int64_t* dare_keys, int64_t* hist) {
  auto global_add = [](unsigned long long* p, uint32_t v) { atomicAdd(p, static_cast<unsigned long long>(v)); };
  for (int64_t v = blockIdx.x; v < virtual_chunks; v += gridDim.x) {  // block-uniform
    const int64_t a = v / chunks;
    const int64_t c = v - a * chunks;
    const int64_t t = tab.task[a];
    const uint32_t want = static_cast<uint32_t>(tab.prefix[a]);
    const int64_t l = find_tensor(tab.start, L, c);
    const int64_t begin = (c - tab.start[l]) * kL1Chunk;
    const int64_t end = std::min(tab.numel[l], begin + kL1Chunk);
    const scalar_t* in = as_ptr<scalar_t>(tab.in[t * L + l]);
    const scalar_t* bs = as_ptr<scalar_t>(tab.base[l]);
    const uint64_t key = dare_keys != nullptr ? static_cast<uint64_t>(dare_keys[t * L + l]) : 0u;
    unsigned long long* ht = reinterpret_cast<unsigned long long*>(hist + t * kHistLowBins);
    int64_t idx[kL1PerThread];
    float x[kL1PerThread];
#pragma unroll
    for (int j = 0; j < kL1PerThread; ++j) {  // all loads first: kL1PerThread in flight per thread
      idx[j] = begin + int64_t{j} * blockDim.x + threadIdx.x;
      x[j] = idx[j] < end ? load_tau(in, bs, idx[j]) : 0.f;
    }
    if (dare.p > 0.f) {  // block-uniform
      uint32_t words[kL1PerThread];
#pragma unroll
      for (int j = 0; j < kL1PerThread; j += 4) dare_words4(idx + j, key, words + j);
#pragma unroll
      for (int j = 0; j < kL1PerThread; ++j) x[j] = dare_apply_word(x[j], dare, words[j]);
    }
#pragma unroll
    for (int j = 0; j < kL1PerThread; ++j) {
      const uint32_t k = abs_key(x[j]);
      warp_aggregated_add(ht, k & 0xffffu, idx[j] < end && (k >> 16) == want, global_add);
    }
  }
}

void abs_histogram_cuda(at::Tensor& hist, at::TensorList inputs, at::TensorList base, int64_t num_tasks,
                        const c10::optional<at::Tensor>& prefix, double dare_p,
                        const c10::optional<at::Tensor>& dare_keys, bool dare_rescale) {
  constexpr const char* op = "calm_fast.abs_histogram_";
  const TaskList tl = check_task_list(op, inputs, base, num_tasks);
  const int64_t bins = prefix.has_value() ? kHistLowBins : kHistHighBins;
  TORCH_CHECK(hist.scalar_type() == at::kLong && hist.dim() == 2 && hist.size(0) == num_tasks &&
                  hist.size(1) == bins && hist.is_contiguous(),
              op, ": hist must be a contiguous int64 tensor of shape [", num_tasks, ", ", bins, "], got ",
              hist.scalar_type(), " ", hist.sizes());
  TORCH_CHECK(tl.L == 0 || hist.device() == tl.device, op, ": hist is on ", hist.device(),
              " but the inputs are on ", tl.device, " (hist must be on the inputs' device)");
  check_dare(op, dare_p, dare_keys, tl);
  if (tl.L == 0) return;
  // Level 1: the tasks to refine and their buckets, known on the host (a T-element copy).
  std::vector<int64_t> act_task, act_prefix;
  if (prefix.has_value()) {
    const at::Tensor pre = check_vector(op, "prefix", *prefix, num_tasks, at::kLong, tl).to(at::kCPU);
    const int64_t* p = pre.data_ptr<int64_t>();
    for (int64_t t = 0; t < num_tasks; ++t) {
      TORCH_CHECK(p[t] < kHistHighBins, op, ": prefix[", t, "]=", p[t], " is not a level-0 bucket (< 32768)");
      if (p[t] >= 0) {
        act_task.push_back(t);
        act_prefix.push_back(p[t]);
      }
    }
    if (act_task.empty()) return;
  }
  const at::Tensor keys = dare_keys.has_value() ? dare_keys->contiguous() : at::Tensor();
  const DareParams dare = cpu::make_dare(dare_p, dare_rescale);
  const int64_t T = tl.T, L = tl.L;
  const int64_t chunk = prefix.has_value() ? kL1Chunk : kL0Chunk;

  // One int64 table: in[T*L] | base[L] | numel[L] | start[L+1] | task[A] | prefix[A].
  const int64_t A = static_cast<int64_t>(act_task.size());
  std::vector<int64_t> h(static_cast<size_t>(T * L + 3 * L + 1 + 2 * A), 0);
  int64_t* h_in = h.data();
  int64_t* h_base = h_in + T * L;
  int64_t* h_numel = h_base + L;
  int64_t* h_start = h_numel + L;
  int64_t* h_task = h_start + L + 1;
  int64_t* h_prefix = h_task + A;
  for (int64_t i = 0; i < T * L; ++i) h_in[i] = reinterpret_cast<int64_t>(inputs[i].data_ptr());
  for (int64_t l = 0; l < L; ++l) {
    h_base[l] = tl.has_base ? reinterpret_cast<int64_t>(base[l].data_ptr()) : 0;
    h_numel[l] = tl.numel[l];
    h_start[l + 1] = h_start[l] + (tl.numel[l] + chunk - 1) / chunk;
  }
  for (int64_t a = 0; a < A; ++a) {
    h_task[a] = act_task[a];
    h_prefix[a] = act_prefix[a];
  }
  const int64_t chunks = h_start[L];
  if (chunks == 0) return;

  CF_DEVICE_GUARD(tl.device.index());
  const at::Tensor host = at::from_blob(h.data(), {static_cast<int64_t>(h.size())}, at::kLong);
  // From pageable memory: the copy has staged `h` when it returns, so `h` may die with this call; the
  // device table is freed stream-ordered after the launch.  Under the emulator a no-op (same tensor).
  const at::Tensor dev = host.to(at::TensorOptions().device(tl.device), /*non_blocking=*/true);
  const int64_t* d = dev.data_ptr<int64_t>();
  Table tab;
  tab.in = d;
  tab.base = d + T * L;
  tab.numel = tab.base + L;
  tab.start = tab.numel + L;
  tab.task = tab.start + L + 1;
  tab.prefix = tab.task + A;

  const int device = tl.device.index();
  const cf_stream_t stream = cf_current_stream(device);
  const int64_t sms = cf_num_sms(device);
  int64_t* hist_ptr = hist.data_ptr<int64_t>();
  const int64_t* keys_ptr = keys.defined() ? keys.data_ptr<int64_t>() : nullptr;
  CF_DISPATCH_FLOAT(tl.dtype, [&] {
    if (!prefix.has_value()) {
      auto kernel = hist_level0_kernel<scalar_t>;
      CF_SET_MAX_DYNAMIC_SMEM(kernel, kL0SmemBytes);
      const int64_t grid = std::max<int64_t>(1, std::min(chunks, sms));
      CF_LAUNCH(kernel, static_cast<unsigned>(grid), kL0Threads, kL0SmemBytes, stream, tab, T, L, chunks, dare,
                keys_ptr, hist_ptr);
    } else {
      auto kernel = hist_level1_kernel<scalar_t>;
      const int64_t virtual_chunks = A * chunks;
      const int64_t grid = std::max<int64_t>(1, std::min(virtual_chunks, sms * kL1BlocksPerSm));
      CF_LAUNCH(kernel, static_cast<unsigned>(grid), kL1Threads, 0, stream, tab, L, chunks, virtual_chunks, dare,
                keys_ptr, hist_ptr);
    }
  });
}

}  // namespace cuda_sel
}  // namespace calm_fast

CF_CUDA_LIBRARY_IMPL(m) { m.impl("abs_histogram_", &calm_fast::cuda_sel::abs_histogram_cuda); }
