#!/usr/bin/env python
"""calm-fast vs mergekit on the same mergekit-format config and the same files.

Synthetic sharded bf16 checkpoints of a LLaMA-shaped model (``bench_streaming.generate``: base and
fine-tuned copies with config.json) are merged by ``mergekit-yaml CONFIG OUT`` and by
``calm-fast merge --config CONFIG --out OUT`` (each a fresh subprocess: wall time and peak RSS), for a
few configs users write (ties, task_arithmetic, linear, dare_ties).  The outputs are compared tensor by
tensor: the deterministic methods must be bitwise equal; dare_ties draws its masks differently (only
the time is compared).  Results go to ``benchmarks/results/mergekit_configs_<tag>.json``.

    python benchmarks/bench_mergekit_configs.py                     # 50M parameters, 3 fine-tuned models
    python benchmarks/bench_mergekit_configs.py --params 2.5e8 --models 4
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from bench_streaming import generate, machine_info, measured  # noqa: E402


def configs(data: Path, n: int, work_dtype: str):
    base = str(data / "base")
    fts = [str(data / f"ft{i}") for i in range(n)]
    return {
        "ties": {"merge_method": "ties", "base_model": base, "dtype": work_dtype,
                 "models": [{"model": m, "parameters": {"weight": 1.0, "density": 0.3}} for m in fts],
                 "parameters": {"normalize": True, "int8_mask": True}},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": base, "dtype": work_dtype,
                            "models": [{"model": m, "parameters": {"weight": 0.5}} for m in fts]},
        "linear": {"merge_method": "linear", "dtype": work_dtype,
                   "models": [{"model": m, "parameters": {"weight": 1.0 + i}} for i, m in enumerate(fts)]},
        "dare_ties": {"merge_method": "dare_ties", "base_model": base, "dtype": work_dtype,
                      "models": [{"model": m, "parameters": {"weight": 1.0, "density": 0.5}} for m in fts]},
    }


def compare(a: Path, b: Path) -> dict:
    import torch

    from calm_fast.io import open_checkpoint

    ca, cb = open_checkpoint(str(a)), open_checkpoint(str(b))
    ka, kb = set(ca.keys()), set(cb.keys())
    equal, diff, max_abs = 0, [], 0.0
    for k in sorted(ka & kb):
        x, y = ca.read(k), cb.read(k)
        if x.dtype == y.dtype and torch.equal(x, y):
            equal += 1
        else:
            diff.append(k)
            max_abs = max(max_abs, float((x.float() - y.float()).abs().max()))
    return {"tensors": len(ka), "bitwise_equal": equal, "different": len(diff), "first_different": diff[:5],
            "max_abs_diff": max_abs, "missing_in_calm_fast": sorted(ka - kb)[:5],
            "extra_in_calm_fast": sorted(kb - ka)[:5]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=float, default=5e7)
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16", help="dtype of the generated checkpoints")
    ap.add_argument("--work-dtype", default="bfloat16", help="the configs' dtype (mergekit's working dtype)")
    ap.add_argument("--methods", default="ties,task_arithmetic,linear,dare_ties")
    ap.add_argument("--dir", default=None, help="data folder (default: a temporary one, removed)")
    ap.add_argument("--tag", default=None)
    args = ap.parse_args(argv)

    mk = shutil.which("mergekit-yaml") or str(Path(sys.executable).parent / "mergekit-yaml")
    if not Path(mk).exists():
        print("mergekit-yaml not found: pip install mergekit==0.1.5 into this environment", file=sys.stderr)
        return 2
    cf = str(Path(sys.executable).parent / "calm-fast")
    calm_cmd = [cf] if Path(cf).exists() else [sys.executable, "-m", "calm_fast.cli"]
    keep = args.dir is not None
    root = Path(args.dir) if keep else Path(tempfile.mkdtemp(prefix="bench-mergekit-"))
    data = root / "data"
    info = generate(data, args.params, args.models, args.dtype, "2GB")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    results = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine_info(root), "data": info,
               "mergekit": "0.1.5", "work_dtype": args.work_dtype, "runs": {}}
    try:
        for name, cfg in configs(data, args.models, args.work_dtype).items():
            if name not in args.methods.split(","):
                continue
            import yaml

            path = root / f"{name}.yml"
            path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            row = {"config": cfg}
            for tool, cmd in (("mergekit", [mk, str(path), str(root / f"out_mk_{name}"), "--lazy-unpickle"]),
                              ("calm_fast", calm_cmd + ["merge", "--config", str(path), "--out",
                                                        str(root / f"out_cf_{name}"), "--overwrite", "-q"])):
                shutil.rmtree(root / f"out_{'mk' if tool == 'mergekit' else 'cf'}_{name}", ignore_errors=True)
                r = measured(cmd, env=env)
                row[tool] = {"seconds": round(r["seconds"], 2), "peak_rss_bytes": r["maxrss_bytes"],
                             "user_s": round(r["user_s"], 2), "sys_s": round(r["sys_s"], 2)}
                print(f"{name:<16} {tool:<10} {r['seconds']:7.2f}s  peak RSS {r['maxrss_bytes'] / 2**30:5.2f} GiB",
                      flush=True)
            row["speedup"] = round(row["mergekit"]["seconds"] / row["calm_fast"]["seconds"], 2)
            row["outputs"] = compare(root / f"out_mk_{name}", root / f"out_cf_{name}")
            if name.startswith("dare"):
                row["outputs"]["note"] = ("random masks: mergekit draws torch's global RNG, calm_fast its Philox "
                                          "generator; outputs are not expected to be equal")
            print(f"{'':<16} speedup {row['speedup']}x, outputs: {row['outputs']['bitwise_equal']}/"
                  f"{row['outputs']['tensors']} tensors bitwise equal", flush=True)
            results["runs"][name] = row
            for d in ("mk", "cf"):
                shutil.rmtree(root / f"out_{d}_{name}", ignore_errors=True)
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    tag = args.tag or f"{args.params:.0e}_{args.models}x_{args.dtype}".replace("+", "")
    out = HERE / "results" / f"mergekit_configs_{tag}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
