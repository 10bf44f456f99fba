"""Build real OCI test images with umoci and push them with skopeo to a real docker-registry.

The 3-layer texture (see ``build_texture_image``):
1. base (umoci repack of a rootfs): dirs, small and multi-chunk files, an empty file, a symlink (one
   relative, one absolute pointing outside the tree), hard links, a file with user xattrs, a fifo,
   odd modes and owners;
2. (umoci repack) added and modified files, a mode change, a replaced symlink;
3. (hand-written tar, ``umoci raw add-layer``) whiteouts of a file and a directory, an opaque
   directory with new content and a hard link inside the layer.

All skopeo/umoci state goes into the caller's tmp dir (HOME, XDG dirs, --tmpdir).
"""

from __future__ import annotations

import io
import os
import random
import shutil
import subprocess
import tarfile
from pathlib import Path


def tool_env(tmp: Path) -> dict[str, str]:
    home = tmp / "home"
    for d in ("", ".config", ".cache", "run"):
        (home / d).mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), XDG_CACHE_HOME=str(home / ".cache"),
               XDG_RUNTIME_DIR=str(home / "run"), TMPDIR=str(home / "run"))
    return env


def run(cmd: list[str], env: dict[str, str] | None = None, **kw: object) -> str:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, **kw)  # type: ignore[call-overload]
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}): {proc.stderr.strip()}")
    return str(proc.stdout)


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)


