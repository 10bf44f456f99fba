"""`nydus-image create`: one source (directory or tar stream) -> bootstrap + data blob.

Owns: ``build(source, options) -> BuildOutput`` (the builder's Python API, also used by the
converter for tar layers streamed from a registry), ``BuildOutput`` (paths, blob ids, the
``--output-json`` document) and ``AtomicOutput`` (temp name + rename, so no half-written output ever
appears under the final name; a FIFO is written in place).
Must not import fs/daemon/api. Threading: ``build`` runs in the caller's thread and uses the chunk
pipeline's worker pool internally; concurrent ``build`` calls share nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, BinaryIO, Protocol

from nydusd import __version__
from nydusd.builder.blob_writer import INLINE_PLACEHOLDER_ID, BlobWriter
from nydusd.builder.bootstrap import LoadedImage, assemble_blobs, blob_infos, load_image, to_model
from nydusd.builder.chunker import ChunkDict, ChunkPipeline
from nydusd.builder.directory import PendingFile, file_opener, walk_directory
from nydusd.builder.options import BuildOptions, SourceType
from nydusd.builder.tarball import open_tar_stream, read_tarball
from nydusd.builder.tree import BlobRef, Node, drop_whiteouts, iter_nodes, lookup_path, overlay
from nydusd.errors import BuildError, InvalidArgument
from nydusd.log import get_logger
from nydusd.rafs import layout as L
from nydusd.rafs import model as M

log = get_logger(__name__)


class BuildProgress(Protocol):
    """What a build reports while it reads its source (the CLI draws a bar from it)."""

    def start(self, files: int | None, size: int | None) -> None:
        """Totals when known in advance (a directory), None for a tar stream."""

    def file_done(self, size: int) -> None:
        """One regular file's data was read and chunked."""


@dataclass
class BuildOutput:
    """What a build or merge produced. ``blob_id`` is the new data blob (None if nothing new)."""

    bootstrap_path: str | None
    blob_path: str | None
    blob_id: str | None
    blobs: list[str]
    fs_version: int
    compressor: str
    stats: dict[str, Any] = field(default_factory=dict)
    bootstrap: bytes = b""
    #: entries (inodes by path) in the image, bytes of the new blob, plain bytes of its new chunks
    entries: int = 0
    blob_size: int = 0
    data_size: int = 0

    def to_json(self) -> dict[str, Any]:
        """The ``--output-json`` document (interfaces §5.5)."""
        return {"version": f"{__version__}-nydus-py", "bootstrap": self.bootstrap_path or "",
                "blobs": list(self.blobs), "external_bootstrap": "", "external_blobs": [],
                "trace": self.stats, "fs_version": str(self.fs_version), "compressor": self.compressor}


class AtomicOutput:
    """A file written under a temporary name in the destination directory and renamed by
    ``commit``; ``discard`` removes it. A FIFO destination is opened and written directly."""

    def __init__(self, dest_dir: str, final: str | None = None) -> None:
        self.final = final
        self.fifo = final is not None and _is_fifo(final)
        self.path: str
        self.file: BinaryIO
        try:
            if final is not None and self.fifo:
                self.path = final
                self.file = open(final, "wb", buffering=1 << 20)  # noqa: SIM115
            else:
                fd, self.path = tempfile.mkstemp(prefix=".nydus-tmp-", dir=dest_dir or ".")
                self.file = os.fdopen(fd, "wb", buffering=1 << 20)
        except OSError as e:
            raise BuildError(f"cannot create output: {e.strerror}", path=final or dest_dir) from None

    def commit(self, final: str | None = None) -> str:
        """Flush, close and rename to ``final`` (or the name given at creation); returns the path."""
        dest = final or self.final
        assert dest is not None
        try:
            self.file.close()
            if not self.fifo:
                os.chmod(self.path, 0o644)
                os.replace(self.path, dest)
        except OSError as e:
            self.discard()
            raise BuildError(f"cannot write output: {e.strerror}", path=dest) from None
        return dest

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
        if not self.fifo:
            with contextlib.suppress(OSError):
                os.unlink(self.path)


