"""Kernel benchmark report (``calm-fast bench``): calm_fast's fused ops vs the plain-PyTorch reference
pipelines, measured in one run.

    calm-fast bench                                  # small and quick: T=4 task vectors of N=1M fp32
    calm-fast bench --n 88000000 --tasks 8 --ref-n 22000000    # ViT-B/32-sized (needs ~8 GB of memory)
    calm-fast bench --n 8000000 --dtype bfloat16 --device cuda --out cuda_bf16.json

``benchmarks/report.py`` in the source tree runs this report with ViT-B/32-sized defaults and keeps the
JSON under ``benchmarks/results/``.

For every row: op, N, T, dtype, median time (and the warm-up call's time), achieved GB/s (bytes-moved model below / time), % of the
machine's copy bandwidth measured in the same run, the speed-up over the reference measured in the
same run (at --ref-n elements if the reference does not fit in memory at --n: the ratio is then taken
at that size, and the table says so), and the peak memory the call allocated beyond its inputs
(VmHWM on Linux CPU runs, torch.cuda.max_memory_allocated on CUDA) in units of one task vector.

Bytes-moved model (b = bytes per element of the inputs, ob of the output; the minimum DRAM traffic):
  threshold (exact k-th |tau|, one bracket pass)      T * N * b
  ties (threshold + one fused merge pass)             2 * T * N * b + N * ob      (+ base: N * b per pass)
  task arithmetic / dare (one fused pass)             T * N * b + N * ob
  consensus (one fused pass)                          T * N * b + N * ob
  calm interpolate (R fp32; base, taus: b)            4N + 3 * N * b + N * ob
  calm accumulate (A fp32 read + write; grad, taus)   8N + 3 * N * b
  calm mask step + theta rewrite                      16N (R, A read + write) + 3 * N * b + N * ob
  calm binarize merge                                 4N + 2 * N * b + N * ob
  (CALM rows are per call and independent of T.)
Copy bandwidth = 2 * bytes / time of dst.copy_(src) on a large buffer (read + write).

The table is printed as markdown; ``--out FILE`` also writes the JSON (rows, machine facts, arguments).
Timings are measurements of this machine at this moment (other processes included), never asserted.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import sys
import time
from typing import Optional, Sequence

import torch

import calm_fast
from calm_fast import ops, reference, selection

#: defaults of ``calm-fast bench``: small enough for any machine in a few seconds
SMALL_DEFAULTS = {"n": 1_000_000, "tasks": 4, "ref_n": 0, "repeat": 3, "ref_repeat": 1}


# ------------------------------------------------------------------------------------------------
# Machine facts
# ------------------------------------------------------------------------------------------------
def machine_info(device: str) -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "calm_fast": calm_fast.__version__,
        "backend": calm_fast.backend(),
        "cuda_kernels_built": calm_fast.cuda_kernels_built(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "device": device,
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        info["load_avg_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Timing(float):
    """Median seconds of the timed repeats; ``.first`` is the untimed warm-up call, kept because it is what a
    one-shot merge pays: first-touch page faults of fresh output memory (large on VMs), lazy init."""

    first: float = float("nan")


def timeit(fn, device: str, repeat: int) -> Timing:
    t0 = time.perf_counter()
    fn()  # warm-up (first-touch page faults, lazy init)
    sync(device)
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    t = Timing(statistics.median(times))
    t.first = first
    return t


def copy_bandwidth(device: str, nbytes: int = 1 << 29) -> float:
    """GB/s of a large copy (read + write), the machine's practical memory bandwidth."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src), device, 5)
    return 2 * nbytes / t / 1e9


class PeakMemory:
    """Peak bytes allocated by a call beyond what was resident before it."""

    def __init__(self, device: str):
        self.device = device

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
        return 0

    def measure(self, fn) -> int | None:
        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            out = fn()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - before
            del out
            return peak
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
        except OSError:
            return None
        before = self._status("VmRSS:")
        out = fn()
        peak = self._status("VmHWM:") - before
        del out
        return peak


