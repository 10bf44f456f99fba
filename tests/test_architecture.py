"""The import rules of docs/architecture.md: layers import downward, each third-party library has
one home. Parsed from the source with ``ast``; a violation names the module and the import."""

from __future__ import annotations

import ast
from itertools import pairwise
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

LEAF = {"errors", "config", "compress", "digest", "metrics", "log", "version", "fdpass"}
# layer -> layers it may import (besides leaf modules and itself)
ALLOWED: dict[str, set[str]] = {
    "leaf": set(),
    "http": set(),
    "oci": {"http"},
    "storage": {"oci", "http"},
    "rafs": {"storage"},
    "fs": {"rafs", "storage"},
    "virtiofs": {"fs"},
    "daemon": {"fs", "virtiofs", "rafs", "storage"},
    "builder": {"rafs", "storage"},
    "converter": {"builder", "oci", "storage", "rafs"},
    "cli": {"*"},
    "api": {"daemon"},
    "demo": {"*"},
}
# third-party module -> the only places (path prefixes) allowed to import it
CONFINED = {
    "llfuse": ("nydusd/fs/fuse.py", "nydusd/fs/session.py"),
    "oss2": ("nydusd/storage/backend/oss.py",),
    "requests": ("nydusd/http.py",),
    "fastapi": ("api/",),
    "uvicorn": ("api/",),
    "lz4": ("nydusd/compress.py",),
    "zstandard": ("nydusd/compress.py",),
    "blake3": ("nydusd/digest.py",),
    "prometheus_client": ("api/prometheus.py",),
    "botocore": ("nydusd/storage/backend/s3.py",),
    "urllib3": ("nydusd/http.py",),
    "tqdm": ("nydusd/cli/progress.py",),
}


def _layer(rel: Path) -> str:
    parts = rel.with_suffix("").parts
    if parts[0] == "api":
        return "api"
    name = parts[1] if len(parts) > 1 else ""
    if name in LEAF or name in ("__init__", "__main__"):
        return "leaf" if name in LEAF else "cli"
    return name


def _imports(path: Path) -> list[str]:
    """Every absolute import in the file, including lazy ones inside functions."""
    tree = ast.parse(path.read_text(), str(path))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def _sources() -> list[Path]:
    return sorted(p for d in ("nydusd", "api") for p in (ROOT / d).rglob("*.py"))


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_layers_import_downward(path: Path) -> None:
    rel = path.relative_to(ROOT)
    layer = _layer(rel)
    allowed = ALLOWED.get(layer, set())
    for name in _imports(path):
        top = name.split(".")
        if top[0] == "api" and layer not in ("api", "cli"):
            pytest.fail(f"{rel}: layer {layer!r} must not import the API ({name})")
        if top[0] != "nydusd" or len(top) < 2:
            continue
        target = "leaf" if top[1] in LEAF else top[1]
        if target in ("leaf", layer) or "*" in allowed or target in allowed:
            continue
        pytest.fail(f"{rel}: layer {layer!r} imports {name} (allowed: leaf, {sorted(allowed)})")


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_third_party_libraries_have_one_home(path: Path) -> None:
    rel = str(path.relative_to(ROOT))
    for name in _imports(path):
        homes = CONFINED.get(name.split(".")[0])
        if homes and not rel.startswith(homes):
            pytest.fail(f"{rel} imports {name}; only {homes} may")


def test_protocol_engine_and_virtiofs_stay_off_llfuse() -> None:
    # design §1: fs/proto is our own engine (no llfuse), virtiofs serves it (virtiofs -> fs.proto, fs)
    for path in [*(ROOT / "nydusd/fs/proto").rglob("*.py"), *(ROOT / "nydusd/virtiofs").rglob("*.py")]:
        for name in _imports(path):
            assert name.split(".")[0] != "llfuse", f"{path.relative_to(ROOT)} imports {name}"
            assert not name.startswith(("nydusd.fs.fuse", "nydusd.fs.session")), (path, name)
    assert (ROOT / "nydusd/virtiofs/server.py").is_file()


def test_the_rules_see_the_package() -> None:
    # Guards against the checks passing vacuously because nothing was found.
    assert len(_sources()) > 10


# --- import cycles -----------------------------------------------------------------------------------
# Every import between the modules of nydusd/ and api/ counts: module level, under TYPE_CHECKING and
# inside functions (a lazy import only hides a cycle). Relative imports are resolved; ``from pkg import
# name`` imports the submodule ``pkg.name`` when there is one, else ``pkg`` itself. A cycle is a strongly
# connected component of that graph with more than one module.

