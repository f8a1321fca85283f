#!/usr/bin/env python
"""Streaming-merge benchmark: synthetic sharded bf16 checkpoints of an N-parameter LLaMA-shaped model,
TIES over several fine-tuned copies with calm_fast's streaming engine; time and peak RSS, against the
time of reading the inputs twice from disk (same reader) and, when installed, mergekit's TIES.

    python benchmarks/bench_streaming.py --params 1e9 --models 4          # the issue's setting
    python benchmarks/bench_streaming.py --params 5e7 --models 2 --quick  # a small smoke run

Every measured run is a fresh subprocess (peak RSS = its VmHWM / ru_maxrss).  ``--cold`` evicts the
input files from the page cache before each run (``posix_fadvise(DONTNEED)``), so "disk" means disk;
otherwise the inputs may be served from the page cache when they fit in RAM (reported as such).
Results go to ``benchmarks/results/streaming_<tag>.json`` with machine information.
Targets (issue 4): peak RSS <= 2 GB + one largest tensor; time <= 2x reading the inputs twice.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


# ------------------------------------------------------------------------------------------------
# synthetic checkpoints
# ------------------------------------------------------------------------------------------------
def llama_shapes(params: float, hidden: int = 0, vocab: int = 32000):
    """(name, shape) list of a LLaMA-style model with about ``params`` parameters, and its config."""
    if not hidden:
        hidden = 2048 if params >= 5e8 else (1024 if params >= 1e8 else 512)
    inter = int(hidden * 8 / 3) // 64 * 64
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    fixed = 2 * vocab * hidden + hidden
    layers = max(1, round((params - fixed) / per_layer))
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + "input_layernorm.weight", (hidden,)), (p + "self_attn.q_proj.weight", (hidden, hidden)),
                   (p + "self_attn.k_proj.weight", (hidden, hidden)), (p + "self_attn.v_proj.weight", (hidden, hidden)),
                   (p + "self_attn.o_proj.weight", (hidden, hidden)),
                   (p + "post_attention_layernorm.weight", (hidden,)), (p + "mlp.gate_proj.weight", (inter, hidden)),
                   (p + "mlp.up_proj.weight", (inter, hidden)), (p + "mlp.down_proj.weight", (hidden, inter))]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": max(1, hidden // 128),
              "num_key_value_heads": max(1, hidden // 128), "vocab_size": vocab, "max_position_embeddings": 2048,
              "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
              "hidden_act": "silu", "rope_theta": 10000.0}
    return shapes, config


def generate(folder: Path, params: float, n_models: int, dtype_name: str, shard_size: str) -> dict:
    """Write base/ and ft0..ftN-1/ (sharded safetensors + config.json), one tensor at a time."""
    import torch

    from calm_fast.io import OutputSpec, SafetensorsWriter, parse_dtype

    dtype = parse_dtype(dtype_name)
    shapes, config = llama_shapes(params)
    marker = {"params": params, "models": n_models, "dtype": dtype_name, "shapes": len(shapes),
              "numel": sum(math.prod(s) for _, s in shapes), "shard_size": shard_size, "version": 2}
    mfile = folder / "generated.json"
    if mfile.exists() and json.loads(mfile.read_text()) == marker:
        return marker
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    specs = [OutputSpec(n, s, dtype) for n, s in shapes]
    for m in ["base"] + [f"ft{i}" for i in range(n_models)]:
        t0 = time.perf_counter()
        with SafetensorsWriter(folder / m, specs, max_shard_size=shard_size, fsync=False) as w:
            for j, (name, shape) in enumerate(shapes):
                g = torch.Generator().manual_seed(1000 + j)
                if name.endswith("norm.weight"):
                    x = torch.ones(shape) + 0.01 * torch.randn(shape, generator=g)
                else:
                    x = torch.randn(shape, generator=g) * 0.02
                if m != "base":
                    gd = torch.Generator().manual_seed(7919 * (int(m[2:]) + 1) + j)
                    x += torch.randn(shape, generator=gd) * 0.002  # the "fine-tuning" delta
                w.write(name, x.to(dtype))
                del x
            w.commit()
        (folder / m / "config.json").write_text(json.dumps(config, indent=2))
        print(f"  generated {m} in {time.perf_counter() - t0:.1f}s", flush=True)
    mfile.write_text(json.dumps(marker))
    return marker


# ------------------------------------------------------------------------------------------------
# measured subprocesses
# ------------------------------------------------------------------------------------------------
_MEASURE = r"""
import json, os, resource, subprocess, sys, time
t0 = time.perf_counter()
r = subprocess.run(sys.argv[1:], capture_output=True, text=True)
dt = time.perf_counter() - t0
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"rc": r.returncode, "seconds": dt, "maxrss_bytes": ru.ru_maxrss * 1024,
                  "user_s": ru.ru_utime, "sys_s": ru.ru_stime, "stdout": r.stdout[-20000:], "stderr": r.stderr[-4000:]}))
