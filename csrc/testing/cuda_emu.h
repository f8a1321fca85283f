// calm_fast "CUDA on the CPU" emulator (header-only, C++20, g++).
//
// Included by csrc/cuda/cuda_compat.cuh when CALM_FAST_EMULATE_CUDA is defined, so that the very same
// .cu kernel source compiles with g++ and runs on the CPU inside the test-suite.  It needs no torch:
// plain g++ programs (csrc/testing/selftest) use it too.  See csrc/testing/README.md for the user guide.
//
// Execution model
//   * CF_LAUNCH runs the whole grid to completion on the calling host thread, one block after another
//     (grid order; a permuted order under CALM_FAST_EMU_ORDER=permute).
//   * Every CUDA thread of a block is a fiber with its own small stack (default 64 KiB plus a guard
//     page, CALM_FAST_EMU_STACK_KB); stacks are pooled per host thread and reused by every block.
//   * A fiber runs without preemption until it reaches __syncthreads*, a warp collective (__shfl*_sync,
//     __ballot_sync, __syncwarp, ...) or returns; then it switches directly to the next runnable fiber.
//     Scheduling is warp-major (see pick_next): the runnable lanes of one warp run round after round
//     until the warp is blocked, then the next warp.  CALM_FAST_EMU_ORDER picks the order: inorder
//     (lanes and warps ascending, the default), reverse, or permute[:SEED] (a fresh pseudo-random lane
//     order every round, warp order every pass, random early switches between warps, and a permuted
//     block order).  Code between two synchronisation points of one thread therefore runs atomically
//     with respect to the other threads; a missing __syncthreads between a shared-memory write and
//     another thread's read shows up as a wrong value whenever the order runs the reader first, which
//     the permuted orders provoke (the in-order schedule runs lower threads first and hides a reader
//     that looks at a lower thread's slot).
//   * __syncthreads is a counting block barrier.  A warp collective completes once every lane named in
//     its mask waits in a collective; lanes may diverge (independent thread scheduling).
//   * Errors found inside a kernel (a deadlock, an exited lane named in a mask, lanes of one mask in
//     different intrinsics, a divergent barrier in strict mode, ...) print a message naming the kernel,
//     the block, the threads and the source lines, then std::abort().  With
//     CALM_FAST_EMU_ON_ERROR=throw the launch throws cf_emu::EmuError (a std::runtime_error) instead;
//     the fibers of the failed launch are abandoned without running destructors.
//   * Launch-configuration errors (empty grid, > 1024 threads, too much dynamic shared memory, ...)
//     always throw cf_emu::EmuError, like CUDA's launch check throws c10::Error under nvcc.
//
// Environment (read at every launch)
//   CALM_FAST_EMU_STRICT=1          strict barriers: every thread of the block must reach the same
//                                   __syncthreads; an exited thread or another call site aborts.
//   CALM_FAST_EMU_ORDER=inorder|reverse|permute|permute:SEED    resume order of runnable fibers;
//                                   reverse/permute also reverse/permute the order of the blocks.
//   CALM_FAST_EMU_ON_ERROR=abort|throw
//   CALM_FAST_EMU_SMS=N             what cf_num_sms() returns (default 4).
//   CALM_FAST_EMU_STACK_KB=N        fiber stack size (read once per host thread, default 64).
//   CALM_FAST_EMU_SMEM_OPTIN_MAX=N  largest dynamic shared memory CF_SET_MAX_DYNAMIC_SMEM may enable
//                                   (default 166912 bytes = 163 KiB, the A100 limit; H100 allows 232448).
#pragma once

#if defined(__CUDACC__)
#error "cuda_emu.h is the g++ emulation of CUDA; nvcc uses the real runtime (see cuda_compat.cuh)"
#endif

#ifndef CALM_FAST_EMULATE_CUDA
#define CALM_FAST_EMULATE_CUDA 1
#endif
#define CALM_FAST_EMU 1

#include <math.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <source_location>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__) && !defined(CF_EMU_USE_UCONTEXT)
#define CF_EMU_ASM_SWITCH 1
#else
#include <ucontext.h>
#define CF_EMU_ASM_SWITCH 0
#endif

// =====================================================================================================
// CUDA qualifiers and built-in types
// =====================================================================================================
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __grid_constant__
#define __align__(n) __attribute__((aligned(n)))
#define __constant__
// `__shared__ T x[N];` inside a kernel becomes one array per host thread and kernel, shared by all the
// fibers of the running block (blocks run one at a time on a host thread).  Write it without
// `static`/`extern`; dynamic shared memory is CF_DYNAMIC_SHARED.  Like on hardware, its content at
// block start is undefined (here: whatever the previous block left).
#define __shared__ static thread_local
// __restrict__ is understood by g++ itself and is left alone.

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};

#define CF_EMU_VEC2(name, T, align)                                              \
  struct alignas(align) name {                                                   \
    T x, y;                                                                      \
  };                                                                             \
  inline constexpr name make_##name(T a, T b) { return name{a, b}; }
#define CF_EMU_VEC3(name, T)                                                     \
  struct name {                                                                  \
    T x, y, z;                                                                   \
  };                                                                             \
  inline constexpr name make_##name(T a, T b, T c) { return name{a, b, c}; }
#define CF_EMU_VEC4(name, T, align)                                              \
  struct alignas(align) name {                                                   \
    T x, y, z, w;                                                                \
  };                                                                             \
  inline constexpr name make_##name(T a, T b, T c, T d) { return name{a, b, c, d}; }

CF_EMU_VEC4(char4, signed char, 4)
CF_EMU_VEC4(uchar4, unsigned char, 4)
CF_EMU_VEC2(short2, short, 4)
CF_EMU_VEC2(ushort2, unsigned short, 4)
CF_EMU_VEC2(int2, int, 8)
CF_EMU_VEC2(uint2, unsigned int, 8)
CF_EMU_VEC2(float2, float, 8)
CF_EMU_VEC3(int3, int)
CF_EMU_VEC3(float3, float)
CF_EMU_VEC4(int4, int, 16)
CF_EMU_VEC4(uint4, unsigned int, 16)
CF_EMU_VEC4(float4, float, 16)
CF_EMU_VEC2(longlong2, long long, 16)
CF_EMU_VEC2(ulonglong2, unsigned long long, 16)
CF_EMU_VEC2(double2, double, 16)
inline constexpr uint3 make_uint3(unsigned int a, unsigned int b, unsigned int c) { return uint3{a, b, c}; }
#undef CF_EMU_VEC2
#undef CF_EMU_VEC3
#undef CF_EMU_VEC4

inline constexpr int warpSize = 32;

struct cf_emu_stream_st;
using cf_stream_t = cf_emu_stream_st*;  // a dummy: every launch runs synchronously

// =====================================================================================================
// Runtime
// =====================================================================================================
#if CF_EMU_ASM_SWITCH
// cf_emu_switch_ctx(save, to): push the callee-saved registers, store the stack pointer to *save, load
// `to` as the stack pointer, pop the registers saved there and return into that context.  No signal
// mask and no syscall.  Emitted into a COMDAT group so that several translation units may include it.
__asm__(
    ".pushsection .text.cf_emu_switch_ctx,\"axG\",@progbits,cf_emu_switch_ctx,comdat\n"
    ".globl cf_emu_switch_ctx\n"
    ".hidden cf_emu_switch_ctx\n"
    ".type cf_emu_switch_ctx,@function\n"
    ".p2align 4\n"
    "cf_emu_switch_ctx:\n"
    "  endbr64\n"
    "  pushq %rbp\n"
    "  pushq %rbx\n"
    "  pushq %r12\n"
    "  pushq %r13\n"
    "  pushq %r14\n"
    "  pushq %r15\n"
    "  movq %rsp, (%rdi)\n"
    "  movq %rsi, %rsp\n"
    "  popq %r15\n"
    "  popq %r14\n"
    "  popq %r13\n"
    "  popq %r12\n"
    "  popq %rbx\n"
    "  popq %rbp\n"
    "  ret\n"
    ".size cf_emu_switch_ctx, .-cf_emu_switch_ctx\n"
    ".popsection\n");
extern "C" __attribute__((visibility("hidden"))) void cf_emu_switch_ctx(void** save, void* to);
#endif

