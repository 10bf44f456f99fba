"""`nydusify optimize`: give a nydus image in a registry a prefetch table, from a list of files.

Owns: ``Optimizer`` (source nydus image -> target image whose bootstrap lists the given files, in
the given order, in its prefetch table; the data blobs are reused as they are, copied into the
target repository when it is another one), ``parse_prefetch_files`` (upstream's JSON list or a
plain one) and ``paths_in_access_order`` (a daemon's recorded ``/api/v1/metrics/pattern`` -> the
paths read, first read first: a prefetch list; ``workload.record_workload`` makes one by running
a command in a container).

At mount, nydusd fetches the prefetch table's chunks in table order, adjacent chunks merged, ahead
of the container's reads: a table written from a recorded run replays that run's reads. Unlike
upstream's optimizer, no separate prefetch blob is built (the chunks stay where they are; replay
merges what is adjacent), so the target shares every data blob with the source.

Must not import fs/daemon/api. Single-threaded.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from nydusd.converter import manifest as m
from nydusd.converter.publish import extract_bootstrap
from nydusd.converter.remote import Remote
from nydusd.errors import InvalidArgument, NotFound, NydusError, Unsupported
from nydusd.log import get_logger
from nydusd.rafs import load_bootstrap
from nydusd.rafs.rafs_super import RafsSuper
from nydusd.rafs.writer import bootstrap_bytes

log = get_logger(__name__)

BOOTSTRAP_MEMBERS = ("image/image.boot", "image.boot")


def ordered_paths(lines: Iterable[str]) -> list[str]:
    """A prefetch list file: absolute paths, one per line, others skipped; normalised; first
    occurrence kept, *in the file's order* (the builder's patterns are sorted, as upstream's)."""
    out: dict[str, None] = {}
    for raw in lines:
        line = raw.strip()
        if line.startswith("/"):
            out.setdefault("/" + os.path.normpath(line).lstrip("/"), None)
    return list(out)


