"""Data-parallel CALM / AdaMerging / DOGE + AdaMerging and layer-sharded DOGE_TA on real gloo ranks (loopback).

Every rank also runs the method alone (``data_parallel=False`` / ``shard_layers=False``: the single-process
code path, no collective), on the same process and inputs, so the comparison is between the data-parallel
run and the 1-process run given the same batches:

* ``dp_reduction="exact"`` and the layer sharding: ``torch.equal`` of every output tensor;
* ``dp_reduction="allreduce"``: the stated tolerance, and identical binary masks (CALM);
* every rank returns the same result;
* 3 ranks with fewer batches than ranks (a rank with no batch), a failing rank (an error on every rank, not a
  hang), and the CLI under ``torchrun`` (2 ranks) writing the 1-process CLI's model bit for bit.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import calm_fast
from calm_fast.methods.adamerging import CyclingBatchSampler
from calm_fast.methods.calm import RandomBatchSampler
from calm_fast.models import GenericAdapter
from dist_harness import RanksFailed, run_ranks
from test_adamerging import DogeNet  # the small networks of the one-process tests
from test_calm import Net

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# Small problems (fresh random weights and data from the seed)
# ------------------------------------------------------------------------------------------------
def _problem(seed, names, samples, classes, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = Net()
    heads = {}
    for n, C in zip(names, classes):
        h = nn.Linear(6, C)
        with torch.no_grad():
            h.weight.copy_(torch.randn(C, 6, generator=g) * 3)
        heads[n] = h.requires_grad_(False)
    adapter = GenericAdapter(net, heads, normalize_features=True)
    pre = {k: v.detach().clone() for k, v in net.state_dict().items()}
    pre["extra.weight"] = torch.randn(5, generator=g)  # merged, never run
    fts = [{k: v + scale * torch.randn(v.shape, generator=g) for k, v in pre.items()} for _ in names]
    data = {n: torch.randn(m, 12, generator=g) for n, m in zip(names, samples)}
    return adapter, pre, fts, data


CALM_NAMES, CALM_SAMPLES, CALM_CLASSES = ["a", "b", "c", "d"], [90, 30, 80, 70], [3, 4, 3, 5]
CALM_KW = dict(schedule=[[0, 1], [2], [3]], iterations=4, eta=30.0, sparsity=0.05, ratio=0.9, batch_size=24,
               batches_per_task=2, eval_batch_size=40, progress=False)  # 3 teacher batches: uneven over 2 ranks


def _calm_summary(res):
    return {"state": res.state_dict, "tau": res.task_vector, "packed": [m["packed"] for m in res.masks],
            "on": [m["on"] for m in res.masks], "loss": [s.get("loss") for s in res.steps],
            "credible": {t: (c.ids, c.labels) for t, c in res.credible.items()}, "R": res._R,
            "dp": res.config["data_parallel"]}


def _evals(seed, names, classes, n=70):
    """Labelled evaluation data: 70 samples in batches of 40 (CALM_KW's eval_batch_size) are two batches,
    one per rank."""
    g = torch.Generator().manual_seed(seed + 7)
    return {t: (torch.randn(n, 12, generator=g), torch.randint(0, C, (n,), generator=g)) for t, C in zip(names, classes)}


def _calm_runs(seed):
    adapter, pre, fts, data = _problem(seed, CALM_NAMES, CALM_SAMPLES, CALM_CLASSES)
    evals = _evals(seed, CALM_NAMES, CALM_CLASSES)
    out = {}
    for faithful in (False, True):
        for how in ("single", "exact", "allreduce"):
            R_last = {}

            def cb(step, iteration, task, R, metrics):
                R_last[step] = torch.cat([r.reshape(-1) for r in R]).clone()

            res = calm_fast.calm(pre, fts, adapter, data, faithful=faithful, callback=cb, eval_data=evals,
                                 eval_every=2, data_parallel=False if how == "single" else None,
                                 dp_reduction="allreduce" if how == "single" else how, **CALM_KW)
            res._R = R_last
            out[(faithful, how)] = _calm_summary(res)
            out[(faithful, how)]["acc"] = [s.get("accuracy") for s in res.steps]
    return out


ADA_NAMES, ADA_SAMPLES = ["a", "b", "c"], [50, 37, 44]
ADA_CASES = {
    "layer": dict(preset="official", steps=4),
    "task": dict(preset="official", granularity="task", init=0.01, lr=3e-3, steps=4),
    "pp": dict(preset="fusion_bench", mode="adamerging_pp", density=0.3, steps=4, batches_per_task=2),
}


def _ada_runs(seed, cases=tuple(ADA_CASES)):
    adapter, pre, fts, data = _problem(seed + 1, ADA_NAMES, ADA_SAMPLES, [4, 4, 4])
    out = {}
    for case in cases:
        for how in ("single", "exact", "allreduce"):
            res = calm_fast.adamerging(pre, fts, adapter, data, progress=False, seed=3,
                                       data_parallel=False if how == "single" else None,
                                       eval_data=_evals(seed, ADA_NAMES, [4, 4, 4]), eval_every=2,
                                       eval_batch_size=40,
                                       dp_reduction="allreduce" if how == "single" else how, **ADA_CASES[case])
            out[(case, how)] = {"state": res.state_dict, "lambdas": res.lambdas, "raw": res.raw_lambdas,
                                "loss": res.loss, "entropy": res.entropy, "dp": res.config["data_parallel"],
                                "acc": res.evaluations}
    return out


def _doge_problem(seed, T=3):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = DogeNet()
    names = ADA_NAMES[:T]
    heads = {n: nn.Linear(12, 4).requires_grad_(False) for n in names}
    adapter = GenericAdapter(net, heads, normalize_features=True)
    pre = {k: v.detach().clone() for k, v in net.state_dict().items()}
    fts = [{k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in pre.items()} for _ in range(T)]
    data = {n: torch.randn(40, 8, generator=g) for n in names}
    return adapter, pre, fts, data


def _doge_runs(seed):
    import importlib

    doge = importlib.import_module("calm_fast.methods.doge")
    doge_adamerging = importlib.import_module("calm_fast.methods.doge_adamerging")

    adapter, pre, fts, data = _doge_problem(seed + 2)
    out = {}
    computed = []  # layers this rank optimised (the sharding must really split the work)
    for mod, name in ((doge, "optimise_delta"), (doge_adamerging, "optimise_task_deltas")):
        def counting(tau, *a, _f=getattr(mod, name), **kw):
            computed.append(int(tau.shape[0]))
            return _f(tau, *a, **kw)
        setattr(mod, name, counting)
    for how in ("single", "sharded"):
        computed.clear()
        res = calm_fast.doge_ta(pre, fts, steps=20, shard_layers=(how == "sharded"))
        out[("doge_ta", how)] = {"state": res.merged, "delta": res.delta, "losses": res.losses,
                                 "keys": list(res.delta)}
        out[("doge_ta_layers", how)] = sum(computed)
    sampler = CyclingBatchSampler(seed=1, batch_size=8, batches_per_task=2)
    for how in ("single", "exact", "allreduce"):
        computed.clear()
        res = calm_fast.doge_adamerging(pre, fts, adapter, data, steps=3, doge_steps=20, batch_sampler=sampler,
                                        progress=False, data_parallel=False if how == "single" else None,
                                        shard_layers=how != "single",
                                        dp_reduction="allreduce" if how == "single" else how)
        out[("doge_ada_layers", how)] = sum(computed)
        out[("doge_ada", how)] = {"state": res.state_dict, "lambdas": res.lambdas, "delta": res.delta,
                                  "doge_losses": res.doge_losses, "loss": res.loss, "keys": list(res.delta)}
    return out


def _everything(seed):
    torch.set_num_threads(1)
    return {"calm": _calm_runs(seed), "ada": _ada_runs(seed), "doge": _doge_runs(seed)}


# ------------------------------------------------------------------------------------------------
# Comparisons
# ------------------------------------------------------------------------------------------------
def equal(a, b, where=""):
    """Bitwise equality of nested dicts/lists/tuples of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where}: max diff {float((a.double() - b.double()).abs().max())}"
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a} != {b}"


