"""AdaMerging (calm_fast.adamerging, ALGORITHMS.md §6) and DOGE + AdaMerging (calm_fast.doge_adamerging, §9.2)
against the plain-autograd references of calm_fast.reference, given the same batches:

* λ after N steps (layer-wise and task-wise, clamped or not, both entropies, AdaMerging++) within
  ``LAMBDA_ATOL``: the fused path differs from autograd only in rounding (merge order θ0 + Σ λτ vs left to
  right; the coefficient gradient's summation order);
* the entropy objective falls; AdaMerging beats task arithmetic (λ = 0.3) on held-out accuracy on a small
  synthetic multi-task problem;
* AdaMerging++'s masks are exactly the official ``ties_merging_split`` selection;
* DOGE + AdaMerging: the per-task corrections δ_t, the coefficients and the merged model;
* samplers, bad input, evaluation/callback/progress, save.
"""
from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
from torch import nn

import calm_fast
from calm_fast import ops, reference
from calm_fast.methods._common import prepare
from calm_fast.methods.adamerging import (PRESETS, CyclingBatchSampler, ShuffledBatchSampler, entropy_loss,
                                          ties_selection_masks)
from calm_fast.models import GenericAdapter

from multitask_problem import localized_tasks
from test_doge import gapped_task_vector

#: λ tolerance after 20 Adam steps of lr 1e-3 (fused vs autograd; measured differences are <= 3e-8).
LAMBDA_ATOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny networks: one thread is fastest (and the machine is shared); restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------------
# A small network: an MLP encoder, fixed heads on normalised features, perturbed "fine-tunings"
# ------------------------------------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 10)
        self.fc2 = nn.Linear(10, 6)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


