// Broken kernels: the emulator must catch each one.  `emu_bad CASE` runs one case; tests/test_emulator.py
// checks the outcome for the scheduling order / strictness it sets in the environment:
//   * cases that race print "RESULT ok" or "RESULT wrong" (the race shows as a wrong value);
//   * cases the emulator must reject abort with a message on stderr (or, where the kernel is legal in
//     the non-strict mode, finish and print "RESULT done").
#include "selftest.h"

#include <cstring>

// ---------------------------------------------------------------------------------------------------
// A missing __syncthreads between a shared-memory write and another thread's read.  Each thread reads
// its lower neighbour, so the in-order schedule (lower threads first) happens to give the right answer;
// a permuted order runs some readers before their writers.
// ---------------------------------------------------------------------------------------------------
__global__ void missing_barrier_kernel(const int* in, int* out) {
  __shared__ int s[256];
  const unsigned t = threadIdx.x;
  s[t] = in[blockIdx.x * blockDim.x + t];
  // __syncthreads();   <- missing
  out[blockIdx.x * blockDim.x + t] = t > 0 ? s[t - 1] : 0;
}

static int missing_barrier() {
  const int blocks = 4, threads = 256;
  std::vector<int> in(blocks * threads), out(blocks * threads, 0);
  for (size_t i = 0; i < in.size(); ++i) in[i] = static_cast<int>(i * 3 + 1);
  CF_LAUNCH(missing_barrier_kernel, blocks, threads, 0, nullptr, in.data(), out.data());
  int wrong = 0;
  for (int b = 0; b < blocks; ++b)
    for (int t = 0; t < threads; ++t) wrong += out[b * threads + t] != (t > 0 ? in[b * threads + t - 1] : 0);
  std::printf("RESULT %s (%d wrong values)\n", wrong ? "wrong" : "ok", wrong);
  return 0;
}

// ---------------------------------------------------------------------------------------------------
// Divergent __syncthreads: only half the block reaches it, the other half returns.
// ---------------------------------------------------------------------------------------------------
__global__ void half_barrier_kernel(int* out) {
  const unsigned t = threadIdx.x;
  if (t < blockDim.x / 2) {
    __syncthreads();
    out[t] = 1;
  }
}

static int divergent_syncthreads() {
  std::vector<int> out(128, 0);
  CF_LAUNCH(half_barrier_kernel, 2, 128, 0, nullptr, out.data());
  std::printf("RESULT done\n");
  return 0;
}

// The two halves meet at different __syncthreads call sites.
__global__ void two_sites_kernel(int* out) {
  const unsigned t = threadIdx.x;
  if (t < blockDim.x / 2) {
    out[t] = 1;
    __syncthreads();
  } else {
    out[t] = 2;
    __syncthreads();
  }
}

static int barrier_sites() {
  std::vector<int> out(128, 0);
  CF_LAUNCH(two_sites_kernel, 1, 128, 0, nullptr, out.data());
  std::printf("RESULT done\n");
  return 0;
}

// ---------------------------------------------------------------------------------------------------
// Warp collectives
// ---------------------------------------------------------------------------------------------------
// Lane 5 returns, the others shuffle over the full mask.
__global__ void shfl_exited_kernel(int* out) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  if (lane == 5) return;
  out[threadIdx.x] = __shfl_sync(0xffffffffu, lane, 0);
}

static int shfl_exited_lane() {
  std::vector<int> out(64, 0);
  CF_LAUNCH(shfl_exited_kernel, 1, 64, 0, nullptr, out.data());
  std::printf("RESULT done\n");
  return 0;
}

// Even lanes shuffle, odd lanes ballot, all over the full mask.
__global__ void mixed_kernel(unsigned* out) {
  const unsigned lane = threadIdx.x % 32;
  if (lane % 2 == 0)
    out[threadIdx.x] = static_cast<unsigned>(__shfl_sync(0xffffffffu, static_cast<int>(lane), 0));
  else
    out[threadIdx.x] = __ballot_sync(0xffffffffu, 1);
}

