"""The converter's use of the tar builder: one RAFS layer per OCI layer, stacked.

Owns: ``LayerBuilder`` -- builds each layer's tar stream with the previous layer's bootstrap as
parent (so OCI whiteouts and opaque markers are applied as layers stack, and chunks already stored in
lower layers or in the chunk dictionary are not stored again), keeps every layer's blob under
``<work>/layers/<blob id>`` and yields the merged image bootstrap (the top layer's bootstrap is the
merge of all layers below it). v6 blobs carry chunk digests and a ToC, as upstream nydusify's
``--features blob-toc``; every blob id is the SHA-256 of the whole blob file (the registry layer
digest; upstream reaches the same ids by naming each layer's bootstrap after the layer digest
for ``merge``), not the builder's own id that leaves out the ``blob.digest`` payload (spec §4.1).
Must not import requests, the registry client or ``convert`` (``LayerSettings`` is what it needs
of ``ConvertOptions``).
Threading: one LayerBuilder per converted manifest, used by one thread; the blob files it leaves
are read afterwards by the push pool (read-only).
"""

from __future__ import annotations

import hashlib
import io
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from nydusd.builder.build import build
from nydusd.builder.options import BuildOptions, SourceType, WhiteoutSpec
from nydusd.compress import Compressor
from nydusd.errors import BuildError, IntegrityError
from nydusd.log import get_logger
from nydusd.rafs import load_bootstrap
from nydusd.storage.chunk import BlobInfo

log = get_logger(__name__)


@dataclass(frozen=True)
class LayerOutput:
    index: int
    blob_id: str | None
    blob_size: int
    bootstrap_path: Path


@dataclass(frozen=True)
class MergedImage:
    bootstrap: bytes
    blobs: list[BlobInfo]

    @property
    def blob_ids(self) -> list[str]:
        return [b.blob_id for b in self.blobs]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(1 << 20):
            h.update(data)
    return h.hexdigest()


class LayerSettings(Protocol):
    """The build settings a LayerBuilder reads (``convert.ConvertOptions`` has them)."""

    @property
    def fs_version(self) -> int: ...
    @property
    def compressor(self) -> str: ...
    @property
    def chunk_size(self) -> int: ...
    @property
    def aligned_chunk(self) -> bool: ...
    @property
    def prefetch_patterns(self) -> tuple[str, ...]: ...


class LayerBuilder:
    def __init__(self, opts: LayerSettings, work: Path, chunk_dict: Path | None) -> None:
        self.opts = opts
        self.work = work
        self.dir = work / "layers"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.chunk_dict = chunk_dict
        self._parent: Path | None = None

    def blob_path(self, blob_id: str) -> Path:
        return self.dir / blob_id

    def has_blob(self, blob_id: str) -> bool:
        return self.blob_path(blob_id).is_file()

    def _options(self, index: int) -> BuildOptions:
        return BuildOptions(
            source_type=SourceType.TARBALL, fs_version=self.opts.fs_version,  # type: ignore[arg-type]
            compressor=Compressor.parse(self.opts.compressor), chunk_size=self.opts.chunk_size,
            whiteout_spec=WhiteoutSpec.OCI, aligned_chunk=self.opts.aligned_chunk,
            # as upstream nydusify (--features blob-toc for v6): chunk digests and a ToC in the blob;
            # the blob is named by the SHA-256 of the whole file, the layer digest it is pushed as
            blob_toc=self.opts.fs_version == 6, blob_id_from_file=True,
            prefetch_patterns=self.opts.prefetch_patterns,
            parent_bootstrap=str(self._parent) if self._parent else None,
            chunk_dict=str(self.chunk_dict) if self.chunk_dict else None,
            bootstrap_path=str(self.dir / f"layer-{index}.boot" if index >= 0 else self.dir / "base.boot"),
            blob_dir=str(self.dir))

    def _empty_base(self) -> Path:
        """An empty image to stack the bottom layer on: a builder keeps whiteouts of a layer that
        has no parent as ordinary files (upstream's merge quirk), while an OCI runtime drops them."""
        opts = self._options(-1).model_copy(update={"prefetch_patterns": ()})
        out = build(io.BytesIO(b"\0" * 1024), opts)
        if out.bootstrap_path is None or out.blob_id is not None:
            raise BuildError("empty base layer did not build as expected")
        return Path(out.bootstrap_path)

    def build_layer(self, index: int, stream: Any, *, label: str = "") -> LayerOutput:
        """Build one layer from its uncompressed tar ``stream``. Raises BuildError for entries the
        builder refuses (path traversal, bad links ...), IntegrityError for a corrupt stream."""
        if self._parent is None:
            self._parent = self._empty_base()
        opts = self._options(index)
        out = build(stream, opts)
        if out.bootstrap_path is None:
            raise BuildError("builder produced no bootstrap", layer=label)
        size = 0
        if out.blob_id is not None:
            path = self.blob_path(out.blob_id)
            # The registry addresses a blob by the sha256 of its bytes; the bootstrap must use the
            # same id or nydusd would fetch a blob that does not exist.
            actual = _sha256_file(path)
            if actual != out.blob_id:
                raise IntegrityError("builder blob id is not the sha256 of the blob", blob_id=out.blob_id,
                                     sha256=actual)
            size = path.stat().st_size
        self._parent = Path(out.bootstrap_path)
        log.info("layer_built", layer=label, index=index, blob_id=out.blob_id, blob_size=size,
                 chunks=out.stats.get("chunks"), new_chunks=out.stats.get("new_chunks"))
        return LayerOutput(index, out.blob_id, size, Path(out.bootstrap_path))

    def merge(self, outputs: list[LayerOutput]) -> MergedImage:
        """The image bootstrap: the top layer's (each layer was built on the one below)."""
        if not outputs:
            raise BuildError("image has no layers")
        data = outputs[-1].bootstrap_path.read_bytes()
        with load_bootstrap(data) as rs:
            blobs = list(rs.blobs)
        return MergedImage(data, blobs)

    @staticmethod
    def blob_ids_of(bootstrap: Path) -> list[str]:
        with load_bootstrap(bootstrap) as rs:
            return [b.blob_id for b in rs.blobs]

    def cleanup(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)
