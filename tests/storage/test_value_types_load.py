"""The storage package has no import cycle between its modules: every import is counted, also
those under ``TYPE_CHECKING`` and inside functions (a cycle hidden there still ties the modules
together). The value types (``storage.chunk``) load without the runtime stack."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

STORAGE = Path(__file__).resolve().parents[2] / "nydusd" / "storage"


def module_name(path: Path) -> str:
    parts = path.relative_to(STORAGE.parent.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in STORAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def test_storage_modules_import_no_cycle() -> None:
    graph = import_graph()
    assert "nydusd.storage.device" in graph and "nydusd.storage.cache.prefetch" in graph
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_value_types_load_without_the_runtime_storage_stack() -> None:
    code = ("import sys; import nydusd.storage.chunk, nydusd.rafs, nydusd.builder.tree; "
            "print(sorted(m for m in sys.modules if m.startswith('nydusd.storage')))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "['nydusd.storage', 'nydusd.storage.chunk']", out.stdout
