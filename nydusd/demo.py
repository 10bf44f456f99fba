"""`make demo`: build a small image, mount it with nydusd, read a little of it, show what was fetched.

Owns: the demo script only. It drives the real tools as a user would: ``nydus-image create`` (builder
CLI) and ``nydusd`` (a subprocess with the localfs backend and a blobcache), talks to the daemon over
its unix-socket API, and cleans everything up (unmount, kill, remove the temporary directory).
Needs root and /dev/fuse (a FUSE mount). Single-threaded.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent

SAMPLE_FILES: dict[str, bytes] = {
    "README": b"This tree was packed into a RAFS image and is served lazily by nydusd.\n",
    "etc/os-release": b'PRETTY_NAME="Nydus demo"\nNAME="nydus-demo"\nVERSION_ID="1"\n',
    "etc/hostname": b"nydus-demo\n",
    "bin/hello": b"#!/bin/sh\necho hello from a lazily loaded image\n",
    "usr/share/doc/notes.txt": b"Only the chunks you read are fetched from the blob.\n" * 200,
}


class _Unix(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("unix", timeout=10)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(self.unix_path)


def api_get(sock: str, path: str) -> Any:
    conn = _Unix(sock)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        return json.loads(body) if body else None
    finally:
        conn.close()


def write_sample_tree(root: Path) -> None:
    """The embedded sample: a few small files, two big ones (5 MiB, 3 MiB), a symlink and a hard link."""
    rnd = random.Random(1)
    for rel, data in SAMPLE_FILES.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    os.chmod(root / "bin" / "hello", 0o755)
    (root / "usr" / "lib").mkdir(parents=True)
    (root / "usr" / "lib" / "libbig.so").write_bytes(rnd.randbytes(5 << 20))
    (root / "usr" / "lib" / "libother.so").write_bytes(rnd.randbytes(3 << 20))
    os.symlink("../etc/os-release", root / "usr" / "os-release")
    os.link(root / "etc" / "hostname", root / "etc" / "hostname.bak")


def tool(name: str) -> list[str]:
    exe = BIN / name
    if exe.exists():
        return [str(exe)]
    module = {"nydus-image": "nydusd.cli.image", "nydusd": "nydusd"}[name]
    if module == "nydusd":
        return [sys.executable, "-m", "nydusd"]
    return [sys.executable, "-c", f"from {module} import main; raise SystemExit(main())"]


def is_mounted(path: Path) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == str(path) for line in f)


def wait_for(cond: Any, proc: subprocess.Popen[bytes], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise RuntimeError(f"nydusd exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def build(work: Path) -> tuple[Path, Path, int]:
    rootfs, blobs = work / "rootfs", work / "blobs"
    blobs.mkdir()
    write_sample_tree(rootfs)
    boot = work / "image.boot"
    subprocess.run([*tool("nydus-image"), "create", "--bootstrap", str(boot), "--blob-dir", str(blobs),
                    "--fs-version", "6", "--compressor", "zstd", "--log-level", "warn", str(rootfs)],
                   check=True, stdout=subprocess.DEVNULL)
    blob_size = sum(p.stat().st_size for p in blobs.iterdir())
    print(f"built image: bootstrap {boot.stat().st_size} bytes, blob {blob_size} bytes "
          f"(source tree {sum(p.stat().st_size for p in rootfs.rglob('*') if p.is_file())} bytes)")
    return boot, blobs, blob_size


def explore(mnt: Path) -> None:
    print("\nfiles in the mounted image:")
    for dirpath, dirnames, filenames in os.walk(mnt):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            st = p.lstat()
            kind = f"-> {os.readlink(p)}" if p.is_symlink() else f"{st.st_size} bytes"
            print(f"  /{p.relative_to(mnt)}  {kind}")
    print("\nreading through the mount:")
    print("  README:", (mnt / "README").read_text().strip())
    print("  os-release (via symlink):", (mnt / "usr" / "os-release").read_text().splitlines()[0])
    with open(mnt / "usr" / "lib" / "libbig.so", "rb") as f:
        head = f.read(4096)
    print(f"  first 4 KiB of the 5 MiB libbig.so: {head[:8].hex()}...")


def report(sock: str, blob_size: int) -> None:
    fs = api_get(sock, "/api/v1/metrics")
    backend = api_get(sock, "/api/v1/metrics/backend")
    cache = api_get(sock, "/api/v1/metrics/blobcache")
    fetched = backend["read_amount_total"]
    print(f"\nread through FUSE: {fs['data_read']} bytes in {fs['fop_hits'][4]} reads")
    print(f"fetched from the backend: {fetched} of {blob_size} blob bytes "
          f"({100.0 * fetched / max(1, blob_size):.1f}%) in {backend['read_count']} requests")
    print(f"blob cache: {cache['entries_count']} chunks ready in {cache['store_path']}")


def run_demo(work: Path) -> int:
    boot, blobs, blob_size = build(work)
    mnt, cache, sock = work / "mnt", work / "cache", str(work / "api.sock")
    mnt.mkdir()
    cache.mkdir()
    config = work / "config.json"
    config.write_text(json.dumps({
        "device": {"backend": {"type": "localfs", "config": {"dir": str(blobs)}},
                   "cache": {"type": "blobcache", "config": {"work_dir": str(cache)}}},
        "mode": "direct", "digest_validate": True, "enable_xattr": True}))
    log = open(work / "nydusd.log", "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen([*tool("nydusd"), "--config", str(config), "--bootstrap", str(boot),
                             "--mountpoint", str(mnt), "--apisock", sock, "--log-level", "warn"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: is_mounted(mnt) and os.path.exists(sock), proc, "the mount and API socket")
        info = api_get(sock, "/api/v1/daemon")
        print(f"\nnydusd is {info['state']} (pid {proc.pid}), mounted at {mnt}")
        explore(mnt)
        report(sock, blob_size)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(15)
        print(f"\nnydusd stopped (exit {rc}); still mounted: {is_mounted(mnt)}")
        return 0 if rc == 0 else 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if is_mounted(mnt):
            subprocess.run(["fusermount", "-u", "-z", str(mnt)], check=False)
        log.close()


def main() -> int:
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        print("demo: needs root and /dev/fuse (it makes a real FUSE mount)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="nydus-demo-"))
    try:
        return run_demo(work)
    except (RuntimeError, subprocess.CalledProcessError, OSError) as e:
        print(f"demo failed: {e}", file=sys.stderr)
        log = work / "nydusd.log"
        if log.exists():
            print(log.read_text(errors="replace")[-3000:], file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
