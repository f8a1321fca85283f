"""Print the build stamp of calm_fast's native extension: one hash of everything the compiled modules
depend on (every file under csrc/, setup.py, the torch version, the build switches and the compilers
they pick, the CPU the -march=native code is tuned for).  .ci/setup.sh stores it beside the built
modules and skips the (minutes-long) build while it is unchanged; any change rebuilds.

    python .ci/build_stamp.py [ROOT]      # ROOT: the repository (default: this file's parent folder)
"""
from __future__ import annotations

import hashlib
import os
import platform
import sys
from pathlib import Path
from typing import Mapping, Optional

#: environment variables read by setup.py (or torch's build helpers) that change what is compiled
BUILD_ENV = ("CALM_FAST_CUDA", "CALM_FAST_BUILD_EMU", "CALM_FAST_MARCH", "TORCH_CUDA_ARCH_LIST", "CUDA_HOME",
             "CXX", "CC", "CFLAGS", "CXXFLAGS", "LDFLAGS")


def cpu_signature() -> str:
    """Model name and feature flags of this CPU (the CPU code is compiled with -march=native)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def build_stamp(root: os.PathLike, torch_version: str, env: Optional[Mapping[str, str]] = None,
                cpu: Optional[str] = None) -> str:
    """The stamp (a sha256 hex digest) of the sources under ``root`` for this torch and environment."""
    root = Path(root)
    env = os.environ if env is None else env
    h = hashlib.sha256()

    def add(label: str, data: bytes) -> None:
        h.update(label.encode() + b"\0" + len(data).to_bytes(8, "little") + data)

    files = sorted(p for p in (root / "csrc").rglob("*") if p.is_file()) + [root / "setup.py"]
    for p in files:
        add("file:" + p.relative_to(root).as_posix(), p.read_bytes() if p.exists() else b"<missing>")
    add("torch", torch_version.encode())
    add("python", sys.version.encode())
    for k in BUILD_ENV:
        add("env:" + k, env.get(k, "<unset>").encode())
    cuda_home = env.get("CUDA_HOME")
    nvcc = Path(cuda_home, "bin", "nvcc") if cuda_home else None
    add("nvcc", str(nvcc.stat().st_mtime_ns).encode() if nvcc is not None and nvcc.exists() else b"<none>")
    add("cpu", (cpu if cpu is not None else cpu_signature()).encode())
    return h.hexdigest()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    root = Path(argv[0]) if argv else Path(__file__).resolve().parent.parent
    import torch

    print(build_stamp(root, torch.__version__))
    return 0


if __name__ == "__main__":
    sys.exit(main())
