"""The merge config schema (calm_fast/config.py) through the CLI: strict types, unknown keys, finite
numbers, paths relative to the config file; every bad value exits 2 with a message, never a traceback."""
import os

import pytest
import torch
import yaml

from calm_fast import cli, config, methods
from calm_fast.io import ConfigError, load_state_dict, save_state_dict
from calm_fast.streaming import method_defaults
from calm_fast.streaming.params import _METHOD_ALIASES


def make_models(seed, T=2):
    g = torch.Generator().manual_seed(seed)
    base = {"embed.weight": torch.randn(6, 8, generator=g), "layers.0.w": torch.randn(8, 8, generator=g),
            "layers.1.w": torch.randn(8, 8, generator=g), "ids": torch.arange(5)}
    fts = [{k: (v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v) for k, v in base.items()}
           for _ in range(T)]
    return base, fts


def save_models(folder, seed):
    base, fts = make_models(seed)
    save_state_dict(base, folder / "base")
    for i, f in enumerate(fts):
        save_state_dict(f, folder / f"ft{i}")
    return base, fts


@pytest.fixture
def models(tmp_path):
    base, fts = save_models(tmp_path, 0)
    return base, fts, tmp_path


def run(argv, capsys):
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def write_cfg(folder, extra, name="merge.yaml", text=None):
    # calm-fast's own format (a config with only mergekit's keys is read with mergekit's semantics)
    cfg = {"format": "calm-fast", "merge_method": "ties", "base_model": "base", "models": ["ft0", "ft1"],
           "output": "out"}
    cfg.update(extra)
    p = folder / name
    p.write_text(text if text is not None else yaml.safe_dump(cfg))
    return str(p)


def assert_usage_error(rc, err, *needles):
    assert rc == cli.EXIT_USAGE, err
    assert "internal error" not in err and "Traceback" not in err
    assert err.count("calm-fast: error:") == 1 and len(err.strip().splitlines()) == 1, err  # one paragraph
    for n in needles:
        assert n in err, (n, err)


# ------------------------------------------------------------------------------------------------
# strict types: quoted booleans are strings, never truthy
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, key", [
    ({"trust_pickle": "false"}, "trust_pickle"),
    ({"trust_pickle": "no"}, "trust_pickle"),
    ({"prefetch": "true"}, "prefetch"),
    ({"copy_config": 1}, "copy_config"),
    ({"parameters": {"rescale": "no"}}, "parameters.rescale"),
    ({"merge_method": "dare", "parameters": {"rescale": "false"}}, "parameters.rescale"),
    ({"parameters": {"normalize": "false"}}, "parameters.normalize"),
])
def test_boolean_strings_are_errors(models, capsys, extra, key):
    _, _, d = models
    rc, _, err = run(["merge", "-c", write_cfg(d, extra), "--dry-run"], capsys)
    assert_usage_error(rc, err, key, "boolean")
    assert not (d / "out").exists()


def test_unquoted_yaml_booleans_still_work(models, capsys):
    base, fts, d = models
    rc, _, err = run(["merge", "-c", write_cfg(d, {"merge_method": "dare", "trust_pickle": False,
                                                    "parameters": {"rescale": False, "p": 0.25, "seed": 3}}),
                      "-q"], capsys)
    assert rc == 0, err
    want = methods.dare_merging(base, fts, p=0.25, seed=3, rescale=False)
    got = load_state_dict(d / "out")
    assert all(torch.equal(got[k], want[k]) for k in want)


# ------------------------------------------------------------------------------------------------
# unknown keys, named with the closest valid key
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, where, suggestion", [
    ({"base_modle": "base"}, "base_modle", "base_model"),
    ({"parameters": {"densty": 0.3}}, "parameters.densty", "density"),
    ({"models": [{"modle": "ft0"}, "ft1"]}, "models[0].modle", "model"),
    ({"models": [{"model": "ft0", "parameters": {"wieght": 1.0}}, "ft1"]}, "models[0].parameters.wieght",
     "weight"),
    ({"trust_pickel": True}, "trust_pickel", "trust_pickle"),
])
def test_unknown_keys_are_named_with_a_suggestion(models, capsys, extra, where, suggestion):
    _, _, d = models
    rc, _, err = run(["merge", "-c", write_cfg(d, extra), "--dry-run"], capsys)
    assert_usage_error(rc, err, where, f"did you mean '{suggestion}'")


def test_unknown_filter_entry_key_and_unsupported_mergekit_keys(models, capsys):
    _, _, d = models
    spec = [{"filtr": "layers", "value": 2.0}, {"value": 1.0}]
    rc, _, err = run(["merge", "-c", write_cfg(d, {"models": [{"model": "ft0", "parameters": {"weight": spec}}, "ft1"]}),
                      "--dry-run"], capsys)
    assert_usage_error(rc, err, "filtr", "models[0].parameters.weight")
    rc, _, err = run(["merge", "-c", write_cfg(d, {"slices": []}), "--dry-run"], capsys)
    assert_usage_error(rc, err, "slices", "not supported")
    rc, _, err = run(["merge", "-c", write_cfg(d, {"method": "ta"}), "--dry-run"], capsys)  # alias + key
    assert_usage_error(rc, err, "'method' is an alias of 'merge_method'")