"""

_READ_TWICE = r"""
import json, sys, time
from calm_fast.io import open_checkpoint
import torch
paths = json.loads(sys.argv[1])
cks = [open_checkpoint(p) for p in paths]
buf = torch.empty(max(ck.info(k).nbytes for ck in cks for k in ck.keys()), dtype=torch.uint8)
n = 0
t0 = time.perf_counter()
for rep in range(2):
    for ck in cks:
        for k in ck.keys():
            x = ck.read(k, 0, ck.info(k).numel, out=buf)
            n += x.numel() * x.element_size()
print(json.dumps({"bytes": n, "seconds": time.perf_counter() - t0}))
"""

_MERGE = r"""
import json, sys, time
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
import torch
import calm_fast
from calm_fast.streaming import merge_checkpoints
a = json.loads(sys.argv[1])
torch.set_num_threads(a.get("threads") or torch.get_num_threads())
rss_after_import = status("VmRSS:")
t0 = time.perf_counter()
r = merge_checkpoints(a["base"], a["models"], a["method"], output=a["out"], overwrite=True,
                      memory_budget=a["budget"], max_shard_size=a["shard_size"], prefetch=a["prefetch"],
                      copy_config=True, **a["params"])
dt = time.perf_counter() - t0
print(json.dumps({"seconds": dt, "timings": r.timings, "passes": r.passes, "bytes_read": r.bytes_read,
                  "bytes_written": r.bytes_written, "rss_after_import": rss_after_import,
                  "peak_rss": status("VmHWM:"), "memory_estimate": r.plan.memory_estimate(),
                  "zero_sign": r.zero_sign, "patched": r.patched, "threads": torch.get_num_threads()}))
"""


def measured(cmd, env=None):
    out = subprocess.run([sys.executable, "-c", _MEASURE] + cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if res["rc"] != 0:
        raise RuntimeError(f"command failed ({res['rc']}): {' '.join(cmd[:4])}...\n{res['stderr']}")
    return res


def evict(folders):
    """Drop the files' pages from the page cache (no root needed)."""
    n = 0
    for f in folders:
        for p in Path(f).rglob("*"):
            if p.is_file():
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    n += 1
                finally:
                    os.close(fd)
    return n


def machine_info(data_dir: Path) -> dict:
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    try:
        import calm_fast

        info["calm_fast"] = calm_fast.__version__
        info["backend"] = calm_fast.backend()
    except Exception as e:  # pragma: no cover
        info["calm_fast"] = f"unavailable: {e}"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                info["ram_bytes"] = int(line.split()[1]) * 1024
        info["loadavg_at_start"] = os.getloadavg()
    except OSError:
        pass
    st = os.statvfs(data_dir)
    info["disk_free_bytes"] = st.f_bavail * st.f_frsize
    try:
        info["filesystem"] = subprocess.run(["df", "-hT", str(data_dir)], capture_output=True, text=True).stdout
    except OSError:
        pass
    return info


def compare_outputs(calm_dir: Path, mk_dir: Path, base: str = None, models=(), density: float = 0.2) -> dict:
    """Elementwise agreement of two merged checkpoints (tensor by tensor, bounded memory).  With the inputs
    given, also counts the differing elements that are *not* at a per-tensor threshold tie of some task
    (|tau_t| equal to its k-th smallest value): where the two TIES rules can legitimately disagree."""
    import torch

    from calm_fast.io import open_checkpoint

    a, b = open_checkpoint(calm_dir), open_checkpoint(mk_dir)
    bck = open_checkpoint(base) if base else None
    mcks = [open_checkpoint(m) for m in models]
    n = differ = differ_off_ties = 0
    max_abs = 0.0
    missing = [k for k in a.keys() if k not in b]
    for k in a.keys():
        if k not in b:
            continue
        x, y = a.read(k).float(), b.read(k).float()
        if x.shape != y.shape:
            missing.append(k)
            continue
        d = (x - y).abs()
        n += d.numel()
        differ += int((d > 0).sum())
        max_abs = max(max_abs, float(d.max()) if d.numel() else 0.0)
        if bck is not None and d.numel():
            bb = bck.read(k).float()
            kk = bb.numel() - int(density * bb.numel()) + 1  # the k-th largest (per-tensor exact-k rank)
            tied = torch.zeros(d.shape, dtype=torch.bool)
            for m in mcks:
                tau = (m.read(k).float() - bb).abs()
                if 0 < kk <= bb.numel():
                    tied |= tau == torch.kthvalue(tau.reshape(-1), kk).values
            differ_off_ties += int(((d > 0) & ~tied).sum())
    mode = None
    try:
        import json as _json

        with open(next(Path(calm_dir).glob("*.safetensors")), "rb") as f:
            hdr = _json.loads(f.read(int.from_bytes(f.read(8), "little")))
        mode = _json.loads(hdr["__metadata__"]["calm_fast.params"]).get("mode")
    except Exception:
        pass
    frac = differ / max(n, 1)
    extra = {"differing_not_at_a_threshold_tie": differ_off_ties} if bck is not None else {}
    return {"elements": n, "differing": differ, "fraction_differing": frac, "max_abs_diff": max_abs, **extra,
            "tensors_missing_or_reshaped": missing, "calm_fast_run": f"ties mode={mode}",
            "summary": f"{frac:.4%} of {n:,} elements differ, max |diff| {max_abs:.3g}"
                       + (f"; {differ_off_ties:,} of them away from threshold ties" if bck is not None else ""),
            "note": "calm_fast's own ties (global, or per_tensor keeping exactly k with every tie at the k-th "
                    "value) is a different method from mergekit's ties (weights, normalize, lambda 1); for "
                    "mergekit's result run the mergekit config itself (benchmarks/bench_mergekit_configs.py)"}


