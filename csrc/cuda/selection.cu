// CUDA kernels of abs_histogram_ (the counting passes of the exact global k-th-magnitude selection)
// and abs_bracket (its one-pass variant for resident thresholds).  CPU versions and the algorithm:
// csrc/cpu/selection_cpu.cpp, calm_fast/selection.py; op semantics: csrc/common/schemas.h.
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
// abs_bracket: blocks of 256 threads grid-stride over the virtual chunks (task, 4096-element chunk),
//   task-major, grid = min(T * chunks, 8 * SMs).  A thread's 16 elements are loaded together, then
//   counted with four compares and adds each (key < lo, <= lo, < hi, <= hi: the four counts follow by
//   differences); the counts live in per-thread int64 counters and reach counts[t, :] with one 64-bit
//   atomicAdd per block, task and count, when the block leaves task t.  The elements strictly inside
//   (lo, hi) are staged in a 512-float buffer per warp (warp scan for the offsets, no atomic) and
//   written out when the buffer would overflow and when the block leaves the task: one atomicAdd on
//   the task's slot counter per flush reserves consecutive slots (coalesced writes; a slot past
//   `capacity` is not written, and a warp that saw the last slot stops staging for that task).  The
//   counts never depend on the capacity.  Candidates land in an order that depends on the schedule;
//   the op's contract leaves it unspecified.
//
// Bytes moved by abs_bracket (b, N as above; f = fraction of the elements strictly inside the bracket,
// ~1-2% for the sampled brackets of calm_fast/selection.py; C = capacity): read T * N * b (2 T * N * b
// with a base, re-read for every task), write 4 B per stored candidate (<= 4 * T * min(f * N, C)
// bytes, ~0.05 B per element at f = 1.3%, vs 2-4 B read), plus O(T * L) of table and few atomics:
// one per (block, task, count), and on the slot counters one per (warp, task) plus one per ~500
// candidates (the flushes of the 512-float buffers).  So the same read-bandwidth
// bound as one histogram level: on an H100 (~3 TB/s) ~1.5e12 bf16 / 0.75e12 fp32 task elements/s
// without a base.  Per element the kernel spends ~10 integer instructions (convert, abs, 4 x compare
// + add), about 64 / 10 = 6 elements per clock per SM against the 5.7 that 3 TB/s of bf16 needs on
// 132 SMs: bf16 without a base is close to compute-bound too (estimate; fp32 and bases are clearly
// memory-bound).  Compared with the two-pass radix select it replaces (level 0 and level 1 both read
// everything), it halves the bytes read.  DARE: as for the histograms.  Occupancy (ptxas, nvcc 13.0):
// 79 registers on sm_90, 68 on sm_80, no spills, 16.3 KiB of shared memory: 3 blocks of 256 threads
// per SM, i.e. 12288 loads in flight per SM (24 KiB of bf16: enough for ~3 TB/s at ~600 ns latency).
// Capping it at 64 registers (4 blocks) spills; the grid of 8 blocks per SM thus runs in ~3 waves.
//
// Counts are exact integers, so the counts are identical to the CPU op's whatever the order.
#include "cuda/cuda_compat.cuh"
#include "cuda/block_ops.cuh"
#include "cuda/dare.cuh"
#include "cuda/device_table.cuh"

#include <ATen/ops/zeros.h>
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
  const int64_t* aux0;    // level 1: [A] the tasks to refine (prefix >= 0); abs_bracket: [T] key of lo
  const int64_t* aux1;    // level 1: [A] their level-0 bucket;             abs_bracket: [T] key of hi
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
    const int64_t t = tab.aux0[a];
    const uint32_t want = static_cast<uint32_t>(tab.aux1[a]);
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

// --------------------------------------------------------------------------------------------------
// abs_bracket: one read of every task element; counts below / at lo / inside / at hi, copies out the
// |tau| values strictly inside (lo, hi).
// --------------------------------------------------------------------------------------------------
constexpr int kBrThreads = 256;
constexpr int kBrPerThread = 16;  // loads in flight per thread; % 4 == 0 (dare_words4)
constexpr int64_t kBrChunk = int64_t{kBrThreads} * kBrPerThread;
constexpr int kBrBlocksPerSm = 8;
constexpr int kBrWarps = kBrThreads / kWarpSize;
constexpr unsigned kBrWarpStage = kWarpSize * kBrPerThread;  // a warp's share of one chunk (512 floats)
// Keys of the elements of a partial chunk past the end of their tensor: a NaN key, which is above any
// valid hi (hi <= inf), so it counts nowhere and is never a candidate.
constexpr uint32_t kNoKey = 0x7fffffffu;

