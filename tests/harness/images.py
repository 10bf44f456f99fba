"""RAFS images for tests and benchmarks, built with the real builder (nydusd.builder) and read back
with the real format library (nydusd.rafs). The one home of ``build_image``.

Use::

    from tests.harness.images import make_tree, build_image, snapshot_dir, snapshot_image
    src = make_tree(tmp_path / "src", {"a.txt": b"hello", "d/": None, "d/link": ("symlink", "../a.txt"),
                                       "d/hard": ("hardlink", "a.txt"), "big": os.urandom(3 << 20)})
    img = build_image(src, tmp_path / "out", fs_version=6, compressor="zstd")
    img.bootstrap, img.blob_dir, img.blob_id, img.blob_path   # files on disk
    assert snapshot_image(img.bootstrap, img.blob_dir) == snapshot_dir(src)

``snapshot_*`` return ``{path: Entry}``, comparable between a directory and an image: type+mode,
uid/gid, mtime (s, ns), size and sha256 of file data, symlink target, user.* xattrs, rdev, and the
hard-link group (first path of the group, in sorted order) for files with several names.

For the daemon tests: ``sample_tree`` (every inode kind) and ``build_daemon_image`` (bootstrap
``out/image.boot``, blobs in ``out/blobs``) returning a ``DaemonImage`` that writes the nydusd config
pointing at it (localfs backend + blobcache). ``make_files`` writes a flat ``{path: bytes}`` tree.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from nydusd.builder import BuildOptions, SourceType, WhiteoutSpec, build
from nydusd.compress import Compressor
from nydusd.digest import DigestAlgorithm

TreeSpec = dict[str, Any]


def make_tree(root: Path, spec: TreeSpec, mtime: int = 1_700_000_000) -> Path:
    """Create ``spec`` under ``root``: ``"name/": None`` a directory, ``bytes`` a file,
    ``("symlink", target)``, ``("hardlink", existing_relpath)``, ``("fifo",)``, ``("chr", major, minor)``
    (root only); a key ``"path@user.name"`` with a ``bytes`` value sets an xattr on an earlier
    entry. Every entry gets ``mtime`` (directories last, so it sticks)."""
    root.mkdir(parents=True, exist_ok=True)
    for rel, value in spec.items():
        if "@" in rel:
            target, _, xname = rel.partition("@")
            os.setxattr(root / target.rstrip("/"), xname, value, follow_symlinks=False)
            continue
        path = root / rel.rstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith("/"):
            path.mkdir(exist_ok=True)
        elif isinstance(value, bytes):
            path.write_bytes(value)
        elif value[0] == "symlink":
            os.symlink(value[1], path)
        elif value[0] == "hardlink":
            os.link(root / value[1], path)
        elif value[0] == "fifo":
            os.mkfifo(path)
        elif value[0] == "chr":
            os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(value[1], value[2]))
        else:
            raise ValueError(f"bad tree spec for {rel}: {value!r}")
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            os.utime(os.path.join(dirpath, name), ns=(mtime * 10**9, mtime * 10**9), follow_symlinks=False)
    os.utime(root, ns=(mtime * 10**9, mtime * 10**9))
    return root


@dataclass
class Image:
    bootstrap: Path
    blob_dir: Path
    blob_id: str | None
    blob_path: Path | None
    blobs: list[str]


def build_image(source: Path, out_dir: Path, *, fs_version: int = 6, compressor: str = "zstd",
                digester: str = "blake3", chunk_size: int = 0x100000, tar: bool = False,
                parent: Path | None = None, whiteout_spec: str = "oci", bootstrap_name: str = "image.boot",
                blob_dir: Path | None = None, **extra: Any) -> Image:
    """Build ``source`` (a directory, or a tar file with ``tar=True``) into ``out_dir``: the blob is
    ``out_dir/<blob id>`` (``blob_dir/<blob id>`` when given), the bootstrap ``out_dir/<bootstrap_name>``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    blob_dir = blob_dir or out_dir
    blob_dir.mkdir(parents=True, exist_ok=True)
    opts = BuildOptions(
        source_type=SourceType.TARBALL if tar else SourceType.DIRECTORY, fs_version=fs_version,
        compressor=Compressor.parse(compressor), digester=DigestAlgorithm.parse(digester),
        chunk_size=chunk_size, whiteout_spec=WhiteoutSpec(whiteout_spec),
        parent_bootstrap=str(parent) if parent else None, blob_dir=str(blob_dir),
        bootstrap_path=str(out_dir / bootstrap_name), **extra)
    out = build(str(source), opts)
    return Image(bootstrap=Path(out.bootstrap_path or ""), blob_dir=blob_dir, blob_id=out.blob_id,
                 blob_path=Path(out.blob_path) if out.blob_path else None, blobs=out.blobs)



