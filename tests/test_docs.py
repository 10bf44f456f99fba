"""The project's docs stand alone: README.md and docs/*.md never point outside the repository
(no ``../shared``), and every relative link in them names a file that exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_the_docs_set_is_there() -> None:
    names = {p.name for p in DOCS}
    assert {"architecture.md", "read-path.md", "cache-layout.md", "testing.md", "containers.md",
            "containerd.md"} <= names


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_no_reference_outside_the_repository(doc: Path) -> None:
    text = doc.read_text()
    assert "../shared" not in text and "/work/shared" not in text


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_resolve(doc: Path) -> None:
    targets = [t for t in LINK.findall(doc.read_text()) if "://" not in t]
    assert targets or doc.name != "README.md"
    missing = [t for t in targets if not (doc.parent / t).exists()]
    assert not missing, f"{doc.name}: broken links {missing}"
