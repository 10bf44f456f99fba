"""Images for the daemon tests: a sample source tree covering every inode kind, built into RAFS v5/v6
with the real builder, plus the nydusd config pointing at it (localfs backend + blobcache)."""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from nydusd.builder import BuildOptions, build

MTIME_NS = 1_650_000_000_123_456_789


def sample_tree(root: Path, *, big: bool = True, seed: int = 7) -> Path:
    """A directory tree with regular files (empty, small, multi-chunk), nested dirs, symlinks, hard
    links, a fifo, device nodes (as root), xattrs, special modes, uid/gid and nanosecond mtimes."""
    import random

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
class Image:
    bootstrap: str
    blob_dir: str
    version: int

    def config(self, cache_dir: Path | None = None, *, digest_validate: bool = True,
               enable_xattr: bool = True, **extra: object) -> dict:
        """Legacy v1 JSON (what the snapshotter sends): localfs backend, blobcache (or no cache)."""
        cache: dict = {"type": ""}
        if cache_dir is not None:
            os.makedirs(cache_dir, exist_ok=True)
            cache = {"type": "blobcache", "config": {"work_dir": str(cache_dir)}}
        return {"device": {"backend": {"type": "localfs", "config": {"dir": self.blob_dir}},
                           "cache": cache},
                "mode": "direct", "digest_validate": digest_validate, "enable_xattr": enable_xattr,
                **extra}

    def config_text(self, cache_dir: Path | None = None, **kw: object) -> str:
        return json.dumps(self.config(cache_dir, **kw))

    def write_config(self, path: Path, cache_dir: Path | None = None, **kw: object) -> str:
        path.write_text(self.config_text(cache_dir, **kw))
        return str(path)


def build_image(src: Path, out: Path, *, version: int = 6, chunk_size: int = 1 << 20,
                compressor: str = "zstd", prefetch: tuple[str, ...] = ()) -> Image:
    """Build ``src`` into ``out/image.boot`` + ``out/blobs/<blob id>`` with the real builder."""
    from nydusd.compress import Compressor

    blobs = out / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    opts = BuildOptions(fs_version=version, bootstrap_path=str(out / "image.boot"), blob_dir=str(blobs),
                        chunk_size=chunk_size, compressor=Compressor[compressor.upper()],
                        prefetch_patterns=prefetch)
    result = build(str(src), opts)
    return Image(result.bootstrap_path or str(out / "image.boot"), str(blobs), version)