def make_files(root: Path, files: dict[str, bytes]) -> Path:
    """Write ``{relative path: content}`` under ``root`` (parents created, times left as they are)."""
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


MTIME_NS = 1_650_000_000_123_456_789


def sample_tree(root: Path, *, big: bool = True, seed: int = 7) -> Path:
    """A directory tree with regular files (empty, small, multi-chunk), nested dirs, symlinks, hard
    links, a fifo, device nodes (as root), xattrs, special modes, uid/gid and nanosecond mtimes."""
    rnd = random.Random(seed)
    root.mkdir(parents=True)
    (root / "small.txt").write_bytes(b"hello nydus\n")
    (root / "empty").write_bytes(b"")
    (root / "dir" / "sub" / "deeper").mkdir(parents=True)
    (root / "dir" / "sub" / "deeper" / "leaf.bin").write_bytes(rnd.randbytes(70_000))
    (root / "dir" / "exact_chunk").write_bytes(rnd.randbytes(1 << 20))
    if big:
        (root / "dir" / "multi_chunk").write_bytes(rnd.randbytes(3 * (1 << 20) + 12345))
    for i in range(40):
        (root / "dir" / "sub" / f"f{i:03d}").write_bytes(rnd.randbytes(rnd.randrange(1, 9000)))
    os.symlink("small.txt", root / "link_rel")
    os.symlink("/etc/definitely/not/here", root / "link_dangling")
    os.symlink("../../small.txt", root / "dir" / "sub" / "link_up")
    os.link(root / "small.txt", root / "hard1")
    os.link(root / "small.txt", root / "dir" / "hard2")
    os.mkfifo(root / "fifo")
    if os.geteuid() == 0:
        os.mknod(root / "chardev", stat.S_IFCHR | 0o644, os.makedev(1, 3))
        os.mknod(root / "blockdev", stat.S_IFBLK | 0o600, os.makedev(7, 200))
        os.chown(root / "dir" / "exact_chunk", 1234, 5678)
        os.chown(root / "link_rel", 4321, 8765, follow_symlinks=False)
    os.chmod(root / "dir" / "sub", 0o1777)
    suid = root / "suid"
    suid.write_bytes(b"#!/bin/sh\n")
    os.chmod(suid, 0o4755)
    os.setxattr(root / "small.txt", "user.greeting", b"hi")
    os.setxattr(root / "dir", "user.empty", b"")
    os.setxattr(root / "dir", "trusted.nydus", b"x" * 100) if os.geteuid() == 0 else None
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            os.utime(os.path.join(dirpath, name), ns=(MTIME_NS, MTIME_NS), follow_symlinks=False)
    os.utime(root, ns=(MTIME_NS, MTIME_NS))
    return root


@dataclass
class DaemonImage:
    """An image as the daemon tests hand it to nydusd (string paths, as they go into JSON)."""

    bootstrap: str
    blob_dir: str
    version: int

    def config(self, cache_dir: Path | None = None, *, digest_validate: bool = True,
               enable_xattr: bool = True, **extra: object) -> dict[str, Any]:
        """Legacy v1 JSON (what the snapshotter sends): localfs backend, blobcache (or no cache)."""
        cache: dict[str, Any] = {"type": ""}
        if cache_dir is not None:
            os.makedirs(cache_dir, exist_ok=True)
            cache = {"type": "blobcache", "config": {"work_dir": str(cache_dir)}}
        return {"device": {"backend": {"type": "localfs", "config": {"dir": self.blob_dir}},
                           "cache": cache},
                "mode": "direct", "digest_validate": digest_validate, "enable_xattr": enable_xattr,
                **extra}

    def config_text(self, cache_dir: Path | None = None, **kw: Any) -> str:
        return json.dumps(self.config(cache_dir, **kw))

    def write_config(self, path: Path, cache_dir: Path | None = None, **kw: Any) -> str:
        path.write_text(self.config_text(cache_dir, **kw))
        return str(path)


