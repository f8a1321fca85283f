"""mergekit-format configs: parity with mergekit 0.1.5 itself on tiny Llama/Mistral models built in code.

Rule checked here: for the deterministic methods the output equals mergekit's **bitwise** (fp32 and
bf16 working dtypes; same torch build, since magnitude ties are broken by torch's sort).  The random
methods (dare_*, della*) are compared with mergekit bitwise too, with mergekit's ``torch.bernoulli`` and
calm_fast's Philox draw both replaced by one deterministic mask function (so everything but the random
source is compared); calm_fast's generator is checked for its statistics separately.

mergekit runs in-process (``mergekit.merge.run_merge``); where it is not installed the parity tests
skip with that reason, and the format/CLI/output tests still run.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import yaml

from calm_fast import cli
from calm_fast.io import ConfigError, load_state_dict
from calm_fast.mergekit_config import detect_format, resolve_mergekit_paths, validate_mergekit
from calm_fast.mergekit_merge import merge_mergekit

transformers = pytest.importorskip("transformers")

try:  # the reference: mergekit itself
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    HAVE_MERGEKIT = True
except ImportError:  # pragma: no cover - exercised where mergekit is absent
    HAVE_MERGEKIT = False

needs_mergekit = pytest.mark.skipif(not HAVE_MERGEKIT, reason="mergekit is not installed (pip install mergekit==0.1.5)")

VOCAB = 64


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{f"t{i}": i for i in range(1, VOCAB)}}  # exactly the embedding's rows
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def _make(path, arch: str, seed: int, perturb: bool, dtype=torch.float32, layers: int = 4):
    torch.manual_seed(0)  # the same base weights for every model of an architecture
    kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
              num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    if arch == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=None, **kw))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw))
    if perturb:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                d = torch.randn(p.shape, generator=g) * 0.01
                # exact zeros and exact magnitude ties in the deltas (threshold ties must match too)
                d[torch.rand(p.shape, generator=g) < 0.05] = 0.0
                d[torch.rand(p.shape, generator=g) < 0.05] = 0.0078125
                p.add_(d)
    model.to(dtype).save_pretrained(path)
    _tokenizer().save_pretrained(path)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("mk_models")
    for arch in ("llama", "mistral"):
        _make(root / arch / "base", arch, 0, False)
        for i in (1, 2, 3):
            _make(root / arch / f"m{i}", arch, i, True)
    _make(root / "bf16" / "base", "llama", 0, False, torch.bfloat16)
    for i in (1, 2):
        _make(root / "bf16" / f"m{i}", "llama", i, True, torch.bfloat16)
    return root


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _load(folder):
    return load_state_dict(str(folder))


def _absolute(node, workdir):
    """Model paths made absolute (mergekit caches its loaders by the path as written, process-wide)."""
    if isinstance(node, dict):
        return {k: (str(workdir / v) if k in ("model", "base_model") and isinstance(v, str) else _absolute(v, workdir))
                for k, v in node.items()}
    if isinstance(node, list):
        return [str(workdir / x) if isinstance(x, str) else _absolute(x, workdir) for x in node]
    return node


def _run_mergekit(cfg: dict, out, workdir):
    cfg = dict(cfg)
    for key in ("models", "slices"):
        if key in cfg:
            cfg[key] = _absolute(cfg[key], workdir)
    if "base_model" in cfg:
        cfg["base_model"] = str(workdir / cfg["base_model"])
    run_merge(MergeConfiguration.model_validate(cfg), str(out),
              MergeOptions(write_model_card=False, quiet=True, copy_tokenizer=True))
    return _load(out)


def _run_calm(text: str, out, workdir):
    cfg = resolve_mergekit_paths(validate_mergekit(yaml.safe_load(text)), str(workdir))
    merge_mergekit(cfg, str(out), config_text=text, fsync=False)
    return _load(out)


def _assert_bitwise(a, b):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), (k, float((a[k].float() - b[k].float()).abs().max()))


TIES_GRADIENTS = """
models:
  - model: m1
    parameters: {weight: [1.0, 0.5], density: [0.9, 0.3]}
  - model: m2
    parameters: {weight: 0.7, density: 0.3}
  - model: m3
    parameters:
      weight: [{filter: mlp, value: 0.5}, {value: -0.2}]
      density: 0.5