def find_mergekit(explicit: str | None):
    if explicit:
        return explicit if Path(explicit).exists() else None
    for cand in (shutil.which("mergekit-yaml"), "/work/peer/mkvenv/bin/mergekit-yaml"):
        if cand and Path(cand).exists():
            return cand
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=1e9, help="parameters per model (default 1e9)")
    ap.add_argument("--models", type=int, default=4, help="fine-tuned models to merge (default 4)")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--dir", default=None, help="data folder (default: a folder under the system temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    ap.add_argument("--method", default="ties")
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--mode", default="global", choices=("global", "per_tensor"))
    ap.add_argument("--budget", default="1GiB", help="calm_fast memory budget")
    ap.add_argument("--shard-size", default="2GB")
    ap.add_argument("--no-prefetch", action="store_true")
    ap.add_argument("--cold", action="store_true", help="evict the inputs from the page cache before each run")
    ap.add_argument("--mergekit", default=None, help="path of mergekit-yaml (default: auto-detect)")
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument("--per-tensor-too", action="store_true", help="also run calm_fast per-tensor TIES (1 pass)")
    ap.add_argument("--tag", default=None)
    args = ap.parse_args(argv)

    data = Path(args.dir) if args.dir else Path(tempfile.gettempdir()) / f"calm_fast_bench_{int(args.params):d}"
    data.mkdir(parents=True, exist_ok=True)
    shapes, _ = llama_shapes(args.params)
    numel = sum(math.prod(s) for _, s in shapes)
    import torch

    from calm_fast.io import format_bytes, parse_dtype

    esize = torch.empty((), dtype=parse_dtype(args.dtype)).element_size()
    need = numel * esize * (args.models + 1 + 2)
    free = os.statvfs(data).f_bavail * os.statvfs(data).f_frsize
    print(f"model: {numel:,} parameters ({len(shapes)} tensors, {args.dtype}), {format_bytes(numel * esize)} per "
          f"model; needs about {format_bytes(need)} of disk, {format_bytes(free)} free")
    if need > free:
        print("not enough disk space", file=sys.stderr)
        return 2
    info = machine_info(data)
    t0 = time.perf_counter()
    generate(data, args.params, args.models, args.dtype, args.shard_size)
    gen_s = time.perf_counter() - t0
    base, models = str(data / "base"), [str(data / f"ft{i}") for i in range(args.models)]
    inputs = [base] + models
    input_bytes = numel * esize * (args.models + 1)
    largest = max(math.prod(s) for _, s in shapes) * esize
    results = {"machine": info, "setting": {**vars(args), "numel": numel, "tensors": len(shapes),
                                            "input_bytes": input_bytes, "largest_tensor_bytes": largest,
                                            "generation_seconds": gen_s, "data_dir": str(data)}, "runs": {}}

    def cold():
        if args.cold:
            evict(inputs + [str(data / "out_calm"), str(data / "out_mergekit")])

    # baseline: read all inputs twice (same pread reader, reused buffer)
    cold()
    r = measured([sys.executable, "-c", _READ_TWICE, json.dumps(inputs)])
    base_read = json.loads(r["stdout"].strip().splitlines()[-1])
    results["runs"]["read_inputs_twice"] = {**base_read, "maxrss_bytes": r["maxrss_bytes"],
                                            "GBps": base_read["bytes"] / base_read["seconds"] / 1e9}
    print(f"read inputs twice: {base_read['seconds']:.1f}s ({base_read['bytes'] / base_read['seconds'] / 1e9:.2f} GB/s)",
          flush=True)

    def run_calm(tag, params):
        cold()
        arg = {"base": base, "models": models, "method": args.method, "out": str(data / "out_calm"),
               "budget": args.budget, "shard_size": args.shard_size, "prefetch": not args.no_prefetch,
               "params": params}
        r = measured([sys.executable, "-c", _MERGE, json.dumps(arg)])
        m = json.loads(r["stdout"].strip().splitlines()[-1])
        m["maxrss_bytes"] = r["maxrss_bytes"]
        m["user_s"], m["sys_s"] = r["user_s"], r["sys_s"]
        m["time_vs_read_twice"] = m["seconds"] / base_read["seconds"]
        m["rss_target_bytes"] = 2 * 10**9 + largest
        m["meets_rss_target"] = m["peak_rss"] <= m["rss_target_bytes"]
        m["meets_time_target"] = m["time_vs_read_twice"] <= 2.0
        results["runs"][tag] = m
        print(f"{tag}: {m['seconds']:.1f}s ({m['time_vs_read_twice']:.2f}x read-twice), {m['passes']} passes, "
              f"peak RSS {format_bytes(m['peak_rss'])} (after import {format_bytes(m['rss_after_import'])}; "
              f"target {format_bytes(m['rss_target_bytes'])}); phases "
              + ", ".join(f"{k} {v:.1f}s" for k, v in m["timings"].items()), flush=True)

    run_calm(f"calm_fast_{args.method}_{args.mode}", {"density": args.density, "mode": args.mode, "merge": "sum",
                                                      "scaling": 1.0})
    if args.per_tensor_too and args.mode != "per_tensor":
        run_calm(f"calm_fast_{args.method}_per_tensor", {"density": args.density, "mode": "per_tensor",
                                                         "merge": "sum", "scaling": 1.0})

    mk = None if args.no_mergekit else find_mergekit(args.mergekit)
    if mk:
        cfg = {"merge_method": "ties", "base_model": base,
               "models": [{"model": m, "parameters": {"density": args.density, "weight": 1.0}} for m in models],
               "parameters": {"normalize": False, "int8_mask": False, "lambda": 1.0}, "dtype": "float32",
               "out_dtype": "bfloat16"}
        import yaml

        (data / "mergekit.yaml").write_text(yaml.safe_dump(cfg))
        shutil.rmtree(data / "out_mergekit", ignore_errors=True)
        cold()
        try:
            r = measured([mk, str(data / "mergekit.yaml"), str(data / "out_mergekit"), "--lazy-unpickle",
                          "--out-shard-size", "2B", "--no-cuda", "--allow-crimes"])
            m = {"seconds": r["seconds"], "maxrss_bytes": r["maxrss_bytes"], "user_s": r["user_s"],
                 "sys_s": r["sys_s"], "time_vs_read_twice": r["seconds"] / base_read["seconds"],
                 "mergekit": mk, "config": cfg,
                 "note": "mergekit TIES: per-tensor magnitude top-k, computed in fp32 (dtype: float32), bf16 output"}
            results["runs"]["mergekit_ties"] = m
            print(f"mergekit ties: {m['seconds']:.1f}s ({m['time_vs_read_twice']:.2f}x read-twice), "
                  f"peak RSS {format_bytes(m['maxrss_bytes'])}", flush=True)
        except RuntimeError as e:
            results["runs"]["mergekit_ties"] = {"error": str(e)[-3000:]}
            print(f"mergekit failed: {str(e)[-800:]}", flush=True)
        if "error" not in results["runs"]["mergekit_ties"] and (data / "out_calm").exists():
            per_tensor = args.per_tensor_too or args.mode == "per_tensor"
            results["runs"]["mergekit_vs_calm_fast"] = compare_outputs(
                data / "out_calm", data / "out_mergekit", base if per_tensor else None,
                models if per_tensor else (), args.density)
            print(f"output comparison (calm_fast {results['runs']['mergekit_vs_calm_fast']['calm_fast_run']} vs "
                  f"mergekit): {results['runs']['mergekit_vs_calm_fast']['summary']}", flush=True)
    else:
        results["runs"]["mergekit_ties"] = {"skipped": "mergekit-yaml not found (pip install mergekit into a venv "
                                                       "that reuses this torch, then pass --mergekit PATH)"}

    try:
        results["machine"]["loadavg_at_end"] = os.getloadavg()
    except OSError:
        pass
    tag = args.tag or f"{args.method}_{args.mode}_{numel / 1e9:.2f}B_{args.models}x_{args.dtype}" + (
        "_cold" if args.cold else "")
    out = HERE / "results" / f"streaming_{tag}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"results: {out}")
    if not args.keep and not args.dir:
        shutil.rmtree(data, ignore_errors=True)
    else:
        shutil.rmtree(data / "out_calm", ignore_errors=True)
        shutil.rmtree(data / "out_mergekit", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
