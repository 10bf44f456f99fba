"""OCI image -> nydus image, registry to registry (``nydusify convert``).

Owns: ``ConvertOptions`` and ``Converter``. For each selected platform manifest of the source: fetch
the config, stream every layer blob (gzip/zstd/plain) through ``LayerStream`` straight into the tar
builder with the previous layer's bootstrap as parent (no unpacking to disk; the top layer's
bootstrap is the merged image), verify the layer digest and diff_id, push each nydus blob (HEAD
first; blob media type + annotations) or store it in the ``--backend-type`` store, push the
bootstrap layer, the rewritten config and finally the manifest (or index) -- the manifest is always
pushed last, so a failure leaves nothing referenced that is half pushed. A chunk dictionary
(``bootstrap:registry:<ref>`` / ``bootstrap:local:<path>``) dedups against another image; its blobs
used by the result are appended to the manifest and made available in the target repository.

Must not import requests (registry access goes through ``converter.remote.Remote``), fs/daemon or
the API. Threading: one ``Converter.convert`` call runs in the caller's thread; blob pushes run in a
small private thread pool (``push_workers``) that is joined before the manifest is pushed.
"""

from __future__ import annotations

import os
import platform as host_platform
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nydusd import __version__
from nydusd.converter import manifest as m
from nydusd.converter.layer_builder import LayerBuilder, LayerOutput
from nydusd.converter.layer_stream import LayerStream
from nydusd.converter.progress import CountingReader, Metrics, Progress, TimedReader
from nydusd.converter.publish import (
    blob_meta_file,
    bootstrap_layer_tar,
    extract_bootstrap,
    with_retry,
)
from nydusd.converter.remote import Remote
from nydusd.converter.stores import BlobStore
from nydusd.errors import InvalidArgument, NotFound, NydusError, Unsupported
from nydusd.log import get_logger
from nydusd.oci import mediatypes as mtypes

log = get_logger(__name__)

_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le",
         "s390x": "s390x", "riscv64": "riscv64"}


def platform_of(config: dict[str, Any]) -> m.Platform | None:
    """The platform an image config declares (None when it lacks os/architecture)."""
    try:
        return m.ImageConfig.model_validate(config).platform()
    except ValueError:
        return None


def host_platform_spec() -> str:
    machine = host_platform.machine()
    return f"linux/{_ARCH.get(machine, machine)}"


@dataclass(frozen=True)
class ConvertOptions:
    """Conversion settings (upstream ``nydusify convert`` flags)."""

    work_dir: Path = Path("./tmp")
    fs_version: int = 6
    compressor: str = "zstd"
    chunk_size: int = 0x100000
    batch_size: int = 0
    aligned_chunk: bool = False
    prefetch_patterns: tuple[str, ...] = ("/",)
    chunk_dict: str | None = None
    oci: bool = False
    with_referrer: bool = False
    platform: str | None = None
    all_platforms: bool = False
    merge_platform: bool = False
    push_retry_count: int = 3
    push_retry_delay: float = 5.0
    push_workers: int = 2
    blob_store: BlobStore | None = None
    builder_version: str = f"v{__version__}-nydus-py"

    def __post_init__(self) -> None:
        if self.fs_version not in (5, 6):
            raise InvalidArgument("fs-version must be 5 or 6", field="fs-version")
        if self.platform is not None:
            m.parse_platform(self.platform)


@dataclass
class ManifestResult:
    """One converted platform manifest."""

    source: m.Descriptor
    manifest: m.Manifest
    data: bytes
    descriptor: m.Descriptor
    blobs: list[str] = field(default_factory=list)


@dataclass
class ConvertResult:
    target: str
    digest: str
    media_type: str
    manifests: list[ManifestResult]
    metrics: Metrics


class _ChunkDict:
    """A chunk dictionary: a local bootstrap path, plus (for a registry dict) its repo for blob mounts."""

    def __init__(self, bootstrap: Path, remote: Remote | None, blob_ids: list[str]) -> None:
        self.bootstrap, self.remote, self.blob_ids = bootstrap, remote, blob_ids


