"""A v5 inode whose size does not match its chunk list: ``check`` reports it, ``unpack`` refuses it
before writing anything of it, and a large legitimately sparse file (hole flag) is streamed with
bounded memory. Fuzz part: every regular file of a generated v5 image gets mutated sizes and chunk
counts; the only outcome allowed is CorruptMetadata or a tar of exactly the claimed size."""

from __future__ import annotations

import random
import struct
import tarfile
import tracemalloc
from pathlib import Path

import pytest

from nydusd.cli.image import main
from nydusd.errors import CorruptMetadata
from nydusd.rafs import layout as L
from nydusd.rafs import load_bootstrap
from nydusd.rafs.content import LocalBlobs
from nydusd.rafs.stats import check_image
from nydusd.rafs.unpack import write_tar
from tests.rafs.imagegen import Image, Spec, build_image

I_SIZE, I_FLAGS, I_CHILD_COUNT = 64, 80, 96  # field offsets inside a v5 inode record


class _Sink:
    """A write-only file object that only counts (a tar of a claimed 2 GiB never touches disk)."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> int:
        self.written += len(data)
        return len(data)


def _image(tmp_path: Path) -> tuple[Image, dict[bytes, int]]:
    """A v5 image and the inode-record offset of each regular file, by name."""
    kids = {b"one": Spec("file", data=b"a" * 5000), b"two": Spec("file", data=bytes(range(256)) * 600),
            b"empty": Spec("file", data=b"")}
    image = build_image(Spec("dir", perm=0o755, children=kids), version=5, chunk_size=0x10000)
    (tmp_path / image.blob_id).write_bytes(image.blob)
    with load_bootstrap(image.bootstrap) as sb:
        offs = {path[1:]: inode.meta_offset for path, inode in sb.walk() if inode.is_reg}
    return image, offs


def _patch(boot: bytes, off: int, fmt: str, value: int) -> bytes:
    buf = bytearray(boot)
    struct.pack_into(fmt, buf, off, value)
    return bytes(buf)


def _unpack(boot: bytes, blobs: Path) -> int:
    sink = _Sink()
    with load_bootstrap(boot) as sb, LocalBlobs(str(blobs)) as source:
        write_tar(sb, source, sink)  # type: ignore[arg-type]
    return sink.written


@pytest.mark.parametrize("size", [72057594037931436, 2 << 30, 0x10000 + 1, 4999, 0])
def test_size_that_does_not_match_the_chunks_is_reported_and_refused(tmp_path: Path, size: int) -> None:
    image, offs = _image(tmp_path)
    bad = _patch(image.bootstrap, offs[b"one"] + I_SIZE, "<Q", size)
    with load_bootstrap(bad) as sb, pytest.raises(CorruptMetadata, match="size|end of its file"):
        check_image(sb)
    tracemalloc.start()
    try:
        with pytest.raises(CorruptMetadata, match="size|end of its file"):
            _unpack(bad, tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20


def test_cli_check_and_unpack_name_the_inconsistency(capsys: pytest.CaptureFixture[str],
                                                     tmp_path: Path) -> None:
    image, offs = _image(tmp_path)
    boot = tmp_path / "boot"
    boot.write_bytes(_patch(image.bootstrap, offs[b"one"] + I_SIZE, "<Q", 72057594037931436))
    assert main(["check", "-B", str(boot)]) != 0
    err = capsys.readouterr().err
    assert "file size does not match its chunk count" in err and "size=72057594037931436" in err
    out = tmp_path / "out.tar"
    assert main(["unpack", str(boot), "-D", str(tmp_path), "--output", str(out)]) != 0
    assert "file size does not match its chunk count" in capsys.readouterr().err
    assert not out.exists()


def test_sparse_file_of_2_gib_streams_with_bounded_memory(tmp_path: Path) -> None:
    image, offs = _image(tmp_path)
    boot = _patch(image.bootstrap, offs[b"one"] + I_SIZE, "<Q", 2 << 30)
    boot = _patch(boot, offs[b"one"] + I_FLAGS, "<Q", L.V5_INODE_HAS_HOLE)
    with load_bootstrap(boot) as sb:
        check_image(sb)  # consistent: a hole after the first chunk
    tracemalloc.start()
    try:
        written = _unpack(boot, tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert written > 2 << 30
    assert peak < 16 << 20, f"peak {peak >> 20} MiB"


def test_fuzz_mutated_sizes_and_chunk_counts(tmp_path: Path) -> None:
    image, offs = _image(tmp_path)
    rng = random.Random(14)
    outcomes = {"refused": 0, "unpacked": 0}
    for case in range(300):
        name = rng.choice(sorted(offs))
        off = offs[name]
        if rng.random() < 0.7:
            size = rng.choice([0, 1, 4999, 5000, 5001, 0xFFFF, 0x10000, 0x10001, 153600, 2 << 30,
                               1 << 56, (1 << 64) - 1, rng.randrange(1 << 20)])
            bad = _patch(image.bootstrap, off + I_SIZE, "<Q", size)
        else:
            bad = _patch(image.bootstrap, off + I_CHILD_COUNT, "<I", rng.randrange(0, 6))
        if rng.random() < 0.2:
            bad = _patch(bad, off + I_FLAGS, "<Q", L.V5_INODE_HAS_HOLE)
            if struct.unpack_from("<Q", bad, off + I_SIZE)[0] > 1 << 24:
                continue  # a legitimately sparse file that large only costs time here
        try:
            with load_bootstrap(bad) as sb:
                check_image(sb)
                claimed = {p[1:]: i.size for p, i in sb.walk() if i.is_reg}
            written = _unpack(bad, tmp_path)
        except CorruptMetadata:
            outcomes["refused"] += 1
            continue
        except Exception as e:  # pragma: no cover - the failure report
            pytest.fail(f"case {case}: {type(e).__name__}: {e}")
        assert written >= sum(claimed.values())
        outcomes["unpacked"] += 1
    assert outcomes["refused"] > 100 and outcomes["unpacked"] > 10, outcomes


def test_consistent_image_unpacks_to_its_content(tmp_path: Path) -> None:
    image, _ = _image(tmp_path)
    out = tmp_path / "ok.tar"
    with load_bootstrap(image.bootstrap) as sb, LocalBlobs(str(tmp_path)) as source, out.open("wb") as f:
        check_image(sb)
        write_tar(sb, source, f)
    with tarfile.open(out) as tar:
        assert tar.extractfile("two").read() == bytes(range(256)) * 600  # type: ignore[union-attr]
