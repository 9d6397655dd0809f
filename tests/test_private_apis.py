"""docs/PRIVATE_APIS.md lists every private name of another library the code and tests use.

Found with ast over tally/, tests/, bench/ and dashboard/: an `_attribute` (not a dunder) read or set on
anything but self/cls that our own code does not define, a `_method` defined in a class whose bases are
not ours (an override of a library's private method), and a from-import path with a `_` part.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "PRIVATE_APIS.md"
FILES = sorted(p for d in ("tally", "tests", "bench", "dashboard") for p in (ROOT / d).rglob("*.py"))


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _where(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def private_uses(files=FILES) -> dict[str, set[str]]:
    """Private name -> the files using it."""
    trees = {p: ast.parse(p.read_text()) for p in files}
    classes = {n.name for t in trees.values() for n in ast.walk(t) if isinstance(n, ast.ClassDef)}
    # a private method only the library calls (our code never says self.<name>) overrides the library's
    called = {n.attr for t in trees.values() for n in ast.walk(t) if isinstance(n, ast.Attribute)
              and isinstance(n.value, ast.Name) and n.value.id in ("self", "cls")}
    ours: set[str] = set()  # names our code defines: functions, classes, self/cls attributes, variables
    overrides: dict[str, set[str]] = {}
    for path, tree in trees.items():
        overriding = set()  # methods of classes with a library base that only the library calls
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and any(
                    (b.id if isinstance(b, ast.Name) else getattr(b, "attr", None)) not in classes for b in node.bases):
                overriding.update(id(item) for item in node.body if isinstance(item, ast.FunctionDef)
                                  and _private(item.name) and item.name not in called)
                for item in node.body:
                    if id(item) in overriding:
                        overrides.setdefault(item.name, set()).add(_where(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and id(node) not in overriding:
                ours.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                ours.add(node.id)
            elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                  and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                ours.add(node.attr)
            elif isinstance(node, ast.arg):
                ours.add(node.arg)
    found = {k: set(v) for k, v in overrides.items() if k not in ours}
    for path, tree in trees.items():
        where = _where(path)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                    and any(_private(part) for part in node.module.split(".")):
                found.setdefault(node.module, set()).add(where)
            elif (isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in ours
                  and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
                found.setdefault(node.attr, set()).add(where)
    return found


def test_every_private_name_used_is_listed():
    listed = DOC.read_text()
    missing = {name: sorted(files) for name, files in private_uses().items() if f"`{name}`" not in listed
               and not any(f"`{name}`" in line or f"`{name} " in line for line in listed.splitlines())}
    assert missing == {}, f"add these to {DOC.relative_to(ROOT)} (name, where, why): {missing}"


def test_the_scan_finds_a_private_use(tmp_path):
    """The scan itself: a library's private attribute, an override and a private import path are found."""
    sample = tmp_path / "sample.py"
    sample.write_text("from ray.x._internal import Y\nimport streamlit as st\nst._secret = 1\n"
                      "class T(Y):\n    def _hook(self):\n        return self._own\n")
    found = private_uses([sample])
    assert set(found) == {"ray.x._internal", "_secret", "_hook"}
