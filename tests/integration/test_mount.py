"""Real FUSE mounts: nydusd runs as a subprocess (``python -m nydusd``) over images built by the real
builder and over upstream's test images; the mounted trees are compared with their sources."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.daemon import ROOT, Nydusd, is_mounted, mount_line
from tests.harness.images import build_daemon_image, sample_tree
from tests.harness.treecmp import compare_trees

pytestmark = [pytest.mark.fuse, pytest.mark.usefixtures("fuse_session")]


def start_dedicated(tmp: Path, image, *, cache: bool = True, extra: list[str] | None = None,
                    **cfg) -> Nydusd:
    mnt = tmp / "mnt"
    mnt.mkdir(exist_ok=True)
    config = image.write_config(tmp / "config.json", tmp / "cache" if cache else None, **cfg)
    args = ["--config", config, "--mountpoint", str(mnt), "--bootstrap", image.bootstrap,
            "--log-level", "info", *(extra or [])]
    return Nydusd(args, mnt, log_path=tmp / "nydusd.log")


@pytest.mark.parametrize("version", [5, 6])
def test_mounted_tree_matches_source(tmp_path, version, fuse_session):
    src = sample_tree(tmp_path / "src")
    image = build_daemon_image(src, tmp_path / "img", version=version)
    with start_dedicated(tmp_path, image, extra=["--thread-num", "2"]) as d:
        assert compare_trees(src, Path(d.mountpoint)) > 50
        # second pass comes from the blob cache and the kernel caches: still identical
        assert compare_trees(src, Path(d.mountpoint)) > 50
        fields = mount_line(d.mountpoint)
        assert fields[0] == "rafs" and fields[2] == "fuse"
        opts = fields[3].split(",")
        assert "ro" in opts and "default_permissions" in opts and "allow_other" in opts
        with pytest.raises(OSError):
            open(Path(d.mountpoint) / "small.txt", "r+b")  # noqa: SIM115
        st = os.statvfs(d.mountpoint)
        assert st.f_files > 50
        assert ("session=own" in d.log() or '"session": "own"' in d.log()) == (fuse_session == "own")
    assert d.proc.returncode == 0
    assert not is_mounted(tmp_path / "mnt")


def test_mount_readahead_is_widened(tmp_path):
    """The FUSE INIT reply caps the kernel readahead at 128 KiB; the session widens it afterwards
    (sequential reads keep several 128 KiB requests in flight)."""
    import time

    from nydusd.fs.session import READAHEAD_KB

    image = build_daemon_image(sample_tree(tmp_path / "src", big=False), tmp_path / "img", version=6)
    with start_dedicated(tmp_path, image) as d:
        dev = os.stat(d.mountpoint).st_dev
        path = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
        deadline = time.monotonic() + 5
        while path.read_text().strip() != str(READAHEAD_KB) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert path.read_text().strip() == str(READAHEAD_KB)
        assert (Path(d.mountpoint) / "small.txt").read_bytes() == b"hello nydus\n"
    assert d.proc.returncode == 0


def test_no_xattr_config_hides_xattrs(tmp_path):
    src = sample_tree(tmp_path / "src", big=False)
    image = build_daemon_image(src, tmp_path / "img", version=6)
    with start_dedicated(tmp_path, image, enable_xattr=False) as d:
        assert os.listxattr(Path(d.mountpoint) / "small.txt") == []
        assert compare_trees(src, Path(d.mountpoint), xattrs=False) > 10


def _result_md5s(result: Path) -> dict[str, str]:
    return {line.split("  ", 1)[1]: line.split("  ", 1)[0]
            for line in result.read_text().splitlines() if re.match(r"^[0-9a-f]{32}  /", line)}


def _result_tree(result: Path) -> list[str]:
    text = result.read_text()
    doc = json.loads(text[:text.index("\n]") + 2])
    out: list[str] = []

    def walk(node, prefix):
        for child in node.get("contents", []):
            path = f"{prefix}/{child['name']}"
            out.append(f"{child['type']}:{path}")
            walk(child, path)
    walk(doc[0], "")
    return sorted(out)


def _mounted_tree(mnt: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(mnt):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            kind = "link" if full.is_symlink() else "directory" if full.is_dir() else "file"
            out.append(f"{kind}:/{full.relative_to(mnt)}")
    return sorted(out)


@pytest.mark.parametrize("name", ["sha256-nocompress-repeatable", "blake3-lz4_block-non_repeatable"])
def test_upstream_repeatable_images(tmp_path, upstream, name):
    """Upstream's own RAFS test images: every file's md5 and the tree listing from their .result."""
    boot = upstream / "repeatable" / name
    result = upstream / "repeatable" / f"{name}.result"
    from tests.harness.images import DaemonImage

    image = DaemonImage(str(boot), str(upstream / "repeatable" / "blobs"), 0)
    with start_dedicated(tmp_path, image) as d:
        mnt = Path(d.mountpoint)
        assert _mounted_tree(mnt) == _result_tree(result)
        md5s = _result_md5s(result)
        assert len(md5s) > 20
        for path, digest in md5s.items():
            assert hashlib.md5((mnt / path.lstrip("/")).read_bytes()).hexdigest() == digest, path


def test_upstream_v6_image(tmp_path, upstream):
    """rafs-v6-2.2.boot: readable through the mount with digest validation on, and identical to
    what the format library reads from the blob directly."""
    from nydusd.rafs import load_bootstrap
    from tests.harness.images import DaemonImage

    boot = upstream / "bootstrap" / "rafs-v6-2.2.boot"
    image = DaemonImage(str(boot), str(upstream / "blobs"), 6)
    with start_dedicated(tmp_path, image) as d:
        mnt = Path(d.mountpoint)
        sb = load_bootstrap(str(boot))
        files = [(p, i) for p, i in sb.walk() if i.is_reg]
        assert files
        for path, inode in files:
            data = (mnt / os.fsdecode(path).lstrip("/")).read_bytes()
            assert len(data) == inode.size
        sb.close()


def test_external_unmount_makes_daemon_exit(tmp_path):
    src = sample_tree(tmp_path / "src", big=False)
    image = build_daemon_image(src, tmp_path / "img", version=6)
    d = start_dedicated(tmp_path, image)
    try:
        d.start()
        assert (Path(d.mountpoint) / "small.txt").read_bytes() == b"hello nydus\n"
        subprocess.run(["fusermount", "-u", d.mountpoint], check=True)
        assert d.proc.wait(10) == 0
    finally:
        d.cleanup()


def test_blob_deleted_under_running_mount_gives_eio(tmp_path):
    src = sample_tree(tmp_path / "src")
    image = build_daemon_image(src, tmp_path / "img", version=6)
    with start_dedicated(tmp_path, image, cache=False) as d:
        mnt = Path(d.mountpoint)
        assert (mnt / "small.txt").read_bytes() == b"hello nydus\n"
        for blob in Path(image.blob_dir).iterdir():
            # the localfs backend may hold the blob open: empty it, then remove it
            os.truncate(blob, 0)
            blob.unlink()
        with pytest.raises(OSError) as exc:
            (mnt / "dir" / "multi_chunk").read_bytes()
        assert exc.value.errno == 5
        assert (mnt / "dir" / "multi_chunk").stat().st_size == 3 * (1 << 20) + 12345
        assert sorted(os.listdir(mnt / "dir"))  # metadata still served
        assert d.alive()
        assert (mnt / "small.txt").read_bytes() == b"hello nydus\n"  # kernel page cache


def test_corrupt_chunk_gives_eio_other_files_fine(tmp_path):
    src = sample_tree(tmp_path / "src")
    image = build_daemon_image(src, tmp_path / "img", version=5, compressor="none")
    blob = next(Path(image.blob_dir).iterdir())
    payload = (src / "dir" / "multi_chunk").read_bytes()[:4096]
    data = blob.read_bytes()
    at = data.index(payload)
    with open(blob, "r+b") as f:  # flip bytes inside the first chunk of one file
        f.seek(at + 100)
        f.write(bytes(b ^ 0xFF for b in data[at + 100:at + 164]))
    with start_dedicated(tmp_path, image, cache=False) as d:
        mnt = Path(d.mountpoint)
        with pytest.raises(OSError) as exc:
            (mnt / "dir" / "multi_chunk").read_bytes()
        assert exc.value.errno == 5
        assert (mnt / "dir" / "exact_chunk").read_bytes() == (src / "dir" / "exact_chunk").read_bytes()
        assert d.alive()


def test_corrupt_bootstrap_fails_startup_clearly(tmp_path):
    boot = tmp_path / "bad.boot"
    boot.write_bytes(b"\0" * 8192)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"device": {"backend": {"type": "localfs", "config": {"dir": str(tmp_path)}}},
                               "mode": "direct"}))
    r = subprocess.run([sys.executable, "-m", "nydusd", "--config", str(cfg), "--mountpoint", str(mnt),
                        "--bootstrap", str(boot)], capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert r.returncode != 0
    assert "nydusd: error:" in r.stderr and "Traceback" not in r.stderr
    assert not is_mounted(mnt)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nydusd", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=30)


def test_cli_version_and_flag_errors(tmp_path):
    r = run_cli("--version")
    assert r.returncode == 0
    assert re.search(r"^Version:\s+v\S+", r.stdout, re.M)
    assert re.search(r"Git Commit:\s*(.+)", r.stdout)
    for args, needle in [
        (["fuse", "--config", "c"], "--mountpoint"),
        (["virtiofs", "--config", "c"], "--sock"),
        (["--sock", "/tmp/s", "--mountpoint", "/m"], "cannot be used with --mountpoint"),
        (["--mountpoint", "/m", "--id", "x"], "--supervisor"),
        (["--mountpoint", "/m", "--bootstrap", "b"], "both --config and --localfs-dir are missing"),
        (["--mountpoint", "/m", "--no-such-flag"], "unrecognized arguments"),
        (["--mountpoint", "/m", "--thread-num", "0"], "1..1024"),
        (["--mountpoint", "/m", "--log-level", "loud"], "invalid choice"),
    ]:
        r = run_cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert needle in r.stderr, (args, r.stderr)


def test_shared_daemon_pseudo_mounts(tmp_path):
    """One FUSE session, several images at /sub and nested /a/b/c (the shared-daemon layout)."""
    src = sample_tree(tmp_path / "src", big=False)
    v5 = build_daemon_image(src, tmp_path / "img5", version=5)
    v6 = build_daemon_image(src, tmp_path / "img6", version=6)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    specs = [f"/pseudo_1={v5.bootstrap}={v5.write_config(tmp_path / 'c5.json', tmp_path / 'cache5')}",
             f"/a/b/c={v6.bootstrap}={v6.write_config(tmp_path / 'c6.json', tmp_path / 'cache6')}"]
    with Nydusd([str(mnt), "4", *specs], mnt, log_path=tmp_path / "log",
                module="tests.harness.serve") as d:
        assert sorted(os.listdir(mnt)) == ["a", "pseudo_1"]
        assert compare_trees(src, mnt / "pseudo_1") > 10
        assert compare_trees(src, mnt / "a" / "b" / "c") > 10
        a = os.stat(mnt / "pseudo_1" / "small.txt").st_ino
        b = os.stat(mnt / "a" / "b" / "c" / "small.txt").st_ino
        assert a != b and a >> 56 != b >> 56
        assert not (mnt / "nothing").exists()
    assert d.proc.returncode == 0


def test_sequential_read_without_cache_fetches_each_chunk_once(tmp_path):
    """No blob cache: the kernel's 128 KiB requests must not refetch the same 1 MiB chunk eight
    times (the ChunkBuffer keeps it); the backend moves about the file's size, not 8x."""
    from tests.harness.apiclient import ApiClient

    src = sample_tree(tmp_path / "src")
    image = build_daemon_image(src, tmp_path / "img", version=6, compressor="none")
    sock = str(tmp_path / "api.sock")
    with start_dedicated(tmp_path, image, cache=False, extra=["--apisock", sock]) as d:
        data = (Path(d.mountpoint) / "dir" / "multi_chunk").read_bytes()
        status, backend = ApiClient(sock).request("GET", "/api/v1/metrics/backend")
        assert status == 200
        assert backend["read_count"] <= 5
        assert len(data) <= backend["read_amount_total"] <= len(data) + (1 << 20)
