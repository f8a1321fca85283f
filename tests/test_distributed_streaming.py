"""The streaming merge on several gloo ranks (loopback, spawned processes): the output files are byte-for-byte
those of the one-process merge for every streaming method and dtype, a rank without tensors works, and a
failed or killed rank aborts every rank with DistributedError and leaves no output.

Each run_ranks call starts fresh processes (a few seconds), so one call runs many merges."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import calm_fast.streaming.params as SP
from calm_fast import ops
from calm_fast.distributed import DistributedError
from calm_fast.io import load_state_dict, save_state_dict
from calm_fast.streaming import merge_checkpoints
from dist_harness import RanksFailed, run_ranks

ROOT = Path(__file__).resolve().parents[1]

CASES = [
    ("ta", "task_arithmetic", {"scaling": 0.4}),
    ("ties", "ties_merging", {"density": 0.3, "merge": "mean"}),
    ("ties_per_tensor", "ties_merging", {"density": 0.3, "merge": "max", "mode": "per_tensor"}),
    ("dare", "dare_merging", {"p": 0.3, "seed": 3}),
    ("dare_ties", "dare_merging", {"p": 0.3, "seed": 3, "combine": "ties", "density": 0.5}),
    ("consensus", "consensus_merging", {}),
    ("consensus_ties", "consensus_merging", {"mtl": "ties", "ties_merge": "mean", "min_count": 1}),
]


def _models(gen, dtype, T=3):
    """Tensors of very different sizes (the byte-balanced assignment mixes them), a few exact zeros in the
    task vectors, an integer buffer (copied), and magnitudes that differ per tensor so that the global
    threshold is set by tensors of every rank."""
    base = {"embed.weight": torch.randn(48, 16, generator=gen)}
    for i in range(3):
        base[f"layers.{i}.w"] = torch.randn(16, 16 + 8 * i, generator=gen)
        base[f"layers.{i}.b"] = torch.randn(16, generator=gen)
    base.update({"norm.weight": torch.ones(16), "head.weight": torch.randn(10, 16, generator=gen),
                 "position_ids": torch.arange(7)})
    fts = []
    for _ in range(T):
        ft = {}
        for j, (k, v) in enumerate(base.items()):
            ft[k] = v + (0.02 * (j + 1)) * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v.clone()
        ft["layers.0.b"][:3] = base["layers.0.b"][:3]
        fts.append(ft)
    cast = lambda sd: {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}
    return cast(base), [cast(f) for f in fts]


def _cancelling(dtype):
    """TIES's zero-sign patch across ranks: tensor 'a' (small) is mostly positive, 'b' (large) mostly
    negative, and both cancel exactly at some positions: the global majority sign is -1 while the rank
    holding only 'a' sees +1."""
    g = torch.Generator().manual_seed(5)
    base = {"a": torch.zeros(400), "b": torch.zeros(96, 16)}
    t0 = {"a": torch.rand(400, generator=g) + 0.1, "b": -torch.rand(96, 16, generator=g) - 0.1}
    t1 = {"a": torch.rand(400, generator=g) + 0.1, "b": -torch.rand(96, 16, generator=g) - 0.1}
    for k in base:
        idx = torch.randperm(base[k].numel(), generator=g)[:120]
        x = torch.rand(120, generator=g) + 0.5
        t0[k].view(-1)[idx] = x
        t1[k].view(-1)[idx] = -x
    cast = lambda sd: {k: v.to(dtype) for k, v in sd.items()}
    return cast(base), [cast(t0), cast(t1)]


def _save(root: Path, name: str, base, fts):
    save_state_dict(base, root / name / "base")
    paths = []
    for i, f in enumerate(fts):
        save_state_dict(f, root / name / f"ft{i}", max_shard_size=1500 if i == 0 else None)
        paths.append(str(root / name / f"ft{i}"))
    return str(root / name / "base"), paths


def _run_jobs(jobs):
    """On every rank: each job's distributed merge (with its engine constants set); returns what each did."""
    out = []
    for job in jobs:
        saved = {k: getattr(SP, k) for k in job.get("consts", {})}
        try:
            for k, v in job.get("consts", {}).items():
                setattr(SP, k, v)
            r = merge_checkpoints(job["base"], job["models"], job["method"], output=job["out"], distributed=True,
                                  **job["kw"])
        finally:
            for k, v in saved.items():
                setattr(SP, k, v)
        out.append({"rank": r.rank, "world": r.world_size, "zero_sign": r.zero_sign, "patched": r.patched,
                    "passes": r.passes,
                    "remerged": r.remerged, "fallbacks": r.bracket_fallbacks, "plans": r.rank_plans,
                    "state_dict": r.state_dict if job["out"] is None else None})
    return out


