"""Real kernel mount of our own session (``DevFuseSession`` in this process, so the requests the
kernel sends can be counted at the engine): a first ``find`` over an image mounted below the pseudo
root is served by OPENDIR/READDIRPLUS per directory -- the READDIRPLUS entries carry each name's
attributes with the image's timeouts, so the kernel sends no LOOKUP or GETATTR per entry (issue
#17: the first pass was ~7x native) -- and what ``find`` prints equals the llfuse session's
output (a real ``nydusd --fuse-session llfuse`` over the same image)."""

from __future__ import annotations

import collections
import json
import os
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from nydusd.config import load_config
from nydusd.daemon.instance import build_rafs_instance
from nydusd.fs.devfuse import DevFuseSession
from nydusd.fs.proto.messages import Opcode
from nydusd.fs.vfs import Vfs
from nydusd.metrics import StatsFop
from tests.harness.daemon import Nydusd, is_mounted
from tests.harness.images import build_image, make_tree

pytestmark = pytest.mark.fuse

DIRS, FILES = 12, 40
TREE = {
    **{f"d{d:02d}/": None for d in range(DIRS)},
    **{f"d{d:02d}/sub/": None for d in range(0, DIRS, 3)},
    **{f"d{d:02d}/f{i:03d}": bytes(i * 37 + d) for d in range(DIRS) for i in range(FILES)},
    **{f"d{d:02d}/link": ("symlink", f"f{d:03d}") for d in range(DIRS)},
    **{f"d{d:02d}/sub/g": b"g" * d for d in range(0, DIRS, 3)},
}
FIND_FORMAT = "%P %y %s %m %n %U %G %T@ %l\n"


def _find(path: Path) -> list[str]:
    out = subprocess.run(["find", str(path), "-printf", FIND_FORMAT], check=True,
                         capture_output=True, text=True).stdout
    return sorted(out.splitlines())


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rdp")
    src = make_tree(tmp / "src", TREE)
    return src, build_image(src, tmp / "out")


def _config(blob_dir: Path) -> str:
    return json.dumps({"version": 2, "backend": {"type": "localfs", "localfs": {"dir": str(blob_dir)}},
                       "rafs": {"enable_xattr": True}})


class CountingSession:
    """An own session mounted at ``mnt`` with the image attached at ``/tree`` (as the API mounts
    it), counting the requests the kernel sends by opcode."""

    def __init__(self, mnt: Path, image) -> None:
        _src, img = image
        self.inst = build_rafs_instance("/tree", str(img.bootstrap), load_config(_config(img.blob_dir)))
        vfs = Vfs()
        vfs.attach("/tree", self.inst.fs, self.inst.stats)
        self.session = DevFuseSession(vfs, str(mnt), threads=2)
        self.counts: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        handle = self.session.engine.handle

        def counting(request, out_size=None):  # type: ignore[no-untyped-def]
            opcode = struct.unpack_from("<I", request, 4)[0]
            with self._lock:
                self.counts[Opcode(opcode).name] += 1
            return handle(request, out_size)
        self.session.engine.handle = counting  # type: ignore[method-assign]
        self.session.mount()
        self.thread: threading.Thread | None = threading.Thread(target=self.session.run, daemon=True)
        self.thread.start()

    def take(self) -> collections.Counter[str]:
        with self._lock:
            counts, self.counts = self.counts, collections.Counter()
        return counts

    def close(self) -> None:
        if self.thread is None:
            return
        self.session.stop("test done")
        self.thread.join(10)
        self.session.close()
        self.inst.close()
        self.thread = None


