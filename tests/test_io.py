"""Checkpoint I/O: formats, validation before heavy work, tied tensors, LoRA, crash-safe writing."""
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from calm_fast.io import (CheckpointError, LoraCheckpoint, OutputError, OutputSpec, SafetensorsWriter,
                          StateDictCheckpoint, find_aliases, load_state_dict, lora_deltas, open_checkpoint,
                          parse_dtype, parse_size, save_state_dict)
from calm_fast.io.publish import STAGING_MARK
from calm_fast.io.writer import DictWriter, copy_aux_files


def _sd(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    sd = {
        "embed.weight": torch.randn(11, 8, generator=g),
        "layers.0.weight": torch.randn(8, 8, generator=g),
        "layers.0.bias": torch.randn(8, generator=g),
        "layers.1.weight": torch.randn(5, 8, generator=g),
        "scalar": torch.randn((), generator=g),
        "empty": torch.randn(0, 4, generator=g),
    }
    sd = {k: v.to(dtype) for k, v in sd.items()}
    sd["position_ids"] = torch.arange(9)
    sd["flag"] = torch.tensor([True, False, True])
    return sd


def _equal_sd(a, b):
    assert list(a) == list(b) or set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------------------
# sizes and dtypes
# ------------------------------------------------------------------------------------------------
def test_parse_size_and_dtype():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("1e3") == 1000
    assert parse_size(123) == 123
    assert parse_size(None) is None
    with pytest.raises(ValueError):
        parse_size("lots")
    assert parse_dtype("bf16") is torch.bfloat16
    assert parse_dtype("float16") is torch.float16
    assert parse_dtype(torch.float32) is torch.float32
    with pytest.raises(ValueError):
        parse_dtype("int4")


# ------------------------------------------------------------------------------------------------
# safetensors: single, sharded, slices
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_roundtrip_single_and_sharded(tmp_path, dtype):
    sd = _sd(dtype=dtype)
    p1 = save_state_dict(sd, tmp_path / "single")
    assert [os.path.basename(p) for p in p1] == ["model.safetensors"]
    p2 = save_state_dict(sd, tmp_path / "sharded", max_shard_size=200)
    assert os.path.basename(p2[-1]) == "model.safetensors.index.json" and len(p2) > 3
    for folder in ("single", "sharded"):
        ck = open_checkpoint(tmp_path / folder)
        _equal_sd({k: ck.read(k) for k in ck.keys()}, sd)
        # the files are readable by the reference safetensors loader too (header, alignment)
    _equal_sd(load_file(p1[0]), sd)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(sd)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in sd.values())
    merged = {}
    for p in p2[:-1]:
        with safe_open(p, "pt") as f:
            assert f.metadata()["format"] == "pt"
            merged.update({k: f.get_tensor(k) for k in f.keys()})
    _equal_sd(merged, sd)


def test_read_slices_into_buffers(tmp_path):
    sd = _sd()
    save_state_dict(sd, tmp_path / "m")
    ck = open_checkpoint(tmp_path / "m" / "model.safetensors")
    w = sd["embed.weight"].reshape(-1)
    buf = torch.empty(1000, dtype=torch.uint8)
    for a, b in [(0, 88), (3, 17), (80, 88), (5, 5)]:
        got = ck.read("embed.weight", a, b, out=buf)
        assert torch.equal(got, w[a:b])
        assert got.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()  # read in place
    with pytest.raises(CheckpointError):
        ck.read("embed.weight", 80, 89)
    with pytest.raises(CheckpointError):
        ck.read("nope")
    assert ck.info("embed.weight").shape == (11, 8)
    assert ck.location("layers.0.weight")[0] == 0


# ------------------------------------------------------------------------------------------------
# validation before any tensor data is read
# ------------------------------------------------------------------------------------------------
def _sharded(tmp_path):
    sd = _sd()
    save_state_dict(sd, tmp_path / "m", max_shard_size=200)
    folder = tmp_path / "m"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return folder, index


