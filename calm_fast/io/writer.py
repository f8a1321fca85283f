"""Crash-safe safetensors output, written tensor by tensor (or slice by slice) in any order.

Because every output tensor's name, shape and dtype are known before the merge starts, the writer lays
out each shard up front: it writes the complete header, sizes the file, and then each tensor (or each
slice of a tensor) is ``pwrite``-n straight to its final place as soon as it is computed.  Nothing is
buffered beyond the tensor being written and no file is copied afterwards.

Crash safety: every file of the output (shards, the index of a sharded output, and whatever the caller
stages beside them: config and tokenizer files, metadata) is written into one hidden staging folder
created exclusively beside the target, and the whole folder is published with one rename only after
every byte of every tensor has been written and synced (see :mod:`calm_fast.io.publish`).  An exception
discards the staging folder, so nothing appears at the target; a hard kill leaves only the hidden
staging folder, which no loader picks up and the next run on that target removes.  An existing output
is replaced only when asked (``overwrite``), as a whole, and atomically: the target is always either the
complete old output or the complete new one.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .errors import OutputError
from .formats import PathLike, element_size, find_aliases, format_bytes, parse_dtype, parse_size, safetensors_dtype_name
from .publish import AtomicOutput, atomic_write_file

Tensor = torch.Tensor
DEFAULT_SHARD_SIZE = 5 * 1000 ** 3
INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class OutputSpec:
    """One output tensor: name, shape, dtype."""

    name: str
    shape: Tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * element_size(self.dtype)


@dataclass
class ShardLayout:
    """Where every tensor of one output file goes."""

    filename: str
    specs: List[OutputSpec]
    offsets: Dict[str, int]  # name -> byte offset in the data section
    header: bytes            # the complete 8-byte length + JSON header

    @property
    def data_bytes(self) -> int:
        return sum(s.nbytes for s in self.specs)

    @property
    def file_bytes(self) -> int:
        return len(self.header) + self.data_bytes


def _build_header(specs: Sequence[OutputSpec], metadata: Mapping[str, str]) -> Tuple[bytes, Dict[str, int], List[OutputSpec]]:
    # Larger element sizes first (stable), so every tensor's data is aligned to its element size.
    ordered = sorted(specs, key=lambda s: -element_size(s.dtype))
    header: Dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offsets, pos = {}, 0
    for s in ordered:
        header[s.name] = {"dtype": safetensors_dtype_name(s.dtype), "shape": list(s.shape),
                          "data_offsets": [pos, pos + s.nbytes]}
        offsets[s.name] = pos
        pos += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * ((-len(raw)) % 8)
    return len(raw).to_bytes(8, "little") + raw, offsets, ordered


def plan_shards(specs: Sequence[OutputSpec], max_shard_size: Union[None, int, str] = DEFAULT_SHARD_SIZE,
                metadata: Optional[Mapping[str, str]] = None, single_file: Optional[str] = None) -> List[ShardLayout]:
    """Split the outputs into shards of at most ``max_shard_size`` data bytes (a larger tensor gets a
    shard of its own), keeping the given order; file names follow the Hugging Face convention."""
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise OutputError(f"duplicate output tensor names: {dup[:5]}")
    limit = parse_size(max_shard_size) if max_shard_size is not None else None
    groups: List[List[OutputSpec]] = []
    if single_file is not None or limit is None:
        groups = [list(specs)]
    else:
        cur: List[OutputSpec] = []
        size = 0
        for s in specs:
            if cur and size + s.nbytes > limit:
                groups.append(cur)
                cur, size = [], 0
            cur.append(s)
            size += s.nbytes
        groups.append(cur)
    n = len(groups)
    layouts = []
    for i, g in enumerate(groups):
        if single_file is not None:
            fname = single_file
        else:
            fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        header, offsets, ordered = _build_header(g, metadata or {})
        layouts.append(ShardLayout(fname, ordered, offsets, header))
    return layouts


class _Coverage:
    """Byte ranges written so far for one tensor (to refuse committing an incomplete output)."""

    __slots__ = ("spans",)

    def __init__(self):
        self.spans: List[Tuple[int, int]] = []

    def add(self, a: int, b: int) -> None:
        if b > a:
            self.spans.append((a, b))
            if len(self.spans) > 64:
                self.spans = self.merged()

    def merged(self) -> List[Tuple[int, int]]:
        out: List[Tuple[int, int]] = []
        for a, b in sorted(self.spans):
            if out and a <= out[-1][1]:
                out[-1] = (out[-1][0], max(out[-1][1], b))
            else:
                out.append((a, b))
        return out

    def complete(self, n: int) -> bool:
        m = self.merged()
        return n == 0 or (len(m) == 1 and m[0] == (0, n))


class OutputSink:
    """Interface shared by :class:`SafetensorsWriter` and :class:`DictWriter`."""

    def write(self, name: str, tensor: Tensor, start: int = 0) -> None:
        raise NotImplementedError

    def patch(self, name: str, flat_index: Tensor, values: Tensor) -> None:
        raise NotImplementedError

    def commit(self):
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None or not getattr(self, "committed", False):
            self.abort()


class SafetensorsWriter(OutputSink):
    """Write the tensors described by ``specs`` to ``path`` (a folder, or a ``.safetensors`` file).

    Usage::

        with SafetensorsWriter(out_dir, specs, metadata=meta, max_shard_size="5GB") as w:
            w.write(name, tensor)                 # whole tensor, or
            w.write(name, flat_piece, start=i)    # elements [i, i + len) of the flattened tensor
            w.commit()                            # verify, sync, write the index, publish

    The files are written into the staging folder of an :class:`~calm_fast.io.publish.AtomicOutput`
    (created here, or passed as ``output=`` by a caller that stages more files beside the weights and
    publishes itself; :meth:`commit` then only finishes the files).  ``protect``: input paths the output
    must not touch (see :class:`~calm_fast.io.publish.AtomicOutput`).

    Several processes can write one output (the distributed merge): one creates the writer as above (the
    files, with their headers, exist once it returns); the others pass ``attach=<its staging folder>`` and
    open those files to write into them.  ``owned``: the tensors this process writes (:meth:`missing` and
    :meth:`commit` check only those); ``index=False``: :meth:`commit` does not write the index of a sharded
    output (the owner calls :meth:`write_index` once every process has finished).
    """

    def __init__(self, path: Union[str, os.PathLike], specs: Sequence[OutputSpec], *,
                 metadata: Optional[Mapping[str, str]] = None, max_shard_size: Union[None, int, str] = DEFAULT_SHARD_SIZE,
                 overwrite: bool = False, fsync: bool = True, output: Optional[AtomicOutput] = None,
                 protect: Sequence[Union[str, os.PathLike]] = (), owned: Optional[Sequence[str]] = None,
                 attach: Union[None, str, os.PathLike] = None, index: bool = True):
        path = Path(path)
        single = path.name if path.suffix == ".safetensors" else None
        self._single_name = single is not None
        self.folder = path.parent if single else path
        # transformers refuses safetensors files without format metadata
        self.metadata = {"format": "pt", **dict(metadata or {})}
        self.layouts = plan_shards(specs, max_shard_size, self.metadata, single)
        self.sharded = len(self.layouts) > 1
        self.fsync = fsync
        self.overwrite = overwrite
        self.committed = False
        self._where: Dict[str, Tuple[int, int, OutputSpec]] = {}
        for i, lay in enumerate(self.layouts):
            for s in lay.specs:
                self._where[s.name] = (i, len(lay.header) + lay.offsets[s.name], s)
        self._coverage = {name: _Coverage() for name in self._where}
        self._fds: List[int] = []
        self._owned = None if owned is None else set(owned)
        self._index = index
        if attach is not None:
            self._attach(Path(attach), path)
            return
        self._owns_output = output is None
        if output is None:
            output = AtomicOutput(path, overwrite=overwrite, single_file=single is not None, protect=protect,
                                  fsync=fsync).open()
        elif output.staging is None:
            raise OutputError("SafetensorsWriter(output=...) needs an open AtomicOutput")
        self.output = output
        self.final_paths = [output.final_path(lay.filename) for lay in self.layouts]
        if self.sharded:
            self.final_paths.append(output.final_path(INDEX_NAME))
        self._tmp_paths = [str(output.staging / lay.filename) for lay in self.layouts]
        try:
            self._check_space()
            for lay in self.layouts:
                fd = output.create(lay.filename)
                self._fds.append(fd)
                os.pwrite(fd, lay.header, 0)
                os.ftruncate(fd, lay.file_bytes)
        except BaseException as e:
            self.abort()
            if isinstance(e, OSError) and not isinstance(e, OutputError):
                raise OutputError(f"cannot create the output {path}: {e.strerror or e}") from e
            raise

    def _attach(self, staging: Path, path: Path) -> None:
        """Open the files another process created in ``staging`` (same specs, metadata and shard size)."""
        self._owns_output = False
        self.output = None
        self._tmp_paths = [str(staging / lay.filename) for lay in self.layouts]
        target = Path(os.path.abspath(os.fspath(path)))
        self.final_paths = [str(target) if self._single_name else str(target / lay.filename) for lay in self.layouts]
        if self.sharded:
            self.final_paths.append(str(target / INDEX_NAME))
        try:
            for lay, tmp in zip(self.layouts, self._tmp_paths):
                fd = os.open(tmp, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
                self._fds.append(fd)
                if os.fstat(fd).st_size != lay.file_bytes or os.pread(fd, len(lay.header), 0) != lay.header:
                    raise OutputError(f"{tmp} does not have the layout this process planned (the processes of a "
                                      "distributed merge disagree on the output: same inputs, config and version?)")
        except BaseException as e:
            self.abort()
            if isinstance(e, OSError) and not isinstance(e, OutputError):
                raise OutputError(f"cannot open the staged output {staging}: {e.strerror or e}") from e
            raise

    # -- checks --------------------------------------------------------------------------------
    def _check_space(self) -> None:
        need = sum(lay.file_bytes for lay in self.layouts)
        try:
            st = os.statvfs(self.output.staging)
        except OSError:  # pragma: no cover
            return
        free = st.f_bavail * st.f_frsize
        if need > free:
            raise OutputError(f"not enough disk space in {self.output.target.parent}: the output needs "
                              f"{format_bytes(need)}, {format_bytes(free)} free")

    # -- writing -------------------------------------------------------------------------------
    def _pwrite(self, fd: int, data: Tensor, offset: int) -> None:
        if data.numel() == 0:
            return
        mv = memoryview(data.reshape(-1).view(torch.uint8).numpy()).cast("B")
        done, n = 0, len(mv)
        while done < n:
            done += os.pwrite(fd, mv[done:], offset + done)

    def write(self, name: str, tensor: Tensor, start: int = 0) -> None:
        """Write ``tensor`` (the whole tensor, or a flat piece of it starting at element ``start``)."""
        if self.committed:
            raise OutputError("write() after commit()")
        try:
            i, base, spec = self._where[name]
        except KeyError:
            raise OutputError(f"{name!r} is not an output tensor of this writer") from None
        if tensor.dtype != spec.dtype:
            raise OutputError(f"{name!r}: got {tensor.dtype}, the output is declared {spec.dtype}")
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        if start == 0 and t.numel() == spec.numel and t.dim() > 1 and tuple(t.shape) != spec.shape:
            raise OutputError(f"{name!r}: got shape {tuple(t.shape)}, the output is declared {spec.shape}")
        n = t.numel()
        if start < 0 or start + n > spec.numel:
            raise OutputError(f"{name!r}: piece [{start}, {start + n}) outside the tensor's {spec.numel} elements")
        es = element_size(spec.dtype)
        try:
            self._pwrite(self._fds[i], t, base + start * es)
        except OSError as e:
            raise OutputError(f"writing {name!r} to {self._tmp_paths[i]} failed: {e.strerror or e}") from e
        self._coverage[name].add(start, start + n)

    def patch(self, name: str, flat_index: Tensor, values: Tensor) -> None:
        """Overwrite single elements (already written) of ``name`` at the given flat indices.

        Nearby indices are patched together: each run of indices spanning at most 4 MiB is read back,
        modified in memory and written in one ``pwrite``."""
        import numpy as np

        i, base, spec = self._where[name]
        values = values.detach().cpu().to(spec.dtype).contiguous().reshape(-1)
        idx = flat_index.detach().cpu().reshape(-1).numpy().astype(np.int64)
        if idx.size != values.numel():
            raise OutputError(f"patch {name!r}: {idx.size} indices but {values.numel()} values")
        if idx.size == 0:
            return
        if idx.min() < 0 or idx.max() >= spec.numel:
            raise OutputError(f"patch {name!r}: index out of range [0, {spec.numel})")
        es = element_size(spec.dtype)
        order = np.argsort(idx, kind="stable")
        idx = idx[order]
        raw = values.view(torch.uint8).numpy().reshape(-1, es)[order]
        span = max(1, (4 << 20) // es)
        fd = self._fds[i]
        a = 0
        while a < idx.size:
            lo = int(idx[a])
            b = int(np.searchsorted(idx, lo + span, side="left"))
            hi = int(idx[b - 1]) + 1
            buf = bytearray(os.pread(fd, (hi - lo) * es, base + lo * es))
            view = np.frombuffer(buf, dtype=np.uint8).reshape(-1, es)
            view[idx[a:b] - lo] = raw[a:b]
            os.pwrite(fd, buf, base + lo * es)
            a = b

    def read_back(self, name: str) -> Tensor:
        """The bytes written so far for ``name`` (for tests and checks)."""
        i, base, spec = self._where[name]
        raw = os.pread(self._fds[i], spec.nbytes, base)
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(spec.dtype).reshape(spec.shape)

    # -- completion ------------------------------------------------------------------------------
    def missing(self) -> List[str]:
        return [n for n, (_, _, s) in self._where.items() if (self._owned is None or n in self._owned)
                and not self._coverage[n].complete(s.numel)]

    def write_index(self) -> None:
        """Write the index of a sharded output into the staging folder (done by :meth:`commit` unless
        ``index=False``)."""
        if self.sharded and self.output is not None:
            index = {"metadata": {"total_size": sum(lay.data_bytes for lay in self.layouts), **self.metadata},
                     "weight_map": {s.name: lay.filename for lay in self.layouts for s in lay.specs}}
            self.output.write_json(INDEX_NAME, index)

    def commit(self) -> List[str]:
        """Verify that every tensor was fully written, sync and close the files, write the index of a
        sharded output, and publish the folder (or file) with one rename (unless the :class:`AtomicOutput`
        was passed in: its owner publishes).  Returns the final paths."""
        if self.committed:
            return self.final_paths
        missing = self.missing()
        if missing:
            raise OutputError(f"refusing to finish the output: {len(missing)} tensor(s) were not (fully) written: "
                              f"{missing[:5]}")
        try:
            for fd in self._fds:
                if self.fsync:
                    os.fsync(fd)
            for fd in self._fds:
                os.close(fd)
            self._fds = []
            if self._index:
                self.write_index()
            if self._owns_output:
                self.output.publish()
        except BaseException as e:
            self.abort()
            if isinstance(e, OSError) and not isinstance(e, OutputError):
                raise OutputError(f"finishing the output in {self.folder} failed: {e.strerror or e}") from e
            raise
        self.committed = True
        return self.final_paths

    def abort(self) -> None:
        """Close the files and, when this writer owns the output, discard the staging folder (idempotent)."""
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []
        if getattr(self, "_owns_output", False) and getattr(self, "output", None) is not None:
            self.output.discard()

    def __del__(self):  # pragma: no cover - best effort on interpreter exit
        if not self.committed:
            try:
                self.abort()
            except Exception:
                pass


class DictWriter(OutputSink):
    """An in-memory sink with the writer's interface: :meth:`commit` returns the state dict."""

    def __init__(self, specs: Sequence[OutputSpec], device=None):
        self.specs = {s.name: s for s in specs}
        self.order = [s.name for s in specs]
        self.device = device
        self.tensors: Dict[str, Tensor] = {}
        self._coverage = {s.name: _Coverage() for s in specs}
        self.committed = False

    def write(self, name: str, tensor: Tensor, start: int = 0) -> None:
        spec = self.specs[name]
        if tensor.dtype != spec.dtype:
            raise OutputError(f"{name!r}: got {tensor.dtype}, the output is declared {spec.dtype}")
        n = tensor.numel()
        if start == 0 and n == spec.numel:
            self.tensors[name] = tensor.detach().reshape(spec.shape).clone()
        else:
            if name not in self.tensors:
                self.tensors[name] = torch.empty(spec.shape, dtype=spec.dtype, device=tensor.device)
            self.tensors[name].view(-1)[start:start + n] = tensor.reshape(-1)
        self._coverage[name].add(start, start + n)

    def patch(self, name: str, flat_index: Tensor, values: Tensor) -> None:
        t = self.tensors[name]
        t.view(-1)[flat_index.to(t.device)] = values.to(t.device, t.dtype)

    def commit(self) -> Dict[str, Tensor]:
        missing = [n for n in self.order if not self._coverage[n].complete(self.specs[n].numel)]
        if missing:
            raise OutputError(f"{len(missing)} tensor(s) were not (fully) written: {missing[:5]}")
        self.committed = True
        return {n: self.tensors[n] for n in self.order}

    def abort(self) -> None:
        self.tensors.clear()


