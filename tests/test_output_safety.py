"""Outputs that cannot be half-finished, mixed, raced or redirected, and inputs that cannot reach outside
their model (issue 14 A and B): full disk at any write, kills at every publishing step, concurrent runs,
planted symlinks, output = input, escaping indexes, corrupt headers, integer-vs-float tensors."""
import errno
import hashlib
import json
import os
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from calm_fast import cli, methods
from calm_fast.io import (AtomicOutput, CheckpointError, MismatchError, OutputError, load_state_dict,
                          open_checkpoint, save_state_dict)
from calm_fast.io import publish
from calm_fast.streaming import merge_checkpoints

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def make_models(T=2, seed=0, n_layers=3, dim=8):
    g = torch.Generator().manual_seed(seed)
    base = {"embed.weight": torch.randn(12, dim, generator=g)}
    for i in range(n_layers):
        base[f"layers.{i}.w"] = torch.randn(dim, dim, generator=g)
        base[f"layers.{i}.b"] = torch.randn(dim, generator=g)
    base["ids"] = torch.arange(5)
    fts = [{k: (v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone())
            for k, v in base.items()} for _ in range(T)]
    return base, fts


@pytest.fixture
def models(tmp_path):
    base, fts = make_models()
    save_state_dict(base, tmp_path / "base")
    paths = []
    for i, f in enumerate(fts):
        save_state_dict(f, tmp_path / f"ft{i}", max_shard_size=300 if i == 0 else None)
        paths.append(str(tmp_path / f"ft{i}"))
    return base, fts, str(tmp_path / "base"), paths


def assert_same(got, want):
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def tree_digest(folder):
    """{relative path: sha256} of every file (and symlink target) under ``folder``, hidden ones included."""
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def hidden_leftovers(folder):
    return sorted(p.name for p in Path(folder).iterdir() if p.name.startswith("."))


def run_cli(argv, capsys):
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


# ------------------------------------------------------------------------------------------------
# the publisher itself
# ------------------------------------------------------------------------------------------------
def test_nothing_at_the_target_until_the_one_rename(tmp_path):
    target = tmp_path / "sub" / "deeper" / "out"
    with AtomicOutput(target) as out:
        out.write_bytes("a.json", b"{}")
        fd = out.create("model.safetensors")
        os.write(fd, b"x" * 10)
        os.close(fd)
        assert not target.exists()  # staged beside it, hidden
        assert [p.name for p in target.parent.iterdir() if p.is_dir()][0].startswith(".out.calm-fast-tmp-")
        assert out.final_path("a.json") == str(target / "a.json")
    assert sorted(p.name for p in target.iterdir()) == ["a.json", "model.safetensors"]
    assert hidden_leftovers(target.parent) == []  # staging folder and lock gone
    mode = target.stat().st_mode & 0o777
    assert mode & 0o055 == (0o755 & ~_umask()) & 0o055  # not mkdtemp's 0700: a normal folder


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_failure_leaves_nothing_not_even_parents(tmp_path, exc):
    target = tmp_path / "new" / "parents" / "out"
    with pytest.raises(exc):
        with AtomicOutput(target) as out:
            out.write_bytes("config.json", b"{}")
            raise exc("boom")
    assert list(tmp_path.iterdir()) == []  # no output, no empty folder, no parents this run created


def test_existing_output_refused_before_any_work_and_swapped_with_overwrite(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"old")
    (target / "config.json").write_bytes(b"old config")
    with pytest.raises(OutputError, match="already exists.*model weights"):
        AtomicOutput(target).open()
    assert hidden_leftovers(tmp_path) == []
    with AtomicOutput(target, overwrite=True) as out:
        out.write_bytes("model.safetensors", b"new")
    # replaced as a whole: the old config.json does not linger beside the new weights
    assert tree_digest(target) == {"model.safetensors": hashlib.sha256(b"new").hexdigest()}
    assert hidden_leftovers(tmp_path) == []
    # an existing empty folder is fine without overwrite
    (tmp_path / "empty").mkdir()
    with AtomicOutput(tmp_path / "empty") as out:
        out.write_bytes("x.json", b"1")
    assert (tmp_path / "empty" / "x.json").read_bytes() == b"1"