def test_index_missing_shard(tmp_path):
    folder, index = _sharded(tmp_path)
    shard = sorted(set(index["weight_map"].values()))[1]
    os.remove(folder / shard)
    with pytest.raises(CheckpointError, match=shard):
        open_checkpoint(folder)


def test_index_tensor_not_in_shard(tmp_path):
    folder, index = _sharded(tmp_path)
    index["weight_map"]["ghost.weight"] = sorted(set(index["weight_map"].values()))[0]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="ghost.weight"):
        open_checkpoint(folder)


def test_index_tensor_missing_from_index(tmp_path):
    folder, index = _sharded(tmp_path)
    shards = list(index["weight_map"].values())
    name = next(k for k, s in index["weight_map"].items() if shards.count(s) > 1)
    del index["weight_map"][name]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not .or differently. listed"):
        open_checkpoint(folder)


def test_index_forgets_a_whole_shard(tmp_path):
    folder, index = _sharded(tmp_path)
    shard = sorted(set(index["weight_map"].values()))[1]
    index["weight_map"] = {k: s for k, s in index["weight_map"].items() if s != shard}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="exist on disk"):
        open_checkpoint(folder)
    os.remove(folder / shard)  # a gap in the numbering, on disk too (a glob-based loader would not notice)
    with pytest.raises(CheckpointError, match="do not exist"):
        open_checkpoint(folder)


