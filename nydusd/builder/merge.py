"""`nydus-image merge`: per-layer bootstraps -> one flattened bootstrap (spec §5, interfaces §5.2).

Owns: ``MergeOptions`` and ``merge``. No data is copied: chunks keep pointing at their layers' blobs.
Layers are applied bottom-up with OCI whiteout semantics (optionally on top of a parent bootstrap);
whiteouts present in the bottom layer (without a parent) survive as ordinary entries, as upstream.
The blob id of a layer's own blob is ``original_blob_ids[i]``, else the layer bootstrap's file name
with every extension stripped; ``blob_digests[i]`` overrides it and ``blob_sizes[i]`` sets its
compressed size. Must not import fs/daemon/api. Threading: runs in the caller's thread.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, replace

from nydusd.builder.bootstrap import LoadedImage, assemble_blobs, load_image
from nydusd.builder.build import BuildOutput, bootstrap_bytes_for, write_atomic
from nydusd.builder.options import WhiteoutSpec
from nydusd.builder.tree import BlobRef, ChunkRef, iter_nodes, lookup_path, overlay
from nydusd.errors import InvalidArgument
from nydusd.log import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class MergeOptions:
    bootstrap_path: str | None = None
    blob_dir: str | None = None
    parent_bootstrap: str | None = None
    chunk_dict: str | None = None
    prefetch_patterns: tuple[str, ...] = ()
    original_blob_ids: tuple[str, ...] | None = None
    blob_digests: tuple[str, ...] | None = None
    blob_sizes: tuple[int, ...] | None = None
    blob_toc_digests: tuple[str, ...] | None = None
    blob_toc_sizes: tuple[int, ...] | None = None


@dataclass
class _Settings:
    fs_version: int
    chunk_size: int
    compressor: object
    digester: object
    explicit_uidgid: bool


def _hex_digest(text: str, field: str) -> str:
    value = text.removeprefix("sha256:")
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise InvalidArgument(f"invalid digest {text!r}, expected 64 lowercase hex digits", field=field)
    return value


def _layer_blob_id(path: str, i: int, opts: MergeOptions) -> str:
    if opts.blob_digests:
        return _hex_digest(opts.blob_digests[i], "blob-digests")
    if opts.original_blob_ids:
        return opts.original_blob_ids[i].removeprefix("sha256:")
    return os.path.basename(path).split(".")[0]


def _check_lists(n: int, opts: MergeOptions) -> None:
    for name in ("original_blob_ids", "blob_digests", "blob_sizes", "blob_toc_digests", "blob_toc_sizes"):
        value = getattr(opts, name)
        if value is not None and len(value) != n:
            raise InvalidArgument(f"--{name.replace('_', '-')} has {len(value)} items for {n} layers",
                                  field=name)


def _check_consistent(base: _Settings | None, img: LoadedImage, path: str) -> _Settings:
    m = img.model
    mine = _Settings(img.version, m.chunk_size, m.compressor, m.digester, m.explicit_uid_gid)
    if base is None:
        return mine
    same = (base.fs_version == mine.fs_version and base.chunk_size == mine.chunk_size
            and base.explicit_uidgid == mine.explicit_uidgid
            and (mine.fs_version == 6 or base.digester == mine.digester))
    if not same:
        raise InvalidArgument("inconsistent layers: RAFS version, chunk size, explicit uid/gid and "
                              "(v5) digester must agree", layer=path,
                              expected=f"v{base.fs_version}/{base.chunk_size:#x}",
                              got=f"v{mine.fs_version}/{mine.chunk_size:#x}")
    return mine


def _rename_layer_blobs(img: LoadedImage, i: int, path: str, opts: MergeOptions,
                        shared: dict[str, BlobRef], dict_ids: set[str]) -> None:
    """Give the layer's own blob its final id/size; unify blob refs shared between inputs."""
    own = [b for b in img.blobs if b.info is not None and b.info.blob_id not in dict_ids]
    if len(own) > 1:
        raise InvalidArgument("inconsistent layer: references more than one blob of its own",
                              layer=path, blobs=len(own))
    for ref in own:
        assert ref.info is not None
        info = replace(ref.info, blob_id=_layer_blob_id(path, i, opts))
        if opts.blob_sizes:
            info = replace(info, compressed_size=int(opts.blob_sizes[i]))
        if opts.blob_toc_digests:
            toc = _hex_digest(opts.blob_toc_digests[i], "blob-toc-digests")
            info = replace(info, blob_toc_digest=bytes.fromhex(toc))
        if opts.blob_toc_sizes:
            info = replace(info, blob_toc_size=int(opts.blob_toc_sizes[i]))
        ref.info = info
    for ref in img.blobs:
        assert ref.info is not None
        first = shared.setdefault(ref.info.blob_id, ref)
        if first is not ref:
            _retarget(img, ref, first)


def _retarget(img: LoadedImage, old: BlobRef, new: BlobRef) -> None:
    done: set[int] = set()
    for _, node in iter_nodes(img.root):
        if node.data is not None and id(node.data) not in done:
            done.add(id(node.data))
            node.data.chunks = [ChunkRef(new, c.chunk) if c.blob is old else c for c in node.data.chunks]


def merge(layers: list[str], opts: MergeOptions) -> BuildOutput:
    """Merge per-layer bootstraps (bottom first) into one bootstrap.

    Raises InvalidArgument (exit code 2) for inconsistent layers or option lists, BuildError for
    unreadable / invalid bootstraps.
    """
    if not layers:
        raise InvalidArgument("merge needs at least one source bootstrap")
    if not opts.bootstrap_path and not opts.blob_dir:
        raise InvalidArgument("one of --bootstrap or --blob-dir is required", field="bootstrap")
    _check_lists(len(layers), opts)
    shared: dict[str, BlobRef] = {}
    dict_ids: set[str] = set()
    settings: _Settings | None = None
    if opts.chunk_dict:
        cd = load_image(opts.chunk_dict, "chunk dictionary")
        dict_ids = {b.info.blob_id for b in cd.blobs if b.info is not None}
    root = None
    if opts.parent_bootstrap:
        parent = load_image(opts.parent_bootstrap, "parent bootstrap")
        settings = _check_consistent(None, parent, opts.parent_bootstrap)
        for ref in parent.blobs:
            assert ref.info is not None
            shared.setdefault(ref.info.blob_id, ref)
        root = parent.root
    for i, path in enumerate(layers):
        img = load_image(path, f"layer bootstrap {i}")
        settings = _check_consistent(settings, img, path)
        _rename_layer_blobs(img, i, path, opts, shared, dict_ids)
        if root is None:
            root = img.root
        else:
            overlay(root, img.root, WhiteoutSpec.OCI)
    assert root is not None and settings is not None
    table = assemble_blobs(root, [])
    prefetch = [os.fsencode(p) for p in opts.prefetch_patterns if lookup_path(root, os.fsencode(p))]
    boot = bootstrap_bytes_for(root, table, settings, prefetch)
    if opts.bootstrap_path:
        out = write_atomic(boot, opts.bootstrap_path)
    else:
        assert opts.blob_dir is not None
        out = write_atomic(boot, os.path.join(opts.blob_dir, hashlib.sha256(boot).hexdigest()))
    ids = [b.info.blob_id for b in table if b.info is not None]
    log.info("image_merged", bootstrap=out, layers=len(layers), blobs=len(ids))
    return BuildOutput(bootstrap_path=out, blob_path=None, blob_id=None, blobs=ids,
                       fs_version=settings.fs_version, compressor=settings.compressor.value,  # type: ignore[attr-defined]
                       stats={"layers": len(layers)}, bootstrap=boot)
