"""Multipart uploads of the writable object-store backends (s3, oss), against real servers.

s3 runs against moto's S3 server (signature checks on, part size rules enforced); oss against the
OSS-protocol test server (oss2's v1 signatures verified, part order / ETags / sizes checked). The
thresholds are lowered to 5 MiB parts so that a ~12 MiB blob goes up in three parts.
"""

from __future__ import annotations

import builtins
import hashlib
import random
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import botocore.session
import pytest
from botocore.config import Config

from nydusd.config import BackendConfig
from nydusd.errors import BackendError
from nydusd.storage.backend import create_backend
from nydusd.storage.backend import oss as oss_mod
from nydusd.storage.backend import s3 as s3_mod
from nydusd.storage.backend.base import BlobBackend

PART = 5 << 20
DATA = random.Random(424242).randbytes(2 * PART + 1_234_567)
BLOB_ID = hashlib.sha256(DATA).hexdigest()


@pytest.fixture(autouse=True)
def small_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    for mod in (s3_mod, oss_mod):
        monkeypatch.setattr(mod, "MULTIPART_THRESHOLD", PART, raising=False)
        monkeypatch.setattr(mod, "PART_SIZE", PART, raising=False)


@pytest.fixture(scope="module")
def blob_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("upload") / "big.blob"
    path.write_bytes(DATA)
    return path


def _cfg(type_: str, sub: dict[str, Any]) -> BackendConfig:
    return BackendConfig.model_validate({"type": type_, type_: sub})


class TrackedFile:
    """A file whose reads are measured: the largest single read and the bytes read in total."""

    def __init__(self, inner: IO[bytes], stats: dict[str, int]) -> None:
        self.inner = inner
        self.stats = stats

    def read(self, n: int = -1) -> bytes:
        data = self.inner.read(n)
        self.stats["max_read"] = max(self.stats["max_read"], len(data))
        self.stats["total"] += len(data)
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __enter__(self) -> TrackedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.inner.close()


def track_reads(monkeypatch: pytest.MonkeyPatch, module: Any) -> dict[str, int]:
    stats = {"max_read": 0, "total": 0}

    def tracked_open(path: Any, mode: str = "r", *args: Any, **kw: Any) -> Any:
        return TrackedFile(builtins.open(path, mode, *args, **kw), stats)

    monkeypatch.setattr(module, "open", tracked_open, raising=False)
    return stats


# --------------------------------------------------------------------------- s3
@pytest.fixture
def s3(moto_s3: Any, request: pytest.FixtureRequest) -> Iterator[tuple[BlobBackend, Any, str]]:
    bucket = "upload-" + request.node.name.replace("_", "-").lower()[:40]
    moto_s3.create_bucket(bucket)
    client = botocore.session.get_session().create_client(
        "s3", region_name="us-east-1", endpoint_url=f"http://{moto_s3.endpoint}",
        aws_access_key_id=moto_s3.access_key_id, aws_secret_access_key=moto_s3.secret,
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))
    backend = create_backend(_cfg("s3", moto_s3.backend_config(bucket, "blobs/")))
    try:
        yield backend, client, bucket
    finally:
        backend.close()
        client.close()


def test_s3_multipart_roundtrip(s3: tuple[BlobBackend, Any, str], blob_file: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    backend, client, bucket = s3
    stats = track_reads(monkeypatch, s3_mod)
    tracemalloc.start()
    try:
        backend.put_blob(BLOB_ID, str(blob_file))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # streamed: never the whole file (nor two parts) in memory at once
    assert peak < 2 * PART, peak
    assert 0 < stats["max_read"] <= PART and stats["total"] >= len(DATA)
    head = client.head_object(Bucket=bucket, Key=f"blobs/{BLOB_ID}")
    assert head["ContentLength"] == len(DATA)
    assert head["ETag"].strip('"').endswith("-3")  # really a three-part upload
    assert backend.blob_size(BLOB_ID) == len(DATA)
    assert backend.read(BLOB_ID, 0, len(DATA)) == DATA
    assert backend.read(BLOB_ID, PART - 10, 20) == DATA[PART - 10:PART + 10]
    assert not client.list_multipart_uploads(Bucket=bucket).get("Uploads")


def test_s3_small_blob_single_put(s3: tuple[BlobBackend, Any, str], tmp_path: Path) -> None:
    backend, client, bucket = s3
    data = DATA[:PART]  # exactly the threshold: one PUT
    src = tmp_path / "small.blob"
    src.write_bytes(data)
    blob_id = hashlib.sha256(data).hexdigest()
    backend.put_blob(blob_id, str(src))
    head = client.head_object(Bucket=bucket, Key=f"blobs/{blob_id}")
    assert head["ContentLength"] == len(data) and "-" not in head["ETag"]
    assert backend.read(blob_id, 0, len(data)) == data


def test_s3_failed_part_aborts_upload(s3: tuple[BlobBackend, Any, str], blob_file: Path,
                                      monkeypatch: pytest.MonkeyPatch, logs: Any) -> None:
    backend, client, bucket = s3
    real = backend.http.request  # type: ignore[attr-defined]
    sent: list[str] = []

    def flaky(method: str, url: str, **kw: Any) -> Any:
        sent.append(f"{method} {url.rsplit('?', 1)[-1]}")
        if method == "PUT" and "partNumber=2&" in url:
            raise BackendError("connection reset by peer", transient=True)
        return real(method, url, **kw)

    monkeypatch.setattr(backend, "http", _Wrapped(backend.http, flaky))  # type: ignore[attr-defined]
    with logs.expect("backend_retries_exhausted"), pytest.raises(BackendError) as ei:
        backend.put_blob(BLOB_ID, str(blob_file))
    assert ei.value.blob_id == BLOB_ID and "connection reset" in str(ei.value)
    part2 = [s for s in sent if s.startswith("PUT partNumber=2&")]
    assert len(part2) == 3  # retry_limit 2: three attempts of the failing part
    assert not any(s.startswith("PUT partNumber=3&") for s in sent)
    assert sent[-1].startswith("DELETE uploadId=")
    assert not client.list_multipart_uploads(Bucket=bucket).get("Uploads")
    with pytest.raises(client.exceptions.ClientError):
        client.head_object(Bucket=bucket, Key=f"blobs/{BLOB_ID}")
    assert not backend.blob_exists(BLOB_ID)


class _Wrapped:
    """An HttpClient stand-in whose ``request`` is replaced; everything else delegates."""

    def __init__(self, inner: Any, request: Any) -> None:
        self.inner = inner
        self.request = request

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
