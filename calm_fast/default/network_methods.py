"""Rows that run the network while merging: CALM and AdaMerging.

Both go through the public API and the Hugging Face model adapter, the code a user calls:
:func:`calm_fast.models.load_hf_encoder` reads the pretrained encoder folder and the cached fine-tuned
task folders (``AutoModelForSequenceClassification``), and the method gets the adapter, the encoder
tensors and, per task, the **unlabeled test inputs** (token ids and attention masks; the test labels
are never passed).  The merged encoder is then evaluated like every other row.

CALM settings (fixed in advance, never chosen on the test split):

* the paper's text settings: credible ratio 0.8; the paper's schedule (two tasks drawn at random are
  merged one at a time after task arithmetic of the others: ``schedule="random"``) with the run's seed;
  every other setting is :func:`calm_fast.calm`'s default (η = 1e7 summed over the batches, α = 1,
  mask init on the top 1e-5 of ``|τ_new|``, bias 5, TA prior 0.3, the fused mode, the fine-tuned model of
  each task as the teacher);
* the mask training budget comes from the profile (``calm_iterations``, ``calm_batch_size``,
  ``calm_batches_per_task``): the paper's 100 iterations of 2 batches of 128 per seen task would take
  about an hour here on one CPU thread, so the default profile uses fewer (see :mod:`.profiles`).

AdaMerging: layer-wise, the official preset (init 0.3, Adam lr 1e-3, clamp to [0, 1]) with the profile's
step budget (``ada_steps``, ``ada_batch_size``, ``ada_batches_per_task``): the official 500 steps of
2 batches of 16 per task take far longer than the rest of the run on one CPU thread (every step runs the
whole network forward and backward for every task), so the default profile uses fewer (see
:mod:`.profiles`); the ``full`` profile uses the official budget.
"""
from __future__ import annotations

from collections import Counter
from typing import Dict, List, Mapping

import torch

import calm_fast

from .methods import Context, Method, Result, register_method

#: the paper's settings for language tasks (the rest: calm()'s defaults)
CALM_TEXT = {"ratio": 0.8, "schedule": "random"}


def hf_models(ctx: Context):
    """The Hugging Face adapter over the cached task folders (built once per run, shared by the rows):
    ``LoadedModels(adapter, pretrained, finetuned)`` over the encoder tensors fine-tuning changed
    (``ctx.merge_keys``), named as the encoder names them (the keys of ``ctx.base``)."""
    if "hf" not in ctx.cache:
        from calm_fast.models import load_hf_encoder

        # only the tensors fine-tuning changed are merged (the bottom layers and embeddings keep θ0 in every
        # row): they are also the only ones the backward pass needs to reach
        ctx.cache["hf"] = load_hf_encoder(ctx.encoder.path, {f.task: f.path for f in ctx.finetuned},
                                          tokenizer=ctx.encoder.tokenizer,
                                          param_names=[k for k in ctx.merge_keys if k in ctx.base] or None)
    return ctx.cache["hf"]


def unlabeled_test_inputs(ctx: Context) -> Dict[str, Dict[str, torch.Tensor]]:
    """Per task, its test split's inputs as the tokenizer gives them — no labels."""
    return {f.task: {"input_ids": tok.ids, "attention_mask": tok.mask}
            for f, tok in zip(ctx.finetuned, ctx.test_tokens)}


