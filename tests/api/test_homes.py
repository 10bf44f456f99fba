"""Import homes owned by the API side (complements tests/test_architecture.py): prometheus_client
lives only in api/prometheus.py, and nydusctl is a pure client (no daemon/fs/storage/rafs, no
requests)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def sources() -> list[Path]:
    return sorted(p for d in ("nydusd", "api", "bench") for p in (ROOT / d).rglob("*.py"))


def test_prometheus_client_has_one_home() -> None:
    users = {str(p.relative_to(ROOT)) for p in sources()
             if any(n.split(".")[0] == "prometheus_client" for n in imports(p))}
    assert users == {"api/prometheus.py"}


def test_nydusctl_is_a_client() -> None:
    names = imports(ROOT / "nydusd" / "cli" / "ctl.py")
    forbidden = {n for n in names if n.split(".")[0] in ("requests", "llfuse", "fastapi", "uvicorn")
                 or n.startswith(("nydusd.daemon", "nydusd.fs", "nydusd.storage", "nydusd.rafs"))}
    assert forbidden == set()
    assert "api.client" in names
