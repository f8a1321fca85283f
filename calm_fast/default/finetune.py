"""Fine-tuning one task (top layers + pooler + head) and the on-disk cache of fine-tuned checkpoints.

A cached checkpoint is a Hugging Face ``BertForSequenceClassification`` folder (``model.safetensors``,
``config.json`` with ``num_labels``/``id2label``, the tokenizer) that ``AutoModelForSequenceClassification``
loads as is, plus ``calm_fast_default.json`` (the cache key and the fine-tuning record).  Its folder
name carries a hash of the task definition, the fine-tuning hyperparameters, the seed and the encoder,
so a second run with the same settings goes straight to merging, and any change re-trains.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .encoder import Encoder, StateDict, Tokens, new_head
from .profiles import Profile
from .tasks import TaskData

META = "calm_fast_default.json"
FORMAT = 1


@dataclass
class Finetuned:
    """One task's fine-tuned model: encoder tensors (θ0's keys), its head, and the record."""
    task: str
    path: Path
    encoder: StateDict
    head: StateDict
    meta: Dict[str, object]


def cache_key(data: TaskData, profile: Profile, encoder: Encoder) -> str:
    enc_file = encoder.path / "model.safetensors"
    ident = {"format": FORMAT, "task": data.spec.fingerprint(), "hparams": profile.finetune_params(),
             "encoder": [str(encoder.path.name), enc_file.stat().st_size, encoder.config.num_hidden_layers]}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def checkpoint_dir(root: Path, data: TaskData, profile: Profile, encoder: Encoder) -> Path:
    return Path(root) / f"{data.spec.name}-{cache_key(data, profile, encoder)}"


def load_checkpoint(path: Path, encoder: Encoder) -> Finetuned:
    """Read a task folder: the ``bert.`` tensors are the encoder (prefix stripped), ``classifier.*`` the head."""
    from safetensors.torch import load_file

    sd = load_file(str(Path(path) / "model.safetensors"))
    enc = {k[len("bert."):]: v for k, v in sd.items() if k.startswith("bert.")}
    head = {k: v for k, v in sd.items() if k.startswith("classifier.")}
    missing = [k for k in encoder.base if k not in enc]
    if missing or set(head) != {"classifier.weight", "classifier.bias"}:
        raise ValueError(f"{path} is not a fine-tuned checkpoint of this encoder (missing {missing[:3]} / head)")
    meta = json.loads((Path(path) / META).read_text())
    return Finetuned(meta["task"], Path(path), {k: enc[k] for k in encoder.base}, head, meta)


def save_checkpoint(path: Path, encoder: Encoder, enc_state: StateDict, head: StateDict, classes: List[str],
                    meta: Dict[str, object]) -> None:
    """Write the Hugging Face folder atomically (a temporary folder renamed at the end)."""
    from transformers import AutoConfig, BertForSequenceClassification

    cfg = AutoConfig.from_pretrained(str(encoder.path), local_files_only=True, num_labels=len(classes),
                                     id2label=dict(enumerate(classes)),
                                     label2id={c: i for i, c in enumerate(classes)})
    model = BertForSequenceClassification(cfg)
    sd = {f"bert.{k}": v for k, v in enc_state.items()}
    sd.update(head)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected or [k for k in missing if not k.endswith("position_ids")]:
        raise RuntimeError(f"checkpoint keys do not match BertForSequenceClassification: {missing} {unexpected}")
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    encoder.tokenizer.save_pretrained(str(tmp))
    (tmp / META).write_text(json.dumps(meta, indent=1))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def _batches(n: int, batch_size: int, steps: int, g: torch.Generator) -> List[torch.Tensor]:
    """``steps`` batches of indices, epoch after epoch of seeded permutations."""
    out: List[torch.Tensor] = []
    perm = torch.randperm(n, generator=g)
    pos = 0
    for _ in range(steps):
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=g), 0
        out.append(perm[pos:pos + min(batch_size, n)])
        pos += batch_size
    return out


def finetune(encoder: Encoder, data: TaskData, train: Tokens, profile: Profile, progress=None):
    """Fine-tune the top ``profile.train_layers`` layers, the pooler and a new head on the train split.

    The frozen bottom runs once per example in eval mode (no dropout) with θ0, its hidden states cached;
    the trained top runs in train mode (dropout as Hugging Face's).  AdamW (``lr`` for the encoder,
    ``head_lr`` for the head), linear decay to 0, seeded batches and dropout.  Returns (encoder tensors,
    head, record, (the examples used, their index in the train split, their cached bottom states))."""
    encoder.reset()
    start = encoder.num_layers - profile.train_layers
    seed = profile.seed
    g = torch.Generator().manual_seed(seed)
    batches = _batches(len(train), profile.batch_size, profile.steps, g)
    used = torch.unique(torch.cat(batches))
    where = torch.full((len(train),), -1, dtype=torch.long)
    where[used] = torch.arange(len(used))
    sub = Tokens(train.ids[used], train.mask[used], train.lengths[used])
    t0 = time.perf_counter()
    cached = encoder.prefix(sub, start)
    labels = torch.tensor(data.train.labels)
    head = {k: v.clone().requires_grad_(True) for k, v in new_head(len(data.classes), encoder.config.hidden_size,
                                                                   seed).items()}
    params = [p for k, p in encoder.bert.named_parameters()
              if encoder.layer_of(k) >= start and not k.startswith("embeddings.")]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW([{"params": params, "lr": profile.lr}, {"params": list(head.values()), "lr": profile.head_lr}],
                            weight_decay=profile.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / profile.steps)
    torch.manual_seed(seed)  # dropout
    encoder.bert.train()
    losses = []
    try:
        for idx in batches:
            rows = where[idx]
            n = int(sub.lengths[rows].max())
            logits = encoder.suffix(cached[rows, :n], sub.mask[rows, :n], start, head, train=True)
            loss = F.cross_entropy(logits, labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{loss.item():.3f}")
            if not math.isfinite(losses[-1]):
                raise RuntimeError(f"task {data.spec.name}: the fine-tuning loss is not finite")
    finally:
        encoder.bert.eval()
        for p in params:
            p.requires_grad_(False)
    enc_state = {k: v.detach().clone() for k, v in encoder.bert.state_dict().items() if k in encoder.base}
    head_out = {k: v.detach().clone() for k, v in head.items()}
    encoder.reset()
    record = {"train_seconds": time.perf_counter() - t0, "first_loss": losses[0], "last_loss": losses[-1],
              "trained_layers": list(range(start, encoder.num_layers)), "examples_seen": len(used)}
    return enc_state, head_out, record, (sub, used, cached)


def train_probe(features: torch.Tensor, labels: torch.Tensor, num_labels: int, profile: Profile) -> StateDict:
    """The linear-probe head: full-batch AdamW on the frozen pretrained encoder's pooled features."""
    head = {k: v.clone().requires_grad_(True)
            for k, v in new_head(num_labels, features.shape[1], profile.seed).items()}
    opt = torch.optim.AdamW(list(head.values()), lr=profile.probe_lr, weight_decay=profile.weight_decay)
    for _ in range(profile.probe_steps):
        loss = F.cross_entropy(F.linear(features, head["classifier.weight"], head["classifier.bias"]), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in head.items()}