#: Cycles that exist and are being removed; each entry is one cycle's set of modules, exactly as found.
#: The test fails on any other cycle, and on an entry here that no longer is a cycle (delete it then).
KNOWN_CYCLES: set[frozenset[str]] = set()


def _module_names(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    mods: dict[str, Path] = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def import_graph(root: Path, packages: tuple[str, ...]) -> dict[str, dict[str, int]]:
    """module -> {imported module: line of the first such import}, for the modules under ``packages``."""
    mods = _module_names(root, packages)

    def known(name: str) -> str | None:  # the module itself or its nearest package that exists
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, dict[str, int]] = {}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        edges: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str | None] = []
            if isinstance(node, ast.Import):
                targets = [known(a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*up, *([base] if base else [])])
                targets = [known(f"{base}.{a.name}") if f"{base}.{a.name}" in mods else known(base)
                           for a in node.names]
            for target in targets:
                if target is not None and target != mod:
                    edges.setdefault(target, node.lineno)
        graph[mod] = edges
    return graph


def import_cycles(graph: dict[str, dict[str, int]]) -> list[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, {})))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(frozenset(component))
    return found


def describe_cycle(graph: dict[str, dict[str, int]], component: frozenset[str]) -> str:
    """One closed path through ``component`` (each step with the line of its import), then all of it."""
    first = min(component)
    paths = {first: [first]}
    queue = [first]
    while queue:
        node = queue.pop(0)
        for child in sorted(graph[node]):
            if child == first:
                steps = paths[node] + [first]
                path = " -> ".join(f"{a} (line {graph[a][b]})" for a, b in pairwise(steps))
                return f"{path} -> {first} (of the cycle {sorted(component)})"
            if child in component and child not in paths:
                paths[child] = paths[node] + [child]
                queue.append(child)
    raise AssertionError(f"no cycle through {first}")  # cannot happen for a strongly connected component


def cycle_problems(graph: dict[str, dict[str, int]], known: set[frozenset[str]]) -> list[str]:
    cycles = import_cycles(graph)
    problems = [f"import cycle: {describe_cycle(graph, c)}" for c in cycles if c not in known]
    problems += [f"KNOWN_CYCLES entry {sorted(k)} is no longer a cycle: delete it" for k in known
                 if k not in cycles]
    return problems


def test_no_import_cycles() -> None:
    graph = import_graph(ROOT, ("nydusd", "api"))
    assert len(graph) > 10 and sum(map(len, graph.values())) > 50  # the graph is not vacuously empty
    problems = cycle_problems(graph, KNOWN_CYCLES)
    assert not problems, "\n".join(problems)


def _package(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_cycle_check_finds_lazy_relative_and_type_checking_cycles(tmp_path: Path) -> None:
    root = _package(tmp_path, {
        "pkg/__init__.py": "VALUE = 1\n",
        "pkg/a.py": "from pkg import b\n",  # `from pkg import <submodule>` imports the submodule
        "pkg/b.py": "def f():\n    from . import a\n    return a\n",  # function-local relative import
        "pkg/sub/__init__.py": "",
        "pkg/sub/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..d import X\n",
        "pkg/d.py": "import pkg.sub.c\nX = 1\n",
        "pkg/e.py": "from pkg import VALUE\n",  # a name from __init__: an import of pkg, no cycle
        "pkg/f.py": "import pkg.e\nimport os\n",
    })
    graph = import_graph(root, ("pkg",))
    assert graph["pkg.e"] == {"pkg": 1} and graph["pkg.f"] == {"pkg.e": 1}
    assert sorted(map(sorted, import_cycles(graph))) == [["pkg.a", "pkg.b"], ["pkg.d", "pkg.sub.c"]]
    problems = cycle_problems(graph, {frozenset({"pkg.a", "pkg.b"}), frozenset({"pkg.e", "pkg.f"})})
    assert problems == ["import cycle: pkg.d (line 1) -> pkg.sub.c (line 3) -> pkg.d (of the cycle "
                        "['pkg.d', 'pkg.sub.c'])",
                        "KNOWN_CYCLES entry ['pkg.e', 'pkg.f'] is no longer a cycle: delete it"]
    # breaking the lazy import breaks that cycle: the check follows the code, not the file names
    (root / "pkg/b.py").write_text("def f():\n    return 1\n")
    assert sorted(map(sorted, import_cycles(import_graph(root, ("pkg",))))) == [["pkg.d", "pkg.sub.c"]]
