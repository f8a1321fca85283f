"""CALM end to end (calm_fast.calm) against the references of calm_fast.reference (ALGORITHMS.md §8).

* credible sampling vs a literal NumPy §8.2 (``reference.calm_credible_reference``);
* the whole loop, ``faithful=True``, vs the straightforward §8.9 implementation
  (``reference.calm_reference``) given the same batches: same credible sets, R bit for bit at chosen
  iterations (both sides use the kernels' sigmoid), same masks, same merged task vector (frozen leftovers
  included);
* the default (fused) mode: same masks on the same problem, R within rounding;
* a small synthetic multi-task problem (tasks whose information is localised in the first layer) where
  CALM beats task arithmetic and TIES at their standard settings (λ = 0.3) on held-out accuracy;
* the batch sampler, the schedule, bad input, evaluation inside the loop, ``save``.
"""
import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import calm_fast
from calm_fast import reference
from calm_fast.methods.calm import RandomBatchSampler, resolve_schedule
from calm_fast.methods.credible import credible_samples
from calm_fast.models import GenericAdapter

from conftest import assert_same


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny networks: one thread is fastest (and the machine is shared); restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _kernel_sigmoid(x):
    r = x.float().contiguous()
    return torch.ops.calm_fast.calm_interpolate([], [torch.zeros_like(r)], [torch.ones_like(r)], [r], "fused",
                                                True)[0]


# ------------------------------------------------------------------------------------------------
# A small problem: an MLP encoder, fixed per-task heads on normalised features, perturbed "fine-tunings"
# ------------------------------------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self, d=12, h=10, f=6):
        super().__init__()
        self.fc1 = nn.Linear(d, h)
        self.fc2 = nn.Linear(h, f)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


CLASSES = [3, 4, 3, 5]
SAMPLES = [300, 60, 260, 200]   # task 1's credible set fits in one batch of 64
NAMES = ["a", "b", "c", "d"]


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = Net()
    heads = {}
    for n, C in zip(NAMES, CLASSES):
        h = nn.Linear(6, C)
        with torch.no_grad():
            h.weight.copy_(torch.randn(C, 6, generator=g) * 3)
            h.bias.zero_()
        h.requires_grad_(False)
        heads[n] = h
    adapter = GenericAdapter(net, heads, normalize_features=True)
    pre = {k: v.detach().clone() for k, v in net.state_dict().items()}
    pre["extra.weight"] = torch.randn(5, generator=g)   # a frozen leftover: merged, never run
    fts = [{k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in pre.items()} for _ in NAMES]
    data = {n: torch.randn(m, 12, generator=g) for n, m in zip(NAMES, SAMPLES)}
    return net, adapter, pre, fts, data


def _teacher_logits(net, adapter, ft, task, x):
    params = {k: ft[k] for k in adapter.param_names()}
    with torch.no_grad():
        return adapter.heads[NAMES.index(task)](adapter.features(params, x))


SETTINGS = dict(iterations=5, eta=30.0, alpha=1.0, sparsity=0.05, sigmoid_bias=5.0, ratio=0.9)
SCHEDULE = [[0, 1], [2], [3]]
RECORD = [(1, 0), (1, 2), (1, 4), (2, 1), (2, 4)]


