// calm_fast's own warp- and block-level primitives: plain CUDA (warp shuffles, ballots, shared memory,
// atomics), no CUB and no inline PTX, so one source compiles with nvcc and runs under the CPU emulator
// (csrc/testing/cuda_emu.h).  Include it after cuda/cuda_compat.cuh in a kernel file; on its own it only
// needs nvcc's built-ins (or the emulator), not torch.
//
// Conventions shared by every function below.
//   * "thread rank" is the linear index threadIdx.x + blockDim.x*(threadIdx.y + blockDim.y*threadIdx.z);
//     warps are consecutive groups of 32 ranks, exactly as the hardware forms them.
//   * warp_* functions are called by all 32 lanes of a warp together (mask 0xffffffff) unless a `mask`
//     parameter says otherwise; no lane of the warp may have exited.
//   * block_* functions are called by every thread of the block, from the same call site, in uniform
//     control flow (they contain __syncthreads).  They need the number of threads per block to be a
//     multiple of 32 and at most 1024.  `scratch` is shared memory the caller owns (__shared__ or
//     CF_DYNAMIC_SHARED) of at least kBlockScratch elements; the function ends with a barrier, so the
//     same scratch may be reused by the very next call.
//   * Results are deterministic: the combination order depends only on thread ranks, never on timing,
//     and a value documented as "valid in all threads" is bit-identical in all of them.
#pragma once

#if defined(__CUDACC__)
#include <cstdint>
#elif defined(CALM_FAST_EMULATE_CUDA)
#include "testing/cuda_emu.h"
#else
#error "block_ops.cuh needs nvcc or CALM_FAST_EMULATE_CUDA"
#endif

// `#pragma unroll` for nvcc only (g++ would warn about an unknown pragma).
#if defined(__CUDACC__)
#define CF_BLOCK_OPS_UNROLL _Pragma("unroll")
#else
#define CF_BLOCK_OPS_UNROLL
#endif

namespace calm_fast {

constexpr int kWarpSize = 32;
constexpr unsigned kFullWarpMask = 0xffffffffu;
constexpr int kMaxBlockThreads = 1024;
// Elements of T that block_reduce_* / block_exclusive_scan / block_compact_offset need in `scratch`.
constexpr int kBlockScratch = kMaxBlockThreads / kWarpSize;

// ---------------------------------------------------------------------------------------------------
// Indices
// ---------------------------------------------------------------------------------------------------
__device__ __forceinline__ unsigned block_thread_rank() {
  return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
}
__device__ __forceinline__ unsigned block_num_threads() { return blockDim.x * blockDim.y * blockDim.z; }
__device__ __forceinline__ unsigned lane_id() { return block_thread_rank() & (kWarpSize - 1); }
__device__ __forceinline__ unsigned warp_id() { return block_thread_rank() / kWarpSize; }
__device__ __forceinline__ unsigned block_num_warps() { return (block_num_threads() + kWarpSize - 1) / kWarpSize; }
// Lanes below / up to the calling lane.
__device__ __forceinline__ unsigned lanemask_lt() { return (1u << lane_id()) - 1u; }
__device__ __forceinline__ unsigned lanemask_le() { return lanemask_lt() | (1u << lane_id()); }

// 1-D grid-stride loops: for (int64_t i = grid_thread_rank(); i < n; i += grid_num_threads()).
__device__ __forceinline__ int64_t grid_thread_rank() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t grid_num_threads() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

// ---------------------------------------------------------------------------------------------------
// Warp level.  T: int, unsigned, long, unsigned long, long long, unsigned long long, float, double.
// ---------------------------------------------------------------------------------------------------
struct SumOp {
  template <class T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};
struct MaxOp {
  template <class T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a < b ? b : a; }
};
struct MinOp {
  template <class T>
  __device__ __forceinline__ T operator()(T a, T b) const { return b < a ? b : a; }
};

// Butterfly all-reduce over the full warp.  Result valid in all 32 lanes.  For a commutative `op`
// (sum, min, max of non-NaN values) every lane gets the bit-identical result.
template <class T, class Op>
__device__ __forceinline__ T warp_allreduce(T v, Op op) {
CF_BLOCK_OPS_UNROLL
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v = op(v, __shfl_xor_sync(kFullWarpMask, v, offset));
  return v;
}

