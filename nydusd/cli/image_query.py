"""`nydus-image check | inspect | stat | unpack`: flags as upstream, backed by nydusd.rafs.

Owns: the argparse definitions (``register(subparsers)``), the inspect request language
(``stats``, ``blobs``, ``prefetch``, ``ls [dir]``, ``stat <path>``, ``chunks <path>``,
``icheck <ino>``, ``chunk <blob offset>``, ``superblock``), output formatting and the translation of
``--blob`` / ``--blob-dir`` / ``--backend-*`` into a chunk ``BlobSource``. Errors propagate as
NydusError to the dispatcher (nydusd.cli.image), which prints them and exits non-zero.
Threading: runs in the main thread.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import stat
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from nydusd import __version__
from nydusd.errors import InvalidArgument, NotFound, NydusError, Unsupported
from nydusd.log import configure_logging, get_logger
from nydusd.rafs import RafsSuper
from nydusd.rafs.content import BlobSource, LocalBlobs, bounded
from nydusd.rafs.reader import check_servable, load_image
from nydusd.rafs.stats import ImageStat, check_image
from nydusd.rafs.unpack import write_tar

log = get_logger(__name__)


def _common(p: argparse.ArgumentParser, *, positional: bool = True) -> None:
    if positional:
        p.add_argument("bootstrap_pos", nargs="?", metavar="BOOTSTRAP", help="RAFS bootstrap file")
    p.add_argument("--bootstrap", "-B", help="RAFS bootstrap file (deprecated spelling)")
    p.add_argument("--log-level", "-l", default="warn", help="trace, debug, info, warn, error")


def register(sub: Any) -> None:
    """Add ``check``, ``inspect``, ``stat`` and ``unpack`` to the nydus-image dispatcher."""
    c = sub.add_parser("check", help="validate RAFS filesystem metadata (and data with --blob-dir)")
    _common(c)
    c.add_argument("--blob-dir", "-D", help="directory of data blobs: also verify every chunk")
    c.add_argument("--config", "-C", help="nydusd config whose backend holds the blobs: verify data")
    c.add_argument("--verbose", "-v", action="store_true", help="print every path")
    c.add_argument("--output-json", "-J", help="write result JSON here")
    c.set_defaults(func=cmd_check)

    i = sub.add_parser("inspect", help="inspect RAFS metadata (one-shot with -R, else a prompt)")
    _common(i)
    i.add_argument("--blob-dir", "-D", help="directory of data blobs")
    i.add_argument("--config", "-C", help="storage config (unused)")
    i.add_argument("--request", "-R", help="one request, JSON answer on stdout: " + ", ".join(REQUESTS))
    i.set_defaults(func=cmd_inspect)

    s = sub.add_parser("stat", help="statistics of one image or a directory of bootstraps")
    _common(s, positional=False)
    s.add_argument("--blob-dir", "-D", help="all extension-less files here (dedup across them)")
    s.add_argument("--target", "-T", help="target bootstrap compared against the base")
    s.add_argument("--config", "-C", help="storage config (unused)")
    s.add_argument("--digester", default="blake3", choices=["blake3", "sha256"],
                   help="only chunks of images with this digester count as dedup/referenced chunks")
    s.add_argument("--output-json", "-J", help="write result JSON here")
    s.set_defaults(func=cmd_stat)

    u = sub.add_parser("unpack", help="unpack an image into a tar file")
    _common(u)
    u.add_argument("--blob", "-b", help="the single data blob file (localfs)")
    u.add_argument("--blob-dir", "-D", help="directory of data blobs named by id")
    u.add_argument("--backend-type", help="backend type of --backend-config (e.g. registry, oss)")
    u.add_argument("--backend-config", help="JSON of that backend's config section")
    u.add_argument("--backend-config-file", help="file holding --backend-config")
    u.add_argument("--output", required=True, help="output tar file (a FIFO works)")
    u.set_defaults(func=cmd_unpack)


def _setup(args: argparse.Namespace) -> None:
    configure_logging(args.log_level)


def _os_errors(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn a failing file operation of the command line (output path, --blob-dir, config file)
    into an InvalidArgument naming the path, so the dispatcher prints one error line."""
    @functools.wraps(func)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except OSError as e:
            raise InvalidArgument(f"{e.strerror or e}", path=e.filename) from None
    return wrapper