namespace cf_emu {

// Thrown by a failed launch (configuration errors always; kernel errors with CALM_FAST_EMU_ON_ERROR=throw).
struct EmuError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

namespace detail {

using Loc = std::source_location;

enum class FState : uint8_t { Runnable, Barrier, Warp, Exited };

enum class Coll : uint8_t {
  ShflIdx, ShflUp, ShflDown, ShflXor, Ballot, Any, All, SyncWarp,
  ReduceAddU, ReduceAddI, ReduceMinU, ReduceMinI, ReduceMaxU, ReduceMaxI,
  ReduceAnd, ReduceOr, ReduceXor, MatchAny, MatchAll
};

inline const char* coll_name(Coll k) {
  switch (k) {
    case Coll::ShflIdx: return "__shfl_sync";
    case Coll::ShflUp: return "__shfl_up_sync";
    case Coll::ShflDown: return "__shfl_down_sync";
    case Coll::ShflXor: return "__shfl_xor_sync";
    case Coll::Ballot: return "__ballot_sync";
    case Coll::Any: return "__any_sync";
    case Coll::All: return "__all_sync";
    case Coll::SyncWarp: return "__syncwarp";
    case Coll::ReduceAddU: return "__reduce_add_sync(unsigned)";
    case Coll::ReduceAddI: return "__reduce_add_sync(int)";
    case Coll::ReduceMinU: return "__reduce_min_sync(unsigned)";
    case Coll::ReduceMinI: return "__reduce_min_sync(int)";
    case Coll::ReduceMaxU: return "__reduce_max_sync(unsigned)";
    case Coll::ReduceMaxI: return "__reduce_max_sync(int)";
    case Coll::ReduceAnd: return "__reduce_and_sync";
    case Coll::ReduceOr: return "__reduce_or_sync";
    case Coll::ReduceXor: return "__reduce_xor_sync";
    case Coll::MatchAny: return "__match_any_sync";
    case Coll::MatchAll: return "__match_all_sync";
  }
  return "?";
}

enum class Bar : uint8_t { Sync, Count, And, Or };

inline const char* bar_name(Bar b) {
  switch (b) {
    case Bar::Sync: return "__syncthreads";
    case Bar::Count: return "__syncthreads_count";
    case Bar::And: return "__syncthreads_and";
    case Bar::Or: return "__syncthreads_or";
  }
  return "?";
}

enum class Order : uint8_t { InOrder, Reverse, Permute };

struct Ctx;

struct Fiber {
  void* sp = nullptr;        // saved stack pointer while suspended (asm switch)
  Ctx* ctx = nullptr;
  uint3 tid{0, 0, 0};
  unsigned linear = 0, warp = 0, lane = 0;
  FState state = FState::Exited;
  // What the fiber waits in (valid while state is Barrier or Warp) and the collective's result.
  Coll coll = Coll::SyncWarp;
  Bar bar = Bar::Sync;
  uint8_t vsize = 0;
  int width = 32;
  unsigned mask = 0;
  int arg = 0;
  uint64_t val = 0;
  uint64_t result = 0;
  int result2 = 0;
  Loc loc{};
  // Stack mapping (guard page at the low end).
  void* map_base = nullptr;
  size_t map_size = 0;
#if !CF_EMU_ASM_SWITCH
  ucontext_t uc{};
#endif
};

struct WarpState {
  unsigned exists = 0;   // lanes that exist (a partial last warp has fewer)
  unsigned exited = 0;   // lanes whose thread returned
  unsigned waiting = 0;  // lanes currently blocked in a warp collective
  unsigned ready = 0;    // lanes that are runnable (or running)
};

struct Ctx {
  std::vector<Fiber> fibers;  // index = linear thread index of the block
  std::vector<WarpState> warps;
  std::vector<unsigned> order;  // warp visiting order
  unsigned lane_perm[32] = {};
  // Scheduling cursor (see pick_next).
  unsigned cur_k = 0;     // position in `order`
  int cur_warp = -1;      // warp of the current round, -1 before the first
  unsigned round_left = 0;  // lanes of the current round not yet visited
  unsigned perm_pos = 0;
  void* sched_sp = nullptr;
#if !CF_EMU_ASM_SWITCH
  ucontext_t sched_uc{};
#endif
  size_t stack_bytes = 0;
  size_t page = 4096;
  bool in_launch = false;

  // Current launch.
  const char* kernel_name = "";
  const char* launch_file = "";
  int launch_line = 0;
  dim3 grid, block;
  uint3 block_idx{0, 0, 0};
  unsigned nthreads = 0, live = 0, runnable = 0, bar_arrived = 0;
  bool strict = false, throw_mode = false;
  Order order_mode = Order::InOrder;
  uint64_t seed = 0, rng = 0;
  void (*invoke)(void*) = nullptr;
  void* invoke_arg = nullptr;
  unsigned char* dsmem = nullptr;
  size_t dsmem_bytes = 0;
  std::vector<unsigned char> dsmem_store;
  bool failed = false;
  std::string error;