def _run_both(monkeypatch, faithful=True, batch_reduction="sum", schedule=SCHEDULE, **over):
    """Run calm_fast.calm and calm_reference with the same batches; returns (result, reference, R history)."""
    monkeypatch.setattr(reference, "calm_sigmoid", _kernel_sigmoid)
    net, adapter, pre, fts, data = _problem()
    st = dict(SETTINGS, **over)
    sampler = RandomBatchSampler(seed=5, batch_size=64, batches_per_task=2)
    seen_R = {}

    def cb(step, iteration, task, R, metrics):
        if (step, iteration) in RECORD:
            seen_R[(step, iteration)] = [r.clone() for r in R]

    res = calm_fast.calm(pre, fts, adapter, data, schedule=schedule, faithful=faithful, batch_sampler=sampler,
                         callback=cb, progress=False, batch_size=64, batch_reduction=batch_reduction,
                         eval_batch_size=1000, **st)
    # the reference: teacher logits of each fine-tuned model, literal NumPy credible sets, same batches
    cred = {}
    for t, n in enumerate(NAMES):
        z = _teacher_logits(net, adapter, fts[t], n, data[n])
        ids, lab = reference.calm_credible_reference(z.numpy(), st["ratio"])
        cred[t] = (torch.from_numpy(ids), torch.from_numpy(lab))
    labels_full = {}
    for t, (ids, lab) in cred.items():
        full = torch.full((SAMPLES[t],), -1, dtype=torch.int64)
        full[ids] = lab
        labels_full[t] = full

    def loss_fn(params, t, ids):
        logits = adapter.heads[t](adapter.features(params, data[NAMES[t]][ids]))
        return F.cross_entropy(logits, labels_full[t][ids])

    def batches(step, it, t):
        return sampler(step, it, NAMES[t], cred[t][0])

    ref = reference.calm_reference(pre, fts, adapter.param_names(), schedule, loss_fn, batches,
                                   iterations=st["iterations"], eta=st["eta"], alpha=st["alpha"],
                                   sparsity=st["sparsity"], bias=st["sigmoid_bias"], record=RECORD)
    return res, ref, cred, seen_R, adapter


# ------------------------------------------------------------------------------------------------
# Credible sampling (§8.2)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0.9, 0.8, 0.5, 1.0])
@pytest.mark.parametrize("standard", [0, 1])
def test_credible_matches_numpy_literal(ratio, standard):
    g = torch.Generator().manual_seed(int(ratio * 10) + standard)
    for n, C, scale in [(500, 7, 3.0), (97, 3, 0.5), (40, 10, 8.0)]:
        z = torch.randn(n, C, generator=g) * scale
        z[:, -1] -= 50.0  # a class never predicted
        got = credible_samples(z, ratio, class_balanced=(standard == 0))
        ids, lab = reference.calm_credible_reference(z.double().numpy(), ratio, standard)
        assert torch.equal(got.ids, torch.from_numpy(ids)), (n, C)
        assert torch.equal(got.labels, torch.from_numpy(lab)), (n, C)
        assert got.ids.dtype == torch.int64


def test_credible_rules():
    # class 0 predicted 10 times, class 1 once (dropped: floor(0.9) = 0), class 2 three times (floor(2.7) = 2)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(14, 3, generator=g) * 0.1
    z[:10, 0] += 5 + torch.arange(10) * 0.1   # later rows more confident
    z[10, 1] += 5
    z[11:, 2] += torch.tensor([3.0, 4.0, 5.0])
    c = credible_samples(z, 0.9)
    assert c.class_counts().tolist() == [9, 0, 2]
    assert 0 not in c.ids.tolist()             # the least confident of class 0 is left out
    assert 11 not in c.ids.tolist() and 10 not in c.ids.tolist()
    # ties in entropy: identical rows, the stable rule keeps the lower indices
    z = torch.tensor([[2.0, 0.0]] * 5)
    assert credible_samples(z, 0.6).ids.tolist() == [0, 1, 2]
    # overflowing logits (exp(800) = inf in float64) are recomputed with the max subtracted
    z = torch.tensor([[800.0, 0.0], [0.0, 801.0], [1.0, 0.0], [0.0, 3.0], [700.0, 0.0]], dtype=torch.float64)
    c = credible_samples(z, 1.0)
    assert c.ids.tolist() == [0, 1, 2, 3, 4] and c.labels.tolist() == [0, 1, 0, 1, 0]
    assert credible_samples(z, 0.67).ids.tolist() == [0, 1, 4]   # the overflowing rows are the most confident
    # entropies are float64: a difference below float32 resolution still orders the samples
    z = torch.tensor([[3.0, 0.0], [3.0 + 1e-10, 0.0]], dtype=torch.float64)
    assert credible_samples(z, 0.5).ids.tolist() == [1]
    with pytest.raises(ValueError, match="NaN or inf"):
        credible_samples(torch.tensor([[float("nan"), 0.0]]), 0.9)
    with pytest.raises(ValueError, match="empty"):
        credible_samples(torch.randn(20, 4, generator=g), 0.05)
    with pytest.raises(ValueError, match="ratio"):
        credible_samples(torch.randn(20, 4, generator=g), 0.0)


