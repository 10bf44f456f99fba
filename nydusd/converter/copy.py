"""``nydusify copy``: copy an image -- manifests, config and every layer, so for a nydus image the
bootstrap layer and all its data blobs -- between registries, or to and from a local OCI image
layout (``file://DIR`` for a directory, ``file://PATH.tar`` for a tar of one, as upstream's
``--source/--target file://``).

Owns: ``CopyOptions``, ``CopyResult``, ``OciLayout`` (an OCI image-layout directory: ``oci-layout``,
``index.json`` with ``org.opencontainers.image.ref.name`` annotations, ``blobs/sha256/<hex>``),
``open_endpoint`` (a Remote or a layout from the command-line text) and ``copy_image``. Every blob
written to a layout is digest-checked while it streams; a registry checks what is pushed to it.
Manifests go last (children before their index), so an interrupted copy leaves nothing referenced.
Must not import requests or the builder. Threading: single-threaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nydusd.converter import manifest as m
from nydusd.converter.convert import host_platform_spec
from nydusd.converter.publish import extract_bootstrap
from nydusd.converter.remote import Remote
from nydusd.converter.stores import BlobStore
from nydusd.errors import BlobNotFound, IntegrityError, InvalidArgument, NotFound, Unsupported
from nydusd.log import get_logger
from nydusd.oci import mediatypes as mtypes
from nydusd.oci.mediatypes import ANN_REF_NAME
from nydusd.rafs import load_bootstrap

log = get_logger(__name__)

COPY_BUFFER = 1 << 20


@dataclass(frozen=True)
class CopyOptions:
    platform: str | None = None
    all_platforms: bool = False
    work_dir: Path = Path("./tmp")
    #: where the source's nydus blobs are when its registry holds only the bootstrap layer
    #: (converted with ``--backend-type``)
    source_store: BlobStore | None = None


@dataclass
class CopyResult:
    digest: str = ""
    blobs_copied: int = 0
    blobs_present: int = 0
    bytes_copied: int = 0
    manifests: list[str] = field(default_factory=list)


class OciLayout:
    """An OCI image layout directory; ``tag`` names the image inside it."""

    def __init__(self, root: Path, tag: str | None) -> None:
        self.root, self.tag = root, tag

    def __str__(self) -> str:
        return f"file://{self.root}"

    def blob_path(self, digest: str) -> Path:
        algo, _, hexd = digest.partition(":")
        if algo != "sha256" or len(hexd) != 64 or not all(c in "0123456789abcdef" for c in hexd):
            raise InvalidArgument("unsupported digest in the OCI layout", digest=digest)
        return self.root / "blobs" / "sha256" / hexd

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def _index(self) -> dict[str, Any]:
        try:
            doc: dict[str, Any] = json.loads((self.root / "index.json").read_text())
        except FileNotFoundError:
            return {"schemaVersion": 2, "mediaType": mtypes.OCI_INDEX, "manifests": []}
        except (OSError, ValueError) as e:
            raise InvalidArgument(f"cannot read the OCI layout's index.json: {e}",
                                  path=str(self.root)) from None
        return doc

    def top(self) -> m.Descriptor:
        """The descriptor of the image named ``tag`` (or the only image) in index.json."""
        entries = [m.Descriptor.model_validate(d) for d in self._index().get("manifests", [])]
        named = [d for d in entries if self.tag and (d.annotations or {}).get(ANN_REF_NAME) == self.tag]
        if named:
            return named[0]
        if len(entries) == 1:
            return entries[0]
        raise NotFound(f"no image {'named ' + repr(self.tag) if self.tag else ''} in the OCI layout "
                       f"(it holds {len(entries)})", path=str(self.root))

    def verified_path(self, digest: str) -> Path:
        """The path of a blob whose content was just checked against its digest."""
        path = self.blob_path(digest)
        h = hashlib.sha256()
        try:
            with path.open("rb") as f:
                while chunk := f.read(COPY_BUFFER):
                    h.update(chunk)
        except FileNotFoundError:
            raise BlobNotFound("blob missing from the OCI layout", digest=digest,
                               path=str(self.root)) from None
        if "sha256:" + h.hexdigest() != digest:
            raise IntegrityError("blob digest mismatch in the OCI layout", digest=digest)
        return path

    def read_blob(self, digest: str) -> bytes:
        try:
            data = self.blob_path(digest).read_bytes()
        except FileNotFoundError:
            raise BlobNotFound("blob missing from the OCI layout", digest=digest,
                               path=str(self.root)) from None
        if m.digest_of(data) != digest:
            raise IntegrityError("blob digest mismatch in the OCI layout", digest=digest)
        return data

    def write_blob(self, digest: str, chunks: Iterator[bytes]) -> int:
        """Store a blob from ``chunks``, checking its digest; returns its size."""
        dest = self.blob_path(digest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".copy-", dir=dest.parent)
        h, size = hashlib.sha256(), 0
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    h.update(chunk)
                    f.write(chunk)
                    size += len(chunk)
            if "sha256:" + h.hexdigest() != digest:
                raise IntegrityError("blob digest mismatch while copying", digest=digest,
                                     actual="sha256:" + h.hexdigest())
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return size

    def set_top(self, desc: m.Descriptor) -> None:
        """Name ``desc`` ``tag`` in index.json (replacing an image of that name)."""
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        index = self._index()
        keep = [d for d in index.get("manifests", [])
                if (d.get("annotations") or {}).get(ANN_REF_NAME) != self.tag]
        entry = desc.model_dump(exclude_none=True, by_alias=True)
        if self.tag:
            entry["annotations"] = {**(entry.get("annotations") or {}), ANN_REF_NAME: self.tag}
        index["manifests"] = [*keep, entry]
        tmp = self.root / "index.json.tmp"
        tmp.write_text(json.dumps(index, indent=2))
        os.replace(tmp, self.root / "index.json")


Endpoint = Remote | OciLayout


@dataclass
class _Copier:
    source: Endpoint
    target: Endpoint
    result: CopyResult
    opts: CopyOptions

    def manifest(self, reference: str | m.Descriptor) -> tuple[bytes, str, str]:
        if isinstance(self.source, Remote):
            ref = reference if isinstance(reference, str) else reference.digest
            return self.source.get_manifest(ref)
        desc = self.source.top() if isinstance(reference, str) else reference
        return self.source.read_blob(desc.digest), desc.mediaType, desc.digest

    def blob(self, desc: m.Descriptor) -> None:
        src, dst = self.source, self.target
        present = dst.has_blob(desc.digest) if isinstance(dst, OciLayout) else (
            dst.blob_size(desc.digest) is not None)
        if present:
            self.result.blobs_present += 1
            return
        if isinstance(dst, Remote) and isinstance(src, Remote):
            dst.copy_blob_from(src, desc.digest)
        elif isinstance(dst, Remote):
            assert isinstance(src, OciLayout)
            dst.push_blob_file(desc.digest, src.verified_path(desc.digest), desc.size)
        elif isinstance(src, Remote):
            with src.open_blob(desc.digest, desc.size) as reader:
                dst.write_blob(desc.digest, iter(lambda: reader.read(COPY_BUFFER), b""))
        else:
            with src.blob_path(desc.digest).open("rb") as f:
                dst.write_blob(desc.digest, iter(lambda: f.read(COPY_BUFFER), b""))
        self.result.blobs_copied += 1
        self.result.bytes_copied += desc.size
        log.info("blob_copied", digest=desc.digest, size=desc.size, media_type=desc.mediaType)

    def put_manifest(self, data: bytes, media_type: str, top: bool) -> str:
        """Store a manifest/index by digest; the ``top`` one under the target's tag."""
        digest = m.digest_of(data)
        if isinstance(self.target, Remote):
            self.target.put_manifest(self.target.ref.reference if top else digest, data, media_type)
        else:
            self.target.write_blob(digest, iter([data]))
            if top:
                self.target.set_top(m.Descriptor(mediaType=media_type, digest=digest, size=len(data)))
        self.result.manifests.append(digest)
        return digest

    def image(self, data: bytes, media_type: str, top: bool) -> str:
        doc = m.parse_document(data, media_type)
        if isinstance(doc, m.Index):
            raise Unsupported("nested image index is not supported")
        for desc in [doc.config, *doc.layers]:
            self.blob(desc)
        if self.opts.source_store is not None and m.is_nydus_manifest(doc):
            doc = self.store_blobs(doc, self.opts.source_store)
            data = m.encode(doc)
        return self.put_manifest(data, doc.mediaType or media_type, top)

    def store_blobs(self, doc: m.Manifest, store: BlobStore) -> m.Manifest:
        """Copy the blobs the bootstrap names but the manifest lacks from ``store`` to the
        target, and add them as nydus blob layers (before the bootstrap layer)."""
        boot = doc.layers[-1]
        with load_bootstrap(extract_bootstrap(self.small_blob(boot))) as rs:
            blob_ids = [b.blob_id for b in rs.blobs]
        have = {d.digest.split(":", 1)[1] for d in doc.layers if d.mediaType == mtypes.NYDUS_BLOB}
        added: list[m.Descriptor] = []
        self.opts.work_dir.mkdir(parents=True, exist_ok=True)
        for blob_id in [b for b in blob_ids if b not in have]:
            path = self.opts.work_dir / f"copy-blob-{blob_id}"
            try:
                if store.download(blob_id, path) != blob_id:
                    raise IntegrityError("blob digest mismatch in the source backend", blob_id=blob_id)
                desc = m.blob_layer(blob_id, path.stat().st_size)
                if isinstance(self.target, Remote):
                    self.target.push_blob_file(desc.digest, path, desc.size)
                else:
                    with path.open("rb") as f:
                        self.target.write_blob(desc.digest, iter(lambda: f.read(COPY_BUFFER), b""))
            finally:
                path.unlink(missing_ok=True)
            added.append(desc)
            self.result.blobs_copied += 1
            self.result.bytes_copied += desc.size
            log.info("blob_copied", digest=desc.digest, size=desc.size, source="backend")
        if not added:
            return doc
        layers = [*doc.layers[:-1], *added, boot]
        # the config's rootfs.diff_ids name every layer (a nydus blob's diff_id is its digest)
        config = json.loads(self.small_blob(doc.config))
        old_ids = list((config.get("rootfs") or {}).get("diff_ids") or [])
        config.setdefault("rootfs", {})["diff_ids"] = [d.digest for d in layers[:-1]] + old_ids[-1:]
        data = m.encode(config)
        new_config = m.descriptor_for(doc.config.mediaType, data)
        if isinstance(self.target, Remote):
            self.target.push_blob_bytes(new_config.digest, data)
        else:
            self.target.write_blob(new_config.digest, iter([data]))
        return doc.model_copy(update={"layers": layers, "config": new_config})

    def small_blob(self, desc: m.Descriptor) -> bytes:
        """A digest-checked small blob (config, bootstrap layer) of the source."""
        if isinstance(self.source, Remote):
            return self.source.get_blob_bytes(desc.digest, desc.size)
        return self.source.read_blob(desc.digest)