struct BracketArgs {
  const int64_t* dare_keys;       // [T, L] or null
  DareParams dare;
  int64_t capacity;
  int64_t* counts;                // [T, 4]
  float* cand;                    // [T, capacity]
  unsigned long long* next_slot;  // [T] candidate slots handed out per task (may pass capacity)
};

// Sums v over the block and adds it to *dst with one atomic (all threads of the block must call).
__device__ __forceinline__ void block_add_count(int64_t v, int64_t* dst, int64_t* scratch) {
  const int64_t s = block_reduce_sum(v, scratch);
  if (threadIdx.x == 0 && s != 0)
    atomicAdd(reinterpret_cast<unsigned long long*>(dst), static_cast<unsigned long long>(s));
}

// Writes the `fill` candidates staged in `stage` (a warp's buffer) to slots of task t reserved with one
// atomic on its counter, as far as they fit in the capacity, and sets `full` when no slot is left.  The
// writes are coalesced (consecutive slots).  Called by all 32 lanes with warp-uniform fill > 0.
__device__ __forceinline__ void flush_stage(float* stage, unsigned& fill, bool& full, int64_t t,
                                            const BracketArgs& a) {
  __syncwarp();  // the lanes' writes to `stage` are visible to the whole warp
  const unsigned lane = threadIdx.x & 31u;
  unsigned long long first = 0;
  if (lane == 0) first = atomicAdd(a.next_slot + t, static_cast<unsigned long long>(fill));
  first = __shfl_sync(kFullMask, first, 0);
  const unsigned long long cap = static_cast<unsigned long long>(a.capacity);
  float* dst = a.cand + t * a.capacity;
  for (unsigned i = lane; i < fill; i += kWarpSize) {
    if (first + i < cap) dst[first + i] = stage[i];
  }
  __syncwarp();  // every lane has read `stage` before it is refilled
  full = first + fill >= cap;
  fill = 0;
}

// Virtual chunk v in [0, T * chunks): task v / chunks, chunk v % chunks.  A block's chunks are in
// ascending v, so it meets each task in one run; at the end of the run it flushes its counts (one
// atomic per count) and its warps' staged candidates.
template <typename scalar_t>
__global__ void __launch_bounds__(kBrThreads) bracket_kernel(Table tab, int64_t L, int64_t chunks,
                                                             int64_t virtual_chunks, BracketArgs a) {
  __shared__ int64_t scratch[kBlockScratch];
  __shared__ float stage_all[kBrWarps * kBrWarpStage];  // 16 KiB
  float* stage = stage_all + (threadIdx.x / kWarpSize) * kBrWarpStage;
  int64_t below = 0, at_lo = 0, inside = 0, at_hi = 0;  // this thread's counts of task t
  unsigned fill = 0;                                     // warp-uniform: candidates staged
  bool full = a.capacity == 0;                           // warp-uniform: task t has no slot left
  int64_t v = blockIdx.x;
  int64_t t = v / chunks;
  while (v < virtual_chunks) {  // block-uniform
    const int64_t c = v - t * chunks;
    const int64_t l = find_tensor(tab.start, L, c);
    const int64_t begin = (c - tab.start[l]) * kBrChunk;
    const int64_t end = std::min(tab.numel[l], begin + kBrChunk);
    const int64_t first = begin + threadIdx.x;  // element j of this thread: first + j * kBrThreads
    const scalar_t* in = as_ptr<scalar_t>(tab.in[t * L + l]) + first;
    const scalar_t* bs = tab.base[l] != 0 ? as_ptr<scalar_t>(tab.base[l]) + first : nullptr;
    const uint32_t klo = static_cast<uint32_t>(tab.aux0[t]), khi = static_cast<uint32_t>(tab.aux1[t]);
    const bool full_chunk = end - begin == kBrChunk;  // block-uniform
    float x[kBrPerThread];
    if (full_chunk) {
#pragma unroll
      for (int j = 0; j < kBrPerThread; ++j) x[j] = load_tau(in, bs, int64_t{j} * kBrThreads);
    } else {
#pragma unroll
      for (int j = 0; j < kBrPerThread; ++j)
        x[j] = first + j * kBrThreads < end ? load_tau(in, bs, int64_t{j} * kBrThreads) : 0.f;
    }
    if (a.dare.p > 0.f) {  // block-uniform
      const uint64_t key = a.dare_keys != nullptr ? static_cast<uint64_t>(a.dare_keys[t * L + l]) : 0u;
#pragma unroll
      for (int j = 0; j < kBrPerThread; j += 4) {  // 4 rows at a time: fewer live registers
        int64_t idx[4];
        uint32_t words[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) idx[q] = first + int64_t{j + q} * kBrThreads;
        dare_words4(idx, key, words);
#pragma unroll
        for (int q = 0; q < 4; ++q) x[j + q] = dare_apply_word(x[j + q], a.dare, words[q]);
      }
    }
    if (!full_chunk) {
#pragma unroll
      for (int j = 0; j < kBrPerThread; ++j)
        if (first + j * kBrThreads >= end) x[j] = bits_float(kNoKey);
    }
    // Four compares and adds per element: #key < lo, <= lo, < hi, <= hi; the categories follow per chunk.
    uint32_t lt_lo = 0, le_lo = 0, lt_hi = 0, le_hi = 0;
#pragma unroll
    for (int j = 0; j < kBrPerThread; ++j) {
      const uint32_t k = abs_key(x[j]);
      lt_lo += k < klo;
      le_lo += k <= klo;
      lt_hi += k < khi;
      le_hi += k <= khi;
    }
    const bool distinct = khi > klo;  // else nothing is inside and "at hi" is "at lo"
    const uint32_t mine = distinct ? lt_hi - le_lo : 0u;
    below += lt_lo;
    at_lo += le_lo - lt_lo;
    inside += mine;
    at_hi += distinct ? le_hi - lt_hi : 0u;
    // Candidates (about 1% of the elements when lo, hi come from a sample): staged in the warp's
    // buffer, which is flushed to the task's slots when the next batch would not fit.
    if (!full && __any_sync(kFullMask, mine != 0u)) {  // warp-uniform
      unsigned total = 0;
      const unsigned offset = warp_exclusive_scan_sum(mine, &total);
      if (fill + total > kBrWarpStage) flush_stage(stage, fill, full, t, a);  // warp-uniform; fill > 0
      if (!full) {
        unsigned pos = fill + offset;
#pragma unroll
        for (int j = 0; j < kBrPerThread; ++j) {
          const uint32_t k = abs_key(x[j]);
          if (k > klo && k < khi) stage[pos++] = bits_float(k);
        }
        fill += total;
      }
    }
    const int64_t next = v + gridDim.x;
    const int64_t next_t = next < virtual_chunks ? next / chunks : -1;
    if (next_t != t) {  // block-uniform: this block is done with task t
      if (fill != 0u) flush_stage(stage, fill, full, t, a);  // warp-uniform
      block_add_count(below, a.counts + 4 * t, scratch);
      block_add_count(at_lo, a.counts + 4 * t + 1, scratch);
      block_add_count(inside, a.counts + 4 * t + 2, scratch);
      block_add_count(at_hi, a.counts + 4 * t + 3, scratch);
      below = at_lo = inside = at_hi = 0;
      full = a.capacity == 0;
      t = next_t;
    }
    v = next;
  }
}