template <class T>
__device__ __forceinline__ T warp_reduce_sum(T v) { return warp_allreduce(v, SumOp{}); }
template <class T>
__device__ __forceinline__ T warp_reduce_max(T v) { return warp_allreduce(v, MaxOp{}); }
template <class T>
__device__ __forceinline__ T warp_reduce_min(T v) { return warp_allreduce(v, MinOp{}); }

// Sum over the lanes of `mask`, for a warp that is only partly active (the partial last warp of a
// block, or lanes that stay after others returned, with the mask taken by __ballot_sync *before* the
// divergence).  `mask` must be one contiguous run of lanes (e.g. (1u << n) - 1) and the call is made by
// exactly those lanes.  Result valid in the lowest lane of `mask` only (the others hold partial sums).
template <class T>
__device__ __forceinline__ T warp_reduce_sum_masked(T v, unsigned mask) {
  const unsigned lane = lane_id();
CF_BLOCK_OPS_UNROLL
  for (unsigned offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const T other = __shfl_down_sync(mask, v, offset);  // a source lane outside mask gives garbage
    if (lane + offset < static_cast<unsigned>(kWarpSize) && ((mask >> (lane + offset)) & 1u)) v += other;
  }
  return v;
}

// Inclusive prefix sum in lane order (lane i gets v_0 + ... + v_i).  Integer T (the order is fixed, so
// floats work too, but then the result is a sequential-order-dependent rounding).
template <class T>
__device__ __forceinline__ T warp_inclusive_scan_sum(T v) {
  const unsigned lane = lane_id();
CF_BLOCK_OPS_UNROLL
  for (int offset = 1; offset < kWarpSize; offset *= 2) {
    const T other = __shfl_up_sync(kFullWarpMask, v, offset);
    if (lane >= static_cast<unsigned>(offset)) v += other;
  }
  return v;
}

// Exclusive prefix sum in lane order (lane 0 gets 0); *warp_total (optional) gets the warp's sum.
template <class T>
__device__ __forceinline__ T warp_exclusive_scan_sum(T v, T* warp_total = nullptr) {
  const T incl = warp_inclusive_scan_sum(v);
  if (warp_total) *warp_total = __shfl_sync(kFullWarpMask, incl, kWarpSize - 1);
  return incl - v;
}

// Stream-compaction rank within the warp: the number of lanes below the caller whose pred is true; the
// warp's count in *warp_count.  Full warp.
__device__ __forceinline__ unsigned warp_compact_rank(bool pred, unsigned* warp_count) {
  const unsigned ballot = __ballot_sync(kFullWarpMask, pred);
  *warp_count = static_cast<unsigned>(__popc(ballot));
  return static_cast<unsigned>(__popc(ballot & lanemask_lt()));
}

// Reserve output slots with one atomic per warp: every lane with pred gets a distinct index
// atomicAdd(counter, count_of_warp) + rank; lanes without pred get 0xffffffff.  Full warp.  Slots of a
// warp are contiguous and follow lane order; the order between warps is the order of their atomics.
__device__ __forceinline__ unsigned warp_reserve_slots(unsigned* counter, bool pred) {
  const unsigned ballot = __ballot_sync(kFullWarpMask, pred);
  unsigned base = 0;
  if (lane_id() == 0 && ballot != 0u) base = atomicAdd(counter, static_cast<unsigned>(__popc(ballot)));
  base = __shfl_sync(kFullWarpMask, base, 0);
  return pred ? base + static_cast<unsigned>(__popc(ballot & lanemask_lt())) : 0xffffffffu;
}

// hist[bin] += 1 for every calling lane, with one atomic per distinct bin in the warp (lanes with equal
// bins are aggregated through __match_any_sync).  Called by exactly the lanes in `mask` (e.g.
// __activemask() taken in converged code, or kFullWarpMask); works on shared or global counters.
__device__ __forceinline__ void warp_histogram_add(unsigned* hist, unsigned bin, unsigned mask) {
  const unsigned peers = __match_any_sync(mask, bin);
  const unsigned leader = static_cast<unsigned>(__ffs(static_cast<int>(peers)) - 1);
  if (lane_id() == leader) atomicAdd(hist + bin, static_cast<unsigned>(__popc(peers)));
}

// ---------------------------------------------------------------------------------------------------
// Block level (see the conventions at the top: all threads, uniform flow, multiple of 32 threads).
// ---------------------------------------------------------------------------------------------------

