"""The calm-fast command line: merge (flags, YAML, dry run), exit codes, demo, extension hook."""
import json
import subprocess
import sys
import types

import pytest
import torch
import yaml

from calm_fast import cli, methods
from calm_fast.io import load_state_dict, save_state_dict


def make_models(T=2, seed=0, vocab=12):
    g = torch.Generator().manual_seed(seed)
    base = {"embed.weight": torch.randn(vocab, 8, generator=g), "layers.0.w": torch.randn(8, 8, generator=g),
            "layers.1.w": torch.randn(8, 8, generator=g), "head.weight": torch.randn(4, 8, generator=g),
            "ids": torch.arange(5)}
    fts = [{k: (v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v) for k, v in base.items()}
           for _ in range(T)]
    return base, fts


@pytest.fixture
def models(tmp_path):
    base, fts = make_models()
    save_state_dict(base, tmp_path / "base")
    paths = []
    for i, f in enumerate(fts):
        save_state_dict(f, tmp_path / f"ft{i}")
        paths.append(str(tmp_path / f"ft{i}"))
    return base, fts, str(tmp_path / "base"), paths


def run(argv, capsys):
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def assert_same(got, want):
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def test_merge_with_flags(tmp_path, models, capsys):
    base, fts, bp, mp = models
    out = tmp_path / "out"
    rc, stdout, err = run(["merge", "--base", bp, "--model", mp[0], "--model", mp[1], "--method", "ties",
                           "--density", "0.3", "--merge", "mean", "--scaling", "0.7", "-o", str(out),
                           "--memory-budget", "2KiB", "--json", str(tmp_path / "r.json")], capsys)
    assert rc == 0, err
    assert_same(load_state_dict(out), methods.ties_merging(base, fts, density=0.3, merge="mean", scaling=0.7))
    for phase in ("read", "select", "merge", "write", "total"):
        assert phase in stdout
    info = json.loads((tmp_path / "r.json").read_text())
    assert info["method"] == "ties_merging" and info["passes"] == 2 and info["params"]["density"] == 0.3
    # --set for any parameter, --weights, --out-dtype
    rc, _, err = run(["merge", "--base", bp, "--model", mp[0], "--model", mp[1], "-m", "dare", "--set", "p=0.25",
                      "--seed", "5", "--weights", "1,0.5", "--out-dtype", "bf16", "-o", str(tmp_path / "o2"), "-q"],
                     capsys)
    assert rc == 0, err
    assert_same(load_state_dict(tmp_path / "o2"),
                methods.dare_merging(base, fts, p=0.25, seed=5, weights=[1.0, 0.5], out_dtype=torch.bfloat16))


def test_merge_with_yaml_config(tmp_path, models, capsys):
    base, fts, bp, mp = models
    cfg = {
        "merge_method": "ties",
        "base_model": "base",  # relative to the config file
        "models": [{"model": "ft0", "parameters": {"weight": [0.0, 1.0], "density": 0.5}},
                   {"model": "ft1", "parameters": {"weight": [{"filter": "layers.1", "value": 2.0}, {"value": 1.0}]}}],
        "parameters": {"density": 0.3, "merge": "sum", "lambda": 0.5},
        "exclude": ["^head"],
        "out_dtype": "float32",
    }
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(cfg))
    rc, out, err = run(["merge", "--config", str(tmp_path / "merge.yaml"), "-o", str(tmp_path / "o"),
                        "--no-progress"], capsys)
    assert rc == 0, err
    got = load_state_dict(tmp_path / "o")
    # per-model density is a calm_fast.streaming extension: check it against per-task equal densities when
    # they coincide, and the weights resolution against the in-memory mapping form
    from calm_fast.streaming import weight_for

    specs = [m["parameters"]["weight"] for m in cfg["models"]]
    keys = sorted(k for k in base if base[k].is_floating_point() and not k.startswith("head"))
    mapping = {k: [weight_for(s, k, 2) for s in specs] for k in keys}
    assert mapping["layers.1.w"] == [1.0, 2.0] and mapping["layers.0.w"] == [0.0, 1.0]
    cfg["models"][0]["parameters"]["density"] = 0.3
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(cfg))
    rc, _, err = run(["merge", "-c", str(tmp_path / "merge.yaml"), "-o", str(tmp_path / "o2"), "-q"], capsys)
    assert rc == 0, err
    want = methods.ties_merging(base, fts, density=0.3, merge="sum", scaling=0.5, weights=mapping, exclude=["^head"])
    assert_same(load_state_dict(tmp_path / "o2"), want)
    assert any(not torch.equal(got[k], want[k]) for k in keys)  # density 0.5 for model 0 did change things
    # flags override the file
    rc, _, err = run(["merge", "-c", str(tmp_path / "merge.yaml"), "-o", str(tmp_path / "o3"), "-q",
                      "--scaling", "1.0"], capsys)
    assert rc == 0, err
    want = methods.ties_merging(base, fts, density=0.3, merge="sum", scaling=1.0, weights=mapping, exclude=["^head"])
    assert_same(load_state_dict(tmp_path / "o3"), want)