NAMES = ["a", "b", "c"]
SAMPLES = [50, 37, 44]


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = Net()
    heads = {}
    for n in NAMES:
        h = nn.Linear(6, 4)
        with torch.no_grad():
            h.weight.copy_(torch.randn(4, 6, generator=g) * 3)
        heads[n] = h.requires_grad_(False)
    adapter = GenericAdapter(net, heads, normalize_features=True)
    pre = {k: v.detach().clone() for k, v in net.state_dict().items()}
    pre["extra.weight"] = torch.randn(5, generator=g)   # merged, never run: zero gradient
    pre["counter"] = torch.arange(3)                      # non-floating: copied from θ0
    fts = [{k: (v + 0.3 * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v for k, v in pre.items()}
           for _ in NAMES]
    data = {n: torch.randn(m, 12, generator=g) for n, m in zip(NAMES, SAMPLES)}
    return adapter, pre, fts, data


def _logits_fn(adapter, data, names):
    def fn(params, t, ids):
        return adapter.logits({k: params[k] for k in adapter.param_names()}, t, data[names[t]][ids])
    return fn


CASES = {  # name: (adamerging kwargs, reference kwargs)
    "official_layer": (dict(preset="official"), dict(clamp=True)),
    "official_clamp_at_0": (dict(preset="official", init=0.005, lr=3e-3), dict(clamp=True, init=0.005, lr=3e-3)),
    "fusion_bench_layer": (dict(preset="fusion_bench"), dict(clamp=False, entropy_eps=1e-8)),
    "task_wise": (dict(preset="official", granularity="task", init=0.01, lr=3e-3),
                  dict(clamp=True, task_wise=True, init=0.01, lr=3e-3)),
    "adamerging_pp": (dict(preset="official", mode="adamerging_pp", density=0.3), dict(clamp=True, ties_density=0.3)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_matches_autograd_reference(case):
    kw, ref_kw = CASES[case]
    adapter, pre, fts, data = _problem()
    sampler = ShuffledBatchSampler(seed=3, batch_size=16, batches_per_task=2)
    steps = 20
    res = calm_fast.adamerging(pre, fts, adapter, data, steps=steps, batch_sampler=sampler, progress=False, **kw)
    ref = reference.adamerging_reference(pre, fts, _logits_fn(adapter, data, NAMES),
                                         lambda s, t: sampler(s, NAMES[t], SAMPLES[t]), steps=steps,
                                         **{"lr": 1e-3, **ref_kw})
    assert res.keys == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "extra.weight"]
    assert res.lambdas.shape == ref["lambdas"].shape == (3, 5)
    diff = float((res.lambdas - ref["lambdas"]).abs().max())
    moved = float((ref["lambdas"] - ref_kw.get("init", 0.3)).abs().max())
    print(f"{case}: max |λ - λ_ref| = {diff:.2e} (λ moved up to {moved:.3f})")
    assert diff <= LAMBDA_ATOL
    assert moved > 5e-3                                    # the coefficients really moved
    torch.testing.assert_close(torch.tensor(res.loss), torch.tensor(ref["losses"]), rtol=1e-5, atol=1e-5)
    # the not-run tensor's coefficients stay at init (layer-wise) or follow λ_t (task-wise)
    if res.config["granularity"] == "layer":
        assert torch.equal(res.lambdas[:, 4], torch.full((3,), ref_kw.get("init", 0.3)))
    else:
        assert torch.equal(res.lambdas[:, 4], res.lambdas[:, 0])
    for k in res.keys:
        torch.testing.assert_close(res.state_dict[k], ref["merged"][k], rtol=0, atol=1e-5)
    assert res.state_dict["counter"] is pre["counter"]
    assert list(res.state_dict) == list(pre)
    if ref_kw.get("clamp"):
        assert float(res.lambdas.min()) >= 0 and float(res.lambdas.max()) <= 1
        if case in ("official_clamp_at_0", "task_wise"):  # inits near 0: some λ cross the bound in 20 steps
            assert bool(((res.raw_lambdas > 1) | (res.raw_lambdas < 0)).any())



def test_mixed_dtypes_one_fused_call_per_group_and_step(monkeypatch):
    # fc2.* in bf16: two dtype groups, so per step one weighted_merge and one coef_grad per group (no Python
    # loop over tensors), and the result still matches the reference (τ = fl32(θ_t − θ0) from bf16 inputs)
    adapter, pre, fts, data = _problem(2)
    for sd in [pre] + fts:
        for k in ("fc2.weight", "fc2.bias"):
            sd[k] = sd[k].bfloat16()
    calls = {"coef_grad": 0}
    real = ops.coef_grad

    def counting(*a, **kw):
        calls["coef_grad"] += 1
        return real(*a, **kw)

    monkeypatch.setattr(ops, "coef_grad", counting)
    sampler = ShuffledBatchSampler(seed=4, batch_size=16, batches_per_task=2)
    res = calm_fast.adamerging(pre, fts, adapter, data, steps=6, batch_sampler=sampler, progress=False)
    assert calls["coef_grad"] == 6 * 2
    ref = reference.adamerging_reference(pre, fts, _logits_fn(adapter, data, NAMES),
                                         lambda s, t: sampler(s, NAMES[t], SAMPLES[t]), steps=6)
    assert float((res.lambdas - ref["lambdas"]).abs().max()) <= LAMBDA_ATOL
    assert res.state_dict["fc2.weight"].dtype == torch.bfloat16
    torch.testing.assert_close(res.state_dict["fc2.weight"].float(), ref["merged"]["fc2.weight"].bfloat16().float(),
                               rtol=0, atol=1e-2)

def test_entropy_objective_decreases():
    adapter, pre, fts, data = _problem(1)
    full = lambda step, task, n: [torch.arange(n)]   # the whole data every step: a deterministic objective
    res = calm_fast.adamerging(pre, fts, adapter, data, steps=40, lr=1e-2, batch_sampler=full, progress=False)
    # step 0 is the objective of task arithmetic at λ = 0.3, computed independently
    ta = calm_fast.task_arithmetic({k: v for k, v in pre.items()}, fts, scaling=0.3)
    params = {k: ta[k] for k in adapter.param_names()}
    h0 = sum(float(entropy_loss(adapter.logits(params, n, data[n]))) for n in NAMES)
    assert res.loss[0] == pytest.approx(h0, rel=1e-5)
    print(f"entropy objective: {res.loss[0]:.4f} -> {res.loss[-1]:.4f}")
    assert res.loss[-1] < res.loss[0] - 0.05
    assert len(res.entropy) == 40 and len(res.entropy[0]) == 3
    assert res.loss[5] == pytest.approx(sum(res.entropy[5]), rel=1e-6)



def test_entropy_variants():
    z = torch.tensor([[30.0, 0.0, 0.0], [0.0, 25.0, 1.0], [0.3, 0.2, 0.1]], dtype=torch.float32)
    for eps in (None, 1e-8):
        assert float(entropy_loss(z, eps)) == pytest.approx(float(reference.entropy_reference(z, eps)), rel=1e-6)
    # confident rows: the eps of FusionBench's log(p + 1e-8) changes the entropy by a large relative amount
    exact, with_eps = float(entropy_loss(z[:2], None)), float(entropy_loss(z[:2], 1e-8))
    assert abs(exact - with_eps) > 0.1 * exact
    with pytest.raises(ValueError, match="batch, classes"):
        entropy_loss(torch.zeros(3))


def test_adamerging_beats_task_arithmetic_on_heldout():
    p = localized_tasks()
    ta = p.mean_accuracy(calm_fast.task_arithmetic(p.pretrained, p.finetuned, scaling=0.3))
    res = calm_fast.adamerging(p.pretrained, p.finetuned, p.adapter, p.unlabeled, steps=100, lr=1e-2,
                               batch_size=64, progress=False, seed=0, eval_data=p.eval_data(), eval_every=50)
    task = calm_fast.adamerging(p.pretrained, p.finetuned, p.adapter, p.unlabeled, steps=100, lr=1e-2,
                                batch_size=64, progress=False, seed=0, granularity="task")
    pp = calm_fast.adamerging(p.pretrained, p.finetuned, p.adapter, p.unlabeled, steps=100, lr=1e-2,
                              batch_size=64, progress=False, seed=0, mode="adamerging_pp")
    got, got_task, got_pp = (p.mean_accuracy(r.state_dict) for r in (res, task, pp))
    print(f"held-out mean accuracy: layer-wise AdaMerging {got:.3f}, task-wise {got_task:.3f}, "
          f"AdaMerging++ {got_pp:.3f}, TA(0.3) {ta:.3f}")
    assert [e["step"] for e in res.evaluations] == [0, 50, 100]
    assert res.evaluations[0]["accuracy"]["mean"] == pytest.approx(ta)      # init 0.3 is task arithmetic
    assert res.evaluations[-1]["accuracy"]["mean"] == pytest.approx(got)
    assert got > ta + 0.05 and got_task > ta + 0.02 and got_pp > ta + 0.02, (got, got_task, got_pp, ta)


# ------------------------------------------------------------------------------------------------
# AdaMerging++ selection
# ------------------------------------------------------------------------------------------------
def test_ties_masks_are_the_official_selection():
    g = torch.Generator().manual_seed(5)
    pre = {"w": torch.randn(40, 7, generator=g), "b": torch.randn(13, generator=g)}
    fts = [{k: v + torch.randn(v.shape, generator=g) for k, v in pre.items()} for _ in range(3)]
    # exact cancellations: two tasks with opposite values and the third trimmed away, so γ = 0 there
    for ft in fts:
        ft["b"][:4] = pre["b"][:4]
    fts[0]["b"][:4] = pre["b"][:4] + 5.0
    fts[1]["b"][:4] = pre["b"][:4] - 5.0
    for density in (0.2, 0.5, 1.0):
        prep = prepare(pre, fts, method="t")
        thr, masks = ties_selection_masks(prep, density)
        sel = reference.ties_selected_entries_reference(pre, fts, density, prep.keys)
        for t in range(3):
            for l, k in enumerate(prep.keys):
                got = ops.unpack_mask(masks[t * prep.L + l], pre[k].numel()).reshape(pre[k].shape)
                assert torch.equal(got, sel[t][k] != 0), (density, t, k)


# ------------------------------------------------------------------------------------------------
# DOGE + AdaMerging
# ------------------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(12, 12)
        self.fc1 = nn.Linear(12, 24)
        self.fc2 = nn.Linear(24, 12)
        self.layer_norm = nn.LayerNorm(12)

    def forward(self, x):
        x = x + self.q(x)
        return self.layer_norm(x + self.fc2(torch.tanh(self.fc1(x))))


class DogeNet(nn.Module):
    """Keys like a CLIP vision encoder: the DOGE filter picks the six 2-D encoder weights (two blocks)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 12)
        self.encoder = nn.ModuleDict({"l0": Block(), "l1": Block()})

    def forward(self, x):
        x = self.embed(x)
        for b in self.encoder.values():
            x = b(x)
        return x


def _doge_problem(seed=0, T=3):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = DogeNet()
    names = NAMES[:T]
    heads = {n: nn.Linear(12, 4).requires_grad_(False) for n in names}
    adapter = GenericAdapter(net, heads, normalize_features=True)
    pre = {k: v.detach().clone() for k, v in net.state_dict().items()}
    fts = [dict(pre) for _ in range(T)]
    for k, v in pre.items():
        if v.dim() == 2 and "encoder" in k:   # task vectors with a clear spectral gap (test_doge's builder)
            shared = torch.linalg.qr(torch.randn(v.shape[0], 2, generator=g, dtype=torch.float64))[0]
            for t in range(T):
                fts[t][k] = pre[k] + 3 * gapped_task_vector(g, shared, *v.shape, torch.float32)
        else:                                   # fine-tuned too, but DOGE keeps θ0 there
            for t in range(T):
                fts[t][k] = pre[k] + 0.05 * torch.randn(v.shape, generator=g)
    data = {n: torch.randn(40, 8, generator=g) for n in names}
    return adapter, pre, fts, data, names


def test_doge_adamerging_matches_reference():
    adapter, pre, fts, data, names = _doge_problem()
    sampler = CyclingBatchSampler(seed=1, batch_size=16, batches_per_task=1)
    res = calm_fast.doge_adamerging(pre, fts, adapter, data, steps=15, doge_steps=150, batch_sampler=sampler,
                                    progress=False)
    ref = reference.doge_adamerging_reference(pre, fts, _logits_fn(adapter, data, names),
                                              lambda s, t: sampler(s, names[t], 40), steps=15, doge_steps=150)
    keys = sorted(k for k in pre if "encoder" in k and "weight" in k and "layer_norm" not in k)
    assert res.keys == keys and len(keys) == 6
    for k in keys:
        d, r = res.delta[k], ref["delta"][k]
        rel = float((d - r).norm() / r.norm())
        # the T corrections differ from each other by far more than the tolerance (per-task δ, not shared)
        spread = float((r[0] - r[1]).norm() / r[0].norm())
        assert rel < 2e-6 and spread > 10 * rel, (k, rel, spread)
        assert torch.equal(res.doge_lambdas[k], ref["doge_lambdas"][k])
        assert float(res.doge_losses[k][-1]) < float(res.doge_losses[k][0])
        assert float(res.doge_losses[k][0]) == pytest.approx(ref["doge_losses"][k][0], rel=1e-5)
    diff = float((res.lambdas - ref["lambdas"]).abs().max())
    assert diff <= LAMBDA_ATOL and float((res.lambdas - 0.3).abs().max()) > 5e-3
    for k in pre:
        if k in keys:
            torch.testing.assert_close(res.state_dict[k], ref["merged"][k], rtol=0, atol=1e-5)
        else:
            assert res.state_dict[k] is pre[k], k             # every other key keeps θ0
    assert res.config["preset"] == "fusion_bench" and res.config["clamp"] is False


def test_doge_adamerging_bad_input():
    adapter, pre, fts, data, names = _doge_problem()
    k = "encoder.l0.q.weight"
    zero = [dict(f) for f in fts]
    zero[1][k] = pre[k].clone()
    with pytest.raises(ValueError, match=r"task vector of model 1 \('b'\) is exactly zero on 'encoder.l0.q.weight'"):
        calm_fast.doge_adamerging(pre, zero, adapter, data, steps=1, doge_steps=1, progress=False)
    with pytest.raises(ValueError, match=r"'encoder.l0.fc1.bias' has shape \(24,\); DOGE merges 2-D"):
        calm_fast.doge_adamerging(pre, fts, adapter, data, include=r"encoder", exclude="layer_norm", steps=1,
                                  doge_steps=1, progress=False)
    with pytest.raises(ValueError, match="no key matches the filter"):
        calm_fast.doge_adamerging(pre, fts, adapter, data, include="nothing", steps=1, progress=False)
    with pytest.raises(ValueError, match=r"unlabeled data is missing for tasks \['c'\]"):
        calm_fast.doge_adamerging(pre, fts, adapter, {n: data[n] for n in names[:2]}, steps=1, progress=False)
    with pytest.raises(ValueError, match="runs none of the merged tensors"):
        embed_only = GenericAdapter(DogeNet(), dict(zip(names, adapter.heads)), param_names=["embed.weight"])
        calm_fast.doge_adamerging(pre, fts, embed_only, data, steps=1, doge_steps=1, progress=False)


# ------------------------------------------------------------------------------------------------
# Samplers, bad input, hooks, save
# ------------------------------------------------------------------------------------------------
def test_samplers():
    s = ShuffledBatchSampler(seed=1, batch_size=16, batches_per_task=2)
    for n, sizes in [(50, [16, 16]), (20, [16, 4]), (16, [16]), (5, [5])]:
        out = s(3, "a", n)
        assert [b.numel() for b in out] == sizes
        assert all(torch.equal(x, y) for x, y in zip(out, s(3, "a", n)))      # a pure function of its key
    assert not torch.equal(s(3, "a", 50)[0], s(4, "a", 50)[0])
    c = CyclingBatchSampler(seed=1, batch_size=16, batches_per_task=1)
    seen = torch.cat([c(step, "a", 37)[0] for step in range(3)])               # one pass: 16 + 16 + 5
    assert [c(step, "a", 37)[0].numel() for step in range(4)] == [16, 16, 5, 16]
    assert torch.equal(seen.sort().values, torch.arange(37))
    second = torch.cat([c(step, "a", 37)[0] for step in range(3, 6)])
    assert torch.equal(second.sort().values, torch.arange(37)) and not torch.equal(second, seen)
    c2 = CyclingBatchSampler(seed=1, batch_size=16, batches_per_task=2)
    assert torch.equal(torch.cat(c2(1, "a", 37)), torch.cat([c(2, "a", 37)[0], c(3, "a", 37)[0]]))
    assert PRESETS["official"]["batches_per_task"] == 2 and PRESETS["fusion_bench"]["sampler"] == "cycle"


def test_bad_input_errors():
    adapter, pre, fts, data = _problem()
    run = lambda **kw: calm_fast.adamerging(pre, kw.pop("fts", fts), adapter, kw.pop("data", data), steps=1,
                                            progress=False, **kw)
    with pytest.raises(ValueError, match=r"unlabeled data is missing for tasks \['b'\]"):
        run(data={"a": data["a"], "c": data["c"]})
    with pytest.raises(ValueError, match="task 'c' has no unlabeled samples"):
        run(data={**data, "c": data["c"][:0]})
    bad = [dict(f) for f in fts]
    bad[2]["fc1.weight"] = torch.randn(10, 13)
    with pytest.raises(ValueError, match=r"shape mismatch for 'fc1.weight': model 2 has \(10, 13\)"):
        run(fts=bad)
    with pytest.raises(ValueError, match="finetuned has 2 entries for 3 tasks"):
        run(fts=fts[:2])
    with pytest.raises(ValueError, match="preset must be one of"):
        run(preset="paper")
    with pytest.raises(ValueError, match="mode must be one of"):
        run(mode="ties")
    with pytest.raises(ValueError, match="granularity"):
        run(granularity="row")
    with pytest.raises(ValueError, match="density must be in"):
        run(mode="adamerging_pp", density=0.0)
    with pytest.raises(ValueError, match="init must be a finite number"):
        run(init=float("nan"))
    with pytest.raises(ValueError, match="outside"):
        run(batch_sampler=lambda s, t, n: [torch.arange(n + 1)])
    with pytest.raises(ValueError, match="eval_data"):
        run(eval_data={"a": (data["a"], torch.full((SAMPLES[0],), 9))})
    with pytest.raises(ValueError, match="runs none of the merged tensors"):
        run(include="extra")
    nan = [dict(f) for f in fts]
    nan[0]["fc2.bias"] = nan[0]["fc2.bias"].clone()
    nan[0]["fc2.bias"][0] = float("nan")
    with pytest.raises(ValueError, match="'fc2.bias' contains inf or NaN"):
        run(fts=nan)


def test_zero_task_vector_layer_is_fine():
    # a task vector that is zero on a tensor (AdaMerging's frozen text tower): zero gradient, λ stays at init
    adapter, pre, fts, data = _problem()
    fts = [dict(f) for f in fts]
    fts[1]["fc1.bias"] = pre["fc1.bias"].clone()
    res = calm_fast.adamerging(pre, fts, adapter, data, steps=10, progress=False)
    col = res.keys.index("fc1.bias")
    init = torch.tensor(0.3, dtype=torch.float32)
    assert res.lambdas[1, col] == init and res.lambdas[0, col] != init
    assert bool(torch.isfinite(res.lambdas).all())
    assert all(bool(torch.isfinite(v).all()) for v in res.state_dict.values() if v.is_floating_point())


def test_callback_progress_and_subset_of_keys():
    adapter, pre, fts, data = _problem()
    seen = []
    res = calm_fast.adamerging(pre, fts, adapter, data, steps=3, progress=True, exclude=r"^fc2\.",
                               callback=lambda step, lambdas, metrics: seen.append(
                                   (step, lambdas.detach().clone(), float(metrics["loss"]))))
    assert [s for s, _, _ in seen] == [0, 1, 2]
    assert torch.equal(seen[-1][1], res.raw_lambdas)
    assert [x for _, _, x in seen] == pytest.approx(res.loss)
    assert res.keys == ["fc1.weight", "fc1.bias", "extra.weight"]
    assert res.config["run_at_theta0"] == ["fc2.bias", "fc2.weight"]
    assert res.state_dict["fc2.weight"] is pre["fc2.weight"]


def test_save_roundtrip(tmp_path):
    from safetensors.torch import load_file

    adapter, pre, fts, data = _problem()
    res = calm_fast.adamerging(pre, fts, adapter, data, steps=3, progress=False)
    out = tmp_path / "merged"
    res.save(out)
    assert sorted(os.listdir(tmp_path)) == ["merged"]
    sd = load_file(str(out / "model.safetensors"))
    assert set(sd) == set(res.state_dict) and all(torch.equal(sd[k], v) for k, v in res.state_dict.items())
    lam = load_file(str(out / "adamerging_lambdas.safetensors"))
    assert torch.equal(lam["lambdas"], res.lambdas) and torch.equal(lam["raw_lambdas"], res.raw_lambdas)
    rec = json.loads((out / "adamerging_record.json").read_text())
    assert rec["keys"] == res.keys and len(rec["loss"]) == 3 and rec["config"]["preset"] == "official"
    from calm_fast.io.errors import OutputError

    with pytest.raises(OutputError, match="already exists"):
        res.save(out)
    adapter, pre, fts, data, names = _doge_problem()
    d = calm_fast.doge_adamerging(pre, fts, adapter, data, steps=2, doge_steps=3, progress=False)
    d.save(tmp_path / "doge")
    extra = load_file(str(tmp_path / "doge" / "doge_adamerging_lambdas.safetensors"))
    assert torch.equal(extra["doge.delta.encoder.l0.q.weight"], d.delta["encoder.l0.q.weight"])


# ------------------------------------------------------------------------------------------------
# Through the Hugging Face adapter (tiny BERT built in code; inputs are mappings of tensors)
# ------------------------------------------------------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers not installed")
def test_hf_encoder_adamerging_and_doge():
    from transformers import BertConfig, BertForSequenceClassification

    from calm_fast.models import hf_encoder_from_modules

    cfg = dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
               max_position_embeddings=24, initializer_range=0.3, hidden_dropout_prob=0.0,
               attention_probs_dropout_prob=0.0)
    torch.manual_seed(3)
    g = torch.Generator().manual_seed(3)
    base = BertForSequenceClassification(BertConfig(**cfg, num_labels=3)).eval()
    tasks = {}
    for name, labels in (("sst2", 3), ("mnli", 5)):
        m = BertForSequenceClassification(BertConfig(**cfg, num_labels=labels)).eval()
        m.bert.load_state_dict(base.bert.state_dict())
        with torch.no_grad():
            for p in m.bert.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        tasks[name] = m
    adapter, pre, fts = hf_encoder_from_modules(base, tasks)
    data = {t: {"input_ids": torch.randint(5, 40, (24, 10), generator=g),
                "attention_mask": torch.ones(24, 10, dtype=torch.int64)} for t in tasks}
    sampler = ShuffledBatchSampler(seed=0, batch_size=8, batches_per_task=2)
    res = calm_fast.adamerging(pre, fts, adapter, data, steps=8, batch_sampler=sampler, progress=False)

    def logits_fn(params, t, ids):
        x = {k: v[ids] for k, v in data[adapter.task_names[t]].items()}
        return adapter.logits({k: params[k] for k in adapter.param_names()}, t, x)

    ref = reference.adamerging_reference(pre, fts, logits_fn,
                                         lambda s, t: sampler(s, adapter.task_names[t], 24), steps=8)
    assert res.keys == adapter.param_names()
    # an attention key bias shifts every score of a row alike (softmax is shift-invariant): its exact gradient
    # is 0, so its λ follows rounding noise on both sides, each Adam step bounded by lr
    noise = [i for i, k in enumerate(res.keys) if k.endswith("attention.self.key.bias")]
    signal = [i for i in range(len(res.keys)) if i not in noise]
    assert len(noise) == 2
    assert float((res.lambdas[:, signal] - ref["lambdas"][:, signal]).abs().max()) <= LAMBDA_ATOL
    assert float((res.lambdas[:, noise] - 0.3).abs().max()) <= 8 * 1e-3 * 1.01
    assert float((res.lambdas - 0.3).abs().max()) > 5e-3
    # DOGE's default filter ("encoder", "weight", not "layer_norm") also picks BERT's 1-D "LayerNorm.weight"
    # (FusionBench's filter is for CLIP's "layer_norm1" names): a clear error, and exclude= fixes it
    with pytest.raises(ValueError, match=r"LayerNorm.weight' has shape \(16,\); DOGE merges 2-D"):
        calm_fast.doge_adamerging(pre, fts, adapter, data, steps=1, doge_steps=1, progress=False)
    d = calm_fast.doge_adamerging(pre, fts, adapter, data, exclude="LayerNorm", steps=3, doge_steps=20,
                                  progress=False)
    assert len(d.keys) == 2 * 6 and all(v.dim() == 2 for k, v in pre.items() if k in d.keys)
    assert d.state_dict["embeddings.word_embeddings.weight"] is pre["embeddings.word_embeddings.weight"]
