import os

import pytest
import torch

import calm_fast  # noqa: F401  (loads the extension, registers the ops)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture
def gen():
    """A fresh random generator per test (seeded from the test's name so failures reproduce)."""
    g = torch.Generator().manual_seed(abs(hash(os.environ.get("PYTEST_CURRENT_TEST", ""))) % (2**31))
    return g


def make_list(gen, T, sizes, dtype=torch.float32, scale=1.0, zeros_frac=0.0, shapes=None):
    """Task-major list of T * len(sizes) random tensors (optionally with masses of exact zeros)."""
    out = []
    for t in range(T):
        for i, n in enumerate(sizes):
            x = torch.randn(n, generator=gen) * scale
            if zeros_frac > 0:
                x[torch.rand(n, generator=gen) < zeros_frac] = 0.0
            x = x.to(dtype)
            if shapes is not None and shapes[i] is not None:
                x = x.reshape(shapes[i])
            out.append(x)
    return out
