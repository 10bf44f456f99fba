"""The import rules of docs/architecture.md: layers import downward, each third-party library has
one home. Parsed from the source with ``ast``; a violation names the module and the import."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

LEAF = {"errors", "config", "compress", "digest", "metrics", "log"}
# layer -> layers it may import (besides leaf modules and itself)
ALLOWED: dict[str, set[str]] = {
    "leaf": set(),
    "http": set(),
    "oci": {"http"},
    "storage": {"oci", "http"},
    "rafs": {"storage"},
    "fs": {"rafs", "storage"},
    "virtiofs": {"fs"},
    "daemon": {"fs", "virtiofs", "rafs", "storage", "upgrade"},
    "upgrade": set(),
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


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (module -> modules it imports), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


@pytest.mark.parametrize("package", ["converter", "oci", "storage/backend", "config"])
def test_packages_have_no_import_cycles(package: str) -> None:
    # Every import counts, also lazy ones inside functions and those under TYPE_CHECKING: a cycle
    # means two modules that cannot be understood (or moved) one without the other.
    paths = sorted((ROOT / "nydusd" / package).rglob("*.py"))
    names = {_module_name(p) for p in paths}
    graph = {_module_name(p): {n for n in _imports(p) if n in names} for p in paths}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_cycle_finder_finds_cycles() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
