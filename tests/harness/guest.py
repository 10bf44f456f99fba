"""Real guests under QEMU (TCG) for the virtio-fs tests and benchmark.

A Debian kernel package (``apt-get download linux-image-6.1.0-<n>-amd64``, the newest in the package
lists) and a busybox-static initramfs are prepared once and cached outside the repository
(``$NYDUS_GUEST_CACHE``, default ``~/.cache/nydus-py/guest``; ``NYDUS_GUEST_OFFLINE=1`` uses the
cached kernel without asking apt for a newer one). Each guest gets the cached base
initramfs plus a tiny second cpio archive holding its ``/test.sh`` (the kernel unpacks concatenated
archives), boots with one ``vhost-user-fs-pci`` device per back-end socket, runs the script and
powers off; its serial console is read line by line (``expect``) so a test can act on the host while
the guest waits.

Also: ``RefVirtiofsd`` -- the reference C virtiofsd (``/usr/lib/qemu/virtiofsd``) with a private
``/run`` -- ``listing_script``/``parse_listing``: the tree listing a guest prints, parsed, and
``host_listing``, the same for a host directory; ``unpack``: ``nydus-image unpack`` extracted.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import queue
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.harness.daemon import Nydusd

CACHE = Path(os.environ.get("NYDUS_GUEST_CACHE", "~/.cache/nydus-py/guest")).expanduser()
QEMU = "qemu-system-x86_64"
VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
BUSYBOX = "/bin/busybox"
#: load order of the modules a virtio-fs mount needs (Debian builds them as modules)
MODULES = ("virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci",
           "fuse", "virtiofs")

INIT = f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in {" ".join(MODULES)}; do insmod /lib/modules/$m.ko; done
echo "GUEST_UP"
sh /test.sh
echo "GUEST_EXIT $?"
poweroff -f
"""



def listing_script(directory: str, prefix: str) -> str:
    """Guest shell lines printing one line per entry under ``directory``, each starting with
    ``prefix``: ``S|path|raw mode hex|uid|gid|size|inode|nlink``, ``H|sha256  path`` per regular
    file, ``L|path|target`` per symlink (paths relative: ``./...``)."""
    return f"""
cd {directory} || exit 7
find . -exec stat -c '{prefix}S|%n|%f|%u|%g|%s|%i|%h' {{}} + || exit 8
find . -type f -exec sha256sum {{}} + | sed 's/^/{prefix}H|/'
find . -type l -exec sh -c 'for f; do echo "{prefix}L|$f|$(readlink "$f")"; done' _ {{}} +
cd /
"""


def guest_missing() -> str | None:
    """Why real-guest tests cannot run here (None: they can)."""
    if os.geteuid() != 0:
        return "guest tests need root (vhost-user sockets, unshare for virtiofsd)"
    for tool in (QEMU, "cpio", "gzip", "apt-get", "dpkg-deb", "unshare"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (scripts/setup.sh installs it)"
    for path in (VIRTIOFSD, BUSYBOX):
        if not os.path.exists(path):
            return f"{path} not installed (scripts/setup.sh installs it)"
    return None


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initramfs: Path


def _kernel_package() -> str:
    """The newest ``linux-image-6.1.0-<n>-amd64`` in the package lists (updated once if empty)."""
    for attempt in range(2):
        out = subprocess.run(["apt-cache", "pkgnames", "linux-image-6.1.0-"], capture_output=True,
                             text=True, check=True).stdout
        found = [(int(m.group(1)), m.group(0)) for m in
                 (re.fullmatch(r"linux-image-6\.1\.0-(\d+)-amd64", n.strip()) for n in out.split())
                 if m]
        if found:
            return max(found)[1]
        if attempt == 0:
            subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True)
    raise RuntimeError("no linux-image-6.1.0-<n>-amd64 in the package lists")