def _single(job, monkeypatch, out):
    for k, v in job.get("consts", {}).items():
        monkeypatch.setattr(SP, k, v)
    r = merge_checkpoints(job["base"], job["models"], job["method"], output=out, **job["kw"])
    monkeypatch.undo()
    return r


def _assert_same_files(a: Path, b: Path):
    """Same file names and the same bytes (headers, metadata, index, every tensor)."""
    if a.is_file() or b.is_file():
        assert a.read_bytes() == b.read_bytes(), (a, b)
        return
    names_a, names_b = sorted(os.listdir(a)), sorted(os.listdir(b))
    assert names_a == names_b
    for n in names_a:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n
    got, want = load_state_dict(a), load_state_dict(b)
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def _leftovers(folder: Path):
    return sorted(n for n in os.listdir(folder) if n.startswith("."))


def test_bit_identical_to_one_process_on_two_ranks(tmp_path, gen, monkeypatch):
    jobs = []
    for dtype in (torch.float32, torch.bfloat16):
        dn = str(dtype).split(".")[-1]
        base, fts = _models(gen, dtype)
        bp, mp = _save(tmp_path, f"m_{dn}", base, fts)
        for cid, method, kw in CASES:
            # small budget: big tensors in slices; small shards: tensors of both ranks share shard files
            jobs.append({"id": f"{cid}_{dn}", "base": bp, "models": mp, "method": method,
                         "kw": dict(kw, memory_budget="6KiB", max_shard_size=3000),
                         "out": str(tmp_path / "dist" / f"{cid}_{dn}")})
        # the radix passes of the global threshold (histograms all-reduced), and the bracket whose
        # candidates overflow (every task falls back)
        jobs.append({"id": f"ties_radix_{dn}", "base": bp, "models": mp, "method": "ties",
                     "kw": {"density": [0.2, 0.5, 0.7], "merge": "sum"}, "consts": {"BRACKET_SELECT": False},
                     "out": str(tmp_path / "dist" / f"ties_radix_{dn}")})
        jobs.append({"id": f"dare_ties_lost_{dn}", "base": bp, "models": mp, "method": "dare_ties",
                     "kw": {"p": 0.2, "density": 0.4, "seed": 9}, "consts": {"BRACKET_CANDIDATE_BYTES": 1},
                     "out": str(tmp_path / "dist" / f"dare_ties_lost_{dn}.safetensors")})
        if dtype == torch.float32:
            # caps between "each rank's candidates fit" and "the gathered total fits": every rank must then
            # take the radix passes, as the one process does (same passes and fallbacks asserted below)
            for cap in (512, 2048, 8192, 32768):
                jobs.append({"id": f"ties_cap_{cap}", "base": bp, "models": mp, "method": "ties",
                             "kw": {"density": 0.3, "merge": "sum"}, "consts": {"BRACKET_CANDIDATE_BYTES": cap},
                             "out": str(tmp_path / "dist" / f"ties_cap_{cap}")})
        cb, cf = _cancelling(dtype)
        cbp, cmp_ = _save(tmp_path, f"c_{dn}", cb, cf)
        for rec in (1 << 22, 50):
            jobs.append({"id": f"sign_patch_{rec}_{dn}", "base": cbp, "models": cmp_, "method": "ties",
                         "kw": {"density": 0.9, "merge": "max", "memory_budget": "4KiB"},
                         "consts": {"MAX_RECORDED_POSITIONS": rec},
                         "out": str(tmp_path / "dist" / f"sign_patch_{rec}_{dn}")})
        jobs.append({"id": f"consensus_ties_sign_{dn}", "base": cbp, "models": cmp_, "method": "consensus_ties",
                     "kw": {"ties_density": 0.95, "min_count": 1}, "out": str(tmp_path / "dist" / f"cs_{dn}")})
    # in memory: every rank gets the whole state dict
    jobs.append({"id": "in_memory", "base": jobs[0]["base"], "models": jobs[0]["models"], "method": "ties",
                 "kw": {"density": 0.25}, "out": None})
    (tmp_path / "dist").mkdir()
    res = run_ranks(_run_jobs, 2, jobs, timeout=150)
    (tmp_path / "one").mkdir()
    straddled = 0
    for i, job in enumerate(jobs):
        name = Path(job["out"]).name if job["out"] else None
        one = _single(job, monkeypatch, None if name is None else tmp_path / "one" / name)
        r0, r1 = res[0][i], res[1][i]
        assert (r0["rank"], r1["rank"], r0["world"]) == (0, 1, 2)
        assert r0["zero_sign"] == r1["zero_sign"] == one.zero_sign, job["id"]
        # the same passes: the bracket pins the same thresholds from the summed counts and gathered candidates
        # (with one rank's counts it would fall back to the radix passes: exact, but two passes more)
        assert r0["passes"] == r1["passes"] == one.passes, job["id"]
        if job["id"].startswith("ties_cap"):
            # one process drops tasks from the bracket one by one as its candidates fill the cap; the ranks
            # see only the gathered total, and then all tasks take the radix passes: more fallbacks, the same
            # passes and the same bits
            assert r0["fallbacks"] == r1["fallbacks"] >= one.bracket_fallbacks, job["id"]
        else:
            assert r0["fallbacks"] == one.bracket_fallbacks, job["id"]
        if name is None:
            for r in (r0, r1):
                assert list(r["state_dict"]) == list(one.state_dict)
                for k, v in one.state_dict.items():
                    assert torch.equal(r["state_dict"][k], v), k
            continue
        _assert_same_files(Path(job["out"]), tmp_path / "one" / name)
        plans = r0["plans"]
        assert plans == r1["plans"] and all(p["merged_tensors"] > 0 for p in plans), job["id"]
        if job["id"].startswith("sign_patch"):
            assert one.zero_sign == -1 and (r0["patched"] + (r0["remerged"] > 0)) > 0
            straddled += 1
    assert straddled == 4
    assert _leftovers(tmp_path / "dist") == []


