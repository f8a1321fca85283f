"""Second, independent tests of behaviours that one test each used to guard: corrupt ``data_offsets`` in
a safetensors header, the bracket select's fallback to the radix passes (in-memory selection), and the
TIES zero-sign rule (an elected sign that is exactly 0).  Expected values are built by hand here."""
import json
import struct

import pytest
import torch

from calm_fast import cli, methods, selection
from calm_fast.io import CheckpointError
from calm_fast.io.formats import open_checkpoint
from calm_fast.io import save_state_dict
from calm_fast.streaming import merge_checkpoints


# ------------------------------------------------------------------------------------------------
# corrupt data_offsets (a header written by hand)
# ------------------------------------------------------------------------------------------------
def _write_safetensors(path, entries, data: bytes):
    """A safetensors file from explicit header entries {name: (dtype, shape, offsets)} and data bytes."""
    header = {name: {"dtype": d, "shape": s, "data_offsets": o} for name, (d, s, o) in entries.items()}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


DATA = torch.arange(8, dtype=torch.float32).numpy().tobytes()  # 32 bytes: a = 0..3, b = 4..7
GOOD = {"a": ("F32", [4], [0, 16]), "b": ("F32", [4], [16, 32])}
CORRUPT = {
    "past_the_end": ({"b": ("F32", [4], [24, 40])}, r"'b'.*(ends at byte|truncated)"),
    "size_differs_from_shape": ({"a": ("F32", [4], [0, 12])}, r"'a'.*12 bytes"),
    "reversed": ({"b": ("F32", [4], [32, 16])}, r"'b'.*offsets"),
    "negative": ({"a": ("F32", [4], [-16, 0])}, r"'a'"),
    "overlapping": ({"b": ("F32", [4], [8, 24])}, r"overlap"),
    "one_number": ({"a": ("F32", [4], [16])}, r"'a'"),
    "not_numbers": ({"a": ("F32", [4], ["0", "x"])}, r"'a'"),
    "shape_larger_than_data": ({"b": ("F32", [2, 4], [16, 48])}, r"'b'"),
}


def test_well_formed_hand_written_file_reads(tmp_path):
    _write_safetensors(tmp_path / "ok.safetensors", GOOD, DATA)
    ck = open_checkpoint(tmp_path / "ok.safetensors")
    assert ck.read("b", 0, 4).tolist() == [4.0, 5.0, 6.0, 7.0]


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_data_offsets_rejected(tmp_path, case):
    change, match = CORRUPT[case]
    _write_safetensors(tmp_path / "bad.safetensors", {**GOOD, **change}, DATA)
    with pytest.raises(CheckpointError, match=match):
        open_checkpoint(tmp_path / "bad.safetensors")


def test_corrupt_data_offsets_cli_exit_code(tmp_path, capsys):
    base = {"a": torch.zeros(4), "b": torch.zeros(4)}
    save_state_dict(base, tmp_path / "base")
    _write_safetensors(tmp_path / "ft.safetensors", {**GOOD, "b": ("F32", [4], [8, 24])}, DATA)
    rc = cli.main(["merge", "--base", str(tmp_path / "base"), "--model", str(tmp_path / "ft.safetensors"),
                   "-m", "ta", "-o", str(tmp_path / "o"), "-q"])
    err = capsys.readouterr().err
    assert rc == cli.EXIT_INPUT and "ft.safetensors" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------
# in-memory bracket select: the radix fallback
# ------------------------------------------------------------------------------------------------
def test_resolve_bracket_boundaries():
    """counts = (below, at lo, inside, at hi) = (3, 2, 4, 1): ranks 4-5 are lo, 6-9 inside, 10 is hi."""
    counts = torch.tensor([[3, 2, 4, 1]])
    lo, hi = torch.tensor([1.0]), torch.tensor([9.0])
    pool = torch.tensor([5.0, 2.0, 8.0, 3.0])
    cases = {3: None, 4: 1.0, 5: 1.0, 6: 2.0, 7: 3.0, 8: 5.0, 9: 8.0, 10: 9.0, 11: None}
    for k, want in cases.items():
        result = torch.full((1,), -1.0)
        still = selection.resolve_bracket(counts, [pool], [k], torch.tensor([True]), lo, hi, result)
        assert bool(still[0]) == (want is None), k
        if want is not None:
            assert float(result[0]) == want, k
    # an incomplete pool (some candidates were not kept) never answers an inside rank
    for pool_seen in (None, pool[:3]):
        result = torch.full((1,), -1.0)
        still = selection.resolve_bracket(counts, [pool_seen], [7], torch.tensor([True]), lo, hi, result)
        assert bool(still[0]) and float(result[0]) == -1.0