class CallerOutput(AtomicOutput):
    """A blob stream owned by the caller (e.g. an upload): written sequentially, never closed,
    renamed or removed here."""

    def __init__(self, file: BinaryIO) -> None:  # noqa: D107 - no temp file involved
        self.final = None
        self.fifo = True
        self.path = ""
        self.file = file

    def commit(self, final: str | None = None) -> str:
        try:
            self.file.flush()
        except OSError as e:
            raise BuildError(f"cannot write blob: {e.strerror}") from None
        return ""

    def discard(self) -> None:
        pass


def _is_fifo(path: str) -> bool:
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except OSError:
        return False


def write_atomic(data: bytes, dest: str) -> str:
    out = AtomicOutput(os.path.dirname(os.path.abspath(dest)), dest)
    try:
        out.file.write(data)
    except OSError as e:
        out.discard()
        raise BuildError(f"cannot write output: {e.strerror}", path=dest) from None
    except BaseException:  # e.g. KeyboardInterrupt: never leave the temp file behind
        out.discard()
        raise
    return out.commit()


def check_compatible(img: LoadedImage, opts: BuildOptions, what: str) -> None:
    """A parent / chunk dictionary must match the build's version, chunk size and digester."""
    m = img.model
    if img.version != opts.fs_version or m.chunk_size != opts.chunk_size or m.digester != opts.digester:
        raise InvalidArgument(
            f"{what} is incompatible: it is RAFS v{img.version}, chunk size {m.chunk_size:#x}, "
            f"digester {m.digester.value}; this build is v{opts.fs_version}, {opts.chunk_size:#x}, "
            f"{opts.digester.value}")
    if opts.fs_version == 5 and m.compressor != opts.compressor:
        raise InvalidArgument(f"{what} uses compressor {m.compressor.value}; RAFS v5 images have one "
                              "compressor for all blobs")


def _blob_output(opts: BuildOptions) -> AtomicOutput:
    if opts.blob_path:
        return AtomicOutput(os.path.dirname(os.path.abspath(opts.blob_path)), opts.blob_path)
    if opts.blob_dir:
        if not os.path.isdir(opts.blob_dir):
            raise BuildError("blob directory does not exist", path=opts.blob_dir)
        return AtomicOutput(opts.blob_dir)
    raise InvalidArgument("one of --blob or --blob-dir is required", field="blob")


def _prefetch_first(files: list[PendingFile], patterns: tuple[str, ...]) -> list[PendingFile]:
    """Stable reorder putting files under a prefetch pattern first (their data leads the blob)."""
    if not patterns:
        return files
    pats = [os.fsencode(p).rstrip(b"/") for p in patterns]

    def hit(path: bytes) -> bool:
        return any(not p or path == p or path.startswith(p + b"/") for p in pats)

    first = [f for f in files if hit(f.rel)]
    return first + [f for f in files if not hit(f.rel)]


def _read_source(source: str | os.PathLike[str] | BinaryIO, opts: BuildOptions,
                 pipeline: ChunkPipeline, lower: Node | None, progress: BuildProgress | None) -> Node:
    add = pipeline.add_stream
    if progress is not None:
        def add(data: Any, stream: BinaryIO, path: str) -> None:
            pipeline.add_stream(data, stream, path)
            progress.file_done(data.size)

    if opts.source_type is SourceType.DIRECTORY:
        if not isinstance(source, (str, os.PathLike)):
            raise InvalidArgument("a directory source must be a path", field="source")
        src = walk_directory(source)
        if progress is not None:
            progress.start(len(src.files), sum(p.data.size for p in src.files))
        for pending in _prefetch_first(src.files, opts.prefetch_patterns):
            with file_opener(pending.path)() as f:
                add(pending.data, f, os.fsdecode(pending.path))
        return src.root
    if progress is not None:
        progress.start(None, None)
    with open_tar_stream(source) as stream:
        # hard links of a tar layer may name files of the parent image it is stacked on
        return read_tarball(stream, add, lower=lower, whiteout_spec=opts.whiteout_spec)