def _bootstrap_path(args: argparse.Namespace, *, allow_blob: bool = False) -> str:
    path = getattr(args, "bootstrap_pos", None) or args.bootstrap
    if path:
        return str(path)
    if allow_blob and getattr(args, "blob", None):
        return str(args.blob)
    raise InvalidArgument("a bootstrap is required (BOOTSTRAP or --bootstrap)")


@contextmanager
def _open(path: str) -> Iterator[RafsSuper]:
    sb = load_image(path)
    try:
        yield sb
    finally:
        sb.close()


def _output_json(path: str | None, doc: Any, *, compact: bool) -> None:
    if not path:
        return
    with open(path, "w") as f:
        json.dump(doc, f, separators=(",", ":") if compact else None, indent=None if compact else 2)


# ---- check ------------------------------------------------------------------------------------------
@_os_errors
def cmd_check(args: argparse.Namespace) -> int:
    _setup(args)
    if args.config and args.blob_dir:
        raise InvalidArgument("--blob-dir conflicts with --config")
    path = _bootstrap_path(args)
    with _open(path) as sb:
        source: BlobSource | None = None
        close: Callable[[], None] = lambda: None  # noqa: E731
        if args.blob_dir:
            local = LocalBlobs(args.blob_dir)
            source, close = local, local.close
        elif args.config:
            source, close = _config_source(args.config)
        try:
            check_image(sb, source)
        finally:
            close()
        if args.verbose:
            for p, inode in sb.walk():
                print(f"{os.fsdecode(p)}\tino {inode.ino} mode {inode.mode:o} size {inode.size}")
        print("RAFS filesystem metadata is valid, referenced data blobs: ")
        for b in sb.blobs:
            print(f"\t {b.blob_index}: {b.blob_id}, compressed data size 0x{b.compressed_size:x}, "
                  f"uncompressed data size 0x{b.uncompressed_size:x}, chunks: 0x{b.chunk_count:x}, "
                  f"features: 0x{b.features:x}")
        doc = {"version": f"{__version__}-py", "bootstrap": path, "blobs": [b.blob_id for b in sb.blobs],
               "external_bootstrap": "", "external_blobs": [], "trace": {},
               "fs_version": str(sb.version), "compressor": sb.compressor.value}
    _output_json(args.output_json, doc, compact=True)
    return 0


# ---- inspect ----------------------------------------------------------------------------------------
def _inode_json(sb: RafsSuper, ino: int) -> dict[str, Any]:
    i = sb.get_inode(ino)
    doc: dict[str, Any] = {"inode": i.ino, "mode": i.mode, "uid": i.uid, "gid": i.gid, "size": i.size,
                           "nlink": i.nlink, "rdev": i.rdev, "mtime": i.mtime,
                           "mtime_nsec": i.mtime_nsec, "blocks": i.blocks}
    if i.is_symlink:
        doc["symlink"] = os.fsdecode(sb.readlink(ino))
    if i.has_xattr:
        doc["xattrs"] = {os.fsdecode(k): v.decode("utf-8", "replace") for k, v in sb.xattrs(ino).items()}
    if i.is_reg:
        doc["chunks"] = len(sb.chunks(ino))
    return doc


def _chunks_json(sb: RafsSuper, ino: int) -> list[dict[str, Any]]:
    return [{"file_offset": c.file_offset, "blob_index": c.blob_index,
             "blob_id": sb.blobs[c.blob_index].blob_id, "index": c.index,
             "digest": c.digest.hex(), "compressed": c.is_compressed,
             "compressed_offset": c.compressed_offset, "compressed_size": c.compressed_size,
             "uncompressed_offset": c.uncompressed_offset, "uncompressed_size": c.uncompressed_size}
            for c in sb.chunks(ino)]


