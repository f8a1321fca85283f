"""DARE's random stream pinned to constants, and checked against oracles that share no code with it.

The other DARE tests compare the kernels with ``calm_fast.reference``, which uses the same keys and the
same Philox stream by construction: a bug in the key derivation (every task getting the same mask, every
tensor getting tensor 0's mask) would pass them.  Here:

* the Philox-4x32-10 of this file is written from the published algorithm (Salmon et al., SC'11: the
  multipliers 0xD2511F53 / 0xCD9E8D57 and the Weyl key increments 0x9E3779B9 / 0xBB67AE85) and checked
  against the Random123 known-answer vectors;
* key values, uniforms and whole drop masks are pinned as constants (computed once and reviewed: a change
  means every DARE merge made so far would no longer reproduce);
* ``dare_merging`` (TA and TIES, global and per-tensor) is compared bit for bit with an oracle built
  from this file's own key derivation and Philox only.
"""
import hashlib
import math
import struct

import pytest
import torch

from calm_fast import methods, ops, reference
from calm_fast.streaming import merge_checkpoints
from conftest import assert_same

M32 = 0xFFFFFFFF


# ------------------------------------------------------------------------------------------------
# an independent Philox-4x32-10 and key derivation (plain Python integers)
# ------------------------------------------------------------------------------------------------
def philox4x32_10(ctr, key):
    """Philox-4x32-10 of a 4-word counter under a 2-word key (Python ints, exact 64-bit products)."""
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & M32, (p0 >> 32) ^ c3 ^ k1, p0 & M32
        k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
    return c0, c1, c2, c3


def uniform(key: int, i: int) -> float:
    """calm_fast's DARE uniform of element i: word (i mod 4) of Philox at counter (i div 4 as two 32-bit
    words, 0, 0) under the 64-bit key split low/high, top 24 bits over 2^24."""
    key &= (1 << 64) - 1
    c = i >> 2
    w = philox4x32_10((c & M32, c >> 32, 0, 0), (key & M32, key >> 32))[i & 3]
    return (w >> 8) / 16777216.0


def key_of(seed: int, task: int, name: str) -> int:
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{seed}/{task}/{name}".encode("utf-8"))
    return int.from_bytes(h.digest(), "little", signed=True)


def keep_mask(key: int, n: int, p: float) -> torch.Tensor:
    return torch.tensor([uniform(key, i) >= p for i in range(n)], dtype=torch.bool)


# ------------------------------------------------------------------------------------------------
# constants
# ------------------------------------------------------------------------------------------------
# Random123 kat_vectors, philox4x32 10 rounds: (counter, key) -> output
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M32, M32, M32, M32), (M32, M32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]
# (seed, task, tensor name) -> key (ops.dare_keys)
KEYS = {
    (0, 0, "w"): 0x50E9155BA0A04076,
    (0, 1, "w"): 0xF73D9BDC837E82D8 - (1 << 64),
    (0, 0, "v"): 0x2757D476AF9A6CB8,
    (0, 1, "v"): 0xFD7B82DFE1FD89E3 - (1 << 64),
    (1, 0, "w"): 0x1E63E4F909DC1BBF,
    (42, 3, "model.layers.7.mlp.down_proj.weight"): 0xCED2521D2ABB26E7 - (1 << 64),
    (-5, 2, "t\u00eate.bias"): 0xC1B914918C2DDA73 - (1 << 64),
}
# element index -> raw Philox word under key (0, 0, "w")
WORDS_W = {0: 0x92C4F4F7, 1: 0xE8662108, 2: 0xC60F4BA7, 3: 0x84E141A1, 4: 0x728810BC, 12345: 0x40E59815,
           (1 << 34) + 2: 0x3BD6DE71}
# kept elements (bit i = element i) of a 64-element tensor at p = 0.5, seed 0, names ["v", "w"] (sorted)
MASKS_64 = {(0, "w"): 0x35419841049C804F, (0, "v"): 0x662A85857CAB3588,
            (1, "w"): 0x724B5349CF4E85D3, (1, "v"): 0x19A521695D4D6E20}


def test_philox_matches_published_vectors():
    for ctr, key, want in PHILOX_KAT:
        assert philox4x32_10(ctr, key) == want


@pytest.mark.parametrize("case", sorted(KEYS, key=str), ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}")
def test_dare_keys_pinned(case):
    seed, task, name = case
    assert key_of(seed, task, name) == KEYS[case]  # this file's derivation
    assert int(ops.dare_keys(seed, [name], task + 1)[task, 0]) == KEYS[case]
    assert reference.dare_key(seed, task, name) == KEYS[case]


def test_dare_key_table_layout():
    names = ["b", "a", "model.x"]
    K = ops.dare_keys(3, names, 4)
    assert K.shape == (4, 3) and K.dtype == torch.int64
    want = torch.tensor([[key_of(3, t, n) for n in names] for t in range(4)])
    assert torch.equal(K, want)
    assert torch.equal(reference.dare_key_table(3, names, 4), want)
    assert len(set(K.reshape(-1).tolist())) == 12  # every (task, tensor) its own stream


