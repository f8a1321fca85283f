// DARE in the CUDA kernels: one Philox-4x32-10 block per 4 elements, shared by selection.cu and merge.cu
// (and, through them, by the emulated build).  Include after cuda/cuda_compat.cuh.
//
// philox_uniform(i, key) is word i & 3 of the Philox-4x32-10 block of counter i >> 2 (common/
// elementwise.h).  In every kernel here a thread's elements are idx[j] = row_j + lane with row_j a
// multiple of 32, so the 4 lanes 4q..4q+3 of a row share one block.  dare_words4 lets each lane compute
// ONE block (row lane & 3 of its group of 4 rows) and hands every lane its word of each row by a 4x4
// transpose over 4 shuffles: 4x fewer Philox rounds than dare_apply per element, the very same words,
// which dare_apply_word (common/elementwise.h) then turns into the kept / dropped value.
#pragma once

#include "cuda/cuda_compat.cuh"

#include <cstdint>

#include "common/elementwise.h"

namespace calm_fast {

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

// word[j] = the Philox word of element idx[j], j < 4, where idx[j] = row_j + lane (row_j a multiple of
// 32; the indices of lanes past the end of a tensor are fine, their words are just unused).  Called by
// all 32 lanes of the warp (warp-uniform).
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

}  // namespace calm_fast