def close(a, b, rtol, atol, where=""):
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{where}: {m}")
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            close(a[k], b[k], rtol, atol, f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            close(x, y, rtol, atol, f"{where}[{i}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=rtol, abs=atol), where
    else:
        assert a == b, f"{where}: {a} != {b}"


@pytest.fixture(scope="module")
def two_ranks():
    seed = 20251206
    return run_ranks(_everything, 2, seed, timeout=120)


def test_every_rank_returns_the_same_result(two_ranks):
    def results(out):  # without the per-rank work counts
        return {**out, "doge": {k: v for k, v in out["doge"].items() if not k[0].endswith("_layers")}}

    equal(results(two_ranks[0]), results(two_ranks[1]), "rank0 vs rank1")


def test_calm_exact_is_bit_identical_to_one_process(two_ranks):
    out = two_ranks[0]["calm"]
    for faithful in (False, True):
        single, dp = out[(faithful, "single")], out[(faithful, "exact")]
        assert dp["dp"] == {"active": True, "world_size": 2, "reduction": "exact"}
        assert single["dp"]["active"] is False
        for k in ("state", "tau", "packed", "on", "loss", "credible", "R", "acc"):
            equal(dp[k], single[k], f"faithful={faithful} {k}")
        assert 0 < sum(single["on"]) < sum(m.numel() * 8 for m in single["packed"])  # a real mask


# allreduce: gradient sums in the backend's order.  Stated tolerance: the mask logits R within 1e-5 relative
# (+1e-4 absolute; R is O(5)), the losses within 1e-6 relative; the binary masks and therefore the merged
# model (each element taken from τ_prev or τ_new) identical.
def test_calm_allreduce_within_tolerance_and_same_masks(two_ranks):
    out = two_ranks[0]["calm"]
    for faithful in (False, True):
        single, dp = out[(faithful, "single")], out[(faithful, "allreduce")]
        assert dp["dp"]["reduction"] == "allreduce"
        close(dp["R"], single["R"], 1e-5, 1e-4, f"faithful={faithful} R")
        close(dp["loss"], single["loss"], 1e-6, 1e-7, f"faithful={faithful} loss")
        for k in ("packed", "on", "state", "tau", "credible"):
            equal(dp[k], single[k], f"faithful={faithful} {k}")


def test_adamerging_exact_is_bit_identical(two_ranks):
    out = two_ranks[0]["ada"]
    for case in ADA_CASES:
        single, dp = out[(case, "single")], out[(case, "exact")]
        assert dp["dp"] == {"active": True, "world_size": 2, "reduction": "exact"}
        equal(dp["state"], single["state"], case)
        for k in ("lambdas", "raw", "loss", "entropy"):
            equal(dp[k], single[k], f"{case} {k}")
        assert dp["acc"] == single["acc"] and len(single["acc"]) >= 2, case  # evaluation batches split, counts summed
        assert float((single["lambdas"] - single["lambdas"][0, 0]).abs().max()) > 0 or case == "task"


# allreduce: λ within 1e-6 absolute after the steps (Adam normalises the gradient; λ ~ 0.3), the objective
# within 1e-6 relative, the merged tensors within 1e-6.
def test_adamerging_allreduce_within_tolerance(two_ranks):
    out = two_ranks[0]["ada"]
    for case in ADA_CASES:
        single, dp = out[(case, "single")], out[(case, "allreduce")]
        for k in ("lambdas", "raw"):
            close(dp[k], single[k], 0, 1e-6, f"{case} {k}")
        close(dp["loss"], single["loss"], 1e-6, 1e-7, f"{case} loss")
        close(dp["entropy"], single["entropy"], 1e-6, 1e-7, f"{case} entropy per task")
        close(dp["state"], single["state"], 0, 1e-6, f"{case} state")
        # and the steps moved λ by far more than the tolerance
        assert float((single["raw"] - single["raw"].flatten()[0]).abs().max()) > 1e-4 or case == "task"


def test_doge_ta_sharded_layers_bit_identical(two_ranks):
    out = two_ranks[0]["doge"]
    single, sharded = out[("doge_ta", "single")], out[("doge_ta", "sharded")]
    assert len(single["keys"]) == 6
    equal(sharded, single, "doge_ta")
    # the work was split: each rank optimised some of the 6 layers, together all of them once
    per_rank = [two_ranks[r]["doge"][("doge_ta_layers", "sharded")] for r in (0, 1)]
    assert out[("doge_ta_layers", "single")] == 6 and sum(per_rank) == 6 and min(per_rank) > 0, per_rank
    per_rank = [two_ranks[r]["doge"][("doge_ada_layers", "exact")] for r in (0, 1)]
    assert out[("doge_ada_layers", "single")] == 6 and sum(per_rank) == 6 and min(per_rank) > 0, per_rank


def test_doge_adamerging_exact_and_allreduce(two_ranks):
    out = two_ranks[0]["doge"]
    single = out[("doge_ada", "single")]
    equal(out[("doge_ada", "exact")], single, "doge_adamerging exact")
    dp = out[("doge_ada", "allreduce")]
    equal(dp["delta"], single["delta"], "doge_adamerging δ (sharded, exact)")
    close(dp["lambdas"], single["lambdas"], 0, 1e-6, "doge_adamerging λ")
    close(dp["state"], single["state"], 0, 1e-6, "doge_adamerging state")


# ------------------------------------------------------------------------------------------------
# 3 ranks: more ranks than batches
# ------------------------------------------------------------------------------------------------
def _three(seed):
    torch.set_num_threads(1)
    adapter, pre, fts, data = _problem(seed, ["a", "b"], [30, 26], [3, 4])
    out = {}
    for how in ("single", "exact", "allreduce"):   # 2 batches per step (one per task) on 3 ranks: rank 2 idle
        res = calm_fast.adamerging(pre, fts, adapter, data, preset="fusion_bench", steps=3, progress=False,
                                   data_parallel=False if how == "single" else None,
                                   dp_reduction="allreduce" if how == "single" else how)
        out[("ada", how)] = (res.state_dict, res.raw_lambdas, res.loss)
    for how in ("single", "exact"):                # several batches per task, dealt over 3 ranks
        res = calm_fast.calm(pre, fts, adapter, data, iterations=3, eta=30.0, sparsity=0.05, batch_size=8,
                             batches_per_task=3, eval_batch_size=7, progress=False,
                             schedule=[["a"], ["b"]], data_parallel=False if how == "single" else None,
                             dp_reduction="exact")
        out[("calm", how)] = (res.state_dict, [m["packed"] for m in res.masks], res.steps[1]["loss"])
    return out


def test_three_ranks_with_an_idle_rank():
    out = run_ranks(_three, 3, 7, timeout=90)
    equal(out[0], out[1], "rank0 vs rank1")
    equal(out[0], out[2], "rank0 vs rank2")
    o = out[0]
    equal(o[("ada", "exact")], o[("ada", "single")], "adamerging exact, 3 ranks")
    close(o[("ada", "allreduce")], o[("ada", "single")], 1e-6, 1e-6, "adamerging allreduce, 3 ranks")
    equal(o[("calm", "exact")], o[("calm", "single")], "calm exact, 3 ranks")


# ------------------------------------------------------------------------------------------------
# A failing rank
# ------------------------------------------------------------------------------------------------
def _fails_on_rank_1():
    from calm_fast import distributed

    torch.set_num_threads(1)
    adapter, pre, fts, data = _problem(3, ["a", "b"], [30, 26], [3, 4])
    inner = RandomBatchSampler(seed=0, batch_size=8, batches_per_task=2)

    def sampler(step, it, task, ids):
        if distributed.rank() == 1 and it == 2:
            raise ValueError("planted failure on rank 1")
        return inner(step, it, task, ids)

    calm_fast.calm(pre, fts, adapter, data, iterations=5, sparsity=0.05, batch_sampler=sampler, progress=False,
                   schedule=[["a"], ["b"]])


def test_a_failing_rank_is_an_error_on_every_rank_not_a_hang():
    with pytest.raises(RanksFailed) as info:
        run_ranks(_fails_on_rank_1, 2, timeout=60, env={"CALM_FAST_DIST_TIMEOUT": "30"})
    outcomes = info.value.outcomes
    assert outcomes[1][0] == "error" and "planted failure on rank 1" in outcomes[1][1]
    assert outcomes[0][0] == "error" and "DistributedError" in outcomes[0][1], outcomes[0]


def _rank_dependent_sampler():
    from calm_fast import distributed

    torch.set_num_threads(1)
    adapter, pre, fts, data = _problem(3, ["a", "b"], [30, 26], [3, 4])
    inner = RandomBatchSampler(seed=0, batch_size=8, batches_per_task=2)

    def sampler(step, task, n):  # seeded by the rank: the ranks would silently train on different batches
        return inner(distributed.rank(), step, task, torch.arange(n))

    calm_fast.adamerging(pre, fts, adapter, data, steps=2, batch_sampler=sampler, progress=False)


def test_ranks_that_draw_different_batches_are_an_error():
    with pytest.raises(RanksFailed) as info:
        run_ranks(_rank_dependent_sampler, 2, timeout=60, env={"CALM_FAST_DIST_TIMEOUT": "30"})
    for r in (0, 1):
        kind, text = info.value.outcomes[r]
        assert kind == "error" and "DistributedError" in text and "disagree on the batches" in text, text


def _rank_dependent_settings(method, what):
    from calm_fast import distributed

    torch.set_num_threads(1)
    samples = [30, 26] if (what != "data" or distributed.rank() == 0) else [30, 27]
    adapter, pre, fts, data = _problem(3, ["a", "b"], samples, [3, 4])
    if method == "calm":
        it = 3 if (what != "setting" or distributed.rank() == 0) else 4
        calm_fast.calm(pre, fts, adapter, data, iterations=it, sparsity=0.05, batch_size=8, progress=False,
                       schedule=[["a"], ["b"]])
    else:
        lr = 1e-3 if (what != "setting" or distributed.rank() == 0) else 2e-3
        calm_fast.adamerging(pre, fts, adapter, data, steps=2, lr=lr, progress=False)


@pytest.mark.parametrize("method,what", [("calm", "setting"), ("adamerging", "setting"), ("adamerging", "data")])
def test_ranks_called_with_different_settings_or_data_are_an_error(method, what):
    # another iteration count / learning rate, or one more sample on one rank (a data file that differs on
    # one node): every rank stops before training instead of averaging gradients of different runs
    with pytest.raises(RanksFailed) as info:
        run_ranks(_rank_dependent_settings, 2, method, what, timeout=60, env={"CALM_FAST_DIST_TIMEOUT": "30"})
    for r in (0, 1):
        kind, text = info.value.outcomes[r]
        assert kind == "error" and "DistributedError" in text and "settings, tensors and data sizes" in text, text


def test_bad_settings():
    adapter, pre, fts, data = _problem(3, ["a", "b"], [30, 26], [3, 4])
    with pytest.raises(ValueError, match="dp_reduction"):
        calm_fast.calm(pre, fts, adapter, data, iterations=1, dp_reduction="mean", progress=False)
    with pytest.raises(ValueError, match="dp_reduction"):
        calm_fast.adamerging(pre, fts, adapter, data, steps=1, dp_reduction="sum", progress=False)
    # without a process group, data_parallel=True runs as one process (the same result)
    a = calm_fast.adamerging(pre, fts, adapter, data, steps=2, progress=False, data_parallel=True)
    b = calm_fast.adamerging(pre, fts, adapter, data, steps=2, progress=False)
    assert a.config["data_parallel"]["active"] is False
    equal(a.state_dict, b.state_dict)


# ------------------------------------------------------------------------------------------------
# The CLI under torchrun
# ------------------------------------------------------------------------------------------------
def _cli_env():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1",
           "CALM_FAST_DIST_TIMEOUT": "60"}
    for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        env.pop(v, None)
    return env


def _calm_config(tmp_path, output, **params):
    import calm_cli_models as cm

    cm.write_problem(tmp_path)
    cfg = {"merge_method": "calm", "base_model": "base.safetensors", "adapter": "calm_cli_models:build",
           "tasks": {t: {"model": f"ft_{t}.safetensors", "data": f"data_{t}.pt"} for t in cm.TASKS},
           "parameters": {"iterations": 3, "batch_size": 8, "sparsity": 0.05, **params}, "output": output}
    path = tmp_path / "calm.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _torchrun(n, *args, timeout=120):
    from dist_harness import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={n}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", "-m", "calm_fast.cli", "merge", *map(str, args)]
    return subprocess.run(cmd, env=_cli_env(), capture_output=True, text=True, timeout=timeout)


def test_cli_calm_on_two_ranks_equals_one_process(tmp_path):
    from calm_fast.io import load_state_dict

    cfg = _calm_config(tmp_path, "out1")
    one = subprocess.run([sys.executable, "-m", "calm_fast.cli", "merge", "-c", str(cfg), "--no-progress"],
                         env=_cli_env(), capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr
    two = _torchrun(2, "-c", cfg, "--out", tmp_path / "out2", "--json", tmp_path / "run.json", "--no-progress")
    assert two.returncode == 0, two.stderr + two.stdout
    # rank 0 speaks (the plan, with the ranks, and the result), rank 1 is quiet
    assert two.stdout.count("method: calm") == 1 and two.stdout.count("wrote:") == 1, two.stdout
    assert "distributed: 2 ranks" in two.stdout and "distributed:" not in one.stdout
    for f in ("model.safetensors", "calm_masks.safetensors"):
        a, b = load_state_dict(str(tmp_path / "out1" / f)), load_state_dict(str(tmp_path / "out2" / f))
        equal(b, a, f)
    import json

    rec = json.loads((tmp_path / "out2" / "calm_record.json").read_text())
    assert rec["config"]["data_parallel"] == {"active": True, "world_size": 2, "reduction": "allreduce"}
    assert json.loads((tmp_path / "run.json").read_text())["method"] == "calm"
    assert sorted(os.listdir(tmp_path / "out2")) == sorted(os.listdir(tmp_path / "out1"))


def test_cli_distributed_flag_without_torchrun_is_a_usage_error(tmp_path, capsys):
    from calm_fast import cli

    cfg = _calm_config(tmp_path, "out")
    env = _cli_env()
    old = {v: os.environ.pop(v) for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v in os.environ}
    try:
        rc = cli.main(["merge", "-c", str(cfg), "--distributed", "--no-progress"])
    finally:
        os.environ.update(old)
    err = capsys.readouterr().err
    assert rc == 2 and "torchrun" in err, err
    assert not (tmp_path / "out").exists()
    del env


def test_cli_a_failing_rank_exits_7_and_leaves_no_output(tmp_path):
    # rank 1 reads a data entry point that fails on rank 1 only: rank 1 exits with its own error (2), rank 0
    # with 7 (DistributedError), and no output folder appears.  The two ranks are started by hand with
    # torchrun's environment, so that each one's exit code can be read (torchrun reports only the first).
    from dist_harness import free_port

    cfg = _calm_config(tmp_path, "out")
    data = yaml.safe_load(cfg.read_text())
    data["tasks"]["a"]["data"] = "dist_fail_data:data_a"
    cfg.write_text(yaml.safe_dump(data, sort_keys=False))
    (tmp_path / "dist_fail_data.py").write_text(
        "import os, torch\n"
        "def data_a():\n"
        "    if os.environ.get('RANK') == '1':\n"
        "        raise RuntimeError('planted failure on rank 1')\n"
        "    return torch.load(os.path.join(os.path.dirname(__file__), 'data_a.pt'))\n")
    env = _cli_env()
    env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(tmp_path)])
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-m", "calm_fast.cli", "merge", "-c", str(cfg), "--no-progress"],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert procs[1].returncode == 2 and "planted failure on rank 1" in outs[1][1], outs[1]
    assert procs[0].returncode == 7 and "rank 0" in outs[0][1] and "another rank failed" in outs[0][1], outs[0]
    assert not (tmp_path / "out").exists()


