"""Reading checkpoints tensor by tensor: safetensors (single or sharded), Hugging Face folders, torch
``.pt``/``.bin`` files, in-memory state dicts and ``nn.Module`` s, and PEFT LoRA adapters.

Everything is exposed through one interface, :class:`Checkpoint`::

    ckpt = open_checkpoint("path/to/model")        # file, folder, state dict, nn.Module, adapter
    ckpt.keys()                                     # tensor names, in storage order (tied copies removed)
    ckpt.info(name)                                 # shape and dtype, without reading any data
    ckpt.read(name)                                 # the tensor
    ckpt.read(name, start, stop, out=buffer)        # elements [start, stop) of the flattened tensor

Design points:

* **Validation before heavy work.**  Opening a checkpoint parses every header (a few KB per file) and
  checks it: a sharded index naming a shard that does not exist, a tensor that its shard does not hold,
  a tensor present in a shard but absent from the index, an out-of-bounds or wrongly sized data range,
  a header that is not exactly the safetensors format (non-integer shapes or offsets, bytes that belong
  to no tensor, a ``__metadata__`` that is not a string map), a shard name that leaves the model folder
  (``..``, an absolute path, a symlink pointing elsewhere; the Hugging Face cache's ``blobs/`` excepted):
  each raises :class:`~calm_fast.io.errors.CheckpointError` naming the file and tensor, before any tensor
  data is read.  Messages never quote the bytes of the file (it may be any file a path pointed at).
* **Bounded memory.**  safetensors tensors are read with ``pread`` straight into a caller-supplied buffer
  (or a fresh one): no whole-file mapping, so resident memory is what the caller keeps, not the file
  size (a mapped file counts in RSS as its pages are touched).  Slices of a flattened tensor can be
  read on their own, so a tensor larger than the memory budget is processed in pieces.
* **Pickles are opt-in.**  ``.pt``/``.bin`` files are loaded with ``weights_only=True`` (and ``mmap``
  when the file is in the zip format).  ``trust_pickle=True`` allows arbitrary pickles, e.g. the open_clip
  ``ImageEncoder`` checkpoints of the task-vector literature; classes that no longer exist (old
  open_clip versions, ``src.modeling``) are replaced by empty ``nn.Module`` stubs so that the module's
  parameters can still be read (``stub_missing_classes``).
* **Tied tensors** (several names sharing one storage, e.g. a tied LM head) are reported once: the
  first name is kept, the others are listed in :attr:`Checkpoint.aliases`.
* **LoRA adapters** (PEFT, ``peft_type: LORA``) are applied as full deltas: the checkpoint reads as
  ``base + scaling * B @ A`` (fp32) for every adapted weight, the base elsewhere.  DoRA and non-LoRA PEFT
  types are rejected rather than merged wrongly.
"""
from __future__ import annotations

import io as _io
import json
import math
import os
import pickle
import re
import struct
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch

from .errors import CheckpointError

Tensor = torch.Tensor
PathLike = Union[str, os.PathLike]

# ------------------------------------------------------------------------------------------------
# dtypes
# ------------------------------------------------------------------------------------------------
_ST_DTYPES: Dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        _ST_DTYPES[_name] = getattr(torch, _attr)
_ST_NAMES: Dict[torch.dtype, str] = {v: k for k, v in _ST_DTYPES.items()}

DTYPE_ALIASES: Dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "f32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "f16": torch.float16, "half": torch.float16,
}
MERGEABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def parse_dtype(value: Union[None, str, torch.dtype]) -> Optional[torch.dtype]:
    """'bf16' / 'bfloat16' / torch.bfloat16 -> torch.bfloat16 (None stays None)."""
    if value is None or isinstance(value, torch.dtype):
        return value
    key = str(value).lower().replace("torch.", "")
    if key not in DTYPE_ALIASES:
        raise ValueError(f"unknown dtype {value!r}; use one of float32, bfloat16, float16")
    return DTYPE_ALIASES[key]


