"""benchmarks/gpu_check.sh cannot run here (no GPU); its dry run must list every step."""
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_dry_run_lists_every_step(tmp_path):
    out = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "--dry-run"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, env=dict(os.environ, GPU_CHECK_OUT=str(tmp_path)))
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for needle in ["nvidia-smi", "CALM_FAST_CUDA=1", "pytest -q -x", "--tool memcheck", "--tool racecheck",
                   "report.py --device cuda", "--dtype bfloat16", "nothing was executed"]:
        assert needle in text, needle
    assert list(tmp_path.iterdir()) == []  # a dry run writes nothing
