"""Chunk ranges a blob cannot hold: a bootstrap whose chunk points past 2^63 (or past its blob) gives
`nydus-image check` / `unpack` a clean error line and a non-zero exit, never a traceback; and
LocalBlobs / bounded sources refuse such ranges before touching the file or backend."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from nydusd.cli.image import main
from nydusd.errors import CorruptMetadata, IntegrityError
from nydusd.rafs import load_bootstrap
from nydusd.rafs.content import LocalBlobs, bounded, read_file
from nydusd.rafs.model import Node
from nydusd.rafs.writer import bootstrap_bytes
from tests.rafs.imagegen import Image, Spec, build_image

HUGE = (1 << 63) + 5
NYDUS_IMAGE = Path(sys.executable).parent / "nydus-image"
DATA = b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(512))


def _image(version: int) -> Image:
    data = DATA  # 16 KiB -> 4 distinct chunks
    return build_image(Spec("dir", perm=0o755, children={b"big": Spec("file", data=data)}), version=version)


def _with_offset(img: Image, offset: int, version: int) -> bytes:
    """``img``'s bootstrap with the second chunk of /big moved to ``offset``."""
    big: Node = next(n for n in img.model.root.children if n.name == b"big")
    big.chunks[1] = replace(big.chunks[1], compressed_offset=offset)
    return bootstrap_bytes(img.model, version=version)


def _write(tmp_path: Path, img: Image, boot: bytes) -> tuple[Path, Path]:
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (blobs / img.blob_id).write_bytes(img.blob)
    path = tmp_path / "image.boot"
    path.write_bytes(boot)
    return path, blobs


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("version", [5, 6])
def test_check_and_unpack_reject_offset_beyond_off_t(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                     version: int) -> None:
    img = _image(version)
    boot, blobs = _write(tmp_path, img, _with_offset(img, HUGE, version))
    for argv in (("check", str(boot)), ("check", str(boot), "-D", str(blobs))):
        rc, _, err = run(capsys, *argv)
        assert rc == 1, err
        assert err.startswith("error: chunk lies beyond the end of its blob")
        assert f"offset={HUGE}" in err and f"blob_id={img.blob_id}" in err and "path=/big" in err
    out = tmp_path / "out.tar"
    rc, _, err = run(capsys, "unpack", str(boot), "--blob-dir", str(blobs), "--output", str(out))
    assert rc == 1
    assert err.startswith("error: blob range out of bounds") and f"offset={HUGE}" in err
    assert not out.exists()
    rc, _, err = run(capsys, "unpack", str(boot), "--backend-type", "localfs",
                     "--backend-config", json.dumps({"dir": str(blobs)}), "--output", str(out))
    assert rc == 1
    assert err.startswith("error: blob range out of bounds") and f"offset={HUGE}" in err
    assert not out.exists()


def test_real_command_prints_one_error_line(tmp_path: Path) -> None:
    img = _image(5)
    boot, blobs = _write(tmp_path, img, _with_offset(img, HUGE, 5))
    for argv in (["check", "-B", str(boot), "-D", str(blobs)],
                 ["unpack", "-B", str(boot), "-D", str(blobs), "--output", str(tmp_path / "o.tar")]):
        proc = subprocess.run([str(NYDUS_IMAGE), *argv], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1
        assert "Traceback" not in proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
        assert str(HUGE) in proc.stderr


@pytest.mark.parametrize("version", [5, 6])
def test_chunk_past_blob_size_in_table(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                       version: int) -> None:
    """An offset a file could hold but past the blob's recorded size is corrupt metadata too."""
    img = _image(version)
    boot, blobs = _write(tmp_path, img, _with_offset(img, len(img.blob) - 10, version))
    rc, _, err = run(capsys, "check", str(boot))
    assert rc == 1
    assert err.startswith("error: chunk lies beyond the end of its blob")
    assert f"blob_size={len(img.blob)}" in err


def test_truncated_blob_file_is_integrity_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    img = _image(6)
    boot, blobs = _write(tmp_path, img, img.bootstrap)
    rc, _, err = run(capsys, "check", str(boot), "-D", str(blobs))
    assert rc == 0, err
    (blobs / img.blob_id).write_bytes(img.blob[:100])
    rc, _, err = run(capsys, "check", str(boot), "-D", str(blobs))
    assert rc == 1
    assert err.startswith("error: blob range beyond the end of the blob file") and "blob_size=100" in err


def test_local_blobs_and_bounded_refuse_bad_ranges(tmp_path: Path) -> None:
    img = _image(6)
    boot, blobs = _write(tmp_path, img, img.bootstrap)
    sb = load_bootstrap(str(boot))
    blob = sb.blobs[0]
    try:
        with LocalBlobs(str(blobs)) as local:
            assert local(blob, 0, 16) == img.blob[:16]
            assert read_file(sb, sb.resolve(b"/big").ino, local) == DATA
            with pytest.raises(CorruptMetadata, match="out of bounds") as ei:
                local(blob, HUGE, 16)
            assert ei.value.context["blob_id"] == img.blob_id and ei.value.context["offset"] == HUGE
            with pytest.raises(CorruptMetadata):
                local(blob, -1, 16)
            with pytest.raises(CorruptMetadata):
                local(blob, (1 << 63) - 8, 16)  # the end overflows off_t
            with pytest.raises(IntegrityError, match="beyond the end") as ie:
                local(blob, len(img.blob) - 8, 16)
            assert ie.value.context["blob_size"] == len(img.blob)
        calls: list[tuple[int, int]] = []

        def backend(b: object, off: int, size: int) -> bytes:
            calls.append((off, size))
            return bytes(size)

        src = bounded(backend)
        assert src(blob, 5, 3) == bytes(3)
        with pytest.raises(CorruptMetadata):
            src(blob, HUGE, 3)
        assert calls == [(5, 3)]  # the bad range never reached the backend
    finally:
        sb.close()
