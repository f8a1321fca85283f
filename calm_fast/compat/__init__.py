"""Drop-in shims: the functions people already call, with the same names, signatures and results,
running on calm_fast's exact fused ops.  Change one import to speed up an existing script:

* :mod:`calm_fast.compat.ties_merging` — TIES-merging / FusionBench / AdaMerging ``ties_merging_utils``
  (``state_dict_to_vector``, ``vector_to_state_dict``, ``topk_values_mask``, ``resolve_sign``,
  ``disjoint_merge``, ``ties_merging``, ``ties_merging_split``).
* :mod:`calm_fast.compat.peft` — PEFT ``merge_utils`` (``prune``, ``ties``, ``dare_linear``, ``dare_ties``,
  ``magnitude_prune``, ``task_arithmetic``, ...).
* :mod:`calm_fast.compat.task_vectors` — mlfoundations/task_vectors ``TaskVector``.
* :mod:`calm_fast.compat.mergekit` — mergekit's ``sparsify`` (``magnitude``, ``magnitude_outliers``,
  ``bernoulli``, ``della_magprune``, ``rescaled_masked_tensor``).

Each module's docstring lists its semantic decisions and every deliberate deviation from the peer.
"""
from . import mergekit, peft, task_vectors, ties_merging

__all__ = ["ties_merging", "peft", "task_vectors", "mergekit"]
