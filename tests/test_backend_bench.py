"""backend() vs cuda_kernels_built()/cuda_available(), `calm-fast bench`, and .ci/setup.sh's build stamp."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import calm_fast
from calm_fast import cli

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------
# backend reporting: a build fact (CUDA kernels compiled) is not a machine fact (a GPU is visible)
# ------------------------------------------------------------------------------------------------
def test_cuda_kernels_built_is_what_the_extension_says():
    assert calm_fast.cuda_kernels_built() == ("cuda kernels: yes" in calm_fast.build_info())


def test_backend_without_a_gpu_is_native_cpu(monkeypatch):
    built = calm_fast.cuda_kernels_built()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert calm_fast.backend() == "native-cpu"  # whatever was compiled: nothing runs on a GPU here
    assert calm_fast.cuda_available() is False
    assert calm_fast.cuda_kernels_built() == built  # the build fact does not change
    info = calm_fast.backend_info()
    assert info == {"backend": "native-cpu", "cuda_kernels_built": built, "cuda_available": False,
                    "build_info": calm_fast.build_info()}


def test_backend_with_a_gpu_depends_on_the_build(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    built = calm_fast.cuda_kernels_built()
    assert calm_fast.backend() == ("native-cuda" if built else "native-cpu")
    assert calm_fast.cuda_available() == built


def test_backend_matches_this_machine():
    want = "native-cuda" if calm_fast.cuda_kernels_built() and torch.cuda.is_available() else "native-cpu"
    assert calm_fast.backend() == want


def test_version_line_says_both(capsys):
    assert cli.main(["--version"]) == 0
    out = capsys.readouterr().out
    assert f"backend {calm_fast.backend()}" in out and "CUDA kernels" in out and "GPU" in out


# ------------------------------------------------------------------------------------------------
# calm-fast bench
# ------------------------------------------------------------------------------------------------
def test_bench_runs_on_tiny_sizes(tmp_path, capsys):
    out = tmp_path / "sub" / "bench.json"
    rc = cli.main(["bench", "--n", "3000", "--tasks", "2", "--repeat", "1", "--no-memory", "--out", str(out)])
    stdout, err = capsys.readouterr()
    assert rc == 0, err
    for op in ("threshold (1 task)", "ties (threshold + merge)", "task arithmetic", "consensus (TALL k=2)",
               "calm binarize merge"):
        assert f"| {op} | 3,000 | 2 | float32 |" in stdout
    data = json.loads(out.read_text())
    assert data["args"]["n"] == 3000 and len(data["rows"]) == 11
    assert data["machine"]["backend"] == calm_fast.backend()
    assert all(r["seconds"] > 0 for r in data["rows"])


def test_bench_flags_and_errors(capsys):
    assert cli.main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--n" in out and "1,000,000" in out and "--tasks" in out
    assert cli.main(["bench", "--n", "0"]) == cli.EXIT_USAGE
    capsys.readouterr()
    if not torch.cuda.is_available():
        assert cli.main(["bench", "--device", "cuda", "--n", "100"]) == cli.EXIT_USAGE
        assert "no CUDA device" in capsys.readouterr().err


def test_bench_is_listed_in_help_and_the_source_tree_wrapper_keeps_vit_defaults(capsys):
    cli.main([])
    assert "bench" in capsys.readouterr().out
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py"), "--help"], capture_output=True,
                       text=True, cwd=str(ROOT), env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr
    assert "88,000,000" in r.stdout and "22000000" in r.stdout


# ------------------------------------------------------------------------------------------------
# .ci/setup.sh's build stamp
# ------------------------------------------------------------------------------------------------
def _stamp_module():
    spec = importlib.util.spec_from_file_location("build_stamp", ROOT / ".ci" / "build_stamp.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_build_stamp_changes_with_every_input(tmp_path):
    bs = _stamp_module()
    (tmp_path / "csrc" / "cpu").mkdir(parents=True)
    (tmp_path / "csrc" / "cpu" / "merge_cpu.cpp").write_text("int f() { return 1; }\n")
    (tmp_path / "csrc" / "schemas.h").write_text("// schemas\n")
    (tmp_path / "setup.py").write_text("setup()\n")
    env = {"CALM_FAST_BUILD_EMU": "1"}

    def stamp(**kw):
        return bs.build_stamp(tmp_path, kw.get("torch", "2.14.1"), kw.get("env", env), cpu="cpu-a")

    s0 = stamp()
    assert stamp() == s0  # deterministic: an unchanged tree skips the build
    (tmp_path / "csrc" / "cpu" / "merge_cpu.cpp").write_text("int f() { return 2; }\n")
    s1 = stamp()
    assert s1 != s0  # a source edit rebuilds
    (tmp_path / "csrc" / "cpu" / "new.cu").write_text("\n")
    s2 = stamp()
    assert s2 not in (s0, s1)  # a new file rebuilds
    (tmp_path / "csrc" / "cpu" / "new.cu").rename(tmp_path / "csrc" / "cpu" / "renamed.cu")
    assert stamp() not in (s0, s1, s2)  # so does a rename
    (tmp_path / "csrc" / "cpu" / "renamed.cu").unlink()
    assert stamp() == s1
    (tmp_path / "setup.py").write_text("setup(ext_modules=[])\n")
    s3 = stamp()
    assert s3 != s1  # setup.py
    assert stamp(torch="2.15.0") != s3  # another torch
    assert stamp(env={"CALM_FAST_BUILD_EMU": "0"}) != s3  # another build switch
    assert stamp(env=dict(env, CALM_FAST_CUDA="0")) != s3
    assert bs.build_stamp(tmp_path, "2.14.1", env, cpu="cpu-b") != s3  # -march=native on another CPU


def test_build_stamp_script_prints_one_digest():
    r = subprocess.run([sys.executable, str(ROOT / ".ci" / "build_stamp.py"), str(ROOT)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip()) == 64 and int(r.stdout, 16) >= 0
