"""The package's structure stays as decided: the layers contract (pyproject.toml, import-linter) holds, no module
imports another in a cycle, and no module grows past 600 lines."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parent.parent


def test_the_layers_contract_holds():
    linter = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(linter), "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "1 kept, 0 broken" in result.stdout, result.stdout[-4000:] + result.stderr[-2000:]


def _cycles(graph, modules: set[str]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(modules):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.find_modules_directly_imported_by(start) & modules)))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child) & modules))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycles_between_modules():
    graph = grimp.build_graph("safekeel")
    modules = {m for m in graph.modules if not graph.find_children(m) or m == "safekeel"}  # modules, not packages
    # a package's __init__ re-exporting its own modules is not a cycle of behaviour; count module-to-module imports
    assert _cycles(graph, modules) == []


def test_no_module_over_600_lines():
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "safekeel").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 600}
    assert long == {}
