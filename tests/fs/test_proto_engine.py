"""Pure tier: our FUSE protocol engine (nydusd.fs.proto) over a real image, spoken to as the kernel
would -- request bytes in, reply bytes out -- including thousands of malformed requests."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import stat
import struct
import time
from pathlib import Path

import pytest

from nydusd.config import load_config
from nydusd.daemon.instance import build_rafs_instance
from nydusd.fs.proto import messages as m
from nydusd.fs.proto.engine import FuseEngine
from nydusd.fs.proto.messages import Opcode
from nydusd.fs.vfs import Vfs
from tests.harness.fuse_wire import FuseClient, FuseReplyError
from tests.harness.images import build_image, make_tree, snapshot_dir

TREE = {
    "a.txt": b"hello nydus\n",
    "big.bin": random.Random(3).randbytes((3 << 20) + 12345),
    "empty": b"",
    "d/": None,
    "d/e/": None,
    "d/e/deep.txt": b"deep\n" * 1000,
    "d/link": ("symlink", "../a.txt"),
    "d/hard": ("hardlink", "a.txt"),
    "a.txt@user.color": b"blue",
    "a.txt@user.empty": b"",
    **{f"many/f{i:04d}": f"{i}\n".encode() for i in range(300)},
}


def _config(blob_dir: Path) -> str:
    return json.dumps({"version": 2, "backend": {"type": "localfs", "localfs": {"dir": str(blob_dir)}},
                       "rafs": {"enable_xattr": True}})


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("img")
    src = make_tree(tmp / "src", TREE)
    return src, build_image(src, tmp / "out")


def _instance(image, path="/"):
    _src, img = image
    return build_rafs_instance(path, str(img.bootstrap), load_config(_config(img.blob_dir)))


@pytest.fixture
def served(image):
    inst = _instance(image)
    vfs = Vfs()
    vfs.attach("/", inst.fs, inst.stats)
    engine = FuseEngine(vfs)
    client = FuseClient(lambda req: b"".join(bytes(s) for s in engine.handle(req) or []))
    client.init()
    yield engine, client, inst
    inst.close()


def _walk(client: FuseClient, plus: bool) -> dict[bytes, tuple]:
    """type/mode, uid, gid, size, sha256, symlink target, link group of every path (like harness.images)."""
    out: dict[bytes, tuple] = {}
    groups: dict[int, list[bytes]] = {}

    def visit(nodeid: int, path: bytes) -> None:
        st = client.getattr(nodeid)
        digest = link = None
        if stat.S_ISREG(st.mode):
            digest = hashlib.sha256(client.read_file(nodeid)).hexdigest()
            if st.nlink > 1:
                groups.setdefault(st.ino, []).append(path or b"/")
        elif stat.S_ISLNK(st.mode):
            link = client.readlink(nodeid)
        out[path or b"/"] = (st.mode, st.uid, st.gid, 0 if stat.S_ISDIR(st.mode) else st.size,
                             digest, link)
        if stat.S_ISDIR(st.mode):
            for d in client.listdir(nodeid, plus=plus, size=1024):
                if d.name in (b".", b".."):
                    continue
                entry = client.lookup(nodeid, d.name)
                assert entry.nodeid == d.ino and d.type == entry.attr.mode >> 12
                if plus:
                    assert d.entry is not None and d.entry.nodeid == entry.nodeid
                    assert d.entry.attr == entry.attr
                visit(entry.nodeid, path + b"/" + d.name)

    visit(1, b"")
    for members in groups.values():
        for p in members:
            out[p] += (min(members),)
    return out


@pytest.mark.parametrize("plus", [False, True], ids=["readdir", "readdirplus"])
def test_whole_tree_matches_the_source(served, image, plus):
    _engine, client, _inst = served
    src, _img = image
    want = {}
    for path, e in snapshot_dir(src).items():
        want[path] = (e.mode, e.uid, e.gid, e.size, e.sha256, e.symlink) + (
            (e.link_group,) if e.link_group else ())
    assert _walk(client, plus) == want


def test_init_negotiation(logs):
    engine = FuseEngine(Vfs(), max_pages=256, max_write=1 << 20)
    client = FuseClient(lambda req: b"".join(bytes(s) for s in engine.handle(req) or []))
    with pytest.raises(FuseReplyError) as exc:
        client.getattr(1)  # nothing before INIT
    assert exc.value.errno == errno.EIO
    major, minor, readahead, flags, _bg, _cong, max_write, _gran, max_pages, *_ = client.init(
        minor=37, flags=m.FUSE_DO_READDIRPLUS | m.FUSE_MAX_PAGES | m.FUSE_ASYNC_READ | (1 << 16),
        readahead=1 << 17)
    assert (major, minor, readahead, max_write, max_pages) == (7, 31, 1 << 17, 1 << 20, 256)
    assert flags == m.FUSE_DO_READDIRPLUS | m.FUSE_MAX_PAGES | m.FUSE_ASYNC_READ  # no writeback
    old = FuseEngine(Vfs())
    with logs.expect("fuse_init_refused", count=1):
        reply = b"".join(old.handle(m.IN_HEADER.pack(56, Opcode.INIT, 9, 0, 0, 0, 0, 0)
                                    + m.INIT_IN.pack(7, 26, 0, 0)) or [])
    assert m.OUT_HEADER.unpack(reply) == (16, -errno.EPROTO, 9)
    newer = b"".join(old.handle(m.IN_HEADER.pack(56, Opcode.INIT, 10, 0, 0, 0, 0, 0)
                                + m.INIT_IN.pack(8, 0, 0, 0)) or [])
    assert len(newer) == 24 and struct.unpack_from("<II", newer, 16) == (7, 31)


def test_a_second_init_starts_a_new_session_and_releases_the_old_files(served):
    engine, client, _inst = served
    node = client.lookup(1, b"a.txt").nodeid
    fh = client.open(node)
    client.open(node)
    assert engine.vfs.open_handles() == 2
    client.init()  # the guest rebooted without the device being reset
    assert engine.vfs.open_handles() == 0
    with pytest.raises(FuseReplyError) as exc:
        client.read(node, fh, 0, 10)
    assert exc.value.errno == errno.EBADF


def test_write_opcodes_are_erofs_unknown_are_enosys(served):
    _engine, client, _inst = served
    for op in m.WRITE_OPCODES:
        with pytest.raises(FuseReplyError) as exc:
            client.call(op, 1, bytes(64))
        assert exc.value.errno == errno.EROFS, op
    for op in (Opcode.GETLK, Opcode.IOCTL, Opcode.BMAP, Opcode.SETUPMAPPING, 99, 4096):
        with pytest.raises(FuseReplyError) as exc:
            client.call(op, 1, bytes(64))
        assert exc.value.errno == errno.ENOSYS, op
    a = client.lookup(1, b"a.txt")
    with pytest.raises(FuseReplyError) as exc:
        client.open(a.nodeid, os.O_RDWR)
    assert exc.value.errno == errno.EROFS
    with pytest.raises(FuseReplyError) as exc:
        client.call(Opcode.ACCESS, a.nodeid, m.ACCESS_IN.pack(os.W_OK, 0))
    assert exc.value.errno == errno.EROFS
    client.call(Opcode.ACCESS, a.nodeid, m.ACCESS_IN.pack(os.R_OK, 0))


def test_xattrs_statfs_lseek_and_errors(served):
    engine, client, _inst = served
    a = client.lookup(1, b"a.txt").nodeid
    assert struct.unpack("<II", client.getxattr(a, b"user.color", 0)) == (4, 0)
    assert client.getxattr(a, b"user.color", 100) == b"blue"
    with pytest.raises(FuseReplyError) as exc:
        client.getxattr(a, b"user.color", 2)
    assert exc.value.errno == errno.ERANGE
    with pytest.raises(FuseReplyError) as exc:
        client.getxattr(a, b"user.none", 100)
    assert exc.value.errno == errno.ENODATA
    names = client.listxattr(a, 0)
    assert struct.unpack("<II", names)[0] == len(b"user.color\0user.empty\0")
    assert sorted(client.listxattr(a, 100).split(b"\0")[:-1]) == [b"user.color", b"user.empty"]
    blocks, _bfree, _bavail, files, *_ = m.KSTATFS.unpack(client.call(Opcode.STATFS, 1))
    assert files >= len(TREE) - 2
    big = client.lookup(1, b"big.bin")
    fh = client.open(big.nodeid)
    data_at = client.call(Opcode.LSEEK, big.nodeid, m.LSEEK_IN.pack(fh, 100, 3, 0))
    hole_at = client.call(Opcode.LSEEK, big.nodeid, m.LSEEK_IN.pack(fh, 100, 4, 0))
    assert (m.LSEEK_OUT.unpack(data_at)[0], m.LSEEK_OUT.unpack(hole_at)[0]) == (100, big.attr.size)
    with pytest.raises(FuseReplyError) as exc:
        client.call(Opcode.LSEEK, big.nodeid, m.LSEEK_IN.pack(fh, big.attr.size, 3, 0))
    assert exc.value.errno == errno.ENXIO
    # a READ is bounded by max_pages and by the transport's buffer
    assert len(client.read(big.nodeid, fh, 0, 8 << 20)) == 256 * 4096
    reply = engine.handle(m.IN_HEADER.pack(80, Opcode.READ, 77, big.nodeid, 0, 0, 0, 0)
                          + m.READ_IN.pack(fh, 0, 1 << 20, 0, 0, 0, 0), out_size=16 + 5000)
    assert sum(len(s) for s in reply or []) == 16 + 5000
    client.release(big.nodeid, fh)
    with pytest.raises(FuseReplyError) as exc:  # not ours (any more)
        client.release(big.nodeid, fh)
    assert exc.value.errno == errno.EBADF
    with pytest.raises(FuseReplyError) as exc:
        client.lookup(1, b"missing")
    assert exc.value.errno == errno.ENOENT
    assert client.readlink(client.resolve("d/link").nodeid) == b"../a.txt"
    # forgets have no reply
    assert engine.handle(m.IN_HEADER.pack(48, Opcode.FORGET, 5, a, 0, 0, 0, 0) + struct.pack("<Q", 1)) is None
    batch = m.BATCH_FORGET_IN.pack(2, 0) + m.FORGET_ONE.pack(a, 1) + m.FORGET_ONE.pack(big.nodeid, 1)
    assert engine.handle(m.IN_HEADER.pack(40 + len(batch), Opcode.BATCH_FORGET, 6, 0, 0, 0, 0, 0)
                         + batch) is None


def test_pseudo_mounts_short_entry_timeouts_and_stale_inodes(image):
    vfs = Vfs()
    insts = [_instance(image, "/pseudo_1"), _instance(image, "/pseudo_2")]
    for inst in insts:
        vfs.attach(inst.mountpoint, inst.fs, inst.stats)
    engine = FuseEngine(vfs)
    client = FuseClient(lambda req: b"".join(bytes(s) for s in engine.handle(req) or []))
    client.init()
    names = [d.name for d in client.listdir(1, plus=True)]
    assert names == [b".", b"..", b"pseudo_1", b"pseudo_2"]
    p1 = client.lookup(1, b"pseudo_1")
    # the kernel may cache the listings of image directories, never those of the pseudo root
    open_flags = [m.OPEN_OUT.unpack(client.call(Opcode.OPENDIR, ino, m.OPEN_IN.pack(0, 0)))[1]
                  for ino in (1, p1.nodeid, client.resolve("pseudo_1/d").nodeid)]
    assert open_flags == [0, m.FOPEN_KEEP_CACHE | m.FOPEN_CACHE_DIR, m.FOPEN_KEEP_CACHE | m.FOPEN_CACHE_DIR]
    assert p1.entry_valid <= 1.0 and stat.S_ISDIR(p1.attr.mode)
    # ... but the pseudo root's own attributes are cached for good (as upstream's 2^32 s): a
    # stat(mountpoint) must never become a FUSE request, which blocks while no daemon serves the
    # session during a failover (nydus-snapshotter v0.6.1 stats it before starting the successor)
    # (multiple mode: the mountpoint is an image's root, cached as long)
    root_attr = client.call(Opcode.GETATTR, 1, m.GETATTR_IN.pack(0, 0, 0))
    assert m.ATTR_OUT_HEAD.unpack_from(root_attr)[0] >= 1 << 32
    assert p1.attr_valid >= 1 << 32
    assert client.lookup(p1.nodeid, b"a.txt").entry_valid > 60  # image entries cache long
    fh_file = client.resolve("pseudo_1/a.txt")
    fh = client.open(fh_file.nodeid)
    vfs.detach("/pseudo_1")
    with pytest.raises(FuseReplyError) as exc:
        client.lookup(1, b"pseudo_1")
    assert exc.value.errno == errno.ENOENT
    with pytest.raises(FuseReplyError) as exc:
        client.read(fh_file.nodeid, fh, 0, 10)
    assert exc.value.errno == errno.ESTALE
    with pytest.raises(FuseReplyError) as exc:
        client.getattr(p1.nodeid)
    assert exc.value.errno == errno.ESTALE
    assert client.read_file(client.resolve("pseudo_2/a.txt").nodeid) == b"hello nydus\n"
    engine.close()
    assert vfs.open_handles() == 0  # the connection's leftover handle is released
    for inst in insts:
        inst.close()


def test_backend_failure_is_eio_while_metadata_works(image, tmp_path, logs):
    src, img = image
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for f in img.blob_dir.iterdir():
        if f.name != img.bootstrap.name:
            shutil.copyfile(f, blobs / f.name)
    inst = build_rafs_instance("/", str(img.bootstrap), load_config(_config(blobs)))
    vfs = Vfs()
    vfs.attach("/", inst.fs, inst.stats)
    engine = FuseEngine(vfs)
    client = FuseClient(lambda req: b"".join(bytes(s) for s in engine.handle(req) or []))
    client.init()
    for f in blobs.iterdir():  # the backend holds the blob open since the mount: empty it
        os.truncate(f, 0)
    e = client.lookup(1, b"big.bin")
    fh = client.open(e.nodeid)
    with logs.expect("read_failed"), pytest.raises(FuseReplyError) as exc:
        client.read(e.nodeid, fh, 0, 4096)
    assert exc.value.errno == errno.EIO
    assert client.getattr(e.nodeid).size == len(TREE["big.bin"])
    assert len(client.listdir(1)) > 3
    inst.close()


def _mutations(rng: random.Random, good: list[bytes]) -> bytes:
    base = bytearray(rng.choice(good))
    kind = rng.randrange(8)
    if kind == 0:
        return bytes(base[:rng.randrange(len(base) + 1)])  # truncated
    if kind == 1:  # lying length
        struct.pack_into("<I", base, 0, rng.choice([0, 1, 39, 40, len(base) - 1, len(base) + 1,
                                                    0xFFFFFFFF, rng.getrandbits(32)]))
        return bytes(base)
    if kind == 2:  # bad opcode, consistent length
        struct.pack_into("<I", base, 4, rng.getrandbits(rng.choice([6, 8, 32])))
        return bytes(base)
    if kind == 3:  # random arguments
        return bytes(base[:40]) + rng.randbytes(rng.randrange(0, 200))
    if kind == 4:  # random nodeid / fh / offsets
        struct.pack_into("<Q", base, 16, rng.choice([0, 1, 2, 1 << 56, (1 << 64) - 1, rng.getrandbits(64)]))
        for at in range(40, len(base) - 8, 8):
            if rng.random() < 0.5:
                struct.pack_into("<Q", base, at, rng.getrandbits(64))
        return bytes(base)
    if kind == 5:  # names without NUL, with '/', huge
        name = rng.choice([b"a.txt", b"a/b", b"", b"x" * 5000, bytes(rng.randbytes(30))])
        body = name + (b"\0" if rng.random() < 0.5 else b"")
        return m.IN_HEADER.pack(40 + len(body), rng.choice([1, 22]), 1, 1, 0, 0, 0, 0) + body
    if kind == 6:
        return rng.randbytes(rng.randrange(0, 300))
    base[rng.randrange(len(base))] ^= 1 << rng.randrange(8)
    struct.pack_into("<I", base, 0, len(base))
    return bytes(base)


def test_thousands_of_malformed_requests_never_crash(served, image, logs):
    engine, client, _inst = served
    a = client.lookup(1, b"a.txt").nodeid
    d = client.lookup(1, b"d").nodeid
    fh = client.open(a)
    dh = client.opendir(d)

    def req(op, nodeid, payload):
        return m.IN_HEADER.pack(40 + len(payload), op, 1234, nodeid, 0, 0, 0, 0) + payload
    good = [req(Opcode.LOOKUP, 1, b"a.txt\0"), req(Opcode.GETATTR, a, bytes(16)),
            req(Opcode.READ, a, m.READ_IN.pack(fh, 0, 4096, 0, 0, 0, 0)),
            req(Opcode.READDIR, d, m.READ_IN.pack(dh, 0, 4096, 0, 0, 0, 0)),
            req(Opcode.READDIRPLUS, d, m.READ_IN.pack(dh, 0, 4096, 0, 0, 0, 0)),
            req(Opcode.GETXATTR, a, m.GETXATTR_IN.pack(100, 0) + b"user.color\0"),
            req(Opcode.LISTXATTR, a, m.GETXATTR_IN.pack(100, 0)),
            req(Opcode.OPEN, a, m.OPEN_IN.pack(0, 0)), req(Opcode.OPENDIR, d, m.OPEN_IN.pack(0, 0)),
            req(Opcode.RELEASE, a, m.RELEASE_IN.pack(fh + 1, 0, 0, 0)),
            req(Opcode.LSEEK, a, m.LSEEK_IN.pack(fh, 0, 3, 0)), req(Opcode.ACCESS, a, bytes(8)),
            req(Opcode.BATCH_FORGET, 0, m.BATCH_FORGET_IN.pack(3, 0) + bytes(16)),
            req(Opcode.INIT, 0, m.INIT_IN.pack(7, 37, 0, 0)), req(Opcode.STATFS, 1, b""),
            req(Opcode.INTERRUPT, 0, struct.pack("<Q", 5))]
    rng = random.Random(1)
    logs.allowed.update(dict.fromkeys(("fuse_request_dropped", "fuse_init_refused",
                                       "fuse_forget_failed", "read_failed")))
    for _ in range(6000):
        raw = _mutations(rng, good)
        reply = engine.handle(raw, out_size=rng.choice([None, 16, 100, 1 << 20]))
        if reply is None:
            continue
        out = b"".join(bytes(s) for s in reply)
        length, error, unique = m.OUT_HEADER.unpack_from(out)
        assert length == len(out) and error <= 0
        assert unique == struct.unpack_from("<Q", raw, 8)[0]
        if error:
            assert len(out) == 16 and -error in errno.errorcode
    # the opens the fuzz made are the connection's: closing it releases every one
    assert logs.count("fuse_handler_crashed") == 0
    engine.close()
    assert engine.vfs.open_handles() == 0
    client.init()
    assert client.read_file(client.lookup(1, b"a.txt").nodeid) == b"hello nydus\n"


def test_concurrent_requests_while_images_come_and_go(image, logs):
    """Workers run metadata requests in parallel (no global lock, unlike llfuse) while another
    thread mounts and unmounts, closing each image inside ``Gate.exclusive`` as the daemon does:
    every reply is a success or an errno the kernel expects, never a crashed handler (a read that
    races the close may fail with EIO, logged as read_failed: fs/README.md rule 6)."""
    import threading

    logs.allowed["read_failed"] = None

    vfs = Vfs()
    keep = _instance(image, "/keep")
    vfs.attach("/keep", keep.fs, keep.stats)
    engine = FuseEngine(vfs)
    first = FuseClient(lambda req: b"".join(bytes(s) for s in engine.handle(req) or []))
    first.init()
    names = sorted(d.name for d in first.listdir(first.lookup(1, b"keep").nodeid))
    stop = threading.Event()
    seen: dict[int, int] = {}
    failures: list[BaseException] = []
    lock = threading.Lock()

    def worker(seed: int) -> None:
        try:
            work(seed)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            failures.append(e)

    def work(seed: int) -> None:
        rng = random.Random(seed)
        client = FuseClient(lambda req: b"".join(bytes(s) for s in engine.handle(req) or []))
        while not stop.is_set():
            name = rng.choice(["churn", "keep"])
            try:
                top = client.lookup(1, name.encode())
                listing = client.listdir(top.nodeid, plus=rng.random() < 0.5)
                assert sorted(d.name for d in listing) == names
                data = client.read_file(client.lookup(top.nodeid, b"a.txt").nodeid)
                assert data == b"hello nydus\n"
                err = 0
            except FuseReplyError as e:
                err = e.errno
                assert err in (errno.ENOENT, errno.ESTALE, errno.EIO, errno.EBADF), err
            with lock:
                seen[err] = seen.get(err, 0) + 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        for _ in range(30):
            inst = _instance(image, "/churn")
            vfs.attach("/churn", inst.fs, inst.stats)
            time.sleep(0.01)
            vfs.detach("/churn")
            inst.close(engine.gate.exclusive())
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    keep.close()
    assert not failures, failures[:3]
    assert seen.get(0, 0) > 20 and logs.count("fuse_handler_crashed") == 0
