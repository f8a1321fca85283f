"""The ``gen`` fixture draws the same data in every process (so a data-dependent failure replays), prints
its seed when a test fails, and takes an override from the environment."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from conftest import SEED_ENV, data_seed

ROOT = Path(__file__).resolve().parents[1]

_PROBE = '''
def test_probe(gen):
    import torch
    print("DRAWS", torch.randint(0, 2**31 - 1, (4,), generator=gen).tolist())
    assert False, "deliberate failure (the seed section must be printed)"
'''


def _run_probes(tmp_path: Path, hashseeds) -> list:
    """Run a one-test pytest session (with this suite's conftest) in fresh interpreters, one per hash salt,
    concurrently; their outputs."""
    procs = []
    for h in hashseeds:
        # a stub calm_fast package in tmp_path: the probe needs the conftest, not the extension (faster start)
        env = dict(os.environ, PYTHONHASHSEED=h, PYTHONPATH=str(tmp_path), PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
        env.pop(SEED_ENV, None)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
             str(tmp_path / "test_probe.py")], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True))
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 1, out  # the probe fails on purpose
        outs.append(out)
    return outs


def _draws(out: str):
    line = next(l for l in out.splitlines() if l.startswith("DRAWS"))
    return eval(line[len("DRAWS"):])  # a list of ints printed by the probe


def test_seed_is_stable_across_processes_and_printed(tmp_path):
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_probe.py").write_text(_PROBE)
    (tmp_path / "calm_fast").mkdir()
    (tmp_path / "calm_fast" / "__init__.py").write_text("")
    # two interpreters with different hash salts (the old seed, hash(test id), differed between them)
    a, b = _run_probes(tmp_path, ["1", "2"])
    assert _draws(a) == _draws(b)
    seed = data_seed("test_probe.py::test_probe")
    for out in (a, b):
        assert "calm_fast test seed" in out and f"gen seed {seed}" in out, out
    # the printed seed replays the data
    assert _draws(a) == torch.randint(0, 2**31 - 1, (4,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_seed_override_from_environment(request, monkeypatch):
    monkeypatch.setenv(SEED_ENV, "12345")
    g = request.getfixturevalue("gen")
    want = torch.Generator().manual_seed(12345)
    assert torch.equal(torch.randn(8, generator=g), torch.randn(8, generator=want))


def test_seeds_differ_between_tests():
    assert data_seed("tests/test_a.py::test_x[0]") != data_seed("tests/test_a.py::test_x[1]")