@contextlib.contextmanager
def _timed(stats: dict[str, Any], key: str) -> Iterator[None]:
    t0 = time.monotonic()
    yield
    stats[key] = round(time.monotonic() - t0, 6)


def build(source: str | os.PathLike[str] | BinaryIO, options: BuildOptions, *,
          blob_file: BinaryIO | None = None, progress: BuildProgress | None = None) -> BuildOutput:
    """Build a RAFS image from ``source`` (a directory, or a tar path / ``-`` / FIFO / stream).

    Writes the data blob (to ``blob_file`` -- a caller-owned writable stream, written strictly
    sequentially and left open -- else ``options.blob_path`` or ``options.blob_dir/<blob id>``) and the
    bootstrap (``options.bootstrap_path``, or ``blob_dir/<sha256 of bootstrap>``, or inside the blob
    with ``blob_inline_meta``). Nothing appears under a final name unless the whole build succeeds.
    Raises BuildError for bad input, InvalidArgument for inconsistent options / parents.
    """
    opts = options
    stats: dict[str, Any] = {}
    parent = load_image(opts.parent_bootstrap, "parent bootstrap") if opts.parent_bootstrap else None
    if parent is not None:
        check_compatible(parent, opts, "parent bootstrap")
    cdict_img = load_image(opts.chunk_dict, "chunk dictionary") if opts.chunk_dict else None
    if cdict_img is not None:
        check_compatible(cdict_img, opts, "chunk dictionary")
    known = ChunkDict()
    for img in (parent, cdict_img):
        if img is not None:
            known.add_all(img.chunk_refs())
    if blob_file is None and not (opts.bootstrap_path or opts.blob_dir or opts.blob_inline_meta):
        raise InvalidArgument("one of --bootstrap, --blob-dir or --blob-inline-meta is required",
                              field="bootstrap")
    blob_out = CallerOutput(blob_file) if blob_file is not None else _blob_output(opts)
    try:
        return _build_into(source, opts, parent, known, blob_out, stats, progress)
    except BaseException:
        blob_out.discard()
        raise


def _build_into(source: str | os.PathLike[str] | BinaryIO, opts: BuildOptions, parent: LoadedImage | None,
                known: ChunkDict, blob_out: AtomicOutput, stats: dict[str, Any],
                progress: BuildProgress | None = None) -> BuildOutput:
    new_blob = BlobRef(None)
    writer = BlobWriter(blob_out.file, fs_version=opts.fs_version, compressor=opts.compressor,
                        digester=opts.digester, chunk_size=opts.chunk_size, aligned=opts.aligned,
                        blob_toc=opts.blob_toc, inline_meta=opts.blob_inline_meta)
    with _timed(stats, "dump_blob"), ChunkPipeline(
            chunk_size=opts.chunk_size, compressor=opts.compressor, digester=opts.digester,
            writer=writer, new_blob=new_blob, chunk_dict=known, workers=opts.worker_count) as pipe:
        upper = _read_source(source, opts, pipe, parent.root if parent is not None else None, progress)
        pipe.finish()
    stats.update(pipe.stats.as_dict())
    if parent is not None:
        overlay(parent.root, upper, opts.whiteout_spec)
        root = parent.root
    else:
        if opts.source_type is SourceType.DIRECTORY:
            drop_whiteouts(upper, opts.whiteout_spec)
        root = upper
    has_blob = bool(writer.chunks) or opts.blob_inline_meta
    blob_id = _seal_blob(writer, new_blob, opts) if has_blob else None
    table = assemble_blobs(root, parent.blobs if parent else [])
    if opts.blob_inline_meta and new_blob not in table:
        table.append(new_blob)
    boot = bootstrap_bytes_for(root, table, opts, _prefetch_paths(root, opts.prefetch_patterns))
    if opts.blob_inline_meta:
        blob_id = writer.finish(inline_bootstrap=boot)
    ids = [i.blob_id for i in blob_infos(table)]
    if opts.blob_inline_meta and blob_id:
        ids = [blob_id if b is new_blob else i for b, i in zip(table, ids, strict=True)]
    blob_path, boot_path = _commit_outputs(opts, blob_out, blob_id if has_blob else None, boot)
    log.info("image_built", bootstrap=boot_path, blob=blob_path, blob_id=blob_id,
             chunks=stats.get("chunks"), new_chunks=stats.get("new_chunks"))
    return BuildOutput(bootstrap_path=boot_path, blob_path=blob_path, blob_id=blob_id, blobs=ids,
                       fs_version=opts.fs_version, compressor=opts.compressor.value, stats=stats,
                       bootstrap=boot, entries=sum(1 for _ in iter_nodes(root)),
                       blob_size=writer.offset if has_blob else 0, data_size=writer.uncompressed_size)