def test_overwrite_refuses_a_folder_that_is_not_a_model_output(tmp_path):
    home = tmp_path / "home"
    (home / "documents").mkdir(parents=True)
    (home / "model.safetensors").write_bytes(b"w")
    before = tree_digest(home)
    with pytest.raises(OutputError, match="not model files"):
        AtomicOutput(home, overwrite=True).open()
    assert tree_digest(home) == before


def test_single_file_output(tmp_path):
    target = tmp_path / "m.safetensors"
    with AtomicOutput(target) as out:
        out.write_bytes("m.safetensors", b"one")
    assert target.read_bytes() == b"one" and hidden_leftovers(tmp_path) == []
    with pytest.raises(OutputError, match="already exists"):
        AtomicOutput(target).open()
    with AtomicOutput(target, overwrite=True) as out:
        out.write_bytes("m.safetensors", b"two")
    assert target.read_bytes() == b"two" and hidden_leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------------
# full disk at any write (fault injection: every os.write / os.pwrite of a merge fails in turn)
# ------------------------------------------------------------------------------------------------
class _DiskFull:
    """Make the k-th os.write/os.pwrite/os.fsync call (counted from 1) fail with ENOSPC."""

    def __init__(self, monkeypatch, k):
        self.k, self.n = k, 0
        for name in ("write", "pwrite", "fsync"):
            real = getattr(os, name)
            monkeypatch.setattr(os, name, self._wrap(real))

    def _wrap(self, real):
        def f(*a, **kw):
            self.n += 1
            if self.n == self.k:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(*a, **kw)
        return f


def _merge(bp, mp, out, **kw):
    return merge_checkpoints(bp, mp, "ties", output=out, max_shard_size=400, memory_budget="2KiB",
                             density=0.5, progress=False, **kw)


def test_full_disk_at_every_write_leaves_no_output(tmp_path, models, monkeypatch):
    base, fts, bp, mp = models
    (Path(bp) / "config.json").write_text('{"torch_dtype": "float32"}')  # staged too: a write to fail
    with monkeypatch.context() as m:
        counter = _DiskFull(m, k=0)
        _merge(bp, mp, tmp_path / "probe")
    total = counter.n
    assert total > 10
    want = methods.ties_merging(base, fts, density=0.5)
    assert_same(load_state_dict(tmp_path / "probe"), want)
    survived = 0
    for k in range(1, total + 1):
        out = tmp_path / f"o{k}"
        with monkeypatch.context() as m:
            _DiskFull(m, k)
            try:
                _merge(bp, mp, out)
            except OutputError:
                assert not out.exists(), k
            else:  # a best-effort write (the lock's pid note, the parent's fsync after the publish)
                survived += 1
                assert_same(load_state_dict(out), want)
        assert not [n for n in hidden_leftovers(tmp_path) if n.startswith(f".o{k}.")], k
    assert survived <= 2


def test_full_disk_at_every_write_keeps_the_old_output(tmp_path, models, monkeypatch):
    base, fts, bp, mp = models
    out = tmp_path / "out"
    merge_checkpoints(bp, mp, "ta", output=out, max_shard_size=400)
    old = tree_digest(out)
    with monkeypatch.context() as m:
        counter = _DiskFull(m, k=0)
        _merge(bp, mp, tmp_path / "probe")
    for k in range(1, counter.n + 1):
        with monkeypatch.context() as m:
            _DiskFull(m, k)
            try:
                _merge(bp, mp, out, overwrite=True)
            except OutputError:
                assert tree_digest(out) == old, k  # the old output, untouched
            else:  # a best-effort write failed: the new output is complete; put the old one back
                assert_same(load_state_dict(out), methods.ties_merging(base, fts, density=0.5))
                merge_checkpoints(bp, mp, "ta", output=out, max_shard_size=400, overwrite=True)
                assert tree_digest(out) == old
        assert hidden_leftovers(tmp_path) == [], k
    assert_same(load_state_dict(out), methods.task_arithmetic(base, fts))