def test_three_ranks_one_without_tensors(tmp_path, gen, monkeypatch):
    base = {"a": torch.randn(300, generator=gen), "b": torch.randn(20, 10, generator=gen)}
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in base.items()} for _ in range(3)]
    bp, mp = _save(tmp_path, "m", base, fts)
    jobs = [{"id": m, "base": bp, "models": mp, "method": m, "kw": kw, "out": str(tmp_path / f"d_{m}")}
            for m, kw in (("ties", {"density": 0.2}), ("dare_ties", {"p": 0.3, "density": 0.5}),
                          ("consensus_ties", {"ties_density": 0.4, "min_count": 1}))]
    res = run_ranks(_run_jobs, 3, jobs, timeout=90)
    for i, job in enumerate(jobs):
        _single(job, monkeypatch, tmp_path / f"s_{job['id']}")
        _assert_same_files(Path(job["out"]), tmp_path / f"s_{job['id']}")
        assert [p["tensors"] for p in res[0][i]["plans"]] == [1, 1, 0]
        assert res[2][i]["plans"][2]["read_bytes"] == 0


# ------------------------------------------------------------------------------------------------
# failures
# ------------------------------------------------------------------------------------------------
def _failing_merge(bp, mp, out, victim, how):
    """Every rank merges; on ``victim`` the merge kernel raises (or the process is killed) on its 2nd group."""
    import calm_fast.distributed as D

    calls = [0]
    real = ops.ties_merge

    def planted(*a, **k):
        calls[0] += 1
        if calls[0] == 2:
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("planted failure in the merge kernel")
        return real(*a, **k)

    if D.rank() == victim:
        ops.ties_merge = planted
    try:
        merge_checkpoints(bp, mp, "ties", output=out, density=0.3, memory_budget="3KiB", distributed=True)
    except DistributedError as e:
        return f"DistributedError: {e}"
    finally:
        ops.ties_merge = real
    return "finished"


