"""AdaMerging benchmark: where a step's time goes, and the non-network part fused vs plain torch.

    python benchmarks/bench_adamerging.py                       # both parts, threads 1 and 2
    python benchmarks/bench_adamerging.py --parts step --threads 2 --n-scale 0.25

Parts:
  iteration  A whole ``calm_fast.adamerging`` run (official preset: 2 batches of 16 per task, layer-wise) on
             a MiniLM-L6-sized encoder (22.7M merged parameters in 79 tensors, built in code, random
             weights; benchmarks/bench_calm.py's ``MiniEncoder``), T = 4 tasks, sequence length 32: time per
             step split into network (8 forward + backward) and the rest (merge into the flat buffer +
             coefficient gradient + Adam), from the result's timings.
  step       The non-network part of one step at MiniLM-L6 size (T = 4) and at ViT-B/32 size (N = 87,849,216
             in 152 tensors, T = 8), measured in one run: calm_fast (one fused ``weighted_merge`` written into
             the flat parameter buffer, one fused ``coef_grad``, Adam on λ) vs plain torch in the official
             code's style (per tensor ``θ0 + Σ_t λ_{t,l} τ_{t,l}`` with λ requiring grad, autograd from the
             network's parameter gradients back to λ, Adam); both keep the T task vectors (or fine-tuned
             weights) resident.  The two are timed interleaved (medians).  The fused step's parts (merge,
             copy into the buffer, coef_grad) are also timed alone.

Results: benchmarks/results/adamerging_<date>.json and the lines printed.  The machine's load
(``uptime``) is recorded with the numbers: on a shared machine they are only comparable within a run.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # this checkout's calm_fast
sys.path.insert(0, HERE)
import calm_fast  # noqa: E402
from calm_fast import ops  # noqa: E402
from calm_fast.models import GenericAdapter  # noqa: E402

from bench_calm import MiniEncoder, load, timeit, vit_b32_shapes  # noqa: E402


def part_iteration(args, threads):
    torch.manual_seed(0)
    enc = MiniEncoder()
    n = sum(p.numel() for p in enc.parameters())
    T, C = 4, 10
    heads = {f"t{i}": nn.Linear(384, C).requires_grad_(False) for i in range(T)}
    adapter = GenericAdapter(enc, heads)
    pre = {k: v.detach().clone() for k, v in enc.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    fts = [{k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in pre.items()} for _ in heads]
    data = {t: torch.randint(0, 30522, (64, args.seq_len), generator=g) for t in heads}
    res = calm_fast.adamerging(pre, fts, adapter, data, steps=args.steps, progress=False)
    s = args.steps
    net, rest = res.timings["network_s"] / s, res.timings["merge_s"] / s
    row = {"threads": threads, "N": n, "tensors": len(res.keys), "T": T, "batch": 16, "batches_per_step": 2 * T,
           "seq_len": args.seq_len, "steps": s, "network_s_per_step": net, "rest_s_per_step": rest,
           "rest_fraction": rest / (net + rest), "setup_s": res.timings["setup_s"], "run_s": res.timings["total_s"]}
    print(f"[{threads} thr] MiniLM-L6 N={n:,} T={T}: network {net:.3f} s/step, merge + coef grad + Adam "
          f"{rest:.4f} s/step ({100 * row['rest_fraction']:.1f}%)", flush=True)
    return row


def _nograd_timeit(fn, reps):
    with torch.no_grad():
        return timeit(fn, reps)


def part_step(args, threads, shapes, T, label):
    n = sum(math.prod(sh) for sh in shapes)
    L = len(shapes)
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(sh, generator=g) for sh in shapes]
    fts = [b + 1e-2 * torch.randn(b.shape, generator=g) for _ in range(T) for b in base]  # task-major
    grads_src = [1e-6 * torch.randn(sh, generator=g) for sh in shapes]
    reps = args.reps

    # -- calm_fast: fused merge into the flat buffer, fused coefficient gradient, Adam on λ --
    fp = calm_fast.models.FlatParams([f"p{i}" for i in range(L)], shapes)
    with torch.no_grad():
        for gv, src in zip(fp.grads, grads_src):
            gv.copy_(src)
    raw = torch.full((T, L), 0.3, requires_grad=True)
    opt = torch.optim.Adam([raw], lr=1e-3)

    def fused():
        with torch.no_grad():
            outs, _ = ops._ops().weighted_merge(fts, base, T, raw.detach().contiguous(), 1.0, None, False, [], 0.0,
                                                None, True, True)
            torch._foreach_copy_(fp.tensors, outs)
            del outs
        raw.grad = ops.coef_grad(fp.grads, fts, base, T)
        opt.step()

    # -- plain torch, the official code's style: τ resident, per-tensor Σ λ τ with autograd --
    taus = [[fts[t * L + l] - base[l] for l in range(L)] for t in range(T)]
    raw2 = torch.full((T, L), 0.3, requires_grad=True)
    opt2 = torch.optim.Adam([raw2], lr=1e-3)

    def plain():
        merged = []
        for l in range(L):
            acc = base[l]
            for t in range(T):
                acc = acc + taus[t][l] * raw2[t, l]
            merged.append(acc)
        opt2.zero_grad()
        torch.autograd.backward(merged, grads_src)   # the network's gradients, continued back to λ
        opt2.step()

    # interleaved (fused, plain, fused, plain, ...) so that load changes hit both alike; medians
    fused()
    plain()
    tf, tp = [], []
    for _ in range(reps):
        a = time.perf_counter()
        fused()
        b = time.perf_counter()
        plain()
        c = time.perf_counter()
        tf.append(b - a)
        tp.append(c - b)
    t_fused, t_plain = statistics.median(tf), statistics.median(tp)
    del taus
    gc.collect()
    # the fused step's parts, timed alone
    with torch.no_grad():
        outs, _ = ops._ops().weighted_merge(fts, base, T, raw.detach().contiguous(), 1.0, None, False, [], 0.0, None,
                                            True, True)
    parts = {
        "merge_s": timeit(lambda: ops._ops().weighted_merge(fts, base, T, raw.detach().contiguous(), 1.0, None, False,
                                                            [], 0.0, None, True, True), reps),
        "copy_into_buffer_s": _nograd_timeit(lambda: torch._foreach_copy_(fp.tensors, outs), reps),
        "coef_grad_s": timeit(lambda: ops.coef_grad(fp.grads, fts, base, T), reps),
    }
    del outs
    gc.collect()
    row = {"threads": threads, "label": label, "N": n, "tensors": L, "T": T, "fused_s": t_fused, "torch_s": t_plain,
           "speedup": t_plain / t_fused, "fused_parts": parts}
    print(f"[{threads} thr] {label} N={n:,} T={T}: plain torch {t_plain:.3f} s, fused {t_fused:.3f} s "
          f"({row['speedup']:.1f}x; merge {parts['merge_s']:.3f} s, copy into the buffer "
          f"{parts['copy_into_buffer_s']:.3f} s, coef_grad {parts['coef_grad_s']:.3f} s)", flush=True)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="iteration,step")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--n-scale", type=float, default=1.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    parts = args.parts.split(",")
    out: dict = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                 "machine": platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
                 "backend": calm_fast.backend(), "load_before": load()}
    minilm = [tuple(p.shape) for p in MiniEncoder().parameters()]
    vit = vit_b32_shapes()
    if args.n_scale != 1.0:
        vit = [(max(1, int(sh[0] * args.n_scale)),) + tuple(sh[1:]) if len(sh) > 1 else sh for sh in vit]
    for threads in [int(x) for x in args.threads.split(",")]:
        torch.set_num_threads(threads)
        if "iteration" in parts:
            out.setdefault("iteration", []).append(part_iteration(args, threads))
        if "step" in parts:
            out.setdefault("step", []).append(part_step(args, threads, minilm, 4, "MiniLM-L6"))
            out["step"].append(part_step(args, threads, vit, 8, "ViT-B/32"))
    out["load_after"] = load()
    path = args.out or os.path.join(HERE, "results", f"adamerging_{_dt.date.today().isoformat()}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print("load:", out["load_before"], "->", out["load_after"])
    print("wrote", path)


if __name__ == "__main__":
    main()