def test_philox_uniform_pinned():
    key = KEYS[(0, 0, "w")]
    idx = sorted(WORDS_W)
    for i in idx:
        assert uniform(key, i) == (WORDS_W[i] >> 8) / 2**24
    got = reference.philox_uniform(torch.tensor(idx, dtype=torch.int64), key)
    assert got.tolist() == [(WORDS_W[i] >> 8) / 2**24 for i in idx]


def _kernel_mask(key: int, n: int, p: float) -> torch.Tensor:
    """The native op's keep mask: DARE (no rescale) on a tensor of ones."""
    out, _ = ops.weighted_merge([torch.ones(n)], None, 1, dare_p=p, dare_keys=torch.tensor([[key]]),
                                dare_rescale=False)
    assert set(out[0].unique().tolist()) <= {0.0, 1.0}
    return out[0] == 1


def _bits(mask: torch.Tensor) -> int:
    return sum(1 << i for i in mask.nonzero().reshape(-1).tolist())


def test_kernel_masks_pinned_and_distinct():
    for (t, name), bits in MASKS_64.items():
        key = KEYS[(0, t, name)]
        assert _bits(keep_mask(key, 64, 0.5)) == bits
        assert _bits(_kernel_mask(key, 64, 0.5)) == bits
    assert len(set(MASKS_64.values())) == 4


@pytest.mark.parametrize("p", [0.1, 0.37, 0.9])
def test_kernel_mask_matches_independent_philox(p):
    """Past the first counter block and at thresholds other than 1/2 (2,000 elements, 500 counters)."""
    key = KEYS[(42, 3, "model.layers.7.mlp.down_proj.weight")]
    assert torch.equal(_kernel_mask(key, 2000, p), keep_mask(key, 2000, p))


def test_tasks_and_tensors_get_different_masks():
    """Identical task vectors in every task and tensor: the masks must still differ between tasks (else the
    merge of two equal ones-vectors would only hold 0 and 2) and between tensors."""
    n = 256
    pre = {"a": torch.zeros(n), "b": torch.zeros(n)}
    fts = [{"a": torch.ones(n), "b": torch.ones(n)} for _ in range(2)]
    out = methods.dare_merging(pre, fts, p=0.5, scaling=1.0, rescale=False)
    for k in ("a", "b"):
        assert (out[k] == 1).sum() > n // 8, k  # kept by exactly one task
        want = keep_mask(key_of(0, 0, k), n, 0.5).float() + keep_mask(key_of(0, 1, k), n, 0.5).float()
        assert torch.equal(out[k], want), k
    assert not torch.equal(out["a"], out["b"])


# ------------------------------------------------------------------------------------------------
# dare_merging against an oracle without the implementation's helpers
# ------------------------------------------------------------------------------------------------
def _models(gen, T=3, shapes=None, dtype=torch.float32):
    shapes = shapes or {"enc.0.w": (9, 13), "enc.1.w": (130,), "dec.b": (7, 5)}
    pre = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    fts = [{k: (v + 0.5 * torch.randn(v.shape, generator=gen)).to(dtype) for k, v in pre.items()} for _ in range(T)]
    return {k: v.to(dtype) for k, v in pre.items()}, fts


def _dropped(pre, fts, p, seed, rescale):
    """fp32 dropped (and rescaled) task vectors, taus[t][key], keys from this file's derivation."""
    factor = torch.tensor((1.0 / (1.0 - p) if p < 1 else 0.0) if rescale else 1.0, dtype=torch.float32)
    taus = []
    for t, ft in enumerate(fts):
        row = {}
        for k in sorted(pre):
            x = (ft[k].float() - pre[k].float()).reshape(-1)
            keep = keep_mask(key_of(seed, t, k), x.numel(), p)
            row[k] = torch.where(keep, x * factor, torch.zeros_like(x))
        taus.append(row)
    return taus


