"""The ``localdisk`` backend against GPT disk images written by the real ``sfdisk`` (util-linux):
both blob-id layouts (name + partition GUID, and the legacy "basic data" 32-character names),
``disable_gpt`` with ``add_blob``, and refusal of images without or with a corrupt table."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from nydusd.config import BackendConfig
from nydusd.errors import BackendError, BlobNotFound, ConfigError
from nydusd.storage.backend import create_backend
from nydusd.storage.backend.localdisk import LocalDiskBackend

pytestmark = pytest.mark.skipif(shutil.which("sfdisk") is None,
                                reason="sfdisk is not installed (apt install fdisk)")
SECTOR = 512
LINUX_FS = "0FC63DAF-8483-4772-8E3D-3D69475DE4C4"
BASIC_DATA = "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"


def _make_disk(path: Path, blobs: list[bytes], *, legacy: bool) -> list[str]:
    """Partition ``path`` with sfdisk (one partition per blob, 1 MiB aligned), write each blob at
    its partition's start; return the blob ids (sha256 hex)."""
    ids = [hashlib.sha256(b).hexdigest() for b in blobs]
    start = 2048
    lines = ["label: gpt", f"sector-size: {SECTOR}"]
    offsets = []
    for blob_id, data in zip(ids, blobs, strict=True):
        sectors = max(1, -(-len(data) // SECTOR))
        if legacy:
            lines.append(f"start={start}, size={sectors}, type={BASIC_DATA}, name={blob_id[:32]}")
        else:
            part_uuid = str(uuid.UUID(blob_id[32:]))
            lines.append(f"start={start}, size={sectors}, type={LINUX_FS}, uuid={part_uuid}, "
                         f"name={blob_id[:32]}")
        offsets.append(start * SECTOR)
        start += -(-sectors // 2048) * 2048
    with open(path, "wb") as f:
        f.truncate((start + 2048) * SECTOR)
    subprocess.run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(path)],
                   input="\n".join(lines) + "\n", text=True, check=True, capture_output=True)
    with open(path, "r+b") as f:
        for off, data in zip(offsets, blobs, strict=True):
            f.seek(off)
            f.write(data)
    return ids


BLOBS = [os.urandom(1_000_000), os.urandom(4096), b"tiny blob"]


@pytest.mark.parametrize("legacy", [False, True])
def test_gpt_layouts(tmp_path: Path, legacy: bool) -> None:
    disk = tmp_path / "disk.img"
    ids = _make_disk(disk, BLOBS, legacy=legacy)
    cfg = BackendConfig.model_validate({"type": "localdisk", "localdisk": {"device_path": str(disk)}})
    with create_backend(cfg) as b:
        assert isinstance(b, LocalDiskBackend) and b.legacy_gpt == legacy
        for blob_id, data in zip(ids, BLOBS, strict=True):
            padded = -(-len(data) // SECTOR) * SECTOR
            assert b.blob_size(blob_id) == padded  # a blob is its whole partition
            full = data + bytes(padded - len(data))  # the partition's tail is zeros
            assert b.read(blob_id, 0, len(data)) == data
            third = len(data) // 3
            assert b.read(blob_id, third, 1000) == full[third:third + 1000]
            assert b.read(blob_id, padded - 1, 100) == full[-1:]
            assert b.read(blob_id, padded, 10) == b""
        with pytest.raises(BlobNotFound):
            b.read("f" * 64, 0, 1)
        assert b.metrics()["backend_type"] == "localdisk"


def test_disable_gpt_and_add_blob(tmp_path: Path) -> None:
    disk = tmp_path / "raw.img"
    payload = os.urandom(10_000)
    disk.write_bytes(bytes(100) + payload + bytes(50))
    cfg = BackendConfig.model_validate({"type": "localdisk",
                                        "localdisk": {"device_path": str(disk), "disable_gpt": True}})
    with create_backend(cfg) as b:
        assert isinstance(b, LocalDiskBackend)
        with pytest.raises(BlobNotFound):
            b.blob_size("a" * 64)
        b.add_blob("a" * 64, 100, len(payload))
        assert b.read("a" * 64, 0, len(payload) + 10) == payload
        with pytest.raises(BackendError, match="already exists"):
            b.add_blob("a" * 64, 0, 1)
        with pytest.raises(BackendError, match="outside the device"):
            b.add_blob("b" * 64, 100, 1_000_000)


def test_missing_or_corrupt_table(tmp_path: Path) -> None:
    plain = tmp_path / "plain.img"
    plain.write_bytes(bytes(1 << 20))
    for path in (plain, tmp_path / "absent.img"):
        cfg = BackendConfig.model_validate({"type": "localdisk", "localdisk": {"device_path": str(path)}})
        with pytest.raises(ConfigError):
            create_backend(cfg)
    disk = tmp_path / "disk.img"
    _make_disk(disk, BLOBS[:1], legacy=False)
    with open(disk, "r+b") as f:  # flip a byte of the first partition entry
        f.seek(2 * SECTOR + 40)
        byte = f.read(1)
        f.seek(2 * SECTOR + 40)
        f.write(bytes([byte[0] ^ 0xFF]))
    cfg = BackendConfig.model_validate({"type": "localdisk", "localdisk": {"device_path": str(disk)}})
    with pytest.raises(ConfigError, match="corrupt GPT entry array"):
        create_backend(cfg)
