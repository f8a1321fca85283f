"""Benchmark report at ViT-B/32 size: ``calm_fast.bench`` (``calm-fast bench``) with T=8 task vectors of
N=88M elements, references at 22M, and the JSON kept under benchmarks/results/.

    python benchmarks/report.py
    python benchmarks/report.py --n 8000000 --ref-n 8000000 --dtype bfloat16 --device cpu

Every option of ``calm-fast bench --help`` applies; see calm_fast/bench.py for the rows and the
bytes-moved model.
"""
import os
import sys

from calm_fast.bench import main

HERE = os.path.dirname(os.path.abspath(__file__))
VIT_B32 = {"n": 88_000_000, "tasks": 8, "ref_n": 22_000_000,
           "out": os.path.join(HERE, "results", "{device}_{dtype}_{date}.json")}

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], defaults=VIT_B32, prog="benchmarks/report.py"))
