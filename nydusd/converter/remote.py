"""One image repository as the converter sees it, on top of ``nydusd.oci.client.RegistryClient``.

Owns: ``Remote`` (reference + client: manifests, verified small blob reads, a streaming blob reader
made of sequential ranged GETs with one range of read-ahead, pushes that report whether bytes were
actually sent, cross-repository mounts/copies) and ``open_remote`` (reference parsing, credentials
from the docker config, ``--plain-http`` / insecure handling: an insecure registry is tried over
https without certificate checks, then over plain http). Must not import requests directly.
Threading: a Remote may be used by the converter thread and the push pool at once (the client is
thread-safe); a ``RegistryBlobFile`` belongs to one thread (its read-ahead runs in a private thread).
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from nydusd.converter.credentials import basic_auth, lookup
from nydusd.errors import AuthError, BackendError, BlobNotFound, IntegrityError, NotFound
from nydusd.log import get_logger
from nydusd.oci.client import RegistryClient
from nydusd.oci.reference import Reference, parse_reference

log = get_logger(__name__)

RANGE_SIZE = 8 << 20
READ_RETRIES = 4
RETRY_DELAY = 0.2


def read_with_retry(client: RegistryClient, digest: str, offset: int = 0, size: int | None = None,
                    *, retries: int = READ_RETRIES) -> bytes:
    """``client.get_blob`` retried (with a growing pause) on transient failures -- 5xx, 429, resets,
    truncated bodies -- and on short ranges. Raises the last error when retries run out."""
    attempt = 0
    while True:
        try:
            data = client.get_blob(digest, offset, size)
            if size is not None and len(data) != size:
                raise BackendError(f"short read: {len(data)} of {size} bytes", transient=True,
                                   digest=digest, offset=offset)
            return data
        except BackendError as e:
            if not e.transient or attempt >= retries:
                raise
            attempt += 1
            log.info("blob_read_retried", digest=digest, offset=offset, attempt=attempt, error=str(e))
            time.sleep(RETRY_DELAY * attempt)


class RegistryBlobFile:
    """A file-like view of a registry blob, fetched as sequential ranges with one range prefetched
    (so the network and the caller's work overlap). Never buffers more than two ranges."""

    def __init__(self, client: RegistryClient, digest: str, size: int, range_size: int = RANGE_SIZE) -> None:
        self._client, self._digest, self.size = client, digest, size
        self._range = range_size
        self._pos = 0  # next offset to request
        self._buf = memoryview(b"")
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nydusify-pull")
        self._next: Future[bytes] | None = self._fetch()

    def _fetch(self) -> Future[bytes] | None:
        if self._pos >= self.size:
            return None
        offset, n = self._pos, min(self._range, self.size - self._pos)
        self._pos += n
        return self._pool.submit(read_with_retry, self._client, self._digest, offset, n)

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            parts = [bytes(self._buf)]
            self._buf = memoryview(b"")
            while (data := self._take()) is not None:
                parts.append(data)
            return b"".join(parts)
        while not self._buf:
            data = self._take()
            if data is None:
                return b""
            self._buf = memoryview(data)
        out, self._buf = self._buf[:n], self._buf[n:]
        return bytes(out)

    def _take(self) -> bytes | None:
        fut = self._next
        if fut is None:
            return None
        data = fut.result()
        self._next = self._fetch()
        return data

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        if self._next is not None:
            self._next.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)


