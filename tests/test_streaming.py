"""The streaming engine: bit-identical to the in-memory methods, bounded memory, mismatch policies,
crash safety, dry runs, mixed input formats."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open

import calm_fast
import calm_fast.streaming as S
from calm_fast.streaming.engine import _Engine
import calm_fast.streaming.params as SP
from calm_fast import methods, ops
from calm_fast.io import (CheckpointError, ConfigError, MismatchError, NonFiniteError, OutputError, load_state_dict,
                          save_state_dict)
from calm_fast.io.formats import SafetensorsFile
from calm_fast.streaming import build_plan, merge_checkpoints, weight_for


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def make_models(T=3, dtype=torch.float32, seed=0, layers=2, dim=16, vocab=40):
    g = torch.Generator().manual_seed(seed)
    base = {"embed.weight": torch.randn(vocab, dim, generator=g)}
    for i in range(layers):
        base[f"layers.{i}.w"] = torch.randn(dim, dim, generator=g)
        base[f"layers.{i}.b"] = torch.randn(dim, generator=g)
    base.update({"norm.weight": torch.ones(dim), "head.weight": torch.randn(10, dim, generator=g),
                 "position_ids": torch.arange(7)})
    fts = []
    for _ in range(T):
        ft = {k: (v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone())
              for k, v in base.items()}
        # a few exact zeros in the task vectors (ties at the threshold)
        ft["layers.0.b"][:3] = base["layers.0.b"][:3]
        fts.append(ft)
    cast = lambda sd: {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}
    return cast(base), [cast(f) for f in fts]


def save_models(tmp_path, base, fts, shard=None):
    save_state_dict(base, tmp_path / "base")
    paths = []
    for i, f in enumerate(fts):
        save_state_dict(f, tmp_path / f"ft{i}", max_shard_size=shard if i == 0 else None)
        paths.append(str(tmp_path / f"ft{i}"))
    return str(tmp_path / "base"), paths


def assert_same(got, want):
    assert set(got) == set(want), (sorted(set(got) ^ set(want)))
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert got[k].shape == want[k].shape, k
        g, w = got[k], want[k]
        if g.is_floating_point() and bool(torch.isnan(w).any()):
            assert torch.equal(torch.isnan(g), torch.isnan(w)), k
            g, w = g.nan_to_num(0.0), w.nan_to_num(0.0)
        assert torch.equal(g, w), f"{k}: max diff {(g.float() - w.float()).abs().max()}"


CASES = [
    ("task_arithmetic", methods.task_arithmetic, {"scaling": 0.4}),
    ("ties_merging", methods.ties_merging, {"density": 0.3, "merge": "mean"}),
    ("ties_merging", methods.ties_merging, {"density": 0.3, "merge": "max", "mode": "per_tensor"}),
    ("dare_merging", methods.dare_merging, {"p": 0.3, "seed": 3}),
    ("dare_merging", methods.dare_merging, {"p": 0.3, "seed": 3, "combine": "ties", "density": 0.5}),
    ("consensus_merging", methods.consensus_merging, {}),
    ("consensus_merging", methods.consensus_merging, {"mtl": "ties", "ties_merge": "mean", "min_count": 1}),
]
CASE_IDS = ["ta", "ties", "ties_per_tensor", "dare", "dare_ties", "consensus", "consensus_ties"]


# ------------------------------------------------------------------------------------------------
# bit-identical to the in-memory methods
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_equals_in_memory(tmp_path, case, dtype):
    name, fn, kw = case
    base, fts = make_models(dtype=dtype)
    bp, mp = save_models(tmp_path, base, fts, shard=1500)
    want = fn(base, fts, **kw)
    # whole tensors in one group; and a tiny budget that slices every large tensor into many pieces
    for budget, prefetch in (("1GiB", True), ("3KiB", False), ("5KiB", True)):
        r = merge_checkpoints(bp, mp, name, memory_budget=budget, prefetch=prefetch, **kw)
        assert_same(r.state_dict, want)
    if name != "dare_merging":  # (DARE tensors are never sliced: the generator is indexed inside the tensor)
        assert any(not p.whole for g in r.plan.groups for p in g)
    # and through the safetensors writer (sharded output)
    r = merge_checkpoints(bp, mp, name, output=tmp_path / "out", max_shard_size=2000, memory_budget="4KiB", **kw)
    assert_same(load_state_dict(tmp_path / "out"), want)
    assert r.passes == r.plan.num_passes and r.bracket_fallbacks == 0
    assert r.passes == (2 if SP._needs_global_threshold(r.plan.method, r.plan.params) else 1)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[6]], ids=["ta", "ties", "consensus_ties"])
def test_out_dtype_equals_in_memory(tmp_path, case, out_dtype):
    name, fn, kw = case
    for dtype in (torch.float32, torch.bfloat16):
        base, fts = make_models(dtype=dtype, seed=5)
        want = fn(base, fts, out_dtype=out_dtype, **kw)
        r = merge_checkpoints(base, fts, name, out_dtype=out_dtype, memory_budget="3KiB", **kw)
        assert_same(r.state_dict, want)
        assert r.state_dict["head.weight"].dtype == out_dtype


def test_in_memory_sources_and_modules():
    base, fts = make_models()
    want = methods.ties_merging(base, fts)
    assert_same(merge_checkpoints(base, fts, "ties").state_dict, want)
    mods = []
    for sd in [base] + fts:
        m = torch.nn.Module()
        for k, v in sd.items():
            m.register_buffer(k.replace(".", "_"), v.clone())
        mods.append(m)
    r = merge_checkpoints(mods[0], mods[1:], "ta", scaling=0.5)
    want = methods.task_arithmetic({k.replace(".", "_"): v for k, v in base.items()},
                                   [{k.replace(".", "_"): v for k, v in f.items()} for f in fts], scaling=0.5)
    assert_same(r.state_dict, want)


def test_weights_equal_in_memory(tmp_path):
    base, fts = make_models(T=3, layers=3)
    bp, mp = save_models(tmp_path, base, fts)
    for name, fn, kw in (CASES[0], CASES[1], CASES[4]):
        want = fn(base, fts, weights=[1.0, 0.5, -0.3], **kw)
        assert_same(merge_checkpoints(bp, mp, name, weights=[1.0, 0.5, -0.3], memory_budget="3KiB", **kw).state_dict,
                    want)
        mapping = {"layers.1.w": [2.0, 0.0, 1.0], "head.weight": [0.5, 0.5, 0.5]}
        want = fn(base, fts, weights=mapping, **kw)
        assert_same(merge_checkpoints(bp, mp, name, weights=mapping, **kw).state_dict, want)
    # mergekit-style per-model specs: gradient over layers, filters, numbers
    specs = [[0.0, 1.0], 1.0, [{"filter": "layers.1", "value": 2.0}, {"filter": "re:^head", "value": [1, 3]},
                              {"value": 0.5}]]
    keys = sorted(k for k, v in base.items() if v.is_floating_point())
    expected_map = {k: [weight_for(s, k, 3) for s in specs] for k in keys}
    assert expected_map["layers.1.w"] == [0.5, 1.0, 2.0]
    assert expected_map["layers.2.b"] == [1.0, 1.0, 0.5]
    assert expected_map["embed.weight"][0] == 0.0 and expected_map["head.weight"] == [1.0, 1.0, 3.0]
    want = methods.ties_merging(base, fts, weights=expected_map)
    assert_same(merge_checkpoints(bp, mp, "ties", weights=specs).state_dict, want)
    with pytest.raises(ConfigError, match="no weight entry"):
        merge_checkpoints(bp, mp, "ties", weights=[1.0, 1.0, [{"filter": "nothing", "value": 1.0}]])
    with pytest.raises(ConfigError, match="does not take"):
        merge_checkpoints(bp, mp, "consensus", weights=[1.0, 1.0, 1.0])


def _cancelling_models(dtype=torch.float32, n=3000):
    """Two task vectors that are mostly negative and cancel exactly at 300 positions per tensor:
    the global majority sign is -1, so every cancelled element must be patched after the merge pass."""
    g = torch.Generator().manual_seed(1)
    base = {"a": torch.zeros(n), "b": torch.zeros(64, 8)}
    t0 = {k: -torch.rand(v.shape, generator=g) - 0.1 for k, v in base.items()}
    t1 = {k: -torch.rand(v.shape, generator=g) - 0.1 for k, v in base.items()}
    for k in base:
        idx = torch.randperm(base[k].numel(), generator=g)[:300]
        x = torch.rand(300, generator=g) + 0.5
        t0[k].view(-1)[idx] = x
        t1[k].view(-1)[idx] = -x
    cast = lambda sd: {k: v.to(dtype) for k, v in sd.items()}
    return cast(base), [cast(t0), cast(t1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("recorded", [1 << 22, 100], ids=["patch", "overflow_remerge"])
def test_global_zero_sign_patch(tmp_path, monkeypatch, dtype, recorded):
    monkeypatch.setattr(SP, "MAX_RECORDED_POSITIONS", recorded)
    base, fts = _cancelling_models(dtype)
    bp, mp = save_models(tmp_path, base, fts)
    for name, fn, kw in [("ties_merging", methods.ties_merging, {"density": 1.0, "merge": "mean"}),
                         ("ties_merging", methods.ties_merging, {"density": 0.9, "merge": "max"}),
                         ("consensus_merging", methods.consensus_merging,
                          {"mtl": "ties", "ties_density": 0.95, "min_count": 1})]:
        want = fn(base, fts, **kw)
        for budget in ("1GiB", "8KiB"):
            r = merge_checkpoints(bp, mp, name, memory_budget=budget, output=tmp_path / "o", overwrite=True, **kw)
            assert r.zero_sign == -1
            assert (r.remerged > 0) if recorded == 100 else (r.patched > 0 and r.remerged == 0)
            assert_same(load_state_dict(tmp_path / "o"), want)


def test_per_model_density_extension():
    """TIES with one density per model (mergekit style): each task gets its own exact global threshold."""
    g = torch.Generator().manual_seed(3)
    base = {"x": torch.zeros(500), "y": torch.zeros(20, 10)}
    fts = [{k: torch.rand(v.shape, generator=g) + 0.01 for k, v in base.items()} for _ in range(3)]  # all positive
    dens = [0.1, 0.5, 1.0]
    r = merge_checkpoints(base, fts, "ties", density=dens, merge="sum", scaling=1.0)
    keys = sorted(base)
    flat = [torch.cat([f[k].reshape(-1) for k in keys]) for f in fts]
    N = flat[0].numel()
    acc = torch.zeros(N)
    for t, d in enumerate(dens):
        k = N - int(d * N)
        thr = torch.kthvalue(flat[t].abs(), k).values if k > 0 else 0.0
        acc = acc + flat[t] * (flat[t].abs() >= thr)
    got = torch.cat([r.state_dict[k].reshape(-1) for k in keys])
    assert torch.equal(got, acc)
    same = merge_checkpoints(base, fts, "ties", density=[0.3] * 3)
    assert_same(same.state_dict, methods.ties_merging(base, fts, density=0.3))
    with pytest.raises(ConfigError, match="one per model"):
        merge_checkpoints(base, fts, "ties", density=[0.3, 0.3])


def test_include_exclude_and_passthrough(tmp_path):
    base, fts = make_models(dtype=torch.bfloat16)
    bp, mp = save_models(tmp_path, base, fts)
    want = methods.ties_merging(base, fts, exclude=["embed", r"\.b$"], out_dtype=torch.float32)
    r = merge_checkpoints(bp, mp, "ties", exclude=["embed", r"\.b$"], out_dtype="float32", memory_budget="2KiB")
    assert_same(r.state_dict, want)
    assert r.state_dict["embed.weight"].dtype == torch.bfloat16  # copied from the base, unchanged
    assert torch.equal(r.state_dict["position_ids"], base["position_ids"])
    want = methods.task_arithmetic(base, fts, include=["layers"])
    assert_same(merge_checkpoints(bp, mp, "ta", include=["layers"]).state_dict, want)
    with pytest.raises(ConfigError, match="no tensor selected"):
        merge_checkpoints(bp, mp, "ta", include=["nothing-matches"])
    with pytest.raises(ConfigError, match="invalid include"):
        merge_checkpoints(bp, mp, "ta", include=["("])


def test_tied_tensors_deduplicated(tmp_path):
    base, fts = make_models(T=2)
    for sd in [base] + fts:
        sd["lm_head.weight"] = sd["embed.weight"]  # tied: one storage
    torch.save(base, tmp_path / "base.pt")
    for i, f in enumerate(fts):
        torch.save(f, tmp_path / f"ft{i}.pt")
    r = merge_checkpoints(str(tmp_path / "base.pt"), [str(tmp_path / f"ft{i}.pt") for i in range(2)], "ties",
                          output=tmp_path / "o")
    with safe_open(str(tmp_path / "o" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
        assert json.loads(f.metadata()["calm_fast.aliases"]) == {"lm_head.weight": "embed.weight"}
    dedup = lambda sd: {k: v for k, v in sd.items() if k != "lm_head.weight"}
    assert_same(load_state_dict(tmp_path / "o"), methods.ties_merging(dedup(base), [dedup(f) for f in fts]))
    # a model that ties what the base stores separately reads the tied tensor
    untied = dict(base)
    untied["lm_head.weight"] = base["embed.weight"].clone()
    r = merge_checkpoints(untied, fts, "ta")
    want = methods.task_arithmetic(untied, [{**f, "lm_head.weight": f["embed.weight"].clone()} for f in fts])
    assert_same(r.state_dict, want)


def test_mixed_formats_and_lora(tmp_path):
    base, fts = make_models(T=2)
    save_state_dict(base, tmp_path / "base")
    torch.save(fts[0], tmp_path / "ft0.bin")
    # a LoRA adapter on the embedding matrix (as a linear LoRA) and the head
    g = torch.Generator().manual_seed(9)
    A0, B0 = torch.randn(2, 16, generator=g), torch.randn(40, 2, generator=g)
    A1, B1 = torch.randn(2, 16, generator=g), torch.randn(10, 2, generator=g)
    (tmp_path / "lora").mkdir()
    from safetensors.torch import save_file

    save_file({"base_model.model.embed.lora_A.weight": A0, "base_model.model.embed.lora_B.weight": B0,
               "base_model.model.head.lora_A.weight": A1, "base_model.model.head.lora_B.weight": B1},
              str(tmp_path / "lora" / "adapter_model.safetensors"))
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    lora_ft = dict(base)
    lora_ft["embed.weight"] = base["embed.weight"] + (B0 @ A0) * 2.0
    lora_ft["head.weight"] = base["head.weight"] + (B1 @ A1) * 2.0
    models = [str(tmp_path / "ft0.bin"), fts[1], str(tmp_path / "lora")]
    for name, fn, kw in (CASES[0], CASES[1]):
        r = merge_checkpoints(str(tmp_path / "base"), models, name, memory_budget="3KiB", **kw)
        want = fn(base, [fts[0], fts[1], lora_ft], **kw)
        assert_same(r.state_dict, want)


# ------------------------------------------------------------------------------------------------
# mismatch policies
# ------------------------------------------------------------------------------------------------
def _mismatched(tmp_path):
    base, fts = make_models(T=3)
    g = torch.Generator().manual_seed(4)
    fts[1]["embed.weight"] = torch.cat([fts[1]["embed.weight"], torch.randn(2, 16, generator=g)])  # 42 rows
    del fts[2]["layers.1.b"]
    return base, fts


def test_mismatch_error_names_everything(tmp_path):
    base, fts = _mismatched(tmp_path)
    bp, mp = save_models(tmp_path, base, fts)
    with pytest.raises(MismatchError) as e:
        merge_checkpoints(bp, mp, "ties", output=tmp_path / "o")
    msg = str(e.value)
    assert "embed.weight" in msg and "(42, 16)" in msg and "(40, 16)" in msg
    assert "layers.1.b" in msg and "[2]" in msg
    assert "--on-mismatch" in msg
    assert not (tmp_path / "o").exists()  # failed before any heavy work or output


def test_mismatch_skip(tmp_path):
    base, fts = _mismatched(tmp_path)
    bp, mp = save_models(tmp_path, base, fts)
    r = merge_checkpoints(bp, mp, "ties", on_mismatch="skip", memory_budget="3KiB")
    assert any("embed.weight" in line and "zero delta" in line for line in r.report)
    assert any("layers.1.b" in line and "zero delta" in line for line in r.report)
    fixed = [dict(f) for f in fts]
    fixed[1]["embed.weight"] = base["embed.weight"]
    fixed[2]["layers.1.b"] = base["layers.1.b"]
    assert_same(r.state_dict, methods.ties_merging(base, fixed))
    # tensors only a model has: an error, or with skip left out of the output (and reported)
    fts[0]["extra.weight"] = torch.ones(3)
    bp, mp = save_models(tmp_path / "x", base, fts)
    with pytest.raises(MismatchError, match="extra.weight"):
        merge_checkpoints(bp, mp, "ta", on_mismatch="pad")
    r = merge_checkpoints(bp, mp, "ta", on_mismatch="skip")
    assert "extra.weight" not in r.state_dict and any("extra.weight" in line for line in r.report)


def test_mismatch_pad_and_truncate(tmp_path):
    base, fts = make_models(T=2)
    g = torch.Generator().manual_seed(4)
    fts[1]["embed.weight"] = torch.cat([fts[1]["embed.weight"], torch.randn(2, 16, generator=g)])
    bp, mp = save_models(tmp_path, base, fts)
    for name, fn, kw in (CASES[1], CASES[3]):
        r = merge_checkpoints(bp, mp, name, on_mismatch="pad", memory_budget="3KiB", **kw)
        assert r.state_dict["embed.weight"].shape == (42, 16)
        assert any("padded to (42, 16)" in line for line in r.report)
        padded_base = dict(base, **{"embed.weight": torch.cat([base["embed.weight"], torch.zeros(2, 16)])})
        f0 = dict(fts[0], **{"embed.weight": torch.cat([fts[0]["embed.weight"], torch.zeros(2, 16)])})
        assert_same(r.state_dict, fn(padded_base, [f0, fts[1]], **kw))
        r = merge_checkpoints(bp, mp, name, on_mismatch="truncate", **kw)
        assert r.state_dict["embed.weight"].shape == (40, 16)
        assert any("truncated to (40, 16)" in line for line in r.report)
        f1 = dict(fts[1], **{"embed.weight": fts[1]["embed.weight"][:40].contiguous()})
        assert_same(r.state_dict, fn(base, [fts[0], f1], **kw))
    fts[1]["embed.weight"] = torch.randn(40, 16, 1, generator=g)
    bp, mp = save_models(tmp_path / "nd", base, fts)
    with pytest.raises(MismatchError, match="dimensions"):
        merge_checkpoints(bp, mp, "ta", on_mismatch="pad")


# ------------------------------------------------------------------------------------------------
# non-finite values, configuration errors
# ------------------------------------------------------------------------------------------------
def test_nonfinite(tmp_path):
    base, fts = make_models(T=2)
    fts[1]["layers.0.w"][3, 4] = float("nan")
    bp, mp = save_models(tmp_path, base, fts)
    for name in ("ta", "ties", "consensus"):
        with pytest.raises(NonFiniteError, match=r"model 1 tensor 'layers.0.w'"):
            merge_checkpoints(bp, mp, name, output=tmp_path / "o")
        assert not (tmp_path / "o" / "model.safetensors").exists()
    r = merge_checkpoints(bp, mp, "ta", nonfinite="propagate")
    assert_same(r.state_dict, methods.task_arithmetic(base, fts, nonfinite="propagate"))


def test_config_errors(tmp_path):
    base, fts = make_models(T=2)
    with pytest.raises(ConfigError, match="unknown merge method"):
        merge_checkpoints(base, fts, "slerp")
    with pytest.raises(ConfigError, match="unknown parameter"):
        merge_checkpoints(base, fts, "ties", densty=0.2)
    with pytest.raises(ConfigError, match=r"\(0, 1\]"):
        merge_checkpoints(base, fts, "ties", density=1.5)
    with pytest.raises(ConfigError, match="implies"):
        merge_checkpoints(base, fts, "dare_ties", combine="task_arithmetic")
    with pytest.raises(ConfigError, match="on_mismatch"):
        merge_checkpoints(base, fts, "ta", on_mismatch="ignore")
    with pytest.raises(ConfigError, match="at least one"):
        merge_checkpoints(base, [], "ta")
    with pytest.raises(CheckpointError):
        merge_checkpoints(str(tmp_path / "missing"), fts, "ta")
    # aliases resolve to the in-memory functions' parameters
    assert S.resolve_method("dare_ties", {"lambda": 0.5})[1]["scaling"] == 0.5
    assert S.resolve_method("dare_ties", {})[1]["combine"] == "ties"


# ------------------------------------------------------------------------------------------------
# output: metadata, crash safety, dry run
# ------------------------------------------------------------------------------------------------
def test_output_metadata(tmp_path):
    base, fts = make_models(T=2)
    bp, mp = save_models(tmp_path, base, fts)
    r = merge_checkpoints(bp, mp, "dare", p=0.4, seed=17, output=tmp_path / "o", max_shard_size=1000,
                          out_dtype="bf16", metadata={"experiment": "x1"})
    assert (tmp_path / "o" / "model.safetensors.index.json").exists() and len(r.paths) > 2
    with safe_open(r.paths[0], "pt") as f:
        meta = f.metadata()
    assert meta["calm_fast.method"] == "dare_merging"
    assert json.loads(meta["calm_fast.params"])["p"] == 0.4
    assert meta["calm_fast.seed"] == "17"
    assert meta["torch.version"] == torch.__version__
    assert meta["calm_fast.version"] == calm_fast.__version__
    assert meta["calm_fast.out_dtype"] == "bfloat16" and meta["experiment"] == "x1"
    index = json.loads((tmp_path / "o" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["calm_fast.method"] == "dare_merging"
    assert_same(load_state_dict(tmp_path / "o"), methods.dare_merging(base, fts, p=0.4, seed=17,
                                                                      out_dtype=torch.bfloat16))


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_crash_mid_merge_leaves_no_output(tmp_path, monkeypatch, exc):
    base, fts = make_models(T=2)
    bp, mp = save_models(tmp_path, base, fts)
    real = ops.ties_merge
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise exc("simulated crash")
        return real(*a, **k)

    monkeypatch.setattr(ops, "ties_merge", flaky)
    with pytest.raises(exc):
        merge_checkpoints(bp, mp, "ties", output=tmp_path / "o", max_shard_size=2000, memory_budget="3KiB")
    assert calls["n"] == 3
    assert not (tmp_path / "o").exists()  # no output folder at all (not even an empty one)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder or lock left
    monkeypatch.setattr(ops, "ties_merge", real)
    merge_checkpoints(bp, mp, "ties", output=tmp_path / "o", max_shard_size=2000)  # the retry succeeds
    assert_same(load_state_dict(tmp_path / "o"), methods.ties_merging(base, fts))


def test_existing_output_is_not_overwritten(tmp_path):
    base, fts = make_models(T=2)
    merge_checkpoints(base, fts, "ta", output=tmp_path / "o")
    with pytest.raises(OutputError, match="already exists"):
        merge_checkpoints(base, fts, "ta", output=tmp_path / "o")
    with pytest.raises(OutputError, match="already exists"):
        merge_checkpoints(base, fts, "ta", output=tmp_path / "o", dry_run=True)
    merge_checkpoints(base, fts, "ties", output=tmp_path / "o", overwrite=True)
    assert_same(load_state_dict(tmp_path / "o"), methods.ties_merging(base, fts))


def test_dry_run_reads_and_writes_nothing(tmp_path, monkeypatch):
    base, fts = make_models(T=3)
    bp, mp = save_models(tmp_path, base, fts, shard=1500)

    def no_read(*a, **k):
        raise AssertionError("dry run read tensor data")

    monkeypatch.setattr(SafetensorsFile, "read_bytes", no_read)
    r = merge_checkpoints(bp, mp, "ties", output=tmp_path / "out", dry_run=True, memory_budget="4KiB")
    assert r.dry_run and r.state_dict is None and r.paths == []
    assert not (tmp_path / "out").exists()
    text = r.plan.describe()
    assert "memory estimate" in text and "passes over the inputs: 2" in text
    assert r.plan.memory_estimate() > 0
    # validation still happens in a dry run
    base2, fts2 = _mismatched(tmp_path)
    bp2, mp2 = save_models(tmp_path / "mm", base2, fts2)
    with pytest.raises(MismatchError):
        merge_checkpoints(bp2, mp2, "ties", dry_run=True)


# ------------------------------------------------------------------------------------------------
# bounded memory
# ------------------------------------------------------------------------------------------------
def test_reads_are_bounded_by_the_budget(tmp_path, monkeypatch):
    """No read is larger than the group budget, whatever the tensor size, and a group's buffers fit it."""
    g = torch.Generator().manual_seed(0)
    base = {f"w{i}": torch.randn(100_000, generator=g) for i in range(6)}  # 400 KB tensors
    fts = [{k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    bp, mp = save_models(tmp_path, base, fts)
    sizes = []
    real = SafetensorsFile.read_bytes

    def spy(self, begin, nbytes, out=None):
        sizes.append(nbytes)
        return real(self, begin, nbytes, out)

    monkeypatch.setattr(SafetensorsFile, "read_bytes", spy)
    budget = 256 * 1024
    r = merge_checkpoints(bp, mp, "ties", memory_budget=budget, output=tmp_path / "o")
    assert max(sizes) <= budget // 2
    assert r.plan.largest_group_bytes() <= budget // 2
    assert len(sizes) > 3 * 4 * 6  # every tensor was read in several slices, 3 passes
    monkeypatch.setattr(SafetensorsFile, "read_bytes", real)
    assert_same(load_state_dict(tmp_path / "o"), methods.ties_merging(base, fts))


_RSS_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    import calm_fast
    from calm_fast.streaming import merge_checkpoints
    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    args = json.loads(sys.argv[1])
    # warm up the ops and allocator on a tiny merge, so the baseline includes one-time costs
    merge_checkpoints({"x": torch.zeros(8)}, [{"x": torch.ones(8)}], args["method"])
    before = status("VmRSS:")
    r = merge_checkpoints(args["base"], args["models"], args["method"], output=args["out"], overwrite=True,
                          memory_budget=args["budget"])
    print(json.dumps({"delta": status("VmHWM:") - before, "passes": r.passes}))
""")


def test_peak_rss_bounded_independent_of_model_size(tmp_path):
    """Peak RSS growth of a streaming TIES merge stays within a few budgets although the inputs are many
    times larger; the same measurement with a budget that holds the whole model shows the growth, so the
    test would catch an engine that materialises the model."""
    g = torch.Generator().manual_seed(0)
    n_tensors, numel = 48, 256 * 1024
    base = {f"layers.{i}.w": torch.randn(numel, generator=g).to(torch.bfloat16) for i in range(n_tensors)}
    save_state_dict(base, tmp_path / "base")
    models = []
    for t in range(3):
        ft = {k: (v.float() + 0.01 * torch.randn(numel, generator=g)).to(torch.bfloat16) for k, v in base.items()}
        save_state_dict(ft, tmp_path / f"ft{t}", max_shard_size=8 * 2**20)
        models.append(str(tmp_path / f"ft{t}"))
        del ft
    model_bytes = n_tensors * numel * 2  # 24 MiB per model, 96 MiB of inputs
    results = {}
    for budget in (4 * 2**20, 2**30):
        arg = json.dumps({"base": str(tmp_path / "base"), "models": models, "method": "ties",
                          "out": str(tmp_path / "out"), "budget": budget})
        out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, arg], check=True, capture_output=True, text=True)
        results[budget] = json.loads(out.stdout.strip().splitlines()[-1])
    small, large = results[4 * 2**20]["delta"], results[2**30]["delta"]
    print(f"RSS growth: {small / 2**20:.1f} MiB (4 MiB budget), {large / 2**20:.1f} MiB (1 GiB budget)")
    assert results[4 * 2**20]["passes"] == 2
    # bounded: a few budgets (4 MiB group buffers incl. prefetch, outputs, histograms) + allocator slack
    assert small < 24 * 2**20, f"peak RSS grew by {small / 2**20:.1f} MiB with a 4 MiB budget"
    assert small < model_bytes
    # the measurement can see whole-model buffering: with an unbounded budget RSS grows by >= the inputs
    assert large > 4 * model_bytes * 0.9, f"{large / 2**20:.1f} MiB"


def test_dare_tensors_are_never_sliced():
    base, fts = make_models(T=2)
    plan = build_plan(base, fts, "dare", memory_budget=4096)
    assert all(p.whole for g in plan.groups for p in g)
    plan = build_plan(base, fts, "ties", memory_budget=4096)
    assert any(not p.whole for g in plan.groups for p in g)


def test_empty_and_scalar_tensors():
    g = torch.Generator().manual_seed(2)
    base = {"a": torch.randn(5, 3, generator=g), "empty": torch.randn(0, 4, generator=g),
            "scalar": torch.randn((), generator=g)}
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(2)]
    for name, fn, kw in CASES:
        want = fn(base, fts, **kw)
        for budget in ("1GiB", 1024):
            assert_same(merge_checkpoints(base, fts, name, memory_budget=budget, **kw).state_dict, want)


def test_hf_folder_config_is_copied(tmp_path):
    base, fts = make_models(T=2)
    bp, mp = save_models(tmp_path, base, fts)
    (tmp_path / "base" / "config.json").write_text(json.dumps({"torch_dtype": "float32", "model_type": "toy"}))
    (tmp_path / "base" / "tokenizer.json").write_text("{}")
    r = merge_checkpoints(bp, mp, "ta", output=tmp_path / "o", out_dtype="bf16")
    assert json.loads((tmp_path / "o" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert (tmp_path / "o" / "tokenizer.json").exists()
    assert str(tmp_path / "o" / "config.json") in r.paths
    merge_checkpoints(bp, mp, "ta", output=tmp_path / "o2", copy_config=False)
    assert not (tmp_path / "o2" / "config.json").exists()


@pytest.mark.parametrize("how", ["biased_sample", "candidate_cap"])
@pytest.mark.parametrize("case", [CASES[1], CASES[4], CASES[6]], ids=["ties", "dare_ties", "consensus_ties"])
def test_bracket_miss_falls_back_to_radix(tmp_path, monkeypatch, how, case):
    """When the sampled bracket does not pin the k-th value, the radix passes take over: same result."""
    name, fn, kw = case
    base, fts = make_models(T=3, dtype=torch.bfloat16)
    bp, mp = save_models(tmp_path, base, fts)
    if how == "biased_sample":
        monkeypatch.setattr(_Engine, "_sample_abs_tau", lambda self, N: [torch.full((64,), 100.0)] * self.T)
    else:
        monkeypatch.setattr(SP, "BRACKET_CANDIDATE_BYTES", 1)
    r = merge_checkpoints(bp, mp, name, memory_budget="4KiB", **kw)
    assert_same(r.state_dict, fn(base, fts, **kw))
    assert r.bracket_fallbacks == 3 and r.passes == 4


def test_radix_only_mode(tmp_path, monkeypatch):
    monkeypatch.setattr(SP, "BRACKET_SELECT", False)
    base, fts = make_models(T=3)
    r = merge_checkpoints(base, fts, "ties", memory_budget="4KiB")
    assert_same(r.state_dict, methods.ties_merging(base, fts))
    assert r.passes == 3 == r.plan.num_passes


def test_copied_tensors_survive_a_slow_sink(tmp_path, monkeypatch):
    """Copied tensors are views of the reusable read buffers: they must be written before a buffer is refilled.
    A sink slowed to ~10 ms per tensor, with many small copy groups and prefetching, makes any write that is
    queued behind the reader (instead of flushed first) see the next groups' bytes."""
    import time as _time

    from calm_fast.io.writer import SafetensorsWriter

    g = torch.Generator().manual_seed(5)
    base = {f"blocks.{i}.w": torch.randn(256, generator=g) for i in range(40)}
    base.update({"head.w": torch.randn(64, generator=g), "head.b": torch.randn(8, generator=g)})
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(2)]
    bp, mp = save_models(tmp_path, base, fts)
    real = SafetensorsWriter.write

    def slow(self, *a, **k):
        _time.sleep(0.01)
        return real(self, *a, **k)

    monkeypatch.setattr(SafetensorsWriter, "write", slow)
    r = merge_checkpoints(bp, mp, "ta", output=tmp_path / "o", exclude=["blocks"], memory_budget="4KiB",
                          prefetch=True, scaling=0.5)
    assert len(r.plan.copy_groups) >= 20  # many groups, so the two read buffers are reused many times
    want = methods.task_arithmetic(base, fts, exclude=["blocks"], scaling=0.5)
    got = load_state_dict(tmp_path / "o")
    for k in base:
        if k.startswith("blocks"):
            assert torch.equal(got[k], base[k]), k  # copied from the base, bit for bit
    assert_same(got, want)