def build_daemon_image(src: Path, out: Path, *, version: int = 6, chunk_size: int = 1 << 20,
                       compressor: str = "zstd", prefetch: tuple[str, ...] = ()) -> DaemonImage:
    """Build ``src`` into ``out/image.boot`` + ``out/blobs/<blob id>`` with the real builder."""
    img = build_image(src, out, fs_version=version, chunk_size=chunk_size, compressor=compressor,
                      blob_dir=out / "blobs", prefetch_patterns=prefetch)
    return DaemonImage(str(img.bootstrap), str(img.blob_dir), version)

class Entry(NamedTuple):
    mode: int
    uid: int
    gid: int
    mtime: tuple[int, int]
    size: int
    sha256: str | None
    symlink: bytes | None
    xattrs: tuple[tuple[bytes, bytes], ...]
    rdev: int
    link_group: bytes | None


def _user_xattrs(x: dict[bytes, bytes]) -> tuple[tuple[bytes, bytes], ...]:
    return tuple(sorted((k, v) for k, v in x.items() if k.startswith(b"user.")))


def _with_link_groups(entries: dict[bytes, Entry], groups: Iterable[list[bytes]]) -> dict[bytes, Entry]:
    """Mark every member of each hard-link group with the group's first path (sorted order)."""
    for members in groups:
        first = min(members)
        for m in members:
            entries[m] = entries[m]._replace(link_group=first)
    return entries


def snapshot_dir(root: Path, *, with_owner: bool = True) -> dict[bytes, Entry]:
    """Snapshot a real directory tree (not following symlinks)."""
    top = os.fsencode(root)
    entries: dict[bytes, Entry] = {}
    groups: dict[tuple[int, int], list[bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames.sort()
        for name in [b""] + sorted(filenames + dirnames):
            if not name and dirpath != top:
                continue
            full = os.path.join(dirpath, name) if name else dirpath
            rel = b"/" + os.path.relpath(full, top) if full != top else b"/"
            st = os.lstat(full)
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                groups.setdefault((st.st_dev, st.st_ino), []).append(rel)
            data = None
            if stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    data = hashlib.file_digest(f, "sha256").hexdigest()
            try:
                xattrs = {os.fsencode(k): os.getxattr(full, k, follow_symlinks=False)
                          for k in os.listxattr(full, follow_symlinks=False)}
            except OSError:
                xattrs = {}
            entries[rel] = Entry(
                st.st_mode, st.st_uid if with_owner else 0, st.st_gid if with_owner else 0,
                (st.st_mtime_ns // 10**9, st.st_mtime_ns % 10**9),
                st.st_size if not stat.S_ISDIR(st.st_mode) else 0, data,
                os.readlink(full) if stat.S_ISLNK(st.st_mode) else None, _user_xattrs(xattrs),
                st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else 0, None)
    return _with_link_groups(entries, groups.values())


def snapshot_image(bootstrap: Path, blob_dir: Path | None = None, *, blob_files: dict[str, str] | None = None,
                   with_owner: bool = True) -> dict[bytes, Entry]:
    """Snapshot an image through nydusd.rafs (every file's data read and digest-verified)."""
    from nydusd.rafs import load_bootstrap
    from nydusd.rafs.content import LocalBlobs, iter_file

    entries: dict[bytes, Entry] = {}
    groups: dict[int, list[bytes]] = {}
    with load_bootstrap(str(bootstrap)) as sb, LocalBlobs(str(blob_dir) if blob_dir else None,
                                                          blob_files) as blobs:
        for path, ino in sb.walk():
            data = None
            if ino.is_reg:
                h = hashlib.sha256()
                for piece in iter_file(sb, ino.ino, blobs):
                    h.update(piece)
                data = h.hexdigest()
                if ino.nlink > 1:
                    groups.setdefault(ino.ino, []).append(path)
            entries[path] = Entry(
                ino.mode, ino.uid if with_owner else 0, ino.gid if with_owner else 0,
                (ino.mtime, ino.mtime_nsec), ino.size if not ino.is_dir else 0, data,
                sb.readlink(ino.ino) if ino.is_symlink else None, _user_xattrs(sb.xattrs(ino.ino)),
                ino.rdev if stat.S_ISCHR(ino.mode) or stat.S_ISBLK(ino.mode) else 0, None)
    return _with_link_groups(entries, groups.values())