merge_method: ties
base_model: base
parameters: {normalize: true, int8_mask: true}
dtype: float32
"""

CASES = {
    "ties_gradients_filters": ("llama", TIES_GRADIENTS),
    "ties_defaults": ("mistral", """
models:
  - model: m1
    parameters: {weight: 1.0, density: 0.2}
  - model: m2
    parameters: {weight: 1.0, density: 0.2}
merge_method: ties
base_model: base
"""),
    "ties_no_normalize_lambda": ("llama", """
models:
  - model: m1
    parameters: {weight: 0.6, density: 0.4}
  - model: m2
    parameters: {weight: 0.9, density: 0.7}
merge_method: ties
base_model: base
parameters: {normalize: false, lambda: 0.5}
"""),
    "task_arithmetic": ("llama", """
models:
  - model: m1
    parameters: {weight: 0.3}
  - model: m2
    parameters: {weight: -0.4}
merge_method: task_arithmetic
base_model: base
parameters: {lambda: 0.8}
"""),
    "linear_without_base": ("mistral", """
models:
  - model: m1
    parameters: {weight: 0.3}
  - model: m2
    parameters: {weight: 0.5}
merge_method: linear
"""),
    "linear_with_base_unnormalized": ("llama", """
models:
  - model: m1
    parameters: {weight: [0.1, 0.9]}
  - model: m2
    parameters: {weight: 0.5}
merge_method: linear
base_model: base
parameters: {weight: 0.2, normalize: false}
"""),
    "breadcrumbs_ties": ("llama", """
models:
  - model: m1
    parameters: {weight: 1.0, density: 0.8, gamma: 0.05}
  - model: m2
    parameters: {weight: 0.5, density: 0.9}
merge_method: breadcrumbs_ties
base_model: base
"""),
    "breadcrumbs": ("llama", """
models:
  - model: m1
    parameters: {weight: 1.0, density: 0.9, gamma: 0.02}
  - model: m2
    parameters: {weight: 0.5, density: 0.6}
merge_method: breadcrumbs
base_model: base
"""),
    "slerp_slices_filters": ("llama", """
slices:
  - sources:
      - model: base
        layer_range: [0, 4]
      - model: m1
        layer_range: [0, 4]
merge_method: slerp
base_model: base
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float32
"""),
    "slerp_models": ("mistral", """
models:
  - model: m1
merge_method: slerp
base_model: base
parameters: {t: [0.2, 0.8]}
"""),
    "nuslerp_with_base": ("llama", """
models:
  - model: m1
    parameters: {weight: 0.3}
  - model: m2
    parameters: {weight: 0.6}
merge_method: nuslerp
base_model: base
"""),
    "nuslerp_row_wise": ("llama", """
models:
  - model: m1
    parameters: {weight: 0.7}
  - model: m2
    parameters: {weight: 0.2}
merge_method: nuslerp
parameters: {nuslerp_row_wise: true, nuslerp_flatten: false}
"""),
    "model_stock": ("llama", """
models:
  - model: m1
  - model: m2
  - model: m3
merge_method: model_stock
base_model: base
"""),
    "passthrough_slices": ("mistral", """
slices:
  - sources:
      - model: m1
        layer_range: [0, 3]
  - sources:
      - model: m2
        layer_range: [1, 4]
merge_method: passthrough
dtype: float32
"""),
    "ties_bf16": ("bf16", """
models:
  - model: m1
    parameters: {weight: 1.0, density: 0.5}
  - model: m2
    parameters: {weight: 0.6, density: 0.3}
merge_method: ties
base_model: base
dtype: bfloat16
"""),
    "ta_bf16_inputs_fp32_work_bf16_out": ("bf16", """
models:
  - model: m1
    parameters: {weight: 0.5}
  - model: m2
    parameters: {weight: 0.25}