// --------------------------------------------------------------------------------------------------
// Host side
// --------------------------------------------------------------------------------------------------
// The table of a launch: in[T*L] | base[L] | numel[L] | start[L+1] | aux0[A] | aux1[A], built on the
// host and copied to the inputs' device once (stream-ordered; under the emulator the device is the
// CPU and the copy a clone).  `dev` must outlive the launch call only: the caching allocator frees it
// in stream order.  Nothing is copied when the tensors are all empty (chunks == 0).
struct DeviceTable {
  at::Tensor dev;
  Table tab;
  int64_t chunks = 0;
};

inline DeviceTable make_table(const TaskList& tl, at::TensorList inputs, at::TensorList base, int64_t chunk,
                              const std::vector<int64_t>& aux0, const std::vector<int64_t>& aux1) {
  const int64_t T = tl.T, L = tl.L, A = static_cast<int64_t>(aux0.size());
  std::vector<int64_t> h(static_cast<size_t>(T * L + 3 * L + 1 + 2 * A), 0);
  int64_t* h_in = h.data();
  int64_t* h_base = h_in + T * L;
  int64_t* h_numel = h_base + L;
  int64_t* h_start = h_numel + L;
  int64_t* h_aux0 = h_start + L + 1;
  int64_t* h_aux1 = h_aux0 + A;
  for (int64_t i = 0; i < T * L; ++i) h_in[i] = reinterpret_cast<int64_t>(inputs[i].data_ptr());
  for (int64_t l = 0; l < L; ++l) {
    h_base[l] = tl.has_base ? reinterpret_cast<int64_t>(base[l].data_ptr()) : 0;
    h_numel[l] = tl.numel[l];
    h_start[l + 1] = h_start[l] + (tl.numel[l] + chunk - 1) / chunk;
  }
  std::copy(aux0.begin(), aux0.end(), h_aux0);
  std::copy(aux1.begin(), aux1.end(), h_aux1);
  DeviceTable t;
  t.chunks = h_start[L];
  if (t.chunks == 0) return t;
  t.dev = upload_table(h, tl.device);
  const int64_t* d = t.dev.data_ptr<int64_t>();
  t.tab.in = d;
  t.tab.base = d + T * L;
  t.tab.numel = t.tab.base + L;
  t.tab.start = t.tab.numel + L;
  t.tab.aux0 = t.tab.start + L + 1;
  t.tab.aux1 = t.tab.aux0 + A;
  return t;
}