def probe_features(encoder: Encoder, tokens: Tokens, start: int, cached: Optional[torch.Tensor] = None) -> torch.Tensor:
    """θ0's pooled features (the input of a task head) of a split."""
    encoder.reset()
    if cached is None:
        cached = encoder.prefix(tokens, start)
    feats = torch.empty(len(tokens), encoder.config.hidden_size)
    with torch.no_grad():
        for i in range(0, len(tokens), 64):
            n = int(tokens.lengths[i:i + 64].max())
            h = encoder.run_layers(cached[i:i + 64, :n], tokens.mask[i:i + 64, :n], start, encoder.num_layers)
            feats[i:i + 64] = encoder.bert.pooler(h)
    return feats


def prepare_task(encoder: Encoder, data: TaskData, train: Tokens, profile: Profile, cache_root: Path,
                 progress_factory=None) -> Tuple[Finetuned, StateDict, bool]:
    """The task's fine-tuned checkpoint and linear-probe head, from the cache or trained now.
    Returns (checkpoint, probe head, trained_now)."""
    from safetensors.torch import load_file, save_file

    path = checkpoint_dir(cache_root, data, profile, encoder)
    if (path / META).is_file() and (path / "probe_head.safetensors").is_file():
        return load_checkpoint(path, encoder), load_file(str(path / "probe_head.safetensors")), False
    bar = progress_factory(data.spec.name, profile.steps) if progress_factory else None
    try:
        enc_state, head, record, (sub, used, cached) = finetune(encoder, data, train, profile, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    # the probe is trained on the training examples that fine-tuning saw (their θ0 bottom is cached)
    t0 = time.perf_counter()
    feats = probe_features(encoder, sub, encoder.num_layers - profile.train_layers, cached)
    probe = train_probe(feats, torch.tensor(data.train.labels)[used], len(data.classes), profile)
    record["probe_seconds"] = time.perf_counter() - t0
    meta = {"task": data.spec.name, "key": path.name, "classes": data.classes, "sizes": data.sizes,
            "task_definition": data.spec.fingerprint(), "hparams": profile.finetune_params(), **record}
    save_checkpoint(path, encoder, enc_state, head, data.classes, meta)
    save_file(probe, str(path / "probe_head.safetensors"))
    return load_checkpoint(path, encoder), probe, True
