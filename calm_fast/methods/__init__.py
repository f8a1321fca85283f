"""Merging methods on state dicts; each module composes the fused ops of calm_fast.ops.

Next (designed for, see DESIGN.md): calm.py (CALM mask training), doge.py (DOGE), adamerging.py.
"""
from .consensus import consensus_merging
from .dare import dare_merging
from .doge import DogeResult, doge_ta
from .task_arithmetic import task_arithmetic
from .ties import ties_merging

__all__ = ["task_arithmetic", "ties_merging", "dare_merging", "consensus_merging", "doge_ta", "DogeResult"]