def test_first_find_needs_no_per_entry_lookup_or_getattr(tmp_path, image):
    src, img = image
    entries = sum(1 for _ in src.rglob("*"))
    dirs = sum(1 for p in src.rglob("*") if p.is_dir() and not p.is_symlink()) + 1
    mnt = tmp_path / "own"
    mnt.mkdir()
    own = CountingSession(mnt, image)
    try:
        os.stat(mnt / "tree")  # the mount root: one LOOKUP, as for any path
        own.take()
        hits = own.inst.stats.fop_hits
        before = hits[StatsFop.GETATTR] + hits[StatsFop.LOOKUP]
        first = _find(mnt / "tree")
        counts = own.take()
        deadline = time.monotonic() + 5
        while counts["RELEASEDIR"] < dirs and time.monotonic() < deadline:  # sent asynchronously
            time.sleep(0.02)
            counts += own.take()
        # nor does the daemon fetch each entry's inode again behind the kernel's back: the
        # metrics' getattr/lookup counts (what the API reports) stay O(directories) too
        assert hits[StatsFop.GETATTR] + hits[StatsFop.LOOKUP] - before <= dirs, list(hits)
        assert len(first) == entries + 1
        # per directory: OPENDIR, one READDIRPLUS with every entry and its attributes (the
        # getdents buffer holds the whole directory), one READDIR(PLUS) finding the end, RELEASEDIR
        assert counts["OPENDIR"] == counts["RELEASEDIR"] == dirs, counts
        assert counts["READDIRPLUS"] >= dirs, counts
        assert counts["READDIRPLUS"] + counts["READDIR"] == 2 * dirs, counts
        # per entry the kernel already holds the attributes READDIRPLUS carried: what remains is
        # O(directories) (the pseudo directory's own entry at most), not O(entries) -- only the
        # READLINK of each symlink (``find -printf %l`` asks for its target)
        assert counts["LOOKUP"] + counts["GETATTR"] <= 2, counts
        assert counts["READLINK"] == sum(1 for p in src.rglob("*") if p.is_symlink()), counts
        assert sum(counts.values()) - 4 * dirs - counts["READLINK"] <= 2, counts
        # a second pass is served from the kernel's caches (listing, dentries and attributes)
        assert _find(mnt / "tree") == first
        again = own.take()
        assert again["LOOKUP"] + again["GETATTR"] + again["READDIRPLUS"] + again["READDIR"] == 0, again
    finally:
        own.close()
    assert not is_mounted(mnt)

    # the llfuse session (no readdirplus: a LOOKUP per name) prints the same
    llmnt = tmp_path / "llfuse"
    llmnt.mkdir()
    config = tmp_path / "config.json"
    config.write_text(_config(img.blob_dir))
    daemon = Nydusd(["--config", str(config), "--mountpoint", str(llmnt), "--bootstrap",
                     str(img.bootstrap), "--fuse-session", "llfuse", "--log-level", "warn"], llmnt,
                    log_path=tmp_path / "nydusd.log").start()
    try:
        assert _find(llmnt) == first
    finally:
        daemon.terminate()
        daemon.cleanup()


GETDENTS = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
buf = ctypes.create_string_buffer(1 << 20)
names, calls = [], 0
while (n := libc.syscall(217, fd, buf, len(buf))) > 0:  # getdents64 with a 1 MiB buffer
    calls += 1
    raw, at = buf.raw[:n], 0
    while at < n:
        reclen = int.from_bytes(raw[at + 16:at + 18], "little")
        names.append(raw[at + 19:at + reclen].split(b"\0")[0].decode())
        at += reclen
if n < 0:
    raise OSError(ctypes.get_errno(), "getdents64")
print(calls, *names)
"""


def test_big_getdents_buffer_lists_a_big_directory(tmp_path):
    # a 1 MiB getdents64 buffer makes the kernel ask for up to 1 MiB of READDIRPLUS entries: one
    # reply of ~3,000 entries, which as two segments per entry exceeded writev's 1,024 (EINVAL,
    # logged, and the request was never answered -- the lister hung for ever)
    names = [f"entry-with-a-longish-name-{i:05d}" for i in range(3000)]
    src = make_tree(tmp_path / "src", {"big/": None, **{f"big/{n}": b"" for n in names}})
    image = (src, build_image(src, tmp_path / "out"))
    mnt = tmp_path / "own"
    mnt.mkdir()
    own = CountingSession(mnt, image)
    try:
        lister = subprocess.Popen([sys.executable, "-c", GETDENTS, str(mnt / "tree" / "big")],
                                  stdout=subprocess.PIPE, text=True)
        try:
            stdout, _ = lister.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            # the kernel waits for the reply for ever (not even SIGKILL ends the wait): ending
            # the session aborts the connection, which ends the lister
            own.close()
            lister.kill()
            lister.communicate()
            pytest.fail("the READDIRPLUS request was never answered")
        assert lister.returncode == 0
        out = stdout.split()
        calls, listed = int(out[0]), out[1:]
        assert calls < 10  # the big buffer was used: thousands of entries per call
        assert sorted(n for n in listed if n not in (".", "..")) == names
        assert own.take()["READDIRPLUS"] >= 1
    finally:
        own.close()
