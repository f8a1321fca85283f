#!/usr/bin/env python
"""Distributed streaming-merge benchmark: a TIES merge of synthetic sharded bf16 checkpoints (LLaMA-shaped,
generated on disk by bench_streaming.generate) in one process and on N ranks under ``torchrun`` (gloo),
on this machine.  Reports wall time, per-rank bytes read and peak RSS, and checks that the outputs are
byte-identical.

    python benchmarks/bench_distributed.py --params 2.5e8 --models 4 --ranks 2     # 4 x ~0.5 GB bf16

Each measured run is a fresh process tree; runs alternate (1 process, N ranks, ...) ``--repeat`` times so
that page-cache state and the neighbours' load affect both alike.  The inputs fit in the page cache here
(so "reading" is mostly memory copies); ``--cold`` evicts them before each run.  Results go to
``benchmarks/results/distributed_<tag>.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from bench_streaming import evict, generate, machine_info  # noqa: E402

_WORKER = r"""
import json, os, resource, sys, time
import torch
from calm_fast import distributed as D
from calm_fast.streaming import merge_checkpoints
a = json.loads(sys.argv[1])
torch.set_num_threads(a["threads"])
D.init_from_env()
t0 = time.perf_counter()
r = merge_checkpoints(a["base"], a["models"], "ties", output=a["out"], overwrite=True, memory_budget=a["budget"],
                      density=0.2, merge="sum", distributed=None)
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
mine = {"rank": D.rank(), "seconds": dt, "timings": r.timings, "peak_rss": peak}
every = D.all_gather_object(mine)
if D.rank() == 0:
    print("RESULT " + json.dumps({"world_size": D.world_size(), "seconds": dt, "passes": r.passes,
                                  "bytes_read": r.bytes_read, "rank_bytes_read": r.rank_bytes_read,
                                  "rank_plans": r.rank_plans, "ranks": every}))
if D.is_distributed():
    import torch.distributed as dist
    dist.destroy_process_group()
"""


def run(ranks: int, threads: int, args: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)})
    a = json.dumps(dict(args, threads=threads))
    if ranks == 1:
        cmd = [sys.executable, "-c", _WORKER, a]
    else:
        script = Path(tempfile.gettempdir()) / "calm_fast_bench_dist_worker.py"
        script.write_text(_WORKER)
        cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc-per-node", str(ranks), "--master-addr",
               "127.0.0.1", "--master-port", str(29500 + os.getpid() % 1000), str(script), a]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-4000:])
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")][-1]
    res = json.loads(line[len("RESULT "):])
    res["process_wall_seconds"] = wall
    return res


def same_files(a: Path, b: Path) -> bool:
    na, nb = sorted(os.listdir(a)), sorted(os.listdir(b))
    if na != nb:
        return False
    for n in na:
        with open(a / n, "rb") as fa, open(b / n, "rb") as fb:
            while True:
                x, y = fa.read(1 << 24), fb.read(1 << 24)
                if x != y:
                    return False
                if not x:
                    break
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=2.5e8, help="parameters per model (2.5e8 bf16 = 0.5 GB)")
    ap.add_argument("--models", type=int, default=4)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--budget", default="512MiB", help="memory budget per process (each rank has its own)")
    ap.add_argument("--data", default=str(Path(tempfile.gettempdir()) / "calm_fast_bench_dist"))
    ap.add_argument("--cold", action="store_true", help="evict the inputs from the page cache before each run")
    ap.add_argument("--tag", default="")
    a = ap.parse_args()
    data = Path(a.data)
    data.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    marker = generate(data, a.params, a.models, "bfloat16", "1GB")
    gen_s = time.perf_counter() - t0
    base = str(data / "base")
    models = [str(data / f"ft{i}") for i in range(a.models)]
    in_bytes = sum(p.stat().st_size for d in [base] + models for p in Path(d).glob("*.safetensors"))
    cores = os.cpu_count() or 1
    configs = [("1 process", 1, cores), (f"{a.ranks} ranks", a.ranks, max(1, cores // a.ranks)),
               ("1 process, 1 thread", 1, 1)]
    runs = {name: [] for name, _, _ in configs}
    outs = {}
    for rep in range(a.repeat):
        for name, ranks, threads in configs:
            out = data / f"out_{ranks}_{threads}"
            if a.cold:
                evict([base] + models)
            res = run(ranks, threads, {"base": base, "models": models, "out": str(out), "budget": a.budget})
            res["threads_per_rank"] = threads
            runs[name].append(res)
            outs[name] = out
            print(f"{name:>22}: {res['seconds']:.2f} s merge ({res['process_wall_seconds']:.2f} s with start-up), "
                  f"{res['bytes_read'] / res['seconds'] / 1e9:.2f} GB/s read, peak RSS per rank "
                  + ", ".join(f"{x['peak_rss'] / 2**30:.2f} GiB" for x in res["ranks"]), flush=True)
    identical = same_files(outs["1 process"], outs[f"{a.ranks} ranks"])
    best = {name: min(r["seconds"] for r in rs) for name, rs in runs.items()}
    summary = {
        "input_bytes": in_bytes, "models": a.models, "params_per_model": marker["numel"], "ranks": a.ranks,
        "budget_per_rank": a.budget, "cold": a.cold, "generate_seconds": gen_s,
        "best_seconds": best,
        "speedup_ranks_vs_1_process": best["1 process"] / best[f"{a.ranks} ranks"],
        "bytes_read_total": runs["1 process"][0]["bytes_read"],
        "per_rank_throughput_gb_s": (runs[f"{a.ranks} ranks"][0]["bytes_read"] / a.ranks)
        / best[f"{a.ranks} ranks"] / 1e9,
        "one_thread_throughput_gb_s": runs["1 process, 1 thread"][0]["bytes_read"] / best["1 process, 1 thread"] / 1e9,
        "outputs_byte_identical": identical,
    }
    print(json.dumps(summary, indent=2))
    res = {"summary": summary, "runs": runs, "machine": machine_info(data),
           "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    tag = a.tag or time.strftime("%Y-%m-%d")
    path = HERE / "results" / f"distributed_{tag}.json"
    path.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
