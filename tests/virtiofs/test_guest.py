"""Real guests (QEMU TCG, Debian kernel, busybox) mounting nydusd over virtio-fs.

Each listing is made by the guest itself (``find`` + ``stat`` + ``sha256sum`` + ``readlink`` through
its virtiofs mount) and compared with the listing the same guest makes of the reference C
virtiofsd serving ``nydus-image unpack`` of the same image. About four guest boots in all.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest

from tests.harness.apiclient import ApiClient
from tests.harness.daemon import Nydusd
from tests.harness.guest import (
    Guest,
    RefVirtiofsd,
    beside_reference,
    guest_missing,
    host_listing,
    listing_script,
    parse_listing,
    prepare,
    start_backend,
    unpack,
)
from tests.harness.images import DaemonImage, build_daemon_image, sample_tree

pytestmark = [pytest.mark.skipif(guest_missing() is not None, reason=guest_missing() or ""),
              pytest.mark.timeout(900), pytest.mark.slow]

MOUNT_BOTH = """
mkdir -p /n /r
mount -t virtiofs nydus /n || exit 3
mount -t virtiofs ref /r || exit 4
"""


@pytest.fixture(scope="module")
def guest_image():
    return prepare()


@pytest.fixture(scope="module")
def images(tmp_path_factory, upstream):
    tmp = tmp_path_factory.mktemp("gimg")
    src = sample_tree(tmp / "src")
    other = tmp / "other"
    (other / "etc").mkdir(parents=True)
    (other / "etc" / "os-release").write_bytes(b"ID=second\n")
    (other / "data.bin").write_bytes(random.Random(2).randbytes(200_000))
    imgs = {"v6": build_daemon_image(src, tmp / "v6"), "v5": build_daemon_image(src, tmp / "v5", version=5),
            "other": build_daemon_image(other, tmp / "other-img"),
            "up_sha256": DaemonImage(str(upstream / "repeatable" / "sha256-nocompress-repeatable"),
                               str(upstream / "repeatable" / "blobs"), 5),
            "up_blake3": DaemonImage(str(upstream / "repeatable" / "blake3-lz4_block-non_repeatable"),
                               str(upstream / "repeatable" / "blobs"), 5),
            "up_v6": DaemonImage(str(upstream / "bootstrap" / "rafs-v6-2.2.boot"),
                           str(upstream / "blobs"), 6)}
    ref = tmp / "ref"
    ref.mkdir()
    for name, img in imgs.items():
        unpack(img.bootstrap, img.blob_dir, ref / name)
    return {"src": src, "other_src": other, "ref": ref, **imgs}


def _nydusd(tmp: Path, *args: str) -> tuple[Nydusd, str]:
    return start_backend(tmp, *args, api=True)


def _warnings(log_path: Path, allowed: tuple[str, ...] = ()) -> list[str]:
    """Warning/error events in nydusd's JSON log, except ``allowed`` ones: a real guest kernel's
    requests must all decode (no dropped request, bad chain or protocol error)."""
    events = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    return [e["event"] for e in events if e.get("level") in ("warning", "error", "critical")
            and e["event"] not in allowed]


def _assert_same(ours: dict, ref: dict, what: str, at_least: int) -> None:
    assert len(ref) >= at_least, (what, sorted(ref)[:10])
    diff = {p: (ours.get(p), ref.get(p)) for p in set(ours) | set(ref) if ours.get(p) != ref.get(p)}
    assert not diff, f"{what}: {len(diff)} entries differ, e.g. {sorted(diff.items())[:5]}"


def test_guest_listing_equals_reference_virtiofsd(tmp_path, guest_image, images):
    """v6 and v5 builds and the upstream fixtures, mounted through the API in one shared daemon,
    against virtiofsd over their unpacked trees; plus a mount whose backend has gone: EIO on data,
    metadata fine."""
    names = ["v6", "v5", "up_sha256", "up_blake3", "up_v6"]
    d, sock = _nydusd(tmp_path)
    ref = RefVirtiofsd(images["ref"], str(tmp_path / "ref.sock"), tmp_path / "virtiofsd.log")
    try:
        api = ApiClient(d.apisock or "")
        for name in names:
            status, body = api.mount(f"/{name}", images[name].bootstrap,
                                     images[name].config_text(tmp_path / f"cache-{name}"))
            assert status == 204, body
        # a mount whose blob is emptied after mounting (no cache): the backend fails (localfs
        # holds the blob open from the mount on, so removing it would not be noticed)
        broken_blobs = tmp_path / "broken-blobs"
        broken_blobs.mkdir()
        for f in Path(images["v6"].blob_dir).iterdir():
            shutil.copyfile(f, broken_blobs / f.name)
        broken = DaemonImage(images["v6"].bootstrap, str(broken_blobs), 6)
        assert api.mount("/broken", broken.bootstrap, broken.config_text(None))[0] == 204
        for f in broken_blobs.iterdir():
            os.truncate(f, 0)
        script = MOUNT_BOTH + "".join(listing_script(f"/n/{n}", f"N:{n}:") + listing_script(
            f"/r/{n}", f"R:{n}:") for n in names) + """