static int mixed_intrinsics() {
  std::vector<unsigned> out(32, 0);
  CF_LAUNCH(mixed_kernel, 1, 32, 0, nullptr, out.data());
  std::printf("RESULT done\n");
  return 0;
}

// Lanes 0-15 of warp 0 go to the block barrier, lanes 16-31 to a full-warp __syncwarp that waits for
// them: nobody can proceed.
__global__ void deadlock_kernel(int* out) {
  const unsigned t = threadIdx.x;
  if (t < 16) {
    __syncthreads();
  } else if (t < 32) {
    __syncwarp();
  } else {
    __syncthreads();
  }
  out[t] = 1;
}

static int deadlock() {
  std::vector<int> out(256, 0);
  CF_LAUNCH(deadlock_kernel, 1, 256, 0, nullptr, out.data());
  std::printf("RESULT done\n");
  return 0;
}

// A mask without the calling lane.
__global__ void mask_without_self_kernel(int* out) {
  out[threadIdx.x] = __shfl_sync(0xfffffffeu, 1, 0);
}

static int mask_without_self() {
  std::vector<int> out(32, 0);
  CF_LAUNCH(mask_without_self_kernel, 1, 32, 0, nullptr, out.data());
  std::printf("RESULT done\n");
  return 0;
}

// Full-warp mask in a 48-thread block: warp 1 has only 16 lanes.
__global__ void partial_full_mask_kernel(int* out) {
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<int>(threadIdx.x), 1);
}

static int nonexistent_lane() {
  std::vector<int> out(48, 0);
  CF_LAUNCH(partial_full_mask_kernel, 1, 48, 0, nullptr, out.data());
  std::printf("RESULT done\n");
  return 0;
}

__global__ void bad_width_kernel(int* out) {
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1, 1, 12);
}

static int bad_width() {
  std::vector<int> out(32, 0);
  CF_LAUNCH(bad_width_kernel, 1, 32, 0, nullptr, out.data());
  std::printf("RESULT done\n");
  return 0;
}

// Lanes 0/1 shuffle together, but lane 1 first waits at the block barrier, which lane 0 never reaches.
__global__ void warp_barrier_deadlock_kernel(int* out) {
  const unsigned t = threadIdx.x;
  if (t == 0) {
    out[t] = __shfl_sync(0x3u, 7, 1);
  } else {
    __syncthreads();
    if (t == 1) out[t] = __shfl_sync(0x3u, 7, 0);
  }
}

static int warp_barrier_deadlock() {
  std::vector<int> out(64, 0);
  CF_LAUNCH(warp_barrier_deadlock_kernel, 1, 64, 0, nullptr, out.data());
  std::printf("RESULT done\n");
  return 0;
}

__global__ void trap_kernel() {
  if (threadIdx.x == 3) __trap();
}

static int trap() {
  CF_LAUNCH(trap_kernel, 1, 32, 0, nullptr);
  std::printf("RESULT done\n");
  return 0;
}

int main(int argc, char** argv) {
  struct {
    const char* name;
    int (*fn)();
  } cases[] = {
      {"missing_barrier", missing_barrier},
      {"divergent_syncthreads", divergent_syncthreads},
      {"barrier_sites", barrier_sites},
      {"shfl_exited_lane", shfl_exited_lane},
      {"mixed_intrinsics", mixed_intrinsics},
      {"deadlock", deadlock},
      {"mask_without_self", mask_without_self},
      {"nonexistent_lane", nonexistent_lane},
      {"bad_width", bad_width},
      {"warp_barrier_deadlock", warp_barrier_deadlock},
      {"trap", trap},
  };
  if (argc == 2)
    for (const auto& c : cases)
      if (std::strcmp(argv[1], c.name) == 0) return c.fn();
  std::fprintf(stderr, "usage: emu_bad CASE\n");
  return 2;
}
