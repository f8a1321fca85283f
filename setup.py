"""Build script for calm_fast's C++/CUDA extension.

Modules built:
  calm_fast._C      CPU kernels always; CUDA kernels too when the installed torch has CUDA and nvcc is
                    found (no GPU needed to compile).  CALM_FAST_CUDA=0 forces CPU-only, =1 forces CUDA
                    (and fails if it cannot be built), unset/auto decides as above.
  calm_fast._C_emu  only when CALM_FAST_BUILD_EMU=1: every csrc/cuda/*.cu compiled by g++ against the
                    CUDA-on-CPU emulator (csrc/testing/), its ops registered as calm_fast_emu::* with the
                    CPU dispatch key.  The CUDA test-suite runs against it where no GPU exists.

Install with `pip install --no-build-isolation -e .` after torch (see README).
"""
import glob
import os
import shutil
import sys

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")


def _rel(pattern: str) -> list:
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def _want_cuda() -> bool:
    mode = os.environ.get("CALM_FAST_CUDA", "auto").strip().lower()
    have_nvcc = CUDA_HOME is not None and (
        shutil.which("nvcc") is not None or os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    )
    possible = torch.version.cuda is not None and have_nvcc
    if mode in ("0", "false", "no", "cpu"):
        return False
    if mode in ("1", "true", "yes", "cuda"):
        if not possible:
            raise RuntimeError(
                f"CALM_FAST_CUDA=1 but CUDA cannot be built: torch.version.cuda={torch.version.cuda!r}, "
                f"CUDA_HOME={CUDA_HOME!r}"
            )
        return True
    return possible


def _arch_list() -> None:
    # Without a visible GPU torch would guess; the default targets A100 (8.0) and H100 (9.0).
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        try:
            visible = torch.cuda.is_available()
        except Exception:  # pragma: no cover - broken driver
            visible = False
        if not visible:
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"


# The C++ standard flag comes from torch's BuildExtension (C++17 or C++20 by torch version); the code is
# written to compile under both.
# -ffp-contract=off / --fmad=false: no fused multiply-adds, so `base + scale * x` rounds exactly as the
#   reference (and the CPU and CUDA kernels agree bit for bit).
# -fno-trapping-math: lets GCC if-convert (and so vectorise) the branch-free select loops.
# CALM_FAST_MARCH (default "native": the extension is built on the machine that runs it) sets -march;
#   set it to "" for a portable build (e.g. a wheel built on one machine and used on another).
CXX_FLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off", "-Wno-unused-function"]
# at::parallel_for is a header template that only runs in parallel when the including TU is compiled
# with OpenMP (_OPENMP defined; torch is built with AT_PARALLEL_OPENMP).  Without -fopenmp every CPU
# kernel silently runs on one thread.  Linking with -fopenmp records libgomp.so.1, the soname of the
# libgomp torch itself loads (torch/lib/libgomp.so.1), so the process keeps one OpenMP runtime.
OPENMP_FLAGS = ["-fopenmp"] if sys.platform.startswith("linux") else []
CXX_FLAGS += OPENMP_FLAGS
_march = os.environ.get("CALM_FAST_MARCH", "native").strip()
if _march:
    CXX_FLAGS.append(f"-march={_march}")
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "--fmad=false"]

cpu_sources = _rel("csrc/registration.cpp") + _rel("csrc/cpu/*.cpp")
cuda_sources = _rel("csrc/cuda/*.cu")
include_dirs = [os.path.join(HERE, "csrc")]

use_cuda = _want_cuda() and bool(cuda_sources)
ext_modules = []
if use_cuda:
    _arch_list()
    ext_modules.append(
        CUDAExtension(
            "calm_fast._C",
            cpu_sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=[("CALM_FAST_WITH_CUDA", "1")],
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
            extra_link_args=OPENMP_FLAGS,
        )
    )
else:
    ext_modules.append(
        CppExtension(
            "calm_fast._C",
            cpu_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": CXX_FLAGS},
            extra_link_args=OPENMP_FLAGS,
        )
    )

if os.environ.get("CALM_FAST_BUILD_EMU", "0") == "1":
    ext_modules.append(
        CppExtension(
            "calm_fast._C_emu",
            _rel("csrc/testing/emu_module.cpp"),
            include_dirs=include_dirs,
            define_macros=[("CALM_FAST_EMULATE_CUDA", "1")],
            # C++20 for the emulator; -O1 keeps the (test-only) build quick.
            extra_compile_args={"cxx": ["-O1", "-std=c++20", "-ffp-contract=off", "-Wno-unused-function"]},
        )
    )

setup(
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
