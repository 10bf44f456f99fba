"""Unit tier of the vhost-user-fs back-end: a Python front-end (tests/harness/vhost_frontend.py)
plays QEMU and the guest driver over a real unix socket, memfd guest memory and eventfds."""

from __future__ import annotations

import json
import os
import random
import socket
import struct
import threading
import time

import pytest

from nydusd.config import load_config
from nydusd.daemon.instance import build_rafs_instance
from nydusd.fs.proto import messages as m
from nydusd.fs.proto.messages import Opcode
from nydusd.fs.vfs import Vfs
from nydusd.virtiofs import vhost_user as vu
from nydusd.virtiofs.server import VirtioFsServer
from tests.harness.fuse_wire import FuseClient
from tests.harness.images import build_image, make_tree, snapshot_dir
from tests.harness.vhost_frontend import GPA_BASE, MEM_SIZE, Frontend

TREE = {"a.txt": b"hello nydus\n", "d/": None, "d/b.bin": random.Random(5).randbytes(300_000),
        "d/link": ("symlink", "../a.txt")}
EXPECTED_EVENTS = ("virtiofs_protocol_error", "virtiofs_connection_error", "virtiofs_bad_chain",
                   "fuse_request_dropped")


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vimg")
    src = make_tree(tmp / "src", TREE)
    return src, build_image(src, tmp / "out")


@pytest.fixture
def server(image, tmp_path):
    _src, img = image
    cfg = {"version": 2, "backend": {"type": "localfs", "localfs": {"dir": str(img.blob_dir)}}}
    inst = build_rafs_instance("/", str(img.bootstrap), load_config(json.dumps(cfg)))
    vfs = Vfs()
    vfs.attach("/", inst.fs, inst.stats)
    srv = VirtioFsServer(vfs, str(tmp_path / "vhost.sock"), threads=2)
    srv.mount()
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    yield srv
    srv.stop("test over")
    thread.join(10)
    assert not thread.is_alive()
    srv.close()
    inst.close()
    assert not os.path.exists(srv.path)


def _client(fe: Frontend, indirect: bool = False) -> FuseClient:
    client = FuseClient(lambda req: fe.roundtrip(req, indirect=indirect))
    client.init()
    return client


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _fd_targets() -> list[str]:
    out = []
    for f in os.listdir("/proc/self/fd"):
        try:
            out.append(f + "=" + os.readlink(f"/proc/self/fd/{f}"))
        except OSError:
            pass
    return out


@pytest.mark.parametrize("indirect", [False, True], ids=["direct", "indirect"])
def test_requests_over_virtqueues(server, image, indirect):
    src, _img = image
    fe = Frontend(server.path)
    fe.setup()
    client = _client(fe, indirect)
    assert client.read_file(client.resolve("d/b.bin").nodeid) == TREE["d/b.bin"]
    assert client.readlink(client.resolve("d/link").nodeid) == b"../a.txt"
    names = sorted(d.name for d in client.listdir(client.resolve("d").nodeid, plus=True))
    assert names == [b".", b"..", b"b.bin", b"link"]
    assert client.getattr(client.resolve("a.txt").nodeid).size == snapshot_dir(src)[b"/a.txt"].size
    # hiprio queue: a FORGET is consumed with nothing written
    forget = m.IN_HEADER.pack(48, Opcode.FORGET, 99, 5, 0, 0, 0, 0) + struct.pack("<Q", 1)
    head, _ = fe.submit(0, forget, 0)
    assert fe.rings[0].wait_used() == [(head, 0)]
    # a reply that does not fit the writable buffers is an error reply, never an overrun
    fh = client.open(client.resolve("d/b.bin").nodeid)
    req = m.IN_HEADER.pack(80, Opcode.READ, 1000, 2, 0, 0, 0, 0) + m.READ_IN.pack(fh, 0, 65536, 0, 0, 0, 0)
    out = fe.roundtrip(req, out_size=4096 + 16)
    assert m.OUT_HEADER.unpack_from(out)[:2] == (4096 + 16, 0)
    # power-off: GET_VRING_BASE reports how far each ring was consumed
    bases = fe.stop_rings()
    assert bases == [fe.rings[0].avail_idx, fe.rings[1].avail_idx]
    fe.close()