def test_truncated_and_corrupt_files(tmp_path):
    save_file({"a": torch.randn(100)}, str(tmp_path / "ok.safetensors"))
    raw = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(raw[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        open_checkpoint(tmp_path / "trunc.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json!!!!!!!")
    with pytest.raises(CheckpointError, match="corrupt"):
        open_checkpoint(tmp_path / "junk.safetensors")
    (tmp_path / "tiny.safetensors").write_bytes(b"abc")
    with pytest.raises(CheckpointError):
        open_checkpoint(tmp_path / "tiny.safetensors")
    with pytest.raises(CheckpointError, match="no such file"):
        open_checkpoint(tmp_path / "nothing_here")


def test_folder_resolution(tmp_path):
    sd = _sd()
    (tmp_path / "two").mkdir()
    save_file({"a": torch.ones(2)}, str(tmp_path / "two" / "x.safetensors"))
    save_file({"a": torch.ones(2)}, str(tmp_path / "two" / "y.safetensors"))
    with pytest.raises(CheckpointError, match="candidate"):
        open_checkpoint(tmp_path / "two")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no model weights"):
        open_checkpoint(tmp_path / "empty")
    (tmp_path / "bin").mkdir()
    torch.save(sd, tmp_path / "bin" / "pytorch_model.bin")
    _equal_sd(load_state_dict(tmp_path / "bin"), sd)


# ------------------------------------------------------------------------------------------------
# torch files, pickles, modules, tied tensors
# ------------------------------------------------------------------------------------------------
def test_torch_files(tmp_path):
    sd = _sd()
    torch.save(sd, tmp_path / "a.pt")
    _equal_sd(load_state_dict(tmp_path / "a.pt"), sd)
    torch.save({"state_dict": sd, "epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "train.ckpt")
    _equal_sd(load_state_dict(tmp_path / "train.ckpt"), sd)
    torch.save({"epoch": 3, "note": "no weights"}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="no state dict"):
        open_checkpoint(tmp_path / "bad.pt")
    # sharded .bin index
    (tmp_path / "sh").mkdir()
    keys = list(sd)
    torch.save({k: sd[k] for k in keys[:3]}, tmp_path / "sh" / "pytorch_model-00001-of-00002.bin")
    torch.save({k: sd[k] for k in keys[3:]}, tmp_path / "sh" / "pytorch_model-00002-of-00002.bin")
    wm = {k: ("pytorch_model-00001-of-00002.bin" if i < 3 else "pytorch_model-00002-of-00002.bin")
          for i, k in enumerate(keys)}
    (tmp_path / "sh" / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wm}))
    _equal_sd(load_state_dict(tmp_path / "sh"), sd)
    os.remove(tmp_path / "sh" / "pytorch_model-00002-of-00002.bin")
    with pytest.raises(CheckpointError, match="do not exist"):
        open_checkpoint(tmp_path / "sh")


_ENCODER_SRC = '''
import torch
class VisualTransformer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 4, 2)
        self.ln = torch.nn.LayerNorm(4)
        self.register_buffer("scale", torch.tensor(2.0))
class ImageEncoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.model = VisualTransformer()
        self.cache_dir = "/nonexistent"
        self.train_preprocess = None
'''


def test_trusted_pickled_module_with_missing_classes(tmp_path):
    """open_clip ImageEncoder-style checkpoints: a whole pickled nn.Module whose classes no longer exist."""
    pkg = tmp_path / "oldpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "modeling.py").write_text(_ENCODER_SRC)
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(tmp_path)!r})
        from oldpkg.modeling import ImageEncoder
        torch.manual_seed(0)
        m = ImageEncoder()
        torch.save(m, {str(tmp_path / 'encoder.pt')!r})
        torch.save(m.state_dict(), {str(tmp_path / 'expected.pt')!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True)
    expected = torch.load(tmp_path / "expected.pt")
    # weights_only refuses, with a hint
    with pytest.raises(CheckpointError, match="trust_pickle"):
        open_checkpoint(tmp_path / "encoder.pt")
    # trusted: oldpkg is not importable here, the classes are stubbed and the weights come through
    assert "oldpkg" not in sys.modules
    ck = open_checkpoint(tmp_path / "encoder.pt", trust_pickle=True)
    _equal_sd({k: ck.read(k) for k in ck.keys()}, expected)
    assert "oldpkg.modeling.ImageEncoder" in ck.metadata["stubbed_classes"]
    # without stubs the missing class is an error (not a silent partial load)
    with pytest.raises(CheckpointError):
        open_checkpoint(tmp_path / "encoder.pt", trust_pickle=True, stub_missing_classes=False)


def test_module_and_tied_tensors(tmp_path):
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.body = torch.nn.Linear(4, 4)
            self.lm_head = torch.nn.Linear(4, 10, bias=False)
            self.lm_head.weight = self.embed.weight  # tied

    m = Tiny()
    ck = open_checkpoint(m)
    assert ck.aliases == {"lm_head.weight": "embed.weight"}
    assert "lm_head.weight" not in ck.keys()
    assert find_aliases(m.state_dict()) == {"lm_head.weight": "embed.weight"}
    # q/k/v-style views of one storage are different tensors, not aliases
    fused = torch.randn(12, 4)
    assert find_aliases({"q": fused[:4], "k": fused[4:8], "v": fused[8:]}) == {}
    paths = save_state_dict(m.state_dict(), tmp_path / "tied")
    with safe_open(paths[0], "pt") as f:
        assert "lm_head.weight" not in f.keys()
        assert json.loads(f.metadata()["calm_fast.aliases"]) == {"lm_head.weight": "embed.weight"}
    torch.save(m.state_dict(), tmp_path / "tied.pt")
    assert open_checkpoint(tmp_path / "tied.pt").aliases == {"lm_head.weight": "embed.weight"}


def test_state_dict_checkpoint_rejects_non_tensors():
    with pytest.raises(CheckpointError, match="not tensors"):
        StateDictCheckpoint({"a": torch.ones(2), "b": 3})


# ------------------------------------------------------------------------------------------------
# LoRA
# ------------------------------------------------------------------------------------------------
def _lora_setup(tmp_path, dtype=torch.float32, **cfg_over):
    g = torch.Generator().manual_seed(1)
    base = {
        "model.embed_tokens.weight": torch.randn(20, 6, generator=g),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(6, 6, generator=g),
        "model.layers.0.self_attn.v_proj.weight": torch.randn(6, 6, generator=g),
        "model.layers.0.mlp.c_fc.weight": torch.randn(6, 12, generator=g),  # Conv1D layout [in, out]
        "model.norm.weight": torch.ones(6),
        "lm_head.weight": torch.randn(20, 6, generator=g),
    }
    base = {k: v.to(dtype) for k, v in base.items()}
    save_state_dict(base, tmp_path / "base")
    P = "base_model.model."
    ad = {
        P + "model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 6, generator=g),
        P + "model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(6, 4, generator=g),
        P + "model.layers.0.self_attn.v_proj.lora_A.weight": torch.randn(2, 6, generator=g),  # rank_pattern
        P + "model.layers.0.self_attn.v_proj.lora_B.weight": torch.randn(6, 2, generator=g),
        P + "model.embed_tokens.lora_embedding_A": torch.randn(4, 20, generator=g),
        P + "model.embed_tokens.lora_embedding_B": torch.randn(6, 4, generator=g),
        P + "lm_head.weight": torch.randn(20, 6, generator=g),  # modules_to_save: full replacement
    }
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "rank_pattern": {"v_proj": 2},
           "alpha_pattern": {"v_proj": 6}, "fan_in_fan_out": False, "use_rslora": False,
           "target_modules": ["q_proj", "v_proj", "embed_tokens"]}
    cfg.update(cfg_over)
    (tmp_path / "adapter").mkdir()
    save_file(ad, str(tmp_path / "adapter" / "adapter_model.safetensors"))
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(cfg))
    return base, ad, cfg


