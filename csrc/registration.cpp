// The one place where calm_fast's op schemas are defined (list in common/schemas.h).  Kernels register
// their implementations per dispatch key in csrc/cpu/*.cpp (CPU) and csrc/cuda/*.cu (CUDA).
#include <torch/library.h>

#include <string>

#if __has_include(<torch/headeronly/version.h>)
#include <torch/headeronly/version.h>
#elif __has_include(<torch/version.h>)
#include <torch/version.h>
#endif
#ifndef TORCH_VERSION
#define TORCH_VERSION "unknown"
#endif

#include "common/py_module.h"
#include "common/schemas.h"
#include "cpu/simd_avx2.h"

namespace calm_fast {

static std::string build_info() {
  std::string s = "calm_fast native ops; torch ";
  s += TORCH_VERSION;  // the torch this module was compiled against
#if defined(CALM_FAST_WITH_CUDA)
  s += "; cuda kernels: yes";
#else
  s += "; cuda kernels: no";
#endif
#if defined(CALM_FAST_HAVE_AVX2)
  s += "; cpu vector cores: avx2";
#else
  s += "; cpu vector cores: none (generic loops)";
#endif
  return s;
}

}  // namespace calm_fast

#define CALM_FAST_DEF(schema) m.def(schema);

TORCH_LIBRARY(calm_fast, m) { CALM_FAST_OP_SCHEMAS(CALM_FAST_DEF) }

TORCH_LIBRARY_IMPL(calm_fast, CompositeExplicitAutograd, m) { m.impl("build_info", &calm_fast::build_info); }

CALM_FAST_PY_MODULE(_C)