void abs_histogram_cuda(at::Tensor& hist, at::TensorList inputs, at::TensorList base, int64_t num_tasks,
                        const c10::optional<at::Tensor>& prefix, double dare_p,
                        const c10::optional<at::Tensor>& dare_keys, bool dare_rescale) {
  constexpr const char* op = "calm_fast.abs_histogram_";
  const TaskList tl = check_task_list(op, inputs, base, num_tasks);
  check_histogram(op, hist, tl, num_tasks, prefix.has_value());
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
  const int64_t A = static_cast<int64_t>(act_task.size());
  CF_DEVICE_GUARD(tl.device.index());
  const DeviceTable table = make_table(tl, inputs, base, chunk, act_task, act_prefix);
  const Table& tab = table.tab;
  const int64_t chunks = table.chunks;
  if (chunks == 0) return;

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

std::tuple<at::Tensor, at::Tensor> abs_bracket_cuda(at::TensorList inputs, at::TensorList base, int64_t num_tasks,
                                                    const at::Tensor& lo, const at::Tensor& hi, int64_t capacity,
                                                    double dare_p, const c10::optional<at::Tensor>& dare_keys,
                                                    bool dare_rescale) {
  constexpr const char* op = "calm_fast.abs_bracket";
  const TaskList tl = check_task_list(op, inputs, base, num_tasks);
  // Host copies of lo and hi (T floats each, a sync on a GPU): the checks and the keys.
  const std::pair<at::Tensor, at::Tensor> bounds = check_bracket(op, lo, hi, capacity, num_tasks, tl);
  std::vector<int64_t> klo(static_cast<size_t>(num_tasks)), khi(static_cast<size_t>(num_tasks));
  for (int64_t t = 0; t < num_tasks; ++t) {
    klo[t] = abs_key(bounds.first.data_ptr<float>()[t]);
    khi[t] = abs_key(bounds.second.data_ptr<float>()[t]);
  }
  check_dare(op, dare_p, dare_keys, tl);
  const at::Device dev = tl.L > 0 ? tl.device : lo.device();
  const auto i64 = at::TensorOptions().dtype(at::kLong).device(dev);
  at::Tensor counts = at::zeros({num_tasks, 4}, i64);
  at::Tensor cand = at::empty({num_tasks, capacity}, i64.dtype(at::kFloat));
  if (tl.L == 0) return {counts, cand};
  CF_DEVICE_GUARD(tl.device.index());
  const DeviceTable table = make_table(tl, inputs, base, kBrChunk, klo, khi);
  if (table.chunks == 0) return {counts, cand};
  at::Tensor next_slot = at::zeros({num_tasks}, i64);
  const at::Tensor keys = dare_keys.has_value() ? dare_keys->contiguous() : at::Tensor();
  BracketArgs a;
  a.dare_keys = keys.defined() ? keys.data_ptr<int64_t>() : nullptr;
  a.dare = cpu::make_dare(dare_p, dare_rescale);
  a.capacity = capacity;
  a.counts = counts.data_ptr<int64_t>();
  a.cand = cand.data_ptr<float>();
  a.next_slot = reinterpret_cast<unsigned long long*>(next_slot.data_ptr<int64_t>());
  const int device = tl.device.index();
  const cf_stream_t stream = cf_current_stream(device);
  const int64_t virtual_chunks = tl.T * table.chunks;
  const int64_t grid = std::max<int64_t>(1, std::min<int64_t>(virtual_chunks, int64_t{cf_num_sms(device)} * kBrBlocksPerSm));
  CF_DISPATCH_FLOAT(tl.dtype, [&] {
    auto kernel = bracket_kernel<scalar_t>;
    CF_LAUNCH(kernel, static_cast<unsigned>(grid), kBrThreads, 0, stream, table.tab, tl.L, table.chunks,
              virtual_chunks, a);
  });
  return {counts, cand};
}

}  // namespace cuda_sel
}  // namespace calm_fast

CF_CUDA_LIBRARY_IMPL(m) {
  m.impl("abs_histogram_", &calm_fast::cuda_sel::abs_histogram_cuda);
  m.impl("abs_bracket", &calm_fast::cuda_sel::abs_bracket_cuda);
}
