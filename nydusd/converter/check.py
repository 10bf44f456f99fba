"""``nydusify check``: the rules of interfaces.md §6.6 for a nydus image, optionally against its
OCI source.

Owns: ``CheckOptions``, ``CheckReport`` and ``Checker``:
1. manifest rules -- nydus: last layer is the bootstrap layer (annotation ``"true"``), every other
   layer is a nydus blob layer with ``nydus-blob: "true"``, ``len(diff_ids) == len(layers)``; with a
   source: OCI ``len(diff_ids) == len(layers)`` and equal ``config.config`` (ArgsEscaped ignored);
2. bootstrap rules -- the bootstrap layer extracts, ``image/image.boot`` parses, every blob id it
   references is a manifest blob layer (unless blobs live in a storage backend), and every blob
   exists;
3. filesystem rules (with a source) -- the OCI rootfs (layers applied with whiteouts) equals the
   nydus rootfs read from the bootstrap and its blobs (every chunk decompressed and digest-checked)
   path by path: st_mode, uid/gid, size, rdev, symlink target, xattrs, sha256 of contents.
Every problem found is reported, not just the first. Work dir dumps follow upstream's names
(``nydus_manifest.json``, ``oci_config.json``, ``nydus_bootstrap/image/image.boot`` ...).

Must not import requests. Threading: one Checker per thread.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nydusd.converter import manifest as m
from nydusd.converter.layer_stream import LayerStream
from nydusd.converter.mount import MountOptions, NydusdProcess, nydusd_config
from nydusd.converter.publish import extract_bootstrap
from nydusd.converter.remote import Remote
from nydusd.converter.rootfs import Entry, compare, dir_rootfs, nydus_rootfs, oci_rootfs
from nydusd.converter.stores import BlobStore, create_store
from nydusd.errors import NotFound, NydusError
from nydusd.log import get_logger
from nydusd.oci import mediatypes as mtypes
from nydusd.rafs import RafsSuper, load_bootstrap

log = get_logger(__name__)


WORK_ENTRIES = ("nydus_bootstrap", "blobs", "nydusd", "nydus_index.json", "nydus_manifest.json",
                "nydus_config.json", "oci_index.json", "oci_manifest.json", "oci_config.json")


@dataclass(frozen=True)
class CheckOptions:
    work_dir: Path = Path("./output")
    platform: str | None = None
    multi_platform: bool = False
    #: (backend type, backend config JSON) when blobs live outside the registry
    backend: tuple[str, str] | None = None
    #: command starting nydusd: compare the OCI rootfs with a real FUSE mount of the nydus image
    #: (upstream's way) instead of decoding the blobs in process
    nydusd: str | None = None


@dataclass
class CheckReport:
    problems: list[str] = field(default_factory=list)
    manifests: int = 0
    files: int = 0
    blobs: int = 0

    @property
    def summary(self) -> str:
        return f"{self.manifests} manifest(s), {self.blobs} blob(s), {self.files} path(s) compared"


class Checker:
    def __init__(self, target: Remote, source: Remote | None, opts: CheckOptions) -> None:
        self.target, self.source, self.opts = target, source, opts
        self.report = CheckReport()
        self._store: BlobStore | None = None
        if opts.backend is not None:
            self._store = create_store(*opts.backend)

    def _problem(self, text: str) -> None:
        log.info("check_problem_found", problem=text)
        self.report.problems.append(text)

    def _dump(self, name: str, data: bytes) -> None:
        (self.opts.work_dir / name).write_bytes(data)

    def check(self) -> CheckReport:
        """Run every rule. Raises NotFound / AuthError / BackendError when an image cannot be read
        at all; rule violations are collected in the report instead."""
        work = self.opts.work_dir
        work.mkdir(parents=True, exist_ok=True)
        # Only what a previous check left here is removed: the work dir may be shared (./output).
        for name in WORK_ENTRIES:
            path = work / name
            if path.is_dir() and not path.is_mount():
                shutil.rmtree(path, ignore_errors=True)
            elif path.exists():
                path.unlink()
        try:
            targets = self._nydus_manifests()
            for platform, (desc, manifest) in targets.items():
                sub = f"[{platform}] " if len(targets) > 1 else ""
                self._check_one(sub, desc, manifest, platform)
        finally:
            if self._store is not None:
                self._store.close()
        log.info("image_checked", target=str(self.target.ref), problems=len(self.report.problems),
                 files=self.report.files)
        return self.report

    # ---- manifests ----------------------------------------------------------------------------
    def _nydus_manifests(self) -> dict[str, tuple[m.Descriptor, m.Manifest]]:
        data, mt, digest = self.target.get_manifest(self.target.ref.reference)
        doc = m.parse_document(data, mt)
        self._dump("nydus_index.json" if isinstance(doc, m.Index) else "nydus_manifest.json", data)
        if isinstance(doc, m.Manifest):
            return {"": (m.Descriptor(mediaType=doc.mediaType or mt, digest=digest, size=len(data)), doc)}
        out: dict[str, tuple[m.Descriptor, m.Manifest]] = {}
        wanted = m.parse_platform(self.opts.platform) if self.opts.platform else None
        for d in doc.manifests:
            if d.mediaType not in mtypes.MANIFEST_TYPES:
                continue
            if wanted is not None and (d.platform is None or not d.platform.matches(*wanted)):
                continue
            body, mt2, _ = self.target.get_manifest(d.digest)
            mf = m.parse_document(body, mt2)
            if isinstance(mf, m.Manifest) and (m.is_nydus_descriptor(d) or m.is_nydus_manifest(mf)):
                out[d.platform.spec() if d.platform else d.digest] = (d, mf)
        if not out:
            raise NotFound("no nydus manifest in the target index", target=str(self.target.ref),
                           platform=self.opts.platform)
        return out

    def _check_nydus_manifest(self, p: str, manifest: m.Manifest, config: dict[str, Any]) -> None:
        if not m.is_nydus_manifest(manifest):
            self._problem(f"{p}manifest: last layer is not a nydus bootstrap layer "
                          f"(media type gzip tar with {mtypes.ANN_NYDUS_BOOTSTRAP}=\"true\")")
        for layer in manifest.layers[:-1]:
            ann = layer.annotations or {}
            if layer.mediaType != mtypes.NYDUS_BLOB or ann.get(mtypes.ANN_NYDUS_BLOB) != "true":
                flag = ann.get(mtypes.ANN_NYDUS_BLOB)
                self._problem(f"{p}manifest: layer {layer.digest} is not a nydus blob layer "
                              f"(media type {layer.mediaType}, {mtypes.ANN_NYDUS_BLOB}={flag!r})")
        diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
        if len(diff_ids) != len(manifest.layers):
            self._problem(f"{p}manifest: config has {len(diff_ids)} diff_ids for "
                          f"{len(manifest.layers)} layers")

    def _config(self, remote: Remote, desc: m.Descriptor, dump: str) -> dict[str, Any]:
        raw = remote.get_blob_bytes(desc.digest, expected_size=desc.size)
        self._dump(dump, raw)
        return m.parse_config(raw, desc.digest)[1]

    # ---- one platform -------------------------------------------------------------------------
    def _check_one(self, p: str, desc: m.Descriptor, manifest: m.Manifest, platform: str) -> None:
        self.report.manifests += 1
        config = self._config(self.target, manifest.config, "nydus_config.json")
        self._check_nydus_manifest(p, manifest, config)
        if not m.is_nydus_manifest(manifest):
            return
        boot_layer = manifest.layers[-1]
        boot_dir = self.opts.work_dir / "nydus_bootstrap" / "image"
        boot_dir.mkdir(parents=True, exist_ok=True)
        try:
            bootstrap = extract_bootstrap(self.target.get_blob_bytes(boot_layer.digest, boot_layer.size))
        except NydusError as e:
            self._problem(f"{p}bootstrap: layer {boot_layer.digest} cannot be used: {e}")
            return
        (boot_dir / "image.boot").write_bytes(bootstrap)
        blob_layers = {layer.digest.split(":", 1)[1]: layer for layer in manifest.layers[:-1]
                       if layer.mediaType == mtypes.NYDUS_BLOB}
        try:
            rs = load_bootstrap(bootstrap)
        except NydusError as e:
            self._problem(f"{p}bootstrap: does not parse: {e}")
            return
        with rs:
            blob_ids = [b.blob_id for b in rs.blobs]
            self.report.blobs += len(blob_ids)
            if blob_layers:
                for blob_id in blob_ids:
                    if blob_id not in blob_layers:
                        self._problem(f"{p}bootstrap: blob {blob_id} is not a layer of the manifest")
            mount_mode = self.opts.nydusd is not None and self.source is not None
            blob_files = self._fetch_blobs(p, blob_ids, download=not mount_mode)
            if self.source is None:
                # No source to compare with: still read every file back (metadata and chunks,
                # digest-verified) so that a corrupt bootstrap or blob is reported.
                if len(blob_files) == len(blob_ids):
                    tree = self._decoded_tree(p, rs, blob_files)
                    self.report.files += len(tree or {})
                return
            oci = self._oci_tree(p, manifest, config, platform)
            if oci is None:
                return
            if len(blob_files) != len(blob_ids):
                return  # missing blobs were reported; content cannot be compared
            nydus = self._mounted_tree(p) if mount_mode else self._decoded_tree(p, rs, blob_files)
            if nydus is None:
                return
        self._compare(p, oci, nydus)

    def _compare(self, p: str, oci: dict[str, Entry], nydus: dict[str, Entry]) -> None:
        self.report.files += len(oci)
        for line in compare(oci, nydus):
            self._problem(f"{p}filesystem: {line}")

    def _decoded_tree(self, p: str, rs: RafsSuper, blob_files: dict[str, Path]) -> dict[str, Entry] | None:
        """The nydus rootfs decoded in process from the bootstrap and the downloaded blobs."""
        try:
            return nydus_rootfs(rs, lambda blob_id, off, size: _pread(blob_files[blob_id], off, size))
        except NydusError as e:
            self._problem(f"{p}filesystem: cannot read the nydus image: {e}")
            return None

    def _fetch_from_store(self, p: str, blob_id: str, path: Path, out: dict[str, Path],
                          download: bool) -> None:
        assert self._store is not None
        where = f"{self._store.type} backend"
        try:
            if not self._store.exists(blob_id):
                self._problem(f"{p}bootstrap: blob {blob_id} missing from the {where}")
                return
            if download and self._store.download(blob_id, path) != blob_id:
                self._problem(f"{p}bootstrap: blob {blob_id} in the {where} does not match its digest")
                return
        except NydusError as e:
            self._problem(f"{p}bootstrap: blob {blob_id} cannot be read from the {where}: {e}")
            return
        out[blob_id] = path

    def _mounted_tree(self, p: str) -> dict[str, Entry] | None:
        """The nydus rootfs as nydusd serves it (FUSE mount of the pulled bootstrap)."""
        assert self.opts.nydusd is not None
        backend_type, backend_config = (None, "")
        if self._store is not None:
            backend_type, backend_config = self._store.type, json.dumps(self._store.backend_config())
        mopts = MountOptions(mount_path=self.opts.work_dir / "nydus_mnt", work_dir=self.opts.work_dir,
                             nydusd=self.opts.nydusd, backend_type=backend_type,
                             backend_config=backend_config)
        nydusd_dir = self.opts.work_dir / "nydusd"
        (nydusd_dir / "cache").mkdir(parents=True, exist_ok=True)
        config = nydusd_dir / "config.json"
        config.write_text(json.dumps(nydusd_config(self.target, mopts, nydusd_dir / "cache")))
        mopts.mount_path.mkdir(exist_ok=True)
        proc = NydusdProcess(mopts.nydusd, config, self.opts.work_dir / "nydus_bootstrap/image/image.boot",
                             mopts.mount_path.resolve(), nydusd_dir / "api.sock", nydusd_dir / "nydusd.log")
        try:
            proc.start(mopts.ready_timeout)
        except NydusError as e:
            self._problem(f"{p}filesystem: nydusd cannot mount the image: {e}")
            return None
        try:
            return dir_rootfs(mopts.mount_path)
        except OSError as e:
            self._problem(f"{p}filesystem: reading the nydusd mount failed: {e}")
            return None
        finally:
            proc.stop(mopts.mount_path)

    def _fetch_blobs(self, p: str, blob_ids: list[str], *, download: bool = True) -> dict[str, Path]:
        """Every referenced blob, downloaded (or found in the localfs backend); missing ones are
        reported. The downloaded bytes must hash to the blob id. ``download=False`` only checks that
        each blob exists."""
        out: dict[str, Path] = {}
        blob_dir = self.opts.work_dir / "blobs"
        blob_dir.mkdir(exist_ok=True)
        for blob_id in blob_ids:
            if self._store is not None:
                self._fetch_from_store(p, blob_id, blob_dir / blob_id, out, download)
                continue
            digest = "sha256:" + blob_id
            if self.target.blob_size(digest) is None:
                self._problem(f"{p}bootstrap: blob {blob_id} does not exist in {self.target.ref}")
                continue
            path = blob_dir / blob_id
            if not download:
                out[blob_id] = path
                continue
            try:
                path.write_bytes(self.target.get_blob_bytes(digest))
            except NydusError as e:
                self._problem(f"{p}bootstrap: blob {blob_id} cannot be read: {e}")
                continue
            out[blob_id] = path
        return out

    def _oci_tree(self, p: str, nydus_manifest: m.Manifest, nydus_config: dict[str, Any],
                  platform: str) -> dict[str, Entry] | None:
        assert self.source is not None
        data, mt, _ = self.source.get_manifest(self.source.ref.reference)
        doc = m.parse_document(data, mt)
        if isinstance(doc, m.Index):
            self._dump("oci_index.json", data)
            # The nydus config names the platform it was converted from.
            os_name, arch = nydus_config.get("os"), nydus_config.get("architecture")
            want = (os_name, arch, nydus_config.get("variant")) if os_name and arch else None
            if "/" in platform:
                want = m.parse_platform(platform)
            found = [d for d in doc.manifests if not m.is_nydus_descriptor(d) and d.platform is not None
                     and (want is None or d.platform.matches(*want))]
            if not found:
                self._problem(f"{p}source: no OCI manifest for platform {platform}")
                return None
            data, mt, _ = self.source.get_manifest(found[0].digest)
            doc = m.parse_document(data, mt)
        assert isinstance(doc, m.Manifest)
        self._dump("oci_manifest.json", data)
        m.ensure_image(doc)
        config = self._config(self.source, doc.config, "oci_config.json")
        diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
        if len(diff_ids) != len(doc.layers):
            self._problem(f"{p}source manifest: config has {len(diff_ids)} diff_ids for "
                          f"{len(doc.layers)} layers")
            return None
        if m.comparable_config(config) != m.comparable_config(nydus_config):
            self._problem(f"{p}config: image config differs from the source "
                          f"({m.comparable_config(config)} != {m.comparable_config(nydus_config)})")
        return self._apply_layers(list(zip(doc.layers, diff_ids, strict=True)))

    def _apply_layers(self, layers: list[tuple[m.Descriptor, str]]) -> dict[str, Entry]:
        assert self.source is not None

        def gen() -> Any:
            for layer, diff_id in layers:
                with self.source.open_blob(layer.digest, layer.size) as raw:  # type: ignore[union-attr]
                    stream = LayerStream(raw, m.layer_compression(layer), expected_digest=layer.digest,
                                         expected_diff_id=diff_id)
                    yield stream
                    stream.finish()

        return oci_rootfs(gen())


def _pread(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)
