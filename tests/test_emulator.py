"""Self-tests of the CUDA-on-CPU emulator (csrc/testing/cuda_emu.h) and of csrc/cuda/block_ops.cuh.

Each csrc/testing/selftest/*.cpp is a plain g++ program (no torch).  They are compiled with
``g++ -std=c++20 -O1 -I csrc -DCALM_FAST_EMULATE_CUDA`` into a cache directory keyed by the hash of the
sources, the headers and the compiler, so a second run of the suite compiles nothing.  The cache is
``$CALM_FAST_EMU_SELFTEST_CACHE`` or ``<tmp>/calm_fast_emu_selftest``.

* emu_good: correct kernels must give exact results in every scheduling order and in strict mode.
* emu_bad:  broken kernels must be caught (a wrong result under a permuted order, or an abort with a
            message that names the problem).
* nvcc_block_ops.cu: block_ops.cuh compiles with nvcc (skipped without nvcc) and under the emulator.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
SELFTEST = CSRC / "testing" / "selftest"
GXX_FLAGS = ["-std=c++20", "-O1", "-I", str(CSRC), "-DCALM_FAST_EMULATE_CUDA"]
RUN_TIMEOUT_S = 300

GXX = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++")
pytestmark = pytest.mark.skipif(GXX is None, reason="g++ not found")


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.access(os.path.join(home, "bin", "nvcc"), os.X_OK):
            return os.path.join(home, "bin", "nvcc")
    return None


def _cache_dir() -> Path:
    d = Path(os.environ.get("CALM_FAST_EMU_SELFTEST_CACHE") or Path(tempfile.gettempdir()) / "calm_fast_emu_selftest")
    d.mkdir(parents=True, exist_ok=True)
    return d


def _tool_version(tool: str) -> bytes:
    try:
        return subprocess.run([tool, "--version"], capture_output=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return b""


def _build_key(source: Path, tool: str, flags: list[str]) -> str:
    h = hashlib.sha256()
    h.update(_tool_version(tool))
    h.update(" ".join(flags).encode())
    deps = [source, *sorted(SELFTEST.glob("*.h")), *sorted((CSRC / "testing").glob("*.h")),
            *sorted((CSRC / "cuda").glob("*.cuh")), *sorted((CSRC / "common").glob("*.h"))]
    for p in deps:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:20]


def _build(source: Path, tool: str, flags: list[str], out_suffix: str) -> Path:
    """Compile (or reuse) `source`; returns the output path.  Safe under parallel test runners."""
    key = _build_key(source, tool, flags)
    out = _cache_dir() / f"{source.stem}-{key}{out_suffix}"
    if out.exists():
        return out
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    cmd = [tool, *flags, str(source), "-o", str(tmp)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"compile failed: {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
    os.replace(tmp, out)
    return out


@pytest.fixture(scope="session")
def emu_good() -> Path:
    return _build(SELFTEST / "emu_good.cpp", GXX, GXX_FLAGS, "")


@pytest.fixture(scope="session")
def emu_bad() -> Path:
    return _build(SELFTEST / "emu_bad.cpp", GXX, GXX_FLAGS, "")


def _run(exe: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CALM_FAST_EMU_")}
    full_env.update(env)
    return subprocess.run([str(exe), *args], capture_output=True, text=True, env=full_env, timeout=RUN_TIMEOUT_S)


def _aborted(proc: subprocess.CompletedProcess) -> bool:
    return proc.returncode == -signal.SIGABRT


# ---------------------------------------------------------------------------------------------------
# Correct kernels
# ---------------------------------------------------------------------------------------------------
GOOD_CASES = {
    "block_reduce", "grid_stride", "ballot_count", "histogram", "partial_warp", "shuffle_semantics",
    "vote_match_reduce", "block_scan", "block_select", "block_minmax", "atomics", "geometry_and_params",
    "dynamic_shared", "launch_config_errors", "throw_mode_recovers", "bit_and_float_intrinsics",
}

SCHEDULES = {
    "inorder": {},
    "permute:1": {"CALM_FAST_EMU_ORDER": "permute:1"},
    "permute:2": {"CALM_FAST_EMU_ORDER": "permute:2"},
    "reverse": {"CALM_FAST_EMU_ORDER": "reverse"},
    "strict": {"CALM_FAST_EMU_STRICT": "1"},
    "strict+permute:3": {"CALM_FAST_EMU_STRICT": "1", "CALM_FAST_EMU_ORDER": "permute:3"},
}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_correct_kernels_are_exact(emu_good, schedule):
    proc = _run(emu_good, **SCHEDULES[schedule])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    passed = {line.split()[1] for line in proc.stdout.splitlines() if line.startswith("PASS ")}
    assert passed == GOOD_CASES, proc.stdout


def test_block_reduction_speed(emu_good):
    """A reduction over 2^20 floats, 4096 blocks of 256 threads (one element each), well under 1 s."""
    proc = _run(emu_good, "--bench")
    assert proc.returncode == 0 and "BENCH_OK" in proc.stdout, proc.stdout + proc.stderr
    times = dict(re.findall(r"^BENCH (\S+) ([0-9.]+) s$", proc.stdout, re.M))
    hand = float(times["reduce_2^20_hand_shfl_smem_4096x256"])
    print(proc.stdout)
    assert hand < 1.0, proc.stdout


# ---------------------------------------------------------------------------------------------------
# Broken kernels
# ---------------------------------------------------------------------------------------------------
def test_missing_barrier_is_caught_by_a_permuted_order(emu_bad):
    # Each thread reads its lower neighbour's shared-memory slot without a barrier.  The in-order
    # schedule runs writers first and cannot see it; permuted orders must.
    inorder = _run(emu_bad, "missing_barrier")
    assert inorder.returncode == 0 and "RESULT ok" in inorder.stdout, inorder.stdout + inorder.stderr
    detected = []
    for seed in (1, 2):
        proc = _run(emu_bad, "missing_barrier", CALM_FAST_EMU_ORDER=f"permute:{seed}")
        detected.append(_aborted(proc) or "RESULT wrong" in proc.stdout)
    assert any(detected), detected


def test_divergent_syncthreads_aborts_in_strict_mode(emu_bad):
    relaxed = _run(emu_bad, "divergent_syncthreads")  # exited threads count as arrived, like hardware
    assert relaxed.returncode == 0 and "RESULT done" in relaxed.stdout, relaxed.stderr
    for order in ("inorder", "permute:1"):
        proc = _run(emu_bad, "divergent_syncthreads", CALM_FAST_EMU_STRICT="1", CALM_FAST_EMU_ORDER=order)
        assert _aborted(proc), (proc.returncode, proc.stdout, proc.stderr)
        assert "strict mode" in proc.stderr and "__syncthreads" in proc.stderr
        assert "64 of the block's 128 threads exited" in proc.stderr
        assert re.search(r"block \(\d+,0,0\)", proc.stderr)
        assert "half_barrier_kernel" in proc.stderr


def test_barriers_at_different_sites_abort_in_strict_mode(emu_bad):
    assert "RESULT done" in _run(emu_bad, "barrier_sites").stdout
    proc = _run(emu_bad, "barrier_sites", CALM_FAST_EMU_STRICT="1")
    assert _aborted(proc) and "different barriers" in proc.stderr, proc.stderr


@pytest.mark.parametrize("order", ["inorder", "permute:1", "permute:2"])
def test_shuffle_naming_an_exited_lane_aborts(emu_bad, order):
    proc = _run(emu_bad, "shfl_exited_lane", CALM_FAST_EMU_ORDER=order)
    assert _aborted(proc), (proc.returncode, proc.stdout, proc.stderr)
    assert "RESULT" not in proc.stdout
    assert re.search(r"lane 5 of warp \d+.*exited|exited lane 5", proc.stderr), proc.stderr
    assert "block (0,0,0)" in proc.stderr and "__shfl_sync" in proc.stderr


@pytest.mark.parametrize("order", ["inorder", "permute:1"])
def test_lanes_of_one_mask_in_different_intrinsics_abort(emu_bad, order):
    proc = _run(emu_bad, "mixed_intrinsics", CALM_FAST_EMU_ORDER=order)
    assert _aborted(proc), proc.stderr
    assert "different intrinsics" in proc.stderr
    assert "__shfl_sync" in proc.stderr and "__ballot_sync" in proc.stderr


@pytest.mark.parametrize("case", ["deadlock", "warp_barrier_deadlock"])
@pytest.mark.parametrize("strict", ["0", "1"])
def test_deadlock_always_aborts(emu_bad, case, strict):
    proc = _run(emu_bad, case, CALM_FAST_EMU_STRICT=strict)
    assert _aborted(proc), (proc.returncode, proc.stdout, proc.stderr)
    assert "deadlock" in proc.stderr and "__syncthreads" in proc.stderr


@pytest.mark.parametrize(
    "case, message",
    [
        ("mask_without_self", "must include the calling lane"),
        ("nonexistent_lane", "lane 16 of warp 1, which does not exist"),
        ("bad_width", "width 12 is not a power of two"),
        ("trap", "called __trap()"),
    ],
)
def test_other_misuse_aborts(emu_bad, case, message):
    proc = _run(emu_bad, case)
    assert _aborted(proc), (proc.returncode, proc.stdout, proc.stderr)
    assert message in proc.stderr


# ---------------------------------------------------------------------------------------------------
# block_ops.cuh compiles with both compilers
# ---------------------------------------------------------------------------------------------------
def test_block_ops_compile_under_emulator():
    _build(SELFTEST / "nvcc_block_ops.cu", GXX, ["-x", "c++", *GXX_FLAGS, "-Wall", "-Wextra", "-Werror", "-c"], ".o")


def test_block_ops_compile_with_nvcc():
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    _build(SELFTEST / "nvcc_block_ops.cu", nvcc, ["-std=c++17", "-I", str(CSRC), "-c"], ".o")
