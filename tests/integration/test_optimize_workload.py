"""Record and replay end to end, on a real docker-registry with runc: ``nydusify optimize --workload``
runs a command in a container on the lazily mounted image while nydusd records what it reads, and
pushes the image rebuilt with that list as its prefetch table; mounting the optimized image then
prefetches those files in that order, before the container asks, and fetches no chunk twice. A
reader's miss overtakes a running table prefetch. Orders are the order of the backend's requests
(every blob GET is redirected to a recording blob store), never wall-clock times."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nydusd.cli.convert import main as nydusify
from nydusd.converter.optimize import source_bootstrap
from nydusd.converter.publish import extract_bootstrap
from nydusd.converter.remote import open_remote
from nydusd.converter.workload import RuncContainer, workload_args
from nydusd.rafs import load_bootstrap
from tests.converter.test_convert import convert
from tests.harness.apiclient import ApiClient
from tests.harness.daemon import Nydusd
from tests.harness.oci_images import skopeo_push
from tests.harness.oci_registry import Registry
from tests.harness.servers.fault_shim import BlobStore, FaultShim
from tests.integration.test_runc_e2e import busybox_image

pytestmark = pytest.mark.fuse

TOOLS = ("runc", "umoci", "skopeo", "docker-registry", "busybox")
NYDUSD = f"{sys.executable} -m nydusd"
READS = ["/etc/motd", "/opt/data/payload2.bin", "/opt/data/payload0.bin"]   # not in path order
WORKLOAD = ("/bin/sh -c 'cat /etc/motd > /dev/null; cat /opt/data/payload2.bin > /dev/null; "
            "cat /opt/data/payload0.bin > /dev/null; echo workload-done'")


class SlowStore(BlobStore):
    """The recording blob store, answering each request ``delay`` seconds late."""

    delay = 0.0

    def record(self, method: str, path: str, headers: dict[str, str]) -> None:
        super().record(method, path, headers)
        time.sleep(self.delay)

    def ranges(self) -> list[tuple[int, int]]:
        """Byte ranges of the blob GETs so far, in arrival order (end exclusive)."""
        out = []
        with self._lock:
            seen = list(self.seen)
        for method, _, headers in seen:
            rng = {k.lower(): v for k, v in headers.items()}.get("range", "")
            if method == "GET" and rng.startswith("bytes="):
                a, _, b = rng[6:].partition("-")
                out.append((int(a), int(b) + 1))
        return out


@dataclass
class Images:
    registry: Registry
    nydus: str
    work: Path


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Images]:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")
    tmp = tmp_path_factory.mktemp("optimize-workload")
    layout = busybox_image(tmp)
    with Registry(tmp / "registry") as registry:
        src, dst = f"{registry.host}/opt/busybox:v1", f"{registry.host}/opt/busybox:nydus"
        skopeo_push(tmp, layout, "v1", src)
        convert(src, dst, tmp / "convert")
        yield Images(registry, dst, tmp)


def image_files(ref: str) -> tuple[bytes, list[str], dict[str, list[tuple[int, int]]], list[str]]:
    """Bootstrap, prefetch table, each regular file's compressed chunk ranges, data layer digests."""
    remote = open_remote(ref, plain_http=True)
    try:
        doc, _, layer = source_bootstrap(remote)
    finally:
        remote.close()
    boot = extract_bootstrap(layer)
    with load_bootstrap(boot) as sb:
        table = [sb.path_of(i).decode() for i in sb.prefetch_inodes()]
        chunks = {p.decode(): [(c.compressed_offset, c.compressed_offset + c.compressed_size)
                               for c in sb.chunks(inode.ino)]
                  for p, inode in sb.walk() if inode.is_reg and inode.size}
    return boot, table, chunks, [d.digest for d in doc.layers[:-1]]


def first_request(ranges: list[tuple[int, int]], spans: list[tuple[int, int]]) -> int | None:
    """Index of the first request overlapping one of ``spans``."""
    for i, (a, b) in enumerate(ranges):
        if any(a < e and s < b for s, e in spans):
            return i
    return None


def mount(tmp: Path, boot: bytes, shim: FaultShim, repo: str, **prefetch: object) -> tuple[Nydusd, ApiClient]:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "image.boot").write_bytes(boot)
    config = {"device": {"backend": {"type": "registry", "config": {
                  "scheme": "http", "host": shim.host, "repo": repo, "timeout": 30, "retry_limit": 0}},
              "cache": {"type": "blobcache", "config": {"work_dir": str(tmp / "cache")}}},
              "mode": "direct", "digest_validate": False, "enable_xattr": True,
              "amplify_io": 0, "fs_prefetch": {"enable": True, "prefetch_all": False, **prefetch}}
    (tmp / "nydusd.json").write_text(json.dumps(config))
    mnt = tmp / "mnt"
    mnt.mkdir()
    sock = str(tmp / "api.sock")
    d = Nydusd(["--config", str(tmp / "nydusd.json"), "--bootstrap", str(tmp / "image.boot"),
                "--mountpoint", str(mnt), "--apisock", sock], mnt, log_path=tmp / "nydusd.log", apisock=sock)
    return d, ApiClient(sock)