def test_reconnect_keeps_the_mounts_and_releases_the_old_guests_files(server):
    fe = Frontend(server.path)
    fe.setup()
    client = _client(fe)
    node = client.resolve("d/b.bin").nodeid
    client.open(node)
    client.open(node)
    assert server.vfs.open_handles() == 2
    fe.close()  # QEMU killed: no GET_VRING_BASE, just EOF
    deadline = time.monotonic() + 5
    while server.vfs.open_handles() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.vfs.open_handles() == 0
    fe2 = Frontend(server.path)
    fe2.setup()
    client2 = _client(fe2)
    assert client2.read_file(client2.resolve("a.txt").nodeid) == b"hello nydus\n"
    fe2.close()
    assert server.connections == 2


def _random_message(rng: random.Random) -> tuple[bytes, list[int]]:
    """Mostly well-formed messages in random order (so a connection survives long enough to take
    many), one in ten broken: bad lengths, versions, indexes, memory tables, fd counts."""
    req = rng.choice([vu.Request.GET_FEATURES, vu.Request.GET_PROTOCOL_FEATURES,
                      vu.Request.SET_PROTOCOL_FEATURES, vu.Request.GET_QUEUE_NUM,
                      vu.Request.SET_OWNER, vu.Request.SET_VRING_NUM, vu.Request.SET_VRING_BASE,
                      vu.Request.SET_VRING_ENABLE, vu.Request.SET_VRING_CALL,
                      vu.Request.SET_VRING_ERR, vu.Request.SET_VRING_ADDR,
                      vu.Request.GET_VRING_BASE, vu.Request.SET_FEATURES])
    index = rng.randrange(2)
    nfds = 0
    flags = vu.VERSION | (vu.FLAG_NEED_REPLY if rng.random() < 0.3 else 0)
    if req in (vu.Request.SET_VRING_NUM, vu.Request.SET_VRING_BASE, vu.Request.SET_VRING_ENABLE,
               vu.Request.GET_VRING_BASE):
        payload = vu.VRING_STATE.pack(index, rng.choice([1, 64, 256, 1024]))
    elif req in (vu.Request.SET_VRING_CALL, vu.Request.SET_VRING_ERR):
        payload = struct.pack("<Q", index)
        nfds = 1
    elif req == vu.Request.SET_VRING_ADDR:
        payload = vu.VRING_ADDR.pack(index, 0, *(rng.getrandbits(64) for _ in range(4)))
    elif req == vu.Request.SET_FEATURES:
        payload = struct.pack("<Q", vu.VIRTIO_F_VERSION_1)
    elif req == vu.Request.SET_PROTOCOL_FEATURES:
        payload = struct.pack("<Q", 0x9)
    else:
        payload = b""
    size = len(payload)
    if rng.random() < 0.1:  # break it
        kind = rng.randrange(8)
        if kind == 0:
            req = rng.choice([0, 99, 0xFFFFFFFF, vu.Request.SET_LOG_BASE, vu.Request.SET_SLAVE_REQ_FD])
        elif kind == 1:
            size = rng.choice([0, 5000, 0xFFFFFFFF, max(0, len(payload) - 1)])
        elif kind == 2:
            flags = rng.choice([0, 2, 0xFF])
        elif kind == 3:
            req, n = vu.Request.SET_MEM_TABLE, rng.choice([0, 1, 2, 9, 0xFFFFFFFF])
            payload = vu.MEM_HEAD.pack(n, 0) + vu.MEM_REGION.pack(
                rng.getrandbits(64), rng.choice([0, 4096, MEM_SIZE, 1 << 63]), rng.getrandbits(64),
                rng.choice([0, 4096, 1 << 62]))
            size = len(payload)
            nfds = rng.choice([0, 1, 2])
        elif kind == 4:
            payload = vu.VRING_STATE.pack(rng.choice([9, 255, 0xFFFFFFFF]), 64)
            req, size = vu.Request.SET_VRING_NUM, 8
        elif kind == 5:
            req, payload = vu.Request.SET_VRING_KICK, struct.pack("<Q", rng.choice([0x100, 0x1FF, 7]))
            size = 8
        elif kind == 6:
            nfds = rng.choice([2, 9])
        else:
            payload = rng.randbytes(rng.randrange(0, 64))
            size = len(payload)
    return vu.HEADER.pack(req, flags, size) + payload[:4096], [os.eventfd(0) for _ in range(nfds)]


