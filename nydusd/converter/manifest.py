"""OCI / nydus image documents: the pydantic models of descriptors, manifests, indexes and image
configs, plus the rules that turn an OCI manifest into a nydus one (the media types and annotations
they use are ``nydusd.oci.mediatypes``'s, re-exported here).

Owns: ``Descriptor``, ``Platform``, ``Manifest``, ``Index``, the canonical JSON encoding (compact,
Go field order, sorted annotation maps, Go's HTML escaping) that makes conversions reproducible,
``is_nydus_manifest`` detection and the config rewrite (``nydus_config``). Must not import requests,
the builder or the registry client: it is pure data. Thread-safe: every function is pure; models are
frozen.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from nydusd.errors import InvalidArgument, Unsupported
from nydusd.oci.mediatypes import (
    ANN_NYDUS_BLOB,
    ANN_NYDUS_BOOTSTRAP,
    ANN_NYDUS_BUILDER_VERSION,
    ANN_NYDUS_ENCRYPTED,
    ANN_NYDUS_FS_VERSION,
    ANN_NYDUS_SOURCE_DIGEST,
    ANN_NYDUS_SOURCE_REFERENCE,
    BOOTSTRAP_LAYER_TYPES,
    DOCKER_CONFIG,
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    IMAGE_CONFIG_TYPES,
    INDEX_TYPES,
    LAYER_COMPRESSION,
    MANIFEST_TYPES,
    NYDUS_ARTIFACT,
    NYDUS_BLOB,
    NYDUS_FEATURE,
    OCI_LAYER_GZIP,
)
from nydusd.oci.mediatypes import (
    OCI_MANIFEST as OCI_MANIFEST,  # re-exported: optimize.py reads m.OCI_MANIFEST
)

HISTORY_CREATED_BY = "Nydus Converter"
HISTORY_COMMENT = "Nydus Bootstrap Layer"


class _Doc(BaseModel):
    # Unknown keys are kept (extra="allow") so that re-encoding a document never drops data.
    model_config = ConfigDict(frozen=True, extra="allow", populate_by_name=True)


class Platform(_Doc):
    architecture: str
    os: str
    os_version: str | None = Field(default=None, alias="os.version")
    os_features: list[str] | None = Field(default=None, alias="os.features")
    variant: str | None = None

    def matches(self, os_name: str, arch: str, variant: str | None = None) -> bool:
        if self.os != os_name or self.architecture != arch:
            return False
        return variant is None or (self.variant or "") == variant

    def spec(self) -> str:
        return f"{self.os}/{self.architecture}" + (f"/{self.variant}" if self.variant else "")


class Descriptor(_Doc):
    mediaType: str
    digest: str
    size: int
    urls: list[str] | None = None
    annotations: dict[str, str] | None = None
    data: str | None = None
    platform: Platform | None = None
    artifactType: str | None = None


class Manifest(_Doc):
    schemaVersion: int = 2
    mediaType: str | None = None
    artifactType: str | None = None
    config: Descriptor
    layers: list[Descriptor]
    subject: Descriptor | None = None
    annotations: dict[str, str] | None = None


class Index(_Doc):
    schemaVersion: int = 2
    mediaType: str | None = None
    artifactType: str | None = None
    manifests: list[Descriptor]
    subject: Descriptor | None = None
    annotations: dict[str, str] | None = None


class RootFS(_Doc):
    type: str = "layers"
    diff_ids: list[str] = Field(default_factory=list)


class History(_Doc):
    created: str | None = None
    created_by: str | None = None
    author: str | None = None
    comment: str | None = None
    empty_layer: bool | None = None


class ImageConfig(_Doc):
    """The image config (OCI / docker). Used to validate what a registry returned; the converter
    re-encodes the original JSON object so that fields it does not model survive unchanged."""

    created: str | None = None
    author: str | None = None
    architecture: str = ""
    variant: str | None = None
    os: str = ""
    os_version: str | None = Field(default=None, alias="os.version")
    os_features: list[str] | None = Field(default=None, alias="os.features")
    config: dict[str, Any] | None = None
    rootfs: RootFS
    history: list[History] | None = None

    def platform(self) -> Platform | None:
        if not self.os or not self.architecture:
            return None
        return Platform(architecture=self.architecture, os=self.os, variant=self.variant)


def parse_config(data: bytes, digest: str = "") -> tuple[ImageConfig, dict[str, Any]]:
    """``(model, raw JSON object)`` of an image config. Raises Unsupported when it is not one."""
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise Unsupported("image config is not JSON", digest=digest) from None
    if not isinstance(raw, dict):
        raise Unsupported("image config is not a JSON object", digest=digest)
    try:
        return ImageConfig.model_validate(raw), raw
    except ValueError as e:
        raise Unsupported(f"malformed image config: {e}", digest=digest) from None


def encode(doc: BaseModel | dict[str, Any]) -> bytes:
    """Canonical compact JSON of a document: Go's ``json.Marshal`` shape (struct field order, maps
    sorted by key, ``<``/``>``/``&`` escaped as ``\\u003c`` ...), so that equal inputs give equal
    digests."""
    obj = doc.model_dump(by_alias=True, exclude_none=True) if isinstance(doc, BaseModel) else doc
    text = json.dumps(_sort_maps(obj), separators=(",", ":"), ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").encode()


def _sort_maps(obj: Any, key: str = "") -> Any:
    # Go sorts map keys but keeps struct field order: annotations/labels are maps, the rest structs.
    if isinstance(obj, dict):
        items: list[tuple[str, Any]] = list(obj.items())
        if key in ("annotations", "Labels", "labels", "ExposedPorts", "Volumes"):
            items.sort()
        return {k: _sort_maps(v, k) for k, v in items}
    if isinstance(obj, list):
        return [_sort_maps(v) for v in obj]
    return obj


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def descriptor_for(media_type: str, data: bytes, **extra: Any) -> Descriptor:
    return Descriptor(mediaType=media_type, digest=digest_of(data), size=len(data), **extra)


def parse_document(data: bytes, media_type: str | None = None) -> Manifest | Index:
    """Parse a manifest or index. Raises Unsupported for something that is not an image
    (e.g. a schema-1 manifest or a non-JSON artifact)."""
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise Unsupported("registry object is not a JSON image manifest", media_type=media_type) from None
    if not isinstance(obj, dict):
        raise Unsupported("registry object is not an image manifest", media_type=media_type)
    mt = obj.get("mediaType") or media_type or ""
    try:
        if mt in INDEX_TYPES or ("manifests" in obj and "layers" not in obj):
            return Index.model_validate(obj)
        if mt in MANIFEST_TYPES or "layers" in obj:
            return Manifest.model_validate(obj)
    except ValueError as e:
        raise Unsupported(f"malformed image manifest: {e.errors()[0]['msg']}",  # type: ignore[attr-defined]
                          media_type=mt) from None
    raise Unsupported("registry object is not an image manifest or index", media_type=mt)


def is_docker(manifest: Manifest) -> bool:
    return manifest.mediaType == DOCKER_MANIFEST or manifest.config.mediaType == DOCKER_CONFIG


def layer_compression(desc: Descriptor) -> str:
    """'gzip' | 'zstd' | 'none' for an image layer. Raises Unsupported for a non-layer blob."""
    comp = LAYER_COMPRESSION.get(desc.mediaType)
    if comp is None:
        raise Unsupported("not an image layer (unsupported media type)", media_type=desc.mediaType,
                          digest=desc.digest)
    return comp


def ensure_image(manifest: Manifest) -> None:
    """Raises Unsupported unless ``manifest`` describes a container image (config + tar layers)."""
    if manifest.config.mediaType not in IMAGE_CONFIG_TYPES:
        raise Unsupported("not a container image: config media type is not an image config",
                          media_type=manifest.config.mediaType)
    for layer in manifest.layers:
        layer_compression(layer)


def is_bootstrap_layer(desc: Descriptor) -> bool:
    return (desc.mediaType in BOOTSTRAP_LAYER_TYPES
            and (desc.annotations or {}).get(ANN_NYDUS_BOOTSTRAP) == "true")


def is_nydus_manifest(manifest: Manifest) -> bool:
    """Detection used everywhere: the last layer is the bootstrap layer."""
    return bool(manifest.layers) and is_bootstrap_layer(manifest.layers[-1])


def is_nydus_descriptor(desc: Descriptor) -> bool:
    """An index entry pointing at a nydus manifest (current artifactType or legacy os.features)."""
    if desc.artifactType == NYDUS_ARTIFACT:
        return True
    return bool(desc.platform and NYDUS_FEATURE in (desc.platform.os_features or []))


def parse_platform(text: str) -> tuple[str, str, str | None]:
    """``os/arch[/variant]`` -> parts. Raises InvalidArgument for anything else."""
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise InvalidArgument("invalid platform, expected os/arch[/variant]", platform=text)
    return parts[0], parts[1], parts[2] if len(parts) == 3 else None


def blob_layer(blob_id: str, size: int, *, encrypted: bool = False) -> Descriptor:
    ann = {ANN_NYDUS_BLOB: "true"}
    if encrypted:
        ann[ANN_NYDUS_ENCRYPTED] = "true"
    return Descriptor(mediaType=NYDUS_BLOB, digest="sha256:" + blob_id, size=size, annotations=ann)


def bootstrap_layer(digest: str, size: int, fs_version: int, *, docker: bool) -> Descriptor:
    return Descriptor(mediaType=DOCKER_LAYER_GZIP if docker else OCI_LAYER_GZIP, digest=digest,
                      size=size, annotations={ANN_NYDUS_BOOTSTRAP: "true",
                                              ANN_NYDUS_FS_VERSION: str(fs_version)})


def nydus_config(source: dict[str, Any], diff_ids: list[str]) -> dict[str, Any]:
    """The nydus image config: a copy of ``source`` with ``rootfs.diff_ids`` replaced and one history
    entry appended for the bootstrap layer (no timestamp, so conversions are reproducible)."""
    config = copy.deepcopy(source)
    rootfs = dict(config.get("rootfs") or {})
    rootfs["type"] = rootfs.get("type", "layers")
    rootfs["diff_ids"] = list(diff_ids)
    config["rootfs"] = rootfs
    history = list(config.get("history") or [])
    history.append({"created_by": HISTORY_CREATED_BY, "comment": HISTORY_COMMENT})
    config["history"] = history
    return config


def comparable_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config.config`` with ArgsEscaped dropped: what check compares between source and target."""
    inner = dict(config.get("config") or {})
    inner.pop("ArgsEscaped", None)
    return inner


def nydus_manifest(source: Manifest, *, source_digest: str, source_ref: str, config: Descriptor,
                   blobs: list[Descriptor], bootstrap: Descriptor, fs_version: int,
                   builder_version: str, oci: bool, subject: Descriptor | None = None) -> Manifest:
    """The nydus manifest for ``source``: blob layers then the bootstrap layer; docker media types
    for a docker source unless ``oci``."""
    docker = is_docker(source) and not oci
    annotations = dict(source.annotations or {})
    annotations.update({
        ANN_NYDUS_SOURCE_DIGEST: source_digest,
        ANN_NYDUS_SOURCE_REFERENCE: source_ref,
        ANN_NYDUS_FS_VERSION: str(fs_version),
        ANN_NYDUS_BUILDER_VERSION: builder_version,
    })
    return Manifest(
        schemaVersion=2,
        mediaType=DOCKER_MANIFEST if docker else OCI_MANIFEST,
        config=config,
        layers=[*blobs, bootstrap],
        subject=subject,
        annotations=annotations,
    )
