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
from nydusd.daemon import build_rafs_instance
from nydusd.fs.proto import messages as m
from nydusd.fs.proto.messages import Opcode
from nydusd.fs.vfs import Vfs
from nydusd.virtiofs import vhost_user as vu
from nydusd.virtiofs.server import VirtioFsServer
from tests.harness.fuse_wire import FuseClient
from tests.harness.vhost_frontend import GPA_BASE, MEM_SIZE, Frontend
from tests.images import build_image, make_tree, snapshot_dir

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
    req = rng.choice([*list(vu.Request), 0, 99, 0xFFFFFFFF])
    kind = rng.randrange(6)
    if kind == 0:
        payload = rng.randbytes(rng.randrange(0, 64))
    elif kind == 1:  # memory tables that lie
        n = rng.choice([0, 1, 2, 9, 0xFFFFFFFF])
        payload = vu.MEM_HEAD.pack(n, 0) + vu.MEM_REGION.pack(
            rng.getrandbits(64), rng.choice([0, 4096, MEM_SIZE, 1 << 63]), rng.getrandbits(64),
            rng.choice([0, 4096, 1 << 62]))
    elif kind == 2:
        payload = vu.VRING_STATE.pack(rng.choice([0, 1, 8, 9, 255, 0xFFFFFFFF]), rng.getrandbits(32))
    elif kind == 3:
        payload = vu.VRING_ADDR.pack(rng.choice([0, 1, 50]), 0, *(rng.getrandbits(64) for _ in range(4)))
    elif kind == 4:
        payload = struct.pack("<Q", rng.choice([0, 1, 0x100, 0x101, 0x1FF, rng.getrandbits(64)]))
    else:
        payload = b""
    flags = rng.choice([1, 1 | vu.FLAG_NEED_REPLY, 0, 2, 0xFF])
    size = len(payload) if rng.random() < 0.8 else rng.choice([0, 5000, 0xFFFFFFFF, len(payload) + 3])
    nfds = rng.choice([0, 0, 1, 2, 9])
    fds = [os.eventfd(0) for _ in range(nfds)]
    return vu.HEADER.pack(req, flags, size) + payload, fds


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
    for _ in range(60):  # connections
        s = _connect(server.path)
        try:
            for _ in range(rng.randrange(1, 40)):
                data, fds = _random_message(rng)
                rights = struct.pack(f"{len(fds)}i", *fds)
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)] if fds else []
                try:
                    s.sendmsg([data], anc)
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
    assert _fds() <= before
    fe = Frontend(server.path)
    fe.setup()
    assert _client(fe).read_file(_client(fe).resolve("a.txt").nodeid) == b"hello nydus\n"
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
