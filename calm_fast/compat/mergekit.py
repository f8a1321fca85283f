"""Drop-in replacement for ``mergekit.sparsify`` (scripts that call mergekit's functions directly).

Change one import::

    # from mergekit.sparsify import sparsify, SparsificationMethod, RescaleNorm
    from calm_fast.compat.mergekit import sparsify, SparsificationMethod, RescaleNorm

Semantics are mergekit 0.1.5's (per tensor; see :mod:`calm_fast.methods.mergekit_sparsify`):

* ``magnitude``: exactly ``max(1, int(density · n))`` largest ``|x|`` kept (``density >= 1``: the tensor
  itself; ``density <= 0``: zeros); ties at the k-th magnitude broken by torch's CPU sort order, as
  mergekit does (the same ``argsort`` call): **bitwise equal to mergekit**.
* ``magnitude_outliers`` (Breadcrumbs): drop the ``gamma`` fraction of largest magnitudes, keep the next
  ``int(density · n)``: bitwise equal to mergekit.
* ``rescaled_masked_tensor`` and ``rescale_norm`` (``l1``/``l2``/``linf``): the masked tensor scaled back
  to the original norm (skipped below 1e-7): bitwise equal to mergekit.
* ``random`` (DARE; ``density`` is the keep probability) and ``della_magprune`` (keep probability
  ``density − ε + 2ε · rank_norm`` per row): **calm_fast's generator, mergekit's statistics**.  The mask
  comes from calm_fast's counter-based Philox draws (keep iff ``u >= 1 − p``, ``u`` on a 2^-24 grid) keyed
  by ``seed``: the same mask on CPU and GPU, for any thread count.  ``seed=None`` (default) takes a seed
  from torch's default generator, so ``torch.manual_seed`` makes a script reproducible and successive
  calls differ, as mergekit's ``torch.bernoulli`` calls do; the draws themselves differ from mergekit's.
"""
from __future__ import annotations

from enum import Enum
from typing import Optional

import torch

from ..methods import mergekit_sparsify as _impl

__all__ = ["SparsificationMethod", "RescaleNorm", "sparsify", "magnitude", "magnitude_outliers", "bernoulli",
           "della_magprune", "rescaled_masked_tensor"]

_SHIM_NAME = "calm_fast.compat.mergekit"


class SparsificationMethod(str, Enum):
    """mergekit's sparsification method names."""

    magnitude = "magnitude"
    random = "random"
    magnitude_outliers = "magnitude_outliers"
    della_magprune = "della_magprune"


class RescaleNorm(str, Enum):
    """Which norm a masked tensor is rescaled back to."""

    l1 = "l1"
    l2 = "l2"
    linf = "linf"


def _key(seed: Optional[int]) -> int:
    from ..ops import dare_keys

    if seed is None:  # from torch's default generator: torch.manual_seed makes runs reproducible
        seed = int(torch.randint(0, 2 ** 62, (), dtype=torch.int64))
    return int(dare_keys(int(seed), [_SHIM_NAME], 1)[0, 0])


def rescaled_masked_tensor(tensor: torch.Tensor, mask: torch.Tensor, norm: Optional[RescaleNorm],
                           eps: float = 1e-7) -> torch.Tensor:
    """``tensor * mask`` rescaled to the original ``norm`` (none when ``norm`` is None or a norm < eps)."""
    return _impl.rescaled_masked_tensor(tensor, mask, norm, eps)


def magnitude(tensor: torch.Tensor, density: float, rescale_norm: Optional[RescaleNorm] = None) -> torch.Tensor:
    """Keep exactly ``max(1, int(density · n))`` largest-magnitude entries."""
    return _impl.magnitude(tensor, density, rescale_norm)


def magnitude_outliers(tensor: torch.Tensor, density: float, rescale_norm: Optional[RescaleNorm] = None,
                       gamma: float = 0.01) -> torch.Tensor:
    """Model Breadcrumbs: drop the ``gamma`` largest magnitudes, keep ``int(density · n)`` below them."""
    return _impl.magnitude_outliers(tensor, density, rescale_norm, gamma=gamma)


def bernoulli(tensor: torch.Tensor, density: float, rescale_norm: Optional[RescaleNorm] = None, *,
              seed: Optional[int] = None) -> torch.Tensor:
    """Keep each entry with probability ``density`` (calm_fast's Philox draws), rescale to the norm."""
    return _impl.bernoulli(tensor, density, rescale_norm, key=_key(seed) if density < 1 else None)


def della_magprune(tensor: torch.Tensor, density: float, epsilon: float,
                   rescale_norm: Optional[RescaleNorm] = None, *, seed: Optional[int] = None) -> torch.Tensor:
    """DELLA MagPrune: per-row keep probability rising with the magnitude rank (calm_fast's draws)."""
    return _impl.della_magprune(tensor, density, epsilon, rescale_norm,
                                key=_key(seed) if 0 < density < 1 else None)


def sparsify(tensor: torch.Tensor, density: float, method: SparsificationMethod, gamma: float = 0,
             epsilon: float = 0, rescale_norm: Optional[RescaleNorm] = None, *,
             seed: Optional[int] = None) -> torch.Tensor:
    """mergekit's ``sparsify``: dispatch on ``method`` (an enum member or its name)."""
    name = getattr(method, "value", method)
    if name == "random":
        return bernoulli(tensor, density, rescale_norm, seed=seed)
    if name == "della_magprune":
        return della_magprune(tensor, density, epsilon, rescale_norm, seed=seed)
    return _impl.sparsify(tensor, density, name, gamma=gamma, epsilon=epsilon, rescale_norm=rescale_norm)