def safetensors_dtype_name(dtype: torch.dtype) -> str:
    try:
        return _ST_NAMES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot be stored in safetensors") from None


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def parse_size(value: Union[None, int, float, str]) -> Optional[int]:
    """'5GB' / '512MiB' / '1e9' / 1000 -> bytes (None stays None).  Decimal (KB, MB, GB) and binary
    (KiB, MiB, GiB) units; a bare 'B' suffix or no suffix means bytes."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return int(value)
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMgGtT]?)(i?)([bB]?)\s*", str(value))
    if not m:
        raise ValueError(f"cannot parse size {value!r} (examples: 5GB, 512MiB, 1000000)")
    number, unit, binary, _ = m.groups()
    power = " KMGT".index(unit.upper()) if unit else 0
    return int(float(number) * ((1024 if binary else 1000) ** power))


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024.0
    return f"{n:.2f} TiB"


@dataclass(frozen=True)
class TensorInfo:
    """Shape and dtype of one stored tensor."""

    shape: Tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return int(math.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return self.numel * element_size(self.dtype)


# ------------------------------------------------------------------------------------------------
# The checkpoint interface
# ------------------------------------------------------------------------------------------------
class Checkpoint:
    """A read-only collection of named tensors, read one tensor (or one slice of a tensor) at a time.

    Subclasses implement :meth:`keys`, :meth:`info` and :meth:`_read_flat`.  Tensors returned by
    :meth:`read` may be views of caller buffers or of the source; treat them as read-only.
    """

    #: human-readable description (format and path)
    description: str = "checkpoint"
    #: path(s) on disk, if any
    paths: List[str]
    #: names dropped as tied copies -> the name that is kept
    aliases: Dict[str, str]
    #: free-form metadata of the source (safetensors ``__metadata__``, adapter config, ...)
    metadata: Dict[str, Any]

    def __init__(self) -> None:
        self.paths = []
        self.aliases = {}
        self.metadata = {}

    # -- to implement ---------------------------------------------------------------------------
    def keys(self) -> List[str]:
        raise NotImplementedError

    def info(self, name: str) -> TensorInfo:
        raise NotImplementedError

    def _read_flat(self, name: str, start: int, stop: int, out: Optional[Tensor]) -> Tensor:
        """Elements [start, stop) of the flattened tensor as a 1-D tensor of its dtype."""
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self._key_set()

    def _key_set(self):
        ks = getattr(self, "_keys_cache", None)
        if ks is None:
            ks = self._keys_cache = frozenset(self.keys())
        return ks

    def __len__(self) -> int:
        return len(self.keys())

    def read(self, name: str, start: Optional[int] = None, stop: Optional[int] = None,
             out: Optional[Tensor] = None) -> Tensor:
        """The tensor ``name`` (shaped), or elements ``[start, stop)`` of it flattened (1-D).

        ``out``: an optional uint8 buffer with room for the bytes; file-backed checkpoints read into it
        (no allocation), others may ignore it.
        """
        if name not in self:
            raise CheckpointError(f"{self.description}: no tensor named {name!r}")
        info = self.info(name)
        n = info.numel
        if start is None and stop is None:
            return self._read_flat(name, 0, n, out).reshape(info.shape)
        start = 0 if start is None else int(start)
        stop = n if stop is None else int(stop)
        if not (0 <= start <= stop <= n):
            raise CheckpointError(f"{self.description}: slice [{start}, {stop}) out of range for {name!r} ({n} elements)")
        return self._read_flat(name, start, stop, out)

    def location(self, name: str) -> Tuple[int, int]:
        """A sort key giving the storage order (file index, byte offset); in-memory sources: (0, position)."""
        return (0, self.keys().index(name))

    def total_bytes(self) -> int:
        return sum(self.info(k).nbytes for k in self.keys())

    def summary(self) -> str:
        dtypes: Dict[str, int] = {}
        for k in self.keys():
            d = str(self.info(k).dtype).replace("torch.", "")
            dtypes[d] = dtypes.get(d, 0) + 1
        numel = sum(self.info(k).numel for k in self.keys())
        dt = ", ".join(f"{n} {d}" for d, n in sorted(dtypes.items(), key=lambda x: -x[1]))
        extra = f", {len(self.aliases)} tied alias(es)" if self.aliases else ""
        return (f"{self.description}: {len(self.keys())} tensors ({dt}), {numel:,} elements, "
                f"{format_bytes(self.total_bytes())}{extra}")

    def state_dict(self) -> Dict[str, Tensor]:
        """Every tensor, materialised (copies for file-backed sources)."""
        return {k: self.read(k).clone() for k in self.keys()}

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _empty_buffer(nbytes: int, out: Optional[Tensor]) -> Tensor:
    if out is not None:
        if out.dtype != torch.uint8 or out.dim() != 1 or not out.is_contiguous() or out.device.type != "cpu":
            raise ValueError("out must be a contiguous 1-D uint8 CPU tensor")
        if out.numel() < nbytes:
            raise ValueError(f"out holds {out.numel()} bytes, {nbytes} needed")
        return out[:nbytes]
    return torch.empty(nbytes, dtype=torch.uint8)


# ------------------------------------------------------------------------------------------------
# safetensors
# ------------------------------------------------------------------------------------------------
_MAX_HEADER = 100 * 1000 * 1000


@dataclass(frozen=True)
class _StEntry:
    info: TensorInfo
    begin: int  # absolute byte offset in the file
    end: int


class SafetensorsFile:
    """One safetensors file: its parsed and validated header, and ``pread`` access to tensor bytes."""

    def __init__(self, path: PathLike):
        self.path = str(path)
        try:
            self.size = os.path.getsize(self.path)
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise CheckpointError(f"cannot open {self.path}: {e.strerror or e}") from e
        try:
            self.entries, self.metadata, self.data_start = self._parse()
        except Exception:
            os.close(self._fd)
            self._fd = -1
            raise

    def _parse(self):
        # messages never quote the file's bytes (it may be any file an index or a path pointed at)
        where = self.path
        if self.size < 8:
            raise CheckpointError(f"{where}: not a safetensors file ({self.size} bytes)")
        (n,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
        if n > _MAX_HEADER or n > self.size - 8:
            raise CheckpointError(f"{where}: not a safetensors file, or truncated: its header length field does not "
                                  f"fit the file ({self.size} bytes)")
        raw = os.pread(self._fd, n, 8)
        try:
            header = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise CheckpointError(f"{where}: not a safetensors file (its header is not UTF-8 JSON)") from None
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{where}: corrupt safetensors header (invalid JSON at byte {e.pos})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{where}: corrupt safetensors header (not a JSON object)")
        metadata = header.pop("__metadata__", None)
        if metadata is None:
            metadata = {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise CheckpointError(f"{where}: corrupt safetensors header ('__metadata__' must map names to strings)")
        data_start = 8 + n
        data_len = self.size - data_start
        entries: Dict[str, _StEntry] = {}
        for name, e in header.items():
            bad = f"{where}: malformed header entry for tensor {name[:200]!r}"
            if not isinstance(e, dict):
                raise CheckpointError(f"{bad} (not a JSON object)")
            dt, shape, offsets = e.get("dtype"), e.get("shape"), e.get("data_offsets")
            if not isinstance(dt, str):
                raise CheckpointError(f"{bad} ('dtype' missing or not a string)")
            if dt not in _ST_DTYPES:
                raise CheckpointError(f"{where}: tensor {name[:200]!r} has unsupported dtype {dt[:40]!r}")
            if not isinstance(shape, list) or not all(_is_int(x) for x in shape):
                raise CheckpointError(f"{bad} ('shape' must be a list of integers)")
            if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(x) for x in offsets):
                raise CheckpointError(f"{bad} ('data_offsets' must be two integers)")
            dtype = _ST_DTYPES[dt]
            shape = tuple(shape)
            a, b = offsets
            info = TensorInfo(shape, dtype)
            if any(s < 0 for s in shape) or not (0 <= a <= b):
                raise CheckpointError(f"{where}: tensor {name!r} has invalid shape/offsets {shape} {[a, b]}")
            if b - a != info.nbytes:
                raise CheckpointError(f"{where}: tensor {name!r} has {b - a} bytes of data but shape {list(shape)} "
                                      f"{dt} needs {info.nbytes}")
            if b > data_len:
                raise CheckpointError(f"{where}: tensor {name!r} ends at byte {b} but the file holds only {data_len} "
                                      "data bytes (truncated file?)")
            entries[name] = _StEntry(info, data_start + a, data_start + b)
        # as the safetensors format requires: the tensors tile the data section exactly (no overlap, no hole,
        # nothing after the last tensor)
        pos = data_start
        prev = None
        for begin, end, k in sorted((e.begin, e.end, k) for k, e in entries.items()):
            if begin < pos:
                raise CheckpointError(f"{where}: tensors {prev!r} and {k!r} overlap in the file")
            if begin > pos:
                raise CheckpointError(f"{where}: {begin - pos} bytes before tensor {k!r} belong to no tensor "
                                      "(corrupt header)")
            pos, prev = end, k
        if pos != self.size:
            raise CheckpointError(f"{where}: {self.size - pos} bytes after the last tensor belong to no tensor "
                                  "(corrupt file or header)")
        return entries, metadata, data_start

    def read_bytes(self, begin: int, nbytes: int, out: Optional[Tensor] = None) -> Tensor:
        buf = _empty_buffer(nbytes, out)
        if nbytes == 0:
            return buf
        mv = memoryview(buf.numpy()).cast("B")
        done = 0
        while done < nbytes:
            got = os.preadv(self._fd, [mv[done:]], begin + done)
            if got <= 0:
                raise CheckpointError(f"{self.path}: unexpected end of file at byte {begin + done}")
            done += got
        return buf

    def read(self, name: str, start: int, stop: int, out: Optional[Tensor] = None) -> Tensor:
        e = self.entries[name]
        es = element_size(e.info.dtype)
        buf = self.read_bytes(e.begin + start * es, (stop - start) * es, out)
        return buf.view(e.info.dtype)

    def close(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


def check_shard_names(index_path: Path, weight_map: Mapping[str, Any]) -> List[str]:
    """The sorted shard names of an index's ``weight_map``, each checked to name a file inside the model
    folder: a relative path without ``..``, and (symlinks resolved) still inside the folder.  The one
    exception is the Hugging Face hub cache, whose ``snapshots/<revision>/`` files are symlinks into the
    repository's ``blobs/`` folder.  Anything else raises :class:`CheckpointError` (an index must not
    make the reader open files outside its model)."""
    bad_values = [k for k, v in weight_map.items() if not isinstance(v, str)]
    if bad_values:
        raise CheckpointError(f"{index_path}: weight_map values must be shard file names (strings); "
                              f"{len(bad_values)} are not, e.g. for {bad_values[:3]}")
    folder = index_path.parent
    real_folder = Path(os.path.realpath(folder))
    allowed = [real_folder]
    if real_folder.parent.name == "snapshots":  # <cache>/models--org--name/snapshots/<rev>/ -> ../../blobs/
        allowed.append(real_folder.parent.parent / "blobs")
    shards = sorted(set(weight_map.values()))
    for s in shards:
        parts = s.replace("\\", "/").split("/")
        if not s or os.path.isabs(s) or s.startswith(("/", "\\")) or ".." in parts or "\0" in s or \
                re.match(r"^[A-Za-z]:", s):
            raise CheckpointError(f"{index_path}: shard name {s[:200]!r} is not a file name inside the model folder "
                                  "(absolute paths and '..' are refused)")
        real = Path(os.path.realpath(folder / s))
        if not any(_within(real, a) for a in allowed):
            raise CheckpointError(f"{index_path}: shard {s[:200]!r} is a symbolic link that leads outside the model "
                                  f"folder ({real}); refused")
    return shards


def _within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


class SafetensorsCheckpoint(Checkpoint):
    """A single ``.safetensors`` file or a sharded set described by a ``*.safetensors.index.json``."""

    def __init__(self, path: PathLike):
        super().__init__()
        path = Path(path)
        self._files: List[SafetensorsFile] = []
        self._where: Dict[str, Tuple[int, str]] = {}  # name -> (file index, name)
        try:
            if path.name.endswith(".index.json"):
                self._open_index(path)
                self.description = f"sharded safetensors {path}"
            else:
                f = SafetensorsFile(path)
                self._files.append(f)
                self._where = {k: (0, k) for k in f.entries}
                self.metadata = dict(f.metadata)
                self.description = f"safetensors {path}"
        except Exception:
            self.close()
            raise
        self.paths = [f.path for f in self._files]
        order = sorted(self._where, key=lambda k: (self._where[k][0], self._files[self._where[k][0]].entries[k].begin))
        self._keys = order

    def _open_index(self, index_path: Path) -> None:
        try:
            index = json.loads(index_path.read_text())
        except OSError as e:
            raise CheckpointError(f"cannot read index {index_path}: {e.strerror or e}") from e
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{index_path}: corrupt index JSON ({type(e).__name__})") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path}: index has no 'weight_map'")
        meta = index.get("metadata")
        if meta is not None and not isinstance(meta, dict):
            raise CheckpointError(f"{index_path}: the index's 'metadata' is not a JSON object")
        self.metadata = dict(meta or {})
        shards = check_shard_names(index_path, weight_map)
        folder = index_path.parent
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise CheckpointError(
                f"{index_path}: {len(missing)} shard file(s) named in the index do not exist: {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''} (incomplete download?)")
        # HF shard names carry the shard count: a numbering gap means a shard the index forgot
        numbered = [re.fullmatch(r"(.*)-(\d+)-of-(\d+)(\.safetensors)", s) for s in shards]
        if shards and all(numbered):
            expected = {f"{m.group(1)}-{i:0{len(m.group(2))}d}-of-{m.group(3)}{m.group(4)}"
                        for m in numbered for i in range(1, int(m.group(3)) + 1)}
            absent_shards = sorted(expected - set(shards))
            if absent_shards:
                on_disk = [s for s in absent_shards if (folder / s).is_file()]
                raise CheckpointError(
                    f"{index_path}: the index lists no tensor of shard(s) {absent_shards[:5]}"
                    + (f" although {on_disk[:5]} exist on disk (stale or corrupt index?)" if on_disk
                       else " and they do not exist (incomplete download?)"))
        for s in shards:
            self._files.append(SafetensorsFile(folder / s))
        pos = {s: i for i, s in enumerate(shards)}
        absent, unlisted = [], []
        for name, shard in weight_map.items():
            i = pos[shard]
            if name not in self._files[i].entries:
                absent.append(f"{name} (in {shard})")
            self._where[name] = (i, name)
        for i, f in enumerate(self._files):
            for name in f.entries:
                if weight_map.get(name) != shards[i]:
                    unlisted.append(f"{name} (in {shards[i]})")
        if absent:
            raise CheckpointError(f"{index_path}: {len(absent)} tensor(s) listed in the index are not in their shard: "
                                  f"{absent[:5]}{' ...' if len(absent) > 5 else ''}")
        if unlisted:
            raise CheckpointError(f"{index_path}: {len(unlisted)} tensor(s) stored in shards are not (or differently) "
                                  f"listed in the index: {unlisted[:5]}{' ...' if len(unlisted) > 5 else ''} "
                                  "(corrupt or stale index?)")

    def keys(self) -> List[str]:
        return self._keys

    def info(self, name: str) -> TensorInfo:
        i, n = self._where[name]
        return self._files[i].entries[n].info

    def location(self, name: str) -> Tuple[int, int]:
        i, n = self._where[name]
        return (i, self._files[i].entries[n].begin)

    def _read_flat(self, name: str, start: int, stop: int, out: Optional[Tensor]) -> Tensor:
        i, n = self._where[name]
        return self._files[i].read(n, start, stop, out)

    def close(self) -> None:
        for f in self._files:
            f.close()


# ------------------------------------------------------------------------------------------------
# in-memory state dicts and modules
# ------------------------------------------------------------------------------------------------
def find_aliases(sd: Mapping[str, Tensor]) -> Dict[str, str]:
    """Names whose tensor is the same view of the same storage as an earlier name: ``{alias: kept}``.

    Only exact duplicates (same storage, offset, shape, strides, dtype) count; distinct views of one
    storage (e.g. q/k/v slices of a fused weight) are different tensors.
    """
    seen: Dict[tuple, str] = {}
    aliases: Dict[str, str] = {}
    for k, v in sd.items():
        if not isinstance(v, Tensor) or v.device.type == "meta" or v.numel() == 0:
            continue
        try:
            ptr = v.untyped_storage().data_ptr()
        except Exception:  # pragma: no cover - exotic tensor subclasses
            continue
        sig = (v.device, ptr, v.storage_offset(), tuple(v.shape), tuple(v.stride()), v.dtype)
        if sig in seen:
            aliases[k] = seen[sig]
        else:
            seen[sig] = k
    return aliases


class StateDictCheckpoint(Checkpoint):
    """An in-memory state dict (or the state dict of an ``nn.Module``), tied copies removed."""

    def __init__(self, source: Union[Mapping[str, Tensor], torch.nn.Module], description: Optional[str] = None,
                 dedup: bool = True):
        super().__init__()
        if isinstance(source, torch.nn.Module):
            sd = source.state_dict()
            self.description = description or f"nn.Module {type(source).__name__}"
        elif isinstance(source, Mapping):
            sd = source
            self.description = description or "state dict"
        else:
            raise CheckpointError(f"cannot use a {type(source).__name__} as a checkpoint")
        bad = [k for k, v in sd.items() if not isinstance(v, Tensor)]
        if bad:
            raise CheckpointError(f"{self.description}: entries that are not tensors: {bad[:5]}")
        self.aliases = find_aliases(sd) if dedup else {}
        self._sd = {k: v for k, v in sd.items() if k not in self.aliases}
        self._keys = list(self._sd)
        self._pos = {k: i for i, k in enumerate(self._keys)}
        self._flat: Dict[str, Tensor] = {}

    def keys(self) -> List[str]:
        return self._keys

    def info(self, name: str) -> TensorInfo:
        v = self._sd[name]
        return TensorInfo(tuple(v.shape), v.dtype)

    def location(self, name: str) -> Tuple[int, int]:
        return (0, self._pos[name])

    def _read_flat(self, name: str, start: int, stop: int, out: Optional[Tensor]) -> Tensor:
        v = self._sd[name]
        if not v.is_contiguous():
            v = v.contiguous()
        return v.reshape(-1)[start:stop]

    def tensor(self, name: str) -> Tensor:
        return self._sd[name]


# ------------------------------------------------------------------------------------------------
# torch .pt / .bin
# ------------------------------------------------------------------------------------------------
class _StubModule(torch.nn.Module):
    """Stand-in for a class that cannot be imported while unpickling a trusted checkpoint."""

    _stub_of = "?"

    def __init__(self, *args, **kwargs):  # accept anything a REDUCE might pass
        super().__init__()

    def forward(self, *args, **kwargs):  # pragma: no cover
        raise RuntimeError(f"{self._stub_of} was replaced by a stub while loading; it cannot be run")


def _stub_pickle_module(stub_missing: bool, stubbed: List[str]) -> types.ModuleType:
    """A pickle-compatible module whose Unpickler replaces unimportable classes by nn.Module stubs."""

    class StubUnpickler(pickle.Unpickler):
        def find_class(self, module, name):
            try:
                return super().find_class(module, name)
            except (ImportError, AttributeError):
                if not stub_missing:
                    raise
                stubbed.append(f"{module}.{name}")
                return type(name, (_StubModule,), {"_stub_of": f"{module}.{name}", "__module__": "calm_fast.stubs"})

    mod = types.ModuleType("calm_fast_stub_pickle")
    mod.__dict__.update({k: getattr(pickle, k) for k in dir(pickle) if not k.startswith("__")})
    mod.Unpickler = StubUnpickler

    def load(file, **kw):
        return StubUnpickler(file, **kw).load()

    def loads(data, **kw):
        return StubUnpickler(_io.BytesIO(data), **kw).load()

    mod.load, mod.loads = load, loads
    return mod


_SD_KEYS = ("state_dict", "model_state_dict", "model", "module", "params", "weights")


def extract_state_dict(obj: Any, where: str) -> Dict[str, Tensor]:
    """The state dict inside a loaded object: a module, a dict of tensors, or a training checkpoint
    holding one under 'state_dict' / 'model_state_dict' / 'model' / 'module' / 'params' / 'weights'."""
    if isinstance(obj, torch.nn.Module):
        return obj.state_dict()
    if isinstance(obj, Mapping):
        if obj and all(isinstance(v, Tensor) for v in obj.values()):
            return dict(obj)
        for key in _SD_KEYS:
            if key in obj and isinstance(obj[key], (Mapping, torch.nn.Module)):
                return extract_state_dict(obj[key], f"{where}[{key!r}]")
        tensors = [k for k, v in obj.items() if isinstance(v, Tensor)]
        others = [k for k, v in obj.items() if not isinstance(v, Tensor)]
        raise CheckpointError(f"{where}: a dict with {len(tensors)} tensor and {len(others)} other entries "
                              f"(e.g. {others[:5]}); no state dict found under {list(_SD_KEYS)}")
    raise CheckpointError(f"{where}: holds a {type(obj).__module__}.{type(obj).__name__}, not a state dict or module")


def _safe_reason(e: BaseException) -> str:
    """The first line of an exception's message, without quoted bytes of the file (pickle's "invalid load
    key, 'x'" quotes the file's first byte: the file may be anything a path pointed at)."""
    lines = str(e).splitlines()
    first = lines[0] if lines else type(e).__name__
    return re.sub(r"invalid load key, .*", "invalid pickle data (not a torch checkpoint?)", first)[:300]


