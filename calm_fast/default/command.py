"""``calm-fast demo``: the embedded default (real encoder, real tasks, every method) from the command line."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from .assets import AssetMissing
from .profiles import PROFILES, get_profile
from .tasks import TASKS, TaskError

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_MISSING = 0, 1, 2, 3


def default_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "calm-fast" / "default"


def make_parser() -> argparse.ArgumentParser:
    from .methods import METHODS

    p = argparse.ArgumentParser(
        prog="calm-fast demo",
        description="Fine-tune the all-MiniLM-L6-v2 encoder on real text tasks (cached), merge the task "
                    "vectors with every method, and print per-task test accuracy; writes a JSON record and a "
                    "PNG heat map.  Offline: the encoder and the data come from installed packages.")
    p.add_argument("--profile", default="default", choices=list(PROFILES),
                   help="quick: seconds (3 tasks, tiny subsets); default: 8 tasks, about 10 minutes the first "
                        "time on an idle 2-core CPU (more under load), then 2-3 minutes (checkpoints cached); "
                        "full: all layers, more data and steps, the paper's CALM budget (hours on a CPU)")
    p.add_argument("--dir", help=f"cache and output folder (default {default_dir()})")
    p.add_argument("--tasks", help=f"comma-separated subset of: {', '.join(TASKS)}")
    p.add_argument("--methods", help=f"comma-separated subset of: {', '.join(METHODS)}")
    p.add_argument("--threads", type=int, help="torch threads (default: the profile's, 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="tracebacks on errors")
    return p


def _split(s: Optional[str]) -> Optional[List[str]]:
    return [x.strip() for x in s.split(",") if x.strip()] if s else None


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = make_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:
        return int(e.code or 0)
    try:
        import dataclasses

        from .report import table, write_json, write_plot
        from .runner import run

        profile = get_profile(args.profile)
        if args.threads is not None:
            if args.threads < 1:
                raise ValueError("--threads must be at least 1")
            profile = dataclasses.replace(profile, threads=args.threads)
        root = Path(args.dir) if args.dir else default_dir()
        record = run(profile, root, tasks=_split(args.tasks), methods=_split(args.methods),
                     progress=not args.no_progress)
        print(table(record))
        out = root / f"results-{profile.name}"
        write_json(record, out.with_suffix(".json"))
        write_plot(record, out.with_suffix(".png"))
        print(f"total {record['total_seconds']:.1f}s wall, {record['cpu_seconds']:.1f}s CPU (fine-tuning "
              f"{record['finetune_seconds']:.1f}s); "
              f"wrote {out}.json and {out}.png; fine-tuned checkpoints in {root / 'checkpoints'}")
        return EXIT_OK
    except KeyboardInterrupt:
        print("calm-fast demo: interrupted", file=sys.stderr)
        return 130
    except AssetMissing as e:
        print(f"calm-fast demo: {e}", file=sys.stderr)
        return EXIT_MISSING
    except (TaskError, ValueError) as e:
        if args.debug:
            raise
        print(f"calm-fast demo: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:  # noqa: BLE001 - a clear one-line message; --debug for the traceback
        if args.debug:
            raise
        print(f"calm-fast demo: internal error: {type(e).__name__}: {e} (rerun with --debug)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