stat -c 'BROKEN_SIZE %s' /n/broken/dir/exact_chunk
cat /n/broken/dir/exact_chunk > /dev/null 2> /tmp/err
echo "BROKEN_RC $?"
sed 's/^/BROKEN_ERR /' /tmp/err
echo "BROKEN_LS $(ls /n/broken | wc -l)"
echo "TOP $(ls /n | tr '\\n' ' ')"
"""
        with beside_reference(guest_image, sock, ref, script, tmp_path) as guest:
            lines = guest.start().finish(300)
    finally:
        d.terminate()
        d.cleanup()
    for name in names:
        _assert_same(parse_listing(lines, f"N:{name}:"), parse_listing(lines, f"R:{name}:"), name,
                     3 if name == "up_v6" else 20)
    assert parse_listing(lines, "N:v6:") == host_listing(images["src"])
    assert "BROKEN_SIZE 1048576" in lines
    assert "BROKEN_RC 1" in lines
    assert any("Input/output error" in line for line in lines if line.startswith("BROKEN_ERR"))
    assert f"BROKEN_LS {len(os.listdir(images['src']))}" in lines
    assert "TOP broken up_blake3 up_sha256 up_v6 v5 v6 " in lines
    log = (tmp_path / "nydusd.log").read_text()
    assert "read_failed" in log
    assert _warnings(tmp_path / "nydusd.log", ("read_failed", "backend_read_failed")) == []


def test_bootstrap_at_the_root(tmp_path, guest_image, images):
    """``nydusd --sock S --bootstrap B``: the image is the guest's whole mount."""
    img = images["v6"]
    cfg = img.write_config(tmp_path / "config.json", tmp_path / "cache")
    d, sock = _nydusd(tmp_path, "--config", cfg, "--bootstrap", img.bootstrap)
    ref = RefVirtiofsd(images["ref"] / "v6", str(tmp_path / "ref.sock"), tmp_path / "vfsd.log")
    try:
        script = MOUNT_BOTH + listing_script("/n", "N:") + listing_script("/r", "R:")
        with beside_reference(guest_image, sock, ref, script, tmp_path) as guest:
            lines = guest.start().finish(300)
    finally:
        d.terminate()
        d.cleanup()
    _assert_same(parse_listing(lines, "N:"), parse_listing(lines, "R:"), "root", 40)
    assert _warnings(tmp_path / "nydusd.log") == []


WAIT_FOR = """
i=0
while {cond}; do usleep 100000; i=$((i+1)); [ $i -gt 600 ] && exit {code}; done
"""


def test_pseudo_mounts_appear_in_a_running_guest_and_qemu_restart_reconnects(
        tmp_path, guest_image, images):
    """The seed form: two PUT /api/v1/mount while the guest has /mnt mounted make /mnt/pseudo_1 and
    /mnt/pseudo_2 appear; DELETE removes one while the other reads on; QEMU killed and started
    again finds the same daemon and mounts."""
    d, sock = _nydusd(tmp_path)
    api = ApiClient(d.apisock or "")
    first = second = None
    try:
        script = ("mkdir -p /mnt && mount -t virtiofs nydus /mnt || exit 3\necho MOUNTED $(ls /mnt | wc -l)\n"
                  + WAIT_FOR.format(cond="[ ! -d /mnt/pseudo_1 -o ! -d /mnt/pseudo_2 ]", code=5)
                  + "echo SEEN_BOTH\n"
                  + listing_script("/mnt/pseudo_1", "P1:") + listing_script("/mnt/pseudo_2", "P2:")
                  + "exec 3< /mnt/pseudo_2/data.bin\necho LISTED\n"
                  + WAIT_FOR.format(cond="[ -e /mnt/pseudo_1 ]", code=6)
                  + "echo GONE_1 $(ls /mnt)\n"
                  + "echo HELD $(sha256sum <&3)\n"
                  + listing_script("/mnt/pseudo_2", "P2B:")
                  + "echo WAITING_FOR_KILL\nsleep 1000\n")
        first = Guest(guest_image, {"nydus": sock}, script, tmp_path).start()
        first.expect(r"^MOUNTED 0$", 300)
        for name, img in (("pseudo_1", images["v6"]), ("pseudo_2", images["other"])):
            cfg = img.write_config(tmp_path / f"{name}.json", tmp_path / f"cache-{name}")
            status, body = api.request("PUT", "/api/v1/mount", {
                "source": img.bootstrap, "fstype": "rafs", "mountpoint": f"/{name}", "config": cfg})
            assert status == 204, body
        first.expect(r"^LISTED$", 300)
        assert api.umount("/pseudo_1")[0] == 204
        first.expect(r"^WAITING_FOR_KILL$", 300)
        first.kill()  # QEMU dies without a clean vhost-user shutdown
        lines = first.lines
        assert parse_listing(lines, "P1:") == host_listing(images["src"])
        assert parse_listing(lines, "P2:") == host_listing(images["other_src"])
        assert parse_listing(lines, "P2B:") == host_listing(images["other_src"])
        assert "GONE_1 pseudo_2" in lines
        digest = host_listing(images["other_src"])["./data.bin"][4]
        assert any(line.startswith(f"HELD {digest}") for line in lines)
        # a new QEMU on the same socket: same daemon, same mounts
        script2 = ("mount -t virtiofs nydus /mnt || exit 3\necho TOP $(ls /mnt)\n"
                   + listing_script("/mnt/pseudo_2", "C:"))
        second = Guest(guest_image, {"nydus": sock}, script2, tmp_path).start()
        lines2 = second.finish(300)
        assert "TOP pseudo_2" in lines2
        assert parse_listing(lines2, "C:") == host_listing(images["other_src"])
        assert api.info()["state"] == "RUNNING"
    finally:
        for g in (first, second):
            if g is not None:
                g.kill()
        d.terminate()
        d.cleanup()
    log = (tmp_path / "nydusd.log").read_text()
    assert log.count("virtiofs_connected") == 2
    # QEMU killed: the connection ends with EOF (or a reset), nothing else goes wrong
    assert set(_warnings(tmp_path / "nydusd.log")) <= {"virtiofs_connection_error"}