def torch_load(path: PathLike, trust_pickle: bool = False, stub_missing_classes: bool = True,
               mmap: bool = True) -> Tuple[Any, List[str]]:
    """``torch.load`` on CPU: ``weights_only`` unless ``trust_pickle``; memory-mapped when possible.
    Returns (object, names of the classes replaced by stubs)."""
    path = str(path)
    stubbed: List[str] = []
    kwargs: Dict[str, Any] = {"map_location": "cpu", "weights_only": not trust_pickle}
    if trust_pickle:
        kwargs["pickle_module"] = _stub_pickle_module(stub_missing_classes, stubbed)
    import zipfile

    use_mmap = mmap and zipfile.is_zipfile(path)
    try:
        try:
            obj = torch.load(path, mmap=use_mmap, **kwargs)
        except RuntimeError as e:
            if use_mmap and "mmap" in str(e):
                obj = torch.load(path, **kwargs)
            else:
                raise
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: file not found") from e
    except pickle.UnpicklingError as e:
        if not trust_pickle:
            raise CheckpointError(
                f"{path}: cannot be loaded with weights_only=True ({_safe_reason(e)}). If you trust "
                "this file (e.g. an open_clip ImageEncoder checkpoint from the task-vector papers), pass "
                "trust_pickle=True (CLI: --trust-pickle); pickles can run arbitrary code.") from e
        raise CheckpointError(f"{path}: unpickling failed: {_safe_reason(e)}") from e
    except Exception as e:
        raise CheckpointError(f"{path}: torch.load failed: {type(e).__name__}: {_safe_reason(e)}") from e
    return obj, stubbed