def test_dry_run(tmp_path, models, capsys):
    base, fts, bp, mp = models
    rc, out, err = run(["merge", "--base", bp, "--model", mp[0], "--model", mp[1], "-m", "ties", "-o",
                        str(tmp_path / "never"), "--dry-run"], capsys)
    assert rc == 0, err
    assert "memory estimate" in out and "passes over the inputs: 2" in out and "nothing was written" in out
    assert not (tmp_path / "never").exists()


def test_exit_codes(tmp_path, models, capsys):
    base, fts, bp, mp = models
    common = ["--model", mp[0], "--model", mp[1], "-o", str(tmp_path / "o")]
    rc, _, err = run(["merge", "--base", str(tmp_path / "nope"), "-m", "ta"] + common, capsys)
    assert rc == cli.EXIT_INPUT and "nope" in err
    rc, _, err = run(["merge", "--base", bp, "-m", "frankenmerge"] + common, capsys)
    assert rc == cli.EXIT_USAGE and "unknown merge method" in err
    rc, _, err = run(["merge", "--base", bp, "-m", "slerp"] + common, capsys)  # mergekit's: only in its format
    assert rc == cli.EXIT_USAGE and "mergekit-format config" in err
    rc, _, err = run(["merge", "--base", bp, "-m", "ta", "--model", mp[0]], capsys)
    assert rc == cli.EXIT_USAGE and "no output" in err
    rc, _, err = run(["merge", "--base", bp, "-m", "ta", "--merge", "median"] + common, capsys)
    assert rc == cli.EXIT_USAGE  # argparse choices
    (tmp_path / "bad.yaml").write_text("merge_method: ties\nbase_model: x\nmodels: [a]\nslices: []\n")
    rc, _, err = run(["merge", "-c", str(tmp_path / "bad.yaml"), "-o", "x"], capsys)
    assert rc == cli.EXIT_USAGE and "slices" in err
    (tmp_path / "bad2.yaml").write_text("merge_method: ties\nbase_modle: x\n")
    rc, _, err = run(["merge", "-c", str(tmp_path / "bad2.yaml"), "-o", "x"], capsys)
    assert rc == cli.EXIT_USAGE and "base_modle" in err
    # success, then the output exists
    rc, _, err = run(["merge", "--base", bp, "-m", "ta", "-q"] + common, capsys)
    assert rc == 0, err
    rc, _, err = run(["merge", "--base", bp, "-m", "ta", "-q"] + common, capsys)
    assert rc == cli.EXIT_OUTPUT and "--overwrite" in err
    rc, _, err = run(["merge", "--base", bp, "-m", "ta", "-q", "--overwrite"] + common, capsys)
    assert rc == 0, err
    # inf/NaN
    bad = dict(fts[1])
    bad["layers.1.w"] = bad["layers.1.w"].clone()
    bad["layers.1.w"][0, 0] = float("inf")
    save_state_dict(bad, tmp_path / "bad_ft")
    rc, _, err = run(["merge", "--base", bp, "--model", mp[0], "--model", str(tmp_path / "bad_ft"), "-m", "ta",
                      "-o", str(tmp_path / "o5")], capsys)
    assert rc == cli.EXIT_NONFINITE and "layers.1.w" in err