def _merged_encoder(ctx: Context, merged_part: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    merged = dict(ctx.base)
    for k, v in merged_part.items():
        if k in merged:
            merged[k] = v.detach().to(merged[k].dtype)
    return merged


def _group(key: str) -> str:
    """A tensor's place for the mask summary: 'layer 4 attention', 'layer 4 ffn', 'pooler', 'embeddings'."""
    if key.startswith("encoder.layer."):
        layer = key.split(".")[2]
        return f"layer {layer} {'attention' if '.attention.' in key else 'ffn'}"
    return key.split(".")[0]


def calm_settings(ctx: Context) -> Dict[str, object]:
    p = ctx.profile
    return {**CALM_TEXT, "seed": ctx.seed, "iterations": p.calm_iterations, "batch_size": p.calm_batch_size,
            "batches_per_task": p.calm_batches_per_task}


def run_calm(ctx: Context) -> Result:
    adapter, pretrained, finetuned = hf_models(ctx)
    settings = calm_settings(ctx)
    res = calm_fast.calm(pretrained, finetuned, adapter, unlabeled_test_inputs(ctx), progress=ctx.progress,
                         **settings)
    merged = _merged_encoder(ctx, res.state_dict)
    # what the masks keep: per step, how many entries take τ_new, by layer and block (the rest keep τ_prev)
    masks = []
    for i, rec in enumerate(res.masks):
        on = Counter()
        for k, m in res.mask(i).items():
            n = int(m.sum())
            if n:
                on[_group(k)] += n
        changed = sum(int((finetuned[adapter.task_names.index(rec["task"])][k] != pretrained[k]).sum())
                      for k in adapter.param_names())
        masks.append({"task": rec["task"], "on": rec["on"], "of": rec["numel"], "task_vector_nonzero": changed,
                      "on_by_block": dict(sorted(on.items()))})
    steps = [s for s in res.steps if s.get("kind") == "mask"]
    info = {"settings": settings, "schedule": res.config["schedule"],
            "credible": {t: len(c) for t, c in res.credible.items()},
            "masks": masks,
            "loss_first_last": [[s["loss"][0], s["loss"][-1]] if s["loss"] else [] for s in steps],
            "timings_s": {"credible": res.timings.get("credible_s"), "total": res.timings.get("total_s"),
                          "steps": [s["timings"]["step_s"] for s in steps]}}
    return Result([merged] * len(ctx.finetuned), ctx.heads(), info)


register_method(Method("calm", "CALM", "merge",
                       {**CALM_TEXT, "seed": "the run seed", "iterations/batches": "the profile's"}, run_calm,
                       "unlabeled test inputs, credible ratio 0.8, the paper's random schedule (seeded); "
                       "mask-training budget from the profile"))


# ------------------------------------------------------------------------------------------------
# AdaMerging (layer-wise, the official preset's settings with the profile's budget)
# ------------------------------------------------------------------------------------------------
def adamerging_settings(ctx: Context) -> Dict[str, object]:
    p = ctx.profile
    return {"preset": "official", "granularity": "layer", "seed": ctx.seed, "steps": p.ada_steps,
            "batch_size": p.ada_batch_size, "batches_per_task": p.ada_batches_per_task}


def run_adamerging(ctx: Context) -> Result:
    adapter, pretrained, finetuned = hf_models(ctx)
    settings = adamerging_settings(ctx)
    res = calm_fast.adamerging(pretrained, finetuned, adapter, unlabeled_test_inputs(ctx), progress=ctx.progress,
                               **settings)
    lam = res.lambdas
    info = {"settings": settings, "keys": list(res.keys), "lambdas": lam.tolist(),
            "lambda_mean_by_task": dict(zip(res.task_names, lam.mean(dim=1).tolist())),
            "entropy_first_last": [res.entropy[0], res.entropy[-1]] if len(res.entropy) else []}
    return Result([_merged_encoder(ctx, res.state_dict)] * len(ctx.finetuned), ctx.heads(), info)


register_method(Method("adamerging", "AdaMerging", "merge",
                       {"preset": "official (init 0.3, Adam lr 1e-3, clamp [0, 1])", "granularity": "layer",
                        "seed": "the run seed", "steps/batches": "the profile's"}, run_adamerging,
                       "entropy minimisation on the unlabeled test inputs; step budget from the profile"))


__all__: List[str] = ["CALM_TEXT", "hf_models", "unlabeled_test_inputs", "run_calm", "run_adamerging", "adamerging_settings"]