# ------------------------------------------------------------------------------------------------
# The benchmark rows
# ------------------------------------------------------------------------------------------------
def make_task_vectors(T: int, n: int, dtype, device, tensors: int = 4):
    g = torch.Generator().manual_seed(0)
    sizes = [n // tensors] * (tensors - 1) + [n - (n // tensors) * (tensors - 1)]
    xs = []
    for _ in range(T):
        for s in sizes:
            xs.append((torch.randn(s, generator=g) * 1e-3).to(dtype).to(device))
    return xs, sizes


def calm_inputs(n: int, dtype, device, tensors: int = 4) -> dict:
    """CALM mask-training operands of n elements in `tensors` tensors: fp32 R (init-like +-5) and A;
    base, taus, grads and theta in `dtype`."""
    g = torch.Generator().manual_seed(1)
    sizes = [n // tensors] * (tensors - 1) + [n - (n // tensors) * (tensors - 1)]

    def lst(scale, dt=dtype):
        return [(torch.randn(s, generator=g) * scale).to(dt).to(device) for s in sizes]

    R = [torch.where(torch.rand(s, generator=g) < 1e-3, 5.0, -5.0).to(device) for s in sizes]
    return dict(R=R, A=lst(1.0, torch.float32), base=lst(1.0), prev=lst(1e-3), new=lst(1e-3), grad=lst(1e-6),
                theta=[torch.empty(s, dtype=dtype, device=device) for s in sizes])


def calm_timings(impl, d: dict, device: str, repeat: int) -> dict:
    """Seconds of one call of each CALM op through `impl` (calm_fast.ops or the reference ops)."""
    ref = impl is reference.ReferenceOps
    interp = (lambda: impl.calm_interpolate(d["base"], d["prev"], d["new"], d["R"], "fused", False)) if ref else \
        (lambda: impl.calm_interpolate(d["base"], d["prev"], d["new"], d["R"], "fused"))
    acc = (lambda: impl.calm_accumulate_(d["A"], d["grad"], d["prev"], d["new"], 1e7, False)) if ref else \
        (lambda: impl.calm_accumulate_(d["A"], d["grad"], d["prev"], d["new"], 1e7))
    step = (lambda: impl.calm_mask_step_(d["R"], d["A"], 1.0, False, d["theta"], d["base"], d["prev"], d["new"],
                                         "fused")) if ref else \
        (lambda: impl.calm_mask_step_(d["R"], d["A"], 1.0, False, d["theta"], d["base"], d["prev"], d["new"]))
    binar = lambda: impl.calm_binarize_merge(d["prev"], d["new"], d["R"])  # noqa: E731
    return {"interpolate": timeit(interp, device, repeat), "accumulate": timeit(acc, device, repeat),
            "step": timeit(step, device, repeat), "binarize": timeit(binar, device, repeat)}


def run(args) -> dict:
    device = args.device
    dtype = getattr(torch, args.dtype)
    T, N = args.tasks, args.n
    b = torch.finfo(dtype).bits // 8
    # a buffer well beyond the caches, but not larger than the run itself needs (small runs stay small)
    bw = copy_bandwidth(device, int(min(1 << 29, max(1 << 24, 2 * T * N * b))))
    mem = PeakMemory(device)
    rows = []

    xs, sizes = make_task_vectors(T, N, dtype, device)
    L = len(sizes)
    k = selection.topk_fraction_to_k(N, 0.2)
    tv_bytes = N * b

    def add(op, seconds, bytes_moved, ref_seconds=None, ref_n=None, peak=None, note=""):
        rows.append({
            "op": op, "N": N, "T": T, "dtype": args.dtype, "seconds": float(seconds),
            "first_call_seconds": getattr(seconds, "first", None),
            "GB/s": bytes_moved / seconds / 1e9, "pct_copy_bw": 100 * bytes_moved / seconds / 1e9 / bw,
            "speedup_vs_reference": (ref_seconds / seconds * (N / ref_n if ref_n else 1)) if ref_seconds else None,
            "reference_seconds": ref_seconds, "reference_N": ref_n,
            "peak_extra_task_vectors": (peak / tv_bytes) if peak is not None else None, "note": note,
        })

    # --- thresholds
    t1 = timeit(lambda: selection.kth_smallest_abs(xs[:L], None, 1, [k]), device, args.repeat)
    tT = timeit(lambda: selection.kth_smallest_abs(xs, None, T, [k] * T), device, args.repeat)
    thr = selection.kth_smallest_abs(xs, None, T, [k] * T)

    # --- fused passes
    thr_tab = thr[:, None].expand(T, L).contiguous()

    def ties_full():
        th = selection.kth_smallest_abs(xs, None, T, [k] * T)
        return ops.ties_merge(xs, None, T, th[:, None].expand(T, L).contiguous(), "mean", 0.3)[0]

    t_ties = timeit(ties_full, device, args.repeat)
    t_ties_pass = timeit(lambda: ops.ties_merge(xs, None, T, thr_tab, "mean", 0.3)[0], device, args.repeat)
    t_ta = timeit(lambda: ops.weighted_merge(xs, None, T, 1.0, 0.3)[0], device, args.repeat)
    keys = ops.dare_keys(0, [str(i) for i in range(L)], T, device)
    t_dare = timeit(lambda: ops.weighted_merge(xs, None, T, 1.0, 0.3, dare_p=0.5, dare_keys=keys)[0], device,
                    args.repeat)
    t_cons = timeit(lambda: ops.consensus_merge(xs, None, T, 0.6, min_count=2, alpha=0.3)[0], device, args.repeat)
    peak_ties = mem.measure(ties_full) if args.memory else None
    peak_thr = mem.measure(lambda: selection.kth_smallest_abs(xs, None, T, [k] * T)) if args.memory else None

    # --- references (plain torch pipelines), possibly at a smaller size
    ref_n = min(N, args.ref_n) if args.ref_n else N
    ref_n_note = ref_n if ref_n != N else None
    rxs = list(xs) if ref_n == N else make_task_vectors(T, ref_n, dtype, device)[0]
    rsizes = [x.numel() for x in rxs[:L]]
    rk = selection.topk_fraction_to_k(ref_n, 0.2)
    names = [f"p{i}" for i in range(L)]
    zero_sd = {nm: torch.zeros(s, dtype=dtype, device=device) for nm, s in zip(names, rsizes)}
    tvs = [{nm: rxs[t * L + l] for l, nm in enumerate(names)} for t in range(T)]
    xs.clear()  # free the full-size inputs before the references run
    gc.collect()

    def ref_kth():
        return torch.kthvalue(torch.cat([x.abs().reshape(-1).float() for x in rxs[:L]]), rk).values

    r_thr = timeit(ref_kth, device, max(1, args.repeat // 2))
    r_ties = timeit(lambda: reference.ties_merging_reference(zero_sd, tvs, density=0.2, merge="mean", scaling=0.3),
                    device, max(1, args.ref_repeat))
    r_ta = timeit(lambda: reference.task_arithmetic_reference(zero_sd, tvs, 0.3), device, max(1, args.ref_repeat))
    r_cons = timeit(lambda: reference.consensus_merging_reference(zero_sd, tvs, 0.6, 2, 0.3), device,
                    max(1, args.ref_repeat))

    # --- CALM mask training (per call; the inputs of the merges above are freed first)
    rxs.clear()
    del zero_sd, tvs
    gc.collect()
    cd = calm_inputs(N, dtype, device)
    t_calm = calm_timings(ops, cd, device, args.repeat)
    del cd
    gc.collect()
    rcd = calm_inputs(ref_n, dtype, device)
    r_calm = calm_timings(reference.ReferenceOps, rcd, device, max(1, args.ref_repeat))
    del rcd
    gc.collect()

    ob = b
    add("threshold (1 task)", t1, N * b, r_thr, ref_n_note, note="exact k-th |x|, 20% kept")
    add(f"threshold ({T} tasks)", tT, T * N * b, r_thr * T, ref_n_note, peak_thr)
    add("ties merge pass only", t_ties_pass, T * N * b + N * ob)
    add("ties (threshold + merge)", t_ties, 2 * T * N * b + N * ob, r_ties, ref_n_note, peak_ties,
        "reference: flatten + kthvalue + sign + disjoint mean")
    add("task arithmetic", t_ta, T * N * b + N * ob, r_ta, ref_n_note)
    add("dare + task arithmetic", t_dare, T * N * b + N * ob)
    add("consensus (TALL k=2)", t_cons, T * N * b + N * ob, r_cons, ref_n_note)
    calm_note = "per call, independent of T"
    add("calm interpolate (fused)", t_calm["interpolate"], 4 * N + 4 * N * b, r_calm["interpolate"], ref_n_note,
        note=calm_note)
    add("calm accumulate (one batch)", t_calm["accumulate"], 8 * N + 3 * N * b, r_calm["accumulate"], ref_n_note,
        note=calm_note)
    add("calm mask step + theta rewrite", t_calm["step"], 16 * N + 4 * N * b, r_calm["step"], ref_n_note,
        note=calm_note)
    add("calm binarize merge", t_calm["binarize"], 4 * N + 3 * N * b, r_calm["binarize"], ref_n_note, note=calm_note)
    return {"machine": machine_info(device), "copy_bandwidth_GBps": bw, "rows": rows,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "args": vars(args)}


def to_markdown(result: dict) -> str:
    m = result["machine"]
    head = (f"Machine: {m.get('gpu', m['cpu'])}, {m['threads']} threads, torch {m['torch']}, backend {m['backend']}; "
            f"copy bandwidth {result['copy_bandwidth_GBps']:.1f} GB/s; load {m.get('load_avg_1m', 'n/a')}; "
            f"{result['date']}\n\n")
    lines = ["| op | N | T | dtype | time (s) | first call (s) | GB/s | % copy BW | speed-up vs reference | "
             "peak extra (task vectors) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        sp = "—"
        if r["speedup_vs_reference"]:
            sp = f"{r['speedup_vs_reference']:.1f}x"
            if r["reference_N"]:
                sp += f" (ref at N={r['reference_N']:,}, time scaled by N)"
        pk = f"{r['peak_extra_task_vectors']:.2f}" if r["peak_extra_task_vectors"] is not None else "—"
        first = r.get("first_call_seconds")
        first = f"{first:.3f}" if first is not None else "—"
        lines.append(f"| {r['op']} | {r['N']:,} | {r['T']} | {r['dtype']} | {r['seconds']:.3f} | {first} | "
                     f"{r['GB/s']:.1f} | "
                     f"{r['pct_copy_bw']:.0f}% | {sp} | {pk} |")
    return head + "\n".join(lines) + "\n"


def make_parser(defaults: Optional[dict] = None, prog: Optional[str] = None) -> argparse.ArgumentParser:
    d = dict(SMALL_DEFAULTS, **(defaults or {}))
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=_positive, default=d["n"], help=f"elements per task vector (default {d['n']:,})")
    p.add_argument("--tasks", type=_positive, default=d["tasks"], help=f"task vectors T (default {d['tasks']})")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--ref-n", type=int, default=d["ref_n"],
                   help="size at which the (memory-hungry) references run; 0 = same as --n "
                        f"(default {d['ref_n'] or 'same as --n'})")
    p.add_argument("--repeat", type=_positive, default=d["repeat"], help="timed repeats per row (median)")
    p.add_argument("--ref-repeat", type=_positive, default=d["ref_repeat"])
    p.add_argument("--no-memory", dest="memory", action="store_false", help="do not measure peak memory")
    p.add_argument("--out", default=d.get("out"), help="also write the JSON result to this file")
    return p


def _positive(text: str) -> int:
    v = int(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return v


def main(argv: Optional[Sequence[str]] = None, defaults: Optional[dict] = None, prog: str = "calm-fast bench") -> int:
    """Run the report and print it; ``defaults`` overrides :data:`SMALL_DEFAULTS` (and may set ``out``, a
    JSON path template with ``{device}``, ``{dtype}`` and ``{date}``)."""
    try:
        args = make_parser(defaults, prog).parse_args(argv)
    except SystemExit as e:  # --help: 0, bad arguments: 2
        return int(e.code or 0)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"{prog}: error: --device cuda, but torch sees no CUDA device (calm_fast.cuda_available() is "
              "False)", file=sys.stderr)
        return 2
    result = run(args)
    md = to_markdown(result)
    print(md)
    if args.out:
        out = args.out.format(device=args.device, dtype=args.dtype, date=_dt.date.today().isoformat())
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(dict(result, markdown=md), f, indent=1)
        print(f"written {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
