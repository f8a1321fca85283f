"""DOGE_TA benchmark: calm_fast.doge_ta (fused) vs the plain autograd reference (reference.py), one run.

* One ViT-B/32-shaped encoder block (q, k, v, out 768x768; fc1 3072x768; fc2 768x3072), T = 8, 400 steps:
  the fused method end to end (setup SVDs + 400 iterations + trim + merge), and the reference
  (reference.doge_ta_reference's per-layer loop: autograd, m x m projector, torch.optim.Adam).  The
  reference takes seconds per iteration here, so it runs ``--ref-iters`` iterations per layer and its
  400-step time is extrapolated: setup (its SVDs, measured) + 400 x (sum over layers of the median
  per-iteration time).  The JSON says so (``reference_extrapolated``).
* The whole 12-block model (72 matrices, 85M merged parameters): the fused iterations of all 72 layers
  (stacked by shape, as doge_ta runs them) timed for ``--model-iters`` iterations and scaled to 400, plus
  the block's measured setup (SVDs, λ, e) times 12 (layers are independent): extrapolated, and the JSON
  says so (``model_extrapolated``).
* The row kernel (doge_row_grad_) alone on the block's stacked layers: GB/s with the bytes model
  (T + 2) * 4 B per element (tau once, delta, G written; the second read of a row of tau is expected
  from cache) against the machine's copy bandwidth measured in the same run (report.copy_bandwidth).

Machine load is recorded (uptime, load averages): this machine is shared.

    python benchmarks/bench_doge.py --out benchmarks/results/doge_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import calm_fast  # noqa: E402
from calm_fast import ops, reference  # noqa: E402
from calm_fast.methods.doge import optimise_delta, row_constants  # noqa: E402
from report import copy_bandwidth, machine_info, sync  # noqa: E402

BLOCK = {"self_attn.q_proj.weight": (768, 768), "self_attn.k_proj.weight": (768, 768),
         "self_attn.v_proj.weight": (768, 768), "self_attn.out_proj.weight": (768, 768),
         "mlp.fc1.weight": (3072, 768), "mlp.fc2.weight": (768, 3072)}


def load() -> dict:
    up = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return {"uptime": up, "loadavg": list(os.getloadavg()), "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def make_model(blocks: int, T: int, device: str, seed: int = 0):
    """θ0 and T task vectors (τ ~ N(0, 1e-3^2), the order of CLIP fine-tuning deltas) for `blocks` blocks."""
    g = torch.Generator(device=device).manual_seed(seed)
    pre, tvs = {}, [dict() for _ in range(T)]
    for b in range(blocks):
        for name, shape in BLOCK.items():
            k = f"vision_model.encoder.layers.{b}.{name}"
            pre[k] = torch.randn(*shape, generator=g, device=device) * 0.02
            for t in range(T):
                tvs[t][k] = torch.randn(*shape, generator=g, device=device) * 1e-3
    return pre, tvs


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def bench_reference_block(pre, tvs, ref_iters: int, steps: int) -> dict:
    """Per layer: the reference's setup (SVDs, λ) and `ref_iters` iterations of its loop body."""
    per_layer = {}
    setup = 0.0
    for k in sorted(pre):
        taus = [tv[k] for tv in tvs]
        t0 = time.perf_counter()
        lam = [0.07 / torch.norm(t) for t in taus]
        U_r = reference.doge_subspace_reference(taus, 6)
        P = U_r @ U_r.T
        setup += time.perf_counter() - t0
        delta = torch.zeros_like(taus[0], requires_grad=True)
        opt = torch.optim.Adam([delta], lr=1e-4)
        times = []
        for _ in range(ref_iters):
            t0 = time.perf_counter()
            opt.zero_grad()
            loss = reference.doge_loss_reference(delta, taus, lam)
            loss.backward()
            with torch.no_grad():
                delta.grad -= P @ delta.grad
            opt.step()
            times.append(time.perf_counter() - t0)
        per_layer[k] = statistics.median(times)
    per_iter = sum(per_layer.values())
    return {"setup_s": setup, "per_iteration_s": per_iter, "per_layer_iteration_s": per_layer,
            "iterations_timed_per_layer": ref_iters, "total_s": setup + steps * per_iter,
            "reference_extrapolated": True}


