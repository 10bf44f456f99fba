"""The kernel's side of the FUSE protocol, for tests: encode requests, decode replies.

``FuseClient(send)`` speaks to anything that takes one request's bytes and returns the reply's bytes
(the engine directly, or a virtqueue round trip), keeps the ``unique`` counter and checks that each
reply's header matches its request (length, unique).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import NamedTuple

from nydusd.fs.proto import messages as m
from nydusd.fs.proto.messages import Opcode

Send = Callable[[bytes], bytes]


class FuseReplyError(Exception):
    def __init__(self, err: int) -> None:
        super().__init__(err)
        self.errno = err


class Stat(NamedTuple):
    ino: int
    size: int
    blocks: int
    atime: int
    mtime: int
    ctime: int
    atimensec: int
    mtimensec: int
    ctimensec: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    blksize: int
    flags: int


class Entry(NamedTuple):
    nodeid: int
    entry_valid: float
    attr_valid: float
    attr: Stat


class Dirent(NamedTuple):
    ino: int
    off: int
    type: int
    name: bytes
    entry: Entry | None


def decode_entry(data: bytes, at: int = 0) -> Entry:
    nodeid, _gen, ev, av, evn, avn = m.ENTRY_OUT_HEAD.unpack_from(data, at)
    attr = Stat(*m.ATTR.unpack_from(data, at + m.ENTRY_OUT_HEAD.size))
    return Entry(nodeid, ev + evn / 1e9, av + avn / 1e9, attr)


class FuseClient:
    def __init__(self, send: Send) -> None:
        self.send = send
        self.unique = 0

    def call(self, opcode: int, nodeid: int = 1, payload: bytes = b"") -> bytes:
        self.unique += 1
        req = m.IN_HEADER.pack(m.IN_HEADER.size + len(payload), opcode, self.unique, nodeid,
                               0, 0, 0, 0) + payload
        reply = self.send(req)
        length, error, unique = m.OUT_HEADER.unpack_from(reply)
        assert length == len(reply), (length, len(reply))
        assert unique == self.unique
        if error:
            assert error < 0 and len(reply) == m.OUT_HEADER.size
            raise FuseReplyError(-error)
        return reply[m.OUT_HEADER.size:]

    def init(self, minor: int = 37, flags: int = 0xFFFFFFFF, readahead: int = 1 << 17) -> tuple:
        out = self.call(Opcode.INIT, 0, m.INIT_IN.pack(7, minor, readahead, flags) + bytes(48))
        return m.INIT_OUT.unpack(out)

    def lookup(self, parent: int, name: bytes) -> Entry:
        return decode_entry(self.call(Opcode.LOOKUP, parent, name + b"\0"))

    def getattr(self, nodeid: int) -> Stat:
        out = self.call(Opcode.GETATTR, nodeid, m.GETATTR_IN.pack(0, 0, 0))
        return Stat(*m.ATTR.unpack_from(out, m.ATTR_OUT_HEAD.size))

    def readlink(self, nodeid: int) -> bytes:
        return self.call(Opcode.READLINK, nodeid)

    def open(self, nodeid: int, flags: int = 0) -> int:
        return struct.unpack_from("<Q", self.call(Opcode.OPEN, nodeid, m.OPEN_IN.pack(flags, 0)))[0]

    def read(self, nodeid: int, fh: int, offset: int, size: int) -> bytes:
        return self.call(Opcode.READ, nodeid, m.READ_IN.pack(fh, offset, size, 0, 0, 0, 0))

    def release(self, nodeid: int, fh: int) -> None:
        self.call(Opcode.RELEASE, nodeid, m.RELEASE_IN.pack(fh, 0, 0, 0))

    def opendir(self, nodeid: int) -> int:
        return struct.unpack_from("<Q", self.call(Opcode.OPENDIR, nodeid, m.OPEN_IN.pack(0, 0)))[0]

    def readdir(self, nodeid: int, fh: int, offset: int = 0, size: int = 4096,
                plus: bool = False) -> list[Dirent]:
        op = Opcode.READDIRPLUS if plus else Opcode.READDIR
        out = self.call(op, nodeid, m.READ_IN.pack(fh, offset, size, 0, 0, 0, 0))
        entries, at = [], 0
        while at < len(out):
            entry = None
            if plus:
                entry = decode_entry(out, at)
                at += m.ENTRY_OUT_HEAD.size + m.ATTR.size
            ino, off, namelen, typ = m.DIRENT_HEAD.unpack_from(out, at)
            name = out[at + m.DIRENT_HEAD.size:at + m.DIRENT_HEAD.size + namelen]
            at += (m.DIRENT_HEAD.size + namelen + 7) & ~7
            entries.append(Dirent(ino, off, typ, name, entry))
        return entries

    def listdir(self, nodeid: int, plus: bool = False, size: int = 4096) -> list[Dirent]:
        fh = self.opendir(nodeid)
        out: list[Dirent] = []
        offset = 0
        while True:
            batch = self.readdir(nodeid, fh, offset, size, plus)
            if not batch:
                break
            out += batch
            offset = batch[-1].off
        self.call(Opcode.RELEASEDIR, nodeid, m.RELEASE_IN.pack(fh, 0, 0, 0))
        return out

    def getxattr(self, nodeid: int, name: bytes, size: int) -> bytes:
        return self.call(Opcode.GETXATTR, nodeid, m.GETXATTR_IN.pack(size, 0) + name + b"\0")

    def listxattr(self, nodeid: int, size: int) -> bytes:
        return self.call(Opcode.LISTXATTR, nodeid, m.GETXATTR_IN.pack(size, 0))

    def read_file(self, nodeid: int, chunk: int = 1 << 17) -> bytes:
        fh = self.open(nodeid)
        data, off = b"", 0
        while True:
            piece = self.read(nodeid, fh, off, chunk)
            if not piece:
                break
            data += piece
            off += len(piece)
        self.release(nodeid, fh)
        return data

    def resolve(self, path: str) -> Entry:
        nodeid = 1
        entry = None
        for part in path.strip("/").split("/"):
            entry = self.lookup(nodeid, part.encode())
            nodeid = entry.nodeid
        assert entry is not None
        return entry