def _ties_oracle(pre, taus, density, scaling, mode):
    """TIES (sum) on the dropped vectors: P1 trim (global) or exact-k trim (per tensor), sign of the sum (0 -> +1 per tensor, -> the global
    majority in global mode), disjoint sum, theta0 + lambda * tau_m; fp32, tasks summed in order."""
    keys = sorted(pre)
    T = len(taus)

    def threshold(v):
        n = v.numel()
        if mode == "per_tensor":  # PEFT/mergekit: exactly floor(d*n) kept -> the floor(d*n)-th largest
            kept = math.floor(density * n)
            return torch.kthvalue(v.abs(), n - kept + 1).values if kept > 0 else torch.tensor(float("inf"))
        k = n - math.floor(density * n)
        return torch.kthvalue(v.abs(), k).values if k > 0 else torch.tensor(0.0)

    if mode == "global":
        flat = [torch.cat([taus[t][k] for k in keys]) for t in range(T)]
        thr = [{k: threshold(flat[t]) for k in keys} for t in range(T)]
    else:
        thr = [{k: threshold(taus[t][k]) for k in keys} for t in range(T)]
    trimmed = [{k: torch.where(taus[t][k].abs() >= thr[t][k], taus[t][k], torch.zeros(())) for k in keys}
               for t in range(T)]
    gammas, total = {}, 0
    for k in keys:
        s = trimmed[0][k]
        for t in range(1, T):
            s = s + trimmed[t][k]
        gammas[k] = torch.sign(s)
        total += int(gammas[k].sum())
    mu = (1 if total >= 0 else -1) if mode == "global" else 1
    out = {}
    for k in keys:
        g = torch.where(gammas[k] == 0, torch.tensor(float(mu)), gammas[k])
        r = torch.zeros_like(g)
        for t in range(T):
            v = trimmed[t][k]
            r = r + torch.where((g > 0) & (v > 0) | (g < 0) & (v < 0), v, torch.zeros(()))
        out[k] = (pre[k].float().reshape(-1) + scaling * r).reshape(pre[k].shape).to(pre[k].dtype)
    return out


@pytest.mark.parametrize("mode", ["per_tensor", "global"])
@pytest.mark.parametrize("p", [0.5, 0.3])
def test_dare_ties_matches_independent_oracle(gen, mode, p):
    pre, fts = _models(gen)
    want = _ties_oracle(pre, _dropped(pre, fts, p, 11, True), 0.3, 0.7, mode)
    got = methods.dare_merging(pre, fts, p=p, scaling=0.7, seed=11, combine="ties", density=0.3, mode=mode)
    for k in pre:
        assert_same(got[k], want[k], f"in memory {mode} {k}")
    if mode == "per_tensor":  # the streaming engine (its own key slicing: all tensors in one group)
        r = merge_checkpoints(pre, fts, "dare_ties", p=p, scaling=0.7, seed=11, density=0.3, mode=mode)
        for k in pre:
            assert_same(r.state_dict[k], want[k], f"streamed {mode} {k}")


@pytest.mark.parametrize("p,rescale", [(0.2, True), (0.75, True), (0.6, False)])
def test_dare_task_arithmetic_matches_independent_oracle(gen, p, rescale):
    pre, fts = _models(gen, T=2)
    taus = _dropped(pre, fts, p, 5, rescale)
    got = methods.dare_merging(pre, fts, p=p, scaling=0.4, seed=5, rescale=rescale)
    for k in pre:
        acc = taus[0][k] + taus[1][k]
        assert_same(got[k], (pre[k].reshape(-1) + 0.4 * acc).reshape(pre[k].shape), k)


@pytest.mark.parametrize("p", [0.1, 0.3, 0.8])
def test_dare_rescale_factor(p):
    """Survivors are tau * fp32(1 / (1 - p)) exactly (not 1/p, not 2), dropped ones 0: a constant task
    vector makes every survivor the same known number, and their count matches the pinned stream."""
    n = 1000
    pre = {"w": torch.zeros(n)}
    ft = {"w": torch.full((n,), 0.75)}
    out = methods.dare_merging(pre, [ft], p=p, scaling=1.0, seed=0)["w"]
    keep = keep_mask(key_of(0, 0, "w"), n, p)
    survivor = torch.tensor(0.75, dtype=torch.float32) * torch.tensor(1.0 / (1.0 - p), dtype=torch.float32)
    assert torch.equal(out[keep], survivor.expand(int(keep.sum())))
    assert torch.equal(out[~keep], torch.zeros(int((~keep).sum())))
    # the expectation is preserved (about n * 0.75 in total)
    assert abs(float(out.sum()) / (n * 0.75) - 1.0) < 0.15


# ------------------------------------------------------------------------------------------------
# bit-packed masks
# ------------------------------------------------------------------------------------------------
def test_mask_packing_pinned():
    m = torch.tensor([1, 0, 1, 1, 0, 0, 0, 0, 1, 1], dtype=torch.bool)  # bit i of byte i // 8
    for pack in (ops.pack_mask, reference.pack_bits):
        assert pack(m).tolist() == [0b00001101, 0b00000011]
    packed = torch.tensor([0x81, 0x02], dtype=torch.uint8)
    want = [True] + [False] * 6 + [True] + [False, True, False]
    for unpack in (ops.unpack_mask, reference.unpack_bits):
        assert unpack(packed, 11).tolist() == want


def test_mask_packing_round_trip(gen):
    for n in (1, 8, 13, 1000):
        m = torch.rand(n, generator=gen) < 0.3
        a, b = ops.pack_mask(m), reference.pack_bits(m)
        assert torch.equal(a, b) and a.dtype == torch.uint8
        assert torch.equal(ops.unpack_mask(a, n), m) and torch.equal(reference.unpack_bits(a, n), m)