class TorchCheckpoint(StateDictCheckpoint):
    """A torch ``.pt``/``.pth``/``.bin`` file (or a ``pytorch_model.bin.index.json`` set)."""

    def __init__(self, path: PathLike, trust_pickle: bool = False, stub_missing_classes: bool = True,
                 dedup: bool = True):
        path = Path(path)
        stubbed: List[str] = []
        paths: List[str] = []
        if path.name.endswith(".index.json"):
            sd = self._load_index(path, trust_pickle, stub_missing_classes, stubbed, paths)
            desc = f"sharded torch {path}"
        else:
            obj, stubbed = torch_load(path, trust_pickle, stub_missing_classes)
            sd = extract_state_dict(obj, str(path))
            paths = [str(path)]
            desc = f"torch {path}"
        super().__init__(sd, description=desc, dedup=dedup)
        self.paths = paths
        if stubbed:
            self.metadata["stubbed_classes"] = sorted(set(stubbed))

    @staticmethod
    def _load_index(index_path: Path, trust_pickle, stub_missing, stubbed, paths) -> Dict[str, Tensor]:
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (OSError, KeyError, TypeError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{index_path}: unreadable index ({type(e).__name__})") from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path}: index has no 'weight_map'")
        shards = check_shard_names(index_path, weight_map)
        missing = [s for s in shards if not (index_path.parent / s).is_file()]
        if missing:
            raise CheckpointError(f"{index_path}: shard file(s) named in the index do not exist: {missing[:5]}")
        sd: Dict[str, Tensor] = {}
        for s in shards:
            obj, st = torch_load(index_path.parent / s, trust_pickle, stub_missing)
            stubbed.extend(st)
            part = extract_state_dict(obj, s)
            for k, v in part.items():
                if weight_map.get(k) != s:
                    raise CheckpointError(f"{index_path}: tensor {k!r} in shard {s} is not listed there in the index")
                sd[k] = v
            paths.append(str(index_path.parent / s))
        absent = [k for k in weight_map if k not in sd]
        if absent:
            raise CheckpointError(f"{index_path}: tensor(s) listed in the index are not in their shard: {absent[:5]}")
        return sd


