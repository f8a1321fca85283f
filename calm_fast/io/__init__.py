"""Checkpoint I/O: open models in every common format tensor by tensor, and write safetensors safely.

* :func:`open_checkpoint` — safetensors (single / sharded, index validated), Hugging Face folders,
  torch ``.pt``/``.bin`` (``weights_only`` unless ``trust_pickle``), state dicts, ``nn.Module`` s,
  PEFT LoRA adapters (as full deltas on their base).
* :func:`load_state_dict` / :func:`save_state_dict` — whole state dicts in and out.
* :class:`SafetensorsWriter` — sharded, crash-safe output written piece by piece.
* :class:`AtomicOutput` — stage any output folder (or file) and publish it with one rename.
"""
from .errors import (CalmFastIOError, CheckpointError, ConfigError, MismatchError, NonFiniteError,
                     OutputError)
from .formats import (Checkpoint, LoraCheckpoint, SafetensorsCheckpoint, SafetensorsFile, StateDictCheckpoint,
                      TensorInfo, TorchCheckpoint, extract_state_dict, find_aliases, format_bytes, is_lora_adapter,
                      load_state_dict, lora_deltas, open_checkpoint, parse_dtype, parse_size, resolve_path,
                      torch_load)
from .publish import AtomicOutput, atomic_write_file
from .writer import (DictWriter, OutputSpec, SafetensorsWriter, copy_aux_files, plan_shards, save_state_dict)

__all__ = [
    "CalmFastIOError", "CheckpointError", "ConfigError", "MismatchError", "NonFiniteError", "OutputError",
    "Checkpoint", "LoraCheckpoint", "SafetensorsCheckpoint", "SafetensorsFile", "StateDictCheckpoint", "TensorInfo",
    "TorchCheckpoint", "extract_state_dict", "find_aliases", "format_bytes", "is_lora_adapter", "load_state_dict",
    "lora_deltas", "open_checkpoint", "parse_dtype", "parse_size", "resolve_path", "save_state_dict", "torch_load",
    "AtomicOutput", "atomic_write_file", "DictWriter", "OutputSpec", "SafetensorsWriter", "copy_aux_files", "plan_shards",
]