  Ctx() {
    const long p = sysconf(_SC_PAGESIZE);
    page = p > 0 ? static_cast<size_t>(p) : 4096;
    size_t kb = 64;
    if (const char* s = std::getenv("CALM_FAST_EMU_STACK_KB")) {
      const long v = std::strtol(s, nullptr, 10);
      if (v >= 16) kb = static_cast<size_t>(v);
    }
    stack_bytes = (kb * 1024 + page - 1) / page * page;
  }
  Ctx(const Ctx&) = delete;
  Ctx& operator=(const Ctx&) = delete;
  ~Ctx() {
    for (Fiber& f : fibers)
      if (f.map_base) munmap(f.map_base, f.map_size);
  }
};

inline thread_local Ctx* tls_ctx = nullptr;      // this host thread's emulator state
inline thread_local Fiber* tls_fiber = nullptr;  // the CUDA thread running now (null outside kernels)

inline Ctx& ctx() {
  static thread_local std::unique_ptr<Ctx> owner;
  if (!owner) {
    owner = std::make_unique<Ctx>();
    tls_ctx = owner.get();
  }
  return *owner;
}

// ---------------------------------------------------------------------------------------------------
// Messages
// ---------------------------------------------------------------------------------------------------
inline std::string fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
inline std::string fmt(const char* f, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, f);
  std::vsnprintf(buf, sizeof(buf), f, ap);
  va_end(ap);
  return std::string(buf);
}

inline std::string where(const Loc& l) { return fmt("%s:%u", l.file_name(), static_cast<unsigned>(l.line())); }

inline std::string block_str(const Ctx& c) {
  return fmt("block (%u,%u,%u)", c.block_idx.x, c.block_idx.y, c.block_idx.z);
}

inline std::string thread_str(const Fiber& f) {
  return fmt("thread (%u,%u,%u) [warp %u lane %u]", f.tid.x, f.tid.y, f.tid.z, f.warp, f.lane);
}

inline std::string lanes_str(unsigned m) {
  std::string s;
  int shown = 0;
  while (m && shown < 8) {
    const int l = std::countr_zero(m);
    m &= m - 1;
    s += (shown ? "," : "") + std::to_string(l);
    ++shown;
  }
  if (m) s += ",...";
  return s;
}

inline std::string wait_str(const Fiber& f) {
  switch (f.state) {
    case FState::Runnable: return "is runnable";
    case FState::Exited: return "has exited";
    case FState::Barrier: return fmt("waits in %s() at %s", bar_name(f.bar), where(f.loc).c_str());
    case FState::Warp:
      return fmt("waits in %s(mask 0x%08x) at %s", coll_name(f.coll), f.mask, where(f.loc).c_str());
  }
  return "?";
}

// Leave fiber `from` (whose state is already updated) for fiber `to`, or for the host-side scheduler
// when `to` is null.  Returns when someone switches back to `from`.
inline void switch_away(Ctx& c, Fiber& from, Fiber* to) {
#if CF_EMU_ASM_SWITCH
  if (to) {
    tls_fiber = to;
    cf_emu_switch_ctx(&from.sp, to->sp);
  } else {
    cf_emu_switch_ctx(&from.sp, c.sched_sp);
  }
#else
  if (to) {
    tls_fiber = to;
    swapcontext(&from.uc, &to->uc);
  } else {
    swapcontext(&from.uc, &c.sched_uc);
  }
#endif
}

// Report an error of the running launch: abort (default) or, in throw mode, unwind to CF_LAUNCH.
[[noreturn]] inline void raise(std::string msg) {
  Ctx& c = *tls_ctx;
  std::string full = "calm_fast CUDA emulator: kernel '" + std::string(c.kernel_name) + "' (launched at " +
                     c.launch_file + ":" + std::to_string(c.launch_line) + "), " + block_str(c) + ": " + msg;
  if (!c.throw_mode) {
    std::fprintf(stderr, "%s\n(CALM_FAST_EMU_ON_ERROR=throw turns this abort into an exception)\n", full.c_str());
    std::fflush(stderr);
    std::abort();
  }
  if (Fiber* f = tls_fiber) {
    // On a fiber stack: record and go back to the scheduler, which throws on the host stack.  The fiber
    // is abandoned (its frames are never unwound): keep what it still owns small.
    c.error = std::move(full);
    std::string().swap(msg);
    c.failed = true;
    switch_away(c, *f, nullptr);
    __builtin_unreachable();
  }
  throw EmuError(full);
}

[[noreturn]] inline void outside_kernel(const char* what) {
  std::fprintf(stderr, "calm_fast CUDA emulator: %s used outside a kernel launched with CF_LAUNCH\n", what);
  std::fflush(stderr);
  std::abort();
}

inline Fiber* cur(const char* what) {
  Fiber* f = tls_fiber;
  if (!f) [[unlikely]]
    outside_kernel(what);
  return f;
}

// ---------------------------------------------------------------------------------------------------
// Fibers
// ---------------------------------------------------------------------------------------------------
inline void fiber_exit(Ctx& c, Fiber& f);
inline Fiber* pick_next(Ctx& c);

// First frame of every fiber: run the kernel, then exit.  Never returns.
inline void fiber_main() {
  Ctx& c = *tls_ctx;
  std::string err;  // raised outside the handler: never leave a fiber while an exception is caught
  try {
    c.invoke(c.invoke_arg);
  } catch (const std::exception& e) {
    err = std::string("a kernel thread threw an exception: ") + e.what();
  } catch (...) {
    err = "a kernel thread threw an exception";
  }
  if (!err.empty()) raise(std::move(err));
  Fiber* f = tls_fiber;
  fiber_exit(c, *f);
  switch_away(c, *f, pick_next(c));
  __builtin_unreachable();
}

inline void ensure_fibers(Ctx& c, unsigned n) {
  if (c.fibers.size() >= n) return;
  const size_t old = c.fibers.size();
  c.fibers.resize(n);
  for (size_t i = old; i < n; ++i) {
    Fiber& f = c.fibers[i];
    f.map_size = c.stack_bytes + c.page;
    void* p = mmap(nullptr, f.map_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK,
                   -1, 0);
    if (p == MAP_FAILED) {
      c.fibers.resize(i);
      throw EmuError("calm_fast CUDA emulator: cannot map a fiber stack");
    }
    mprotect(p, c.page, PROT_NONE);  // guard page: a stack overflow faults instead of corrupting
    f.map_base = p;
  }
}

inline void fiber_reset(Ctx& c, Fiber& f, unsigned index) {
  char* lo = static_cast<char*>(f.map_base) + c.page;
  // Stagger the stack tops ("cache colouring"): page-aligned tops would all map to the same cache sets
  // and make every fiber switch a cache miss.
  char* top = static_cast<char*>(f.map_base) + f.map_size - (index % 61u) * 64u;
  f.state = FState::Runnable;
  f.ctx = &c;
#if CF_EMU_ASM_SWITCH
  void** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;                                         // fake return address of fiber_main
  *--sp = reinterpret_cast<void*>(&fiber_main);            // `ret` of the first switch lands here
  for (int i = 0; i < 6; ++i) *--sp = nullptr;             // rbp rbx r12 r13 r14 r15
  f.sp = sp;
#else
  getcontext(&f.uc);
  f.uc.uc_stack.ss_sp = lo;
  f.uc.uc_stack.ss_size = static_cast<size_t>(top - lo);
  f.uc.uc_link = nullptr;
  makecontext(&f.uc, reinterpret_cast<void (*)()>(&fiber_main), 0);
#endif
  (void)lo;
}

// Host side: run fibers, starting with `f`, until they hand control back (block finished, nothing
// runnable, or an error in throw mode).
inline void resume(Ctx& c, Fiber& f) {
  tls_fiber = &f;
#if CF_EMU_ASM_SWITCH
  cf_emu_switch_ctx(&c.sched_sp, f.sp);
#else
  swapcontext(&c.sched_uc, &f.uc);
#endif
  tls_fiber = nullptr;
}

// Fiber side: `f` has blocked (its state says where); continue with the next runnable fiber directly,
// without a detour through the host stack.
inline void yield(Ctx& c, Fiber& f) {
  Fiber* next = pick_next(c);
  if (next == &f) return;  // f itself completed what it waited for and is the next to run
  switch_away(c, f, next);
}

inline uint64_t splitmix(uint64_t& s) {
  uint64_t z = (s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

inline uint64_t rand_below(uint64_t& s, uint64_t n) {
  return static_cast<uint64_t>((static_cast<unsigned __int128>(splitmix(s)) * n) >> 64);
}

// ---------------------------------------------------------------------------------------------------
// Block barrier
// ---------------------------------------------------------------------------------------------------
inline bool same_loc(const Loc& a, const Loc& b) {
  return a.line() == b.line() && a.column() == b.column() &&
         (a.file_name() == b.file_name() || std::strcmp(a.file_name(), b.file_name()) == 0);
}

inline void complete_barrier(Ctx& c) {
  Fiber* F = c.fibers.data();
  const Fiber* first = nullptr;
  unsigned count = 0;
  for (unsigned t = 0; t < c.nthreads; ++t) {
    Fiber& f = F[t];
    if (f.state != FState::Barrier) continue;
    if (!first) {
      first = &f;
    } else if (c.strict && (!same_loc(f.loc, first->loc) || f.bar != first->bar)) {
      raise(fmt("strict mode: the threads of the block meet at different barriers: %s %s, %s %s",
                thread_str(*first).c_str(), wait_str(*first).c_str(), thread_str(f).c_str(), wait_str(f).c_str()));
    }
    count += f.result2 != 0;
  }
  const unsigned arrived = c.bar_arrived;
  for (unsigned t = 0; t < c.nthreads; ++t) {
    Fiber& f = F[t];
    if (f.state != FState::Barrier) continue;
    switch (f.bar) {
      case Bar::Sync: f.result = 0; break;
      case Bar::Count: f.result = count; break;
      case Bar::And: f.result = count == arrived; break;
      case Bar::Or: f.result = count != 0; break;
    }
    f.state = FState::Runnable;
    c.warps[f.warp].ready |= 1u << f.lane;
  }
  c.runnable += arrived;
  c.bar_arrived = 0;
}

inline int block_barrier(Bar kind, int pred, const Loc& loc) {
  Fiber& f = *cur(bar_name(kind));
  Ctx& c = *f.ctx;
  f.bar = kind;
  f.result2 = pred != 0;
  f.loc = loc;
  f.state = FState::Barrier;
  c.warps[f.warp].ready &= ~(1u << f.lane);
  --c.runnable;
  ++c.bar_arrived;
  if (c.bar_arrived == (c.strict ? c.nthreads : c.live)) complete_barrier(c);
  yield(c, f);
  return static_cast<int>(f.result);
}

// ---------------------------------------------------------------------------------------------------
// Warp collectives
// ---------------------------------------------------------------------------------------------------
inline bool same_coll(const Fiber& a, const Fiber& b) {
  return a.coll == b.coll && a.mask == b.mask && a.vsize == b.vsize;
}

[[noreturn]] inline void raise_mismatch(const Fiber& a, const Fiber& b) {
  const char* what = a.coll != b.coll ? "different intrinsics" : (a.mask != b.mask ? "different masks" : "different operand sizes");
  raise(fmt("lanes %u and %u of warp %u name each other in their masks but call %s: lane %u %s, lane %u %s "
            "(all lanes named in a mask must call the same intrinsic with the same mask)",
            a.lane, b.lane, a.warp, what, a.lane, wait_str(a).c_str(), b.lane, wait_str(b).c_str()));
}

inline uint64_t poison_bits(unsigned vsize) { return vsize >= 8 ? ~0ull : 0xFFFFFFFFull; }

inline unsigned shfl_src(Coll k, unsigned lane, int arg, int width) {
  // PTX shfl.sync semantics with CUDA's clamp operand c = ((32 - width) << 8) | (up ? 0 : 0x1f).
  const int b = arg & 31;
  const int seg = (32 - width) & 31;
  const int cval = k == Coll::ShflUp ? 0 : 31;
  const int ln = static_cast<int>(lane);
  const int max_lane = (ln & seg) | (cval & ~seg);
  const int min_lane = ln & seg;
  int j;
  bool ok;
  switch (k) {
    case Coll::ShflUp: j = ln - b; ok = j >= max_lane; break;
    case Coll::ShflDown: j = ln + b; ok = j <= max_lane; break;
    case Coll::ShflXor: j = ln ^ b; ok = j <= max_lane; break;
    default: j = min_lane | (b & ~seg); ok = j <= max_lane; break;
  }
  return static_cast<unsigned>(ok ? j : ln);
}

inline void complete_warp(Ctx& c, WarpState& w, Fiber* F, unsigned mask, const Fiber& lead) {
  // F points at lane 0 of the warp.
  const Coll k = lead.coll;
  const uint64_t vmask = poison_bits(lead.vsize);
  uint64_t common = 0;
  switch (k) {
    case Coll::ShflIdx:
    case Coll::ShflUp:
    case Coll::ShflDown:
    case Coll::ShflXor:
      for (unsigned m = mask; m; m &= m - 1) {
        Fiber& g = F[std::countr_zero(m)];
        const unsigned j = shfl_src(k, g.lane, g.arg, g.width);
        g.result = ((mask >> j) & 1u) ? F[j].val : vmask;  // a lane outside the mask gives poison
      }
      break;
    case Coll::Ballot:
    case Coll::Any:
    case Coll::All: {
      unsigned b = 0;
      for (unsigned m = mask; m; m &= m - 1) {
        const int l = std::countr_zero(m);
        if (F[l].val != 0) b |= 1u << l;
      }
      common = k == Coll::Ballot ? b : (k == Coll::Any ? (b != 0) : (b == mask));
      break;
    }
    case Coll::SyncWarp: break;
    case Coll::ReduceAddU:
    case Coll::ReduceAddI:
    case Coll::ReduceMinU:
    case Coll::ReduceMinI:
    case Coll::ReduceMaxU:
    case Coll::ReduceMaxI:
    case Coll::ReduceAnd:
    case Coll::ReduceOr:
    case Coll::ReduceXor: {
      bool first = true;
      uint32_t acc = 0;
      for (unsigned m = mask; m; m &= m - 1) {
        const uint32_t v = static_cast<uint32_t>(F[std::countr_zero(m)].val);
        if (first) {
          acc = v;
          first = false;
          continue;
        }
        switch (k) {
          case Coll::ReduceAddU:
          case Coll::ReduceAddI: acc += v; break;
          case Coll::ReduceMinU: acc = std::min(acc, v); break;
          case Coll::ReduceMaxU: acc = std::max(acc, v); break;
          case Coll::ReduceMinI:
            acc = static_cast<uint32_t>(std::min(static_cast<int32_t>(acc), static_cast<int32_t>(v)));
            break;
          case Coll::ReduceMaxI:
            acc = static_cast<uint32_t>(std::max(static_cast<int32_t>(acc), static_cast<int32_t>(v)));
            break;
          case Coll::ReduceAnd: acc &= v; break;
          case Coll::ReduceOr: acc |= v; break;
          default: acc ^= v; break;
        }
      }
      common = acc;
      break;
    }
    case Coll::MatchAny:
      for (unsigned m = mask; m; m &= m - 1) {
        Fiber& g = F[std::countr_zero(m)];
        unsigned r = 0;
        for (unsigned m2 = mask; m2; m2 &= m2 - 1) {
          const int l = std::countr_zero(m2);
          if (F[l].val == g.val) r |= 1u << l;
        }
        g.result = r;
      }
      break;
    case Coll::MatchAll: {
      bool all = true;
      for (unsigned m = mask; m; m &= m - 1) all = all && F[std::countr_zero(m)].val == lead.val;
      common = all ? mask : 0u;
      for (unsigned m = mask; m; m &= m - 1) F[std::countr_zero(m)].result2 = all;
      break;
    }
  }
  const bool per_lane = k == Coll::ShflIdx || k == Coll::ShflUp || k == Coll::ShflDown || k == Coll::ShflXor ||
                        k == Coll::MatchAny;
  for (unsigned m = mask; m; m &= m - 1) {
    Fiber& g = F[std::countr_zero(m)];
    if (!per_lane) g.result = common;
    g.state = FState::Runnable;
  }
  w.waiting &= ~mask;
  w.ready |= mask;
  c.runnable += static_cast<unsigned>(std::popcount(mask));
}

inline uint64_t warp_collective(Coll k, unsigned mask, uint64_t val, unsigned vsize, int arg, int width, const Loc& loc,
                                int* result2 = nullptr) {
  Fiber& f = *cur(coll_name(k));
  Ctx& c = *f.ctx;
  WarpState& w = c.warps[f.warp];
  const unsigned me = 1u << f.lane;
  f.coll = k;
  f.mask = mask;
  f.val = val;
  f.vsize = static_cast<uint8_t>(vsize);
  f.arg = arg;
  f.width = width;
  f.loc = loc;
  if (!(mask & me))
    raise(fmt("%s %s(mask 0x%08x) at %s: the mask must include the calling lane", thread_str(f).c_str(),
              coll_name(k), mask, where(loc).c_str()));
  if (width < 1 || width > 32 || (width & (width - 1)))
    raise(fmt("%s %s at %s: width %d is not a power of two in [1, 32]", thread_str(f).c_str(), coll_name(k),
              where(loc).c_str(), width));
  if (mask & ~w.exists)
    raise(fmt("%s %s(mask 0x%08x) at %s: the mask names lane %d of warp %u, which does not exist "
              "(the block has %u threads)",
              thread_str(f).c_str(), coll_name(k), mask, where(loc).c_str(), std::countr_zero(mask & ~w.exists), f.warp,
              c.nthreads));
  if (mask & w.exited) {
    const int l = std::countr_zero(mask & w.exited);
    raise(fmt("%s %s(mask 0x%08x) at %s: the mask names lane %d of warp %u, which has exited", thread_str(f).c_str(),
              coll_name(k), mask, where(loc).c_str(), l, f.warp));
  }
  f.state = FState::Warp;
  w.waiting |= me;
  w.ready &= ~me;
  --c.runnable;
  if ((w.waiting & mask) == mask) {
    Fiber* F = c.fibers.data() + static_cast<size_t>(f.warp) * 32;
    bool match = true;
    for (unsigned m = mask & ~me; m; m &= m - 1) {
      const Fiber& g = F[std::countr_zero(m)];
      if (!same_coll(g, f)) {
        if (g.mask & me) raise_mismatch(f, g);
        match = false;  // g first waits for lanes outside this mask
        break;
      }
    }
    if (match) complete_warp(c, w, F, mask, f);
  }
  yield(c, f);
  if (result2) *result2 = f.result2;
  return f.result;
}

inline void fiber_exit(Ctx& c, Fiber& f) {
  WarpState& w = c.warps[f.warp];
  const unsigned me = 1u << f.lane;
  f.state = FState::Exited;
  --c.live;
  --c.runnable;
  w.exited |= me;
  w.ready &= ~me;
  if (w.waiting) {
    const Fiber* F = c.fibers.data() + static_cast<size_t>(f.warp) * 32;
    for (unsigned m = w.waiting; m; m &= m - 1) {
      const Fiber& g = F[std::countr_zero(m)];
      if (g.mask & me)
        raise(fmt("lane %u of warp %u exited while lane %u %s: the mask names the exited lane %u", f.lane, f.warp,
                  g.lane, wait_str(g).c_str(), f.lane));
    }
  }
  if (!c.strict && c.bar_arrived && c.bar_arrived == c.live) complete_barrier(c);
}

// No fiber can run but some have not exited: explain and fail.
[[noreturn]] inline void stall(Ctx& c) {
  Fiber* F = c.fibers.data();
  // Lanes that wait for each other in different collectives.
  for (size_t wi = 0; wi < c.warps.size(); ++wi) {
    const WarpState& w = c.warps[wi];
    for (unsigned m = w.waiting; m; m &= m - 1) {
      const Fiber& a = F[wi * 32 + std::countr_zero(m)];
      for (unsigned m2 = a.mask & w.waiting & ~(1u << a.lane); m2; m2 &= m2 - 1) {
        const Fiber& b = F[wi * 32 + std::countr_zero(m2)];
        if ((b.mask >> a.lane & 1u) && !same_coll(a, b)) raise_mismatch(a, b);
      }
    }
  }
  unsigned at_barrier = 0, exited = 0;
  const Fiber* first_bar = nullptr;
  const Fiber* first_exit = nullptr;
  for (unsigned t = 0; t < c.nthreads; ++t) {
    if (F[t].state == FState::Barrier) {
      ++at_barrier;
      if (!first_bar) first_bar = &F[t];
    } else if (F[t].state == FState::Exited) {
      ++exited;
      if (!first_exit) first_exit = &F[t];
    }
  }
  if (at_barrier == c.live && first_exit) {
    raise(fmt("strict mode (CALM_FAST_EMU_STRICT=1): %s() at %s can never complete: %u of the block's %u threads "
              "exited without reaching it (first: %s); a __syncthreads in divergent code or after an early return",
              bar_name(first_bar->bar), where(first_bar->loc).c_str(), exited, c.nthreads,
              thread_str(*first_exit).c_str()));
  }
  std::string msg = fmt("deadlock: none of the %u live threads can proceed.", c.live);
  if (at_barrier)
    msg += fmt(" %u threads wait in a block barrier (first: %s %s).", at_barrier, thread_str(*first_bar).c_str(),
               wait_str(*first_bar).c_str());
  int shown = 0;
  for (size_t wi = 0; wi < c.warps.size() && shown < 4; ++wi) {
    const WarpState& w = c.warps[wi];
    if (!w.waiting) continue;
    const Fiber& a = F[wi * 32 + std::countr_zero(w.waiting)];
    const unsigned missing = a.mask & ~w.waiting;
    msg += fmt(" Warp %zu: lanes {%s} wait in %s(mask 0x%08x) at %s", wi, lanes_str(w.waiting).c_str(),
               coll_name(a.coll), a.mask, where(a.loc).c_str());
    if (missing) {
      const Fiber& b = F[wi * 32 + std::countr_zero(missing)];
      msg += fmt(" for lanes {%s}; lane %u %s.", lanes_str(missing).c_str(), b.lane, wait_str(b).c_str());
    } else {
      msg += ".";
    }
    ++shown;
  }
  if (exited) msg += fmt(" %u threads have exited.", exited);
  raise(msg);
}

// ---------------------------------------------------------------------------------------------------
// Launch
// ---------------------------------------------------------------------------------------------------
// The scheduler.  Warp-major: the runnable lanes of one warp are resumed round after round (a round
// visits the lanes that were runnable when it began) until the warp has none left - all wait at a
// block barrier, in a collective that needs other warps' progress, or exited - then the next warp;
// a pass visits every warp.  This keeps the working set (32 fiber stacks) in the L1 cache.
//   inorder: lanes ascending, warps ascending.   reverse: both descending.
//   permute: lanes in a fresh random order every round, warps in a fresh random order every pass, and
//            after each round the warp is left early with probability 1/4, so warps also interleave
//            between collectives.
// Returns null when nothing is runnable (the block finished, or it is stuck).
inline Fiber* pick_next(Ctx& c) {
  if (c.runnable == 0) return nullptr;
  const Order mode = c.order_mode;
  const unsigned nw = static_cast<unsigned>(c.warps.size());
  for (;;) {
    if (c.cur_warp >= 0) {
      WarpState& w = c.warps[static_cast<size_t>(c.cur_warp)];
      Fiber* W = c.fibers.data() + static_cast<size_t>(c.cur_warp) * 32;
      while (c.round_left) {
        unsigned lane;
        if (mode == Order::InOrder) {
          lane = static_cast<unsigned>(std::countr_zero(c.round_left));
        } else if (mode == Order::Reverse) {
          lane = 31u - static_cast<unsigned>(std::countl_zero(c.round_left));
        } else {
          lane = c.lane_perm[c.perm_pos++ & 31u];
          if (!((c.round_left >> lane) & 1u)) continue;
        }
        c.round_left &= ~(1u << lane);
        if ((w.ready >> lane) & 1u) return &W[lane];
      }
      if (w.ready && !(mode == Order::Permute && rand_below(c.rng, 4) == 0)) {
        c.round_left = w.ready;  // another round of the same warp
        if (mode == Order::Permute) {
          for (unsigned i = 31; i > 0; --i) std::swap(c.lane_perm[i], c.lane_perm[rand_below(c.rng, i + 1)]);
          c.perm_pos = 0;
        }
        continue;
      }
    }
    if (++c.cur_k >= nw) {  // a new pass
      c.cur_k = 0;
      if (mode == Order::Permute)
        for (unsigned i = nw - 1; i > 0; --i) std::swap(c.order[i], c.order[rand_below(c.rng, i + 1)]);
    }
    c.cur_warp = static_cast<int>(c.order[c.cur_k]);
    c.round_left = c.warps[static_cast<size_t>(c.cur_warp)].ready;
    if (mode == Order::Permute) {
      for (unsigned i = 31; i > 0; --i) std::swap(c.lane_perm[i], c.lane_perm[rand_below(c.rng, i + 1)]);
      c.perm_pos = 0;
    }
  }
}

inline void run_block(Ctx& c) {
  const unsigned n = c.nthreads;
  Fiber* F = c.fibers.data();
  for (unsigned t = 0; t < n; ++t) fiber_reset(c, F[t], t);
  for (size_t wi = 0; wi < c.warps.size(); ++wi) {
    const unsigned lanes = std::min(32u, n - static_cast<unsigned>(wi) * 32u);
    const unsigned exists = lanes == 32 ? ~0u : ((1u << lanes) - 1u);
    c.warps[wi] = WarpState{exists, 0u, 0u, exists};
  }
  c.live = c.runnable = n;
  c.bar_arrived = 0;
  if (c.dsmem) std::memset(c.dsmem, 0xFF, c.dsmem_bytes);  // poison: NaN floats, -1 integers
  const Order mode = c.order_mode;
  if (mode == Order::Permute) {
    const uint64_t b = c.block_idx.x + 0x10001ull * c.block_idx.y + 0x100000001ull * c.block_idx.z;
    c.rng = c.seed ^ (b * 0xD1B54A32D192ED03ull);
  }
  c.cur_k = static_cast<unsigned>(c.warps.size());  // the first pick starts a new pass
  c.cur_warp = -1;
  c.round_left = 0;
  while (c.live) {
    if (c.runnable == 0) stall(c);
    resume(c, *pick_next(c));
    if (c.failed) [[unlikely]] {
      c.failed = false;
      throw EmuError(std::move(c.error));
    }
  }
}

inline bool env_flag(const char* name) {
  const char* s = std::getenv(name);
  return s && *s && std::strcmp(s, "0") != 0 && std::strcmp(s, "false") != 0 && std::strcmp(s, "no") != 0;
}

inline uint64_t fnv1a(const char* s) {
  uint64_t h = 1469598103934665603ull;
  for (; *s; ++s) h = (h ^ static_cast<unsigned char>(*s)) * 1099511628211ull;
  return h;
}

inline size_t env_size(const char* name, size_t dflt) {
  const char* s = std::getenv(name);
  if (!s || !*s) return dflt;
  char* end = nullptr;
  const unsigned long long v = std::strtoull(s, &end, 10);
  return (end && *end == '\0') ? static_cast<size_t>(v) : dflt;
}

inline constexpr size_t kDefaultDynSmem = 48 * 1024;

struct SmemRegistry {
  std::mutex mu;
  std::map<const void*, size_t> max_bytes;
};
inline SmemRegistry& smem_registry() {
  static SmemRegistry r;
  return r;
}

inline void set_max_dynamic_smem(const void* kernel, const char* name, long long bytes) {
  const size_t cap = env_size("CALM_FAST_EMU_SMEM_OPTIN_MAX", 166912);
  if (bytes < 0 || static_cast<unsigned long long>(bytes) > cap)
    throw EmuError(fmt("calm_fast CUDA emulator: CF_SET_MAX_DYNAMIC_SMEM(%s, %lld): invalid value, the device "
                       "allows at most %zu bytes of dynamic shared memory per block (CUDA: invalid argument)",
                       name, bytes, cap));
  SmemRegistry& r = smem_registry();
  std::lock_guard<std::mutex> lock(r.mu);
  r.max_bytes[kernel] = static_cast<size_t>(bytes);
}

inline size_t max_dynamic_smem(const void* kernel) {
  SmemRegistry& r = smem_registry();
  std::lock_guard<std::mutex> lock(r.mu);
  auto it = r.max_bytes.find(kernel);
  return it == r.max_bytes.end() ? kDefaultDynSmem : it->second;
}

struct LaunchScope {
  Ctx& c;
  explicit LaunchScope(Ctx& cc) : c(cc) { c.in_launch = true; }
  ~LaunchScope() {
    c.in_launch = false;
    c.failed = false;
    tls_fiber = nullptr;
  }
};

inline void run_launch(Ctx& c, const void* kernel_id, const char* name, const char* file, int line, dim3 grid,
                       dim3 block, size_t smem, void (*invoke)(void*), void* arg) {
  auto cfg_error = [&](const std::string& what) {
    throw EmuError(fmt("calm_fast CUDA emulator: launch of '%s' at %s:%d with grid (%u,%u,%u), block (%u,%u,%u), "
                       "%zu bytes dynamic shared memory: %s",
                       name, file, line, grid.x, grid.y, grid.z, block.x, block.y, block.z, smem, what.c_str()));
  };
  if (tls_fiber || c.in_launch) cfg_error("kernel launch from inside a kernel (dynamic parallelism) is not emulated");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || block.x == 0 || block.y == 0 || block.z == 0)
    cfg_error("invalid configuration argument (a zero grid or block dimension)");
  if (grid.x > 0x7FFFFFFFu || grid.y > 65535u || grid.z > 65535u)
    cfg_error("invalid configuration argument (grid dimension too large)");
  if (block.x > 1024u || block.y > 1024u || block.z > 64u ||
      static_cast<uint64_t>(block.x) * block.y * block.z > 1024u)
    cfg_error("invalid configuration argument (more than 1024 threads per block or a block dimension too large)");
  if (smem > kDefaultDynSmem) {
    const size_t allowed = max_dynamic_smem(kernel_id);
    if (smem > allowed)
      cfg_error(fmt("too much dynamic shared memory: the kernel may use %zu bytes; above 48 KiB call "
                    "CF_SET_MAX_DYNAMIC_SMEM(kernel, bytes) first (CUDA: invalid argument)",
                    allowed));
  }
  LaunchScope scope(c);
  c.kernel_name = name;
  c.launch_file = file;
  c.launch_line = line;
  c.grid = grid;
  c.block = block;
  c.block_idx = uint3{0, 0, 0};
  c.nthreads = block.x * block.y * block.z;
  c.strict = env_flag("CALM_FAST_EMU_STRICT");
  const char* eh = std::getenv("CALM_FAST_EMU_ON_ERROR");
  c.throw_mode = eh && std::strcmp(eh, "throw") == 0;
  c.order_mode = Order::InOrder;
  c.seed = 0x5EEDull;
  if (const char* o = std::getenv("CALM_FAST_EMU_ORDER")) {
    if (std::strncmp(o, "permute", 7) == 0) {
      c.order_mode = Order::Permute;
      if (o[7] == ':') c.seed = std::strtoull(o + 8, nullptr, 10);
    } else if (std::strcmp(o, "reverse") == 0) {
      c.order_mode = Order::Reverse;
    } else if (*o && std::strcmp(o, "inorder") != 0 && std::strcmp(o, "in-order") != 0) {
      cfg_error(fmt("CALM_FAST_EMU_ORDER=%s: expected inorder, reverse, permute or permute:SEED", o));
    }
  }
  c.seed = c.seed * 0x9E3779B97F4A7C15ull ^ fnv1a(name);
  c.invoke = invoke;
  c.invoke_arg = arg;
  c.failed = false;
  ensure_fibers(c, c.nthreads);
  c.warps.assign((c.nthreads + 31) / 32, WarpState{});
  const unsigned nw = (c.nthreads + 31) / 32;
  c.order.resize(nw);
  for (unsigned i = 0; i < nw; ++i) c.order[i] = c.order_mode == Order::Reverse ? nw - 1 - i : i;
  for (unsigned i = 0; i < 32; ++i) c.lane_perm[i] = i;
  for (unsigned t = 0; t < c.nthreads; ++t) {
    Fiber& f = c.fibers[t];
    f.linear = t;
    f.tid = uint3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
    f.warp = t / 32;
    f.lane = t % 32;
  }
  if (smem) {
    if (c.dsmem_store.size() < smem + 128) c.dsmem_store.resize(smem + 128);
    const uintptr_t p = reinterpret_cast<uintptr_t>(c.dsmem_store.data());
    c.dsmem = reinterpret_cast<unsigned char*>((p + 127) & ~static_cast<uintptr_t>(127));
  } else {
    c.dsmem = nullptr;  // a kernel that uses dynamic shared memory it did not ask for faults
  }
  c.dsmem_bytes = smem;

  const uint64_t G = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  // Permuted orders visit the blocks in a pseudo-random affine order b = (a*i + s) mod G, gcd(a, G) = 1.
  uint64_t a = 1, s = 0;
  if (c.order_mode != Order::InOrder && G > 1) {
    uint64_t r = c.seed ^ 0xB10Cull;
    if (c.order_mode == Order::Permute) {
      a = 1 + rand_below(r, G - 1);
      while (std::gcd(a, G) != 1) a = a % (G - 1) + 1;
      s = rand_below(r, G);
    } else {
      a = G - 1;  // reverse
      s = G - 1;
    }
  }
  for (uint64_t i = 0; i < G; ++i) {
    const uint64_t b =
        static_cast<uint64_t>((static_cast<unsigned __int128>(a) * i + s) % static_cast<unsigned __int128>(G));
    c.block_idx = uint3{static_cast<unsigned>(b % grid.x), static_cast<unsigned>((b / grid.x) % grid.y),
                        static_cast<unsigned>(b / (static_cast<uint64_t>(grid.x) * grid.y))};
    run_block(c);
  }
}

template <class Pack>
void invoke_pack(void* p) {
  Pack& pk = *static_cast<Pack*>(p);
  std::apply(pk.kernel, pk.args);  // each CUDA thread gets its own copy of the by-value parameters
}

template <class... P>
struct Pack {
  void (*kernel)(P...);
  std::tuple<std::decay_t<P>...> args;
};

template <class... P, class... A>
void launch(const char* name, const char* file, int line, void (*kernel)(P...), dim3 grid, dim3 block, size_t smem,
            cf_stream_t /*stream*/, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "CF_LAUNCH: wrong number of kernel arguments");
  Pack<P...> pk{kernel, std::tuple<std::decay_t<P>...>(std::forward<A>(args)...)};
  run_launch(ctx(), reinterpret_cast<const void*>(kernel), name, file, line, grid, block, smem,
             &invoke_pack<Pack<P...>>, &pk);
}

template <class... P>
void set_max_dynamic_smem_for(void (*kernel)(P...), const char* name, long long bytes) {
  set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), name, bytes);
}

