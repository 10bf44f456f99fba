"""Hostile tar headers: path depth / PATH_MAX (bounded memory, clean BuildError).
Every tar is made here with tarfile."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import tracemalloc
from pathlib import Path

import pytest

from nydusd.builder.tarball import read_tarball
from nydusd.builder.tree import FileData, Node
from nydusd.errors import BuildError

NYDUS_IMAGE = str(Path(sys.executable).parent / "nydus-image")


def _tar(infos: list[tarfile.TarInfo], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for info in infos:
            tf.addfile(info, io.BytesIO(b"\0" * info.size) if info.isreg() and info.size > 0 else None)
    return buf.getvalue()


def _file(name: str, **kw: object) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size = 1
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti


def _deep(depth: int) -> str:
    return "a/" * (depth - 1) + "x"


def _read(data: bytes) -> Node:
    def on_file(fd: FileData, reader: io.BufferedReader, path: str) -> None:
        reader.read(fd.size)
    return read_tarball(io.BytesIO(data), on_file)  # type: ignore[arg-type]


def _peak_reading(data: bytes) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        try:
            _read(data)
        except BuildError:
            pass
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_deep_path_within_path_max_builds_with_linear_memory() -> None:
    """Depth 2047 is the deepest a 4096-byte PATH_MAX allows ("/a/a/.../x" + NUL); reading it must
    take memory linear in the depth (the old tuple-per-prefix index was quadratic: ~16 MiB here)."""
    deepest = _tar([_file(_deep(2047))])
    root = _read(deepest)
    node = root
    for _ in range(2046):
        assert node.children is not None and node.implicit
        node = node.children[b"a"]
    assert node.children is not None and node.children[b"x"].size == 1
    half, full = _peak_reading(_tar([_file(_deep(1000))])), _peak_reading(_tar([_file(_deep(2000))]))
    assert full < 4 << 20, f"reading a depth-2000 path peaked at {full} bytes"
    assert full < 3 * half, f"memory grows faster than linearly: {half} -> {full}"


@pytest.mark.parametrize("name", [_deep(2048), "d/" + "n" * 200 + "/" + "/".join(["m" * 250] * 16),
                                  _deep(300_000)], ids=["depth2048", "long-components", "depth300000"])
def test_path_longer_than_path_max_is_rejected_cheaply(name: str) -> None:
    data = _tar([_file(name)])
    with pytest.raises(BuildError, match="longer than PATH_MAX") as ei:
        _read(data)
    assert ei.value.context["path"].startswith(name[:100])
    assert _peak_reading(data) < 16 * len(data) + (1 << 20)  # linear (was 24 GB for 600 KB)


def test_hard_link_target_longer_than_path_max_is_rejected() -> None:
    link = tarfile.TarInfo("l")
    link.type, link.linkname = tarfile.LNKTYPE, _deep(3000)
    with pytest.raises(BuildError, match="longer than PATH_MAX"):
        _read(_tar([_file("x"), link]))


def test_cli_rejects_deep_tar_and_leaves_no_output(tmp_path: Path) -> None:
    tar = tmp_path / "deep.tar"
    tar.write_bytes(_tar([_file(_deep(10_000))]))
    out = tmp_path / "out"
    out.mkdir()
    res = subprocess.run([NYDUS_IMAGE, "create", "-t", "tar-rafs", "-B", str(out / "b"), "-D", str(out),
                          str(tar)], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "longer than PATH_MAX" in res.stderr
    assert "Traceback" not in res.stderr
    assert list(out.iterdir()) == []
