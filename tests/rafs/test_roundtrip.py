"""Property tests: random trees written as RAFS v5 and v6 read back identical (names, types, modes,
ownership, times, devices, symlinks up to 4 KiB, xattrs, hard links, file content through the blob),
plus targeted cases: deep paths, 255-byte names, large directories (binary-searched lookups across
many v6 directory blocks), iter_dir offsets, threads sharing one RafsSuper."""

from __future__ import annotations

import os
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nydusd.compress import Compressor
from nydusd.digest import DigestAlgorithm
from nydusd.errors import BuildError, InvalidArgument, NotFound
from nydusd.rafs import load_bootstrap
from nydusd.rafs.blobmeta import load_chunk_infos
from nydusd.rafs.content import read_file
from tests.rafs.imagegen import Image, Spec, build_image, dump_image, expected_dump
from tests.rafs.strategies import CHUNK, roots


def _check(image: Image, root: Spec, version: int) -> None:
    with load_bootstrap(image.bootstrap) as sb:
        assert sb.version == version
        source = lambda blob, off, n: image.blob[off:off + n]  # noqa: E731
        assert dump_image(sb, source) == expected_dump(root)
        for path, inode in sb.walk():  # lookup agrees with the walk
            assert sb.resolve(path).ino == inode.ino
        if version == 6 and sb.blobs[0].chunk_count:
            entries = load_chunk_infos(lambda off, n: image.blob[off:off + n], sb.blobs[0])
            assert len(entries) == sb.blobs[0].chunk_count


@pytest.mark.parametrize("version", [5, 6])
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.data_too_large])
@given(root=roots(), compressor=st.sampled_from([Compressor.ZSTD, Compressor.LZ4_BLOCK, Compressor.NONE]),
       digester=st.sampled_from(list(DigestAlgorithm)))
def test_random_trees_round_trip(version: int, root: Spec, compressor: Compressor,
                                 digester: DigestAlgorithm) -> None:
    root.perm = root.perm  # the root is a directory like any other
    image = build_image(root, version=version, compressor=compressor, digester=digester, chunk_size=CHUNK)
    _check(image, root, version)


def _deep(depth: int, name: bytes) -> Spec:
    leaf = Spec("file", data=b"bottom")
    for _ in range(depth):
        leaf = Spec("dir", perm=0o755, children={name: leaf})
    return leaf


@pytest.mark.parametrize("version", [5, 6])
def test_deep_paths_and_long_names(version: int) -> None:
    root = _deep(300, b"d" * 255)
    image = build_image(root, version=version)
    _check(image, root, version)
    with load_bootstrap(image.bootstrap) as sb:
        path = b"/" + b"/".join([b"d" * 255] * 300)
        assert sb.path_of(sb.resolve(path).ino) == path


@pytest.mark.parametrize("version", [5, 6])
def test_large_directory_lookup_and_offsets(version: int) -> None:
    kids = {b"f%05d" % i: Spec("file", data=b"%d" % (i % 7)) for i in range(3000)}
    kids[b"sub"] = Spec("dir", perm=0o755, children={b"x": Spec("fifo")})
    root = Spec("dir", perm=0o755, children=kids)
    image = build_image(root, version=version)
    with load_bootstrap(image.bootstrap) as sb:
        root_ino = sb.root_ino
        if version == 6:
            assert sb.get_inode(root_ino).size > 10 * 4096  # many directory blocks
        for i in range(0, 3000, 97):
            assert sb.lookup(root_ino, b"f%05d" % i).size == len(b"%d" % (i % 7))
        for missing in (b"f03000", b"a", b"zzz", b"f0000", b"f00001x"):
            with pytest.raises(NotFound):
                sb.lookup(root_ino, missing)
        entries = list(sb.iter_dir(root_ino))
        assert len(entries) == 3003 and [e[2] for e in entries] == list(range(1, 3004))
        resumed = list(sb.iter_dir(root_ino, entries[1500][2]))
        assert resumed == entries[1501:]
        assert sb.lookup(sb.lookup(root_ino, b"sub").ino, b"..").ino == root_ino
        with pytest.raises(InvalidArgument):
            list(sb.iter_dir(sb.lookup(root_ino, b"f00001").ino))
        with pytest.raises(NotFound):
            sb.get_inode(10**9)


def test_concurrent_readers_share_one_super() -> None:
    kids = {b"f%04d" % i: Spec("file", data=os.urandom(5000 + i)) for i in range(200)}
    root = Spec("dir", perm=0o755, children=kids)
    image = build_image(root, version=6)
    source = lambda blob, off, n: image.blob[off:off + n]  # noqa: E731
    errors: list[BaseException] = []
    with load_bootstrap(image.bootstrap) as sb:
        def worker(seed: int) -> None:
            try:
                for i in range(seed, 200, 4):
                    ino = sb.lookup(sb.root_ino, b"f%04d" % i).ino
                    assert read_file(sb, ino, source) == kids[b"f%04d" % i].data
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors


def test_writer_rejects_invalid_models() -> None:
    bad = [Spec("dir", children={b"a/b": Spec("file")}),
           Spec("dir", children={b"s": Spec("symlink", target=b"")}),
           Spec("dir", children={b"x": Spec("file", xattrs={b"other.ns": b"v"})})]
    for spec in bad:
        with pytest.raises(BuildError):
            build_image(spec, version=6)