def _connect(path: str) -> socket.socket:
    """Connect, waiting while the back-end is still busy with the previous connection."""
    deadline = time.monotonic() + 10
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
        except BlockingIOError:
            s.close()
            assert time.monotonic() < deadline, "back-end stopped accepting connections"
            time.sleep(0.01)
            continue
        s.settimeout(5)
        return s


def test_malformed_vhost_user_messages_never_crash_or_leak(server, logs):
    logs.allowed.update(dict.fromkeys(EXPECTED_EVENTS))
    rng = random.Random(11)
    before = _fds()
    sent = connections = 0
    # how many messages one connection takes before the server drops it depends on timing (a
    # malformed one ends it; sendmsg fails once the close is seen): go on until 2,000 were sent
    while sent <= 2000:
        connections += 1
        assert connections <= 2000, f"only {sent} messages sent"
        s = _connect(server.path)
        try:
            for _ in range(rng.randrange(1, 80)):
                data, fds = _random_message(rng)
                rights = struct.pack(f"{len(fds)}i", *fds)
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)] if fds else []
                try:
                    s.sendmsg([data], anc)
                    sent += 1
                except OSError:
                    break
                finally:
                    for fd in fds:
                        os.close(fd)
        finally:
            s.close()
    # every connection is torn down; what the server holds is what it held before
    deadline = time.monotonic() + 10
    while _fds() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _fds() <= before, "; ".join(_fd_targets())
    fe = Frontend(server.path)
    fe.setup()
    assert _client(fe).read_file(_client(fe).resolve("a.txt").nodeid) == b"hello nydus\n"
    fe.close()


def test_random_ring_contents_never_crash(server, logs):
    """Garbage descriptor tables and avail rings: every chain is rejected or answered, the used
    ring keeps moving, and the back-end serves the next connection."""
    logs.allowed.update(dict.fromkeys(EXPECTED_EVENTS))
    rng = random.Random(4)
    for _ in range(5):
        fe = Frontend(server.path)
        fe.setup()
        ring = fe.rings[1]
        fe.mm[ring.desc:ring.desc + 16 * ring.size] = rng.randbytes(16 * ring.size)
        for _ in range(300):
            head = rng.randrange(ring.size + 8)  # some heads out of range
            struct.pack_into("<H", fe.mm, ring.avail + 4 + 2 * (ring.avail_idx % ring.size), head)
            ring.avail_idx = (ring.avail_idx + 1) & 0xFFFF
        struct.pack_into("<H", fe.mm, ring.avail + 2, ring.avail_idx)
        os.eventfd_write(ring.kick, 1)
        deadline = time.monotonic() + 20
        while struct.unpack_from("<H", fe.mm, ring.used + 2)[0] < 250 and time.monotonic() < deadline:
            time.sleep(0.05)
        # heads out of range cannot be returned; every other chain is
        assert struct.unpack_from("<H", fe.mm, ring.used + 2)[0] >= 250
        fe.close()
    fe = Frontend(server.path)
    fe.setup()
    client = _client(fe)
    assert client.read_file(client.resolve("a.txt").nodeid) == b"hello nydus\n"
    fe.close()


