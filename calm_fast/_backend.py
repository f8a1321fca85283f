"""Loading of the native extension, and the explicit opt-in pure-PyTorch fallback.

`import calm_fast` loads `calm_fast._C`, which registers the `torch.ops.calm_fast.*` ops.  If it cannot
be loaded, the import fails with the reason (most often: built against another torch than the one
imported).  Setting ``CALM_FAST_FALLBACK=reference`` instead runs every op through the pure-PyTorch
reference implementations (slow, for machines where the extension cannot be built); `backend()` tells
which one is active.
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

        _BACKEND = "native-cuda" if "cuda kernels: yes" in torch.ops.calm_fast.build_info() else "native-cpu"
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


def backend() -> str:
    """The active implementation: 'native-cuda' (CPU and CUDA kernels), 'native-cpu' or 'reference'."""
    return _load()


def build_info() -> str:
    """What the loaded extension was built with (torch version, CUDA kernels or not)."""
    if _load() == "reference":
        return "pure-PyTorch reference fallback (CALM_FAST_FALLBACK=reference)"
    return torch.ops.calm_fast.build_info()