class Remote:
    """A repository (``ref.host/ref.repo``) and the client used to reach it."""

    def __init__(self, ref: Reference, client: RegistryClient) -> None:
        self.ref = ref
        self.client = client

    def close(self) -> None:
        self.client.close()

    def same_registry(self, other: Remote) -> bool:
        return self.client.base_url == other.client.base_url

    # ---- reads --------------------------------------------------------------------------------
    def get_manifest(self, reference: str) -> tuple[bytes, str, str]:
        """(body, media type, digest). Raises NotFound, AuthError, BackendError; IntegrityError when a
        manifest asked for by digest has another digest."""
        data, media_type, digest = self.client.get_manifest(reference)
        if reference.startswith("sha256:") and digest != reference:
            raise IntegrityError("manifest digest mismatch", expected=reference, actual=digest)
        return data, media_type, digest

    def get_blob_bytes(self, digest: str, expected_size: int | None = None) -> bytes:
        """A whole (small) blob, digest-verified. Raises BlobNotFound, IntegrityError."""
        data = read_with_retry(self.client, digest)
        actual = "sha256:" + hashlib.sha256(data).hexdigest()
        if actual != digest or (expected_size is not None and len(data) != expected_size):
            raise IntegrityError("blob digest mismatch", expected=digest, actual=actual, size=len(data))
        return data

    def blob_size(self, digest: str) -> int | None:
        try:
            return self.client.head_blob(digest)
        except BlobNotFound:
            return None

    @contextlib.contextmanager
    def open_blob(self, digest: str, size: int | None = None) -> Iterator[RegistryBlobFile]:
        """A streaming reader of a blob of ``size`` bytes (the manifest's size; asked with HEAD when
        None). The caller verifies the digest as it reads. Raises BlobNotFound."""
        if size is None:
            size = self.blob_size(digest)
        if size is None:
            raise BlobNotFound("layer blob not found in the source repository", digest=digest,
                               repo=str(self.ref))
        reader = RegistryBlobFile(self.client, digest, size)
        try:
            yield reader
        finally:
            reader.close()

    # ---- writes -------------------------------------------------------------------------------
    def push_blob_file(self, digest: str, path: Path, size: int, mount_from: Remote | None = None) -> bool:
        """Upload a blob file unless present (or mountable from ``mount_from``). True if uploaded."""
        if self.client.blob_exists(digest):
            return False
        mounts = [mount_from.ref.repo] if mount_from is not None and mount_from.same_registry(self) \
            and mount_from.ref.repo != self.ref.repo else []
        for repo in mounts:
            if self.client.mount_blob(digest, repo):
                return False
        self.client.push_blob(str(path), digest)
        return True

    def push_blob_bytes(self, digest: str, data: bytes) -> bool:
        if self.client.blob_exists(digest):
            return False
        self.client.push_blob(data, digest)
        return True

    def put_manifest(self, reference: str, data: bytes, media_type: str) -> str:
        return self.client.put_manifest(reference, data, media_type)

    def copy_blob_from(self, other: Remote, digest: str) -> int:
        """Make ``digest`` of ``other`` available here (mount on the same registry, else copy through
        memory in ranges). Returns its size."""
        size = other.blob_size(digest)
        if size is None:
            raise BlobNotFound("blob not found", digest=digest, repo=str(other.ref))
        if other.same_registry(self) and self.client.mount_blob(digest, other.ref.repo):
            return size
        with other.open_blob(digest, size) as reader:
            self.client.push_blob(reader, digest, chunk_size=RANGE_SIZE)  # type: ignore[arg-type]
        return size


def open_remote(text: str, *, insecure: bool = False, plain_http: bool = False,
                env: Mapping[str, str] | None = None, timeout: float = 60,
                insecure_flag: str = "--plain-http", push: bool = False) -> Remote:
    """A Remote for image reference ``text``, its access checked before any work starts: ``GET /v2/``
    with the credentials, and with ``push`` an upload session opened and cancelled. Credentials come
    from the docker config (``env`` gives HOME / DOCKER_CONFIG; None = no lookup). ``insecure_flag``
    is the option named when TLS fails (``--source-insecure`` ...). Raises InvalidArgument for a bad
    reference, AuthError "authentication failed for <registry> (...)", BackendError when the
    registry cannot be reached (a TLS failure names ``insecure_flag``)."""
    ref = parse_reference(text)
    creds = lookup(ref.host, env) if env is not None else None
    schemes = ["http"] if plain_http else (["https", "http"] if insecure else ["https"])
    last: BackendError | None = None
    for scheme in schemes:
        client = RegistryClient(ref.api_host, ref.repo, scheme=scheme, auth=basic_auth(creds),
                                skip_verify=insecure, timeout=timeout, connect_timeout=10)
        try:
            client.ping()
            if push:
                client.check_push()
            return Remote(ref, client)
        except AuthError as e:
            client.close()
            raise _auth_failed(ref, e, creds is not None, push) from None
        except (BackendError, NotFound) as e:
            client.close()
            last = e if isinstance(e, BackendError) else BackendError(str(e))
            log.debug("registry_scheme_failed", host=ref.api_host, scheme=scheme, error=str(e))
    assert last is not None
    if getattr(last, "kind", "") == "tls" and not insecure:
        if "CERTIFICATE_VERIFY_FAILED" in last.message:
            raise BackendError(f"the TLS certificate of registry {ref.api_host} is not trusted: pass "
                               f"{insecure_flag} to skip verification") from None
        raise BackendError(f"registry {ref.api_host} does not answer https (a plain-HTTP registry?): "
                           f"pass {insecure_flag}") from None
    raise BackendError(f"cannot reach registry {ref.api_host}: {last}", host=ref.api_host) from None


def _auth_failed(ref: Reference, exc: AuthError, have_creds: bool, push: bool) -> AuthError:
    log.debug("registry_auth_failed", host=ref.host, error=exc.message)
    if not have_creds:
        return AuthError(f"authentication failed for {ref.host} (no credentials for it in "
                         "~/.docker/config.json)")
    if push and "upload" in exc.message:
        return AuthError(f"authentication failed for {ref.host}: no push access to {ref.repo} "
                         "(check ~/.docker/config.json)")
    return AuthError(f"authentication failed for {ref.host} (check ~/.docker/config.json)")