# ------------------------------------------------------------------------------------------------
# numbers: numeric and finite
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, where", [
    ({"parameters": {"scaling": "abc"}}, "parameters.scaling"),
    ({"parameters": {"scaling": "0.5"}}, "parameters.scaling"),
    ({"parameters": {"density": [0.2, "x"]}}, "parameters.density"),
    ({"parameters": {"min_count": 1.5}, "merge_method": "consensus"}, "parameters.min_count"),
    ({"seed": "7"}, "seed"),
    ({"seed": True}, "seed"),
    ({"memory_budget": "lots"}, "memory_budget"),
    ({"shard_size": -5}, "shard_size"),
    ({"models": [{"model": "ft0", "parameters": {"weight": [1.0, "two"]}}, "ft1"]}, "models[0].parameters.weight"),
    ({"models": [{"model": "ft0", "parameters": {"density": "high"}}, "ft1"]}, "models[0].parameters.density"),
    ({"weights": {"layers.0.w": [1.0, "a"]}}, "weights"),
    ({"models": [{"model": 3}, "ft1"]}, "models[0].model"),
    ({"out_dtype": "int32"}, "out_dtype"),
    ({"include": "[unclosed"}, "include"),
    ({"on_mismatch": "ignore"}, "on_mismatch"),
])
def test_non_numeric_and_invalid_values_are_errors(models, capsys, extra, where):
    _, _, d = models
    rc, _, err = run(["merge", "-c", write_cfg(d, extra), "--dry-run"], capsys)
    assert_usage_error(rc, err, where)


@pytest.mark.parametrize("text, where", [
    ("parameters: {scaling: .nan}", "parameters.scaling"),
    ("parameters: {scaling: .inf}", "parameters.scaling"),
    ("parameters: {density: [0.2, .nan]}", "parameters.density"),
    ("merge_method: consensus\nparameters: {tall_lambdas: [0.5, .inf]}", "parameters.tall_lambdas"),
    ("merge_method: consensus\nparameters: {alpha: -.inf}", "parameters.alpha"),
    ("models: [{model: ft0, parameters: {weight: .nan}}, ft1]", "models[0].parameters.weight"),
    ("models: [{model: ft0, parameters: {weight: [{filter: layers, value: .inf}, {value: 1}]}}, ft1]",
     "models[0].parameters.weight"),
    ("weights: [1.0, .nan]", "weights"),
])
def test_nonfinite_numbers_in_the_config_are_errors(models, capsys, text, where):
    _, _, d = models
    head = "base_model: base\nmodels: [ft0, ft1]\noutput: out\n"
    if "merge_method" not in text:
        head = "merge_method: ties\n" + head
    if text.startswith("models:"):
        head = head.replace("models: [ft0, ft1]\n", "")
    rc, _, err = run(["merge", "-c", write_cfg(d, {}, text=head + text + "\n"), "--dry-run"], capsys)
    assert_usage_error(rc, err, where, "finite")


@pytest.mark.parametrize("method, flags, needle", [
    ("ties", ["--scaling", "nan"], "--scaling"),
    ("ties", ["--scaling", "inf"], "--scaling"),
    ("dare", ["--p", "nan"], "--p"),
    ("consensus", ["--alpha=-inf"], "--alpha"),
    ("consensus", ["--tall-lambdas", "0.5,nan"], "tall_lambdas"),
    ("ties", ["--weights", "1,inf"], "--weights"),
    ("ties", ["--density", "0.2,abc"], "--density"),
    ("ties", ["--set", "scaling=.nan"], "scaling"),
    ("dare", ["--set", "rescale=maybe"], "rescale"),
    ("ties", ["--set", "lamda=2"], "did you mean 'lambda'"),
])
def test_invalid_flag_values_exit_2(models, capsys, method, flags, needle):
    _, _, d = models
    rc, _, err = run(["merge", "--base", str(d / "base"), "--model", str(d / "ft0"), "--model", str(d / "ft1"),
                      "-m", method, "--dry-run"] + flags, capsys)
    assert rc == cli.EXIT_USAGE, err
    assert "internal error" not in err and needle in err, err


def test_yaml_12_floats_and_aliases(models, capsys):
    """1e-1 is a number (PyYAML alone reads it as a string); lambda/merge_func/base/out aliases work."""
    base, fts, d = models
    text = ("method: ties\nbase: base\nmodels: [ft0, ft1]\nout: out\n"
            "parameters: {density: 3e-1, lambda: 5e-1, merge_func: mean}\n")
    rc, _, err = run(["merge", "-c", write_cfg(d, {}, text=text), "-q"], capsys)
    assert rc == 0, err
    want = methods.ties_merging(base, fts, density=0.3, scaling=0.5, merge="mean")
    got = load_state_dict(d / "out")
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_duplicate_keys_are_errors(models, capsys):
    _, _, d = models
    text = "merge_method: ties\nbase_model: base\nmodels: [ft0, ft1]\nparameters: {density: 0.2}\n" \
           "parameters: {density: 0.9}\n"
    rc, _, err = run(["merge", "-c", write_cfg(d, {}, text=text), "--dry-run"], capsys)
    assert_usage_error(rc, err, "duplicate key 'parameters'", "line 5")