@pytest.mark.parametrize("victim,how", [(1, "raise"), (1, "kill"), (0, "kill")])
def test_a_failed_rank_aborts_every_rank_and_leaves_no_output(tmp_path, gen, victim, how):
    base, fts = _models(gen, torch.float32)
    bp, mp = _save(tmp_path, "m", base, fts)
    out = tmp_path / "out" / "merged"
    (tmp_path / "out").mkdir()
    with pytest.raises(RanksFailed) as info:
        run_ranks(_failing_merge, 2, bp, mp, str(out), victim, how, timeout=60)
    outcomes = info.value.outcomes
    survivor = 1 - victim
    kind, value = outcomes[survivor]
    if kind == "ok" and isinstance(value, bytes):  # the harness passes return values as torch.save bytes
        value = torch.load(io.BytesIO(value))
    assert kind == "ok" and value.startswith("DistributedError"), outcomes  # not a harness timeout
    if how == "raise":
        assert "planted failure" in value  # the cause, from the failed rank's flag
        assert outcomes[victim][0] == "error" and "planted failure" in outcomes[victim][1]
    else:
        assert outcomes[victim][0] != "ok"
    assert not out.exists()
    assert [n for n in _leftovers(tmp_path / "out") if "lock" not in n] == []  # staging removed


def _failing_rank_stays_alive(bp, mp, out, flag):
    """Rank 1's kernel fails late (rank 0 is by then waiting in a collective) and rank 1 does not exit: it
    waits for rank 0 to report its error in ``flag``.  Rank 0 must not wait for rank 1's process to end."""
    import time

    import calm_fast.distributed as D

    me = D.rank()
    real = ops.ties_merge
    calls = [0]

    def planted(*a, **k):
        calls[0] += 1
        if calls[0] == 2:
            time.sleep(2)
            raise RuntimeError("planted late failure")
        return real(*a, **k)

    if me == 1:
        ops.ties_merge = planted
    try:
        merge_checkpoints(bp, mp, "ties", output=out, density=0.3, memory_budget="3KiB", distributed=True)
    except DistributedError as e:
        Path(flag).write_text(str(e))
        return "rank 0 error"
    except RuntimeError:
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and not Path(flag).exists():
            time.sleep(0.1)
        return "saw rank 0's error while alive" if Path(flag).exists() else "rank 0 did not stop"
    finally:
        ops.ties_merge = real
    return "finished"