@contextmanager
def _cache_lock() -> Iterator[None]:
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare() -> GuestImage:
    """The cached kernel and base initramfs (downloaded and built on first use)."""
    with _cache_lock():
        existing = sorted(CACHE.glob("linux-image-6.1.0-*-amd64_*.deb"))
        pkg = existing[-1].name.split("_")[0] if existing and os.environ.get(
            "NYDUS_GUEST_OFFLINE") else _kernel_package()
        debs = sorted(CACHE.glob(f"{pkg}_*.deb"))
        if not debs:
            subprocess.run(["apt-get", "download", "-q", pkg], cwd=CACHE, check=True,
                           capture_output=True)
            debs = sorted(CACHE.glob(f"{pkg}_*.deb"))
        tree = CACHE / pkg
        if not (tree / ".done").exists():
            shutil.rmtree(tree, ignore_errors=True)
            subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(tree)], check=True)
            (tree / ".done").touch()
        kernel = next((tree / "boot").glob("vmlinuz-*"))
        recipe = hashlib.sha256((INIT + " ".join(MODULES)).encode()).hexdigest()[:12]
        initramfs = CACHE / f"{pkg}-virtiofs-{recipe}.cpio.gz"
        if not initramfs.exists():
            _build_initramfs(tree, initramfs)
        return GuestImage(kernel, initramfs)


def _build_initramfs(tree: Path, out: Path) -> None:
    stage = out.with_suffix(".stage")
    shutil.rmtree(stage, ignore_errors=True)
    for d in ("bin", "sbin", "proc", "sys", "dev", "mnt", "tmp", "lib/modules", "usr/bin", "usr/sbin"):
        (stage / d).mkdir(parents=True, exist_ok=True)
    shutil.copy(BUSYBOX, stage / "bin/busybox")
    for name in MODULES:
        found = next(tree.glob(f"lib/modules/*/kernel/**/{name}.ko"))
        shutil.copy(found, stage / f"lib/modules/{name}.ko")
    (stage / "init").write_text(INIT)
    (stage / "init").chmod(0o755)
    files = subprocess.run(["find", "."], cwd=stage, capture_output=True, check=True).stdout
    cpio = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=stage, input=files,
                          capture_output=True, check=True).stdout
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(subprocess.run(["gzip", "-1"], input=cpio, capture_output=True, check=True).stdout)
    tmp.rename(out)
    shutil.rmtree(stage)


def _newc(files: dict[str, bytes]) -> bytes:
    """A cpio ``newc`` archive of regular files (mode 0755), with its trailer."""
    out = bytearray()
    entries = [*files.items(), ("TRAILER!!!", b"")]
    for ino, (name, data) in enumerate(entries, start=1):
        mode = 0o100755 if name != "TRAILER!!!" else 0
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
        out += b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0"
        out += bytes(-len(out) % 4)
        out += data
        out += bytes(-len(out) % 4)
    return bytes(out + bytes(-len(out) % 512))