def _pick(index: m.Index, platform: str) -> m.Descriptor:
    """The manifest for ``platform``; a nydus one first when the index holds both kinds."""
    wanted = m.parse_platform(platform)
    matches = [d for d in index.manifests if d.mediaType in mtypes.MANIFEST_TYPES
               and d.platform is not None and d.platform.matches(*wanted)]
    if not matches:
        raise NotFound("no manifest in the source index matches the platform", platform=platform)
    nydus = [d for d in matches if m.is_nydus_descriptor(d)]
    return (nydus or matches)[0]


def copy_image(source: Endpoint, target: Endpoint, opts: CopyOptions) -> CopyResult:
    """Copy the image ``source`` names to ``target``. Raises NotFound, BlobNotFound, AuthError,
    IntegrityError, Unsupported."""
    result = CopyResult()
    copier = _Copier(source, target, result, opts)
    src_ref = source.ref.reference if isinstance(source, Remote) else ""
    data, media_type, _ = copier.manifest(src_ref)
    doc = m.parse_document(data, media_type)
    if isinstance(doc, m.Index) and opts.all_platforms:
        for desc in doc.manifests:
            child, child_type, _ = copier.manifest(desc)
            copier.image(child, child_type, False)
        result.digest = copier.put_manifest(data, doc.mediaType or media_type, True)
    elif isinstance(doc, m.Index):
        desc = _pick(doc, opts.platform or host_platform_spec())
        child, child_type, _ = copier.manifest(desc)
        result.digest = copier.image(child, child_type, True)
    else:
        result.digest = copier.image(data, media_type, True)
    log.info("image_copied", source=str(source if isinstance(source, OciLayout) else source.ref),
             digest=result.digest, blobs_copied=result.blobs_copied, blobs_present=result.blobs_present)
    return result


