"""AdaMerging step benchmark: the non-network part of one step at ViT-B/32 size, fused vs plain torch.

    python benchmarks/bench_adamerging_step.py                    # CPU, fp32, T = 8, 1 then 2 threads
    python benchmarks/bench_adamerging_step.py --device cuda      # on a GPU (benchmarks/gpu_check.sh)
    python benchmarks/bench_adamerging_step.py --n-scale 0.1 --reps 2   # quick run

One layer-wise AdaMerging step (ALGORITHMS.md §6) around the network's forward/backward is: rebuild the
merged weights theta_l = theta0_l + sum_t lambda[t, l] tau_{t,l} for the 152 tensors of open_clip ViT-B/32's
image tower (N = 87,849,216), then, given dLoss/dtheta_l from the backward pass, the coefficient gradient
dLoss/dlambda[t, l] = <dLoss/dtheta_l, tau_{t,l}>.  Measured in one run, on the same data:

  torch   the official code's style: parameters [theta0, tau_1..tau_T] per tensor, coefficients
          [1, lambda[:, l]] (the pretrained one fixed), theta_l = sum(p * a for p, a in zip(...)) in plain
          torch with autograd on lambda, then autograd.backward(theta, grads) into lambda.grad;
  fused   calm_fast: ops.weighted_merge(finetuned, base, T, lambda) (one pass, tau = finetuned - base on the
          fly) and ops.coef_grad(grads, finetuned, base, T) (one pass, all (t, l) at once).

Both get the same dLoss/dtheta (random, fixed); the torch path is timed first, then its data is freed and
the fused path's built from the same seed (one path's inputs resident at a time).  The two results are
compared (max relative difference of lambda.grad and of theta, reported in the JSON).  Bandwidth: bytes each fused op must move (merge: (T + 1)
N b read + N b written; coef_grad: (T + 1) N b + N 4 read) over its time, against the machine's copy
bandwidth measured in the same run, and against torch's own streaming read (a sum over the same T N
inputs) at the same thread count.  The machine's load (uptime) is recorded before and after.
Results: benchmarks/results/adamerging_step_<device>_<dtype>.json and a markdown table on stdout.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import os
import platform
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # this checkout's calm_fast
sys.path.insert(0, HERE)
import calm_fast  # noqa: E402
from bench_calm import vit_b32_shapes  # noqa: E402
from calm_fast import ops  # noqa: E402
from calm_fast.bench import copy_bandwidth, machine_info, timeit  # noqa: E402


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"


def make_data(shapes, T: int, dtype, device: str, path: str, seed: int = 0):
    """(theta0, per-task inputs, dLoss/dtheta, lambda [T, L]) of one path, the same values for both.

    path "torch": inputs[t][l] are the task vectors tau_{t,l} (the official code's parameters); path "fused":
    the flat task-major list of fine-tuned weights theta0 + tau (tau is recomputed on the fly, and the torch
    path's tau is exactly that fp32 difference).  Only one path's data is resident at a time (the machine
    holds 2 x (T + 1) N values only with room to spare: 88M fp32 x 8 tasks is 2.8 GB per copy)."""
    g = torch.Generator().manual_seed(seed)
    L = len(shapes)
    base = [torch.randn(sh, generator=g).to(dtype) for sh in shapes]
    per_task = []
    for t in range(T):
        row = []
        for l, sh in enumerate(shapes):
            ft = (base[l].float() + torch.randn(sh, generator=g) * 1e-2).to(dtype)
            row.append(ft if path == "fused" else (ft.float() - base[l].float()).to(dtype))
        per_task.append([x.to(device) for x in row])
        del row
    grads = [(torch.randn(sh, generator=g) * 1e-3).to(device) for sh in shapes]
    lam = (0.3 + 0.01 * torch.randn(T, L, generator=g)).to(device)
    base = [x.to(device) for x in base]
    inputs = per_task if path == "torch" else [x for row in per_task for x in row]
    return base, inputs, grads, lam


def torch_step(base, taus, grads, lam):
    """The official code's merge and backward: per tensor sum(p * a) over [theta0, tau_1..T] x [1, lambda]."""
    T, L = lam.shape
    lam = lam.detach().clone().requires_grad_()
    ones = torch.ones(1, dtype=lam.dtype, device=lam.device)
    merged = []
    for l in range(L):
        alph = torch.cat([ones, lam[:, l]])
        params = [base[l]] + [taus[t][l] for t in range(T)]
        merged.append(sum(p * a for p, a in zip(params, alph)))
    torch.autograd.backward(merged, grads)
    return merged, lam.grad


def fused_merge(finetuned, base, lam):
    out, _ = ops.weighted_merge(finetuned, base, lam.shape[0], lam)
    return out


def fused_coef_grad(grads, finetuned, base, T):
    return ops.coef_grad(grads, finetuned, base, T)


def max_rel(a, b) -> float:
    """max |a - b| / max(|b|) over a list of tensor pairs (floats)."""
    num = max(float((x.double() - y.double()).abs().max()) if x.numel() else 0.0 for x, y in zip(a, b))
    den = max(float(y.double().abs().max()) if y.numel() else 0.0 for y in b)
    return num / den if den else num


def run(args) -> dict:
    device, dtype, T = args.device, getattr(torch, args.dtype), args.tasks
    shapes = vit_b32_shapes()
    if args.n_scale != 1.0:  # scale the big matrices' first dimension (quick runs)
        shapes = [(max(1, int(sh[0] * args.n_scale)),) + tuple(sh[1:]) if len(sh) > 1 else sh for sh in shapes]
    N = sum(math.prod(sh) for sh in shapes)
    L = len(shapes)
    out = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "info": machine_info(device),
           "platform": platform.platform(), "N": N, "L": L, "T": T, "dtype": args.dtype,
           "load_before": uptime()}
    out["copy_GBps"] = copy_bandwidth(device)
    b = torch.empty((), dtype=dtype).element_size()
    merge_bytes = (T + 1) * N * b + N * b
    coef_bytes = (T + 1) * N * b + N * 4
    runs = {th: {"threads": th} for th in args.threads}

    # plain torch (the official code's style), then the fused ops, one path's data resident at a time
    base, taus, grads, lam = make_data(shapes, T, dtype, device, "torch")
    merged_t, lg_t = torch_step(base, taus, grads, lam)
    merged_t = [m.detach() for m in merged_t]
    for th in args.threads:
        torch.set_num_threads(th)
        gc.collect()
        runs[th]["load_torch"] = uptime()
        runs[th]["torch_step"] = timeit(lambda: torch_step(base, taus, grads, lam), device, args.reps)
    del base, taus, grads, lam
    gc.collect()

    base, finetuned, grads, lam = make_data(shapes, T, dtype, device, "fused")
    # agreement of the two paths (same values): merged weights and lambda.grad
    out["max_rel_diff_theta"] = max_rel(fused_merge(finetuned, base, lam), merged_t)
    out["max_rel_diff_lambda_grad"] = max_rel([fused_coef_grad(grads, finetuned, base, T)], [lg_t])
    del merged_t
    gc.collect()
    out["runs"] = []
    for th in args.threads:
        torch.set_num_threads(th)
        gc.collect()
        r = runs[th]
        r["load_fused"] = uptime()
        t_merge = timeit(lambda: fused_merge(finetuned, base, lam), device, args.reps)
        t_coef = timeit(lambda: fused_coef_grad(grads, finetuned, base, T), device, args.reps)
        # streaming-read reference on the same inputs: torch's sum over the T N fine-tuned values
        t_read = timeit(lambda: [x.sum() for x in finetuned], device, args.reps)
        r["read_GBps"] = T * N * b / t_read / 1e9
        t_torch = r.pop("torch_step")
        fused = t_merge + t_coef
        gbps = {"fused_merge": merge_bytes / t_merge / 1e9, "fused_coef_grad": coef_bytes / t_coef / 1e9}
        r.update({
            "seconds": {"torch_step": t_torch, "fused_step": fused, "fused_merge": t_merge, "fused_coef_grad": t_coef,
                        "first_call": {"torch_step": t_torch.first, "fused_merge": t_merge.first,
                                       "fused_coef_grad": t_coef.first}},
            "speedup": t_torch / fused, "GBps": gbps,
            "pct_of_copy": {k: 100 * v / out["copy_GBps"] for k, v in gbps.items()},
            "pct_of_read": {k: 100 * v / r["read_GBps"] for k, v in gbps.items()}})
        out["runs"].append(r)
    out["load_after"] = uptime()
    return out


def to_markdown(r: dict) -> str:
    lines = [f"AdaMerging step, N = {r['N']:,} ({r['L']} tensors), T = {r['T']}, {r['dtype']}, "
             f"{r['info']['device']}; copy bandwidth {r['copy_GBps']:.1f} GB/s", "",
             "| threads | plain torch (s) | calm_fast merge + coef_grad (s) | speed-up | weighted_merge s (GB/s, % of copy) "
             "| coef_grad s (GB/s, % of copy) | torch.sum read GB/s (coef_grad % of it) |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for run in r["runs"]:
        s, g, p = run["seconds"], run["GBps"], run["pct_of_copy"]
        lines.append(f"| {run['threads']} | {s['torch_step']:.3f} | {s['fused_step']:.3f} | {run['speedup']:.1f}x | "
                     f"{s['fused_merge']:.3f} ({g['fused_merge']:.1f}, {p['fused_merge']:.0f}%) | "
                     f"{s['fused_coef_grad']:.3f} ({g['fused_coef_grad']:.1f}, {p['fused_coef_grad']:.0f}%) | "
                     f"{run['read_GBps']:.1f} ({run['pct_of_read']['fused_coef_grad']:.0f}%) |")
    lines += ["", f"max relative difference torch vs fused: theta {r['max_rel_diff_theta']:.1e}, "
              f"dL/dlambda {r['max_rel_diff_lambda_grad']:.1e}",
              f"load: {r['load_before']} -> {r['load_after']}"]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts, each timed in turn")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--n-scale", type=float, default=1.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    args.threads = [int(x) for x in str(args.threads).split(",")]
    r = run(args)
    print(to_markdown(r))
    path = args.out or os.path.join(HERE, "results", f"adamerging_step_{args.device}_{args.dtype}.json")
    with open(path, "w") as f:
        json.dump(r, f, indent=1)
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
