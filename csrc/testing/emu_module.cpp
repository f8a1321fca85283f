// calm_fast._C_emu: every CUDA source of csrc/cuda compiled by g++ against the CUDA-on-CPU emulator
// (csrc/testing/cuda_emu.h, through cuda/cuda_compat.cuh with CALM_FAST_EMULATE_CUDA), registered as
// torch.ops.calm_fast_emu.* with the CPU dispatch key and exactly the schemas of torch.ops.calm_fast.*.
// Built only for the tests (setup.py, CALM_FAST_BUILD_EMU=1); tests/test_cuda_ops.py compares these ops
// bit for bit with the CPU ops where no GPU is available.
#if !defined(CALM_FAST_EMULATE_CUDA)
#error "emu_module.cpp is compiled with -DCALM_FAST_EMULATE_CUDA (see setup.py)"
#endif

#include <torch/library.h>

#include <string>

#include "common/py_module.h"
#include "common/schemas.h"

namespace calm_fast {
namespace emu {
static std::string build_info() { return "calm_fast emulated CUDA ops (csrc/cuda compiled with the CPU emulator)"; }
}  // namespace emu
}  // namespace calm_fast

#define CALM_FAST_EMU_DEF(schema) m.def(schema);

TORCH_LIBRARY(calm_fast_emu, m) { CALM_FAST_OP_SCHEMAS(CALM_FAST_EMU_DEF) }

TORCH_LIBRARY_IMPL(calm_fast_emu, CompositeExplicitAutograd, m) {
  m.impl("build_info", &calm_fast::emu::build_info);
}

// Each ends with CF_CUDA_LIBRARY_IMPL(m), i.e. TORCH_LIBRARY_IMPL(calm_fast_emu, CPU, m) here.
#include "cuda/selection.cu"
#include "cuda/merge.cu"
#include "cuda/calm.cu"
#include "cuda/doge.cu"
#include "cuda/coef_grad.cu"

CALM_FAST_PY_MODULE(_C_emu)