class Converter:
    """Converts ``source`` to ``target`` (two ``Remote``s; they may share a registry)."""

    def __init__(self, source: Remote, target: Remote, opts: ConvertOptions,
                 *, progress: Progress | None = None,
                 remote_factory: Callable[[str], Remote] | None = None) -> None:
        self.source, self.target, self.opts = source, target, opts
        self.progress = progress or Progress()
        self.metrics = Metrics()
        self._remote_factory = remote_factory
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[Future[None]] = []
        self._cleanup: list[LayerBuilder] = []

    # ---- top level -----------------------------------------------------------------------------
    def convert(self) -> ConvertResult:
        """Run the conversion. Raises NotFound (missing source), AuthError, IntegrityError (digest
        mismatch / corrupt layer), BuildError (bad tar entry), Unsupported (not an image)."""
        work = self.opts.work_dir
        work.mkdir(parents=True, exist_ok=True)
        data, media_type, digest = self._pull_manifest()
        doc = m.parse_document(data, media_type)
        source_desc = m.Descriptor(mediaType=doc.mediaType or media_type, digest=digest, size=len(data))
        chunk_dict = self._load_chunk_dict()
        self._pool = ThreadPoolExecutor(max_workers=max(1, self.opts.push_workers),
                                        thread_name_prefix="nydusify-push")
        try:
            if isinstance(doc, m.Manifest):
                results = [self._convert_manifest(source_desc, doc, chunk_dict)]
            else:
                results = [self._convert_manifest(d, mf, chunk_dict)
                           for d, mf in self._select_platforms(doc)]
            self._join_pushes()
            final = self._push_top(doc, source_desc, results)
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
            for b in self._cleanup:
                b.cleanup()
            if chunk_dict is not None:
                chunk_dict.bootstrap.unlink(missing_ok=True)
                if chunk_dict.remote is not None:
                    chunk_dict.remote.close()
        log.info("image_converted", source=str(self.source.ref), target=str(self.target.ref),
                 digest=final[0], manifests=len(results), source_size=self.metrics.source_image_size,
                 target_size=self.metrics.target_image_size)
        return ConvertResult(str(self.target.ref), final[0], final[1], results, self.metrics)

    def _pull_manifest(self) -> tuple[bytes, str, str]:
        t = time.monotonic_ns()
        try:
            return self.source.get_manifest(self.source.ref.reference)
        finally:
            self.metrics.add(source_pull_ns=time.monotonic_ns() - t)

    def _select_platforms(self, index: m.Index) -> list[tuple[m.Descriptor, m.Manifest]]:
        wanted = None if self.opts.all_platforms or self.opts.merge_platform else (
            m.parse_platform(self.opts.platform or host_platform_spec()))
        chosen: list[tuple[m.Descriptor, m.Manifest]] = []
        for desc in index.manifests:
            if desc.mediaType not in mtypes.MANIFEST_TYPES or m.is_nydus_descriptor(desc):
                continue
            plat = desc.platform
            if plat is not None and plat.os == "unknown":  # attestation manifests
                continue
            if wanted is not None and (plat is None or not plat.matches(*wanted)):
                continue
            data, mt, _ = self.source.get_manifest(desc.digest)
            doc = m.parse_document(data, mt)
            if not isinstance(doc, m.Manifest):
                raise Unsupported("nested image index is not supported", digest=desc.digest)
            chosen.append((desc, doc))
        if not chosen:
            raise NotFound("no manifest in the source index matches the platform",
                           platform=self.opts.platform or host_platform_spec(), source=str(self.source.ref))
        return chosen

    # ---- one manifest --------------------------------------------------------------------------
    def _convert_manifest(self, desc: m.Descriptor, manifest: m.Manifest,
                          chunk_dict: _ChunkDict | None) -> ManifestResult:
        if m.is_nydus_manifest(manifest):
            raise Unsupported("source is already a nydus image", source=str(self.source.ref))
        m.ensure_image(manifest)
        config = self._pull_config(manifest.config)
        diff_ids = list((config.get("rootfs") or {}).get("diff_ids") or [])
        if len(diff_ids) != len(manifest.layers):
            raise Unsupported("image config diff_ids do not match the manifest layers",
                              diff_ids=len(diff_ids), layers=len(manifest.layers))
        dict_boot = chunk_dict.bootstrap if chunk_dict else None
        builder = LayerBuilder(self.opts, self._manifest_dir(desc), dict_boot)
        self._cleanup.append(builder)
        outputs = [self._convert_layer(builder, i, layer, diff_ids[i])
                   for i, layer in enumerate(manifest.layers)]
        self.metrics.add(source_image_size=sum(layer.size for layer in manifest.layers))
        t0 = time.monotonic_ns()
        merged = builder.merge(outputs)
        blob_metas = [(b.blob_id, blob_meta_file(builder.blob_path(b.blob_id), b))
                      for b in merged.blobs if self.opts.fs_version == 6 and builder.has_blob(b.blob_id)]
        boot_tar, boot_diff = bootstrap_layer_tar(merged.bootstrap, blob_metas)
        self.metrics.add(conversion_ns=time.monotonic_ns() - t0)
        docker = m.is_docker(manifest) and not self.opts.oci
        boot_desc = m.bootstrap_layer(m.digest_of(boot_tar), len(boot_tar), self.opts.fs_version,
                                      docker=docker)
        self._push_bytes(boot_desc.digest, boot_tar)
        own_blobs = sum(o.blob_size for o in outputs)
        if self.opts.blob_store is not None:
            # Blobs live in the storage backend: the manifest holds the bootstrap layer only.
            blob_layers: list[m.Descriptor] = []
        else:
            blob_layers = self._blob_layers(outputs, merged.blob_ids, chunk_dict)
        self.metrics.add(target_image_size=own_blobs + len(boot_tar))
        config_desc = self._push_config(config, blob_layers, boot_diff, docker=docker)
        return self._manifest_result(desc, manifest, config, config_desc, blob_layers, boot_desc)

    def _manifest_dir(self, desc: m.Descriptor) -> Path:
        mdir = self.opts.work_dir / desc.digest.replace(":", "-")
        shutil.rmtree(mdir, ignore_errors=True)
        mdir.mkdir(parents=True)
        return mdir

    def _push_config(self, config: dict[str, Any], blob_layers: list[m.Descriptor], boot_diff: str,
                     *, docker: bool) -> m.Descriptor:
        new_config = m.nydus_config(config, [b.digest for b in blob_layers] + [boot_diff])
        if self.opts.blob_store is not None:
            new_config["history"] = new_config["history"][-1:]
        config_bytes = m.encode(new_config)
        config_desc = m.descriptor_for(mtypes.DOCKER_CONFIG if docker else mtypes.OCI_CONFIG, config_bytes)
        self._push_bytes(config_desc.digest, config_bytes)
        return config_desc

    def _manifest_result(self, desc: m.Descriptor, manifest: m.Manifest, config: dict[str, Any],
                         config_desc: m.Descriptor, blob_layers: list[m.Descriptor],
                         boot_desc: m.Descriptor) -> ManifestResult:
        subject = None
        if self.opts.with_referrer:
            subject = m.Descriptor(mediaType=desc.mediaType, digest=desc.digest, size=desc.size)
        nydus = m.nydus_manifest(manifest, source_digest=desc.digest, source_ref=str(self.source.ref),
                                 config=config_desc, blobs=blob_layers, bootstrap=boot_desc,
                                 fs_version=self.opts.fs_version,
                                 builder_version=self.opts.builder_version, oci=self.opts.oci,
                                 subject=subject)
        data = m.encode(nydus)
        ndesc = m.descriptor_for(nydus.mediaType or mtypes.OCI_MANIFEST, data,
                                 platform=desc.platform or platform_of(config))
        return ManifestResult(desc, nydus, data, ndesc, [b.digest for b in blob_layers])

    def _pull_config(self, desc: m.Descriptor) -> dict[str, Any]:
        t = time.monotonic_ns()
        raw = self.source.get_blob_bytes(desc.digest, expected_size=desc.size)
        self.metrics.add(source_pull_ns=time.monotonic_ns() - t, bytes_pulled=len(raw))
        return m.parse_config(raw, desc.digest)[1]

    def _convert_layer(self, builder: LayerBuilder, index: int, layer: m.Descriptor,
                       diff_id: str) -> LayerOutput:
        label = layer.digest.split(":")[-1][:12]
        compression = m.layer_compression(layer)
        # Download and build run as one stream: the pull bar counts compressed bytes fetched, the
        # build bar uncompressed tar bytes consumed by the builder.
        pull = self.progress.task("pull", label, layer.size)
        build = self.progress.task("build", label, None)
        t0 = time.monotonic_ns()
        with self.source.open_blob(layer.digest, layer.size) as raw:
            timed = TimedReader(raw, pull)
            stream = LayerStream(timed, compression, expected_digest=layer.digest,
                                 expected_diff_id=diff_id)
            out = builder.build_layer(index, CountingReader(stream, build), label=layer.digest)
            stream.finish()
        self.metrics.add(source_pull_ns=timed.ns, bytes_pulled=stream.bytes_in,
                         conversion_ns=time.monotonic_ns() - t0 - timed.ns)
        pull.finish(digest=layer.digest)
        build.finish(blob_id=out.blob_id, blob_size=out.blob_size)
        if out.blob_id and self.opts.blob_store is None:
            self._submit(self._push_blob_file, out.blob_id, builder.blob_path(out.blob_id), out.blob_size)
        elif out.blob_id and self.opts.blob_store is not None:
            self._submit(self._store_blob, out.blob_id, builder.blob_path(out.blob_id), out.blob_size)
        return out

    def _blob_layers(self, outputs: list[LayerOutput], referenced: list[str],
                     chunk_dict: _ChunkDict | None) -> list[m.Descriptor]:
        layers: list[m.Descriptor] = []
        seen: set[str] = set()
        for out in outputs:
            if out.blob_id and out.blob_id not in seen:
                seen.add(out.blob_id)
                layers.append(m.blob_layer(out.blob_id, out.blob_size))
        if chunk_dict is not None:
            for blob_id in referenced:
                if blob_id in seen or blob_id not in chunk_dict.blob_ids:
                    continue
                seen.add(blob_id)
                size = self._ensure_dict_blob(chunk_dict, blob_id)
                layers.append(m.blob_layer(blob_id, size))
        return layers

    # ---- pushing -------------------------------------------------------------------------------
    def _submit(self, fn: Callable[..., None], *args: Any) -> None:
        assert self._pool is not None
        # Fail fast: a push that already failed (bad target credentials ...) stops the conversion
        # before more layers are built.
        for fut in self._pending:
            if fut.done() and fut.exception() is not None:
                raise fut.exception()  # type: ignore[misc]
        self._pending.append(self._pool.submit(fn, *args))

    def _join_pushes(self) -> None:
        pending, self._pending = self._pending, []
        errors: list[BaseException] = []
        for fut in pending:
            exc = fut.exception()
            if exc is not None:
                errors.append(exc)
        if errors:
            raise errors[0]

    def _push_blob_file(self, blob_id: str, path: Path, size: int) -> None:
        digest = "sha256:" + blob_id
        task = self.progress.task("push", blob_id[:12], size)
        t = time.monotonic_ns()
        pushed = with_retry(f"blob {digest}", lambda: self.target.push_blob_file(digest, path, size,
                                                                                 mount_from=self.source),
                            count=self.opts.push_retry_count, delay=self.opts.push_retry_delay)
        self.metrics.add(target_push_ns=time.monotonic_ns() - t, bytes_pushed=size if pushed else 0)
        task.update(size if pushed else 0)
        task.finish(skipped=not pushed)

    def _store_blob(self, blob_id: str, path: Path, size: int) -> None:
        store = self.opts.blob_store
        assert store is not None
        task = self.progress.task("push", blob_id[:12], size)
        t = time.monotonic_ns()
        stored = with_retry(f"{store.type} blob {blob_id}", lambda: store.put(blob_id, path),
                            count=self.opts.push_retry_count, delay=self.opts.push_retry_delay)
        self.metrics.add(target_push_ns=time.monotonic_ns() - t, bytes_pushed=size if stored else 0)
        task.update(size if stored else 0)
        task.finish(backend=store.type, skipped=not stored)

    def _push_bytes(self, digest: str, data: bytes) -> None:
        t = time.monotonic_ns()
        pushed = with_retry(f"blob {digest}", lambda: self.target.push_blob_bytes(digest, data),
                            count=self.opts.push_retry_count, delay=self.opts.push_retry_delay)
        self.metrics.add(target_push_ns=time.monotonic_ns() - t, bytes_pushed=len(data) if pushed else 0)

    def _put_manifest(self, reference: str, data: bytes, media_type: str) -> None:
        t = time.monotonic_ns()
        with_retry(f"manifest {reference}", lambda: self.target.put_manifest(reference, data, media_type),
                   count=self.opts.push_retry_count, delay=self.opts.push_retry_delay)
        self.metrics.add(target_push_ns=time.monotonic_ns() - t, bytes_pushed=len(data))

    def _push_top(self, doc: m.Manifest | m.Index, source_desc: m.Descriptor,
                  results: list[ManifestResult]) -> tuple[str, str]:
        tag = self.target.ref.reference
        if not self.opts.merge_platform and (isinstance(doc, m.Manifest) or len(results) == 1):
            r = results[0]
            self._put_manifest(tag, r.data, r.descriptor.mediaType)
            return r.descriptor.digest, r.descriptor.mediaType
        entries: list[m.Descriptor] = []
        if self.opts.merge_platform:
            if isinstance(doc, m.Manifest):
                # a single-platform source: the index pairs it with its nydus manifest
                entries.append(source_desc.model_copy(update={"platform": results[0].descriptor.platform}))
            else:
                entries += [d for d in doc.manifests if not m.is_nydus_descriptor(d)]
            for d in entries:
                self._copy_manifest(d)
        for r in results:
            self._put_manifest(r.descriptor.digest, r.data, r.descriptor.mediaType)
            entries.append(r.descriptor.model_copy(update={"artifactType": mtypes.NYDUS_ARTIFACT})
                           if self.opts.merge_platform else r.descriptor)
        media_type = mtypes.OCI_INDEX
        if isinstance(doc, m.Index) and doc.mediaType and not self.opts.oci \
                and not any(e.artifactType for e in entries):
            media_type = doc.mediaType
        index = m.Index(schemaVersion=2, mediaType=media_type, manifests=entries,
                        annotations=doc.annotations if isinstance(doc, m.Index) else None)
        data = m.encode(index)
        self._put_manifest(tag, data, media_type)
        return m.digest_of(data), media_type

    def _copy_manifest(self, desc: m.Descriptor) -> None:
        """Make a source manifest (and its blobs) exist in the target repository, for an index that
        keeps the original platforms."""
        if self.target.blob_size(desc.digest) is not None and self.source.same_registry(self.target) \
                and self.source.ref.repo == self.target.ref.repo:
            return
        data, mt, _ = self.source.get_manifest(desc.digest)
        doc = m.parse_document(data, mt)
        children = [doc.config, *doc.layers] if isinstance(doc, m.Manifest) else []
        for child in children:
            if self.target.blob_size(child.digest) is None:
                self.target.copy_blob_from(self.source, child.digest)
        self._put_manifest(desc.digest, data, mt or desc.mediaType)

    # ---- chunk dictionary ----------------------------------------------------------------------
    def _load_chunk_dict(self) -> _ChunkDict | None:
        spec = self.opts.chunk_dict
        if not spec:
            return None
        parts = spec.split(":", 2)
        if len(parts) == 1:
            parts = ["bootstrap", "local", spec]
        if len(parts) != 3 or parts[0] != "bootstrap" or parts[1] not in ("local", "registry"):
            raise InvalidArgument("invalid chunk dict, expected bootstrap:registry:<ref> or "
                                  "bootstrap:local:<path>", chunk_dict=spec)
        path = self.opts.work_dir / "chunk-dict.boot"
        remote: Remote | None = None
        if parts[1] == "local":
            if not os.path.isfile(parts[2]):
                raise NotFound("chunk dict bootstrap not found", path=parts[2])
            shutil.copyfile(parts[2], path)
        else:
            if self._remote_factory is None:
                raise InvalidArgument("a registry chunk dict needs registry access", chunk_dict=spec)
            remote = self._remote_factory(parts[2])
            path.write_bytes(_pull_nydus_bootstrap(remote))
        blob_ids = LayerBuilder.blob_ids_of(path)
        log.info("chunk_dict_loaded", source=spec, blobs=len(blob_ids))
        return _ChunkDict(path, remote, blob_ids)

    def _ensure_dict_blob(self, chunk_dict: _ChunkDict, blob_id: str) -> int:
        """Make a chunk-dict blob available in the target repo; returns its size."""
        digest = "sha256:" + blob_id
        size = self.target.blob_size(digest)
        if size is not None:
            return size
        if chunk_dict.remote is None:
            raise NotFound("chunk dict blob is not in the target repository and the dict is local",
                           blob_id=blob_id)
        return self.target.copy_blob_from(chunk_dict.remote, digest)


def _pull_nydus_bootstrap(remote: Remote) -> bytes:
    data, mt, _ = remote.get_manifest(remote.ref.reference)
    doc = m.parse_document(data, mt)
    if isinstance(doc, m.Index):
        nydus = [d for d in doc.manifests if m.is_nydus_descriptor(d)] or doc.manifests
        data, mt, _ = remote.get_manifest(nydus[0].digest)
        doc = m.parse_document(data, mt)
    if not isinstance(doc, m.Manifest) or not m.is_nydus_manifest(doc):
        raise Unsupported("not a nydus image (no bootstrap layer)", image=str(remote.ref))
    layer = doc.layers[-1]
    return extract_bootstrap(remote.get_blob_bytes(layer.digest, expected_size=layer.size))


__all__ = ["ConvertOptions", "ConvertResult", "Converter", "ManifestResult", "NydusError",
           "host_platform_spec"]