def _rand(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _layer1(rootfs: Path) -> None:
    _write(rootfs / "etc/hostname", b"nydus-test\n")
    _write(rootfs / "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n")
    _write(rootfs / "bin/tool", _rand(1, 300_000), 0o755)
    _write(rootfs / "usr/lib/big.bin", _rand(2, 3 * 1024 * 1024 + 12345))
    _write(rootfs / "usr/lib/zeros.bin", b"\0" * (2 * 1024 * 1024))
    _write(rootfs / "usr/share/doc/readme.txt", b"docs\n" * 100)
    _write(rootfs / "usr/share/doc/pkg/changelog", b"changes\n" * 50)
    _write(rootfs / "opt/app/old.conf", b"old config\n")
    _write(rootfs / "opt/app/keep/data", b"keep me? no\n")
    _write(rootfs / "empty", b"")
    _write(rootfs / "home/user/notes.txt", b"hello\n", 0o600)
    os.chown(rootfs / "home/user/notes.txt", 1000, 1000)
    os.chown(rootfs / "home/user", 1000, 1000)
    _write(rootfs / "setuid", b"#!/bin/sh\n", 0o4755)
    os.link(rootfs / "bin/tool", rootfs / "bin/tool-link")
    os.symlink("tool", rootfs / "bin/tool-sym")
    os.symlink("/etc/hostname", rootfs / "etc/host-abs")
    os.symlink("../../../outside", rootfs / "usr/lib/escape-sym")
    _write(rootfs / "xattr-file", b"with xattrs\n")
    os.setxattr(rootfs / "xattr-file", "user.nydus", b"value-1")
    os.setxattr(rootfs / "xattr-file", "user.empty", b"")
    os.mkfifo(rootfs / "fifo")
    (rootfs / "emptydir").mkdir()
    os.chmod(rootfs / "emptydir", 0o1777)


def _layer2(rootfs: Path) -> None:
    _write(rootfs / "etc/hostname", b"nydus-test-2\n")
    _write(rootfs / "usr/lib/new.bin", _rand(3, 1_500_000))
    # identical content to a layer-1 file: a chunk dedup opportunity
    _write(rootfs / "usr/lib/big-copy.bin", _rand(2, 3 * 1024 * 1024 + 12345))
    os.chmod(rootfs / "bin/tool", 0o700)
    os.unlink(rootfs / "bin/tool-sym")
    os.symlink("/bin/tool-link", rootfs / "bin/tool-sym")
    _write(rootfs / "opt/app/new.conf", b"new config\n")


def _layer3_tar() -> bytes:
    """Whiteouts, an opaque directory and a hard link to a lower-layer file, written by hand so that
    each case is present exactly (umoci's own diff never emits opaque markers)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        def add(name: str, data: bytes | None = None, *, kind: bytes = tarfile.REGTYPE,
                mode: int = 0o644, link: str = "", pax: dict[str, str] | None = None) -> None:
            ti = tarfile.TarInfo(name)
            ti.type, ti.mode, ti.mtime, ti.linkname = kind, mode, 1_700_000_000, link
            ti.size = len(data) if data is not None and kind == tarfile.REGTYPE else 0
            if pax:
                ti.pax_headers = pax
            tar.addfile(ti, io.BytesIO(data) if ti.size else None)
        add("usr/", kind=tarfile.DIRTYPE, mode=0o755)
        add("usr/share/", kind=tarfile.DIRTYPE, mode=0o755)
        add("usr/share/.wh.doc", b"")                       # whiteout a directory
        add("etc/", kind=tarfile.DIRTYPE, mode=0o755)
        add("etc/.wh.host-abs", b"")                        # whiteout a symlink
        add("opt/", kind=tarfile.DIRTYPE, mode=0o755)
        add("opt/app/", kind=tarfile.DIRTYPE, mode=0o750)
        add("opt/app/.wh..wh..opq", b"")                    # opaque: old.conf, new.conf, keep/ vanish
        add("opt/app/fresh.conf", b"fresh\n")
        add("opt/app/fresh-hard", kind=tarfile.LNKTYPE, link="opt/app/fresh.conf")
        add(".wh.empty", b"")
        add("layer3.txt", b"third layer\n", pax={"SCHILY.xattr.user.layer": "3"})
    return buf.getvalue()


def build_texture_image(tmp: Path, tag: str = "v1") -> Path:
    """An OCI layout ``tmp/oci`` with image ``tag`` (3 layers); returns the layout path."""
    layout = tmp / "oci"
    bundle = tmp / "bundle"
    env = tool_env(tmp)
    run(["umoci", "init", "--layout", str(layout)], env)
    run(["umoci", "new", "--image", f"{layout}:{tag}"], env)
    run(["umoci", "unpack", "--image", f"{layout}:{tag}", str(bundle)], env)
    _layer1(bundle / "rootfs")
    run(["umoci", "repack", "--refresh-bundle", "--image", f"{layout}:{tag}", str(bundle)], env)
    _layer2(bundle / "rootfs")
    run(["umoci", "repack", "--refresh-bundle", "--image", f"{layout}:{tag}", str(bundle)], env)
    shutil.rmtree(bundle)
    (tmp / "layer3.tar").write_bytes(_layer3_tar())
    run(["umoci", "raw", "add-layer", "--image", f"{layout}:{tag}", str(tmp / "layer3.tar")], env)
    run(["umoci", "config", "--image", f"{layout}:{tag}", "--config.cmd", "/bin/tool",
         "--config.env", "A=1", "--config.workingdir", "/opt"], env)
    return layout


def unpack_rootfs(tmp: Path, layout: Path, tag: str, dest: Path) -> Path:
    """The OCI rootfs as umoci unpacks it (whiteouts applied); returns ``dest/rootfs``."""
    run(["umoci", "unpack", "--image", f"{layout}:{tag}", str(dest)], tool_env(tmp))
    return dest / "rootfs"


def skopeo_push(tmp: Path, layout: Path, tag: str, dest: str, creds: str | None = None,
                *, fmt: str | None = None) -> None:
    cmd = ["skopeo", "--tmpdir", str(tmp / "home/run"), "copy", "--dest-tls-verify=false"]
    if creds:
        cmd += ["--dest-creds", creds]
    if fmt:
        cmd += ["--format", fmt]
    run([*cmd, f"oci:{layout}:{tag}", f"docker://{dest}"], tool_env(tmp))


def skopeo_push_tar(tmp: Path, tar_path: Path, dest: str) -> None:
    run(["skopeo", "--tmpdir", str(tmp / "home/run"), "copy", "--dest-tls-verify=false",
         f"docker-archive:{tar_path}", f"docker://{dest}"], tool_env(tmp))