@pytest.mark.parametrize("defeat", ["bracket_too_wide", "sample_misleading"])
def test_kth_smallest_abs_falls_back_exactly(gen, monkeypatch, defeat):
    T, n = 2, 20_000
    xs = [torch.randn(n // 2, generator=gen), torch.randn(n // 2, generator=gen).to(torch.bfloat16)]
    xs = [x * (t + 1) for t in range(T) for x in xs]  # task-major, two dtype groups
    groups = [[0], [1]]
    calls = {"radix": 0}
    real_finder = selection.ThresholdFinder

    class CountingFinder(real_finder):
        def __init__(self, *a, **k):
            calls["radix"] += 1
            super().__init__(*a, **k)

    monkeypatch.setattr(selection, "ThresholdFinder", CountingFinder)
    if defeat == "bracket_too_wide":
        # [0, inf] holds every nonzero |x|: more candidates than the buffer (4096 + 0): incomplete pools
        monkeypatch.setattr(selection, "bracket_bounds",
                            lambda samples, ks, n, todo: (torch.zeros(T), torch.full((T,), float("inf")), 0.0))
    else:
        # a sample claiming every |x| is about 100: the k-th value lies below the bracket
        monkeypatch.setattr(selection, "_strided_sample", lambda *a, **k: [torch.full((64,), 100.0)] * T)
    for k in (1, n // 2 - 7):  # with n + 1 - k for the other task: both ends and the middle
        got = selection.kth_smallest_abs(xs, None, T, [k, n + 1 - k], groups=groups)
        for t, kk in enumerate([k, n + 1 - k]):
            flat = torch.cat([xs[t * 2].float().abs(), xs[t * 2 + 1].float().abs()])
            want = torch.kthvalue(flat, kk).values
            assert got[t].view(torch.int32) == want.view(torch.int32), (defeat, k, t)
    assert calls["radix"] == 2


# ------------------------------------------------------------------------------------------------
# the TIES zero-sign rule
# ------------------------------------------------------------------------------------------------
# Two tasks over θ0 = 0.  Elected signs: a = [0, -, -, -, (no votes), 0], b = [-, 0, (no votes)]; the sum of
# all elected signs is -4, so in global mode the exact cancellations (a[0], a[5], b[1]) take the sign -1,
# in per-tensor mode +1.  Merged values by hand (λ = 1, density 1):
TAU = [{"a": [1.5, -2.0, -2.0, -2.0, 0.0, 0.25], "b": [-3.0, 4.0, 0.0]},
       {"a": [-1.5, -1.0, -1.0, -1.0, 0.0, -0.25], "b": [-3.0, -4.0, 0.0]}]
HAND = {
    ("global", "sum"): {"a": [-1.5, -3.0, -3.0, -3.0, 0.0, -0.25], "b": [-6.0, -4.0, 0.0]},
    ("global", "mean"): {"a": [-1.5, -1.5, -1.5, -1.5, 0.0, -0.25], "b": [-3.0, -4.0, 0.0]},
    ("global", "max"): {"a": [-1.5, -2.0, -2.0, -2.0, 0.0, -0.25], "b": [-3.0, -4.0, 0.0]},
    ("per_tensor", "sum"): {"a": [1.5, -3.0, -3.0, -3.0, 0.0, 0.25], "b": [-6.0, 4.0, 0.0]},
    ("per_tensor", "mean"): {"a": [1.5, -1.5, -1.5, -1.5, 0.0, 0.25], "b": [-3.0, 4.0, 0.0]},
    ("per_tensor", "max"): {"a": [1.5, -2.0, -2.0, -2.0, 0.0, 0.25], "b": [-3.0, 4.0, 0.0]},
}


@pytest.mark.parametrize("negate", [False, True], ids=["minus_majority", "plus_majority"])
@pytest.mark.parametrize("key", sorted(HAND), ids=lambda k: f"{k[0]}-{k[1]}")
def test_zero_sign_rule_by_hand(key, negate):
    mode, merge = key
    s = -1.0 if negate else 1.0
    pre = {"a": torch.zeros(6), "b": torch.zeros(3)}
    fts = [{k: s * torch.tensor(v) for k, v in tau.items()} for tau in TAU]
    want = {k: s * torch.tensor(v) for k, v in HAND[key].items()}
    if negate and mode == "per_tensor":  # the majority no longer matters: cancellations still take +1
        for k, i in (("a", 0), ("a", 5), ("b", 1)):
            want[k][i] = -want[k][i]
    got = methods.ties_merging(pre, fts, density=1.0, merge=merge, scaling=1.0, mode=mode)
    streamed = merge_checkpoints(pre, fts, "ties", density=1.0, merge=merge, scaling=1.0, mode=mode,
                                 memory_budget="1KiB").state_dict
    for k in pre:
        assert got[k].tolist() == want[k].tolist(), (k, "in memory")
        assert streamed[k].tolist() == want[k].tolist(), (k, "streamed")
