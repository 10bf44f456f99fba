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
        monkeypatch.setattr(mod, "MULTIPART_THRESHOLD", PART)
        monkeypatch.setattr(mod, "PART_SIZE", PART)


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


# --------------------------------------------------------------------------- oss
@pytest.fixture
def oss(oss_server: Any, request: pytest.FixtureRequest) -> Iterator[tuple[BlobBackend, Any, str]]:
    bucket = "upload-" + request.node.name.replace("_", "-").lower()[:40]
    oss_server.buckets.setdefault(bucket, {})
    backend = create_backend(_cfg("oss", oss_server.backend_config(bucket, "nydus/")))
    bad = oss_server.bad_signatures
    try:
        yield backend, oss_server, bucket
    finally:
        backend.close()
        oss_server.fail_parts.clear()
    assert oss_server.bad_signatures == bad  # every request carried a valid v1 signature


def _calls(server: Any, bucket: str) -> list[str]:
    return [method for method, b, _key, _headers in server.requests if b == bucket]


def _pending(server: Any, bucket: str) -> list[Any]:
    return [u for u in server.uploads.values() if u.bucket == bucket]


def test_oss_multipart_roundtrip(oss: tuple[BlobBackend, Any, str], blob_file: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    backend, server, bucket = oss
    stats = track_reads(monkeypatch, oss_mod)
    backend.put_blob(BLOB_ID, str(blob_file))
    # streamed: no read ever took more than one part (hashing, then sending, part by part)
    assert 0 < stats["max_read"] <= PART and stats["total"] >= len(DATA)
    assert server.buckets[bucket][f"nydus/{BLOB_ID}"] == DATA
    assert _calls(server, bucket) == ["POST", "PUT", "PUT", "PUT", "POST"]
    assert not _pending(server, bucket)
    assert backend.blob_size(BLOB_ID) == len(DATA)
    assert backend.read(BLOB_ID, 2 * PART - 3, 7) == DATA[2 * PART - 3:2 * PART + 4]


def test_oss_small_blob_single_put(oss: tuple[BlobBackend, Any, str], tmp_path: Path) -> None:
    backend, server, bucket = oss
    data = DATA[:PART]
    src = tmp_path / "small.blob"
    src.write_bytes(data)
    blob_id = hashlib.sha256(data).hexdigest()
    backend.put_blob(blob_id, str(src))
    assert _calls(server, bucket) == ["PUT"]
    assert backend.read(blob_id, 0, len(data)) == data


def test_oss_failed_part_aborts_upload(oss: tuple[BlobBackend, Any, str], blob_file: Path,
                                       logs: Any) -> None:
    backend, server, bucket = oss
    server.fail_parts.add(2)
    with logs.expect("backend_retries_exhausted"), pytest.raises(BackendError) as ei:
        backend.put_blob(BLOB_ID, str(blob_file))
    assert ei.value.blob_id == BLOB_ID and ei.value.status == 500 and "InternalError" in str(ei.value)
    # init, part 1, three attempts of part 2 (retry_limit 2), abort; no part 3, no completion
    assert _calls(server, bucket) == ["POST", "PUT", "PUT", "PUT", "PUT", "DELETE"]
    assert not _pending(server, bucket)
    assert f"nydus/{BLOB_ID}" not in server.buckets[bucket]
    assert not backend.blob_exists(BLOB_ID)


def test_oss_server_is_strict_about_parts(oss: tuple[BlobBackend, Any, str]) -> None:
    """The test server refuses what real OSS refuses (so the backend's happy path means something)."""
    _backend, server, bucket = oss
    b = _backend.bucket  # type: ignore[attr-defined]  # oss2.Bucket: real oss2 requests
    key = "nydus/strict"
    upload_id = b.init_multipart_upload(key).upload_id
    big, small = b"a" * (100 << 10), b"b" * 10
    e1 = b.upload_part(key, upload_id, 1, big).etag
    e2 = b.upload_part(key, upload_id, 2, small).etag
    e3 = b.upload_part(key, upload_id, 3, small).etag
    part = type("Part", (), {})

    def parts(*pairs: tuple[int, str]) -> list[Any]:
        out = []
        for n, etag in pairs:
            p = part()
            p.part_number, p.etag = n, etag
            out.append(p)
        return out

    def code(call: Any) -> str:
        with pytest.raises(Exception) as ei:  # noqa: B017 - oss2's own exception types
            call()
        return str(ei.value.code)  # type: ignore[attr-defined]

    assert code(lambda: b.complete_multipart_upload(key, upload_id, parts((1, e2)))) == "InvalidPart"
    assert code(lambda: b.complete_multipart_upload(key, upload_id, parts((1, e1), (2, e2), (3, e3)))) \
        == "EntityTooSmall"
    assert code(lambda: b.upload_part(key, "nope", 1, big)) == "NoSuchUpload"
    assert code(lambda: b.upload_part(key, upload_id, 10001, big)) == "InvalidArgument"
    body = (f'<CompleteMultipartUpload><Part><PartNumber>2</PartNumber><ETag>"{e2}"</ETag></Part>'
            f'<Part><PartNumber>1</PartNumber><ETag>"{e1}"</ETag></Part></CompleteMultipartUpload>')
    raw = b._Bucket__do_object  # oss2's signed request, without complete_multipart_upload's sort
    assert code(lambda: raw("POST", key, params={"uploadId": upload_id}, data=body)) == "InvalidPartOrder"
    b.complete_multipart_upload(key, upload_id, parts((1, e1), (3, e3)))
    assert server.buckets[bucket][key] == big + small
    assert not _pending(server, bucket)
    assert code(lambda: b.abort_multipart_upload(key, upload_id)) == "NoSuchUpload"


# --------------------------------------------------------------------------- edge cases
def test_part_size_grows_for_huge_blobs() -> None:
    for mod, default in ((s3_mod, PART), (oss_mod, PART)):
        assert mod.part_size_for(3 * default) == default
        huge = 10_000 * default + 1  # would need 10001 parts
        size = mod.part_size_for(huge)
        assert size > default and -(-huge // size) <= mod.MAX_PARTS


def test_s3_lost_complete_answer_is_success(s3: tuple[BlobBackend, Any, str], blob_file: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """CompleteMultipartUpload went through but its answer was lost: the retry succeeds (moto, like
    S3 for a while, completes an already completed upload again; a NoSuchUpload answer would be
    recognised by the object's size -- the oss test below takes that path)."""
    backend, client, bucket = s3
    real = backend.http.request  # type: ignore[attr-defined]
    completes: list[int] = []

    def lossy(method: str, url: str, **kw: Any) -> Any:
        resp = real(method, url, **kw)
        if method == "POST" and "uploadId=" in url:
            completes.append(resp.status)
            if len(completes) == 1:
                raise BackendError("connection reset while reading the answer", transient=True)
        return resp

    monkeypatch.setattr(backend, "http", _Wrapped(backend.http, lossy))  # type: ignore[attr-defined]
    backend.put_blob(BLOB_ID, str(blob_file))
    assert len(completes) == 2 and completes[0] == 200 and completes[1] in (200, 404)
    assert client.head_object(Bucket=bucket, Key=f"blobs/{BLOB_ID}")["ContentLength"] == len(DATA)
    assert backend.read(BLOB_ID, 0, len(DATA)) == DATA


def test_oss_lost_complete_answer_is_success(oss: tuple[BlobBackend, Any, str], blob_file: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    backend, server, bucket = oss
    b = backend.bucket  # type: ignore[attr-defined]
    real = b.complete_multipart_upload
    calls: list[str] = []

    def lossy(*args: Any, **kw: Any) -> Any:
        calls.append("complete")
        result = real(*args, **kw)
        if len(calls) == 1:
            result.resp.response.close()
            raise ConnectionResetError("connection reset while reading the answer")
        return result

    monkeypatch.setattr(b, "complete_multipart_upload", lossy)
    backend.put_blob(BLOB_ID, str(blob_file))
    assert calls == ["complete", "complete"]
    assert server.buckets[bucket][f"nydus/{BLOB_ID}"] == DATA
    assert _calls(server, bucket)[-3:] == ["POST", "POST", "HEAD"]