def parse_prefetch_files(text: str) -> list[str]:
    """A ``--prefetch-files`` file: upstream's JSON (``{"version": "v1", "files": [{"path": ...,
    "ranges": [[offset, size], ...] | null}]}``) or a plain list, one path per line (older
    upstream). Paths in file order (``ordered_paths``); ranges are not kept: the table lists
    files, so a listed file is prefetched whole. Raises InvalidArgument for JSON of another shape
    or version."""
    stripped = text.lstrip()
    if not stripped.startswith("{"):
        return ordered_paths(text.splitlines())
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise InvalidArgument(f"the prefetch files are not valid JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("version") != "v1" or not isinstance(doc.get("files"), list):
        raise InvalidArgument("unsupported prefetch file: want {\"version\": \"v1\", \"files\": [...]}",
                              version=doc.get("version") if isinstance(doc, dict) else None)
    paths = []
    for entry in doc["files"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise InvalidArgument("a prefetch file entry needs a \"path\" string", entry=str(entry)[:200])
        if entry.get("ranges"):
            log.info("prefetch_ranges_whole_file", path=entry["path"])
        paths.append(entry["path"])
    return ordered_paths(paths)


def paths_in_access_order(sb: RafsSuper, pattern: Iterable[dict[str, Any]]) -> list[str]:
    """Regular files of ``sb`` named by a ``/api/v1/metrics/pattern`` array, first read first
    (ties by inode number). Inodes the image does not have are skipped."""
    entries = sorted(pattern, key=lambda p: (int(p.get("first_access_time_secs", 0)),
                                             int(p.get("first_access_time_nanos", 0)), int(p["ino"])))
    out: list[str] = []
    for entry in entries:
        try:
            inode = sb.get_inode(int(entry["ino"]))
            if inode.is_reg:
                out.append(sb.path_of(inode.ino).decode("utf-8", "surrogateescape"))
        except NydusError:
            continue
    return out


def with_prefetch_table(boot: bytes, paths: Sequence[str]) -> tuple[bytes, int]:
    """The bootstrap ``boot`` rewritten with ``paths`` (those the image has, in order, no
    duplicates) as its prefetch table. Returns it and the number of paths listed."""
    with load_bootstrap(boot) as sb:
        model = sb.to_model()
        version = sb.version
        keep: list[bytes] = []
        for path in dict.fromkeys(paths):
            try:
                sb.resolve(path)
            except NydusError:
                log.info("prefetch_path_skipped", path=path)
                continue
            keep.append(path.encode("utf-8", "surrogateescape"))
    model.prefetch = keep
    return bootstrap_bytes(model, version=version), len(keep)


def replace_bootstrap(layer: bytes, boot: bytes) -> tuple[bytes, str]:
    """The bootstrap layer (gzip tar) ``layer`` with its bootstrap replaced by ``boot``, every other
    member (blob meta files) kept. Returns ``(gzip tar bytes, diff_id)``."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(layer), mode="r:*") as src, \
            tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as dst:
        for member in src.getmembers():
            if member.name in BOOTSTRAP_MEMBERS:
                member.size = len(boot)
                dst.addfile(member, io.BytesIO(boot))
            else:
                dst.addfile(member, src.extractfile(member) if member.isfile() else None)
    plain = raw.getvalue()
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0, filename="") as gz:
        gz.write(plain)
    return out.getvalue(), m.digest_of(plain)


def source_bootstrap(source: Remote) -> tuple[m.Manifest, str, bytes]:
    """The nydus manifest of ``source`` (the nydus one of an index), its media type and its
    bootstrap layer (gzip tar). Raises Unsupported when it is not a nydus image."""
    data, media_type, _ = source.get_manifest(source.ref.reference)
    doc = m.parse_document(data, media_type)
    if isinstance(doc, m.Index):
        nydus = [d for d in doc.manifests if m.is_nydus_descriptor(d)]
        if not nydus:
            raise Unsupported("the index holds no nydus manifest", image=str(source.ref))
        data, media_type, _ = source.get_manifest(nydus[0].digest)
        doc = m.parse_document(data, media_type)
    if not isinstance(doc, m.Manifest) or not m.is_nydus_manifest(doc):
        raise Unsupported("not a nydus image (no bootstrap layer)", image=str(source.ref))
    boot = doc.layers[-1]
    return doc, media_type, source.get_blob_bytes(boot.digest, expected_size=boot.size)


def prefetch_list(source: Remote, pattern: Any) -> list[str]:
    """``paths_in_access_order`` for the bootstrap of nydus image ``source``."""
    if not isinstance(pattern, list) or not all(isinstance(p, dict) and "ino" in p for p in pattern):
        raise InvalidArgument("an access pattern is a JSON array of objects with an ino")
    _, _, layer = source_bootstrap(source)
    with load_bootstrap(extract_bootstrap(layer)) as sb:
        return paths_in_access_order(sb, pattern)


@dataclass
class OptimizeResult:
    target: str
    digest: str
    prefetch_files: int


class Optimizer:
    """Rebuilds ``source`` (a nydus image) as ``target`` with a prefetch table (module docstring)."""

    def __init__(self, source: Remote, target: Remote, prefetch_files: Sequence[str]) -> None:
        if not prefetch_files:
            raise InvalidArgument("the prefetch list is empty", field="prefetch-files")
        self.source, self.target, self.prefetch_files = source, target, list(prefetch_files)

    def optimize(self) -> OptimizeResult:
        """Raises Unsupported (not a nydus image), NotFound, AuthError, BackendError."""
        doc, media_type, layer = source_bootstrap(self.source)
        boot_desc = doc.layers[-1]
        boot, listed = with_prefetch_table(extract_bootstrap(layer), self.prefetch_files)
        if not listed:
            raise NotFound("none of the prefetch files is in the image", image=str(self.source.ref))
        new_layer, diff_id = replace_bootstrap(layer, boot)
        new_boot_desc = m.descriptor_for(boot_desc.mediaType, new_layer,
                                         annotations=boot_desc.annotations)
        for blob in doc.layers[:-1]:
            if self.target.blob_size(blob.digest) is None:
                self.target.copy_blob_from(self.source, blob.digest)
        self.target.push_blob_bytes(new_boot_desc.digest, new_layer)
        config = m.parse_config(self.source.get_blob_bytes(doc.config.digest,
                                                           expected_size=doc.config.size),
                                doc.config.digest)[1]
        diff_ids = list(config.get("rootfs", {}).get("diff_ids", []))
        if diff_ids:
            diff_ids[-1] = diff_id  # the bootstrap layer's: the last one, as convert writes it
            config["rootfs"]["diff_ids"] = diff_ids
        config_bytes = m.encode(config)
        config_desc = m.descriptor_for(doc.config.mediaType, config_bytes)
        self.target.push_blob_bytes(config_desc.digest, config_bytes)
        new = doc.model_copy(update={"config": config_desc, "layers": [*doc.layers[:-1], new_boot_desc]})
        manifest_bytes = m.encode(new)
        digest = self.target.put_manifest(self.target.ref.reference, manifest_bytes,
                                          new.mediaType or media_type or m.OCI_MANIFEST)
        log.info("image_optimized", source=str(self.source.ref), target=str(self.target.ref),
                 digest=digest, prefetch_files=listed)
        return OptimizeResult(str(self.target.ref), digest, listed)
