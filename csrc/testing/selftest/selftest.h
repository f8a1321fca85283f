// Shim for the emulator self-tests: plain g++ programs (no torch) that include the kernel headers the
// way a .cu file does under the emulator, plus a few checking helpers.
// Build: g++ -std=c++20 -O1 -I csrc -DCALM_FAST_EMULATE_CUDA csrc/testing/selftest/X.cpp
#pragma once

#ifndef CALM_FAST_EMULATE_CUDA
#define CALM_FAST_EMULATE_CUDA 1
#endif
#include "cuda/cuda_compat.cuh"
#include "cuda/block_ops.cuh"

#include <ctime>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

namespace selftest {

struct Failure {
  std::string what;
};

#define ST_CHECK(cond)                                                                               \
  do {                                                                                               \
    if (!(cond)) throw ::selftest::Failure{std::string(__FILE__ ":") + std::to_string(__LINE__) +   \
                                           ": check failed: " #cond};                               \
  } while (0)

#define ST_CHECK_EQ(a, b)                                                                            \
  do {                                                                                               \
    const auto st_a_ = (a);                                                                          \
    const auto st_b_ = (b);                                                                          \
    if (!(st_a_ == st_b_))                                                                           \
      throw ::selftest::Failure{std::string(__FILE__ ":") + std::to_string(__LINE__) + ": " #a " == " #b \
                                " failed: " + std::to_string(st_a_) + " vs " + std::to_string(st_b_)}; \
  } while (0)

struct Case {
  const char* name;
  std::function<void()> fn;
};

inline std::vector<Case>& registry() {
  static std::vector<Case> r;
  return r;
}

struct Register {
  Register(const char* name, std::function<void()> fn) { registry().push_back({name, std::move(fn)}); }
};

#define ST_CASE(name)                                            \
  static void st_case_##name();                                  \
  static ::selftest::Register st_reg_##name(#name, st_case_##name); \
  static void st_case_##name()

// Runs the cases named on the command line (all when none), printing "PASS name" / "FAIL name: why".
inline int run_main(int argc, char** argv) {
  int failed = 0, ran = 0;
  for (const Case& c : registry()) {
    bool selected = argc <= 1;
    for (int i = 1; i < argc; ++i) selected = selected || std::strcmp(argv[i], c.name) == 0;
    if (!selected) continue;
    ++ran;
    try {
      c.fn();
      std::printf("PASS %s\n", c.name);
    } catch (const Failure& f) {
      ++failed;
      std::printf("FAIL %s: %s\n", c.name, f.what.c_str());
    } catch (const std::exception& e) {
      ++failed;
      std::printf("FAIL %s: exception: %s\n", c.name, e.what());
    }
    std::fflush(stdout);
  }
  if (ran == 0) {
    std::printf("no such case\n");
    return 2;
  }
  return failed ? 1 : 0;
}

// CPU time of the calling thread: meaningful on a shared, loaded machine where wall time is not.
inline double thread_cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

}  // namespace selftest
