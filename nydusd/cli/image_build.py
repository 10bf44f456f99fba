"""`nydus-image create` and `nydus-image merge`: flags as upstream, handed to nydusd.builder.

Owns: the argparse definitions of both subcommands (``register(subparsers)``), their translation to
``BuildOptions`` / ``MergeOptions``, prefetch patterns from stdin and the ``--output-json`` file.
Errors propagate as NydusError to the dispatcher in ``nydusd.cli.image``, which prints them and
exits with their code. Threading: runs in the main thread.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from typing import Any

from nydusd.builder import BuildOptions, SourceType, WhiteoutSpec, build
from nydusd.builder.build import BuildOutput
from nydusd.builder.merge import MergeOptions, merge
from nydusd.builder.options import parse_chunk_size, parse_prefetch_patterns
from nydusd.cli.progress import TerminalDisplay, human_bytes, human_duration, wants_display
from nydusd.compress import Compressor
from nydusd.digest import DigestAlgorithm
from nydusd.errors import InvalidArgument, Unsupported
from nydusd.log import configure_logging

CREATE_EPILOG = """\
Differences from upstream nydus-image (and why):
  * --type: builds dir-rafs (alias directory), tar-rafs and targz-rafs (a gzip tar is detected by
    magic, like zstd tars); the *-ref, stargz and tar-tarfs types are not implemented.
  * tar entries: a leading '/' is stripped (GNU tar extraction rule); a '..' component, a
    duplicate non-directory name, a hard link to a missing/later entry or to a directory is a
    build error instead of being silently resolved, so a malicious layer cannot alias files.
    Paths longer than PATH_MAX (4096 bytes) and uid/gid outside 0..2^32-1 or negative sizes are
    build errors; mtimes are clamped into 0..2^64-1 (a pre-1970 file builds with mtime 0).
  * tar hard links with --parent-bootstrap may name a file of the parent image (upstream fails
    with "unknown target"): the new name joins the lower file's inode, as containerd's link(2)
    on overlayfs does; a lower file this layer deleted before the link is an error.
  * --batch-size, --encrypt, --blob-cache-dir, --attributes, --external-blob are accepted for
    feature detection but only their default (off) is supported; other values fail with an error.
  * with --prefetch-policy fs, a tar source keeps its blob in tar order (it is never buffered
    or extracted to disk); directory sources put prefetched files first, as upstream.
  * output is always reproducible (sorted walk, times from the source, no build time); use
    --repeatable to also drop uid/gid (EXPLICIT_UID_GID clear), as upstream.