def test_full_disk_at_the_index_write(tmp_path, models, monkeypatch):
    """The issue's case: the index is the last file; shards must not be left under their final names."""
    base, fts, bp, mp = models
    real = os.write

    def write(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".index.json"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)
    with pytest.raises(OutputError, match="No space left"):
        _merge(bp, mp, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert hidden_leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------------
# a kill at any step of the publish: the target is the complete old output or the complete new one
# ------------------------------------------------------------------------------------------------
_KILL_SCRIPT = """
import os, sys
import calm_fast.io.publish as P
from calm_fast.streaming import merge_checkpoints
how, arg, bp, mp0, mp1, out = sys.argv[1:]
if how == "step":
    def hook(step):
        if step == arg:
            os._exit(9)
    P.FAULT_HOOK = hook
else:  # the k-th call of any rename / replace / link / unlink / rmdir of the process
    calls = [0]
    def wrap(real):
        def f(*a, **k):
            calls[0] += 1
            if calls[0] == int(arg):
                os._exit(9)
            return real(*a, **k)
        return f
    for name in ("rename", "replace", "link", "unlink", "rmdir"):
        setattr(os, name, wrap(getattr(os, name)))
    if hasattr(P, "_renameat2"):
        P._renameat2 = wrap(P._renameat2)
merge_checkpoints(bp, [mp0, mp1], "ties", output=out, overwrite=True, max_shard_size=400, density=0.5)
print("finished")
"""


def _kill_run(tmp_path, bp, mp, out, how, arg):
    r = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, how, str(arg), bp, mp[0], mp[1], str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode in (0, 9), r.stderr
    return r.returncode == 9


@pytest.mark.parametrize("step,expect", [("staged", "old"), ("before_publish", "old"), ("swapped", "new"),
                                         ("published", "new")])
def test_kill_at_each_publish_step(tmp_path, models, step, expect):
    base, fts, bp, mp = models
    out = tmp_path / "out"
    merge_checkpoints(bp, mp, "ta", output=out, max_shard_size=400)
    old = load_state_dict(out)
    assert _kill_run(tmp_path, bp, mp, out, "step", step)
    got = load_state_dict(out)  # loadable, whatever the step
    assert_same(got, old if expect == "old" else methods.ties_merging(base, fts, density=0.5))
    # the next run removes the killed run's leftovers
    merge_checkpoints(bp, mp, "ta", output=out, overwrite=True, max_shard_size=400)
    assert hidden_leftovers(tmp_path) == []
    assert_same(load_state_dict(out), old)


def test_kill_at_every_rename_never_mixes_old_and_new(tmp_path, models):
    """Kill the merge at its k-th rename/replace/link/unlink/rmdir while it overwrites a sharded output:
    the target always loads as exactly the old output or exactly the new one."""
    base, fts, bp, mp = models
    out = tmp_path / "out"
    merge_checkpoints(bp, mp, "ta", output=out, max_shard_size=400)
    old = load_state_dict(out)
    new = methods.ties_merging(base, fts, density=0.5)
    saw_old = saw_new = False
    for k in range(1, 12):
        merge_checkpoints(bp, mp, "ta", output=out, overwrite=True, max_shard_size=400)  # back to old
        killed = _kill_run(tmp_path, bp, mp, out, "nth", k)
        got = load_state_dict(out)
        is_old = set(got) == set(old) and all(torch.equal(got[n], old[n]) for n in old)
        is_new = set(got) == set(new) and all(torch.equal(got[n], new[n]) for n in new)
        assert is_old or is_new, f"kill at call {k}: a mix of the old and new outputs"
        saw_old |= is_old and killed
        saw_new |= is_new
        if not killed:
            break
    assert saw_old and saw_new


# ------------------------------------------------------------------------------------------------
# concurrent runs on one output
# ------------------------------------------------------------------------------------------------
_SLOW_SCRIPT = """
import os, sys, time
from pathlib import Path
from calm_fast.io.writer import SafetensorsWriter
from calm_fast.streaming import merge_checkpoints
bp, mp0, mp1, out, started, go = sys.argv[1:]
real = SafetensorsWriter.write
def slow(self, *a, **k):
    Path(started).touch()
    while not os.path.exists(go):
        time.sleep(0.01)
    return real(self, *a, **k)
SafetensorsWriter.write = slow
merge_checkpoints(bp, [mp0, mp1], "ties", output=out, density=0.5, prefetch=False)
print("finished")
"""


def test_concurrent_merges_into_one_output(tmp_path, models):
    base, fts, bp, mp = models
    out, started, go = tmp_path / "out", tmp_path / "started", tmp_path / "go"
    a = subprocess.Popen([sys.executable, "-c", _SLOW_SCRIPT, bp, mp[0], mp[1], str(out), str(started), str(go)],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not started.exists() and time.time() < deadline and a.poll() is None:
            time.sleep(0.01)
        assert started.exists(), a.communicate()[1]
        # the second run, while the first is writing: fails at once, naming the other run's lock
        b = subprocess.run([sys.executable, "-m", "calm_fast.cli", "merge", "--base", bp, "--model", mp[0],
                            "--model", mp[1], "-m", "ta", "-o", str(out), "-q", "--no-progress"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert b.returncode == cli.EXIT_OUTPUT, b.stderr
        assert "another calm-fast run" in b.stderr and f".out{publish.LOCK_SUFFIX}" in b.stderr
        assert f"pid {a.pid}" in b.stderr
        # and with --overwrite too
        b2 = subprocess.run([sys.executable, "-m", "calm_fast.cli", "merge", "--base", bp, "--model", mp[0],
                             "--model", mp[1], "-m", "ta", "-o", str(out), "-q", "--overwrite", "--no-progress"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert b2.returncode == cli.EXIT_OUTPUT and "another calm-fast run" in b2.stderr, b2.stderr
    finally:
        go.touch()
        _, err = a.communicate(timeout=300)
    assert a.returncode == 0, err
    assert_same(load_state_dict(out), methods.ties_merging(base, fts, density=0.5))
    assert hidden_leftovers(tmp_path) == []


def test_concurrent_publishers_in_threads(tmp_path):
    import threading

    target = tmp_path / "out"
    inside, release, errors = threading.Event(), threading.Event(), []

    def first():
        with AtomicOutput(target) as out:
            out.write_bytes("model.safetensors", b"first")
            inside.set()
            release.wait(60)

    t = threading.Thread(target=first)
    t.start()
    assert inside.wait(60)
    try:
        with pytest.raises(OutputError, match="another calm-fast run"):
            AtomicOutput(target).open()
    finally:
        release.set()
        t.join()
    assert (target / "model.safetensors").read_bytes() == b"first"


# ------------------------------------------------------------------------------------------------
# symlinks are never followed
# ------------------------------------------------------------------------------------------------
def test_symlink_at_the_lock_name_is_not_followed(tmp_path, models):
    base, fts, bp, mp = models
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    os.symlink(victim, tmp_path / f".out{publish.LOCK_SUFFIX}")
    with pytest.raises(OutputError, match="symbolic link"):
        merge_checkpoints(bp, mp, "ta", output=tmp_path / "out")
    assert victim.read_text() == "precious"
    assert not (tmp_path / "out").exists()


def test_symlink_at_the_old_temporary_name_is_not_followed(tmp_path, models):
    """The issue's reproduction: a link at the writer's old fixed temporary name inside the output."""
    base, fts, bp, mp = models
    out = tmp_path / "out"
    merge_checkpoints(bp, mp, "ta", output=out)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    os.symlink(victim, out / ".model.safetensors.calm-fast-tmp")
    merge_checkpoints(bp, mp, "ties", output=out, overwrite=True, density=0.5)
    assert victim.read_text() == "precious"
    assert_same(load_state_dict(out), methods.ties_merging(base, fts, density=0.5))


def test_symlink_at_the_staging_name_is_not_followed(tmp_path, models, monkeypatch):
    import tempfile

    base, fts, bp, mp = models
    victim = tmp_path / "victim"
    victim.mkdir()
    os.symlink(victim, tmp_path / ".out.calm-fast-tmp-planted")
    names = iter(["planted", "planted", "fresh123"])
    monkeypatch.setattr(tempfile, "_get_candidate_names", lambda: names)
    # the planted link is a leftover name of this target: removed (the link, never its target) or skipped
    merge_checkpoints(bp, mp, "ta", output=tmp_path / "out")
    assert list(victim.iterdir()) == []
    assert_same(load_state_dict(tmp_path / "out"), methods.task_arithmetic(base, fts))


def test_output_that_is_a_symlink_is_refused(tmp_path, models):
    base, fts, bp, mp = models
    real = tmp_path / "real"
    merge_checkpoints(bp, mp, "ta", output=real)
    before = tree_digest(real)
    os.symlink(real, tmp_path / "link")
    with pytest.raises(OutputError, match="symbolic link"):
        merge_checkpoints(bp, mp, "ties", output=tmp_path / "link", overwrite=True)
    assert tree_digest(real) == before


# ------------------------------------------------------------------------------------------------
# output = input
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["base", "model", "inside_base", "contains_inputs", "base_file",
                                     "symlinked_parent", "index_folder"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_output_equal_to_an_input_is_refused(tmp_path, models, variant, overwrite):
    base, fts, bp, mp = models
    index = Path(mp[0]) / "model.safetensors.index.json"
    os.symlink(tmp_path, tmp_path.parent / f"{tmp_path.name}-alias")
    alias = tmp_path.parent / f"{tmp_path.name}-alias"
    single = tmp_path / "single.safetensors"
    save_state_dict(base, single)
    base_arg, models_arg = bp, mp
    out = {"base": bp, "model": mp[1], "inside_base": str(Path(bp) / "merged"), "contains_inputs": str(tmp_path),
           "base_file": str(single), "symlinked_parent": str(alias / "ft1"), "index_folder": str(index.parent)}[variant]
    if variant == "base_file":
        base_arg = str(single)
    if variant == "index_folder":
        models_arg = [str(index), mp[1]]
    before = tree_digest(tmp_path)
    try:
        with pytest.raises(OutputError, match="the input"):
            merge_checkpoints(base_arg, models_arg, "ta", output=out, overwrite=overwrite)
        with pytest.raises(OutputError, match="the input"):  # a dry run says so too
            merge_checkpoints(base_arg, models_arg, "ta", output=out, overwrite=overwrite, dry_run=True)
        assert tree_digest(tmp_path) == before
    finally:
        os.unlink(alias)


def test_output_equal_to_an_input_cli_exit_code(tmp_path, models, capsys):
    base, fts, bp, mp = models
    before = tree_digest(tmp_path)
    rc, _, err = run_cli(["merge", "--base", bp, "--model", mp[0], "--model", mp[1], "-m", "ta", "-o", mp[0],
                          "--overwrite", "-q"], capsys)
    assert rc == cli.EXIT_OUTPUT and "the input" in err
    assert tree_digest(tmp_path) == before


# ------------------------------------------------------------------------------------------------
# inputs cannot reach outside their model
# ------------------------------------------------------------------------------------------------
def _sharded(tmp_path, name="m"):
    sd = make_models()[0]
    save_state_dict(sd, tmp_path / name, max_shard_size=300)
    folder = tmp_path / name
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return sd, folder, index


def _rewrite_index(folder, index):
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink_out", "dotdot_back_in"])
def test_index_cannot_name_files_outside_the_model(tmp_path, capsys, how):
    sd, folder, index = _sharded(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    first = sorted(set(index["weight_map"].values()))[0]
    os.replace(folder / first, outside / first)  # a real shard, just not inside the model folder
    if how == "dotdot":
        new = f"../outside/{first}"
    elif how == "absolute":
        new = str(outside / first)
    elif how == "dotdot_back_in":  # resolves inside again, but '..' is refused anyway
        os.replace(outside / first, folder / first)
        new = f"../{folder.name}/{first}"
    else:
        os.symlink(outside / first, folder / first)
        new = first
    index["weight_map"] = {k: (new if v == first else v) for k, v in index["weight_map"].items()}
    _rewrite_index(folder, index)
    with pytest.raises(CheckpointError, match="outside the model|inside the model folder"):
        open_checkpoint(folder)
    save_state_dict(sd, tmp_path / "other")
    rc, _, err = run_cli(["merge", "--base", str(tmp_path / "other"), "--model", str(folder), "-m", "ta",
                          "-o", str(tmp_path / "o")], capsys)
    assert rc == cli.EXIT_INPUT, err
    assert not (tmp_path / "o").exists()


def test_hugging_face_cache_symlinks_are_allowed(tmp_path):
    """snapshots/<rev>/ files are symlinks into the repository's blobs/ folder: that is still the model."""
    sd, folder, index = _sharded(tmp_path, "src")
    repo = tmp_path / "models--org--toy"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for f in folder.iterdir():
        blob = repo / "blobs" / hashlib.sha256(f.name.encode()).hexdigest()
        os.replace(f, blob)
        os.symlink(os.path.relpath(blob, snap), snap / f.name)
    assert_same(load_state_dict(snap), sd)


def test_error_messages_never_quote_file_bytes(tmp_path):
    secret = b"password=hunter2; token=abcdef\n"
    st = tmp_path / "secret.safetensors"
    st.write_bytes(secret)
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(st)
    msg = str(e.value)
    (n,) = struct.unpack("<Q", secret[:8])
    assert str(n) not in msg and "hunter2" not in msg and "password" not in msg
    b = tmp_path / "secret.bin"
    b.write_bytes(b"x" + secret)
    for trust in (False, True):
        with pytest.raises(CheckpointError) as e:
            open_checkpoint(b, trust_pickle=trust)
        assert "'x'" not in str(e.value) and "hunter2" not in str(e.value)
    # an index pointing at a non-checkpoint file inside the folder: no bytes either
    sd, folder, index = _sharded(tmp_path)
    first = sorted(set(index["weight_map"].values()))[0]
    (folder / first).write_bytes(secret)
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(folder)
    assert str(n) not in str(e.value) and "hunter2" not in str(e.value)


def _raw_safetensors(path, header, data=b"", pad_to=8):
    raw = json.dumps(header).encode()
    raw += b" " * ((-len(raw)) % pad_to)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


_GOOD = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}


@pytest.mark.parametrize("case", ["float_shape", "string_shape", "bool_shape", "float_offsets", "trailing_bytes",
                                  "hole", "string_metadata", "non_string_metadata_value", "entry_not_object",
                                  "dtype_not_string"])
def test_corrupt_safetensors_headers(tmp_path, capsys, case):
    header, data = json.loads(json.dumps(_GOOD)), b"\0" * 8
    if case == "float_shape":
        header["a"]["shape"] = [2.0]
    elif case == "string_shape":
        header["a"]["shape"] = ["2"]
    elif case == "bool_shape":
        header["a"]["shape"] = [2, True]
    elif case == "float_offsets":
        header["a"]["data_offsets"] = [0.0, 8.0]
    elif case == "trailing_bytes":
        data += b"\1" * 16
    elif case == "hole":
        header["a"]["data_offsets"] = [8, 16]
        data += b"\0" * 8
    elif case == "string_metadata":
        header["__metadata__"] = "format=pt"
    elif case == "non_string_metadata_value":
        header["__metadata__"] = {"format": ["pt"]}
    elif case == "entry_not_object":
        header["b"] = [1, 2]
    elif case == "dtype_not_string":
        header["a"]["dtype"] = ["F32"]
    path = tmp_path / "m.safetensors"
    _raw_safetensors(path, header, data)
    with pytest.raises(CheckpointError):
        open_checkpoint(path)
    save_state_dict({"a": torch.zeros(2)}, tmp_path / "b.safetensors")
    rc, _, err = run_cli(["merge", "--base", str(tmp_path / "b.safetensors"), "--model", str(path), "-m", "ta",
                          "-o", str(tmp_path / "o")], capsys)
    assert rc == cli.EXIT_INPUT, err
    assert "internal error" not in err


def test_well_formed_header_still_reads(tmp_path):
    path = tmp_path / "m.safetensors"
    _raw_safetensors(path, dict(_GOOD, __metadata__={"format": "pt"}), struct.pack("<2f", 1.5, -2.0))
    assert torch.equal(open_checkpoint(path).read("a"), torch.tensor([1.5, -2.0]))


@pytest.mark.parametrize("value", [["model-00001-of-00002.safetensors"], 3, None, {"x": 1}])
def test_index_with_non_string_shard_names(tmp_path, capsys, value):
    sd, folder, index = _sharded(tmp_path)
    k = next(iter(index["weight_map"]))
    index["weight_map"][k] = value
    _rewrite_index(folder, index)
    with pytest.raises(CheckpointError, match="strings"):
        open_checkpoint(folder)
    rc, _, err = run_cli(["merge", "--base", str(folder), "--model", str(folder), "-m", "ta",
                          "-o", str(tmp_path / "o")], capsys)
    assert rc == cli.EXIT_INPUT, err


def test_index_metadata_not_an_object(tmp_path):
    sd, folder, index = _sharded(tmp_path)
    index["metadata"] = "x"
    _rewrite_index(folder, index)
    with pytest.raises(CheckpointError, match="metadata"):
        open_checkpoint(folder)


# ------------------------------------------------------------------------------------------------
# an integer tensor where the base has a float one
# ------------------------------------------------------------------------------------------------
def test_integer_tensor_against_a_float_base(tmp_path):
    base, fts = make_models()
    fts[1]["layers.1.w"] = torch.randint(-3, 3, base["layers.1.w"].shape)
    with pytest.raises(ValueError, match="dtype"):  # the in-memory API
        methods.task_arithmetic(base, fts)
    with pytest.raises(MismatchError, match="layers.1.w.*int64"):  # streaming, in memory
        merge_checkpoints(base, fts, "ta")
    save_state_dict(base, tmp_path / "base")
    save_state_dict(fts[0], tmp_path / "ft0")
    save_state_dict(fts[1], tmp_path / "ft1")
    with pytest.raises(MismatchError, match="layers.1.w"):  # streaming, from disk
        merge_checkpoints(str(tmp_path / "base"), [str(tmp_path / "ft0"), str(tmp_path / "ft1")], "ta",
                          output=tmp_path / "o")
    assert not (tmp_path / "o").exists()
    # on_mismatch='skip': that model contributes a zero delta to that tensor, and it is reported
    r = merge_checkpoints(base, fts, "ties", on_mismatch="skip", density=0.5)
    fixed = dict(fts[1], **{"layers.1.w": base["layers.1.w"].clone()})
    assert_same(r.state_dict, methods.ties_merging(base, [fts[0], fixed], density=0.5))
    assert any("layers.1.w" in line and "int64" in line for line in r.report)


# ------------------------------------------------------------------------------------------------
# the CLI: nothing can fail after the output is published
# ------------------------------------------------------------------------------------------------
def test_bad_json_path_fails_before_any_output(tmp_path, models, capsys):
    base, fts, bp, mp = models
    argv = ["merge", "--base", bp, "--model", mp[0], "--model", mp[1], "-m", "ta", "-o", str(tmp_path / "o"), "-q"]
    rc, _, err = run_cli(argv + ["--json", str(tmp_path / "no" / "such" / "r.json")], capsys)
    assert rc == cli.EXIT_USAGE and "--json" in err
    assert not (tmp_path / "o").exists()
    (tmp_path / "o").mkdir()
    rc, _, err = run_cli(argv + ["--json", str(tmp_path / "o" / "r.json")], capsys)
    assert rc == cli.EXIT_USAGE and "inside the output" in err
    assert list((tmp_path / "o").iterdir()) == []
    rc, _, err = run_cli(argv + ["--json", str(tmp_path / "r.json")], capsys)
    assert rc == 0, err
    info = json.loads((tmp_path / "r.json").read_text())
    assert info["paths"] and all(p.startswith(str(tmp_path / "o")) for p in info["paths"])
    assert hidden_leftovers(tmp_path) == []


def test_failure_just_before_publish_leaves_no_output(tmp_path, models):
    base, fts, bp, mp = models

    def fail(result):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        merge_checkpoints(bp, mp, "ta", output=tmp_path / "o", before_publish=fail)
    assert not (tmp_path / "o").exists() and hidden_leftovers(tmp_path) == []


def test_several_files_saved_as_one_folder(tmp_path):
    """The pattern of a result's save(dir): state dicts and JSON staged together, published together."""
    a, b = make_models(T=1)
    target = tmp_path / "result"
    with AtomicOutput(target) as out:
        paths = save_state_dict(a, "masks.safetensors", output=out)
        save_state_dict(b[0], "model", output=out, max_shard_size=300)  # shards + index in the folder's root
        out.write_json("result.json", {"ok": True})
        assert paths == [str(target / "masks.safetensors")] and not target.exists()
    assert_same(load_state_dict(target / "masks.safetensors"), a)
    assert_same(load_state_dict(target / "model.safetensors.index.json"), b[0])
    assert json.loads((target / "result.json").read_text()) == {"ok": True}
    assert hidden_leftovers(tmp_path) == []
    with pytest.raises(RuntimeError):
        with AtomicOutput(tmp_path / "r2") as out:
            save_state_dict(a, "masks.safetensors", output=out)
            raise RuntimeError("interrupted")
    assert not (tmp_path / "r2").exists() and hidden_leftovers(tmp_path) == []
