"""Per-tensor vs global TIES on a ViT-B/32-shaped state dict, measured in one run.

    python benchmarks/bench_ties_modes.py                 # T=8 fine-tuned models of CLIP ViT-B/32's visual encoder
    python benchmarks/bench_ties_modes.py --scale 0.25    # every tensor's leading dimension scaled (quick)

Builds the 151 tensor shapes of the visual encoder in code (87.8M parameters at --scale 1), random
fp32 weights, and times ``ties_merging(mode='global')``, ``ties_merging(mode='per_tensor')`` and the
per-tensor thresholds alone (``methods.ties._thresholds``), median of --repeat runs after one warm-up.
Prints the times and the per-tensor / global ratio (the same process, the same inputs).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from calm_fast.methods import ties
from calm_fast.methods._common import prepare


def vit_b32_shapes(scale: float = 1.0) -> dict:
    """Name -> shape of CLIP ViT-B/32's visual encoder (width 768, 12 blocks, patch 32, 50 tokens)."""
    w = 768
    s = lambda n: max(1, int(round(n * scale)))  # noqa: E731  (scale leading dimensions only)
    shapes = {"conv1.weight": (s(w), 3, 32, 32), "class_embedding": (w,), "positional_embedding": (50, w),
              "ln_pre.weight": (w,), "ln_pre.bias": (w,)}
    for b in range(12):
        p = f"transformer.resblocks.{b}."
        shapes.update({
            p + "ln_1.weight": (w,), p + "ln_1.bias": (w,),
            p + "attn.in_proj_weight": (s(3 * w), w), p + "attn.in_proj_bias": (3 * w,),
            p + "attn.out_proj.weight": (s(w), w), p + "attn.out_proj.bias": (w,),
            p + "ln_2.weight": (w,), p + "ln_2.bias": (w,),
            p + "mlp.c_fc.weight": (s(4 * w), w), p + "mlp.c_fc.bias": (4 * w,),
            p + "mlp.c_proj.weight": (s(w), 4 * w), p + "mlp.c_proj.bias": (w,),
        })
    shapes.update({"ln_post.weight": (w,), "ln_post.bias": (w,), "proj": (s(w), 512)})
    return shapes


def median_time(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--scale", type=float, default=1.0, help="scale of the large tensors' leading dimension")
    p.add_argument("--density", type=float, default=0.2)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)

    g = torch.Generator().manual_seed(0)
    shapes = vit_b32_shapes(args.scale)
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    fts = [{k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(args.tasks)]
    n = sum(v.numel() for v in base.values())
    print(f"{len(shapes)} tensors, {n / 1e6:.1f}M parameters, T={args.tasks}, fp32, "
          f"{torch.get_num_threads()} threads")

    prep = prepare(base, fts, method="ties_merging")
    rows = {
        "global ties_merging": lambda: ties.ties_merging(base, fts, args.density, mode="global"),
        "per_tensor ties_merging": lambda: ties.ties_merging(base, fts, args.density, mode="per_tensor"),
        "per_tensor thresholds only": lambda: ties._thresholds(prep, args.density, "per_tensor", 0.0, None, True),
        "global thresholds only": lambda: ties._thresholds(prep, args.density, "global", 0.0, None, True),
    }
    times = {name: median_time(fn, args.repeat) for name, fn in rows.items()}
    for name, t in times.items():
        print(f"{name:32s} {t * 1e3:9.1f} ms")
    ratio = times["per_tensor ties_merging"] / times["global ties_merging"]
    print(f"per_tensor / global ratio: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
