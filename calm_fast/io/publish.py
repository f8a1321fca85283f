"""Publish an output folder (or file) as one unit: staged in a hidden temporary folder, renamed into place.

Every writer of results (the checkpoint merger, :func:`~calm_fast.io.save_state_dict`, and the ``save(dir)``
of result objects) goes through :class:`AtomicOutput`::

    with AtomicOutput("merged/", overwrite=False, protect=[base_dir, *model_dirs]) as out:
        fd = out.create("model.safetensors")          # a new file in the staging folder (O_EXCL|O_NOFOLLOW)
        ...
        out.write_json("config.json", cfg)              # small files: written and fsync-ed
        # leaving the block without an exception publishes (or call out.publish() yourself)

    # a result object's save(dir): several files, one folder, published together
    with AtomicOutput(folder, overwrite=overwrite) as out:
        save_state_dict(masks, "masks.safetensors", output=out)   # staged as <folder>/masks.safetensors
        out.write_json("result.json", summary)

What it guarantees
------------------
* **One rename.**  Everything is written into ``.<name>.calm-fast-tmp-XXXXXXXX``, a folder created
  exclusively (``mkdtemp``: a fresh random name, never an existing path or symlink) beside the target.
  Publishing is a single ``rename`` of that folder to the target.  With ``overwrite=True`` and an
  existing target, the two folders are swapped atomically (Linux ``renameat2(RENAME_EXCHANGE)``) and
  the old one, now under the hidden name, is then removed: at every instant the target is either the
  complete old output or the complete new one, never a mix.  (On a filesystem without
  ``RENAME_EXCHANGE`` the swap is two renames: the old folder is first renamed aside to a hidden name,
  so a crash between them leaves no target but the old output intact under that name.)  A single-file
  target (``x.safetensors``) is published with one ``rename`` too (``RENAME_NOREPLACE`` when it must not
  replace an existing file; ``link`` + ``unlink`` where that flag is missing).
* **Checks first.**  Everything that can refuse the output is checked when the context is entered,
  before any work: an existing target without ``overwrite`` (an existing *empty* folder is fine), a
  target that is a symbolic link, a folder to replace that holds anything but model files, an output
  that is, contains or is inside one of the ``protect`` paths (the inputs; symlinks resolved).
* **One run at a time.**  An exclusive, non-blocking ``flock`` on ``.<name>.calm-fast-lock`` beside the
  target: a second run on the same target fails at once with :class:`OutputError` naming the lock
  and the process holding it.  The lock file is removed when the run ends.
* **Nothing followed, nothing truncated.**  The lock file is opened with ``O_NOFOLLOW``; files in the
  staging folder are created with ``O_CREAT | O_EXCL | O_NOFOLLOW``; a symlink planted at any of these
  names is refused, never written through.
* **No leftovers on failure.**  An exception (``KeyboardInterrupt`` included) in the block removes the
  staging folder and any parent folders this run created: nothing appears at the target.  A hard kill
  can leave the hidden staging folder (and the lock file); the next run on the same target removes
  such leftovers while it holds the lock.
* **Durable.**  Files are ``fsync``-ed when closed, the staging folder before the rename, the parent
  folder after it.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, List, Optional, Union

from .errors import OutputError

PathLike = Union[str, os.PathLike]

STAGING_MARK = ".calm-fast-tmp-"
ASIDE_MARK = ".calm-fast-old-"
LOCK_SUFFIX = ".calm-fast-lock"

#: Test hook: called with the name of each publishing step ('staged', 'before_publish', 'swapped',
#: 'published'); raising (or ``os._exit``) in it simulates a failure or a kill at that point.
FAULT_HOOK: Optional[Callable[[str], None]] = None

#: names a folder may hold for ``overwrite=True`` to replace it (a previous model output): weights,
#: indexes, configs and tokenizer files, docs; anything else (sub-folders, other files) is refused
_REPLACEABLE = re.compile(
    r"(.*\.(safetensors|bin|pt|pth|ckpt|json|txt|model|jinja|md|yaml|yml|py|tiktoken|gguf)|\.gitattributes|"
    r"LICENSE.*|.*\.calm-fast-.*)$")

_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


def _fault(step: str) -> None:
    if FAULT_HOOK is not None:
        FAULT_HOOK(step)


def _renameat2(src: str, dst: str, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False where the C library or the filesystem lacks it."""
    fn = getattr(_libc(), "renameat2", None)
    if fn is None:
        return False
    if fn(-100, os.fsencode(src), -100, os.fsencode(dst), flags) == 0:  # -100: AT_FDCWD
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), src, None, dst)


