"""CALM benchmark: where an iteration's time goes, the fused update vs plain torch, and peak memory.

    python benchmarks/bench_calm.py                       # all three parts, threads 1 and 2
    python benchmarks/bench_calm.py --parts update --threads 1 --n-scale 0.25

Parts:
  iteration  A whole ``calm_fast.calm`` run on a MiniLM-L6-sized encoder (22.7M masked parameters: BERT
             embeddings 30522x384 + 6 layers, hidden 384, FFN 1536, built in code, random weights),
             batch 32, 2 seen tasks x 2 batches per iteration: time per iteration split into network
             (forward + backward) and everything else (CALM's accumulate + mask step), default and
             faithful modes.  Peak memory of the run beyond its inputs (VmHWM after resetting it, minus
             the RSS before the call) in units of N fp32 values.
  update     The non-network part of one iteration at ViT-B/32 size (N = 87,849,216 in its 152 tensors):
             calm_fast's fused ops vs the same steps written as plain torch ops in the official code's
             style (per batch: clone the grads, A += eta * (-g*tau_prev + g*tau_new) with temporaries; per
             iteration: sigmoid, d, the update, the interpolated model rebuilt and copied into the
             parameters), measured in one run.  Per batch and per iteration, then an iteration of B
             batches (B = 4: two seen tasks; B = 14: the official step 1) = B accumulates + one step;
             the fused default accumulates once per iteration (autograd sums the batches' gradients).

Results: benchmarks/results/calm_<date>.json and a markdown table on stdout.  The machine's load
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
import subprocess
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's calm_fast
import calm_fast  # noqa: E402
from calm_fast import ops  # noqa: E402
from calm_fast.models import GenericAdapter  # noqa: E402


def load() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"


def rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def timeit(fn, reps: int):
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


# ------------------------------------------------------------------------------------------------
# Part 1: a CALM iteration on a MiniLM-sized encoder
# ------------------------------------------------------------------------------------------------
class MiniEncoder(nn.Module):
    """BERT-shaped encoder (MiniLM-L6-H384 sizes: 22,713,216 parameters), [CLS] pooler features."""

    def __init__(self, vocab=30522, hidden=384, layers=6, heads=12, ffn=1536, max_len=512):
        super().__init__()
        self.tok = nn.Embedding(vocab, hidden)
        self.pos = nn.Embedding(max_len, hidden)
        self.typ = nn.Embedding(2, hidden)
        self.ln = nn.LayerNorm(hidden)
        layer = nn.TransformerEncoderLayer(hidden, heads, ffn, dropout=0.0, activation="gelu", batch_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

        self.pooler = nn.Linear(hidden, hidden)

    def forward(self, ids):
        pos = torch.arange(ids.shape[1], device=ids.device)
        h = self.ln(self.tok(ids) + self.pos(pos)[None] + self.typ.weight[0])
        return torch.tanh(self.pooler(self.enc(h)[:, 0]))


def part_iteration(args, out):
    torch.manual_seed(0)
    enc = MiniEncoder()
    n = sum(p.numel() for p in enc.parameters())
    C = 2
    heads = {t: nn.Linear(384, C).requires_grad_(False) for t in ("t0", "t1")}
    adapter = GenericAdapter(enc, heads)
    pre = {k: v.detach().clone() for k, v in enc.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    fts = [{k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in pre.items()} for _ in heads]
    samples = 100  # credible 90 at ratio 0.9: two batches of 32 per task
    data = {t: torch.randint(0, 30522, (samples, args.seq_len), generator=g) for t in heads}
    logits = {t: torch.randn(samples, C, generator=g) for t in heads}
    rows = []
    for faithful in [args.mode == "faithful"]:
        gc.collect()
        base_rss = rss_bytes("VmRSS")
        peak_ok = reset_peak()
        t0 = time.perf_counter()
        res = calm_fast.calm(pre, fts, adapter, data, schedule=[["t0"], ["t1"]], teacher_logits=logits,
                             iterations=args.iterations, batch_size=32, sparsity=1e-5, progress=False,
                             faithful=faithful, eval_batch_size=32)
        wall = time.perf_counter() - t0
        peak = rss_bytes("VmHWM") - base_rss if peak_ok else None
        st = res.steps[1]["timings"]
        it = args.iterations
        net, upd = st["network_s"] / it, st["mask_update_s"] / it
        rows.append({"mode": "faithful" if faithful else "default", "N": n, "batch": 32, "seq_len": args.seq_len,
                     "batches_per_iteration": 4, "iterations": it, "network_s_per_iter": net,
                     "calm_update_s_per_iter": upd, "non_network_fraction": upd / (net + upd),
                     "run_s": wall, "peak_beyond_inputs_bytes": peak,
                     "peak_beyond_inputs_xN": (peak / (4 * n)) if peak is not None else None})
        del res
    return rows


def part_iteration_fresh(args, threads):
    """Each mode in a fresh process, so that the peak-memory reading starts clean."""
    import tempfile

    rows = []
    for mode in ("default", "faithful"):
        with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
            subprocess.run([sys.executable, os.path.abspath(__file__), "--parts", "iteration1", "--mode", mode,
                            "--threads", str(threads), "--iterations", str(args.iterations), "--seq-len",
                            str(args.seq_len), "--out", tmp.name], check=True)
            with open(tmp.name) as f:
                rows += json.load(f)["rows"]
    return rows


# ------------------------------------------------------------------------------------------------
# Part 2: the non-network part at ViT-B/32 size, fused vs plain torch
# ------------------------------------------------------------------------------------------------
def vit_b32_shapes():
    """The 152 trainable tensors of open_clip ViT-B/32's image tower (87,849,216 values)."""
    s = [(768, 3, 32, 32), (768,), (50, 768), (768,), (768,)]
    for _ in range(12):
        s += [(768,), (768,), (2304, 768), (2304,), (768, 768), (768,), (768,), (768,), (3072, 768), (3072,),
              (768, 3072), (768,)]
    s += [(768,), (768,), (768, 512)]
    return s