def _seal_blob(writer: BlobWriter, new_blob: BlobRef, opts: BuildOptions) -> str | None:
    """Write the blob trailer (all of it unless the bootstrap goes inside) and fill in the new
    blob's table entry; returns the blob id when already known."""
    writer.finish_data()
    if opts.blob_inline_meta:
        # the inlined bootstrap names its own blob with upstream's placeholder (spec §4.1)
        new_blob.info = writer.blob_info(INLINE_PLACEHOLDER_ID)
        return None
    blob_id = writer.finish(whole_file_id=opts.blob_id_from_file)
    new_blob.info = writer.blob_info(opts.blob_id or blob_id)
    if opts.blob_toc:
        new_blob.info = replace(new_blob.info, blob_toc_digest=writer.toc_digest)
    return blob_id


def _commit_outputs(opts: BuildOptions, blob_out: AtomicOutput, blob_id: str | None,
                    boot: bytes) -> tuple[str | None, str | None]:
    """Rename the blob into place (or drop it when nothing was written), then write the bootstrap."""
    blob_path = None
    if blob_id is not None:
        blob_path = blob_out.commit(opts.blob_path or os.path.join(opts.blob_dir or "", blob_id)) or None
    else:
        blob_out.discard()
    boot_path = None
    if opts.bootstrap_path:
        boot_path = write_atomic(boot, opts.bootstrap_path)
    elif opts.blob_dir and not opts.blob_inline_meta:
        boot_path = write_atomic(boot, os.path.join(opts.blob_dir, hashlib.sha256(boot).hexdigest()))
    return blob_path, boot_path


def _prefetch_paths(root: Node, patterns: tuple[str, ...]) -> list[bytes]:
    out = []
    for p in patterns:
        b = os.fsencode(p)
        if lookup_path(root, b) is not None:
            out.append(b)
    return out


def bootstrap_bytes_for(root: Node, table: list[BlobRef], opts: BuildOptions | Any,
                        prefetch: list[bytes]) -> bytes:
    """Serialise the final tree with the format library's writer."""
    from nydusd.rafs.writer import bootstrap_bytes

    infos = blob_infos(table)
    extra = 0
    if opts.fs_version == 6 and infos and all(b.features & L.BLOB_INLINED_CHUNK_DIGEST for b in infos):
        extra |= M.FLAG_INLINED_CHUNK_DIGEST
    model = M.Bootstrap(root=to_model(root, table, opts.chunk_size, opts.explicit_uidgid), blobs=infos,
                        chunk_size=opts.chunk_size, compressor=opts.compressor, digester=opts.digester,
                        explicit_uid_gid=opts.explicit_uidgid, extra_flags=extra, prefetch=prefetch)
    return bootstrap_bytes(model, version=opts.fs_version)


__all__ = ["BuildOutput", "BuildProgress", "build"]