def test_schema_covers_every_method_parameter():
    """A parameter added to a method must be added to the schema too (or the CLI could not pass it)."""
    fields = set(config.Parameters.model_fields)
    for canonical in {c for c, _ in _METHOD_ALIASES.values()}:
        missing = set(method_defaults(canonical)) - fields
        assert not missing, (canonical, missing)


# ------------------------------------------------------------------------------------------------
# relative paths: against the config file's folder, never the working directory
# ------------------------------------------------------------------------------------------------
def test_relative_paths_resolve_against_the_config_folder(tmp_path, capsys, monkeypatch):
    cfg_dir, cwd = tmp_path / "project", tmp_path / "elsewhere"
    cfg_dir.mkdir()
    cwd.mkdir()
    base, fts = save_models(cfg_dir, seed=1)
    save_models(cwd, seed=2)  # decoys with the same relative names in the working directory
    path = write_cfg(cfg_dir, {"parameters": {"density": 0.5}})
    monkeypatch.chdir(cwd)
    rc, _, err = run(["merge", "-c", path, "-q"], capsys)
    assert rc == 0, err
    assert (cfg_dir / "out").is_dir() and not (cwd / "out").exists()  # the output too
    want = methods.ties_merging(base, fts, density=0.5)
    got = load_state_dict(cfg_dir / "out")
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    # a relative --config path: the same folder is the anchor
    rc, _, err = run(["merge", "-c", os.path.relpath(path, cwd), "-o", "flag_out", "-q"], capsys)
    assert rc == 0, err
    # ... but a path given as a flag is relative to the working directory, as usual
    assert (cwd / "flag_out").is_dir() and not (cfg_dir / "flag_out").exists()
    got = load_state_dict(cwd / "flag_out")
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_relative_base_missing_next_to_the_config_is_an_input_error(tmp_path, capsys, monkeypatch):
    """Even when the working directory has a `base`, a config naming `base` reads only its own folder's."""
    cfg_dir, cwd = tmp_path / "project", tmp_path / "elsewhere"
    cfg_dir.mkdir()
    cwd.mkdir()
    save_models(cwd, seed=2)
    path = write_cfg(cfg_dir, {})
    monkeypatch.chdir(cwd)
    rc, _, err = run(["merge", "-c", path, "--dry-run"], capsys)
    assert rc == cli.EXIT_INPUT, err
    assert str(cfg_dir / "base") in err


def test_load_config_api(tmp_path):
    path = write_cfg(tmp_path, {"parameters": {"lambda": 1, "k": 2}, "max_shard_size": "1MB"})
    cfg = config.load_config(path)
    assert cfg.base_model == str(tmp_path / "base") and cfg.output == str(tmp_path / "out")
    assert [m.model for m in cfg.models] == [str(tmp_path / "ft0"), str(tmp_path / "ft1")]
    assert cfg.parameters.scaling == 1.0 and isinstance(cfg.parameters.scaling, float)
    assert cfg.parameters.min_count == 2 and cfg.shard_size == "1MB"
    with pytest.raises(ConfigError, match="rescale"):
        config.validate_parameters({"rescale": "yes"})


def test_readme_and_docstring_examples_validate():
    """The YAML examples users copy (README, `calm-fast merge --help`) pass the schema."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", readme, re.S)
    assert blocks
    from calm_fast import cli_methods
    from calm_fast.mergekit_config import detect_format, validate_mergekit

    formats = set()
    for b in blocks:  # each example passes the schema of the format its keys select
        data = config.parse_yaml(b)
        if cli_methods.handles(data.get("merge_method")):
            continue  # calm / doge_ta / AdaMerging have their own schema (checked in tests/test_cli_calm.py)
        formats.add(detect_format(data))
        (validate_mergekit if detect_format(data) == "mergekit" else config.validate_config)(data)
    assert formats == {"calm-fast", "mergekit"}
    doc = cli.__doc__.split("YAML schema")[1].split("Other commands:")[0]
    example = "\n".join(line[4:] for line in doc.splitlines() if line.startswith("    "))
    cfg = config.validate_config(config.parse_yaml(example))
    assert cfg.trust_pickle is False and cfg.parameters.merge == "sum" and cfg.weights == [1.0, 0.5]


def test_merge_help_documents_the_schema(capsys):
    with pytest.raises(SystemExit):
        cli.make_parser().parse_args(["merge", "--help"])
    out = capsys.readouterr().out
    for needle in ("trust_pickle", "relative to the file's folder", "on_mismatch", "unknown keys"):
        assert needle in out, needle
