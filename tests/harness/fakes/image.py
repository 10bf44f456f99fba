"""In-process doubles of ``RafsSuper`` and ``BlobDevice`` for the pure and adapter tiers of tests/fs.

A ``FakeSuper`` is built from a nested dict (name -> bytes for files, dict for directories,
``("symlink", target)``, ``("hardlink", "/path")``); ``FakeDevice`` serves the files' bytes and can be
told to fail for chosen inodes (a backend outage)."""

from __future__ import annotations

import stat
from dataclasses import dataclass
from typing import Any

from nydusd.errors import BackendError, NotFound


@dataclass
class FakeInode:
    ino: int
    mode: int
    size: int = 0
    nlink: int = 1
    uid: int = 1000
    gid: int = 1000
    rdev: int = 0
    mtime: int = 1_700_000_000
    mtime_nsec: int = 5


class FakeSuper:
    def __init__(self, tree: dict[str, Any], root_ino: int = 1) -> None:
        self.root_ino = root_ino
        self.inodes: dict[int, FakeInode] = {}
        self.children: dict[int, list[tuple[bytes, int]]] = {}
        self.data: dict[int, bytes] = {}
        self.links: dict[int, bytes] = {}
        self.xattr: dict[int, dict[bytes, bytes]] = {}
        self.paths: dict[str, int] = {}
        self._next = root_ino
        self._add_dir(root_ino, "", tree)
        self.inode_count = len(self.inodes)

    def _alloc(self) -> int:
        self._next += 1
        return self._next

    def _add_dir(self, ino: int, path: str, tree: dict[str, Any]) -> None:
        self.inodes[ino] = FakeInode(ino, stat.S_IFDIR | 0o755, nlink=2)
        self.children[ino] = []
        self.paths[path or "/"] = ino
        for name, value in sorted(tree.items()):
            child_path = f"{path}/{name}"
            if isinstance(value, tuple) and value[0] == "hardlink":
                child = self.paths[value[1]]
                self.inodes[child].nlink += 1
            else:
                child = self._alloc()
                if isinstance(value, dict):
                    self._add_dir(child, child_path, value)
                    self.inodes[ino].nlink += 1
                elif isinstance(value, tuple) and value[0] == "symlink":
                    self.inodes[child] = FakeInode(child, stat.S_IFLNK | 0o777, size=len(value[1]))
                    self.links[child] = value[1]
                else:
                    self.inodes[child] = FakeInode(child, stat.S_IFREG | 0o644, size=len(value))
                    self.data[child] = value
                    self.xattr[child] = {b"user.name": name.encode()}
            self.paths[child_path] = child
            self.children[ino].append((name.encode(), child))

    def get_inode(self, ino: int) -> FakeInode:
        try:
            return self.inodes[ino]
        except KeyError:
            raise NotFound("no such inode", inode=ino) from None

    def lookup(self, parent: int, name: bytes) -> FakeInode:
        for n, child in self.children[parent]:
            if n == name:
                return self.inodes[child]
        raise NotFound("no such entry", name=name)

    def iter_dir(self, ino: int, offset: int = 0) -> Any:
        """Like RafsSuper.iter_dir: "." and ".." first, then the children by name."""
        parent = next((p for p, kids in self.children.items() if any(c == ino for _n, c in kids)), ino)
        entries = [(b".", ino), (b"..", parent), *self.children[ino]]
        for i, (name, child) in enumerate(entries[offset:], start=offset + 1):
            yield name, child, i

    def readlink(self, ino: int) -> bytes:
        return self.links[ino]

    def xattrs(self, ino: int) -> dict[bytes, bytes]:
        self.get_inode(ino)
        return self.xattr.get(ino, {})

    def chunks(self, ino: int) -> list[Any]:
        return [("chunk", ino)]


class FakeFile:
    def __init__(self, device: FakeDevice, chunks: list[Any], size: int) -> None:
        self.device, self.chunks, self.size = device, chunks, size

    def read(self, offset: int, size: int) -> bytes:
        return self.device.read(self.chunks, offset, max(0, min(offset + size, self.size) - offset))

    def read_nowait(self, offset: int, size: int) -> memoryview | None:
        return None   # the fake's data is never "in the page cache": every read takes ``read``


class FakeDevice:
    def __init__(self, sb: FakeSuper) -> None:
        self.sb = sb
        self.broken: set[int] = set()
        self.closed = False

    def read(self, chunks: list[Any], offset: int, size: int) -> bytes:
        ino = chunks[0][1]
        if ino in self.broken or self.closed:
            raise BackendError("blob is missing", blob_id="fake", offset=offset)
        return self.sb.data[ino][offset:offset + size]

    def open_file(self, chunks: list[Any], size: int) -> FakeFile:
        return FakeFile(self, chunks, size)

    def prefetch(self, chunks: Any, *, merge_limit: int | None = None, bulk: bool = False) -> int:
        return 0

    def stop_prefetch(self) -> None:
        pass

    def wait_ondemand_quiet(self, stop: Any) -> None:
        pass

    def close(self) -> None:
        self.closed = True


SAMPLE = {
    "etc": {"hosts": b"127.0.0.1 localhost\n", "empty": b""},
    "bin": {"sh": b"#!" + bytes(range(256)) * 40, "link": ("symlink", b"sh")},
    "hard": ("hardlink", "/etc/hosts"),
    "readme": b"hello nydus\n",
}
