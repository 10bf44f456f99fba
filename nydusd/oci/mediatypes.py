"""OCI, Docker and nydus media types and annotation keys: the one home of these strings.

Owns: the media-type and annotation constants of interfaces.md §6.2-6.4 (manifests, indexes,
configs, layers, nydus blobs and bootstraps), the groupings the converter and the registry client
test against, and the layer-type -> stream-compression table. Pure data: imports nothing.
Thread-safe: constants only.
"""

from __future__ import annotations

# ---- media types -------------------------------------------------------------------------------
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_ND = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_LAYER_ND_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
OCI_LAYER_ND_ZSTD = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
NYDUS_BLOB = "application/vnd.oci.image.layer.nydus.blob.v1"
NYDUS_ARTIFACT = "application/vnd.nydus.image.manifest.v1+json"
NYDUS_CONFIG = "application/vnd.nydus.image.config.v1+json"

MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
IMAGE_CONFIG_TYPES = (OCI_CONFIG, DOCKER_CONFIG, NYDUS_CONFIG)
BOOTSTRAP_LAYER_TYPES = (OCI_LAYER_GZIP, DOCKER_LAYER_GZIP)

# layer media type -> stream compression ("gzip" | "zstd" | "none")
LAYER_COMPRESSION = {
    OCI_LAYER: "none", OCI_LAYER_ND: "none", DOCKER_LAYER_TAR: "none",
    OCI_LAYER_GZIP: "gzip", OCI_LAYER_ND_GZIP: "gzip", DOCKER_LAYER_GZIP: "gzip",
    DOCKER_LAYER_FOREIGN: "gzip",
    OCI_LAYER_ZSTD: "zstd", OCI_LAYER_ND_ZSTD: "zstd",
}

# ---- annotations -------------------------------------------------------------------------------
ANN_NYDUS_BLOB = "containerd.io/snapshot/nydus-blob"
ANN_NYDUS_BOOTSTRAP = "containerd.io/snapshot/nydus-bootstrap"
ANN_NYDUS_FS_VERSION = "containerd.io/snapshot/nydus-fs-version"
ANN_NYDUS_REF = "containerd.io/snapshot/nydus-ref"
ANN_NYDUS_ENCRYPTED = "containerd.io/snapshot/nydus-encrypted-blob"
ANN_NYDUS_SOURCE_DIGEST = "containerd.io/snapshot/nydus-source-digest"
ANN_NYDUS_SOURCE_REFERENCE = "containerd.io/snapshot/nydus-source-reference"
ANN_NYDUS_BUILDER_VERSION = "containerd.io/snapshot/nydus-builder-version"
ANN_UNCOMPRESSED = "containerd.io/uncompressed"
NYDUS_FEATURE = "nydus.remoteimage.v1"

#: the manifest types a registry serves for a reference (single images and indexes)
MANIFEST_MEDIA_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST)
#: an OCI image layout's tag annotation (``index.json``)
ANN_REF_NAME = "org.opencontainers.image.ref.name"