// Reduce with `op` over the whole block; `pad` fills the unused warp slots of the second stage (the
// identity of op, or any block value for an idempotent op).  Result valid in all threads.  Two
// barriers.  Order: butterfly within each warp, then over the warp results in warp order.
template <class T, class Op>
__device__ __forceinline__ T block_allreduce(T v, T* scratch, Op op, T pad) {
  const unsigned lane = lane_id();
  const unsigned warp = warp_id();
  const unsigned num_warps = block_num_warps();
  v = warp_allreduce(v, op);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T t = lane < num_warps ? scratch[lane] : pad;
  t = warp_allreduce(t, op);
  __syncthreads();  // every warp has read scratch: the caller may overwrite it
  return t;
}

// Sum over the block, valid in all threads (bit-identical).
template <class T>
__device__ __forceinline__ T block_reduce_sum(T v, T* scratch) {
  return block_allreduce(v, scratch, SumOp{}, static_cast<T>(0));
}

// Max / min over the block (of non-NaN values), valid in all threads.
template <class T>
__device__ __forceinline__ T block_reduce_max(T v, T* scratch) {
  const T w = warp_reduce_max(v);
  return block_allreduce(w, scratch, MaxOp{}, w);
}
template <class T>
__device__ __forceinline__ T block_reduce_min(T v, T* scratch) {
  const T w = warp_reduce_min(v);
  return block_allreduce(w, scratch, MinOp{}, w);
}

// Exclusive prefix sum over the block in thread-rank order (rank 0 gets 0); *block_total (optional,
// a per-thread pointer such as a local variable) gets the block's sum in every thread.  Integer T:
// int, unsigned, long long, int64_t, uint64_t.  Two barriers.
template <class T>
__device__ __forceinline__ T block_exclusive_scan_sum(T v, T* scratch, T* block_total = nullptr) {
  const unsigned lane = lane_id();
  const unsigned warp = warp_id();
  const unsigned num_warps = block_num_warps();
  const T incl = warp_inclusive_scan_sum(v);
  if (lane == kWarpSize - 1) scratch[warp] = incl;
  __syncthreads();
  const T w = lane < num_warps ? scratch[lane] : static_cast<T>(0);
  const T w_incl = warp_inclusive_scan_sum(w);
  const T warp_offset = __shfl_sync(kFullWarpMask, w_incl - w, static_cast<int>(warp));
  const T total = __shfl_sync(kFullWarpMask, w_incl, kWarpSize - 1);
  __syncthreads();
  if (block_total) *block_total = total;
  return warp_offset + incl - v;
}

// Stream compaction over the block: returns the caller's output index among the threads with pred
// (thread-rank order) — meaningful only where pred is true — and *block_count = number of threads with
// pred, in every thread.  Two barriers.
__device__ __forceinline__ int block_compact_offset(bool pred, int* scratch, int* block_count) {
  const unsigned lane = lane_id();
  const unsigned warp = warp_id();
  const unsigned num_warps = block_num_warps();
  unsigned warp_count;
  const unsigned rank = warp_compact_rank(pred, &warp_count);
  if (lane == 0) scratch[warp] = static_cast<int>(warp_count);
  __syncthreads();
  const int w = lane < num_warps ? scratch[lane] : 0;
  const int w_incl = warp_inclusive_scan_sum(w);
  const int warp_offset = __shfl_sync(kFullWarpMask, w_incl - w, static_cast<int>(warp));
  const int total = __shfl_sync(kFullWarpMask, w_incl, kWarpSize - 1);
  __syncthreads();
  *block_count = total;
  return warp_offset + static_cast<int>(rank);
}

// p[i] = value for i in [0, n), spread over the block's threads.  No barrier: call __syncthreads()
// before other threads read p.  Any thread count.
template <class T>
__device__ __forceinline__ void block_fill(T* p, int n, T value) {
  const int stride = static_cast<int>(block_num_threads());
  for (int i = static_cast<int>(block_thread_rank()); i < n; i += stride) p[i] = value;
}

// global[i] += local[i] (atomically) for every non-zero local[i], i in [0, bins): flushes a block's
// shared-memory histogram into a global one.  Call after a __syncthreads() that follows the last update
// of `local`.  T: unsigned or unsigned long long.  Any thread count; no barrier inside.
template <class T>
__device__ __forceinline__ void block_flush_histogram(const T* local, T* global, int bins) {
  const int stride = static_cast<int>(block_num_threads());
  for (int i = static_cast<int>(block_thread_rank()); i < bins; i += stride) {
    const T c = local[i];
    if (c != 0) atomicAdd(global + i, c);
  }
}

}  // namespace calm_fast