def test_lora_full_deltas(tmp_path):
    base, ad, cfg = _lora_setup(tmp_path)
    P = "base_model.model."
    ck = open_checkpoint(tmp_path / "adapter", lora_base=tmp_path / "base")
    assert isinstance(ck, LoraCheckpoint)
    q = "model.layers.0.self_attn.q_proj"
    v = "model.layers.0.self_attn.v_proj"
    e = "model.embed_tokens"
    want = {
        q + ".weight": base[q + ".weight"] + (ad[P + q + ".lora_B.weight"] @ ad[P + q + ".lora_A.weight"]) * (8 / 4),
        v + ".weight": base[v + ".weight"] + (ad[P + v + ".lora_B.weight"] @ ad[P + v + ".lora_A.weight"]) * (6 / 2),
        e + ".weight": base[e + ".weight"] + (ad[P + e + ".lora_embedding_B"] @ ad[P + e + ".lora_embedding_A"]).T * 2,
        "lm_head.weight": ad[P + "lm_head.weight"],
        "model.norm.weight": base["model.norm.weight"],
    }
    for k, w in want.items():
        torch.testing.assert_close(ck.read(k), w, rtol=1e-6, atol=1e-6)
    assert set(ck.adapted) == {q + ".weight", v + ".weight", e + ".weight", "lm_head.weight"}
    # slices of an adapted weight equal the slice of the full one (row-wise delta computation)
    full = ck.read(e + ".weight").reshape(-1)
    for a, b in [(0, 7), (5, 40), (33, 120)]:
        assert torch.equal(ck.read(e + ".weight", a, b), full[a:b])
    # the same with several delta blocks per tensor: slices still match the whole bit for bit
    ck.DELTA_BLOCK_ROWS = 3
    full = ck.read(e + ".weight").reshape(-1)
    for a, b in [(0, 7), (5, 40), (33, 120), (17, 18)]:
        assert torch.equal(ck.read(e + ".weight", a, b), full[a:b])
    fq = ck.read(q + ".weight").reshape(-1)
    assert torch.equal(ck.read(q + ".weight", 10, 31), fq[10:31])
    deltas = lora_deltas(tmp_path / "adapter", tmp_path / "base")
    torch.testing.assert_close(deltas[q + ".weight"], want[q + ".weight"] - base[q + ".weight"])


