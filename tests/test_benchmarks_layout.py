"""The benchmarks' own layout: run as `python -m benchmarks.NAME`, so no module edits `sys.path`; what two share lives
in a shared module, so the imports between them form no cycle and no module takes another's private names."""

from __future__ import annotations

import ast
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def modules() -> dict[str, ast.Module]:
    return {path.stem: ast.parse(path.read_text(encoding="utf-8")) for path in sorted(BENCHMARKS.glob("*.py"))}


def imported(tree: ast.Module) -> list[tuple[str, list[str]]]:
    """(benchmarks module, names taken from it) for every import of a sibling, at any depth."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:  # from .x import a, b
                out.append((node.module.split(".")[0], [a.name for a in node.names]))
            elif node.level == 1:  # from . import x, y
                out.extend((a.name, []) for a in node.names)
            elif node.module and node.module.startswith("benchmarks."):
                out.append((node.module.split(".")[1], [a.name for a in node.names]))
            elif node.module == "benchmarks":
                out.extend((a.name, []) for a in node.names)
        elif isinstance(node, ast.Import):
            out.extend((a.name.split(".")[1], []) for a in node.names if a.name.startswith("benchmarks."))
    return out


def test_no_module_edits_sys_path():
    edits = []
    for name, tree in modules().items():
        for node in ast.walk(tree):
            target = node.func.value if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) else None
            if isinstance(node, (ast.Assign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                target = next((t for t in targets if isinstance(t, ast.Attribute)), None)
            if isinstance(target, ast.Attribute) and target.attr == "path" and getattr(target.value, "id", "") == "sys":
                edits.append(f"benchmarks/{name}.py:{node.lineno}")
    assert not edits, f"sys.path edited at {edits}; run benchmarks as `python -m benchmarks.NAME` from the repo root"


def test_imports_between_benchmarks_form_no_cycle_and_take_no_private_names():
    trees = modules()
    graph = {name: {m for m, _ in imported(tree) if m in trees} for name, tree in trees.items()}
    private = [
        f"benchmarks/{name}.py imports {n} from {m}"
        for name, tree in trees.items()
        for m, names in imported(tree)
        for n in names
        if n.startswith("_") and n != "__version__"
    ]
    assert not private, private

    def cycle_from(start: str, path: tuple[str, ...]) -> tuple[str, ...] | None:
        for nxt in sorted(graph[start]):
            if nxt in path:
                return (*path[path.index(nxt) :], nxt)
            found = cycle_from(nxt, (*path, nxt))
            if found:
                return found
        return None

    cycles = [c for c in (cycle_from(name, (name,)) for name in graph) if c]
    assert not cycles, f"import cycle among benchmarks: {' -> '.join(cycles[0])}"
    assert graph["common"] == set(), "benchmarks/common.py is shared: it imports no other benchmark"
    assert graph["compare"] <= {"common"}, "benchmarks/compare.py is shared: it imports only common"