template <class T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8);
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}

template <class T>
T from_bits(uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}

template <class T>
T shfl(Coll k, unsigned mask, T v, int arg, int width, const Loc& loc) {
  return from_bits<T>(warp_collective(k, mask, to_bits(v), sizeof(T), arg, width, loc));
}

inline int env_num_sms() {
  const size_t v = env_size("CALM_FAST_EMU_SMS", 4);
  return v >= 1 && v <= 4096 ? static_cast<int>(v) : 4;
}

inline void* dynamic_smem() { return cur("CF_DYNAMIC_SHARED")->ctx->dsmem; }

}  // namespace detail
}  // namespace cf_emu

// =====================================================================================================
// Built-in variables
// =====================================================================================================
#define threadIdx (static_cast<const ::uint3&>(::cf_emu::detail::cur("threadIdx")->tid))
#define blockIdx (static_cast<const ::uint3&>(::cf_emu::detail::cur("blockIdx")->ctx->block_idx))
#define blockDim (static_cast<const ::dim3&>(::cf_emu::detail::cur("blockDim")->ctx->block))
#define gridDim (static_cast<const ::dim3&>(::cf_emu::detail::cur("gridDim")->ctx->grid))

// =====================================================================================================
// Host API used by the .cu files (mirrors the nvcc branch of cuda_compat.cuh)
// =====================================================================================================
inline cf_stream_t cf_current_stream(int /*device*/) { return nullptr; }
inline int cf_num_sms(int /*device*/) { return ::cf_emu::detail::env_num_sms(); }