# ------------------------------------------------------------------------------------------------
# Schedule and batches
# ------------------------------------------------------------------------------------------------
def test_schedule_resolution():
    names = ["a", "b", "c", "d", "e"]
    assert resolve_schedule(None, names) == [[0, 1, 2], [3], [4]]
    assert resolve_schedule(None, names[:2]) == [[0], [1]]
    assert resolve_schedule([["a", "c"], "b", [4], ["d"]], names) == [[0, 2], [1], [4], [3]]
    r = resolve_schedule("random", names, seed=3)
    assert r == resolve_schedule("random", names, seed=3)
    assert len(r) == 3 and sorted(i for g in r for i in g) == list(range(5)) and len(r[1]) == len(r[2]) == 1
    assert {tuple(resolve_schedule("random", names, seed=s)[1]) for s in range(20)} != {tuple(r[1])}
    with pytest.raises(ValueError, match="unknown task 'x'"):
        resolve_schedule([["a", "x"], ["b"]], names)
    with pytest.raises(ValueError, match="exactly one task"):
        resolve_schedule([["a", "b", "c"], ["d", "e"]], names)
    with pytest.raises(ValueError, match="leaves out"):
        resolve_schedule([["a", "b"], ["c"]], names)
    with pytest.raises(ValueError, match="more than once"):
        resolve_schedule([["a", "b", "c"], ["c"], ["d"], ["e"]], names)


def test_batch_sampler_two_batches_or_one():
    s = RandomBatchSampler(seed=1, batch_size=128, batches_per_task=2)
    for n, sizes in [(300, [128, 128]), (200, [128, 72]), (129, [128, 1]), (128, [128]), (100, [100]), (1, [1])]:
        ids = torch.arange(1000, 1000 + n) * 3
        out = s(1, 7, "task", ids)
        assert [b.numel() for b in out] == sizes, n
        cat = torch.cat(out)
        assert cat.unique().numel() == cat.numel() and bool(torch.isin(cat, ids).all())
        assert all(torch.equal(x, y) for x, y in zip(out, s(1, 7, "task", ids)))   # a pure function of its key
    ids = torch.arange(300)
    assert not torch.equal(s(1, 7, "task", ids)[0], s(1, 8, "task", ids)[0])
    assert not torch.equal(s(1, 7, "task", ids)[0], s(1, 7, "other", ids)[0])


# ------------------------------------------------------------------------------------------------
# The whole loop vs the reference (§8.9, official order)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [5.0, 0.0])
def test_faithful_matches_reference_bitwise(monkeypatch, bias):
    # bias 0 starts every logit at R = +-0, where sgn+(R) = -1 and the mask is 0 (§8.8)
    res, ref, cred, seen_R, adapter = _run_both(monkeypatch, faithful=True, sigmoid_bias=bias)
    for t, n in enumerate(NAMES):
        assert torch.equal(res.credible[n].ids, cred[t][0]), n
        assert torch.equal(res.credible[n].labels, cred[t][1]), n
    assert len(res.credible["b"]) <= 64 < len(res.credible["a"])      # one batch and two batches both occur
    assert set(seen_R) == set(ref["R"]) == set(RECORD)
    names = adapter.param_names()
    for key in RECORD:
        for name, r in zip(names, seen_R[key]):
            assert_same(r, ref["R"][key][name], f"R {key} {name}")
    assert len(res.masks) == len(ref["masks"]) == 2
    total_on = 0
    for i, m in enumerate(ref["masks"]):
        got = res.mask(i)
        for name in names:
            assert torch.equal(got[name], m[name]), f"mask step {i + 1} {name}"
        total_on += sum(int(m[name].sum()) for name in names)
        assert res.masks[i]["on"] == sum(int(m[name].sum()) for name in names)
    assert 0 < total_on
    for k, v in ref["task_vector"].items():
        assert_same(res.task_vector[k], v, f"task vector {k}")
    _, _, pre, _, _ = _problem()
    for k in pre:
        assert_same(res.state_dict[k], pre[k] + ref["task_vector"][k], f"merged {k}")
    # the masks really moved away from the initial top-k (the loop is not a no-op)
    assert any(x != 0 for s in res.steps[1:3] for x in s["flips"])
    assert res.config["faithful"] and "faithful" in res.config["choices"]["mode"]


