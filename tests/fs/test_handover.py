"""Hand-over of a FUSE connection to a successor process, at the engine/Vfs level: the successor's
``Vfs`` rebuilt from ``layout()`` gives every kernel inode number the same meaning, and its engine
(``resume``) serves the predecessor's file handles without a new INIT."""

from __future__ import annotations

import errno

import pytest

from nydusd.fs.proto.engine import FuseEngine
from nydusd.fs.vfs import Vfs
from tests.fs.test_proto_engine import TREE, _instance, image  # noqa: F401 - fixture
from tests.harness.fuse_wire import FuseClient, FuseReplyError


def _client(engine: FuseEngine) -> FuseClient:
    return FuseClient(lambda req: b"".join(bytes(s) for s in engine.handle(req) or []))


def _successor(old: Vfs, instances: dict[str, object], image) -> Vfs:  # noqa: F811
    layout = old.layout()
    new = Vfs(first_fh=1 << 40)
    new.restore_layout(layout["pseudo"], layout["next_index"])
    for path, index in layout["mounts"].items():
        inst = _instance(image, path)
        instances[path] = inst
        new.attach(path, inst.fs, inst.stats, index=index)
    return new


def test_successor_serves_the_same_inodes_and_handles(image):  # noqa: F811
    closers = []
    old = Vfs()
    for path in ("/x/y/one", "/two", "/gone"):
        inst = _instance(image, path)
        closers.append(inst)
        old.attach(path, inst.fs, inst.stats)
    old.detach("/gone")  # leaves a hole in the index space and the next-fit cursor behind it
    engine = FuseEngine(old)
    client = _client(engine)
    client.init()
    big = client.resolve("x/y/one/big.bin")
    deep = client.resolve("two/d/e/deep.txt")
    fh_big = client.open(big.nodeid)
    fh_deep = client.open(deep.nodeid)
    assert client.read(big.nodeid, fh_big, 0, 4096) == TREE["big.bin"][:4096]

    new_instances: dict[str, object] = {}
    new = _successor(old, new_instances, image)
    successor = FuseEngine(new)
    successor.resume(engine.export_state())
    client2 = _client(successor)  # no INIT: the kernel sent it to the predecessor
    assert client2.resolve("x/y/one/big.bin").nodeid == big.nodeid
    assert client2.resolve("two/d/e/deep.txt").nodeid == deep.nodeid
    # the predecessor's handles: adopted by node id on first use
    assert client2.read(big.nodeid, fh_big, 1 << 20, 5000) == TREE["big.bin"][1 << 20:(1 << 20) + 5000]
    assert client2.read(deep.nodeid, fh_deep, 0, 1 << 16) == TREE["d/e/deep.txt"]
    client2.release(big.nodeid, fh_big)
    client2.release(deep.nodeid, 999_999)  # unknown to both: released quietly
    # new opens never reuse a predecessor's handle number
    assert client2.open(big.nodeid) >= 1 << 40
    # the next mount takes the index after the predecessor's, not the freed /gone slot
    extra = _instance(image, "/three")
    new_instances["/three"] = extra
    assert new.attach("/three", extra.fs, extra.stats).index == old.layout()["next_index"]
    for inst in [*closers, *new_instances.values()]:
        inst.close()


def test_engine_without_resume_refuses_foreign_handles(image):  # noqa: F811
    inst = _instance(image)
    vfs = Vfs()
    vfs.attach("/", inst.fs, inst.stats)
    client = _client(FuseEngine(vfs))
    client.init()
    node = client.resolve("a.txt").nodeid
    with pytest.raises(FuseReplyError) as e:
        client.read(node, 12345, 0, 10)
    assert e.value.errno == errno.EBADF
    inst.close()


@pytest.mark.parametrize("state", [{"minor": 3, "max_read": 4096}, {"minor": 31, "max_read": 0},
                                   {"minor": "x", "max_read": 1}, {"max_read": 1}])
def test_resume_rejects_garbage_state(state):
    with pytest.raises((ValueError, KeyError)):
        FuseEngine(Vfs()).resume(state)


def test_restore_layout_rejects_inconsistent_layouts(image):  # noqa: F811
    with pytest.raises(Exception, match="without parent"):
        Vfs().restore_layout({"/a/b": 5}, 1)
    with pytest.raises(Exception, match="bad pseudo"):
        Vfs().restore_layout({"/a": 1}, 1)
    inst = _instance(image, "/m")
    vfs = Vfs()
    vfs.attach("/m", inst.fs, inst.stats)
    with pytest.raises(Exception, match="existing mounts"):
        vfs.restore_layout({}, 1)
    with pytest.raises(Exception, match="index in use"):
        vfs.attach("/n", inst.fs, inst.stats, index=vfs.layout()["mounts"]["/m"])
    inst.close()