merge_method: task_arithmetic
base_model: base
dtype: float32
out_dtype: bfloat16
tokenizer_source: base
"""),
}


@needs_mergekit
@pytest.mark.parametrize("case", sorted(CASES))
def test_bitwise_parity_with_mergekit(zoo, tmp_path, case):
    arch, text = CASES[case]
    workdir = zoo / arch
    ref = _run_mergekit(yaml.safe_load(text), tmp_path / "mk", workdir)
    got = _run_calm(text, tmp_path / "cf", workdir)
    _assert_bitwise(ref, got)
    if case == "passthrough_slices":  # 3 + 3 layers, renumbered
        assert json.loads((tmp_path / "cf" / "config.json").read_text())["num_hidden_layers"] == 6
        assert json.loads((tmp_path / "mk" / "config.json").read_text())["num_hidden_layers"] == 6


def _fake_bernoulli(probs, *args, generator=None, **kwargs):
    """A deterministic stand-in for torch.bernoulli: keep where a fixed hash of the position is < p."""
    n = probs.numel()
    idx = torch.arange(n, dtype=torch.int64)
    u = ((idx * 2654435761 + 12345) % 1000003).to(torch.float64) / 1000003.0
    return (u.reshape(probs.shape) < probs.double()).to(probs.dtype)


RANDOM_CASES = {
    "dare_ties": """
models:
  - model: m1
    parameters: {weight: 1.0, density: 0.4}
  - model: m2
    parameters: {weight: 0.7, density: [0.8, 0.3]}
merge_method: dare_ties
base_model: base
""",
    "dare_linear_no_rescale": """
models:
  - model: m1
    parameters: {weight: 0.5, density: 0.6}
  - model: m2
    parameters: {weight: 0.5, density: 0.3}
merge_method: dare_linear
base_model: base
parameters: {rescale: false}
""",
    "dare_linear": """
models:
  - model: m1
    parameters: {weight: 0.5, density: 0.6}
  - model: m2
    parameters: {weight: 0.5, density: 0.3}
merge_method: dare_linear
base_model: base
""",
    "della": """
models:
  - model: m1
    parameters: {weight: 1.0, density: 0.5, epsilon: 0.1}
  - model: m2
    parameters: {weight: 0.8, density: 0.4}
merge_method: della
base_model: base
parameters: {lambda: 0.9}
""",
    "della_linear": """
models:
  - model: m1
    parameters: {weight: 1.0, density: 0.5}
  - model: m2
    parameters: {weight: 0.8, density: 0.6}
merge_method: della_linear
base_model: base
""",
}


@needs_mergekit
@pytest.mark.parametrize("case", sorted(RANDOM_CASES))
def test_random_methods_match_mergekit_given_the_same_masks(zoo, tmp_path, monkeypatch, case):
    from calm_fast.methods import mergekit_sparsify

    monkeypatch.setattr(torch, "bernoulli", _fake_bernoulli)  # mergekit's draws
    monkeypatch.setattr(mergekit_sparsify, "draw_mask",  # calm_fast's draws
                        lambda probs, key, density=None: _fake_bernoulli(probs))
    text = RANDOM_CASES[case]
    ref = _run_mergekit(yaml.safe_load(text), tmp_path / "mk", zoo / "llama")
    got = _run_calm(text, tmp_path / "cf", zoo / "llama")
    _assert_bitwise(ref, got)


def test_dare_generator_statistics_and_l1_rescale(zoo, tmp_path):
    """The real generator: keep rate ≈ density (density is the keep probability, not the drop rate), the
    kept deltas rescaled to the original L1 norm per tensor; the same seed reproduces the output."""
    text = """
models:
  - model: m1
    parameters: {weight: 1.0, density: 0.3}