def test_mismatch_exit_code_and_policies(tmp_path, models, capsys):
    base, fts, bp, mp = models
    big = dict(fts[1])
    big["embed.weight"] = torch.cat([big["embed.weight"], torch.zeros(3, 8)])
    save_state_dict(big, tmp_path / "big")
    argv = ["merge", "--base", bp, "--model", mp[0], "--model", str(tmp_path / "big"), "-m", "ties"]
    rc, _, err = run(argv + ["-o", str(tmp_path / "o")], capsys)
    assert rc == cli.EXIT_MISMATCH
    assert "embed.weight" in err and "(15, 8)" in err and "--on-mismatch" in err
    assert not (tmp_path / "o").exists()
    for policy, shape in (("pad", (15, 8)), ("truncate", (12, 8)), ("skip", (12, 8))):
        rc, out, err = run(argv + ["-o", str(tmp_path / policy), "--on-mismatch", policy, "-q"], capsys)
        assert rc == 0, err
        assert "mismatch:" in err and "embed.weight" in err  # printed even with --quiet
        assert load_state_dict(tmp_path / policy)["embed.weight"].shape == shape


def test_demo(capsys):
    rc, out, err = run(["demo-synthetic", "--models", "2"], capsys)
    assert rc == 0, err
    assert "bit for bit" in out
    for name in ("task_arithmetic", "ties_merging", "dare_merging", "consensus_merging"):
        assert name in out


def test_extension_hook(monkeypatch, capsys):
    monkeypatch.setitem(cli.EXTERNAL_COMMANDS, "bench", "calm_fast_no_such_module_xyz")
    rc, _, err = run(["bench", "--quick"], capsys)
    assert rc == cli.EXIT_USAGE and "not available" in err
    seen = {}
    fake = types.ModuleType("fake_bench")
    fake.main = lambda argv: seen.setdefault("argv", argv) and 0
    monkeypatch.setitem(sys.modules, "fake_bench", fake)
    monkeypatch.setitem(cli.EXTERNAL_COMMANDS, "bench", "fake_bench")
    rc, _, _ = run(["bench", "--quick", "x"], capsys)
    assert rc == 0 and seen["argv"] == ["--quick", "x"]


def test_version_and_module_entry_point(capsys):
    rc, out, _ = run(["--version"], capsys)
    assert rc == 0 and "calm-fast" in out and "torch" in out
    rc, _, _ = run([], capsys)
    assert rc == cli.EXIT_USAGE
    r = subprocess.run([sys.executable, "-m", "calm_fast.cli", "merge", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--on-mismatch" in r.stdout and "--dry-run" in r.stdout


def test_sigterm_mid_merge_cleans_up(tmp_path):
    """A terminated merge (SIGTERM, as from a job scheduler) exits 130 and leaves no output at all."""
    import os
    import signal
    import time

    g = torch.Generator().manual_seed(0)
    base = {f"w{i}": torch.randn(64 * 1024, generator=g) for i in range(32)}
    save_state_dict(base, tmp_path / "base")
    for t in range(2):
        save_state_dict({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}, tmp_path / f"ft{t}")
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "calm_fast.cli", "merge", "--base", str(tmp_path / "base"),
                             "--model", str(tmp_path / "ft0"), "--model", str(tmp_path / "ft1"), "-m", "ties",
                             "-o", str(out), "--memory-budget", "8KiB", "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    def staged():  # the hidden staging folder beside the output holds the shard being written
        return [d for d in tmp_path.glob(".out.calm-fast-tmp-*") if any(d.iterdir())]

    while time.time() < deadline and not staged():
        time.sleep(0.01)
    assert proc.poll() is None, "the merge finished before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == cli.EXIT_INTERRUPTED, err
    assert "interrupted" in err
    assert not out.exists()
    assert not list(tmp_path.glob(".out*"))  # staging folder and lock removed