# ------------------------------------------------------------------------------ local endpoints
def is_local(text: str) -> bool:
    return text.startswith("file://")


@contextlib.contextmanager
def local_layout(text: str, *, tag: str | None, work_dir: Path, write: bool) -> Iterator[OciLayout]:
    """``file://DIR`` -> that layout directory; ``file://PATH.tar`` -> a layout unpacked from (or
    packed into, when ``write``) that tar, through a temporary directory under ``work_dir``."""
    path = Path(text[len("file://"):])
    if not str(path):
        raise InvalidArgument("empty file:// path", field="source/target")
    if path.suffix != ".tar":
        if not write and not (path / "index.json").is_file():
            raise NotFound("not an OCI image layout (no index.json)", path=str(path))
        yield OciLayout(path, tag)
        return
    work_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="copy-layout-", dir=work_dir))
    try:
        if not write:
            try:
                with tarfile.open(path) as tar:
                    tar.extractall(tmp, filter="data")
            except (OSError, tarfile.TarError) as e:
                raise InvalidArgument(f"cannot read the OCI layout tar: {e}", path=str(path)) from None
        layout = OciLayout(tmp, tag)
        yield layout
        if write:
            partial = path.with_name(path.name + ".part")
            with tarfile.open(partial, "w") as tar:
                for name in sorted(os.listdir(tmp)):
                    tar.add(tmp / name, arcname=name)
            os.replace(partial, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
