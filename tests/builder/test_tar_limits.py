"""Hostile tar headers: path depth / PATH_MAX (bounded memory, clean BuildError), out-of-range
uid / gid / size (BuildError naming the field), mtimes outside RAFS's u64 (clamped, built for v5
and v6), and a directory source with a pre-1970 file. Every tar is made here with tarfile."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import tracemalloc
from pathlib import Path

import pytest

from nydusd.builder.tarball import read_tarball
from nydusd.builder.tree import FileData, Node
from nydusd.errors import BuildError
from tests.harness.images import build_image, snapshot_image

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


@pytest.mark.parametrize("field, value, fmt", [
    ("uid", -1, tarfile.PAX_FORMAT), ("gid", -1, tarfile.PAX_FORMAT),
    ("uid", 99_999_999_999, tarfile.PAX_FORMAT), ("gid", 1 << 32, tarfile.PAX_FORMAT),
    ("uid", -2, tarfile.GNU_FORMAT),  # base-256 header field
])
def test_out_of_range_ids_are_build_errors(tmp_path: Path, field: str, value: int, fmt: int) -> None:
    tar = tmp_path / "bad.tar"
    tar.write_bytes(_tar([_file("ok"), _file("dir/f", **{field: value})], fmt))
    with pytest.raises(BuildError, match=f"{field} {value} out of range") as ei:
        build_image(tar, tmp_path / "out", tar=True)
    assert ei.value.context == {"path": "dir/f", "field": field}
    assert list((tmp_path / "out").iterdir()) == []


def test_negative_size_is_a_build_error(tmp_path: Path) -> None:
    raw = _tar([_file("neg", size=-1)], tarfile.GNU_FORMAT)
    assert raw[124:136] == b"\xff" * 12  # GNU base-256 -1 in the size field
    tar = tmp_path / "neg.tar"
    tar.write_bytes(raw)
    res = subprocess.run([NYDUS_IMAGE, "create", "-t", "tar-rafs", "-B", str(tmp_path / "b"),
                          "-D", str(tmp_path), str(tar)], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "size -1 is negative" in res.stderr and "field=size" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["neg.tar"]


@pytest.mark.parametrize("fs_version", [5, 6])
def test_mtimes_outside_u64_are_clamped(tmp_path: Path, fs_version: int) -> None:
    infos = [
        _file("before_1970", mtime=-5),
        _file("half_second_before", mtime=0, pax_headers={"mtime": "-0.5"}),
        _file("far_future", mtime=10 ** 22),
        _file("u64_max", mtime=(1 << 64) - 1),
        _file("normal", mtime=0, pax_headers={"mtime": "1600000000.25"}),
    ]
    tar = tmp_path / "t.tar"
    tar.write_bytes(_tar(infos))
    img = build_image(tar, tmp_path / "out", tar=True, fs_version=fs_version)
    got = snapshot_image(img.bootstrap, img.blob_dir)
    assert got[b"/before_1970"].mtime == (0, 0)
    assert got[b"/half_second_before"].mtime == (0, 0)
    assert got[b"/far_future"].mtime == ((1 << 64) - 1, 0)
    assert got[b"/u64_max"].mtime == ((1 << 64) - 1, 0)
    assert got[b"/normal"].mtime == (1_600_000_000, 250_000_000)


def test_directory_with_pre_1970_file_builds(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "old").write_bytes(b"old")
    (src / "new").write_bytes(b"new")
    os.utime(src / "old", ns=(0, -86_400 * 1_000_000_000 - 5))
    os.utime(src / "new", ns=(0, 1_600_000_000_123_456_789))
    if os.stat(src / "old").st_mtime_ns >= 0:
        pytest.skip("this filesystem cannot store a pre-1970 mtime")
    img = build_image(src, tmp_path / "out")
    got = snapshot_image(img.bootstrap, img.blob_dir)
    assert got[b"/old"].mtime == (0, 0)
    assert got[b"/new"].mtime == (1_600_000_000, 123_456_789)
    assert got[b"/old"].size == 3
