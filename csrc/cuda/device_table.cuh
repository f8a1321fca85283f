// Helpers shared by the CUDA ops: one int64 table (pointers, sizes, chunk starts, ...) built on the host
// and uploaded once per launch, and the device-side lookup of a chunk's tensor in it.
#pragma once

#include <ATen/ops/from_blob.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace calm_fast {

// Rounded fp32 product / sum that nvcc never fuses into an FMA (the CPU kernels round each one).
__device__ __forceinline__ float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
__device__ __forceinline__ float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// A device pointer stored as int64 in the uploaded table.
template <typename T>
__device__ __forceinline__ T* as_ptr(int64_t v) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(v));
}

// Uploads `h` to `device`.  From pageable memory the copy has staged `h` when it returns, so `h` may
// die right after; under the emulator the "device" is the CPU and the result is a private copy.
inline at::Tensor upload_table(std::vector<int64_t>& h, const at::Device& device) {
  const at::Tensor host = at::from_blob(h.data(), {static_cast<int64_t>(h.size())}, at::kLong);
  at::Tensor dev = host.to(at::TensorOptions().device(device), /*non_blocking=*/true);
  if (dev.data_ptr() == host.data_ptr()) dev = host.clone();
  return dev;
}

// One chunk of a list-wide launch: elements [begin, end) of tensor l.
struct Chunk {
  int64_t l, begin, end;
};

// The tensor holding chunk c is the last l with start[l] <= c (empty tensors own no chunk); every
// chunk but a tensor's last holds `chunk` elements.  `tab` has the [L] numel and [L+1] start arrays.
template <class Table>
__device__ __forceinline__ Chunk chunk_of(const Table& tab, int64_t L, int64_t c, int64_t chunk) {
  int64_t lo = 0, hi = L - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) >> 1;
    if (tab.start[mid] <= c) lo = mid; else hi = mid - 1;
  }
  Chunk ch;
  ch.l = lo;
  ch.begin = (c - tab.start[lo]) * chunk;
  ch.end = std::min(tab.numel[lo], ch.begin + chunk);
  return ch;
}

}  // namespace calm_fast
