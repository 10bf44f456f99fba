"""Split virtqueues (virtio 1.x §2.7) as a device sees them, in guest memory shared with QEMU.

Owns: ``VirtQueue`` -- the vring state vhost-user sets (size, ring addresses, base index, kick/call/
err eventfds, enable), popping descriptor chains from the avail ring (direct and indirect
descriptors, readable part then writable part, bounds and loop checks), pushing completions onto
the used ring and signalling the guest through the call eventfd; ``Chain`` (one request's buffers)
and ``BadChain`` (a chain the driver should never have produced).

Must not import: the daemon, the FUSE engine, the vhost-user socket code (it receives a
``GuestMemory`` and fds).

Threading: one thread pops (the queue's poller); completions may be pushed from any worker thread
(``push`` takes the queue's lock). Stores to the used ring are ordered (element before index) and
this back-end runs on x86 (total store order), so no explicit barrier is needed in Python.
"""

from __future__ import annotations

import os
import struct
import threading
from dataclasses import dataclass, field

from nydusd.errors import NydusError
from nydusd.virtiofs.vhost_user import GuestMemory

DESC = struct.Struct("<QIHH")  # addr len flags next
U16 = struct.Struct("<H")
USED_ELEM = struct.Struct("<II")  # id len
DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1
MAX_QUEUE_SIZE = 32768
#: a request's readable part is at most this large (FUSE requests: headers + a write's data)
MAX_CHAIN_BYTES = 64 << 20


class BadChain(NydusError):
    """A descriptor chain that breaks the virtio rules (out of bounds, loop, order)."""

    #: the chain's head index when known (the server returns it unused)
    head: int | None = None


@dataclass
class Chain:
    head: int
    readable: list[memoryview] = field(default_factory=list)
    writable: list[memoryview] = field(default_factory=list)

    def request_bytes(self) -> bytes:
        if len(self.readable) == 1:
            return bytes(self.readable[0])
        return b"".join(self.readable)

    @property
    def writable_size(self) -> int:
        return sum(len(w) for w in self.writable)

    def write(self, segments: list[bytes | bytearray | memoryview]) -> int:
        """Scatter ``segments`` over the writable buffers; returns bytes written (truncating
        what does not fit)."""
        bufs = self.writable
        bi, bo, total = 0, 0, 0
        for seg in segments:
            src = memoryview(seg).cast("B")
            so = 0
            while so < len(src) and bi < len(bufs):
                dst = bufs[bi]
                n = min(len(src) - so, len(dst) - bo)
                dst[bo:bo + n] = src[so:so + n]
                so += n
                bo += n
                total += n
                if bo == len(dst):
                    bi, bo = bi + 1, 0
        return total