def wait_quiet(store: SlowStore, quiet: float = 1.0, timeout: float = 30) -> None:
    """Until the store has seen no new request for ``quiet`` seconds."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        n = len(store.ranges())
        if n != last:
            last, since = n, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
        time.sleep(0.05)
    raise AssertionError("the daemon kept fetching")


def test_optimize_records_a_workload_and_the_optimized_image_replays_it(images: Images,
                                                                        tmp_path: Path) -> None:
    target = images.nydus.replace(":nydus", ":optimized")
    listing = tmp_path / "prefetch.files"
    rc = nydusify(["--log-level", "warn", "optimize", "--source", images.nydus, "--target", target,
                   "--plain-http", "--workload", WORKLOAD, "--nydusd", NYDUSD, "--work-dir",
                   str(tmp_path / "work"), "--output-prefetch-files", str(listing)])
    assert rc == 0
    _, _, _, source_blobs = image_files(images.nydus)
    boot, table, chunks, blobs = image_files(target)
    print("recorded:", table)
    assert listing.read_text().splitlines() == table
    # the files the command read, in first-read order; busybox (the container's first exec) ahead
    # of them; the payload it never read is not there
    assert [p for p in table if p in READS] == READS
    assert table.index("/bin/busybox") < table.index("/etc/motd")
    assert "/opt/data/payload1.bin" not in table
    assert blobs == source_blobs

    # replay: mounted with fs_prefetch, the daemon fetches the table in table order by itself,
    # then the container reads without a single further request; no byte is fetched twice
    store = SlowStore()
    shim = FaultShim(images.registry.port, redirect_to=store)
    d, api = mount(tmp_path / "replay", boot, shim, "opt/busybox", threads_count=1, merging_size=1 << 20)
    try:
        with d:
            wait_quiet(store)
            before = store.ranges()
            firsts = [first_request(before, chunks[p]) for p in table]
            assert None not in firsts, (table, firsts, before)
            # each request stands at the place of the first listed file it serves (chunks adjacent in
            # the blob merge into one request wherever they are in the list): non-decreasing
            places = [min(i for i, p in enumerate(table) if first_request([r], chunks[p]) is not None)
                      for r in before]
            assert places == sorted(places), (table, places, before)
            pos = dict(zip(table, firsts, strict=True))
            assert pos["/opt/data/payload2.bin"] < pos["/opt/data/payload0.bin"]   # not the blob order
            assert first_request(before, chunks["/opt/data/payload1.bin"]) is None
            work = tmp_path / "replay" / "container"
            result = RuncContainer(Path(d.mountpoint), work, workload_args(WORKLOAD)).run(60)
            assert result.exit_code == 0, result.stderr + d.log()
            assert result.stdout.strip() == "workload-done"
            after = store.ranges()
            assert after == before, "the container had to fetch after the replay"
            status, backend = api.request("GET", "/api/v1/metrics/backend")
            assert status == 200, backend
            assert backend["read_count"] == len(after)
        spans = sorted(after)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False)), spans
    finally:
        shim.stop()
        store.stop()


def test_a_reader_overtakes_a_running_table_prefetch(images: Images, tmp_path: Path) -> None:
    target = images.nydus.replace(":nydus", ":payloads")
    listing = tmp_path / "prefetch.files"
    payloads = [f"/opt/data/payload{i}.bin" for i in (2, 0, 1)]
    listing.write_text("\n".join(payloads) + "\n")
    assert nydusify(["--log-level", "warn", "optimize", "--source", images.nydus, "--target", target,
                     "--plain-http", "--prefetch-files", str(listing)]) == 0
    boot, table, chunks, _ = image_files(target)
    assert table == payloads
    store = SlowStore()
    store.delay = 0.3    # one chunk per request: 12 prefetch requests, about 4 s
    shim = FaultShim(images.registry.port, redirect_to=store)
    d, _ = mount(tmp_path / "m", boot, shim, "opt/busybox", threads_count=1, merging_size=0)
    try:
        with d:
            deadline = time.monotonic() + 20
            while len(store.ranges()) < 2:
                assert time.monotonic() < deadline, d.log()
                time.sleep(0.01)
            done = threading.Event()
            got: list[bytes] = []

            def read() -> None:
                got.append((Path(d.mountpoint) / "etc/motd").read_bytes())
                done.set()
            threading.Thread(target=read, daemon=True).start()
            assert done.wait(20), d.log()
            assert got == [b"served lazily by nydus\n"]
            wait_quiet(store)
            ranges = store.ranges()
        motd = first_request(ranges, chunks["/etc/motd"])
        prefetch = [i for i, r in enumerate(ranges)
                    if first_request([r], [s for p in payloads for s in chunks[p]]) is not None]
        assert motd is not None and len(prefetch) == sum(len(chunks[p]) for p in payloads), ranges
        # the miss went out while most of the table was still queued, not after it
        assert sum(1 for i in prefetch if i > motd) >= len(prefetch) // 2, (motd, prefetch)
        spans = sorted(ranges)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False)), spans
    finally:
        shim.stop()
        store.stop()


def test_a_failing_workload_pushes_nothing(images: Images, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    target = images.nydus.replace(":nydus", ":failed")
    rc = nydusify(["optimize", "--source", images.nydus, "--target", target, "--plain-http",
                   "--workload", "/bin/sh -c 'cat /etc/motd; exit 3'", "--nydusd", NYDUSD,
                   "--work-dir", str(tmp_path / "work")])
    assert rc == 1
    assert "the workload exited with status 3" in capsys.readouterr().err
    remote = open_remote(target, plain_http=True)
    try:
        with pytest.raises(Exception, match="(?i)not found|unknown"):
            remote.get_manifest("failed")
    finally:
        remote.close()
    # the nydusd mount and the container's overlayfs are gone
    assert str(tmp_path) not in Path("/proc/self/mountinfo").read_text()


def test_a_workload_still_running_at_the_timeout_is_stopped_and_its_reads_kept(
        images: Images, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = images.nydus.replace(":nydus", ":server")
    listing = tmp_path / "prefetch.files"
    rc = nydusify(["--log-level", "warn", "optimize", "--source", images.nydus, "--target", target,
                   "--plain-http", "--workload", "/bin/sh -c 'cat /etc/motd > /dev/null; exec sleep 600'",
                   "--workload-timeout", "2s", "--nydusd", NYDUSD, "--work-dir", str(tmp_path / "work"),
                   "--output-prefetch-files", str(listing)])
    assert rc == 0
    assert "(stopped at the timeout)" in capsys.readouterr().out
    _, table, _, _ = image_files(target)
    assert "/etc/motd" in table and listing.read_text().splitlines() == table
    # container, overlayfs, nydusd and the work files are gone
    assert str(tmp_path) not in Path("/proc/self/mountinfo").read_text()
    assert not (tmp_path / "work").exists()   # created for the recording, removed with it
    assert subprocess.run(["pgrep", "-f", "sleep 600"], capture_output=True).returncode != 0


@pytest.mark.parametrize(("argv", "message"), [
    (["--workload", "sh -c 'unterminated"], "cannot parse the workload command"),
    (["--workload", "   "], "the workload command is empty"),
    (["--prefetch-files", "/dev/null", "--source-backend-type", "localfs"],
     "--source-backend-type needs --source-backend-config"),
])
def test_bad_workload_arguments_fail_before_anything_runs(images: Images, tmp_path: Path, argv: list[str],
                                                          message: str,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    rc = nydusify(["optimize", "--source", images.nydus, "--target", images.nydus + "-bad", "--plain-http",
                   "--work-dir", str(tmp_path / "work"), *argv])
    assert rc == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "work").exists()


def test_a_workload_on_an_image_whose_blobs_are_in_a_storage_backend(images: Images, tmp_path: Path) -> None:
    """Converted with --backend-type localfs (the manifest holds the bootstrap layer only): the
    recording nydusd reads the blobs from --source-backend-*, and the optimized image still has
    no data layer in the registry."""
    from nydusd.converter.stores import create_store

    blobs = tmp_path / "blobs"
    src = f"{images.registry.host}/opt/busybox:v1"
    dst = f"{images.registry.host}/opt/localfs:nydus"
    with create_store("localfs", json.dumps({"dir": str(blobs)})) as store:
        convert(src, dst, tmp_path / "convert", blob_store=store)
    target = f"{images.registry.host}/opt/localfs:optimized"
    base = ["--log-level", "warn", "optimize", "--source", dst, "--target", target, "--plain-http",
            "--workload", "/bin/sh -c 'cat /opt/data/payload1.bin > /dev/null'", "--nydusd", NYDUSD,
            "--work-dir", str(tmp_path / "work")]
    # without the backend the recording daemon has nowhere to read the blobs from: the workload fails
    assert nydusify(base) == 1
    assert nydusify([*base, "--source-backend-type", "localfs", "--source-backend-config",
                     json.dumps({"dir": str(blobs)})]) == 0
    _, table, _, data_layers = image_files(target)
    assert "/opt/data/payload1.bin" in table and data_layers == []