# ------------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------------
AUX_PATTERNS = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
                "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "preprocessor_config.json",
                "chat_template.jinja", "chat_template.json", "open_clip_config.json")


def copy_aux_files(src_folder: Union[str, os.PathLike], out: Union[AtomicOutput, str, os.PathLike],
                   out_dtype: Optional[torch.dtype] = None, overwrite: bool = False) -> List[str]:
    """Copy the non-weight files of a Hugging Face model folder (config, tokenizer, ...) next to the merged
    weights; ``config.json``'s ``torch_dtype`` is set to the output dtype when given.

    ``out``: an open :class:`AtomicOutput` (the files are staged and published with the weights; the
    usual case), or an existing folder (each file written atomically; an existing one is an error unless
    ``overwrite``).  Returns the final paths.  Only regular files are copied (a symlink in the source,
    e.g. of the Hugging Face cache, is read through: it is the source, not the output)."""
    src = Path(src_folder)
    copied = []
    for name in AUX_PATTERNS:
        p = src / name
        if not p.is_file():
            continue
        data = p.read_bytes()
        if name == "config.json" and out_dtype is not None:
            try:
                cfg = json.loads(data)
                # transformers >= 5 writes and reads "dtype", older versions "torch_dtype": set what is there
                keys = [k for k in ("dtype", "torch_dtype") if isinstance(cfg, dict) and k in cfg]
                if keys:
                    for k in keys:
                        cfg[k] = str(out_dtype).replace("torch.", "")
                    data = (json.dumps(cfg, indent=2) + "\n").encode()
            except (json.JSONDecodeError, UnicodeDecodeError):
                pass
        if isinstance(out, AtomicOutput):
            out.write_bytes(name, data)
            copied.append(out.final_path(name))
        else:
            copied.append(atomic_write_file(Path(out) / name, data, overwrite=overwrite))
    return copied