class VirtQueue:
    """One split virtqueue. Fields are set by vhost-user messages; ``attach`` maps the rings."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.size = 0
        self.desc_addr = self.avail_addr = self.used_addr = 0
        self.base = 0  # SET_VRING_BASE: the next avail index to consume
        self.kick_fd: int | None = None
        self.call_fd: int | None = None
        self.err_fd: int | None = None
        self.enabled = False
        self.last_avail = 0
        self.used_idx = 0
        self._desc: memoryview | None = None
        self._avail: memoryview | None = None
        self._used: memoryview | None = None
        self.mem: GuestMemory | None = None
        self._lock = threading.Lock()

    # -- configuration -------------------------------------------------------------------------

    def set_size(self, size: int) -> None:
        if not 0 < size <= MAX_QUEUE_SIZE or size & (size - 1):
            raise BadChain("queue size must be a power of two up to 32768", queue=self.index,
                           size=size)
        self.size = size

    def attach(self, mem: GuestMemory) -> None:
        """Map the rings in ``mem`` (after SET_VRING_ADDR). Raises ProtocolError/BadChain."""
        if not self.size:
            raise BadChain("queue size not set", queue=self.index)
        n = self.size
        self._desc = mem.uva(self.desc_addr, DESC.size * n)
        self._avail = mem.uva(self.avail_addr, 4 + 2 * n + 2)
        self._used = mem.uva(self.used_addr, 4 + USED_ELEM.size * n + 2)
        self.mem = mem
        self.last_avail = self.base
        # the used index continues from what the device left (0 on a fresh ring)
        self.used_idx = U16.unpack_from(self._used, 2)[0]

    def detach(self) -> None:
        for view in (self._desc, self._avail, self._used):
            if view is not None:
                view.release()
        self._desc = self._avail = self._used = None
        self.mem = None

    @property
    def ready(self) -> bool:
        return self._desc is not None and self.kick_fd is not None

    def close_fds(self) -> None:
        for name in ("kick_fd", "call_fd", "err_fd"):
            fd = getattr(self, name)
            if fd is not None:
                setattr(self, name, None)
                try:
                    os.close(fd)
                except OSError:
                    pass

    # -- the driver -> device direction ----------------------------------------------------------

    def avail_idx(self) -> int:
        assert self._avail is not None
        return int(U16.unpack_from(self._avail, 2)[0])

    def pop(self) -> Chain | None:
        """The next available chain, or None if the ring is empty. Raises BadChain (the ring
        position is consumed, so a bad chain is reported once)."""
        avail = self._avail
        if avail is None or self.last_avail == self.avail_idx():
            return None
        n = self.size
        head = U16.unpack_from(avail, 4 + 2 * (self.last_avail % n))[0]
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        if head >= n:
            raise BadChain("head index out of range", queue=self.index, index=head)
        try:
            return self._walk(head)
        except BadChain as e:
            e.head = head  # the server returns the chain unused, so the guest is not left waiting
            raise
        except NydusError as e:  # a buffer outside guest memory
            raise BadChain(str(e), queue=self.index, head=head) from None

    def _walk(self, head: int) -> Chain:
        assert self._desc is not None and self.mem is not None
        chain = Chain(head)
        table, table_size, indirect = self._desc, self.size, False
        i, seen, total = head, 0, 0
        while True:
            if i >= table_size:
                raise BadChain("descriptor index out of range", queue=self.index, index=i)
            seen += 1
            if seen > table_size:
                raise BadChain("descriptor chain loops", queue=self.index, head=head)
            addr, length, flags, nxt = DESC.unpack_from(table, DESC.size * i)
            if flags & DESC_F_INDIRECT:
                if indirect or flags & DESC_F_NEXT:
                    raise BadChain("nested or chained indirect table", queue=self.index)
                if length == 0 or length % DESC.size or length // DESC.size > MAX_QUEUE_SIZE:
                    raise BadChain("bad indirect table length", queue=self.index, length=length)
                table, table_size, indirect = self.mem.gpa(addr, length), length // DESC.size, True
                i, seen = 0, 0
                continue
            total += length
            if total > MAX_CHAIN_BYTES:
                raise BadChain("descriptor chain too large", queue=self.index)
            buf = self.mem.gpa(addr, length)
            if flags & DESC_F_WRITE:
                chain.writable.append(buf)
            elif chain.writable:
                raise BadChain("readable descriptor after a writable one", queue=self.index)
            else:
                chain.readable.append(buf)
            if not flags & DESC_F_NEXT:
                return chain
            i = nxt

    # -- the device -> driver direction ----------------------------------------------------------

    def push(self, head: int, length: int) -> None:
        """Return chain ``head`` with ``length`` bytes written, and signal the guest."""
        with self._lock:
            used = self._used
            if used is None:
                return
            slot = self.used_idx % self.size
            USED_ELEM.pack_into(used, 4 + USED_ELEM.size * slot, head, length)
            self.used_idx = (self.used_idx + 1) & 0xFFFF
            U16.pack_into(used, 2, self.used_idx)
            self._signal()

    def _signal(self) -> None:
        avail = self._avail
        fd = self.call_fd
        if fd is None or avail is None or U16.unpack_from(avail, 0)[0] & AVAIL_F_NO_INTERRUPT:
            return
        try:
            os.eventfd_write(fd, 1)
        except OSError:
            pass