def test_cli_doge_ta_on_two_ranks_equals_the_api(tmp_path):
    from calm_fast.io import load_state_dict, save_state_dict

    g = torch.Generator().manual_seed(5)
    base = {"encoder.q.weight": torch.randn(12, 8, generator=g), "encoder.fc.weight": torch.randn(6, 12, generator=g),
            "encoder.k.weight": torch.randn(12, 8, generator=g), "encoder.fc.bias": torch.randn(6, generator=g),
            "head.weight": torch.randn(3, 6, generator=g)}
    save_state_dict(base, tmp_path / "base.safetensors")
    fts = []
    for i in range(3):
        fts.append({k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()})
        save_state_dict(fts[-1], tmp_path / f"ft{i}.safetensors")
    cfg = {"merge_method": "doge_ta", "base_model": "base.safetensors",
           "models": [f"ft{i}.safetensors" for i in range(3)],
           "parameters": {"eta": 0.15, "steps": 9, "subspace": 3, "lr": 1e-3}, "output": "out"}
    (tmp_path / "doge.yaml").write_text(yaml.safe_dump(cfg))
    res = _torchrun(2, "-c", tmp_path / "doge.yaml", "--no-progress")
    assert res.returncode == 0, res.stderr + res.stdout
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want = calm_fast.doge_ta(base, fts, eta=0.15, steps=9, subspace=3, lr=1e-3, shard_layers=False).merged
    finally:
        torch.set_num_threads(n)
    got = load_state_dict(str(tmp_path / "out"))
    equal(dict(sorted(got.items())), dict(sorted(want.items())), "doge_ta CLI on 2 ranks")
    assert res.stdout.count("method: doge_ta") == 1


def _cli_fails_after_training(cfg, out):
    # rank 1 trains with rank 0, then fails where it would confirm its success: rank 0 has staged the output
    # by then and must not publish it
    from calm_fast import cli, cli_methods, distributed

    if distributed.rank() == 1:
        def planted(self):
            raise RuntimeError("planted failure after training on rank 1")

        cli_methods._RankWriter.agree = planted
    return cli.main(["merge", "-c", str(cfg), "--out", str(out), "--no-progress", "-q"])


def test_cli_a_rank_failing_after_training_stops_the_publication(tmp_path):
    cfg = _calm_config(tmp_path, "unused")
    before = set(os.listdir(tmp_path))
    codes = run_ranks(_cli_fails_after_training, 2, str(cfg), str(tmp_path / "out"), timeout=120,
                      env={"CALM_FAST_DIST_TIMEOUT": "30"})
    assert codes == [7, 1], codes  # rank 0: DistributedError; rank 1: its own (internal) error
    assert set(os.listdir(tmp_path)) == before  # no output, no staging folder, no lock left behind
