"""The package's import layering: the two former import circles (ops <-> reference, io.formats <-> io.writer)
are gone, the streaming package imports in any order, and no module of calm_fast.streaming imports one that
imports it back (checked on the source, function-level imports included, and by importing in fresh
interpreters)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "calm_fast"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, top_level_only: bool = False) -> set:
    """calm_fast modules imported by ``path`` (relative imports resolved; ``from . import x`` counts x)."""
    mod = _module_name(path)
    pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    known = {_module_name(p) for p in PKG.rglob("*.py")}
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("calm_fast"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("calm_fast"):
                continue
            out.add(target)
            for a in node.names:  # from . import ops -> the submodule
                if f"{target}.{a.name}" in known:
                    out.add(f"{target}.{a.name}")
    return {m for m in out if m in known and m != mod}


def _file(mod: str) -> Path:
    p = ROOT / Path(*mod.split("."))
    return p / "__init__.py" if p.is_dir() else p.with_suffix(".py")


def test_reference_does_not_import_ops():
    deps = _imports(_file("calm_fast.reference"))
    assert "calm_fast.ops" not in deps
    assert deps <= {"calm_fast.philox"}, deps  # the executable specification stands on its own
    assert _imports(_file("calm_fast.philox")) == set()


def test_formats_does_not_import_writer():
    assert "calm_fast.io.writer" not in _imports(_file("calm_fast.io.formats"))
    assert "calm_fast.io.formats" in _imports(_file("calm_fast.io.writer"))
    assert "calm_fast.io.writer" not in _imports(_file("calm_fast.io.publish"))


def test_no_cycle_inside_the_streaming_package():
    mods = [_module_name(p) for p in (PKG / "streaming").glob("*.py") if p.name != "__init__.py"]
    graph = {m: {d for d in _imports(_file(m)) if d in mods} for m in mods}
    state = {}

    def visit(m, stack):
        state[m] = 1
        for d in graph[m]:
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack + [m, d]))
            if d not in state:
                visit(d, stack + [m])
        state[m] = 2

    for m in mods:
        if m not in state:
            visit(m, [])


def test_the_checker_sees_a_cycle(tmp_path):
    """The AST reader finds function-level relative imports (so the tests above can fail)."""
    src = PKG / "io" / "formats.py"
    tree_text = src.read_text() + "\n\ndef _x():\n    from .writer import save_state_dict\n"
    fake = PKG / "io" / "_cycle_probe_tmp.py"
    try:
        fake.write_text(tree_text)
        assert "calm_fast.io.writer" in _imports(fake)
    finally:
        fake.unlink()


PAIRS = [("calm_fast.ops", "calm_fast.reference"), ("calm_fast.io.formats", "calm_fast.io.writer"),
         ("calm_fast.streaming.engine", "calm_fast.streaming.plan"),
         ("calm_fast.streaming.distributed", "calm_fast.streaming")]


@pytest.mark.parametrize("a,b", PAIRS)
def test_import_in_both_orders_in_fresh_interpreters(a, b):
    code = ("import importlib, sys\n"
            f"for m in sys.argv[1:]:\n    importlib.import_module(m)\n"
            "from calm_fast.streaming import merge_checkpoints, build_plan\n"
            "from calm_fast.io.writer import save_state_dict\nfrom calm_fast.io import save_state_dict as s2\n"
            "assert s2 is save_state_dict\n")
    for order in ((a, b), (b, a)):
        r = subprocess.run([sys.executable, "-c", code, *order], cwd=ROOT, capture_output=True, text=True,
                           timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr[-2000:]
