"""The vhost-user socket protocol (the back-end side) and the guest memory it shares.

Owns: message numbers and payload layouts of the vhost-user requests QEMU sends a vhost-user-fs
back-end, ``read_message``/``send_reply`` (the 12-byte header, payload, file descriptors passed with
SCM_RIGHTS), ``GuestMemory`` (the SET_MEM_TABLE regions, mmapped from the fds QEMU passes, with
guest-physical and QEMU-virtual address translation) and ``ProtocolError`` for anything malformed.

Must not import: the daemon, the FUSE engine. Every fd received is either handed to the caller
(who owns it from then on) or closed here: a bad message never leaks one.

Threading: a connection's messages are read by one thread. ``GuestMemory`` is immutable once built
and safe to read from many threads; ``close`` must wait until no queue worker uses it.
"""

from __future__ import annotations

import mmap
import socket
import struct
from dataclasses import dataclass, field
from enum import IntEnum

from nydusd.errors import NydusError
from nydusd.fdpass import close_fds, recv_with_fds


class Request(IntEnum):
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_SLAVE_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    RESET_DEVICE = 34
    GET_MAX_MEM_SLOTS = 36


# header flags
VERSION = 0x1
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8

# virtio / vhost-user feature bits
VIRTIO_RING_F_INDIRECT_DESC = 1 << 28
VHOST_USER_F_PROTOCOL_FEATURES = 1 << 30
VIRTIO_F_VERSION_1 = 1 << 32
# protocol feature bits
PROTOCOL_F_MQ = 1 << 0
PROTOCOL_F_REPLY_ACK = 1 << 3

HEADER = struct.Struct("<III")        # request flags size
U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")    # index num
VRING_ADDR = struct.Struct("<IIQQQQ")  # index flags desc used avail log
MEM_HEAD = struct.Struct("<II")       # nregions padding
MEM_REGION = struct.Struct("<QQQQ")   # guest_phys_addr memory_size userspace_addr mmap_offset
MAX_REGIONS = 8
MAX_PAYLOAD = 4096
MAX_FDS = MAX_REGIONS
VRING_NOFD_MASK = 1 << 8
VRING_IDX_MASK = 0xFF


class ProtocolError(NydusError):
    """A malformed or unsupported vhost-user message: the connection is dropped."""


@dataclass
class Message:
    request: int
    flags: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    def take_fd(self) -> int:
        """The message's single fd (ownership passes to the caller). Raises ProtocolError."""
        if len(self.fds) != 1:
            raise ProtocolError("expected exactly one file descriptor", request=self.request,
                                fds=len(self.fds))
        fd = self.fds.pop()
        return fd

    def close_fds(self) -> None:
        fds, self.fds = self.fds, []
        close_fds(fds)

    def u64(self) -> int:
        return int(self.unpack(U64)[0])

    def unpack(self, st: struct.Struct) -> tuple[int, ...]:
        if len(self.payload) < st.size:
            raise ProtocolError("payload too short", request=self.request, size=len(self.payload),
                                need=st.size)
        return st.unpack_from(self.payload)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("peer closed the connection mid-message")
        buf += chunk
    return bytes(buf)


def read_message(sock: socket.socket) -> Message | None:
    """The next message, or None at a clean EOF. Raises ProtocolError (fds already closed),
    OSError, EOFError."""
    data, received, msg_flags = recv_with_fds(sock, HEADER.size, MAX_FDS)
    if not data:
        close_fds(received)
        return None
    try:
        if msg_flags & socket.MSG_CTRUNC:
            raise ProtocolError("too many file descriptors with one message")
        if len(data) < HEADER.size:
            data += _recv_exact(sock, HEADER.size - len(data))
        request, flags, size = HEADER.unpack(data)
        if size > MAX_PAYLOAD:
            raise ProtocolError("payload too large", request=request, size=size)
        if flags & 0x3 != VERSION:
            raise ProtocolError("unsupported vhost-user version", request=request, flags=flags)
        payload = _recv_exact(sock, size) if size else b""
    except BaseException:
        close_fds(received)
        raise
    return Message(request, flags, payload, received)


def send_reply(sock: socket.socket, msg: Message, payload: bytes) -> None:
    sock.sendall(HEADER.pack(msg.request, VERSION | FLAG_REPLY, len(payload)) + payload)


@dataclass
class Region:
    gpa: int
    size: int
    uva: int
    mm: mmap.mmap
    offset: int  # of the region inside ``mm``


class GuestMemory:
    """The guest RAM regions of one SET_MEM_TABLE, mmapped shared."""

    def __init__(self, regions: list[Region]) -> None:
        self.regions = regions
        self.view = [memoryview(r.mm) for r in regions]

    @classmethod
    def from_message(cls, msg: Message) -> GuestMemory:
        """Map the regions of a SET_MEM_TABLE message; its fds are consumed (closed once mapped).
        Raises ProtocolError."""
        try:
            nregions, _ = msg.unpack(MEM_HEAD)
            if not 0 < nregions <= MAX_REGIONS or len(msg.fds) != nregions:
                raise ProtocolError("bad memory table", regions=nregions, fds=len(msg.fds))
            if len(msg.payload) < MEM_HEAD.size + nregions * MEM_REGION.size:
                raise ProtocolError("memory table payload too short", size=len(msg.payload))
            regions: list[Region] = []
            try:
                for i in range(nregions):
                    gpa, size, uva, offset = MEM_REGION.unpack_from(
                        msg.payload, MEM_HEAD.size + i * MEM_REGION.size)
                    if size == 0 or size > 1 << 40 or offset > 1 << 40 or gpa + size > 1 << 64 \
                            or uva + size > 1 << 64:
                        raise ProtocolError("bad memory region", index=i, size=size)
                    try:
                        mm = mmap.mmap(msg.fds[i], offset + size, mmap.MAP_SHARED,
                                       mmap.PROT_READ | mmap.PROT_WRITE)
                    except (OSError, ValueError, OverflowError) as e:
                        raise ProtocolError(f"cannot map memory region: {e}", index=i) from None
                    regions.append(Region(gpa, size, uva, mm, offset))
            except BaseException:
                for r in regions:
                    r.mm.close()
                raise
            return cls(regions)
        finally:
            msg.close_fds()

    def _find(self, addr: int, length: int, physical: bool) -> memoryview:
        for region, view in zip(self.regions, self.view, strict=True):
            base = region.gpa if physical else region.uva
            if base <= addr and addr + length <= base + region.size:
                start = region.offset + addr - base
                return view[start:start + length]
        raise ProtocolError("address outside guest memory", addr=hex(addr), length=length)

    def gpa(self, addr: int, length: int) -> memoryview:
        """``length`` bytes at guest-physical ``addr`` (within one region). Raises ProtocolError."""
        return self._find(addr, length, True)

    def uva(self, addr: int, length: int) -> memoryview:
        """``length`` bytes at QEMU-virtual ``addr`` (ring addresses). Raises ProtocolError."""
        return self._find(addr, length, False)

    def close(self) -> None:
        for view in self.view:
            view.release()
        for region in self.regions:
            try:
                region.mm.close()
            except BufferError:  # a slice is still referenced somewhere: let GC unmap it
                pass
        self.regions, self.view = [], []