def test_default_mode_same_masks(monkeypatch):
    res_f, _, _, _, _ = _run_both(monkeypatch, faithful=True)
    res_d, _, _, _, _ = _run_both(monkeypatch, faithful=False)
    assert res_d.config["choices"]["mode"] == "fused"
    for i in range(2):
        assert torch.equal(res_d.masks[i]["packed"], res_f.masks[i]["packed"])
    for k in res_f.task_vector:
        torch.testing.assert_close(res_d.task_vector[k], res_f.task_vector[k], rtol=0, atol=0)


def test_mean_reduction_is_eta_over_batches(monkeypatch):
    # one mask step over a, b, d then c: 2 + 1 + 2 + 2 = 7 batches per iteration, so "mean" is the
    # official sum with eta / 7
    eta, sched = 40.0, [[0, 1, 3], [2]]
    res, _, _, _, _ = _run_both(monkeypatch, faithful=True, batch_reduction="mean", schedule=sched, eta=eta)
    _, ref, _, _, adapter = _run_both(monkeypatch, faithful=True, schedule=sched, eta=eta / 7)
    assert res.config["batch_reduction"] == "mean"
    got = res.mask(0)
    for name in adapter.param_names():
        assert torch.equal(got[name], ref["masks"][0][name])
    for k, v in ref["task_vector"].items():
        assert_same(res.task_vector[k], v, f"task vector {k}")
    _, ref_sum, _, _, _ = _run_both(monkeypatch, faithful=True, schedule=sched, eta=eta)
    assert any(not torch.equal(ref_sum["masks"][0][n], ref["masks"][0][n]) for n in adapter.param_names())


# ------------------------------------------------------------------------------------------------
# A synthetic multi-task problem where localisation pays
# ------------------------------------------------------------------------------------------------
def test_calm_beats_ta_and_ties_on_heldout():
    """Four 4-class tasks on 32-d inputs; task t's inputs live in coordinates [8t, 8t+8) and its labels are
    a random linear rule of them; fixed random heads on normalised features (the CLIP convention).  Each
    task is fine-tuned from the same random θ0 with Adam (so its first-layer change is localised, the
    shared second layer interferes).  CALM (2 tasks by TA, 2 by masks, η = 1e4, 100 iterations, sparsity
    1e-2 for this 1.6K-parameter model) vs TA and TIES at λ = 0.3 on held-out data."""
    from multitask_problem import localized_tasks

    p = localized_tasks(seed=1)
    pre, fts = p.pretrained, p.finetuned
    mean_acc = p.mean_accuracy
    ta = mean_acc(calm_fast.task_arithmetic(pre, fts, scaling=0.3))
    ties = mean_acc(calm_fast.ties_merging(pre, fts, density=0.2, scaling=0.3))
    res = calm_fast.calm(pre, fts, p.adapter, p.unlabeled, schedule=[[0, 1], [2], [3]], sparsity=0.01, eta=1e4,
                         iterations=100, batch_size=64, progress=False, seed=0, eval_data=p.eval_data(),
                         eval_every=50)
    got = mean_acc(res.state_dict)
    assert got == pytest.approx(res.steps[-1]["accuracy"]["mean"])
    print(f"held-out mean accuracy: CALM {got:.3f}, TA {ta:.3f}, TIES {ties:.3f}")
    assert got > ta + 0.01 and got > ties + 0.01, (got, ta, ties)


