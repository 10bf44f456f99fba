"""Compare a mounted image with its source tree: names, types, modes, owners, times, sizes, content,
symlink targets, device numbers, xattrs and hard-link structure."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _xattrs(path: Path) -> dict[str, bytes]:
    names = os.listxattr(path, follow_symlinks=False)
    return {n: os.getxattr(path, n, follow_symlinks=False) for n in names}


def compare_trees(src: Path, mnt: Path, *, xattrs: bool = True) -> int:
    """Assert ``mnt`` mirrors ``src``; returns the number of entries compared."""
    links: dict[int, int] = {}
    count = 0
    _compare_entry(src, mnt, links, xattrs)
    for dirpath, dirnames, filenames in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        names = sorted(dirnames + filenames)
        assert sorted(os.listdir(mnt / rel)) == names, f"directory listing differs in /{rel}"
        for name in names:
            _compare_entry(src / rel / name, mnt / rel / name, links, xattrs)
            count += 1
    return count


def _compare_entry(s_path: Path, m_path: Path, links: dict[int, int], xattrs: bool) -> None:
    s, m = os.lstat(s_path), os.lstat(m_path)
    where = str(m_path)
    assert stat.S_IFMT(s.st_mode) == stat.S_IFMT(m.st_mode), f"type differs: {where}"
    assert stat.S_IMODE(s.st_mode) == stat.S_IMODE(m.st_mode), f"mode differs: {where}"
    assert (s.st_uid, s.st_gid) == (m.st_uid, m.st_gid), f"owner differs: {where}"
    assert s.st_mtime_ns == m.st_mtime_ns, f"mtime differs: {where}"
    assert s.st_nlink == m.st_nlink, f"nlink differs: {where} {s.st_nlink} != {m.st_nlink}"
    if stat.S_ISREG(s.st_mode):
        assert s.st_size == m.st_size, f"size differs: {where}"
        assert _digest(s_path) == _digest(m_path), f"content differs: {where}"
        assert m.st_blocks * 512 >= m.st_size, f"st_blocks too small: {where}"
        if s.st_nlink > 1:
            # hard links: the same source inode must map to one mounted inode, and back
            assert links.setdefault(s.st_ino, m.st_ino) == m.st_ino, f"hard link split: {where}"
    elif stat.S_ISLNK(s.st_mode):
        assert os.readlink(s_path) == os.readlink(m_path), f"symlink target differs: {where}"
        assert s.st_size == m.st_size, f"symlink size differs: {where}"
    elif stat.S_ISCHR(s.st_mode) or stat.S_ISBLK(s.st_mode):
        assert s.st_rdev == m.st_rdev, f"rdev differs: {where}"
    if xattrs:
        assert _xattrs(s_path) == _xattrs(m_path), f"xattrs differ: {where}"
    if len(set(links.values())) != len(links):
        raise AssertionError(f"two source inodes share one mounted inode near {where}")
