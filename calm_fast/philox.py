"""Philox-4x32-10, DARE's counter-based generator, in int64 torch arithmetic.

The kernels' definition (csrc/common/elementwise.h) written in PyTorch: an element's random number depends
only on its position and the key, so a mask is the same whichever process, device or slice computes it.
Imported by the references, the threshold sampling and the PEFT compatibility layer; it imports nothing
of calm_fast."""
from __future__ import annotations

import torch

Tensor = torch.Tensor

_M32 = 0xFFFFFFFF


def _mulhilo32(a: int, b: Tensor):
    """(hi, lo) 32-bit halves of a * b for a constant a and uint32 values b held in int64."""
    b_lo = b & 0xFFFF
    b_hi = b >> 16
    p0 = b_lo * a
    p1 = b_hi * a
    s = p0 + ((p1 & 0xFFFF) << 16)
    return (s >> 32) + (p1 >> 16), s & _M32


def philox_uniform(index: Tensor, key: int) -> Tensor:
    """Uniform [0, 1) floats (2^-24 grid) for int64 element indices under a 64-bit key: word (i & 3) of
    Philox-4x32-10 at counter i >> 2 (the kernels' definition, csrc/common/elementwise.h)."""
    key &= (1 << 64) - 1
    counter = index >> 2
    c0 = counter & _M32
    c1 = (counter >> 32) & _M32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = key & _M32, key >> 32
    for _ in range(10):
        hi0, lo0 = _mulhilo32(0xD2511F53, c0)
        hi1, lo1 = _mulhilo32(0xCD9E8D57, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + 0x9E3779B9) & _M32
        k1 = (k1 + 0xBB67AE85) & _M32
    words = torch.stack([c0, c1, c2, c3], dim=-1).gather(-1, (index & 3).unsqueeze(-1)).squeeze(-1)
    return (words >> 8).to(torch.float32) * (1.0 / 16777216.0)
