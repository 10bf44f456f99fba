"""A vhost-user front-end in Python, for the unit tier: what QEMU does to a vhost-user-fs back-end.

It owns guest memory (a memfd, passed with SET_MEM_TABLE like QEMU's memory-backend-memfd), lays out
split rings in it, sends the vhost-user message sequence QEMU 7.2 sends, and plays the guest driver:
puts FUSE requests into descriptor chains (direct or indirect), kicks, waits for the call eventfd
and reads the used ring. The real-QEMU tests (tests/virtiofs/test_guest.py) check the same back-end
against an actual guest kernel.
"""

from __future__ import annotations

import mmap
import os
import select
import socket
import struct

from nydusd.virtiofs import vhost_user as vu

DESC = struct.Struct("<QIHH")
MEM_SIZE = 32 << 20
UVA_BASE = 0x7F00_0000_0000  # where "QEMU" has the memory mapped (ring addresses use it)
GPA_BASE = 0x1_0000_0000      # guest-physical base of the region (descriptor addresses use it)


class Ring:
    def __init__(self, fe: Frontend, index: int, size: int, base: int) -> None:
        self.fe, self.index, self.size = fe, index, size
        self.desc = base
        self.avail = base + 16 * size
        self.used = (self.avail + 6 + 2 * size + 4095) & ~4095
        self.avail_idx = 0
        self.used_seen = 0
        self.kick = os.eventfd(0, os.EFD_NONBLOCK)
        self.call = os.eventfd(0, os.EFD_NONBLOCK)
        self.free = list(range(size))

    def put_desc(self, i: int, addr: int, length: int, flags: int, nxt: int,
                 table: int | None = None) -> None:
        at = (table if table is not None else self.desc) + 16 * i
        DESC.pack_into(self.fe.mm, at, addr, length, flags, nxt)

    def publish(self, head: int) -> None:
        mm = self.fe.mm
        struct.pack_into("<H", mm, self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        struct.pack_into("<H", mm, self.avail + 2, self.avail_idx)
        os.eventfd_write(self.kick, 1)

    def wait_used(self, timeout: float = 10.0) -> list[tuple[int, int]]:
        """Completions since the last call (waits for the call eventfd)."""
        out: list[tuple[int, int]] = []
        poller = select.poll()
        poller.register(self.call, select.POLLIN)
        while not out:
            if not poller.poll(timeout * 1000):
                raise TimeoutError(f"no completion on queue {self.index}")
            try:
                os.eventfd_read(self.call)
            except BlockingIOError:
                pass
            idx = struct.unpack_from("<H", self.fe.mm, self.used + 2)[0]
            while self.used_seen != idx:
                slot = self.used + 4 + 8 * (self.used_seen % self.size)
                out.append(struct.unpack_from("<II", self.fe.mm, slot))
                self.used_seen = (self.used_seen + 1) & 0xFFFF
        return out


class Frontend:
    def __init__(self, path: str, *, queues: int = 2, size: int = 64) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)  # blocking: waits while the back-end finishes a previous connection
        self.sock.settimeout(20)
        self.memfd = os.memfd_create("guest", 0)
        os.ftruncate(self.memfd, MEM_SIZE)
        self.mm = mmap.mmap(self.memfd, MEM_SIZE)
        self.rings = [Ring(self, i, size, 0x10000 * (i + 1)) for i in range(queues)]
        self.heap = 0x100000
        self.heap_start = self.heap

    # -- vhost-user messages ------------------------------------------------------------------

    def send(self, request: int, payload: bytes = b"", fds: list[int] | None = None,
             flags: int = vu.VERSION) -> None:
        data = vu.HEADER.pack(request, flags, len(payload)) + payload
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] if fds else []
        self.sock.sendmsg([data], anc)

    def recv_reply(self, request: int) -> bytes:
        head = self._recv(vu.HEADER.size)
        req, flags, size = vu.HEADER.unpack(head)
        assert req == request and flags & vu.FLAG_REPLY, (req, flags)
        return self._recv(size)

    def _recv(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError("back-end closed the connection")
            buf += chunk
        return buf

    def call(self, request: int, payload: bytes = b"", fds: list[int] | None = None) -> bytes:
        self.send(request, payload, fds)
        return self.recv_reply(request)

    def ack(self, request: int, payload: bytes = b"", fds: list[int] | None = None) -> int:
        self.send(request, payload, fds, flags=vu.VERSION | vu.FLAG_NEED_REPLY)
        return struct.unpack("<Q", self.recv_reply(request))[0]

    def setup(self) -> None:
        """The sequence QEMU 7.2 sends for vhost-user-fs-pci (see the module docstring)."""
        features = struct.unpack("<Q", self.call(vu.Request.GET_FEATURES))[0]
        assert features & vu.VIRTIO_F_VERSION_1 and features & vu.VHOST_USER_F_PROTOCOL_FEATURES
        proto = struct.unpack("<Q", self.call(vu.Request.GET_PROTOCOL_FEATURES))[0]
        assert proto & vu.PROTOCOL_F_MQ and proto & vu.PROTOCOL_F_REPLY_ACK
        self.send(vu.Request.SET_PROTOCOL_FEATURES, struct.pack("<Q", 0x9))
        assert struct.unpack("<Q", self.call(vu.Request.GET_QUEUE_NUM))[0] >= len(self.rings)
        self.send(vu.Request.SET_OWNER)
        for r in self.rings:
            self.send(vu.Request.SET_VRING_CALL, struct.pack("<Q", r.index), [r.call])
        self.send(vu.Request.SET_FEATURES, struct.pack("<Q", features & (vu.VIRTIO_F_VERSION_1
                  | vu.VHOST_USER_F_PROTOCOL_FEATURES | vu.VIRTIO_RING_F_INDIRECT_DESC)))
        table = vu.MEM_HEAD.pack(1, 0) + vu.MEM_REGION.pack(GPA_BASE, MEM_SIZE, UVA_BASE, 0)
        assert self.ack(vu.Request.SET_MEM_TABLE, table, [self.memfd]) == 0
        for r in self.rings:
            self.send(vu.Request.SET_VRING_NUM, vu.VRING_STATE.pack(r.index, r.size))
            self.send(vu.Request.SET_VRING_BASE, vu.VRING_STATE.pack(r.index, 0))
            self.send(vu.Request.SET_VRING_ADDR, vu.VRING_ADDR.pack(
                r.index, 0, UVA_BASE + r.desc, UVA_BASE + r.used, UVA_BASE + r.avail, 0))
            self.send(vu.Request.SET_VRING_KICK, struct.pack("<Q", r.index), [r.kick])
        for r in self.rings:
            self.send(vu.Request.SET_VRING_ENABLE, vu.VRING_STATE.pack(r.index, 1))

    def stop_rings(self) -> list[int]:
        """What QEMU does at guest power-off: GET_VRING_BASE per queue."""
        bases = []
        for r in self.rings:
            index, base = vu.VRING_STATE.unpack(self.call(vu.Request.GET_VRING_BASE,
                                                          vu.VRING_STATE.pack(r.index, 0)))
            assert index == r.index
            bases.append(base)
        return bases

    # -- the guest driver ---------------------------------------------------------------------

    def alloc(self, size: int) -> int:
        if self.heap + size > MEM_SIZE:  # a ring buffer: old requests are long completed
            self.heap = self.heap_start
        at = self.heap
        self.heap = (self.heap + size + 63) & ~63
        return at

    def submit(self, queue: int, request: bytes, out_size: int, *, indirect: bool = False,
               split: int = 2) -> tuple[int, int]:
        """Put one request on ``queue`` (readable part split into ``split`` buffers, writable part
        of ``out_size`` in two buffers); returns (head, out buffer offset)."""
        r = self.rings[queue]
        bufs: list[tuple[int, int, int]] = []  # addr len flags
        pieces = [request[i * len(request) // split:(i + 1) * len(request) // split] for i in range(split)]
        for piece in pieces:
            if piece:
                at = self.alloc(len(piece))
                self.mm[at:at + len(piece)] = piece
                bufs.append((at, len(piece), 0))
        out_at = self.alloc(out_size) if out_size else 0
        if out_size:
            half = out_size // 2 or out_size
            bufs.append((out_at, half, 2))
            if out_size - half:
                bufs.append((out_at + half, out_size - half, 2))
        head = r.free.pop(0)
        if indirect:
            table = self.alloc(16 * len(bufs))
            for i, (addr, length, flags) in enumerate(bufs):
                nxt = i + 1 if i + 1 < len(bufs) else 0
                r.put_desc(i, GPA_BASE + addr, length, flags | (1 if nxt else 0), nxt, table)
            r.put_desc(head, GPA_BASE + table, 16 * len(bufs), 4, 0)
        else:
            ids = [head] + [r.free.pop(0) for _ in bufs[1:]]
            for i, (addr, length, flags) in enumerate(bufs):
                nxt = ids[i + 1] if i + 1 < len(bufs) else 0
                r.put_desc(ids[i], GPA_BASE + addr, length, flags | (1 if i + 1 < len(bufs) else 0), nxt)
            r.free += ids[1:]
        r.publish(head)
        return head, out_at

    def roundtrip(self, request: bytes, *, queue: int = 1, out_size: int = 1 << 16,
                  indirect: bool = False) -> bytes:
        head, out_at = self.submit(queue, request, out_size, indirect=indirect)
        used = self.rings[queue].wait_used()
        assert len(used) == 1 and used[0][0] == head, used
        self.rings[queue].free.append(head)
        return bytes(self.mm[out_at:out_at + used[0][1]])

    def close(self) -> None:
        self.sock.close()
        for r in self.rings:
            os.close(r.kick)
            os.close(r.call)
        self.mm.close()
        os.close(self.memfd)