def _req_stats(sb: RafsSuper, arg: str) -> Any:
    return {"inodes_count": sb.inodes_count_field, "version": sb.version, "chunk_size": sb.chunk_size,
            "compressor": sb.compressor.value, "digester": sb.digester.value, "flags": sb.flags,
            "root_inode": sb.root_ino, "blobs": len(sb.blobs)}


def _req_blobs(sb: RafsSuper, arg: str) -> Any:
    return [{"blob_id": b.blob_id, "readahead_offset": b.readahead_offset,
             "readahead_size": b.readahead_size, "decompressed_size": b.uncompressed_size,
             "compressed_size": b.compressed_size, "chunk_count": b.chunk_count,
             "features": b.features, "compressor": b.compressor.value, "digester": b.digester.value}
            for b in sb.blobs]


def _req_ls(sb: RafsSuper, arg: str) -> Any:
    ino = sb.resolve(arg or "/").ino
    return [{"name": os.fsdecode(n), "inode": i} for n, i in sb.children(ino)]


def _req_chunk(sb: RafsSuper, arg: str) -> Any:
    """Files whose chunks cover compressed offset ``arg`` of any blob."""
    off = int(arg, 0)
    hits = []
    for path, inode in sb.walk():
        if inode.is_reg:
            for c in sb.chunks(inode.ino):
                if c.compressed_offset <= off < c.compressed_offset + max(c.compressed_size, 1):
                    hits.append({"path": os.fsdecode(path), "blob_id": sb.blobs[c.blob_index].blob_id,
                                 "file_offset": c.file_offset, "compressed_offset": c.compressed_offset})
    return hits


def _req_icheck(sb: RafsSuper, arg: str) -> Any:
    ino = int(arg, 0)
    return {"inode": ino, "path": os.fsdecode(sb.path_of(ino))}


REQUESTS: dict[str, Callable[[RafsSuper, str], Any]] = {
    "stats": _req_stats,
    "superblock": _req_stats,
    "blobs": _req_blobs,
    "prefetch": lambda sb, a: [{"inode": i, "path": os.fsdecode(sb.path_of(i))}
                               for i in sb.prefetch_inodes()],
    "ls": _req_ls,
    "stat": lambda sb, a: dict(_inode_json(sb, sb.resolve(a).ino), path=a),
    "chunks": lambda sb, a: _chunks_json(sb, sb.resolve(a).ino),
    "chunk": _req_chunk,
    "icheck": _req_icheck,
}


def run_request(sb: RafsSuper, line: str) -> Any:
    """Answer one inspect request. Raises InvalidArgument for an unknown request."""
    words = shlex.split(line)
    if not words:
        raise InvalidArgument("empty request")
    handler = REQUESTS.get(words[0])
    if handler is None:
        raise InvalidArgument(f"unknown request {words[0]!r}; one of: " + ", ".join(REQUESTS))
    return handler(sb, " ".join(words[1:]))


@_os_errors
def cmd_inspect(args: argparse.Namespace) -> int:
    _setup(args)
    with _open(_bootstrap_path(args)) as sb:
        if args.request:
            print(json.dumps(run_request(sb, args.request), indent=2))
            return 0
        return _prompt(sb)