merge_method: dare_linear
base_model: base
"""
    wd = zoo / "llama"
    got = _run_calm(text, tmp_path / "a", wd)
    again = _run_calm(text, tmp_path / "b", wd)
    _assert_bitwise(got, again)
    base, m1 = _load(wd / "base"), _load(wd / "m1")
    kept = total = 0
    for k in base:
        tau = (m1[k] - base[k])
        out = got[k] - base[k]
        nz = tau != 0
        kept += int(((out != 0) & nz).sum())
        total += int(nz.sum())
        if tau.numel() > 1000:
            assert torch.allclose(out.abs().sum(), tau.abs().sum(), rtol=1e-4), k  # L1 rescale
    assert abs(kept / total - 0.3) < 0.02


def test_detection_of_the_format():
    mk_plain = {"merge_method": "ties", "base_model": "b", "models": [{"model": "a", "parameters": {"density": 0.5}}],
                "dtype": "float16"}
    assert detect_format(mk_plain) == "mergekit"  # only shared keys: what a mergekit user brings
    assert detect_format({**mk_plain, "parameters": {"normalize": True}}) == "mergekit"
    assert detect_format({"merge_method": "linear", "models": ["a", "b"]}) == "mergekit"
    assert detect_format({**mk_plain, "parameters": {"scaling": 0.3}}) == "calm-fast"
    assert detect_format({**mk_plain, "include": ["x"]}) == "calm-fast"
    assert detect_format({**mk_plain, "merge_method": "consensus"}) == "calm-fast"
    assert detect_format({**mk_plain, "format": "calm-fast"}) == "calm-fast"
    assert detect_format({"merge_method": "ties", "format": "mergekit", "models": ["a"]}) == "mergekit"
    with pytest.raises(ConfigError, match="mixes mergekit keys"):
        detect_format({**mk_plain, "parameters": {"normalize": True, "scaling": 0.3}})
    with pytest.raises(ConfigError, match="format"):
        detect_format({**mk_plain, "format": "yaml"})


@pytest.mark.parametrize("extra, needle", [
    ({"merge_method": "multislerp"}, "multislerp"),
    ({"merge_method": "sce"}, "'sce' is not supported"),
    ({"tokenizer_source": "union"}, "union"),
    ({"tokenizer": {"source": "base"}}, "tokenizer"),
    ({"chat_template": "chatml"}, "chat_template"),
    ({"parameters": {"normalize": "false"}}, "quoted"),
    ({"parameters": {"t": 0.5}}, "not parameters of mergekit's 'ties'"),
    ({"parameters": {"lambda": float("nan")}}, "finite"),
    ({"models": [{"model": "m1", "parameters": {"weight": [{"filter": "mlp", "value": "x"}]}}]},
     "models[0].parameters.weight"),
])
def test_unsupported_or_invalid_mergekit_configs_are_refused_naming_the_feature(extra, needle):
    data = {"merge_method": "ties", "base_model": "base", "models": ["m1", "m2"], **extra}
    with pytest.raises(ConfigError) as e:
        validate_mergekit(data)
    assert needle in str(e.value)


def test_missing_weight_and_method_contracts_are_clear_errors(zoo, tmp_path):
    wd = zoo / "llama"
    with pytest.raises(ConfigError, match="missing required parameter 'weight'"):
        _run_calm("merge_method: task_arithmetic\nbase_model: base\nmodels: [m1]\n", tmp_path / "o1", wd)
    with pytest.raises(ConfigError, match="slerp"):
        _run_calm("merge_method: slerp\nbase_model: base\nmodels: [m1, m2]\nparameters: {t: 0.5}\n", tmp_path / "o2", wd)
    with pytest.raises(ConfigError, match="passthrough"):
        _run_calm("merge_method: passthrough\nbase_model: base\nmodels: [m1]\n", tmp_path / "o3", wd)
    with pytest.raises(ConfigError, match="at least two models"):
        _run_calm("merge_method: model_stock\nbase_model: base\nmodels: [m1]\n", tmp_path / "o4", wd)
    with pytest.raises(ConfigError, match="base_model is one of this method's inputs"):
        _run_calm("merge_method: linear\nbase_model: base\nmodels: [{model: m1, parameters: {weight: 1.0}}]\n",
                  tmp_path / "o5", wd)
    assert not any(p.name.startswith("o") for p in tmp_path.iterdir())  # nothing written


def _cli(argv, capsys):
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_runs_a_mergekit_config_and_writes_mergekit_s_output_folder(zoo, tmp_path, capsys):
    wd = tmp_path / "w"
    shutil.copytree(zoo / "llama", wd)
    cfg = wd / "merge.yml"
    cfg.write_text(TIES_GRADIENTS)
    out = tmp_path / "merged"
    rc, _, err = _cli(["merge", "-c", str(cfg), "-o", str(out), "--out-dtype", "bfloat16", "-q"], capsys)
    assert rc == 0, err
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "mergekit_config.yml",
            "README.md"} <= names
    conf = json.loads((out / "config.json").read_text())
    assert conf["dtype"] == "bfloat16"
    assert (out / "mergekit_config.yml").read_text() == TIES_GRADIENTS
    assert "ties" in (out / "README.md").read_text()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype="auto")
    assert next(model.parameters()).dtype == torch.bfloat16
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok.convert_tokens_to_ids("t5") == 5
    if HAVE_MERGEKIT:
        ref = _run_mergekit(yaml.safe_load(TIES_GRADIENTS), tmp_path / "mk", wd)
        got = _load(out)
        _assert_bitwise({k: v.to(torch.bfloat16) for k, v in ref.items()}, got)


def test_cli_refuses_calm_fast_method_flags_with_a_mergekit_config(zoo, tmp_path, capsys):
    cfg = tmp_path / "m.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": str(zoo / "llama" / "base"),
                                   "models": [{"model": str(zoo / "llama" / "m1"), "parameters": {"weight": 1.0}}]}))
    rc, _, err = _cli(["merge", "-c", str(cfg), "-o", str(tmp_path / "o"), "--scaling", "0.3"], capsys)
    assert rc == cli.EXIT_USAGE and "--scaling" in err and "mergekit-format" in err
    rc, out, err = _cli(["merge", "-c", str(cfg), "--dry-run"], capsys)
    assert rc == 0 and "mergekit-format merge: method ties" in out
    assert "format: calm-fast" in err  # an ambiguous file is read as mergekit's, never silently
    assert not (tmp_path / "o").exists()


def test_calm_fast_format_config_json_dtype_follows_out_dtype(zoo, tmp_path, capsys):
    """calm-fast's own merge path: --out-dtype bfloat16 must not leave "dtype": "float32" in config.json."""
    wd = zoo / "llama"
    out = tmp_path / "o"
    rc, _, err = _cli(["merge", "--base", str(wd / "base"), "--model", str(wd / "m1"), "-m", "ta",
                       "--out-dtype", "bfloat16", "-o", str(out), "-q"], capsys)
    assert rc == 0, err
    conf = json.loads((out / "config.json").read_text())
    assert conf["dtype"] == "bfloat16"
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype="auto")
    assert next(model.parameters()).dtype == torch.bfloat16