#define CF_DYNAMIC_SHARED(type, name) type* const name = static_cast<type*>(::cf_emu::detail::dynamic_smem())

#define CF_LAUNCH(kernel, grid, block, smem, stream, ...)                                                 \
  ::cf_emu::detail::launch(#kernel, __FILE__, __LINE__, kernel, (grid), (block), static_cast<size_t>(smem), \
                           (stream)__VA_OPT__(, ) __VA_ARGS__)

#define CF_SET_MAX_DYNAMIC_SMEM(kernel, bytes) \
  ::cf_emu::detail::set_max_dynamic_smem_for(kernel, #kernel, static_cast<long long>(bytes))

#define CF_DEVICE_GUARD(device_index) \
  [[maybe_unused]] const int cf_device_guard_ = static_cast<int>(device_index)

#define CF_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(calm_fast_emu, CPU, m)

// =====================================================================================================
// Synchronisation
// =====================================================================================================
inline void __syncthreads(const std::source_location loc = std::source_location::current()) {
  ::cf_emu::detail::block_barrier(::cf_emu::detail::Bar::Sync, 0, loc);
}
inline int __syncthreads_count(int pred, const std::source_location loc = std::source_location::current()) {
  return ::cf_emu::detail::block_barrier(::cf_emu::detail::Bar::Count, pred, loc);
}
inline int __syncthreads_and(int pred, const std::source_location loc = std::source_location::current()) {
  return ::cf_emu::detail::block_barrier(::cf_emu::detail::Bar::And, pred, loc);
}
inline int __syncthreads_or(int pred, const std::source_location loc = std::source_location::current()) {
  return ::cf_emu::detail::block_barrier(::cf_emu::detail::Bar::Or, pred, loc);
}

inline void __syncwarp(unsigned mask = 0xFFFFFFFFu, const std::source_location loc = std::source_location::current()) {
  ::cf_emu::detail::warp_collective(::cf_emu::detail::Coll::SyncWarp, mask, 0, 4, 0, 32, loc);
}

// The lanes of the calling warp that have not exited (and exist).  Real hardware returns the lanes that
// are converged at this instruction; without a notion of convergence the emulator answers the largest
// set a correct program may then use as a mask.
inline unsigned __activemask() {
  const ::cf_emu::detail::Fiber& f = *::cf_emu::detail::cur("__activemask");
  const ::cf_emu::detail::WarpState& w = f.ctx->warps[f.warp];
  return w.exists & ~w.exited;
}

inline unsigned __ballot_sync(unsigned mask, int pred, const std::source_location loc = std::source_location::current()) {
  return static_cast<unsigned>(
      ::cf_emu::detail::warp_collective(::cf_emu::detail::Coll::Ballot, mask, pred != 0, 4, 0, 32, loc));
}
inline int __any_sync(unsigned mask, int pred, const std::source_location loc = std::source_location::current()) {
  return static_cast<int>(
      ::cf_emu::detail::warp_collective(::cf_emu::detail::Coll::Any, mask, pred != 0, 4, 0, 32, loc));
}
inline int __all_sync(unsigned mask, int pred, const std::source_location loc = std::source_location::current()) {
  return static_cast<int>(
      ::cf_emu::detail::warp_collective(::cf_emu::detail::Coll::All, mask, pred != 0, 4, 0, 32, loc));
}

#define CF_EMU_SHFL(T)                                                                                          \
  inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32,                                     \
                       const std::source_location loc = std::source_location::current()) {                     \
    return ::cf_emu::detail::shfl<T>(::cf_emu::detail::Coll::ShflIdx, mask, var, src_lane, width, loc);          \
  }                                                                                                             \
  inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32,                                \
                          const std::source_location loc = std::source_location::current()) {                  \
    return ::cf_emu::detail::shfl<T>(::cf_emu::detail::Coll::ShflUp, mask, var, static_cast<int>(delta), width, \
                                     loc);                                                                      \
  }                                                                                                             \
  inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32,                              \
                            const std::source_location loc = std::source_location::current()) {                \
    return ::cf_emu::detail::shfl<T>(::cf_emu::detail::Coll::ShflDown, mask, var, static_cast<int>(delta),     \
                                     width, loc);                                                               \
  }                                                                                                             \
  inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32,                                \
                           const std::source_location loc = std::source_location::current()) {                 \
    return ::cf_emu::detail::shfl<T>(::cf_emu::detail::Coll::ShflXor, mask, var, lane_mask, width, loc);         \
  }                                                                                                             \
  inline unsigned __match_any_sync(unsigned mask, T value,                                                     \
                                   const std::source_location loc = std::source_location::current()) {         \
    return static_cast<unsigned>(::cf_emu::detail::warp_collective(                                            \
        ::cf_emu::detail::Coll::MatchAny, mask, ::cf_emu::detail::to_bits(value), sizeof(T), 0, 32, loc));       \
  }                                                                                                             \
  inline unsigned __match_all_sync(unsigned mask, T value, int* pred,                                          \
                                   const std::source_location loc = std::source_location::current()) {         \
    return static_cast<unsigned>(::cf_emu::detail::warp_collective(::cf_emu::detail::Coll::MatchAll, mask,     \
                                                                   ::cf_emu::detail::to_bits(value), sizeof(T), \
                                                                   0, 32, loc, pred));                          \
  }