# ------------------------------------------------------------------------------------------------
# PEFT LoRA adapters
# ------------------------------------------------------------------------------------------------
_PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<mod>.+?)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
                       r"(?:\.(?P<adapter>[^.]+))?(?:\.weight)?$")


def is_lora_adapter(path: PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "adapter_config.json").is_file()


def _pattern_value(patterns: Mapping[str, Any], module: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: a key matches the module name itself or a dotted suffix."""
    for key, value in patterns.items():
        if module == key or re.match(rf"(.*\.)?(?:{key})$", module):
            return value
    return default


class LoraCheckpoint(Checkpoint):
    """A PEFT LoRA adapter applied to a base checkpoint, read as full weights ``base + delta``.

    For an adapted weight ``W`` (``nn.Linear``: ``[out, in]``) the delta is ``scaling * B @ A`` in fp32
    (transposed for ``fan_in_fan_out`` and for embeddings; 1x1 ``B`` for convolutions), with
    ``scaling = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``) and per-module ``rank_pattern`` /
    ``alpha_pattern``.  Adapted weights read as fp32 ``base + delta`` (so their task vector is the delta
    up to one fp32 rounding); tensors saved in full by the adapter (``modules_to_save``, trained biases)
    replace the base's; everything else reads from the base.
    """

    def __init__(self, adapter: Union[PathLike, Mapping[str, Tensor]], base: Checkpoint,
                 config: Optional[Mapping[str, Any]] = None, trust_pickle: bool = False):
        super().__init__()
        self.base = base
        self.aliases = dict(base.aliases)
        if isinstance(adapter, Mapping):
            tensors = dict(adapter)
            if config is None:
                raise CheckpointError("an in-memory LoRA adapter needs its config (r, lora_alpha, ...)")
            where = "in-memory LoRA adapter"
        else:
            folder = Path(adapter)
            where = f"LoRA adapter {folder}"
            if config is None:
                try:
                    config = json.loads((folder / "adapter_config.json").read_text())
                except (OSError, json.JSONDecodeError) as e:
                    raise CheckpointError(f"{where}: unreadable adapter_config.json ({e})") from e
            tensors = self._load_tensors(folder, trust_pickle)
            self.paths = [str(folder)]
        self.description = f"{where} on {base.description}"
        self.metadata = {"adapter_config": dict(config)}
        ptype = str(config.get("peft_type", "LORA")).upper()
        if ptype != "LORA":
            raise CheckpointError(f"{where}: peft_type {ptype} is not supported (LoRA only)")
        if config.get("use_dora"):
            raise CheckpointError(f"{where}: DoRA adapters are not supported (their delta is not scaling * B @ A); "
                                  "merge the adapter into its base with PEFT first")
        self._config = config
        self._lora: Dict[str, Dict[str, Tensor]] = {}
        self._full: Dict[str, Tensor] = {}
        for key, value in tensors.items():
            k = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
            m = _LORA_KEY.match(k)
            if m:
                if m.group("kind") == "lora_magnitude_vector":
                    raise CheckpointError(f"{where}: {key!r} is a DoRA magnitude vector; DoRA is not supported")
                self._lora.setdefault(m.group("mod"), {})[m.group("kind")] = value
                continue
            k = re.sub(r"\.modules_to_save\.[^.]+\.", ".", k)
            if k not in base:
                raise CheckpointError(f"{where}: tensor {key!r} matches no tensor of the base ({k!r} not found)")
            if tuple(value.shape) != base.info(k).shape:
                raise CheckpointError(f"{where}: tensor {key!r} has shape {tuple(value.shape)} but the base's {k!r} "
                                      f"is {base.info(k).shape}")
            self._full[k] = value.contiguous()
        self._targets: Dict[str, Tuple[str, float, str]] = {}  # weight name -> (module, scaling, kind)
        problems = []
        for mod, parts in self._lora.items():
            emb = "lora_embedding_A" in parts or "lora_embedding_B" in parts
            a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A", "lora_B")
            if a_key not in parts or b_key not in parts:
                problems.append(f"{mod}: has {sorted(parts)} (needs both A and B)")
                continue
            target = f"{mod}.weight"
            if target not in base:
                problems.append(f"{mod}: base has no tensor {target!r}")
                continue
            A, B = parts[a_key], parts[b_key]
            rank = int(A.shape[0])
            r_cfg = int(_pattern_value(config.get("rank_pattern") or {}, mod, config.get("r", rank)))
            if r_cfg != rank:
                problems.append(f"{mod}: A has rank {rank} but the config says r={r_cfg}")
                continue
            alpha = float(_pattern_value(config.get("alpha_pattern") or {}, mod, config.get("lora_alpha", rank)))
            scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
            kind = "embedding" if emb else ("conv" if A.dim() == 4 else "linear")
            self._targets[target] = (mod, scaling, kind)
            shape = self._delta_shape(A, B, kind)
            if shape != base.info(target).shape:
                problems.append(f"{mod}: delta has shape {shape} but {target!r} is {base.info(target).shape}")
        if problems:
            raise CheckpointError(f"{where}: cannot apply {len(problems)} LoRA module(s): {problems[:5]}")
        if not self._targets and not self._full:
            raise CheckpointError(f"{where}: no LoRA tensors found")

    @staticmethod
    def _load_tensors(folder: Path, trust_pickle: bool) -> Dict[str, Tensor]:
        st = folder / "adapter_model.safetensors"
        if st.is_file():
            f = SafetensorsCheckpoint(st)
            try:
                return {k: f.read(k).clone() for k in f.keys()}
            finally:
                f.close()
        binf = folder / "adapter_model.bin"
        if binf.is_file():
            obj, _ = torch_load(binf, trust_pickle=trust_pickle, mmap=False)
            return extract_state_dict(obj, str(binf))
        raise CheckpointError(f"{folder}: adapter_config.json found but no adapter_model.safetensors/.bin")

    def _delta_shape(self, A: Tensor, B: Tensor, kind: str) -> Tuple[int, ...]:
        if kind == "embedding":
            return (int(A.shape[1]), int(B.shape[0]))
        if kind == "conv":
            return (int(B.shape[0]),) + tuple(int(s) for s in A.shape[1:])
        shape = (int(B.shape[0]), int(A.shape[1]))
        return shape[::-1] if self._config.get("fan_in_fan_out") else shape

    #: rows per block of the delta product: the delta is always computed in the same fixed row blocks, so a
    #: slice of it is bit-identical to the same rows of the whole (a matmul's rounding depends on its shape)
    DELTA_BLOCK_ROWS = 256

    def _delta_block(self, name: str, r0: int, r1: int) -> Tensor:
        mod, scaling, kind = self._targets[name]
        parts = self._lora[mod]
        if kind == "embedding":
            A, B = parts["lora_embedding_A"].float(), parts["lora_embedding_B"].float()
            return (B @ A[:, r0:r1]).T * scaling
        A, B = parts["lora_A"].float(), parts["lora_B"].float()
        if kind == "conv":
            if B.dim() == 4 and tuple(B.shape[2:]) != (1, 1):
                raise CheckpointError(f"{mod}: LoRA conv with a {tuple(B.shape[2:])} B kernel is not supported")
            d = B.reshape(B.shape[0], -1)[r0:r1] @ A.reshape(A.shape[0], -1)
            return d.reshape((-1,) + tuple(A.shape[1:])) * scaling
        if self._config.get("fan_in_fan_out"):
            return (B @ A[:, r0:r1]).T * scaling
        return (B[r0:r1] @ A) * scaling

    def delta(self, name: str, row_start: int = 0, row_stop: Optional[int] = None) -> Tensor:
        """fp32 delta rows [row_start, row_stop) of the adapted weight ``name``."""
        n = self.base.info(name).shape[0]
        row_stop = n if row_stop is None else row_stop
        bs = self.DELTA_BLOCK_ROWS
        b0, b1 = row_start // bs * bs, -(-row_stop // bs) * bs
        blocks = [self._delta_block(name, r, min(r + bs, n)) for r in range(b0, min(b1, n), bs)]
        full = blocks[0] if len(blocks) == 1 else torch.cat(blocks)
        return full[row_start - b0: row_stop - b0]

    def keys(self) -> List[str]:
        return self.base.keys()

    def __contains__(self, name: str) -> bool:
        return name in self.base

    def info(self, name: str) -> TensorInfo:
        if name in self._targets:
            return TensorInfo(self.base.info(name).shape, torch.float32)
        if name in self._full:
            v = self._full[name]
            return TensorInfo(tuple(v.shape), v.dtype)
        return self.base.info(name)

    def location(self, name: str) -> Tuple[int, int]:
        return self.base.location(name)

    def _read_flat(self, name: str, start: int, stop: int, out: Optional[Tensor]) -> Tensor:
        if name in self._full:
            return self._full[name].reshape(-1)[start:stop]
        if name not in self._targets:
            return self.base.read(name, start, stop, out)
        shape = self.base.info(name).shape
        row = int(math.prod(shape[1:])) if len(shape) > 1 else 1
        r0, r1 = start // row, -(-stop // row)
        base = self.base.read(name, r0 * row, r1 * row).float()
        full = (base.reshape((r1 - r0,) + tuple(shape[1:])) + self.delta(name, r0, r1)).reshape(-1)
        return full[start - r0 * row: stop - r0 * row]

    @property
    def adapted(self) -> List[str]:
        """Names of the base weights the adapter changes (by a delta or a full replacement)."""
        return sorted(set(self._targets) | set(self._full))

    def close(self) -> None:
        pass  # the base is owned by the caller


def lora_deltas(adapter: PathLike, base: Union[PathLike, Checkpoint, Mapping[str, Tensor]]) -> Dict[str, Tensor]:
    """The full fp32 deltas ``{weight name: scaling * B @ A}`` of a LoRA adapter (against its base's names)."""
    base_ck = base if isinstance(base, Checkpoint) else open_checkpoint(base)
    lc = LoraCheckpoint(adapter, base_ck)
    return {k: lc.delta(k).reshape(base_ck.info(k).shape) for k in lc._targets}


# ------------------------------------------------------------------------------------------------
# Dispatch
# ------------------------------------------------------------------------------------------------
_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def resolve_path(path: PathLike) -> Path:
    """The weight file (or index) to open for a path: the path itself if it is a file, else the
    Hugging Face layout of a folder (index first, then single files; safetensors before .bin)."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    for name in ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                 "pytorch_model.bin"):
        if (p / name).is_file():
            return p / name
    for pattern in ("*.safetensors.index.json", "*.safetensors", "*.bin.index.json", "*.bin", "*.pt", "*.pth"):
        found = sorted(p.glob(pattern))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise CheckpointError(f"{p}: {len(found)} candidate weight files ({[f.name for f in found[:5]]}) and no "
                                  "index; name the file to use")
    raise CheckpointError(f"{p}: no model weights found (looked for *.safetensors[.index.json], *.bin, *.pt)")


def open_checkpoint(source: Union[PathLike, Mapping[str, Tensor], torch.nn.Module, Checkpoint], *,
                    trust_pickle: bool = False, stub_missing_classes: bool = True, lora_base=None,
                    dedup: bool = True) -> Checkpoint:
    """Open any supported source as a :class:`Checkpoint` (validated; no tensor data read yet).

    Args:
        source: a path (``.safetensors``, ``*.safetensors.index.json``, ``.pt``/``.pth``/``.bin``/``.ckpt``,
            ``*.bin.index.json``, a Hugging Face model folder, a PEFT LoRA adapter folder), a state dict,
            an ``nn.Module`` or an already open checkpoint.
        trust_pickle: allow arbitrary pickles in torch files (never for untrusted files).
        stub_missing_classes: with ``trust_pickle``, replace classes that cannot be imported by empty
            ``nn.Module`` stubs (their parameters and buffers are still loaded).
        lora_base: the base checkpoint (or anything ``open_checkpoint`` accepts) a LoRA adapter applies to.
        dedup: drop tied copies of a tensor (reported in ``.aliases``).
    """
    if isinstance(source, Checkpoint):
        return source
    if isinstance(source, (Mapping, torch.nn.Module)):
        return StateDictCheckpoint(source, dedup=dedup)
    if not isinstance(source, (str, os.PathLike)):
        raise CheckpointError(f"cannot open a {type(source).__name__} as a checkpoint")
    p = Path(source)
    if is_lora_adapter(p):
        if lora_base is None:
            raise CheckpointError(f"{p} is a PEFT adapter; it needs the base model it was trained on (lora_base / "
                                  "the merge's base model)")
        base_ck = lora_base if isinstance(lora_base, Checkpoint) else open_checkpoint(
            lora_base, trust_pickle=trust_pickle, stub_missing_classes=stub_missing_classes)
        return LoraCheckpoint(p, base_ck, trust_pickle=trust_pickle)
    f = resolve_path(p)
    name = f.name
    if name.endswith(".safetensors") or name.endswith(".safetensors.index.json"):
        return SafetensorsCheckpoint(f)
    if name.endswith(".bin.index.json") or name.endswith(".pt.index.json") or f.suffix in _TORCH_SUFFIXES:
        return TorchCheckpoint(f, trust_pickle=trust_pickle, stub_missing_classes=stub_missing_classes, dedup=dedup)
    raise CheckpointError(f"{f}: unknown checkpoint format (expected .safetensors, .pt, .pth, .bin, .ckpt)")


def load_state_dict(source, **kwargs) -> Dict[str, Tensor]:
    """Open ``source`` (see :func:`open_checkpoint`) and return every tensor as an in-memory state dict."""
    ck = open_checkpoint(source, **kwargs)
    try:
        return ck.state_dict()
    finally:
        if not isinstance(source, Checkpoint):
            ck.close()