"""


def _log_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", "-l", default="info",
                   help="trace, debug, info, warn, error (default: info)")
    p.add_argument("--log-file", "-L", help="append logs to this file instead of stderr")
    p.add_argument("--log-format", choices=("json", "console", "text"),
                   help="json, console (coloured key=value) or text (upstream's '[time] LEVEL message' "
                   "lines); default: $NYDUS_LOG_FORMAT, else console on a terminal, json otherwise")


def register(sub: Any) -> None:
    """Add ``create`` and ``merge`` to the nydus-image dispatcher."""
    c = sub.add_parser("create", help="build a RAFS image from a directory or a tar",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=CREATE_EPILOG)
    c.add_argument("source", metavar="SOURCE", help="directory (dir-rafs) or tar file / - / FIFO")
    c.add_argument("--type", "-t", "--source-type", dest="type", default="dir-rafs",
                   help="dir-rafs (alias directory), tar-rafs, targz-rafs (default: dir-rafs)")
    c.add_argument("--bootstrap", "-B", help="output RAFS metadata (bootstrap) file")
    c.add_argument("--blob", "-b", help="output data blob file (may be a FIFO)")
    c.add_argument("--blob-dir", "-D", help="directory for outputs named by their sha256")
    c.add_argument("--blob-id", help="explicit blob id recorded in the bootstrap")
    c.add_argument("--blob-inline-meta", "--inline-bootstrap", action="store_true",
                   help="append the bootstrap (and chunk meta) to the data blob")
    c.add_argument("--blob-offset", default="0", help=argparse.SUPPRESS)
    c.add_argument("--blob-data-size", help="(estargz only; unsupported)")
    c.add_argument("--fs-version", "-v", default="6", choices=["5", "6"], help="RAFS version (default 6)")
    c.add_argument("--compressor", default="zstd", help="none, lz4_block, zstd (default zstd)")
    c.add_argument("--digester", default="blake3", help="blake3 or sha256 (default blake3)")
    c.add_argument("--chunk-size", default="0x100000",
                   help="power of two in [0x1000, 0x1000000], decimal or 0x-hex (default 0x100000)")
    c.add_argument("--batch-size", default="0", help="only 0 (batching off) is supported")
    c.add_argument("--features", default="", help="comma list; blob-toc (v6)")
    c.add_argument("--chunk-dict", help="bootstrap=PATH: deduplicate against that image")
    c.add_argument("--parent-bootstrap", help="build a layer on top of this bootstrap")
    c.add_argument("--aligned-chunk", action="store_true", help="4 KiB aligned chunks (v5)")
    c.add_argument("--repeatable", action="store_true", help="do not record uid/gid")
    c.add_argument("--disable-check", action="store_true", help=argparse.SUPPRESS)
    c.add_argument("--whiteout-spec", default="oci", help="oci, overlayfs, none (default oci)")
    c.add_argument("--prefetch-policy", default="none",
                   help="fs or none; fs reads absolute prefetch paths from stdin, one per line")
    c.add_argument("--output-json", "-J", help="write the result JSON to this file")
    c.add_argument("--encrypt", "-E", action="store_true", help="(unsupported) encrypt data")
    c.add_argument("--blob-cache-dir", help="(unsupported) write cache files")
    c.add_argument("--config", "-C", help="(unused) storage config for chunk-dict/parent access")
    c.add_argument("--attributes", help="(unsupported) .nydusattributes file")
    c.add_argument("--external-blob", help="(unsupported) external blob output")
    c.add_argument("--threads", type=int, default=0, help="hashing/compression threads (default: CPUs)")
    _log_args(c)
    c.set_defaults(func=run_create)

    m = sub.add_parser("merge", help="merge per-layer bootstraps into one bootstrap")
    m.add_argument("sources", metavar="SOURCE", nargs="+", help="per-layer bootstraps, bottom first")
    m.add_argument("--bootstrap", "-B", help="output bootstrap")
    m.add_argument("--blob-dir", "-D", help="output directory (bootstrap named by sha256)")
    m.add_argument("--parent-bootstrap", help="merge on top of this bootstrap")
    m.add_argument("--chunk-dict", help="bootstrap=PATH")
    m.add_argument("--prefetch-policy", default="none", help="fs or none (fs: patterns on stdin)")
    m.add_argument("--output-json", "-J", help="write the result JSON to this file")
    for name in ("blob-digests", "original-blob-ids", "blob-sizes", "blob-toc-digests", "blob-toc-sizes"):
        m.add_argument(f"--{name}", help="comma list, one item per source")
    m.add_argument("--config", "-C", help="(unused) storage config")
    _log_args(m)
    m.set_defaults(func=run_merge)


def _chunk_dict(arg: str | None) -> str | None:
    if arg is None:
        return None
    kind, sep, path = arg.partition("=")
    if not sep or kind != "bootstrap" or not path:
        raise InvalidArgument(f"invalid --chunk-dict {arg!r}, expected bootstrap=PATH", field="chunk-dict")
    return path


def _prefetch(policy: str) -> tuple[str, ...]:
    if policy == "none":
        return ()
    if policy != "fs":
        raise InvalidArgument(f"unsupported prefetch policy {policy!r} (fs or none)", field="prefetch-policy")
    return parse_prefetch_patterns(sys.stdin.read().splitlines())


def _unsupported(args: argparse.Namespace) -> None:
    if args.encrypt or args.blob_cache_dir or args.attributes or args.external_blob or args.blob_data_size:
        raise Unsupported("--encrypt, --blob-cache-dir, --attributes, --external-blob and --blob-data-size "
                          "are not supported by this builder")
    if int(args.batch_size, 0) != 0 or int(args.blob_offset, 0) != 0:
        raise Unsupported("--batch-size and --blob-offset must be 0 in this builder")


def _features(text: str) -> bool:
    feats = {f.strip() for f in text.split(",") if f.strip()}
    unknown = feats - {"blob-toc"}
    if unknown:
        raise InvalidArgument(f"unknown feature(s) {sorted(unknown)}", field="features")
    return "blob-toc" in feats


def run_create(args: argparse.Namespace) -> int:
    configure_logging(args.log_level, args.log_file, fmt=args.log_format)
    _unsupported(args)
    if args.type == "tar-rafs" and os.environ.get("NYDUS_DISABLE_TAR2RAFS"):
        raise Unsupported("tar-rafs disabled by NYDUS_DISABLE_TAR2RAFS")
    opts = BuildOptions(
        source_type=SourceType.parse(args.type), fs_version=5 if args.fs_version == "5" else 6,
        compressor=Compressor.parse(args.compressor), digester=DigestAlgorithm.parse(args.digester),
        chunk_size=parse_chunk_size(args.chunk_size), whiteout_spec=_whiteout(args.whiteout_spec),
        explicit_uidgid=not args.repeatable, aligned_chunk=args.aligned_chunk,
        blob_inline_meta=args.blob_inline_meta, blob_toc=_features(args.features), blob_id=args.blob_id,
        prefetch_patterns=_prefetch(args.prefetch_policy), parent_bootstrap=args.parent_bootstrap,
        chunk_dict=_chunk_dict(args.chunk_dict), bootstrap_path=args.bootstrap, blob_path=args.blob,
        blob_dir=args.blob_dir, workers=args.threads)
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        progress = None
        if wants_display():
            # a terminal: a bar (bytes, files, rate) with log lines above it, then a summary
            progress = _BarProgress(stack.enter_context(TerminalDisplay()))
            stack.callback(progress.close)
        out = build(args.source, opts, progress=progress)
    _write_json(args.output_json, out.to_json())
    if progress is not None:
        print(build_summary(out, time.monotonic() - started), file=sys.stderr)
    return 0


class _BarProgress:
    """``BuildProgress`` drawn as one bar: bytes read (with rate) and files done."""

    def __init__(self, display: TerminalDisplay) -> None:
        self.display = display
        self.bar: Any = None
        self.files = 0
        self.total_files: int | None = None

    def start(self, files: int | None, size: int | None) -> None:
        self.total_files = files
        self.bar = self.display.bar("create", size)

    def file_done(self, size: int) -> None:
        self.files += 1
        self.bar.update(size)
        total = f"/{self.total_files}" if self.total_files is not None else ""
        self.bar.set_postfix_str(f"files {self.files}{total}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def build_summary(out: BuildOutput, elapsed: float) -> str:
    """The human summary printed after a build on a terminal."""
    read = int(out.stats.get("bytes_read", 0))
    chunks, dedup = int(out.stats.get("chunks", 0)), int(out.stats.get("dedup_chunks", 0))
    ratio = f"{out.data_size / out.blob_size:.2f}x" if out.blob_size else "-"
    rows = [("Bootstrap", out.bootstrap_path or "(inside the blob)"),
            ("Blob", f"{out.blob_path or '-'} ({out.blob_id or 'no new data'})"),
            ("Entries", str(out.entries)),
            ("Bytes in", f"{human_bytes(read)} of file data"),
            ("Bytes out", f"{human_bytes(out.blob_size)} blob + {human_bytes(len(out.bootstrap))} bootstrap"),
            ("Dedup", f"{dedup} of {chunks} chunks ({100 * dedup / chunks if chunks else 0:.1f}%) "
                      "already stored"),
            ("Compression", f"{ratio} ({out.compressor}, new chunks' data / blob)"),
            ("Elapsed", f"{human_duration(elapsed)} ({human_bytes(read / elapsed if elapsed else 0)}/s)")]
    return "\n".join(f"{k + ':':<13}{v}" for k, v in rows)


def _whiteout(name: str) -> WhiteoutSpec:
    try:
        return WhiteoutSpec(name)
    except ValueError:
        raise InvalidArgument(f"invalid whiteout spec {name!r} (oci, overlayfs, none)",
                              field="whiteout-spec") from None


def _list(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(x.strip() for x in text.split(","))


def _ints(text: str | None) -> tuple[int, ...] | None:
    items = _list(text)
    try:
        return None if items is None else tuple(int(x, 0) for x in items)
    except ValueError:
        raise InvalidArgument(f"invalid size list {text!r}") from None


def run_merge(args: argparse.Namespace) -> int:
    configure_logging(args.log_level, args.log_file, fmt=args.log_format)
    opts = MergeOptions(
        bootstrap_path=args.bootstrap, blob_dir=args.blob_dir, parent_bootstrap=args.parent_bootstrap,
        chunk_dict=_chunk_dict(args.chunk_dict), prefetch_patterns=_prefetch(args.prefetch_policy),
        original_blob_ids=_list(args.original_blob_ids), blob_digests=_list(args.blob_digests),
        blob_sizes=_ints(args.blob_sizes), blob_toc_digests=_list(args.blob_toc_digests),
        blob_toc_sizes=_ints(args.blob_toc_sizes))
    out = merge(list(args.sources), opts)
    _write_json(args.output_json, out.to_json())
    return 0


def _write_json(path: str | None, doc: dict[str, Any]) -> None:
    if not path:
        return
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
    except OSError as e:
        raise InvalidArgument(f"cannot write --output-json: {e.strerror}", path=path) from None