CF_EMU_SHFL(int)
CF_EMU_SHFL(unsigned int)
CF_EMU_SHFL(long)
CF_EMU_SHFL(unsigned long)
CF_EMU_SHFL(long long)
CF_EMU_SHFL(unsigned long long)
CF_EMU_SHFL(float)
CF_EMU_SHFL(double)
#undef CF_EMU_SHFL

#define CF_EMU_REDUCE(name, T, kind)                                                                       \
  inline T name(unsigned mask, T value, const std::source_location loc = std::source_location::current()) { \
    return static_cast<T>(static_cast<uint32_t>(::cf_emu::detail::warp_collective(                          \
        ::cf_emu::detail::Coll::kind, mask, static_cast<uint32_t>(value), 4, 0, 32, loc)));                 \
  }
CF_EMU_REDUCE(__reduce_add_sync, unsigned, ReduceAddU)
CF_EMU_REDUCE(__reduce_add_sync, int, ReduceAddI)
CF_EMU_REDUCE(__reduce_min_sync, unsigned, ReduceMinU)
CF_EMU_REDUCE(__reduce_min_sync, int, ReduceMinI)
CF_EMU_REDUCE(__reduce_max_sync, unsigned, ReduceMaxU)
CF_EMU_REDUCE(__reduce_max_sync, int, ReduceMaxI)
CF_EMU_REDUCE(__reduce_and_sync, unsigned, ReduceAnd)
CF_EMU_REDUCE(__reduce_or_sync, unsigned, ReduceOr)
CF_EMU_REDUCE(__reduce_xor_sync, unsigned, ReduceXor)
#undef CF_EMU_REDUCE