def bench_row_kernel(tvs, keys, device: str, bw: float, repeat: int = 5) -> list:
    rows = []
    shapes = {}
    for k in keys:
        shapes.setdefault(tuple(tvs[0][k].shape), []).append(k)
    T = len(tvs)
    for shape, ks in shapes.items():
        tau = torch.stack([torch.stack([tv[k] for tv in tvs]) for k in ks]).contiguous()
        lam = 0.07 / tau.flatten(2).norm(dim=2)
        e, lam_sum = row_constants(tau, lam)
        delta = torch.randn(tau.shape[0], *shape, device=device) * 1e-3
        G = torch.empty_like(delta)
        ops.doge_row_grad_(G, tau, delta, e, lam_sum)
        times = []
        for _ in range(repeat):
            dt, _ = timed(lambda: ops.doge_row_grad_(G, tau, delta, e, lam_sum), device)
            times.append(dt)
        t = statistics.median(times)
        nbytes = (T + 2) * 4 * delta.numel()
        rows.append({"shape": list(shape), "layers": len(ks), "T": T, "seconds": t, "bytes_model": nbytes,
                     "GB/s": nbytes / t / 1e9, "pct_copy_bw": 100 * nbytes / t / 1e9 / bw})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--T", type=int, default=8)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--ref-iters", type=int, default=3)
    ap.add_argument("--blocks", type=int, default=12, help="blocks of the whole-model run (0 skips it)")
    ap.add_argument("--model-iters", type=int, default=10, help="iterations timed on the whole model")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    dev = args.device
    result = {"machine": machine_info(dev), "load_start": load(), "T": args.T, "steps": args.steps}
    bw = copy_bandwidth(dev)
    result["copy_bandwidth_GBps"] = bw

    pre, tvs = make_model(1, args.T, dev)
    keys = sorted(pre)
    fused_s, res = timed(lambda: calm_fast.doge_ta(pre, tvs, task_vectors=True, steps=args.steps, device=dev), dev)
    result["block_fused_s"] = fused_s
    result["block_fused_final_loss_ratio"] = {k: float(res.losses[k][-1] / res.losses[k][0]) for k in keys}
    del res
    print(f"fused block: {fused_s:.1f} s", flush=True)
    result["row_kernel"] = bench_row_kernel(tvs, keys, dev, bw)
    print(json.dumps(result["row_kernel"], indent=1), flush=True)
    if dev == "cpu":
        ref = bench_reference_block(pre, tvs, args.ref_iters, args.steps)
        result["block_reference"] = ref
        result["block_speedup"] = ref["total_s"] / fused_s
        print(f"reference block (extrapolated): {ref['total_s']:.0f} s; speed-up {result['block_speedup']:.0f}x",
              flush=True)
    result["load_mid"] = load()
    pre_b, tvs_b = pre, tvs
    del pre, tvs
    if args.blocks:
        # The whole model: the 400 iterations of all 72 layers (stacked by shape, as doge_ta runs them) are timed
        # for --model-iters iterations and scaled to --steps; the setup (SVDs, λ, e) is the block's measured
        # setup x blocks (layers are independent).  The JSON says so (model_extrapolated).
        t_setup, _ = timed(lambda: calm_fast.doge_ta(pre_b, tvs_b, task_vectors=True, steps=0, device=dev), dev)
        del pre_b, tvs_b
        pre, tvs = make_model(args.blocks, args.T, dev, seed=1)
        keys = sorted(pre)
        groups = {}
        for k in keys:
            groups.setdefault(tuple(pre[k].shape), []).append(k)
        iter_s = 0.0
        for shape, ks in groups.items():
            tau = torch.stack([torch.stack([tv[k] for tv in tvs]) for k in ks]).contiguous()
            for k in ks:
                for tv in tvs:
                    del tv[k]  # keep memory at ~one copy of the task vectors
            lam = (0.07 / tau.flatten(2).norm(dim=2)).contiguous()
            U = torch.linalg.qr(torch.randn(len(ks), shape[0], min(shape) // 6, device=dev))[0].contiguous()
            dt, _ = timed(lambda: optimise_delta(tau, lam, U, args.model_iters, 1e-4, (0.9, 0.999), 1e-8), dev)
            iter_s += dt / args.model_iters
            del tau, U
        result["model_blocks"] = args.blocks
        result["model_params_merged"] = sum(x.numel() for x in pre.values())
        result["model_setup_s_extrapolated"] = t_setup * args.blocks
        result["block_setup_s"] = t_setup
        result["model_iteration_s"] = iter_s
        result["model_iterations_timed"] = args.model_iters
        result["model_fused_s"] = t_setup * args.blocks + args.steps * iter_s
        result["model_extrapolated"] = True
        print(f"fused {args.blocks}-block model: {result['model_fused_s']:.1f} s (setup {t_setup:.1f} s x {args.blocks}, "
              f"{iter_s * 1e3:.0f} ms per iteration of all layers)", flush=True)
        del pre, tvs
    result["load_end"] = load()
    text = json.dumps(result, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