def test_bad_descriptor_chains_are_returned_unused(server, logs):
    logs.allowed.update(dict.fromkeys(EXPECTED_EVENTS))
    fe = Frontend(server.path)
    fe.setup()
    client = _client(fe)
    ring = fe.rings[1]
    cases = [
        [(0, GPA_BASE + MEM_SIZE - 8, 64, 0, 0)],                   # buffer beyond guest memory
        [(0, GPA_BASE + 0x200000, 64, 1, 1), (1, GPA_BASE + 0x200000, 64, 1, 0)],  # loop
        [(0, GPA_BASE + 0x200000, 64, 1, 4000)],                    # next out of range
        [(0, GPA_BASE + 0x200000, 64, 2, 0)],                       # only writable: no request
        [(0, GPA_BASE + 0x200000, 64, 2 | 1, 1), (1, GPA_BASE + 0x200000, 64, 0, 0)],  # r after w
        [(0, GPA_BASE + 0x200000, 24, 4, 0)],                       # indirect length not 16*n
        [(0, 0x10, 16, 0, 0)],                                      # address below guest memory
    ]
    for case in cases:
        for i, addr, length, flags, nxt in case:
            ring.put_desc(i, addr, length, flags, nxt)
        ring.publish(0)
        assert ring.wait_used() == [(0, 0)]
    assert logs.count("virtiofs_bad_chain") >= 5
    # the queue keeps working
    assert client.read_file(client.resolve("a.txt").nodeid) == b"hello nydus\n"
    fe.close()


def test_concurrent_requests_on_a_pool_of_workers(server):
    fe = Frontend(server.path, size=256)
    fe.setup()
    client = _client(fe)
    node = client.resolve("d/b.bin").nodeid
    fh = client.open(node)
    heads = {}
    for i in range(64):
        req = m.IN_HEADER.pack(80, Opcode.READ, 5000 + i, node, 0, 0, 0, 0) + m.READ_IN.pack(
            fh, i * 4096, 4096, 0, 0, 0, 0)
        head, out_at = fe.submit(1, req, 4096 + 16)
        heads[head] = (i, out_at)
    done: list[tuple[int, int]] = []
    while len(done) < 64:
        done += fe.rings[1].wait_used()
    for head, length in done:
        i, out_at = heads[head]
        assert length == 4096 + 16
        assert bytes(fe.mm[out_at + 16:out_at + length]) == TREE["d/b.bin"][i * 4096:(i + 1) * 4096]
    fe.close()


def test_several_request_queues_each_served(server):
    """vhost-user-fs-pci num-request-queues=2: hiprio + two request queues, both answered."""
    fe = Frontend(server.path, queues=3)
    fe.setup()
    client = _client(fe)
    node = client.resolve("a.txt").nodeid
    getattr_req = m.IN_HEADER.pack(56, Opcode.GETATTR, 7, node, 0, 0, 0, 0) + bytes(16)
    for queue in (1, 2, 2, 1):
        out = fe.roundtrip(getattr_req, queue=queue)
        assert m.OUT_HEADER.unpack_from(out) == (16 + 104, 0, 7)
    assert sorted(server.runners) == [0, 1, 2]
    fe.close()


def test_reset_device_then_set_up_again_on_the_same_connection(server):
    """RESET_DEVICE (and RESET_OWNER) stop the queues and forget the rings and the FUSE session;
    the front-end sets the device up again and is served from a fresh INIT."""
    fe = Frontend(server.path)
    fe.setup()
    client = _client(fe)
    client.open(client.resolve("a.txt").nodeid)
    assert server.vfs.open_handles() == 1
    for reset in (vu.Request.RESET_DEVICE, vu.Request.RESET_OWNER):
        assert fe.ack(reset) == 0  # processed: the queues are stopped before the rings are reused
        for r in fe.rings:
            r.avail_idx = r.used_seen = 0
            r.free = list(range(r.size))
            fe.mm[r.desc:r.used + 4 + 8 * r.size + 2] = bytes(r.used + 4 + 8 * r.size + 2 - r.desc)
        fe.setup()
        assert server.vfs.open_handles() == 0
        client = _client(fe)
        assert client.read_file(client.resolve("a.txt").nodeid) == b"hello nydus\n"
    fe.close()
