"""The ``localdisk`` backend: blobs are partitions of one local disk (or disk image file).

Owns: ``LocalDiskBackend`` and the small GPT reader it needs (``read_gpt``). Upstream's layout:
each blob is a GPT partition (512-byte sectors). A partition of the "basic data" type is the
legacy layout: its name is the first 32 characters of the blob id. Any other type stores the
64-character id in two halves: the partition name (32 characters) followed by the partition's
unique GUID written as 32 hex digits. With ``disable_gpt`` nothing is scanned and blobs are
registered with ``add_blob(blob_id, offset, length)``. A blob's size is its partition's size;
reads past it return short (no exact-length check beyond the partition).

Must not import any HTTP library, cache, rafs or fs.

Threading: the device is opened once; reads use ``os.pread``. The blob table is replaced only
under a lock (``add_blob``) and read without one (dict lookups are atomic).
"""

from __future__ import annotations

import binascii
import os
import struct
import threading
import uuid
from dataclasses import dataclass
from typing import ClassVar

from nydusd.config import LocalDiskConfig
from nydusd.errors import BackendError, BlobNotFound, ConfigError
from nydusd.storage.backend.base import BlobBackend, RetryPolicy

SECTOR = 512
GPT_SIGNATURE = b"EFI PART"
# header at LBA 1: signature(8) revision(4) header_size(4) header_crc32(4) reserved(4)
# current_lba(8) backup_lba(8) first_usable(8) last_usable(8) disk_guid(16)
# entries_lba(8) entry_count(4) entry_size(4) entries_crc32(4)
_HEADER = struct.Struct("<8sIII4xQQQQ16sQIII")
# entry: type_guid(16) unique_guid(16) first_lba(8) last_lba(8, inclusive) attributes(8) name(72)
_ENTRY = struct.Struct("<16s16sQQQ72s")
BASIC_DATA_TYPE = uuid.UUID("ebd0a0a2-b9e5-4433-87c0-68b6b72699c7")
LEGACY_ID_LEN = 32


@dataclass(frozen=True)
class GptPartition:
    type_guid: uuid.UUID
    part_guid: uuid.UUID
    offset: int
    length: int
    name: str


def read_gpt(fd: int, device: str) -> list[GptPartition]:
    """The used entries of the primary GPT of ``fd``. Raises ConfigError on a missing or corrupt
    table (bad signature, header or entry-array CRC, entries outside the device)."""
    capacity = os.fstat(fd).st_size or os.lseek(fd, 0, os.SEEK_END)
    raw = os.pread(fd, SECTOR, SECTOR)
    if len(raw) < _HEADER.size or raw[:8] != GPT_SIGNATURE:
        raise ConfigError(f"localdisk: {device} has no GPT partition table",
                          field="backend.localdisk.device_path")
    (_, _, hsize, hcrc, _, _, _, _, _, entries_lba, count, esize, ecrc) = _HEADER.unpack_from(raw)
    header = bytearray(raw[:hsize])
    header[16:20] = b"\0\0\0\0"
    if hsize < _HEADER.size or hsize > SECTOR or binascii.crc32(header) != hcrc:
        raise ConfigError(f"localdisk: {device} has a corrupt GPT header",
                          field="backend.localdisk.device_path")
    if esize < _ENTRY.size or count > 4096:
        raise ConfigError(f"localdisk: {device} has an unsupported GPT entry layout",
                          field="backend.localdisk.device_path")
    table = os.pread(fd, count * esize, entries_lba * SECTOR)
    if binascii.crc32(table) != ecrc:
        raise ConfigError(f"localdisk: {device} has a corrupt GPT entry array",
                          field="backend.localdisk.device_path")
    parts = []
    for i in range(count):
        tguid, pguid, first, last, _, name = _ENTRY.unpack_from(table, i * esize)
        if tguid == b"\0" * 16:
            continue
        offset, length = first * SECTOR, (last - first + 1) * SECTOR
        if last < first or offset + length > capacity:
            raise ConfigError(f"localdisk: partition {i + 1} of {device} lies outside the device",
                              field="backend.localdisk.device_path")
        text = name.decode("utf-16-le", errors="replace").split("\0", 1)[0]
        parts.append(GptPartition(uuid.UUID(bytes_le=tguid), uuid.UUID(bytes_le=pguid), offset, length, text))
    return parts


class LocalDiskBackend(BlobBackend):
    """Read blobs from partitions of a local disk with ``pread``."""

    type: ClassVar[str] = "localdisk"

    def __init__(self, cfg: LocalDiskConfig, retry: RetryPolicy | None = None) -> None:
        super().__init__(retry)
        self.device_path: str = cfg.device_path
        if not self.device_path:
            raise ConfigError("localdisk backend needs `device_path`", field="backend.localdisk.device_path")
        try:
            self._fd = os.open(self.device_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise ConfigError(f"localdisk: cannot open {self.device_path}: {exc.strerror}",
                              field="backend.localdisk.device_path") from exc
        self.capacity = os.fstat(self._fd).st_size or os.lseek(self._fd, 0, os.SEEK_END)
        self._lock = threading.Lock()
        self._blobs: dict[str, tuple[int, int]] = {}
        self.legacy_gpt = False
        if not cfg.disable_gpt:
            try:
                self._scan()
            except ConfigError:
                os.close(self._fd)
                raise

    def _scan(self) -> None:
        for part in read_gpt(self._fd, self.device_path):
            if part.type_guid == BASIC_DATA_TYPE:
                self.legacy_gpt = True
                blob_id = part.name
            else:
                blob_id = part.name + part.part_guid.hex
            if not part.name:
                raise ConfigError(f"localdisk: partition {part.part_guid} has an empty blob id",
                                  field="backend.localdisk.device_path")
            if blob_id in self._blobs:
                raise ConfigError(f"localdisk: blob {blob_id} appears twice",
                                  field="backend.localdisk.device_path")
            self._blobs[blob_id] = (part.offset, part.length)

    def add_blob(self, blob_id: str, offset: int, length: int) -> None:
        """Register a blob at ``[offset, offset+length)`` of the device (``disable_gpt`` layouts).
        Raises BackendError for a range outside the device, a duplicate, or a legacy GPT disk."""
        if self.legacy_gpt:
            raise BackendError(f"localdisk: {self.device_path} uses the legacy GPT layout", blob_id=blob_id)
        if offset < 0 or length < 0 or offset + length > self.capacity:
            raise BackendError("localdisk: blob range lies outside the device", blob_id=blob_id,
                               offset=offset, size=length, device_size=self.capacity)
        with self._lock:
            if blob_id in self._blobs:
                raise BackendError("localdisk: blob already exists", blob_id=blob_id)
            self._blobs = {**self._blobs, blob_id: (offset, length)}

    def _lookup(self, blob_id: str) -> tuple[int, int]:
        entry = self._blobs.get(blob_id)
        if entry is None and self.legacy_gpt and len(blob_id) >= LEGACY_ID_LEN:
            entry = self._blobs.get(blob_id[:LEGACY_ID_LEN])
        if entry is None:
            raise BlobNotFound(f"localdisk: no partition for blob on {self.device_path}", blob_id=blob_id)
        return entry

    def try_blob_size(self, blob_id: str) -> int:
        return self._lookup(blob_id)[1]

    def try_read(self, blob_id: str, offset: int, size: int, *, prefetch: bool = False) -> bytes:
        base, length = self._lookup(blob_id)
        if offset >= length:
            return b""
        return os.pread(self._fd, min(size, length - offset), base + offset)

    def is_transient(self, exc: BaseException) -> bool:
        return isinstance(exc, InterruptedError)

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
        super().close()