_LIBC: Any = None


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(None, use_errno=True)
        except OSError:  # pragma: no cover - no C library to load
            _LIBC = object()
    return _LIBC


def fsync_dir(folder: PathLike, strict: bool = False) -> None:
    """fsync a directory (so a rename or a new entry in it survives a power loss).  ``strict``: raise on
    failure (before a publish); otherwise best effort (after it, when failing would only mislead)."""
    try:
        fd = os.open(str(folder), os.O_RDONLY | os.O_DIRECTORY)
    except OSError:  # pragma: no cover - e.g. platforms without directory fds
        if strict:
            raise
        return
    try:
        os.fsync(fd)
    except OSError:
        if strict:
            raise
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _remove_tree(path: Path) -> None:
    """Remove a file, a symlink (not its target) or a folder tree (``rmtree`` never follows links)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except OSError:
            pass


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _describe(path: Path) -> str:
    return str(path)


class AtomicOutput:
    """Stage an output in a hidden temporary folder and publish it with one rename (see the module doc).

    Args:
        target: the output: a folder, or a single file (``single_file=True``; default: names ending in
            ``.safetensors``).  Missing parent folders are created (and removed again on failure).
        overwrite: replace an existing target.  A folder is only replaced if it holds model files
            (weights, indexes, configs, tokenizer files, docs) and no sub-folder, so a mistyped ``-o``
            cannot delete unrelated data.
        protect: paths the output must not be, contain or be inside of (the inputs).  Symlinks are
            resolved before comparing.
        fsync: fsync files and folders (off only for tests and throw-away outputs).

    Use it as a context manager: entering runs every check and creates the staging folder, leaving
    without an exception publishes (unless :meth:`publish` was already called), an exception discards
    everything.  Files go into :attr:`staging` via :meth:`create`, :meth:`write_bytes`,
    :meth:`write_json`; :meth:`final_path` names where a staged file will be after publishing.
    """

    def __init__(self, target: PathLike, *, overwrite: bool = False, single_file: Optional[bool] = None,
                 protect: Iterable[PathLike] = (), fsync: bool = True):
        self.target = Path(os.path.abspath(os.fspath(target)))
        if self.target.name in ("", ".", ".."):
            raise OutputError(f"invalid output path {os.fspath(target)!r}")
        self.single_file = self.target.suffix == ".safetensors" if single_file is None else bool(single_file)
        self.overwrite = overwrite
        self.protect = [Path(p) for p in protect]
        self.fsync = fsync
        self.staging: Optional[Path] = None
        self.published = False
        self._lock_fd = -1
        self._lock_path = self.target.parent / f".{self.target.name}{LOCK_SUFFIX}"
        self._created_parents: List[Path] = []

    # -- checks ------------------------------------------------------------------------------------
    def check(self) -> None:
        """Every check that does not need the lock: run by :meth:`open`, and by dry runs (writes nothing)."""
        t = self.target
        if t.is_symlink():
            raise OutputError(f"output {t} is a symbolic link; refusing to write through or replace it "
                              "(give the real path)")
        real_t = t.parent.resolve() / t.name
        for p in self.protect:
            rp = Path(os.path.realpath(p))
            if real_t == rp:
                rel = "is"
            elif _inside(real_t, rp):
                rel = "is inside"
            elif _inside(rp, real_t):
                rel = "contains"
            else:
                continue
            raise OutputError(f"output {t} {rel} the input {p}; write the output somewhere else "
                              "(an input is never overwritten, not even with overwrite)")
        if not os.path.lexists(t):
            return
        if self.single_file:
            if not t.is_file():
                raise OutputError(f"output {t} exists and is not a file")
            if not self.overwrite:
                raise OutputError(f"output already exists: {t} (pass overwrite=True / --overwrite to replace it)")
            return
        if not t.is_dir():
            raise OutputError(f"output {t} exists and is not a folder")
        entries = sorted(os.listdir(t))
        if not entries:
            return  # an empty folder is replaced as if it did not exist
        weights = [e for e in entries if e.endswith((".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".index.json"))]
        if not self.overwrite:
            what = f"holds model weights ({weights[:3]})" if weights else f"is not empty ({entries[:3]})"
            raise OutputError(f"output already exists: {t} {what}; pass overwrite=True / --overwrite to replace "
                              "the whole folder, or choose another output")
        odd = [e for e in entries if not _REPLACEABLE.fullmatch(e) or
               (os.path.isdir(t / e) and not os.path.islink(t / e) and STAGING_MARK not in e and ASIDE_MARK not in e)]
        if odd:
            raise OutputError(f"refusing to replace {t}: it holds {odd[:3]}, which are not model files; --overwrite "
                              "replaces the whole folder, so choose another output or remove that folder yourself")

    # -- lifecycle ---------------------------------------------------------------------------------
    def open(self) -> "AtomicOutput":
        """Create missing parents, take the lock, run the checks, create the staging folder."""
        if self.staging is not None:
            return self
        try:
            self._make_parents()
            self._lock()
            self.check()
            self._remove_leftovers()
            self.staging = Path(tempfile.mkdtemp(prefix=f".{self.target.name}{STAGING_MARK}",
                                                 dir=str(self.target.parent)))
            _fault("staged")
        except BaseException as e:
            self.discard()
            if isinstance(e, OSError) and not isinstance(e, OutputError):
                raise OutputError(f"cannot create the output {self.target}: {e.strerror or e}") from e
            raise
        return self

    def __enter__(self) -> "AtomicOutput":
        return self.open()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.discard()
        elif not self.published:
            self.publish()

    def _make_parents(self) -> None:
        missing = []
        p = self.target.parent
        while not p.exists():
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            try:
                os.mkdir(d)
            except FileExistsError:
                continue
            self._created_parents.append(d)

    def _lock(self) -> None:
        path = self._lock_path
        for _ in range(20):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise OutputError(f"the lock file {path} is a symbolic link; refusing to follow it (remove it)") \
                        from e
                raise OutputError(f"cannot create the lock file {path}: {e.strerror or e}") from e
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise OutputError(f"the lock file {path} is not a regular file; refusing to use it (remove it)")
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
                    raise OutputError(f"another calm-fast run{f' (pid {holder})' if holder.isdigit() else ''} is "
                                      f"writing {self.target}: its lock {path} is held; wait for it to finish or "
                                      "choose another output") from None
                # the previous holder may have removed the file between our open and flock: retry on the new one
                try:
                    now = os.stat(path, follow_symlinks=False)
                except FileNotFoundError:
                    os.close(fd)
                    continue
                if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                    os.close(fd)
                    continue
                try:  # the holder's pid, for the other run's message only (a full disk must not stop us here)
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                except OSError:
                    pass
            except BaseException:
                os.close(fd)
                raise
            self._lock_fd = fd
            return
        raise OutputError(f"cannot take the lock {path} (it keeps being replaced)")

    def _unlock(self) -> None:
        if self._lock_fd >= 0:
            try:
                os.unlink(self._lock_path)  # while still holding it: see the inode check in _lock
            except OSError:
                pass
            os.close(self._lock_fd)
            self._lock_fd = -1

    def _remove_leftovers(self) -> None:
        """Staging / set-aside folders of earlier runs on this target that were killed (we hold the lock,
        so no live run owns them)."""
        prefixes = (f".{self.target.name}{STAGING_MARK}", f".{self.target.name}{ASIDE_MARK}")
        for e in os.listdir(self.target.parent):
            if e.startswith(prefixes):
                _remove_tree(self.target.parent / e)

    # -- writing -------------------------------------------------------------------------------------
    def _staged(self, name: str) -> Path:
        if self.staging is None:
            raise OutputError("the output is not open (use it as a context manager or call open())")
        if self.published:
            raise OutputError("the output was already published")
        if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
            raise OutputError(f"invalid output file name {name!r}")
        return self.staging / name

    def create(self, name: str, mode: int = 0o644) -> int:
        """A new file ``name`` in the staging folder, opened read-write (an fd; the caller closes it).
        Created with ``O_EXCL | O_NOFOLLOW``: an existing file or symlink of that name is an error."""
        path = self._staged(name)
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        except OSError as e:
            raise OutputError(f"cannot create {path}: {e.strerror or e}") from e

    def write_bytes(self, name: str, data: bytes) -> Path:
        """Write (and fsync) a small file into the staging folder."""
        fd = self.create(name)
        try:
            _write_all(fd, data)
            if self.fsync:
                os.fsync(fd)
        except OSError as e:
            raise OutputError(f"writing {self.staging / name} failed: {e.strerror or e}") from e
        finally:
            os.close(fd)
        return self.staging / name

    def write_json(self, name: str, obj: Any) -> Path:
        return self.write_bytes(name, (json.dumps(obj, indent=2) + "\n").encode("utf-8"))

    def final_path(self, name: str) -> str:
        """Where the staged file ``name`` is once published."""
        return str(self.target) if self.single_file else str(self.target / name)

    # -- publishing ----------------------------------------------------------------------------------
    def publish(self) -> str:
        """Make the staged output the target, with one rename; returns the target path."""
        if self.published:
            return str(self.target)
        if self.staging is None:
            raise OutputError("nothing to publish (the output was not opened, or was discarded)")
        try:
            self._publish()
        except BaseException as e:
            self.discard()
            if isinstance(e, OSError) and not isinstance(e, OutputError):
                raise OutputError(f"publishing the output {self.target} failed: {e.strerror or e}") from e
            raise
        return str(self.target)

    def _publish(self) -> None:
        staging, target = self.staging, self.target
        self.check()  # again, under the lock: nothing may have appeared at the target meanwhile
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp made it 0700
        if self.fsync:
            fsync_dir(staging, strict=True)
        _fault("before_publish")
        if self.single_file:
            files = os.listdir(staging)
            if files != [target.name]:
                raise OutputError(f"a single-file output must stage exactly {target.name!r}, found {files}")
            src = str(staging / target.name)
            if self.overwrite:
                os.replace(src, target)
            elif not _renameat2(src, str(target), _RENAME_NOREPLACE):
                os.link(src, target)  # fails if the target exists: no replacement
                os.unlink(src)
            self.published = True
            _fault("swapped")
            os.rmdir(staging)
        elif os.path.lexists(target):
            # an existing (replaceable or empty) folder: swap atomically, then remove the old one
            if _renameat2(str(staging), str(target), _RENAME_EXCHANGE):
                self.published = True
                _fault("swapped")
                _remove_tree(staging)
            else:
                aside = Path(tempfile.mktemp(prefix=f".{target.name}{ASIDE_MARK}", dir=str(target.parent)))
                os.rename(target, aside)
                try:
                    os.rename(staging, target)
                except BaseException:
                    os.rename(aside, target)
                    raise
                self.published = True
                _fault("swapped")
                _remove_tree(aside)
        else:
            if not _renameat2(str(staging), str(target), _RENAME_NOREPLACE):
                os.rename(staging, target)
            self.published = True
        self.staging = None
        if self.fsync:
            fsync_dir(target.parent)
        self._created_parents = []
        self._unlock()
        _fault("published")

    def discard(self) -> None:
        """Remove the staging folder (and the parents this run created) and release the lock (idempotent)."""
        if self.staging is not None and not self.published:
            _remove_tree(self.staging)
        self.staging = None
        self._unlock()
        for d in reversed(self._created_parents):
            try:
                os.rmdir(d)
            except OSError:
                break
        self._created_parents = []


def atomic_write_file(path: PathLike, data: bytes, *, overwrite: bool = False, fsync: bool = True) -> str:
    """Write one small file atomically: a unique temporary file beside it (``O_EXCL``), then a rename
    (a ``link`` when an existing file must not be replaced)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{STAGING_MARK}", dir=str(path.parent))
    try:
        try:
            _write_all(fd, data)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o644)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise OutputError(f"{path} already exists (pass overwrite=True / --overwrite)") from None
            os.unlink(tmp)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if fsync:
        fsync_dir(path.parent)
    return str(path)
