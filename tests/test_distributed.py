"""calm_fast.distributed: the shared torch.distributed plumbing, on real gloo ranks over loopback."""
import os

import pytest
import torch

from calm_fast import distributed as D
from dist_harness import RanksFailed, run_ranks


def test_one_process_answers_as_a_single_rank(monkeypatch):
    for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(v, raising=False)
    assert not D.launched_by_torchrun() and D.init_from_env() is False
    assert (D.rank(), D.world_size(), D.is_distributed()) == (0, 1, False)
    t = [torch.arange(3.0), torch.ones(2, 2)]
    D.all_reduce_flat_(t)
    assert torch.equal(t[0], torch.arange(3.0)) and torch.equal(t[1], torch.ones(2, 2))
    assert D.broadcast_object({"a": 1}) == {"a": 1} and D.all_gather_object(5) == [5]


def _reference_assignment(costs, n):
    # independent restatement: repeatedly hand the biggest remaining item to the least-loaded rank
    loads, owner = [0] * n, {}
    remaining = list(range(len(costs)))
    while remaining:
        big = max(remaining, key=lambda i: (costs[i], -i))
        remaining.remove(big)
        r = loads.index(min(loads))
        owner[big] = r
        loads[r] += costs[big]
    return [owner[i] for i in range(len(costs))]


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_assign_by_cost_is_deterministic_and_balanced(gen, n):
    costs = torch.randint(0, 1000, (25,), generator=gen).tolist()
    costs[3] = costs[4]  # ties are broken by index
    owner = D.assign_by_cost(costs, n)
    assert owner == _reference_assignment(costs, n) == D.assign_by_cost(list(costs), n)
    loads = [sum(c for c, o in zip(costs, owner) if o == r) for r in range(n)]
    assert max(loads) <= sum(costs) / n + max(costs)
    assert D.assign_by_cost([5, 1], 4) == [0, 1]  # more ranks than items: the rest get nothing
    with pytest.raises(ValueError):
        D.assign_by_cost([1], 0)


def test_timeout_env_is_checked(monkeypatch):
    monkeypatch.setenv("CALM_FAST_DIST_TIMEOUT", "abc")
    with pytest.raises(ValueError, match="CALM_FAST_DIST_TIMEOUT"):
        D.timeout_seconds()
    monkeypatch.setenv("CALM_FAST_DIST_TIMEOUT", "12.5")
    assert D.timeout_seconds() == 12.5


def _collectives(seed):
    r, n = D.rank(), D.world_size()
    g = torch.Generator().manual_seed(seed + r)
    mine = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g), torch.randint(-9, 9, (2,), generator=g).float()]
    before = [t.clone() for t in mine]
    D.all_reduce_flat_(mine)
    ints = torch.tensor([r + 1, 10 * r], dtype=torch.int64)
    D.all_reduce_sum_(ints)
    D.barrier()
    ragged = torch.randn(2 * r + 1, generator=g).to(torch.bfloat16)  # a different length on every rank
    return {"rank": r, "world": n, "before": before, "after": mine, "ints": ints,
            "bcast": D.broadcast_object(f"from {r}"), "gathered": D.all_gather_object(r * r),
            "ragged": ragged, "ragged_all": D.all_gather_tensor(ragged)}


@pytest.mark.parametrize("n", [2, 3])
def test_collectives_on_gloo_ranks(n):
    out = run_ranks(_collectives, n, 1234, timeout=90)
    assert [o["rank"] for o in out] == list(range(n)) and all(o["world"] == n for o in out)
    for i in range(3):
        want = sum(o["before"][i].double() for o in out)
        for o in out:
            torch.testing.assert_close(o["after"][i].double(), want, rtol=1e-6, atol=1e-6)
            assert torch.equal(o["after"][i], out[0]["after"][i])  # every rank holds the same bits
    assert all(o["ints"].tolist() == [n * (n + 1) // 2, 10 * n * (n - 1) // 2] for o in out)
    assert all(o["bcast"] == "from 0" and o["gathered"] == [r * r for r in range(n)] for o in out)
    for o in out:  # exact copies, in rank order, each with its own length
        assert len(o["ragged_all"]) == n
        for r in range(n):
            assert o["ragged_all"][r].dtype == torch.bfloat16 and torch.equal(o["ragged_all"][r], out[r]["ragged"])


def test_all_gather_tensor_in_one_process_and_shape_check():
    t = torch.arange(4.0)
    assert D.all_gather_tensor(t)[0] is t
    with pytest.raises(ValueError, match="1-D"):
        D.all_gather_tensor(torch.ones(2, 2))


def test_distributed_error_is_exit_7():
    from calm_fast.cli import EXIT_DISTRIBUTED, _exit_code

    assert EXIT_DISTRIBUTED == 7 and _exit_code(D.DistributedError("rank 1 failed")) == 7


def _one_rank_fails():
    if D.rank() == 1:
        raise RuntimeError("planted failure on rank 1")
    D.barrier()  # rank 0 waits for a peer that is gone: must end with an error, not hang
    return "unreachable"


def test_a_failing_rank_fails_the_run_not_hangs():
    with pytest.raises(RanksFailed) as info:
        run_ranks(_one_rank_fails, 2, timeout=60, env={"CALM_FAST_DIST_TIMEOUT": "20"})
    outcomes = info.value.outcomes
    assert outcomes[1][0] == "error" and "planted failure on rank 1" in outcomes[1][1]
    assert outcomes[0][0] != "ok"
