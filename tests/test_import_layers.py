"""The import graph of megagrpo/ and kernels/ (imported as megagrpo_kernels) has no cycles,
between modules nor between subpackages (``megagrpo.models``, ``megagrpo.conversion``, ...: a
layer imports the layers below it, never one above).

Edges come from every ``import`` / ``from ... import`` statement, the ones inside functions
(lazy imports) included: a lazy import hides a cycle from Python, not from the reader. ``from pkg
import name`` points at ``pkg.name`` when that is a module, else at ``pkg`` (its ``__init__``).
Imports by string (``importlib.import_module``) are not followed.
"""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = {"megagrpo": "megagrpo", "megagrpo_kernels": "kernels"}  # import name -> directory


def _modules() -> dict[str, str]:
    """Module name -> file path (a package is its ``__init__.py``)."""
    out = {}
    for name, directory in PACKAGES.items():
        base = os.path.join(ROOT, directory)
        for dirpath, _, files in os.walk(base):
            for f in files:
                if not f.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, f), base)[: -len(".py")]
                parts = [name, *rel.split(os.sep)]
                if parts[-1] == "__init__":
                    parts.pop()
                out[".".join(parts)] = os.path.join(dirpath, f)
    return out


def _imports(module: str, path: str, modules: dict[str, str]) -> set[str]:
    """The project modules ``module`` imports."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = set()

    def add(name: str) -> None:
        while name and name not in modules:  # an attribute of a module, or outside the project
            name = name.rpartition(".")[0]
        if name and name != module:
            found.add(name)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from .mod import y
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                add(sub if sub in modules else base)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(m, p, modules) for m, p in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as ``[a, b, ..., a]``, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_find_cycle_reports_the_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    assert "megagrpo_kernels.grpo_loss" in graph["megagrpo_kernels"]  # from .grpo_loss import
    assert "megagrpo.training.evaluation" in graph["megagrpo.training.loop"]  # inside train()


def _subpackage(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "megagrpo" else parts[0]


def test_no_import_cycles_between_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_import_cycles_between_subpackages():
    graph: dict[str, set[str]] = {}
    for module, imported in import_graph().items():
        src = _subpackage(module)
        graph.setdefault(src, set()).update(dst for dst in map(_subpackage, imported) if dst != src)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle between subpackages: " + " -> ".join(cycle)