// Memory fences: the emulator is sequentially consistent within a launch; these are real fences for
// host threads that might share memory with it.
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_signal_fence(std::memory_order_seq_cst); }
inline void __threadfence_system() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __nanosleep(unsigned /*ns*/) {}
[[noreturn]] inline void __trap() {
  const ::cf_emu::detail::Fiber& f = *::cf_emu::detail::cur("__trap");
  ::cf_emu::detail::raise(::cf_emu::detail::thread_str(f) + " called __trap()");
}
inline long long clock64() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// =====================================================================================================
// Atomics (return the old value).  Exactly CUDA's overload set; they work on global and shared memory
// alike and are real host atomics (std::atomic_ref), although blocks of one launch run one at a time.
// =====================================================================================================
namespace cf_emu::detail {
template <class T>
inline std::atomic_ref<T> aref(T* p) {
  return std::atomic_ref<T>(*p);
}
template <class T, class F>
inline T atomic_update(T* p, F f) {
  std::atomic_ref<T> a(*p);
  T old = a.load(std::memory_order_relaxed);
  while (!a.compare_exchange_weak(old, f(old), std::memory_order_relaxed)) {
  }
  return old;
}
}  // namespace cf_emu::detail

#define CF_EMU_ATOMIC_FETCH(name, T, op) \
  inline T name(T* address, T val) { return ::cf_emu::detail::aref(address).op(val, std::memory_order_relaxed); }
CF_EMU_ATOMIC_FETCH(atomicAdd, int, fetch_add)
CF_EMU_ATOMIC_FETCH(atomicAdd, unsigned int, fetch_add)
CF_EMU_ATOMIC_FETCH(atomicAdd, unsigned long long, fetch_add)
CF_EMU_ATOMIC_FETCH(atomicAdd, float, fetch_add)
CF_EMU_ATOMIC_FETCH(atomicAdd, double, fetch_add)
CF_EMU_ATOMIC_FETCH(atomicSub, int, fetch_sub)
CF_EMU_ATOMIC_FETCH(atomicSub, unsigned int, fetch_sub)
CF_EMU_ATOMIC_FETCH(atomicAnd, int, fetch_and)
CF_EMU_ATOMIC_FETCH(atomicAnd, unsigned int, fetch_and)
CF_EMU_ATOMIC_FETCH(atomicAnd, unsigned long long, fetch_and)
CF_EMU_ATOMIC_FETCH(atomicOr, int, fetch_or)
CF_EMU_ATOMIC_FETCH(atomicOr, unsigned int, fetch_or)
CF_EMU_ATOMIC_FETCH(atomicOr, unsigned long long, fetch_or)
CF_EMU_ATOMIC_FETCH(atomicXor, int, fetch_xor)
CF_EMU_ATOMIC_FETCH(atomicXor, unsigned int, fetch_xor)
CF_EMU_ATOMIC_FETCH(atomicXor, unsigned long long, fetch_xor)
CF_EMU_ATOMIC_FETCH(atomicExch, int, exchange)
CF_EMU_ATOMIC_FETCH(atomicExch, unsigned int, exchange)
CF_EMU_ATOMIC_FETCH(atomicExch, unsigned long long, exchange)
CF_EMU_ATOMIC_FETCH(atomicExch, float, exchange)
#undef CF_EMU_ATOMIC_FETCH

#define CF_EMU_ATOMIC_MINMAX(T)                                                                       \
  inline T atomicMin(T* address, T val) {                                                             \
    return ::cf_emu::detail::atomic_update(address, [val](T o) { return val < o ? val : o; });        \
  }                                                                                                   \
  inline T atomicMax(T* address, T val) {                                                             \
    return ::cf_emu::detail::atomic_update(address, [val](T o) { return val > o ? val : o; });        \
  }
CF_EMU_ATOMIC_MINMAX(int)
CF_EMU_ATOMIC_MINMAX(unsigned int)
CF_EMU_ATOMIC_MINMAX(long long)
CF_EMU_ATOMIC_MINMAX(unsigned long long)
#undef CF_EMU_ATOMIC_MINMAX

#define CF_EMU_ATOMIC_CAS(T)                                                                 \
  inline T atomicCAS(T* address, T compare, T val) {                                         \
    ::cf_emu::detail::aref(address).compare_exchange_strong(compare, val, std::memory_order_relaxed); \
    return compare;                                                                          \
  }
CF_EMU_ATOMIC_CAS(int)
CF_EMU_ATOMIC_CAS(unsigned int)
CF_EMU_ATOMIC_CAS(unsigned long long)
CF_EMU_ATOMIC_CAS(unsigned short)
#undef CF_EMU_ATOMIC_CAS