def test_linear_as_a_calm_fast_flag_points_to_the_mergekit_format(zoo, tmp_path, capsys):
    """`--method linear` without a base: the error is about the format, not "no base model"."""
    wd = zoo / "llama"
    rc, _, err = _cli(["merge", "-m", "linear", "--model", str(wd / "m1"), "--model", str(wd / "m2"),
                       "-o", str(tmp_path / "o")], capsys)
    assert rc == cli.EXIT_USAGE and "mergekit-format config" in err and "no base model" not in err


def test_tokenizer_source_with_a_different_vocabulary_is_refused(zoo, tmp_path):
    wd = tmp_path / "w"
    shutil.copytree(zoo / "llama", wd)
    tj = json.loads((wd / "m2" / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    vocab["zz"] = vocab.pop("t7")  # one token renamed: another vocabulary
    (wd / "m2" / "tokenizer.json").write_text(json.dumps(tj))
    text = ("merge_method: task_arithmetic\nbase_model: base\ntokenizer_source: base\n"
            "models: [{model: m1, parameters: {weight: 0.5}}, {model: m2, parameters: {weight: 0.5}}]\n")
    with pytest.raises(ConfigError, match="different vocabulary"):
        _run_calm(text, tmp_path / "o", wd)
    assert not (tmp_path / "o").exists()
