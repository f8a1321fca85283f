"""Data-parallel CALM and AdaMerging: time per iteration on 1 rank vs 2 gloo ranks on this machine.

    python benchmarks/bench_calm_dp.py                 # CALM and AdaMerging, 1 and 2 ranks
    python benchmarks/bench_calm_dp.py --hidden 512 --iterations 6

The network: an MLP encoder (in 256 -> hidden -> hidden -> 128, tanh) with per-task linear heads, random
weights, built in code (``--hidden 1024``: 1.4M trained parameters), 4 tasks of 1,024 unlabeled samples.
CALM: schedule [[a, b], [c], [d]], ``--iterations`` per mask step, batch 128, 2 batches per seen task (6 then
8 batches per iteration).  AdaMerging: layer-wise, official preset, batch 128, 2 batches per task (8 per step).

Every configuration runs in fresh spawned processes, each with ONE intra-op thread (``torch.set_num_threads(1)``),
joined over loopback with gloo: "1 rank" is a single such process, "2 ranks" two of them.  The ranks of a
2-rank run split each iteration's batches (batch j on rank j % 2) and combine the gradients with one
all-reduce (``dp_reduction="allreduce"``) or with exact gathers (``"exact"``).  A 1-process run with two
threads is given for comparison (intra-op parallelism instead of data parallelism).

Results: ``benchmarks/results/calm_dp_<date>.json`` and a table on stdout.  The machine's load is recorded:
on a shared 2-core machine the numbers are only comparable within one run.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)                        # this checkout's calm_fast
sys.path.insert(0, os.path.join(ROOT, "tests"))  # the gloo harness (tests/dist_harness.py)

import torch  # noqa: E402

from dist_harness import run_ranks  # noqa: E402

TASKS = ["a", "b", "c", "d"]


def load() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"


def _problem(hidden: int, samples: int):
    from torch import nn

    from calm_fast.models import GenericAdapter

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(256, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                        nn.Linear(hidden, 128))
    heads = {t: nn.Linear(128, 10).requires_grad_(False) for t in TASKS}
    adapter = GenericAdapter(net, heads, normalize_features=True)
    pre = {k: v.detach().clone() for k, v in net.state_dict().items()}
    fts = [{k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in pre.items()} for _ in TASKS]
    data = {t: torch.randn(samples, 256, generator=g) for t in TASKS}
    return adapter, pre, fts, data


def _run(method: str, reduction: str, hidden: int, samples: int, iterations: int, threads: int):
    torch.set_num_threads(threads)
    import calm_fast

    adapter, pre, fts, data = _problem(hidden, samples)
    t0 = time.perf_counter()
    if method == "calm":
        res = calm_fast.calm(pre, fts, adapter, data, schedule=[["a", "b"], ["c"], ["d"]], iterations=iterations,
                             batch_size=128, batches_per_task=2, sparsity=1e-3, progress=False,
                             dp_reduction=reduction)
        total = time.perf_counter() - t0
        steps = [s for s in res.steps if s.get("kind") == "mask"]
        loop = sum(s["timings"]["step_s"] for s in steps)
        n_it = iterations * len(steps)
        out = {"total_s": total, "credible_s": res.timings["credible_s"], "loop_s": loop,
               "per_iteration_s": loop / n_it, "network_s": sum(s["timings"]["network_s"] for s in steps) / n_it,
               "masks": [m["on"] for m in res.masks]}
    else:
        res = calm_fast.adamerging(pre, fts, adapter, data, preset="official", steps=iterations, batch_size=128,
                                   batches_per_task=2, progress=False, dp_reduction=reduction)
        total = time.perf_counter() - t0
        out = {"total_s": total, "per_iteration_s": (res.timings["network_s"] + res.timings["merge_s"]) / iterations,
               "network_s": res.timings["network_s"] / iterations, "final_loss": res.loss[-1]}
    out["num_parameters"] = sum(v.numel() for v in pre.values())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--iterations", type=int, default=8)
    ap.add_argument("--methods", default="calm,adamerging")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    rows = []
    before = load()
    for method in a.methods.split(","):
        configs = [("1 rank, 1 thread", 1, "allreduce", 1), ("1 rank, 2 threads", 1, "allreduce", 2),
                   ("2 ranks, allreduce", 2, "allreduce", 1), ("2 ranks, exact", 2, "exact", 1)]
        for label, n, reduction, threads in configs:
            res = run_ranks(_run, n, method, reduction, a.hidden, a.samples, a.iterations, threads, timeout=900)
            r0 = res[0]
            rows.append({"method": method, "config": label, "ranks": n, "threads_per_rank": threads,
                         "reduction": reduction if n > 1 else None, **r0})
            print(f"{method:10s} {label:20s} {r0['per_iteration_s'] * 1e3:8.1f} ms/iteration "
                  f"(network {r0['network_s'] * 1e3:7.1f} ms)  total {r0['total_s']:6.2f} s", flush=True)
    for method in a.methods.split(","):
        base = next(r for r in rows if r["method"] == method and r["config"] == "1 rank, 1 thread")
        for r in rows:
            if r["method"] == method:
                r["speedup_vs_1_rank_1_thread"] = base["per_iteration_s"] / r["per_iteration_s"]
    print("\n| method | configuration | ms / iteration | speedup |\n|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['config']} | {r['per_iteration_s'] * 1e3:.1f} | "
              f"{r['speedup_vs_1_rank_1_thread']:.2f}x |")
    out = a.out or os.path.join(HERE, "results", f"calm_dp_{_dt.date.today().isoformat()}.json")
    with open(out, "w") as f:
        json.dump({"benchmark": "bench_calm_dp", "settings": vars(a), "cpu_count": os.cpu_count(),
                   "platform": platform.platform(), "torch": torch.__version__, "load_before": before,
                   "load_after": load(), "rows": rows}, f, indent=1)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