inline unsigned atomicInc(unsigned* address, unsigned val) {
  return ::cf_emu::detail::atomic_update(address, [val](unsigned o) { return o >= val ? 0u : o + 1u; });
}
inline unsigned atomicDec(unsigned* address, unsigned val) {
  return ::cf_emu::detail::atomic_update(address, [val](unsigned o) { return (o == 0u || o > val) ? val : o - 1u; });
}

// =====================================================================================================
// Bit and integer intrinsics
// =====================================================================================================
inline int __popc(unsigned x) { return std::popcount(x); }
inline int __popcll(unsigned long long x) { return std::popcount(x); }
inline int __clz(int x) { return std::countl_zero(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return std::countl_zero(static_cast<unsigned long long>(x)); }
inline int __ffs(int x) { return x == 0 ? 0 : std::countr_zero(static_cast<unsigned>(x)) + 1; }
inline int __ffsll(long long x) { return x == 0 ? 0 : std::countr_zero(static_cast<unsigned long long>(x)) + 1; }
inline unsigned __brev(unsigned x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0F0F0F0Fu) | ((x & 0x0F0F0F0Fu) << 4);
  return __builtin_bswap32(x);
}
inline unsigned long long __brevll(unsigned long long x) {
  return (static_cast<unsigned long long>(__brev(static_cast<unsigned>(x))) << 32) | __brev(static_cast<unsigned>(x >> 32));
}
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const unsigned long long v = (static_cast<unsigned long long>(y) << 32) | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= static_cast<unsigned>((v >> (8 * ((s >> (4 * i)) & 7u))) & 0xFFu) << (8 * i);
  return r;
}
inline unsigned __funnelshift_l(unsigned lo, unsigned hi, unsigned shift) {
  const unsigned long long v = (static_cast<unsigned long long>(hi) << 32) | lo;
  return static_cast<unsigned>((v << (shift & 31u)) >> 32);
}
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned shift) {
  const unsigned long long v = (static_cast<unsigned long long>(hi) << 32) | lo;
  return static_cast<unsigned>(v >> (shift & 31u));
}
inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<unsigned long long>(a) * b) >> 32);
}
inline int __mulhi(int a, int b) { return static_cast<int>((static_cast<long long>(a) * b) >> 32); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return static_cast<unsigned long long>((static_cast<unsigned __int128>(a) * b) >> 64);
}
inline long long __mul64hi(long long a, long long b) {
  return static_cast<long long>((static_cast<__int128>(a) * b) >> 64);
}

// =====================================================================================================
// Float intrinsics.  The fast-math ones (__expf, __fdividef, ...) are computed exactly here, so results
// can differ from hardware in the last bits; the _rn ones are exact IEEE operations on both.
// =====================================================================================================
inline unsigned __float_as_uint(float x) { return std::bit_cast<unsigned>(x); }
inline float __uint_as_float(unsigned x) { return std::bit_cast<float>(x); }
inline int __float_as_int(float x) { return std::bit_cast<int>(x); }
inline float __int_as_float(int x) { return std::bit_cast<float>(x); }
inline long long __double_as_longlong(double x) { return std::bit_cast<long long>(x); }
inline double __longlong_as_double(long long x) { return std::bit_cast<double>(x); }

inline float __fdividef(float a, float b) { return a / b; }
inline float __expf(float x) { return std::exp(x); }
inline float __exp10f(float x) { return std::pow(10.0f, x); }
inline float __logf(float x) { return std::log(x); }
inline float __log2f(float x) { return std::log2(x); }
inline float __log10f(float x) { return std::log10(x); }
inline float __powf(float a, float b) { return std::pow(a, b); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline float __tanf(float x) { return std::tan(x); }
inline float __saturatef(float x) { return x >= 1.0f ? 1.0f : (x > 0.0f ? x : 0.0f); }  // NaN -> 0
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }

namespace cf_emu::detail {
// CUDA's float->integer conversions saturate and map NaN to 0.
template <class I, class F>
inline I sat_cast(F r) {
  if (r != r) return I(0);
  if (r <= static_cast<F>(std::numeric_limits<I>::min())) return std::numeric_limits<I>::min();
  if (r >= static_cast<F>(std::numeric_limits<I>::max())) return std::numeric_limits<I>::max();
  return static_cast<I>(r);
}
}  // namespace cf_emu::detail
inline int __float2int_rn(float x) { return ::cf_emu::detail::sat_cast<int>(std::nearbyint(x)); }
inline int __float2int_rz(float x) { return ::cf_emu::detail::sat_cast<int>(std::trunc(x)); }
inline int __float2int_rd(float x) { return ::cf_emu::detail::sat_cast<int>(std::floor(x)); }
inline int __float2int_ru(float x) { return ::cf_emu::detail::sat_cast<int>(std::ceil(x)); }
inline unsigned __float2uint_rn(float x) { return ::cf_emu::detail::sat_cast<unsigned>(std::nearbyint(x)); }
inline unsigned __float2uint_rz(float x) { return ::cf_emu::detail::sat_cast<unsigned>(std::trunc(x)); }
inline long long __float2ll_rn(float x) { return ::cf_emu::detail::sat_cast<long long>(std::nearbyint(x)); }
inline long long __float2ll_rz(float x) { return ::cf_emu::detail::sat_cast<long long>(std::trunc(x)); }
inline int __double2int_rn(double x) { return ::cf_emu::detail::sat_cast<int>(std::nearbyint(x)); }
inline int __double2int_rz(double x) { return ::cf_emu::detail::sat_cast<int>(std::trunc(x)); }
inline long long __double2ll_rn(double x) { return ::cf_emu::detail::sat_cast<long long>(std::nearbyint(x)); }
inline float __double2float_rn(double x) { return static_cast<float>(x); }
inline float __int2float_rn(int x) { return static_cast<float>(x); }
inline float __uint2float_rn(unsigned x) { return static_cast<float>(x); }
inline float __ll2float_rn(long long x) { return static_cast<float>(x); }
inline float __ull2float_rn(unsigned long long x) { return static_cast<float>(x); }
inline double __int2double_rn(int x) { return static_cast<double>(x); }
inline double __ll2double_rn(long long x) { return static_cast<double>(x); }

// Read-only / cache-hinted loads and stores: plain memory accesses here.
template <class T>
inline T __ldg(const T* p) { return *p; }
template <class T>
inline T __ldcg(const T* p) { return *p; }
template <class T>
inline T __ldca(const T* p) { return *p; }
template <class T>
inline T __ldcs(const T* p) { return *p; }
template <class T>
inline T __ldlu(const T* p) { return *p; }
template <class T>
inline T __ldcv(const T* p) { return *p; }
template <class T>
inline void __stcg(T* p, T v) { *p = v; }
template <class T>
inline void __stcs(T* p, T v) { *p = v; }
template <class T>
inline void __stwb(T* p, T v) { *p = v; }
template <class T>
inline void __stwt(T* p, T v) { *p = v; }

// =====================================================================================================
// min / max as CUDA's device overloads (float and double with fminf/fmaxf NaN rules; mixed arithmetic
// types through their common type, e.g. min(int, unsigned) is the unsigned min, as in CUDA).
// =====================================================================================================
#define CF_EMU_MINMAX_INT(T)                                      \
  inline constexpr T min(T a, T b) { return b < a ? b : a; }     \
  inline constexpr T max(T a, T b) { return a < b ? b : a; }
CF_EMU_MINMAX_INT(int)
CF_EMU_MINMAX_INT(unsigned int)
CF_EMU_MINMAX_INT(long)
CF_EMU_MINMAX_INT(unsigned long)
CF_EMU_MINMAX_INT(long long)
CF_EMU_MINMAX_INT(unsigned long long)
#undef CF_EMU_MINMAX_INT
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }
template <class A, class B>
  requires(std::is_arithmetic_v<A> && std::is_arithmetic_v<B> && !std::is_same_v<A, B>)
inline std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  return ::min(static_cast<C>(a), static_cast<C>(b));
}
template <class A, class B>
  requires(std::is_arithmetic_v<A> && std::is_arithmetic_v<B> && !std::is_same_v<A, B>)
inline std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  return ::max(static_cast<C>(a), static_cast<C>(b));
}
inline unsigned umin(unsigned a, unsigned b) { return ::min(a, b); }
inline unsigned umax(unsigned a, unsigned b) { return ::max(a, b); }
inline long long llmin(long long a, long long b) { return ::min(a, b); }
inline long long llmax(long long a, long long b) { return ::max(a, b); }
inline unsigned long long ullmin(unsigned long long a, unsigned long long b) { return ::min(a, b); }
inline unsigned long long ullmax(unsigned long long a, unsigned long long b) { return ::max(a, b); }
