"""The embedded default: a real pretrained encoder (all-MiniLM-L6-v2) fine-tuned on real text tasks,
merged with every method calm_fast has, evaluated per task — ``calm-fast demo``.

* :mod:`.tasks` — the task registry (data: file, reader, labels, split rule) and the balanced splits.
* :mod:`.profiles` — quick / default / full: tasks, data sizes, fine-tuning hyperparameters.
* :mod:`.encoder` — the Hugging Face BERT run as a cached frozen bottom + the top layers.
* :mod:`.finetune` — fine-tuning one task and the on-disk checkpoint cache (Hugging Face folders).
* :mod:`.methods` — the rows of the table (reference rows and merging methods) as a registry;
  :mod:`.network_methods` — the rows that run the network (CALM, AdaMerging when present);
  :mod:`.multitask` — the multi-task-training reference row (cached like the checkpoints).
* :mod:`.runner` — all of it end to end; :mod:`.report` — table, JSON, PNG; :mod:`.command` — the CLI.
"""
from .assets import AssetMissing
from .methods import METHODS, Method, register_method
from .profiles import PROFILES, Profile, get_profile
from .tasks import TASKS, TaskError, TaskSpec, get_task, load_task, register_task

__all__ = ["AssetMissing", "METHODS", "Method", "register_method", "PROFILES", "Profile", "get_profile", "TASKS",
           "TaskError", "TaskSpec", "get_task", "load_task", "register_task"]
