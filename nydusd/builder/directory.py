"""Directory sources (``--type dir-rafs``): walk a local tree into builder nodes.

Owns: ``walk_directory`` (sorted, iterative, never follows symlinks) and ``DirectorySource`` (the
walked tree plus the regular files whose content still has to be chunked, in blob order).
Must not import rafs; reads files only through ``open_file`` so the chunk pipeline streams them in
``chunk_size`` pieces (never whole). A file dated before 1970 gets mtime 0 (RAFS's mtime is
unsigned; debug event ``file_mtime_clamped``); stat's uid, gid and size are always in range.
Threading: single-threaded walk.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO

from nydusd.builder.tree import FileData, Node, check_name, check_xattr, keep_xattr
from nydusd.errors import BuildError
from nydusd.log import get_logger

log = get_logger(__name__)


@dataclass
class PendingFile:
    """A regular file whose content is still to be chunked: the shared data and where to read it."""

    path: bytes
    rel: bytes  # path inside the image, e.g. b"/usr/bin/ls"
    data: FileData


@dataclass
class DirectorySource:
    root: Node
    files: list[PendingFile] = field(default_factory=list)


def _read_xattrs(path: bytes) -> dict[bytes, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise BuildError(f"cannot list xattrs: {e.strerror}", path=os.fsdecode(path)) from None
    out: dict[bytes, bytes] = {}
    for name in sorted(names):
        bname = os.fsencode(name)
        if not keep_xattr(bname):
            continue
        try:
            value = os.getxattr(path, name, follow_symlinks=False)
        except OSError as e:
            if e.errno == errno.ENODATA:  # removed while walking
                continue
            raise BuildError(f"cannot read xattr: {e.strerror}", path=os.fsdecode(path),
                             xattr=name) from None
        check_xattr(bname, value, os.fsdecode(path))
        out[bname] = value
    return out


def _make_node(path: bytes, rel: bytes, name: bytes, st: os.stat_result,
               links: dict[tuple[int, int], FileData], files: list[PendingFile]) -> Node:
    mtime_ns = st.st_mtime_ns
    if mtime_ns < 0:  # dated before 1970: RAFS stores an unsigned mtime, so clamp (as tar sources do)
        log.debug("file_mtime_clamped", path=os.fsdecode(path), mtime_ns=mtime_ns)
        mtime_ns = 0
    node = Node(name=name, mode=st.st_mode, uid=st.st_uid, gid=st.st_gid,
                mtime=mtime_ns // 1_000_000_000, mtime_nsec=mtime_ns % 1_000_000_000,
                xattrs=_read_xattrs(path))
    fmt = stat.S_IFMT(st.st_mode)
    if fmt == stat.S_IFDIR:
        node.children = {}
    elif fmt == stat.S_IFREG:
        key = (st.st_dev, st.st_ino)
        shared = links.get(key) if st.st_nlink > 1 else None
        if shared is None:
            shared = FileData(size=st.st_size)
            files.append(PendingFile(path, rel, shared))
            if st.st_nlink > 1:
                links[key] = shared
        node.data = shared
    elif fmt == stat.S_IFLNK:
        try:
            node.symlink = os.readlink(path)
        except OSError as e:
            raise BuildError(f"cannot read symlink: {e.strerror}", path=os.fsdecode(path)) from None
        if not node.symlink or len(node.symlink) > 4096:
            raise BuildError("symlink target must be 1..4096 bytes", path=os.fsdecode(path))
    elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
        node.rdev = st.st_rdev
    elif fmt not in (stat.S_IFIFO, stat.S_IFSOCK):
        raise BuildError(f"unsupported file type {fmt:o}", path=os.fsdecode(path))
    return node


def walk_directory(source: str | os.PathLike[str]) -> DirectorySource:
    """Walk ``source`` (not following symlinks) into a tree whose children are sorted by raw name.

    Regular files are listed in walk order (depth-first, sorted) for the chunk pipeline; a file
    with several names in the tree appears once and every name shares its ``FileData``.
    Raises BuildError if ``source`` is not a directory, or an entry cannot be read.
    """
    top = os.fsencode(os.fspath(source))
    try:
        st = os.stat(top)  # the source itself may be a symlink to the tree; nothing below is followed
    except OSError as e:
        raise BuildError(f"cannot access source: {e.strerror}", path=os.fsdecode(top)) from None
    if not stat.S_ISDIR(st.st_mode):
        raise BuildError("source is not a directory", path=os.fsdecode(top))
    links: dict[tuple[int, int], FileData] = {}
    files: list[PendingFile] = []
    root = _make_node(top, b"/", b"/", st, links, files)
    stack: list[tuple[bytes, bytes, Node]] = [(top, b"", root)]
    while stack:
        path, rel, node = stack.pop()
        assert node.children is not None
        try:
            with os.scandir(path) as it:
                names = sorted(e.name for e in it)
        except OSError as e:
            raise BuildError(f"cannot list directory: {e.strerror}", path=os.fsdecode(path)) from None
        subdirs: list[tuple[bytes, bytes, Node]] = []
        for name in names:
            child_path = os.path.join(path, name)
            check_name(name, os.fsdecode(child_path))
            try:
                cst = os.lstat(child_path)
            except OSError as e:
                raise BuildError(f"cannot stat: {e.strerror}", path=os.fsdecode(child_path)) from None
            child_rel = rel + b"/" + name
            child = _make_node(child_path, child_rel, name, cst, links, files)
            node.children[name] = child
            if child.is_dir:
                subdirs.append((child_path, child_rel, child))
        stack.extend(reversed(subdirs))
    log.debug("directory_walked", path=os.fsdecode(top), files=len(files))
    return DirectorySource(root=root, files=files)


def file_opener(path: bytes) -> Callable[[], BinaryIO]:
    """A function opening ``path`` for streaming reads; its errors become BuildError."""
    def _open() -> BinaryIO:
        try:
            return open(path, "rb", buffering=0)  # noqa: SIM115 - the pipeline closes it
        except OSError as e:
            raise BuildError(f"cannot read file: {e.strerror}", path=os.fsdecode(path)) from None
    return _open