# ------------------------------------------------------------------------------------------------
# Bad input, evaluation, save
# ------------------------------------------------------------------------------------------------
def _small_call(**kw):
    net, adapter, pre, fts, data = _problem()
    args = dict(iterations=2, sparsity=0.05, eta=30.0, progress=False, batch_size=64)
    args.update(kw)
    data = args.pop("data", data)
    return calm_fast.calm(pre, fts, adapter, data, **args)


def test_bad_input_errors():
    net, adapter, pre, fts, data = _problem()
    with pytest.raises(ValueError, match=r"unlabeled data is missing for tasks \['c'\]"):
        _small_call(data={k: v for k, v in data.items() if k != "c"})
    bad = {n: torch.randn(SAMPLES[i], CLASSES[i] + (1 if n == "d" else 0)) for i, n in enumerate(NAMES)}
    with pytest.raises(ValueError, match="task 'd': teacher_logits has 6 classes but the adapter's head has 5"):
        _small_call(teacher_logits=bad)
    with pytest.raises(ValueError, match="unknown task 'zz'"):
        _small_call(schedule=[["a", "zz"], ["b"]])
    with pytest.raises(ValueError, match="credible set is empty"):
        _small_call(ratio=0.01)
    with pytest.raises(ValueError, match="exactly one task"):
        _small_call(schedule=[["a", "b"], ["c", "d"]])
    with pytest.raises(ValueError, match="batch_reduction"):
        _small_call(batch_reduction="avg")
    with pytest.raises(ValueError, match="outside task 'a'"):
        _small_call(batch_sampler=lambda s, i, t, ids: [torch.arange(SAMPLES[NAMES.index(t)])])
    with pytest.raises(ValueError, match="eval_data"):
        _small_call(eval_data={"a": (data["a"], torch.full((SAMPLES[0],), 7))})


def test_teacher_logits_and_eval_inside_loop():
    net, adapter, pre, fts, data = _problem()
    logits = {n: _teacher_logits(net, adapter, fts[t], n, data[n]) for t, n in enumerate(NAMES)}
    a = _small_call(iterations=4)
    b = _small_call(iterations=4, teacher_logits=logits)
    for n in NAMES:
        assert torch.equal(a.credible[n].ids, b.credible[n].ids)
    labelled = {n: (data[n], torch.randint(0, CLASSES[t], (SAMPLES[t],))) for t, n in enumerate(NAMES[:3])}
    r = _small_call(iterations=4, eval_data=labelled, eval_every=2, progress=True)   # bars and postfix too
    for s in r.steps[1:3]:
        assert [e["iteration"] for e in s["evaluations"]] == [1, 3]
        assert set(s["evaluations"][0]["accuracy"]) == {"a", "b", "c", "mean"}
    assert set(r.steps[-1]["accuracy"]) == {"a", "b", "c", "mean"}
    assert r.config["teacher"] == "finetuned" and b.config["teacher"] == "teacher_logits"


def test_save_roundtrip(tmp_path):
    from safetensors.torch import load_file

    r = _small_call(iterations=3)
    out = tmp_path / "merged"
    r.save(out)
    assert sorted(os.listdir(tmp_path)) == ["merged"]   # no temporary folder left behind
    sd = load_file(str(out / "model.safetensors"))
    assert set(sd) == set(r.state_dict)
    for k, v in r.state_dict.items():
        assert torch.equal(sd[k], v)
    extra = load_file(str(out / "calm_masks.safetensors"))
    for i, m in enumerate(r.masks):
        assert torch.equal(extra[f"mask.step{i}.{m['task']}"], m["packed"])
    assert torch.equal(extra["credible.a.ids"], r.credible["a"].ids)
    rec = json.loads((out / "calm_record.json").read_text())
    assert rec["config"]["schedule"] == [["a", "b"], ["c"], ["d"]]
    assert len(rec["steps"][1]["loss"]) == 3
    from calm_fast.io.errors import OutputError

    with pytest.raises(OutputError, match="already exists"):
        r.save(out)
    r.save(out, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["merged"]