def save_state_dict(state_dict: Mapping[str, Tensor], path: PathLike, *, metadata: Optional[Mapping[str, str]] = None,
                    max_shard_size: Union[None, int, str] = None, dtype=None, overwrite: bool = False,
                    output=None) -> List[str]:
    """Write a state dict as safetensors, atomically: staged in a hidden folder beside ``path`` and published
    with one rename when complete (:class:`~calm_fast.io.publish.AtomicOutput`).

    ``path``: a ``.safetensors`` file, or a folder (``model.safetensors``, or ``model-0000i-of-0000n``
    shards and ``model.safetensors.index.json`` when larger than ``max_shard_size``).  ``overwrite``
    replaces an existing output as a whole (a folder is swapped for the new one).  ``output``: an open
    :class:`~calm_fast.io.publish.AtomicOutput` to stage the file(s) in instead (``path``'s file name is used
    inside it; its owner publishes), e.g. to save several state dicts and a JSON file as one folder.  ``dtype`` converts
    floating tensors.  Tied tensors are written once (aliases recorded in the metadata).  Returns the
    written paths.
    """
    dtype = parse_dtype(dtype)
    aliases = find_aliases(state_dict)
    specs = []
    for k, v in state_dict.items():
        if k in aliases:
            continue
        want = dtype if (dtype is not None and v.is_floating_point()) else v.dtype
        specs.append(OutputSpec(k, tuple(v.shape), want))
    meta = dict(metadata or {})
    if aliases:
        meta.setdefault("calm_fast.aliases", json.dumps(aliases, sort_keys=True))
    with SafetensorsWriter(path, specs, metadata=meta, max_shard_size=max_shard_size, overwrite=overwrite,
                           output=output) as w:
        for s in specs:
            w.write(s.name, state_dict[s.name].detach().to("cpu", s.dtype))
        w.commit()
        return w.final_paths