class Guest:
    """One QEMU guest with vhost-user-fs devices ``{tag: socket}`` running ``script``."""

    def __init__(self, image: GuestImage, devices: dict[str, str], script: str, workdir: Path,
                 *, mem_mb: int = 512, cpus: int = 1, queue_size: int = 1024) -> None:
        self.image = image
        self.devices = devices
        self.script = script
        self.workdir = workdir
        self.mem_mb = mem_mb
        self.cpus = cpus
        self.queue_size = queue_size
        self.proc: subprocess.Popen[bytes] | None = None
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader: threading.Thread | None = None
        self.log_path = workdir / f"guest-{id(self)}.log"

    def command(self, initrd: Path) -> list[str]:
        cmd = [QEMU, "-machine", "q35,accel=tcg", "-cpu", "max", "-m", f"{self.mem_mb}M",
               "-smp", str(self.cpus), "-kernel", str(self.image.kernel), "-initrd", str(initrd),
               "-append", "console=ttyS0 quiet loglevel=3 panic=-1", "-display", "none",
               "-serial", "stdio", "-no-reboot", "-nodefaults",
               "-object", f"memory-backend-memfd,id=mem,size={self.mem_mb}M,share=on",
               "-numa", "node,memdev=mem"]
        for i, (tag, sock) in enumerate(self.devices.items()):
            cmd += ["-chardev", f"socket,id=char{i},path={sock}",
                    "-device", f"vhost-user-fs-pci,queue-size={self.queue_size},chardev=char{i},tag={tag}"]
        return cmd

    def start(self) -> Guest:
        initrd = self.workdir / f"initrd-{id(self)}.cpio.gz"
        base = self.image.initramfs.read_bytes()
        # the kernel reads the next archive of the concatenation at a 4-byte boundary
        initrd.write_bytes(base + bytes(-len(base) % 4) + _newc({"test.sh": self.script.encode()}))
        self.proc = subprocess.Popen(self.command(initrd), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        with open(self.log_path, "w", errors="replace") as log:
            for raw in self.proc.stdout:
                line = raw.decode(errors="replace").rstrip("\r\n")
                log.write(line + "\n")
                log.flush()
                self._queue.put(line)
        self._queue.put(None)

    def expect(self, pattern: str, timeout: float = 120.0) -> re.Match[str]:
        """Wait for a console line matching ``pattern``; raises AssertionError with the console."""
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"guest: no line matching {pattern!r} in {timeout}s:\n"
                                     + self.console())
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"guest ended before {pattern!r}:\n" + self.console())
            self.lines.append(line)
            found = rx.search(line)
            if found:
                return found

    def finish(self, timeout: float = 300.0) -> list[str]:
        """Wait for the script's end (``GUEST_EXIT 0`` required) and QEMU's exit; all lines."""
        self.expect(r"^GUEST_EXIT 0$", timeout)
        assert self.proc is not None
        self.proc.wait(30)
        if self._reader is not None:
            self._reader.join(5)
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.lines.append(line)
        return self.lines

    def console(self) -> str:
        return "\n".join(self.lines[-60:])

    def kill(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
        if self._reader is not None:
            self._reader.join(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def parse_listing(lines: list[str], prefix: str = "") -> dict[str, tuple[object, ...]]:
    """The entries of a ``LISTING_SCRIPT`` output whose path starts with ``prefix`` (a marker the
    script put on its lines): path -> (type+mode, uid, gid, size (non-dirs), sha256, link target,
    hard-link group = first path sharing the inode among regular files with nlink > 1)."""
    stats: dict[str, list[str]] = {}
    hashes: dict[str, str] = {}
    links: dict[str, str] = {}
    for line in lines:
        if not line.startswith(prefix):
            continue
        kind, _, rest = line[len(prefix):].partition("|")
        if kind == "S":
            path, mode, uid, gid, size, ino, nlink = rest.rsplit("|", 6)
            stats[path] = [mode, uid, gid, size, ino, nlink]
        elif kind == "H":
            digest, path = rest.split("  ", 1)
            hashes[path] = digest
        elif kind == "L":
            path, target = rest.split("|", 1)
            links[path] = target
    groups: dict[str, list[str]] = {}
    for path, (mode, _uid, _gid, _size, ino, nlink) in stats.items():
        if int(mode, 16) & 0o170000 == 0o100000 and int(nlink) > 1:
            groups.setdefault(ino, []).append(path)
    out: dict[str, tuple[object, ...]] = {}
    for path, (mode, uid, gid, size, ino, _nlink) in stats.items():
        m = int(mode, 16)
        is_dir = m & 0o170000 == 0o040000
        group = min(groups[ino]) if ino in groups else None
        out[path] = (oct(m), int(uid), int(gid), None if is_dir else int(size), hashes.get(path),
                     links.get(path), group)
    return out


def host_listing(root: Path) -> dict[str, tuple[object, ...]]:
    """What ``parse_listing`` returns for a guest's listing of a directory equal to ``root``."""
    stats: dict[str, os.stat_result] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [".", *dirnames, *filenames]:
            if name == "." and dirpath != str(root):
                continue
            full = os.path.join(dirpath, name) if name != "." else dirpath
            rel = "." if full == str(root) else "./" + os.path.relpath(full, root)
            stats[rel] = os.lstat(full)
    groups: dict[int, list[str]] = {}
    for path, st in stats.items():
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            groups.setdefault(st.st_ino, []).append(path)
    out: dict[str, tuple[object, ...]] = {}
    for path, st in stats.items():
        full = root / path
        digest = hashlib.sha256(full.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else None
        target = os.readlink(full) if stat.S_ISLNK(st.st_mode) else None
        group = min(groups[st.st_ino]) if st.st_ino in groups else None
        out[path] = (oct(st.st_mode), st.st_uid, st.st_gid,
                     None if stat.S_ISDIR(st.st_mode) else st.st_size, digest, target, group)
    return out


def unpack(bootstrap: str, blob_dir: str, dest: Path) -> Path:
    """``nydus-image unpack`` the image into a tar, extracted (as root: owners, modes, devices)
    into ``dest``."""
    dest.mkdir(parents=True)
    tar = dest.with_suffix(".tar")
    subprocess.run([sys.executable, "-m", "nydusd.cli.image", "unpack", "--blob-dir", blob_dir,
                    "--output", str(tar), bootstrap], check=True, capture_output=True)
    subprocess.run(["tar", "-xpf", str(tar), "--numeric-owner", "-C", str(dest)], check=True)
    tar.unlink()
    return dest


class RefVirtiofsd:
    """The reference C virtiofsd serving ``source`` on ``sock`` (private /run via unshare -m)."""

    def __init__(self, source: Path, sock: str, log_path: Path, *, cache: str = "auto") -> None:
        self.source, self.sock, self.log_path = source, sock, log_path
        self.cache = cache
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RefVirtiofsd:
        # its default --thread-pool-size=0 (requests served in the queue thread): with a pool this
        # virtiofsd (QEMU 7.2) exited after a guest drop_caches + read cycle in our benchmark
        inner = (f"mount -t tmpfs tmpfs /run && exec {VIRTIOFSD} --socket-path={self.sock} "
                 f"-o source={self.source} -o cache={self.cache}")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", inner],
                                         stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("virtiofsd did not start:\n" + self.log_path.read_text()[-2000:])
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if os.path.exists(self.sock):
            os.unlink(self.sock)


def start_backend(work: Path, *args: str, api: bool = False) -> tuple[Nydusd, str]:
    """``nydusd --sock S ARGS`` as a vhost-user-fs back-end (with ``--apisock`` when ``api``), waited
    for until its sockets exist; returns the daemon and the vhost-user socket path."""
    sock = str(work / "nydusd-vhost.sock")
    apisock = str(work / "api.sock") if api else None
    d = Nydusd(["--sock", sock, *(["--apisock", apisock] if apisock else []), *args], work / "unused",
               log_path=work / "nydusd.log", apisock=apisock)
    d.start(wait_mount=False)
    d.wait(lambda: os.path.exists(sock) and (apisock is None or os.path.exists(apisock)), 30, "the sockets")
    return d, sock


@contextmanager
def beside_reference(image: GuestImage, sock: str, ref: RefVirtiofsd, script: str, workdir: Path,
                     **guest_kw: int) -> Iterator[Guest]:
    """A guest (not started yet) with our back-end on ``sock`` as tag ``nydus`` and the reference
    virtiofsd ``ref`` (started here) as tag ``ref``; on the way out the guest is killed and virtiofsd
    stopped."""
    guest = Guest(image, {"nydus": sock, "ref": ref.sock}, script, workdir, **guest_kw)
    try:
        ref.start()
        yield guest
    finally:
        guest.kill()
        ref.stop()
