// Compile check for csrc/cuda/block_ops.cuh: instantiates every primitive for the types it supports.
// tests/test_emulator.py compiles it with nvcc (-c, no torch needed) and with g++ under the emulator.
#include "cuda/block_ops.cuh"

namespace {

template <class T>
__global__ void reduce_all(const T* in, T* out) {
  __shared__ T scratch[calm_fast::kBlockScratch];
  const T v = in[calm_fast::grid_thread_rank()];
  T r = calm_fast::block_reduce_sum(v, scratch);
  r += calm_fast::block_reduce_max(v, scratch);
  r += calm_fast::block_reduce_min(v, scratch);
  r += calm_fast::warp_reduce_sum(v) + calm_fast::warp_reduce_max(v) + calm_fast::warp_reduce_min(v);
  if (calm_fast::lane_id() < 16) r += calm_fast::warp_reduce_sum_masked(v, 0x0000ffffu);
  if (threadIdx.x == 0) out[blockIdx.x] = r;
}

template <class T>
__global__ void scan_all(const T* in, T* out) {
  __shared__ T scratch[calm_fast::kBlockScratch];
  const int64_t i = calm_fast::grid_thread_rank();
  T total;
  T warp_total;
  out[i] = calm_fast::block_exclusive_scan_sum(in[i], scratch, &total) + total +
           calm_fast::warp_exclusive_scan_sum(in[i], &warp_total) + warp_total +
           calm_fast::warp_inclusive_scan_sum(in[i]);
}

__global__ void select_and_histogram(const unsigned* keys, int64_t n, unsigned* hist, unsigned long long* hist64,
                                     unsigned* out, unsigned* counter) {
  __shared__ int scratch[calm_fast::kBlockScratch];
  __shared__ unsigned local[256];
  __shared__ unsigned long long local64[256];
  calm_fast::block_fill(local, 256, 0u);
  calm_fast::block_fill(local64, 256, 0ull);
  __syncthreads();
  const int64_t i = calm_fast::grid_thread_rank();
  const bool valid = i < n;
  const unsigned key = valid ? keys[i] : 0u;
  int count;
  const int off = calm_fast::block_compact_offset(valid && (key & 1u), scratch, &count);
  unsigned warp_count;
  const unsigned rank = calm_fast::warp_compact_rank(valid, &warp_count);
  const unsigned slot = calm_fast::warp_reserve_slots(counter, valid && (key & 2u));
  if (valid && (key & 2u)) out[slot] = key + static_cast<unsigned>(off) + rank + warp_count;
  calm_fast::warp_histogram_add(local, key & 255u, calm_fast::kFullWarpMask);
  atomicAdd(&local64[key & 255u], 1ull);
  __syncthreads();
  calm_fast::block_flush_histogram(local, hist, 256);
  calm_fast::block_flush_histogram(local64, hist64, 256);
  if (threadIdx.x == 0) counter[1] = static_cast<unsigned>(count) + calm_fast::lanemask_le() +
                                     calm_fast::warp_id() + calm_fast::block_num_warps();
}

}  // namespace

#if defined(__CUDACC__)
#define CHECK_LAUNCH(kernel, ...) kernel<<<1, 256>>>(__VA_ARGS__)
#else
#define CHECK_LAUNCH(kernel, ...) CF_LAUNCH(kernel, 1, 256, 0, nullptr, __VA_ARGS__)
#endif

// Host-side instantiation (never called).
void calm_fast_block_ops_compile_check(void* p) {
  CHECK_LAUNCH(reduce_all<float>, static_cast<const float*>(p), static_cast<float*>(p));
  CHECK_LAUNCH(reduce_all<double>, static_cast<const double*>(p), static_cast<double*>(p));
  CHECK_LAUNCH(reduce_all<int>, static_cast<const int*>(p), static_cast<int*>(p));
  CHECK_LAUNCH(reduce_all<unsigned>, static_cast<const unsigned*>(p), static_cast<unsigned*>(p));
  CHECK_LAUNCH(reduce_all<long long>, static_cast<const long long*>(p), static_cast<long long*>(p));
  CHECK_LAUNCH(scan_all<int>, static_cast<const int*>(p), static_cast<int*>(p));
  CHECK_LAUNCH(scan_all<int64_t>, static_cast<const int64_t*>(p), static_cast<int64_t*>(p));
  CHECK_LAUNCH(scan_all<unsigned long long>, static_cast<const unsigned long long*>(p),
               static_cast<unsigned long long*>(p));
  CHECK_LAUNCH(select_and_histogram, static_cast<const unsigned*>(p), 0, static_cast<unsigned*>(p),
               static_cast<unsigned long long*>(p), static_cast<unsigned*>(p), static_cast<unsigned*>(p));
}