def test_lora_rslora_and_fan_in_fan_out(tmp_path):
    g = torch.Generator().manual_seed(2)
    base = {"h.0.mlp.c_fc.weight": torch.randn(6, 12, generator=g)}  # GPT-2 Conv1D: [in, out]
    save_state_dict(base, tmp_path / "base")
    A, B = torch.randn(3, 6, generator=g), torch.randn(12, 3, generator=g)
    (tmp_path / "ad").mkdir()
    save_file({"base_model.model.h.0.mlp.c_fc.lora_A.weight": A, "base_model.model.h.0.mlp.c_fc.lora_B.weight": B},
              str(tmp_path / "ad" / "adapter_model.safetensors"))
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 3, "lora_alpha": 6, "fan_in_fan_out": True, "use_rslora": True}))
    ck = open_checkpoint(tmp_path / "ad", lora_base=tmp_path / "base")
    torch.testing.assert_close(ck.read("h.0.mlp.c_fc.weight"),
                               base["h.0.mlp.c_fc.weight"] + (B @ A).T * (6 / math.sqrt(3)))


def test_lora_rejections(tmp_path):
    _lora_setup(tmp_path, use_dora=True)
    with pytest.raises(CheckpointError, match="DoRA"):
        open_checkpoint(tmp_path / "adapter", lora_base=tmp_path / "base")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    cfg.update(use_dora=False, rank_pattern={})
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="rank"):  # v_proj has rank 2 but the config says 4
        open_checkpoint(tmp_path / "adapter", lora_base=tmp_path / "base")
    cfg.update(peft_type="IA3")
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="IA3"):
        open_checkpoint(tmp_path / "adapter", lora_base=tmp_path / "base")
    with pytest.raises(CheckpointError, match="base model"):
        open_checkpoint(tmp_path / "adapter")


# ------------------------------------------------------------------------------------------------
# the writer: completeness, overwrite, crash safety
# ------------------------------------------------------------------------------------------------
def _specs(sd):
    return [OutputSpec(k, tuple(v.shape), v.dtype) for k, v in sd.items()]


def _weight_files(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".safetensors") or p.name.endswith(".json"))


def test_writer_pieces_any_order_and_patch(tmp_path):
    sd = _sd()
    w = SafetensorsWriter(tmp_path / "o", _specs(sd), max_shard_size=300)
    for k in reversed(list(sd)):
        flat = sd[k].reshape(-1)
        half = flat.numel() // 2
        w.write(k, flat[half:], start=half)
        w.write(k, flat[:half], start=0)
    w.patch("layers.0.bias", torch.tensor([0, 7]), torch.tensor([100.0, -5.0]))
    w.commit()
    got = load_state_dict(tmp_path / "o")
    sd["layers.0.bias"][[0, 7]] = torch.tensor([100.0, -5.0])
    _equal_sd(got, sd)


def test_writer_refuses_incomplete_output(tmp_path):
    sd = _sd()
    with SafetensorsWriter(tmp_path / "o", _specs(sd)) as w:
        for k in list(sd)[:-1]:
            w.write(k, sd[k])
        w.write(list(sd)[-1], sd[list(sd)[-1]].reshape(-1)[:1])  # only a part
        with pytest.raises(OutputError, match="not .fully. written"):
            w.commit()
    assert not (tmp_path / "o").exists()
    assert list(tmp_path.iterdir()) == []  # staging folder and lock removed too
    with pytest.raises(OutputError, match="declared"):
        with SafetensorsWriter(tmp_path / "o2", _specs(sd)) as w:
            w.write("layers.0.bias", sd["layers.0.bias"].double())


