"""The architecture, checked over the source tree with ast: no import circles, and the boundaries between
the parts (pure method, one run, many runs, store, view) hold. Also: the README's layout names every module.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tally"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, top_level_only: bool) -> set[str]:
    """Absolute names a module imports (`from tally import results` counts as tally.results)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:  # also imports inside top-level `if`/`try` blocks, but not TYPE_CHECKING ones
        nodes = [n for stmt in tree.body for n in ast.walk(stmt)
                 if not (isinstance(stmt, ast.If) and "TYPE_CHECKING" in ast.unparse(stmt.test))
                 and not isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)]
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names
                       if f"{node.module}.{alias.name}" in MODULES)
    return out


def internal_graph(top_level_only: bool = True) -> dict[str, set[str]]:
    return {name: {m for m in imports(path, top_level_only) if m in MODULES and m != name}
            for name, path in MODULES.items()}


@pytest.mark.parametrize("top_level_only", [True, False], ids=["at-import", "with-function-level-imports"])
def test_no_import_circles(top_level_only):
    """No circle at import time, and none hidden behind a function-level import either: an import
    moved into a function only postpones the circle to the first call (and hides the layering)."""
    graph = internal_graph(top_level_only)
    # a package's own __init__ importing its submodules is its front door, not a circle
    for name in graph:
        graph[name] = {m for m in graph[name] if not name.startswith(m + ".")}
    seen: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        seen[node] = 1
        for nxt in sorted(graph[node]):
            if seen.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if nxt not in seen:
                visit(nxt, [*path, nxt])
        seen[node] = 2

    for node in sorted(graph):
        if node not in seen:
            visit(node, [node])


def _forbidden(prefixes: tuple[str, ...], modules: list[str]) -> list[str]:
    return [f"{m} imports {name}" for m in modules for name in imports(MODULES[m], top_level_only=False)
            if name.startswith(prefixes)]


def test_method_is_pure_pytorch():
    method = [m for m in MODULES if m.startswith("tally.method")]
    assert method
    assert _forbidden(("ray", "tally.data", "tally.training", "tally.search", "tally.results",
                       "tally.dashboard", "optuna", "streamlit"), method) == []


def test_dashboard_data_layer_never_imports_streamlit():
    assert _forbidden(("streamlit",), ["tally.dashboard", "tally.dashboard.data", "tally.dashboard.grids",
                                       "tally.dashboard.progress", "tally.dashboard.robustness",
                                       "tally.dashboard.search_data", "tally.dashboard.launch"]) == []


def test_dashboard_never_imports_search():
    """The dashboard reads only the store: a finished benchmark's tables come from
    tally.evaluation.benchmark_tables, never from tally.search (which runs things, on Ray)."""
    dashboard = [m for m in MODULES if m.startswith("tally.dashboard")]
    assert dashboard
    assert _forbidden(("tally.search",), dashboard) == []


def test_loading_a_spec_needs_neither_ray_nor_optuna():
    spec_side = ["tally.search", "tally.search.spec", "tally.search.space", "tally.search.dry_run",
                 "tally.config", "tally.results"]
    assert [m for m in spec_side if imports(MODULES[m], top_level_only=True) & {"ray", "optuna"}
            or any(i.startswith(("ray.", "optuna.")) for i in imports(MODULES[m], top_level_only=True))] == []
    assert "tally.search.dry_run" not in imports(MODULES["tally.search.spec"], top_level_only=False)


def test_store_and_evaluator_need_no_torch_or_ray():
    """The dashboard and report read the store on a laptop: no torch, no Ray at import."""
    light = ["tally.results", "tally.evaluation", "tally.dashboard.data", "tally.dashboard.search_data",
             "tally.dashboard.grids", "tally.dashboard.progress", "tally.dashboard.robustness"]
    heavy = [f"{m} imports {i}" for m in light for i in imports(MODULES[m], top_level_only=True)
             if i.split(".")[0] in ("torch", "torchvision", "ray")]
    assert heavy == []


def test_module_maps_are_generated_from_the_tree():
    """README.md and docs/CONTRACTS.md carry the map `python docs/layout.py` prints: every module, current."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("layout", ROOT / "docs" / "layout.py")
    layout = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(layout)
    block = layout.module_map()
    for target in layout.TARGETS:
        text = target.read_text()
        assert layout.replaced(text, block) == text, f"{target.name}: run `python docs/layout.py --write`"
    named = set(re.findall(r"^(tally/\S+)", block.replace("```", ""), flags=re.M))
    missing = [str(p.relative_to(ROOT)) for p in MODULES.values()
               if p.name != "__init__.py" and str(p.relative_to(ROOT)) not in named]
    assert missing == []