def _prompt(sb: RafsSuper) -> int:
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("Inspecting Rafs :> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("exit", "q", "quit"):
            return 0
        if not line.strip():
            continue
        if line.strip() == "help":
            print("requests: " + ", ".join(REQUESTS) + ", exit")
            continue
        try:
            print(json.dumps(run_request(sb, line), indent=2))
        except (InvalidArgument, NotFound) as e:
            print(f"error: {e}")


# ---- stat ---------------------------------------------------------------------------------------
@_os_errors
def cmd_stat(args: argparse.Namespace) -> int:
    """As upstream: ``--bootstrap`` is the base image, else every extension-less file of
    ``--blob-dir`` (other than the target; unreadable ones are skipped) with dedup figures; then
    ``--target``. ``--output-json`` writes the JSON instead of printing the text dump."""
    _setup(args)
    stat_ = ImageStat(args.digester)
    target = os.path.abspath(args.target) if args.target else None
    if args.bootstrap:
        with _open(args.bootstrap) as sb:
            stat_.add(sb, is_base=True)
    elif args.blob_dir:
        stat_.dedup_enabled = True
        for name in sorted(os.listdir(args.blob_dir)):
            path = os.path.join(args.blob_dir, name)
            if name.rfind(".") > 0 or not os.path.isfile(path) or os.path.abspath(path) == target:
                continue
            try:
                with _open(path) as sb:
                    stat_.add(sb, is_base=True)
            except NydusError as e:
                log.debug("stat_skipped", path=path, error=str(e))
    else:
        raise InvalidArgument("one of --bootstrap and --blob-dir must be specified")
    if args.target:
        with _open(args.target) as sb:
            stat_.add(sb, is_base=False)
    stat_.finalize()
    if args.output_json:
        _output_json(args.output_json, stat_.as_dict(), compact=True)
    else:
        print(stat_.dump())
    return 0


# ---- unpack -------------------------------------------------------------------------------------
def _config_source(path: str) -> tuple[BlobSource, Callable[[], None]]:
    """A BlobSource over the backend of a nydusd config file (``-C``)."""
    from nydusd.config import load_config_file
    from nydusd.errors import ConfigError
    from nydusd.storage.backend import create_backend

    cfg = load_config_file(path)
    if cfg.backend is None:
        raise ConfigError("the config has no backend section", field="backend")
    backend = create_backend(cfg.backend)
    return bounded(lambda blob, off, size: backend.read(blob.blob_id, off, size)), backend.close


def _backend_source(args: argparse.Namespace) -> tuple[BlobSource, Callable[[], None]]:
    try:
        from nydusd.storage.backend import create_backend
    except ImportError:
        raise Unsupported("unpack --backend-config: not supported yet") from None
    from nydusd.config import load_config

    text = args.backend_config
    if args.backend_config_file:
        with open(args.backend_config_file) as f:
            text = f.read()
    if not args.backend_type:
        raise InvalidArgument("--backend-config needs --backend-type")
    try:
        section = json.loads(text or "")
    except ValueError as e:
        raise InvalidArgument(f"--backend-config is not JSON: {e}") from None
    cfg = load_config(json.dumps({"version": 2, "backend": {"type": args.backend_type,
                                                             args.backend_type.replace("-", "_"): section}}))
    assert cfg.backend is not None  # the document above has one
    backend = create_backend(cfg.backend)
    return bounded(lambda blob, off, size: backend.read(blob.blob_id, off, size)), backend.close


@_os_errors
def cmd_unpack(args: argparse.Namespace) -> int:
    _setup(args)
    chosen = [x for x in (args.blob, args.blob_dir, args.backend_config or args.backend_config_file) if x]
    if len(chosen) != 1:
        raise InvalidArgument("unpack needs exactly one of --blob, --blob-dir, --backend-config")
    source: BlobSource
    if args.blob or args.blob_dir:
        local = LocalBlobs(args.blob_dir, {"*": args.blob} if args.blob else None)
        source, close = local, local.close
    else:
        source, close = _backend_source(args)
    try:
        with _open(_bootstrap_path(args, allow_blob=True)) as sb:
            check_servable(sb)  # before the output file is created
            with open(args.output, "wb") as out:
                try:
                    write_tar(sb, source, out)
                except BaseException:
                    if stat.S_ISREG(os.fstat(out.fileno()).st_mode):
                        os.unlink(args.output)  # no half-written tar left behind
                    raise
    finally:
        close()
    return 0
