"""calm_fast: fast, exact model merging with fused C++/CUDA kernels.

Quick start::

    import calm_fast
    merged = calm_fast.ties_merging(pretrained_sd, [ft1_sd, ft2_sd], density=0.2, merge="sum", scaling=0.3)

Methods: :func:`task_arithmetic`, :func:`ties_merging`, :func:`dare_merging`, :func:`consensus_merging`,
:func:`doge_ta` (semantics in their docstrings and in the README); :func:`calm` runs CALM on a network
through a model adapter (:mod:`calm_fast.models`), :func:`adamerging` learns AdaMerging's coefficients
(AdaMerging++ with ``mode="adamerging_pp"``) and :func:`doge_adamerging` runs DOGE + AdaMerging the same way.  ``calm_fast.ops`` holds the list-based fused ops
(CALM's mask-training ops among them; ``calm_fast.calm_ops`` their helpers), ``calm_fast.reference`` the
pure-PyTorch specification, ``calm_fast.backend()`` says what runs here (``native-cuda`` only where a GPU is visible),
``calm_fast.cuda_kernels_built()`` whether CUDA kernels were compiled, ``calm_fast.cuda_available()``
whether they can run; ``calm-fast bench`` prints the kernel benchmark report.
"""
from ._backend import backend, backend_info, build_info, cuda_available, cuda_kernels_built

backend()  # load the extension now: fail loudly at import, not at the first merge

from . import calm_ops, ops, reference, selection  # noqa: E402
from .ops import _register_fakes  # noqa: E402

_register_fakes()

from .methods import (AdaMergingResult, CalmResult, DogeAdaMergingResult, DogeResult, adamerging,  # noqa: E402
                      calm, consensus_merging, dare_merging, doge_adamerging, doge_ta, task_arithmetic, ties_merging)

__version__ = "0.1.0"

__all__ = ["backend", "backend_info", "build_info", "cuda_available", "cuda_kernels_built",
           "task_arithmetic", "ties_merging", "dare_merging", "consensus_merging",
           "calm", "CalmResult", "doge_ta", "DogeResult", "adamerging", "AdaMergingResult",
           "doge_adamerging", "DogeAdaMergingResult",
           "ops", "selection", "reference", "calm_ops", "__version__"]


def __getattr__(name):
    """Lazy access to the checkpoint layer (keeps `import calm_fast` light)."""
    if name == "merge_checkpoints":
        from .streaming import merge_checkpoints

        return merge_checkpoints
    if name in ("io", "streaming", "compat", "cli", "config", "bench"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'calm_fast' has no attribute {name!r}")
