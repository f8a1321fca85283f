"""The multi-task-training reference row: one encoder fine-tuned jointly on every task, a head per task.

What merging tries to approximate without the data.  The same layers as the individual fine-tuning
train (the top ``profile.train_layers`` layers + pooler; the bottom and the embeddings stay θ0), with the
same optimiser settings, and the **same step budget per task**: the joint run takes
``profile.multitask_steps`` steps per task (by default the individual runs' ``steps``), round-robin (step i trains on task ``i mod T``), and task
t's k-th step uses exactly the batch its individual fine-tuning used at step k (same seeded batch
sequence, same fresh head), so each task sees the same examples as on its own.  AdamW over the shared
layers and all heads, linear decay to 0 over the ``T × steps`` steps.  The result is cached like the
per-task checkpoints (``checkpoints/multitask-<hash>/``: the encoder tensors and the heads as safetensors,
plus a JSON record), keyed by the tasks, the fine-tuning hyperparameters, the budget and the encoder.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

from .encoder import Encoder, StateDict, Tokens, new_head
from .finetune import _batches
from .profiles import Profile
from .tasks import TaskData

META = "calm_fast_multitask.json"
FORMAT = 1


def cache_dir(root: Path, datas: Sequence[TaskData], profile: Profile, encoder: Encoder) -> Path:
    enc_file = encoder.path / "model.safetensors"
    ident = {"format": FORMAT, "tasks": [[d.spec.name, d.spec.fingerprint()] for d in datas],
             "hparams": profile.finetune_params(), "steps_per_task": profile.multitask_steps,
             "encoder": [str(encoder.path.name), enc_file.stat().st_size, encoder.config.num_hidden_layers]}
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return Path(root) / f"multitask-{key}"


def train_multitask(encoder: Encoder, datas: Sequence[TaskData], trains: Sequence[Tokens], profile: Profile,
                    progress=None) -> Tuple[StateDict, List[StateDict], Dict[str, object]]:
    """Joint fine-tuning (see the module docstring).  Returns (encoder tensors, heads, record)."""
    encoder.reset()
    start = encoder.num_layers - profile.train_layers
    steps = profile.multitask_steps
    T = len(datas)
    t0 = time.perf_counter()
    per_task = []  # (batches, cached bottom states of the examples used, row of each train index, labels)
    for d, train in zip(datas, trains):
        g = torch.Generator().manual_seed(profile.seed)  # the individual run's batch sequence
        batches = _batches(len(train), profile.batch_size, steps, g)
        used = torch.unique(torch.cat(batches))
        where = torch.full((len(train),), -1, dtype=torch.long)
        where[used] = torch.arange(len(used))
        sub = Tokens(train.ids[used], train.mask[used], train.lengths[used])
        per_task.append((batches, sub, where, encoder.prefix(sub, start), torch.tensor(d.train.labels)))
    heads = [{k: v.clone().requires_grad_(True) for k, v in new_head(len(d.classes), encoder.config.hidden_size,
                                                                     profile.seed).items()} for d in datas]
    params = [p for k, p in encoder.bert.named_parameters()
              if encoder.layer_of(k) >= start and not k.startswith("embeddings.")]
    for p in params:
        p.requires_grad_(True)
    head_params = [p for h in heads for p in h.values()]
    total = steps * T
    opt = torch.optim.AdamW([{"params": params, "lr": profile.lr}, {"params": head_params, "lr": profile.head_lr}],
                            weight_decay=profile.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / total)
    torch.manual_seed(profile.seed)  # dropout
    encoder.bert.train()
    losses: List[float] = []
    try:
        for i in range(total):
            t, k = i % T, i // T
            batches, sub, where, cached, labels = per_task[t]
            idx = batches[k]
            rows = where[idx]
            n = int(sub.lengths[rows].max())
            logits = encoder.suffix(cached[rows, :n], sub.mask[rows, :n], start, heads[t], train=True)
            loss = F.cross_entropy(logits, labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if not math.isfinite(losses[-1]):
                raise RuntimeError(f"multi-task training: the loss of task {datas[t].spec.name} is not finite")
            if progress is not None:
                progress.update(1)
    finally:
        encoder.bert.eval()
        for p in params:
            p.requires_grad_(False)
    enc_state = {k: v.detach().clone() for k, v in encoder.bert.state_dict().items() if k in encoder.base}
    heads_out = [{k: v.detach().clone() for k, v in h.items()} for h in heads]
    encoder.reset()
    record = {"train_seconds": time.perf_counter() - t0, "steps": total, "steps_per_task": steps,
              "first_losses": losses[:T], "last_losses": losses[-T:],
              "trained_layers": list(range(start, encoder.num_layers))}
    return enc_state, heads_out, record


def prepare_multitask(encoder: Encoder, datas: Sequence[TaskData], trains: Sequence[Tokens], profile: Profile,
                      cache_root: Path, progress_factory=None) -> Tuple[StateDict, List[StateDict], Dict[str, object]]:
    """The jointly fine-tuned encoder and heads, from the cache or trained now (then cached).
    Returns (encoder tensors, heads in ``datas`` order, record with ``trained_now``)."""
    from safetensors.torch import load_file, save_file

    path = cache_dir(cache_root, datas, profile, encoder)
    names = [d.spec.name for d in datas]
    if (path / META).is_file() and (path / "model.safetensors").is_file():
        sd = load_file(str(path / "model.safetensors"))
        record = json.loads((path / META).read_text())
        enc = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
        heads = [{k.split(".", 2)[2]: v for k, v in sd.items() if k.startswith(f"heads.{n}.")} for n in names]
        if set(enc) != set(encoder.base) or any(set(h) != {"classifier.weight", "classifier.bias"} for h in heads):
            raise ValueError(f"{path} is not a multi-task checkpoint of these tasks and this encoder")
        return enc, heads, {**record, "trained_now": False, "path": str(path)}
    bar = progress_factory("multi-task training", profile.multitask_steps * len(datas)) if progress_factory else None
    try:
        enc, heads, record = train_multitask(encoder, datas, trains, profile, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    sd = {f"encoder.{k}": v.contiguous() for k, v in enc.items()}
    for n, h in zip(names, heads):
        sd.update({f"heads.{n}.{k}": v.contiguous() for k, v in h.items()})
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(sd, str(tmp / "model.safetensors"))
    record = {"tasks": names, "hparams": profile.finetune_params(), **record}
    (tmp / META).write_text(json.dumps(record, indent=1))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return enc, heads, {**record, "trained_now": True, "path": str(path)}
