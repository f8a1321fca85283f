// One .cu source, two compilers.  Every kernel file includes this header first and uses only:
//   - CUDA kernel syntax: __global__, __device__, __forceinline__, static __shared__ arrays,
//     threadIdx/blockIdx/blockDim/gridDim, __syncthreads, warp intrinsics, atomics;
//   - CF_DYNAMIC_SHARED(type, name)              dynamic shared memory of the running block;
//   - CF_LAUNCH(kernel, grid, block, smem, stream, args...)   every launch;
//   - CF_SET_MAX_DYNAMIC_SMEM(kernel, bytes)     opt in to > 48 KiB dynamic shared memory;
//   - cf_stream_t / cf_current_stream(device)    the torch stream (a dummy under the emulator);
//   - cf_num_sms(device)                         multiprocessor count (fixed small number emulated);
//   - CF_CUDA_LIBRARY_IMPL(m)                    TORCH_LIBRARY_IMPL(calm_fast, CUDA, m) under nvcc,
//                                                TORCH_LIBRARY_IMPL(calm_fast_emu, CPU, m) emulated.
// Under nvcc this maps to real CUDA; with CALM_FAST_EMULATE_CUDA (g++, see csrc/testing/cuda_emu.h)
// each CUDA thread is a fiber and the same source runs on the CPU for the test-suite.
#pragma once

#if defined(__CUDACC__)

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

using cf_stream_t = cudaStream_t;

inline cf_stream_t cf_current_stream(int device) { return c10::cuda::getCurrentCUDAStream(device).stream(); }

inline int cf_num_sms(int device) {
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  return n;
}

#define CF_DYNAMIC_SHARED(type, name) extern __shared__ type name[]

#define CF_LAUNCH(kernel, grid, block, smem, stream, ...)     \
  do {                                                         \
    kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__); \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                            \
  } while (0)

#define CF_SET_MAX_DYNAMIC_SMEM(kernel, bytes) \
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)(bytes)))

#define CF_DEVICE_GUARD(device_index) c10::cuda::CUDAGuard cf_device_guard_(static_cast<c10::DeviceIndex>(device_index))

#define CF_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(calm_fast, CUDA, m)

#elif defined(CALM_FAST_EMULATE_CUDA)

#include "testing/cuda_emu.h"

#else
#error "cuda_compat.cuh needs nvcc or CALM_FAST_EMULATE_CUDA"
#endif
