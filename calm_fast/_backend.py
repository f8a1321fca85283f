"""Loading of the native extension, and the explicit opt-in pure-PyTorch fallback.

`import calm_fast` loads `calm_fast._C`, which registers the `torch.ops.calm_fast.*` ops.  If it cannot
be loaded, the import fails with the reason (most often: built against another torch than the one
imported).  Setting ``CALM_FAST_FALLBACK=reference`` instead runs every op through the pure-PyTorch
reference implementations (slow, for machines where the extension cannot be built); `backend()` tells
what runs here, `cuda_kernels_built()` whether the extension holds CUDA kernels (a build fact) and
`cuda_available()` whether they can run (a GPU is visible).
"""
from __future__ import annotations

import os

import torch

_BACKEND = None
_LOAD_ERROR: BaseException | None = None


def _load() -> str:
    global _BACKEND, _LOAD_ERROR
    if _BACKEND is not None:
        return _BACKEND
    try:
        from . import _C  # noqa: F401  (registers the ops)

        _BACKEND = "native"
        return _BACKEND
    except ImportError as e:  # pragma: no cover - exercised only on broken installs
        _LOAD_ERROR = e
    if os.environ.get("CALM_FAST_FALLBACK", "").lower() == "reference":
        _BACKEND = "reference"
        return _BACKEND
    raise ImportError(
        "calm_fast: the native extension calm_fast._C could not be loaded "
        f"({_LOAD_ERROR}). The installed torch is {torch.__version__}; the extension must be built "
        "against this exact torch: reinstall with `pip install --no-build-isolation -e .`. "
        "To run on the slow pure-PyTorch reference instead, set CALM_FAST_FALLBACK=reference."
    ) from _LOAD_ERROR


def cuda_kernels_built() -> bool:
    """True when the loaded extension contains the CUDA kernels (it was compiled with nvcc).  Says
    nothing about this machine having a GPU: see :func:`cuda_available`."""
    return _load() == "native" and "cuda kernels: yes" in torch.ops.calm_fast.build_info()


def cuda_available() -> bool:
    """True when CUDA tensors run calm_fast's CUDA kernels here: the kernels were built
    (:func:`cuda_kernels_built`) and torch sees a CUDA device."""
    return cuda_kernels_built() and torch.cuda.is_available()


def backend() -> str:
    """What runs on this machine: 'native-cuda' (the C++ CPU kernels for CPU tensors and the CUDA kernels
    for CUDA tensors: they were built and a GPU is visible), 'native-cpu' (the C++ CPU kernels only: no
    CUDA kernels were built, or no GPU is visible; :func:`cuda_kernels_built` tells which), or 'reference'
    (the pure-PyTorch fallback, ``CALM_FAST_FALLBACK=reference``)."""
    if _load() == "reference":
        return "reference"
    return "native-cuda" if cuda_available() else "native-cpu"


def backend_info() -> dict:
    """Everything above at once: ``{"backend", "cuda_kernels_built", "cuda_available", "build_info"}``."""
    return {"backend": backend(), "cuda_kernels_built": cuda_kernels_built(), "cuda_available": cuda_available(),
            "build_info": build_info()}


def build_info() -> str:
    """What the loaded extension was built with (torch version, CPU vector cores, CUDA kernels or not)."""
    if _load() == "reference":
        return "pure-PyTorch reference fallback (CALM_FAST_FALLBACK=reference)"
    return torch.ops.calm_fast.build_info()