def part_update(args, out, threads):
    shapes = vit_b32_shapes()
    if args.n_scale != 1.0:  # scale the big matrices' first dimension (quick runs)
        shapes = [(max(1, int(sh[0] * args.n_scale)),) + tuple(sh[1:]) if len(sh) > 1 else sh for sh in shapes]
    n = sum(math.prod(sh) for sh in shapes)
    g = torch.Generator().manual_seed(0)

    def rand(scale=1.0):
        return [torch.randn(sh, generator=g) * scale for sh in shapes]

    base, tau_prev, tau_new, grad = rand(), rand(0.01), rand(0.01), rand(1e-6)
    R = [torch.where(torch.rand(sh, generator=g) < 1e-5, 5.0, -5.0) for sh in shapes]
    A = [torch.zeros(sh) for sh in shapes]
    theta = [torch.empty(sh) for sh in shapes]
    eta, alpha = 1e7, 1.0
    R0 = [r.clone() for r in R]

    # -- the official code's style (per tensor, plain torch, temporaries) --
    def torch_accumulate():
        gs = [x.clone() for x in grad]  # the official code clones every gradient
        for a, gg, p, q in zip(A, gs, tau_prev, tau_new):
            a += eta * (-gg * p + gg * q)

    def torch_step():
        for l in range(len(R)):
            s = torch.sigmoid(R[l])
            d = s * (1 - s)
            R[l] = R[l] - (A[l] * d - alpha * torch.where(R[l] > 0, d, -d))
            A[l] = torch.zeros_like(A[l])
        for l in range(len(R)):  # the interpolated model, rebuilt and loaded into the parameters
            s = torch.sigmoid(R[l])
            theta[l].copy_(base[l] + (1 - s) * tau_prev[l] + s * tau_new[l])

    def fused_accumulate_faithful():
        ops.calm_accumulate_(A, grad, tau_prev, tau_new, eta, faithful=True)

    def fused_accumulate():
        ops.calm_accumulate_(A, grad, tau_prev, tau_new, eta, faithful=False)

    def fused_step_faithful():
        ops.calm_mask_step_(R, A, alpha, True, theta=theta, base=base, tau_prev=tau_prev, tau_new=tau_new)

    def fused_step():
        ops.calm_mask_step_(R, A, alpha, False, theta=theta, base=base, tau_prev=tau_prev, tau_new=tau_new)

    def reset():
        for r, r0 in zip(R, R0):
            r.copy_(r0)

    reps = args.reps
    t = {}
    for name, fn in [("torch_accumulate", torch_accumulate), ("fused_accumulate_faithful", fused_accumulate_faithful),
                     ("fused_accumulate", fused_accumulate), ("torch_step", torch_step),
                     ("fused_step_faithful", fused_step_faithful), ("fused_step", fused_step)]:
        reset()
        gc.collect()
        t[name] = timeit(fn, reps)
    rows = []
    for B in (4, 14):
        plain = B * t["torch_accumulate"] + t["torch_step"]
        faithful = B * t["fused_accumulate_faithful"] + t["fused_step_faithful"]
        default = t["fused_accumulate"] + t["fused_step"]
        rows.append({"threads": threads, "N": n, "batches": B, "torch_s": plain, "fused_faithful_s": faithful,
                     "fused_default_s": default, "speedup_faithful": plain / faithful,
                     "speedup_default": plain / default})
    out.setdefault("update", []).append({"threads": threads, "N": n, "per_call_s": t, "per_iteration": rows})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="iteration,update")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--n-scale", type=float, default=1.0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--mode", default="default", help=argparse.SUPPRESS)
    args = ap.parse_args()
    parts = args.parts.split(",")
    out: dict = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "machine": platform.machine(),
           "cpus": os.cpu_count(), "torch": torch.__version__, "backend": calm_fast.backend(),
           "load_before": load()}
    if parts == ["iteration1"]:  # internal: one mode of part 1 in this process
        torch.set_num_threads(int(args.threads))
        with open(args.out, "w") as f:
            json.dump({"rows": part_iteration(args, out)}, f)
        return
    for threads in [int(x) for x in args.threads.split(",")]:
        torch.set_num_threads(threads)
        if "iteration" in parts:
            rows = part_iteration_fresh(args, threads)
            out.setdefault("iteration", []).append({"threads": threads, "rows": rows})
            for r in rows:
                print(f"[{threads} thr] MiniLM-L6 N={r['N']:,} {r['mode']:8s}: network {r['network_s_per_iter']:.3f} s/it, "
                      f"CALM update {r['calm_update_s_per_iter']:.4f} s/it ({100 * r['non_network_fraction']:.1f}%), "
                      f"peak beyond inputs {r['peak_beyond_inputs_xN']:.2f} N", flush=True)
        if "update" in parts:
            for r in part_update(args, out, threads):
                print(f"[{threads} thr] N={r['N']:,} B={r['batches']:2d}: torch {r['torch_s']:.3f} s, fused faithful "
                      f"{r['fused_faithful_s']:.3f} s ({r['speedup_faithful']:.1f}x), fused default "
                      f"{r['fused_default_s']:.3f} s ({r['speedup_default']:.1f}x)", flush=True)
    out["load_after"] = load()
    path = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                    f"calm_{_dt.date.today().isoformat()}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print("load:", out["load_before"], "->", out["load_after"])
    print("wrote", path)


if __name__ == "__main__":
    main()