def test_a_failed_rank_that_stays_alive_releases_the_others(tmp_path, gen):
    base, fts = _models(gen, torch.float32)
    bp, mp = _save(tmp_path, "m", base, fts)
    res = run_ranks(_failing_rank_stays_alive, 2, bp, mp, str(tmp_path / "out"), str(tmp_path / "flag"), timeout=90)
    assert res == ["rank 0 error", "saw rank 0's error while alive"]
    assert "planted late failure" in (tmp_path / "flag").read_text()
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------
def _cli(args, env_extra=None, launcher=None):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                                                            "LOCAL_RANK")}
    env.update({"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CALM_FAST_DIST_TIMEOUT": "60"}, **(env_extra or {}))
    cmd = (launcher or [sys.executable]) + ["-m", "calm_fast.cli", "merge"] + args
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_cli_under_torchrun_matches_one_process(tmp_path, gen):
    from dist_harness import free_port

    base, fts = _models(gen, torch.bfloat16)
    bp, mp = _save(tmp_path, "m", base, fts)
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--nproc-per-node", "2", "--master-addr",
                "127.0.0.1", "--master-port", str(free_port())]
    common = ["--base", bp, "--model", mp[0], "--model", mp[1], "--model", mp[2], "--method", "ties", "--density",
              "0.3", "--memory-budget", "8KiB", "--shard-size", "4000", "--no-progress"]
    r = _cli(common + ["-o", str(tmp_path / "dist"), "--json", str(tmp_path / "d.json")], launcher=torchrun)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("wrote:") == 1 and "2 ranks" in r.stdout  # rank 0 reports, once
    rep = json.loads((tmp_path / "d.json").read_text())
    assert len(rep["ranks"]) == 2
    one = _cli(common + ["-o", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-3000:]
    _assert_same_files(tmp_path / "dist", tmp_path / "one")
    # the per-rank plan
    dry = _cli(common + ["-o", str(tmp_path / "dry"), "--dry-run"], launcher=torchrun[:-1] + [str(free_port())])
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert dry.stdout.count("rank 0:") == 1 and "rank 1:" in dry.stdout and "memory estimate" in dry.stdout
    assert not (tmp_path / "dry").exists()
    # --distributed without torchrun: a usage error
    bad = _cli(common + ["-o", str(tmp_path / "x"), "--distributed"])
    assert bad.returncode == 2 and "torchrun" in bad.stderr and not (tmp_path / "x").exists()


def _cli_on_ranks(mergekit_cfg, bp, mp, out):
    """calm_fast.cli.main on every rank of the harness (a torchrun-like environment)."""
    from calm_fast import cli

    refused = cli.main(["merge", "-c", mergekit_cfg, "-o", out, "--no-progress"])
    failed = cli.main(["merge", "--base", bp, "--model", mp[0], "--model", mp[1], "--method", "ties", "--density", "0.4",
                       "-o", out, "--no-progress", "--memory-budget", "4KiB"])
    return refused, failed


def test_cli_exit_codes_on_ranks(tmp_path, gen):
    """A mergekit-format config is refused on several ranks (exit 2); inf in one model's tensor: the rank that
    merges it exits 5 (NonFiniteError), the other 7 (DistributedError); no output either way."""
    base = {"a": torch.randn(64, 8, generator=gen), "b": torch.randn(200, generator=gen)}
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in base.items()} for _ in range(2)]
    fts[1]["b"][7] = float("inf")
    bp, mp = _save(tmp_path, "m", base, fts)
    cfg = tmp_path / "mk.yaml"
    cfg.write_text(f"merge_method: ties\nbase_model: {bp}\nmodels:\n  - model: {mp[0]}\n    parameters: "
                   f"{{density: 0.5, weight: 1.0}}\n  - model: {mp[1]}\n    parameters: {{density: 0.5, weight: 1.0}}\n")
    res = run_ranks(_cli_on_ranks, 2, str(cfg), bp, mp, str(tmp_path / "out"), timeout=90)
    assert [r[0] for r in res] == [2, 2]
    assert sorted(r[1] for r in res) == [5, 7]
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def _mismatched_merge(bp, mp, out, what):
    """Ranks called with different arguments: rank 1 gets another density, or another output folder."""
    import calm_fast.distributed as D

    kw = {"density": 0.3}
    if D.rank() == 1:
        if what == "density":
            kw["density"] = 0.4
        else:
            out = out + "_elsewhere"
    try:
        merge_checkpoints(bp, mp, "ties", output=out, distributed=True, **kw)
    except DistributedError as e:
        return f"DistributedError: {e}"
    return "finished"


@pytest.mark.parametrize("what", ["density", "output"])
def test_ranks_called_with_different_merges_are_an_error_on_every_rank(tmp_path, gen, what):
    base, fts = _models(gen, torch.float32)
    bp, mp = _save(tmp_path, "m", base, fts)
    (tmp_path / "out").mkdir()
    res = run_ranks(_mismatched_merge, 2, bp, mp, str(tmp_path / "out" / "merged"), what, timeout=60)
    assert all(r.startswith("DistributedError") and "different merges" in r for r in res), res
    assert os.listdir(tmp_path / "out") == []  # nothing read into an output, nothing staged, no lock