def test_writer_exception_mid_write_leaves_no_final_file(tmp_path):
    sd = _sd()
    with pytest.raises(RuntimeError, match="boom"):
        with SafetensorsWriter(tmp_path / "o", _specs(sd), max_shard_size=200) as w:
            for i, k in enumerate(sd):
                if i == 3:
                    raise RuntimeError("boom")
                w.write(k, sd[k])
    assert list(tmp_path.iterdir()) == []  # no output folder, no staging folder, no lock
    with pytest.raises(CheckpointError):
        open_checkpoint(tmp_path / "o")


def test_hard_kill_mid_write_leaves_only_hidden_staging(tmp_path):
    script = textwrap.dedent(f"""
        import os, torch
        from calm_fast.io import OutputSpec, SafetensorsWriter
        specs = [OutputSpec(f"t{{i}}", (1000,), torch.float32) for i in range(10)]
        w = SafetensorsWriter({str(tmp_path / 'o')!r}, specs, max_shard_size=20000)
        for i in range(5):
            w.write(f"t{{i}}", torch.ones(1000))
        os._exit(9)  # killed: no cleanup, no commit
    """)
    r = subprocess.run([sys.executable, "-c", script])
    assert r.returncode == 9
    assert not (tmp_path / "o").exists()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names and all(n.startswith(".o.calm-fast-") for n in names), names
    assert any(STAGING_MARK in n for n in names)
    # the next run on the same output removes the dead run's staging folder and succeeds
    save_state_dict({"t": torch.ones(3)}, tmp_path / "o")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]
    assert torch.equal(load_state_dict(tmp_path / "o")["t"], torch.ones(3))


def test_writer_overwrite_and_stale_shards(tmp_path):
    sd = _sd()
    save_state_dict(sd, tmp_path / "o", max_shard_size=200)
    n_before = len(_weight_files(tmp_path / "o"))
    with pytest.raises(OutputError, match="already exists"):
        save_state_dict(sd, tmp_path / "o", max_shard_size=200)
    save_state_dict(sd, tmp_path / "o", overwrite=True)  # one file now: the old shards and index go
    assert _weight_files(tmp_path / "o") == ["model.safetensors"]
    assert n_before > 2
    _equal_sd(load_state_dict(tmp_path / "o"), sd)


def test_writer_single_file_target_and_dtype(tmp_path):
    sd = _sd()
    save_state_dict(sd, tmp_path / "x.safetensors", dtype="bf16", metadata={"note": "hi"})
    got = load_file(str(tmp_path / "x.safetensors"))
    assert got["embed.weight"].dtype == torch.bfloat16 and got["position_ids"].dtype == torch.int64
    assert torch.equal(got["embed.weight"], sd["embed.weight"].bfloat16())
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert f.metadata()["note"] == "hi"


def test_writer_checks_disk_space(tmp_path, monkeypatch):
    class FakeStat:
        f_bavail, f_frsize = 1, 1

    monkeypatch.setattr(os, "statvfs", lambda p: FakeStat())
    with pytest.raises(OutputError, match="disk space"):
        SafetensorsWriter(tmp_path / "o", [OutputSpec("a", (1000,), torch.float32)])


def test_dict_writer():
    sd = _sd()
    w = DictWriter(_specs(sd))
    for k, v in sd.items():
        w.write(k, v.reshape(-1))
    out = w.commit()
    _equal_sd(out, sd)
    w2 = DictWriter(_specs(sd))
    with pytest.raises(OutputError):
        w2.commit()


def test_copy_aux_files(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"torch_dtype": "float32", "hidden_size": 8}))
    (src / "tokenizer.json").write_text("{}")
    (src / "model.safetensors").write_text("not copied")
    out = tmp_path / "out"
    out.mkdir()
    copied = copy_aux_files(src, out, torch.bfloat16)
    assert sorted(os.path.basename(p) for p in copied) == ["config.json", "tokenizer.json"]
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with pytest.raises(OutputError):
        copy_aux_files(src, out)
