"""Merging methods on state dicts; each module composes the fused ops of calm_fast.ops.

calm.py runs CALM end to end on a network through a model adapter (calm_fast.models).
doge.py runs DOGE_TA (data-free); adamerging.py learns merging coefficients on unlabeled data
(AdaMerging, AdaMerging++) and doge_adamerging.py combines the two (DOGE + AdaMerging).
"""
from .adamerging import AdaMergingResult, adamerging
from .calm import CalmResult, calm
from .consensus import consensus_merging
from .dare import dare_merging
from .doge import DogeResult, doge_ta
from .doge_adamerging import DogeAdaMergingResult, doge_adamerging
from .task_arithmetic import task_arithmetic
from .ties import ties_merging

__all__ = ["task_arithmetic", "ties_merging", "dare_merging", "consensus_merging", "calm", "CalmResult",
           "doge_ta", "DogeResult", "adamerging", "AdaMergingResult", "doge_adamerging", "DogeAdaMergingResult"]
