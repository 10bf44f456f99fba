"""fs_prefetch: after mount the daemon warms the blob cache on its own -- every file
(``prefetch_all``), the image's prefetch table, or ``--prefetch-files`` -- so that the prefetched files
stay readable even once the backend has lost the blob, while the others fail with EIO."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.harness.apiclient import ApiClient
from tests.harness.daemon import Nydusd
from tests.harness.images import build_daemon_image, sample_tree

pytestmark = pytest.mark.fuse


def start(tmp: Path, image, *extra: str, **prefetch) -> tuple[Nydusd, ApiClient]:
    mnt = tmp / "mnt"
    mnt.mkdir()
    sock = str(tmp / "api.sock")
    cfg = image.write_config(tmp / "cfg.json", tmp / "cache",
                             fs_prefetch={"enable": True, "threads_count": 2, **prefetch})
    d = Nydusd(["--config", cfg, "--bootstrap", image.bootstrap, "--mountpoint", str(mnt),
                "--apisock", sock, *extra], mnt, log_path=tmp / "log", apisock=sock)
    return d, ApiClient(sock)


def wait_prefetched(api: ApiClient, min_bytes: int, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status, cache = api.request("GET", "/api/v1/metrics/blobcache")
        assert status == 200, cache
        if cache["prefetch_data_amount"] >= min_bytes:
            return cache
        assert time.monotonic() < deadline, cache
        time.sleep(0.1)


def break_backend(image) -> None:
    for blob in Path(image.blob_dir).iterdir():
        os.truncate(blob, 0)
        blob.unlink()


def test_prefetch_all_warms_every_file(tmp_path):
    src = sample_tree(tmp_path / "src")
    image = build_daemon_image(src, tmp_path / "img", version=6)
    d, api = start(tmp_path, image, prefetch_all=True)
    with d:
        blob_size = sum(p.stat().st_size for p in Path(image.blob_dir).iterdir())
        cache = wait_prefetched(api, blob_size // 2)
        assert cache["prefetch_requests_count"] > 0
        time.sleep(0.5)
        break_backend(image)
        mnt = Path(d.mountpoint)
        for p in [src / "dir" / "multi_chunk", src / "dir" / "exact_chunk", src / "small.txt"]:
            assert (mnt / p.relative_to(src)).read_bytes() == p.read_bytes()


def test_prefetch_files_only_warm_the_listed_files(tmp_path):
    src = sample_tree(tmp_path / "src")
    image = build_daemon_image(src, tmp_path / "img", version=5, compressor="lz4_block")
    listing = tmp_path / "prefetch.txt"
    listing.write_text("/dir/multi_chunk\n\n/no/such/file\n")
    d, api = start(tmp_path, image, "--prefetch-files", str(listing), prefetch_all=False)
    with d:
        wait_prefetched(api, (src / "dir" / "multi_chunk").stat().st_size // 2)
        time.sleep(0.5)
        break_backend(image)
        mnt = Path(d.mountpoint)
        assert (mnt / "dir" / "multi_chunk").read_bytes() == (src / "dir" / "multi_chunk").read_bytes()
        with pytest.raises(OSError) as exc:
            (mnt / "dir" / "exact_chunk").read_bytes()
        assert exc.value.errno == 5


def test_image_prefetch_table_is_used_by_default(tmp_path):
    src = sample_tree(tmp_path / "src")
    image = build_daemon_image(src, tmp_path / "img", version=6, prefetch=("/dir/sub",))
    d, api = start(tmp_path, image, prefetch_all=False)
    with d:
        wait_prefetched(api, 40_000)
        time.sleep(0.5)
        break_backend(image)
        mnt = Path(d.mountpoint)
        leaf = Path("dir/sub/deeper/leaf.bin")
        assert (mnt / leaf).read_bytes() == (src / leaf).read_bytes()
        with pytest.raises(OSError):
            (mnt / "dir" / "multi_chunk").read_bytes()


def test_prefetch_all_streams_the_blob_in_few_large_requests(tmp_path):
    # 48 incompressible files of 256 KiB: 12 MiB of chunks, adjacent in the blob. With the 1 MiB
    # merging size that is >= 12 requests; the whole-image pass must use long streamed runs.
    import random
    rnd = random.Random(3)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(48):
        (src / f"f{i:02d}").write_bytes(rnd.randbytes(256 << 10))
    image = build_daemon_image(src, tmp_path / "img", version=6)
    d, api = start(tmp_path, image, prefetch_all=True, merging_size=1 << 20)
    with d:
        wait_prefetched(api, 48 * (256 << 10))
        status, backend = api.request("GET", "/api/v1/metrics/backend")
        assert status == 200, backend
        assert backend["read_amount_total"] >= 48 * (256 << 10)
        assert backend["read_count"] <= 4, backend
        mnt = Path(d.mountpoint)
        for i in (0, 23, 47):
            assert (mnt / f"f{i:02d}").read_bytes() == (src / f"f{i:02d}").read_bytes()
