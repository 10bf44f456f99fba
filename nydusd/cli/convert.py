"""`nydusify`: convert OCI images in a registry to nydus images, check them, mount them.

Subcommands and flags follow upstream nydusify (interfaces.md §6.1): ``convert``, ``check``,
``mount`` (alias ``view``) and ``optimize`` (a prefetch table from a file list, a recorded access
pattern or a command run in a container while nydusd records its reads: ``nydusd.converter.optimize``,
``nydusd.converter.workload``); global ``--debug/-D``, ``--log-level/-l``, ``--log-file``. Errors are
printed as one ``error: ...`` line and exit with status 1 (upstream's logrus fatal), a failed check
exits 1 after listing every difference.

Composition root: reads the environment (credentials, ``DEBUG_LOG_LEVEL``) and stdin (prefetch
patterns) and passes everything down explicitly. Single-threaded apart from the converter's pools.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from nydusd.cli.version import VersionAction
from nydusd.errors import InvalidArgument, NydusError
from nydusd.log import configure_logging


def _duration(text: str) -> float:
    """Go-style duration (``5s``, ``500ms``, ``1m``) or plain seconds."""
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    for suffix in ("ms", "s", "m", "h"):
        if text.endswith(suffix):
            try:
                return float(text[: -len(suffix)]) * units[suffix]
            except ValueError:
                break
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}") from None


def _size(text: str) -> int:
    try:
        return int(text, 16) if text.lower().startswith("0x") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}") from None


def _add_convert(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("convert", help="convert an OCI image to a nydus image")
    p.add_argument("--source", required=True, help="source OCI image reference")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--target", help="target nydus image reference")
    g.add_argument("--target-suffix", help="target = source repository with tag + suffix")
    p.add_argument("--source-insecure", action="store_true", help="skip TLS verification / allow http")
    p.add_argument("--target-insecure", action="store_true", help="skip TLS verification / allow http")
    p.add_argument("--plain-http", action="store_true", help="talk plain http to registries")
    p.add_argument("--platform", help="os/arch to convert from a multi-platform source")
    p.add_argument("--all-platforms", action="store_true", help="convert every platform")
    p.add_argument("--merge-platform", "--multi-platform", dest="merge_platform", action="store_true",
                   help="push an index holding both the OCI and the nydus manifests")
    p.add_argument("--push-retry-count", type=int, default=3, help="retries of a failed push (default 3)")
    p.add_argument("--push-retry-delay", type=_duration, default=5.0,
                   help="pause between push retries, e.g. 5s, 500ms (default 5s)")
    p.add_argument("--fs-version", type=int, choices=(5, 6), default=6, help="RAFS version (default 6)")
    p.add_argument("--compressor", default="zstd", choices=("none", "lz4_block", "zstd"),
                   help="chunk compression (default zstd)")
    p.add_argument("--fs-chunk-size", "--chunk-size", dest="chunk_size", type=_size, default=0x100000,
                   help="chunk size, a power of two, decimal or 0x-hex (default 0x100000)")
    p.add_argument("--batch-size", type=_size, default=0, help="only 0 (batching off) is supported")
    p.add_argument("--fs-align-chunk", "--backend-aligned-chunk", dest="aligned_chunk",
                   action="store_true", help="4 KiB aligned uncompressed chunk offsets")
    p.add_argument("--prefetch-patterns", action="store_true", help="read prefetch paths from stdin")
    p.add_argument("--prefetch-dir", help="prefetch this directory")
    p.add_argument("--chunk-dict", help="bootstrap:registry:<ref> or bootstrap:local:<path>")
    p.add_argument("--chunk-dict-insecure", action="store_true",
                   help="chunk-dict registry: skip TLS verification, fall back to plain http")
    p.add_argument("--work-dir", default="./tmp", help="temporary files (default ./tmp)")
    p.add_argument("--oci", action="store_true", help="OCI media types even for a docker source")
    p.add_argument("--with-referrer", action="store_true", help="set subject to the source manifest")
    p.add_argument("--backend-type", choices=("oss", "s3", "localfs"),
                   help="store the nydus blobs there instead of in the target registry")
    bc = p.add_mutually_exclusive_group()
    bc.add_argument("--backend-config", help="that backend's config as a JSON string")
    bc.add_argument("--backend-config-file", help="that backend's config in a file")
    p.add_argument("--backend-force-push", action="store_true",
                   help="upload blobs even when the backend already has them")
    p.add_argument("--nydus-image", default="nydus-image", help="ignored: the builder is built in")
    p.add_argument("--output-json", help="write conversion metrics (sizes, ns timings) here")
    p.add_argument("--progress", choices=("auto", "always", "never"), default="auto",
                   help="progress bars on stderr: auto = only on a terminal (default)")
    p.set_defaults(func=cmd_convert)


def _add_registry_access(p: argparse.ArgumentParser) -> None:
    """The source/target TLS flags of the subcommands that talk to two registries."""
    p.add_argument("--source-insecure", action="store_true",
                   help="source registry: skip TLS verification, fall back to plain http")
    p.add_argument("--target-insecure", action="store_true",
                   help="target registry: skip TLS verification, fall back to plain http")
    p.add_argument("--plain-http", action="store_true", help="talk plain http to both registries")


def _add_check(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("check", help="check a nydus image (and compare it with its OCI source)")
    p.add_argument("--target", required=True, help="nydus image reference to check")
    p.add_argument("--source", help="OCI image it was converted from: compare every file with it")
    _add_registry_access(p)
    p.add_argument("--target-backend-type", choices=("oss", "s3", "localfs"),
                   help="where the nydus blobs are, when not in the target registry")
    p.add_argument("--target-backend-config", help="that backend's config as a JSON string")
    p.add_argument("--target-backend-config-file", help="that backend's config in a file")
    p.add_argument("--multi-platform", action="store_true",
                   help="the target must be an index holding both the OCI and the nydus manifest")
    p.add_argument("--platform", help="os/arch to check in a multi-platform image (default: this host's)")
    p.add_argument("--work-dir", default="./output",
                   help="directory for pulled bootstraps and check output (default: ./output)")
    p.add_argument("--nydus-image", default="nydus-image", help="ignored: the image checks are built in")
    p.add_argument("--nydusd", help="compare through a FUSE mount served by this nydusd command "
                   "(default: decode the blobs in process)")
    p.set_defaults(func=cmd_check)


def _add_mount(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("mount", aliases=["view"], help="mount a nydus image with nydusd")
    p.add_argument("--target", required=True, help="nydus image reference to mount")
    p.add_argument("--target-insecure", action="store_true",
                   help="skip TLS verification, fall back to plain http")
    p.add_argument("--plain-http", action="store_true", help="talk plain http to the registry")
    p.add_argument("--backend-type", choices=("oss", "s3", "localfs", "registry"),
                   help="where the nydus blobs are (default: the image's registry)")
    bc = p.add_mutually_exclusive_group()
    bc.add_argument("--backend-config", help="that backend's config as a JSON string")
    bc.add_argument("--backend-config-file", help="that backend's config in a file")
    p.add_argument("--prefetch", action="store_true", help="let nydusd prefetch the whole image")
    p.add_argument("--mount-path", default="./image-fs",
                   help="where to mount the image (default: ./image-fs; removed afterwards if created)")
    p.add_argument("--platform", help="os/arch to mount from a multi-platform image")
    p.add_argument("--work-dir", default="./tmp",
                   help="bootstrap, blob cache, nydusd config, log and API socket (default: ./tmp; "
                   "removed afterwards if created)")
    p.add_argument("--nydusd", default="nydusd", help="nydusd command to run (default: nydusd in PATH)")
    p.set_defaults(func=cmd_mount)


def _add_copy(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("copy", help="copy an image with all its blobs between registries or to/from a "
                       "local OCI layout (file://DIR or file://PATH.tar)")
    p.add_argument("--source", required=True, help="source image reference, or file://DIR / file://PATH.tar")
    p.add_argument("--target", required=True, help="target image reference, or file://DIR / file://PATH.tar")
    _add_registry_access(p)
    p.add_argument("--all-platforms", action="store_true", help="copy the whole index, every platform")
    p.add_argument("--platform", help="os/arch to copy from a multi-platform image (default: this host's)")
    p.add_argument("--push-chunk-size", default="0", help="accepted; uploads are monolithic (0)")
    p.add_argument("--work-dir", default="./tmp", help="temporary files of file://*.tar copies")
    p.add_argument("--nydus-image", default="nydus-image", help="ignored: nothing is built")
    _add_source_backend(p, "the source's nydus blobs are in this backend (converted with --backend-type): "
                        "copy them into the target as layers")
    p.set_defaults(func=cmd_copy)


def _add_source_backend(p: argparse.ArgumentParser, help: str) -> None:
    """--source-backend-type/-config/-config-file (upstream's flags for copy and optimize)."""
    p.add_argument("--source-backend-type", choices=("oss", "s3", "localfs"), help=help)
    sbc = p.add_mutually_exclusive_group()
    sbc.add_argument("--source-backend-config", help="that backend's config as a JSON string")
    sbc.add_argument("--source-backend-config-file", help="that backend's config in a file")


def _add_optimize(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("optimize", help="rebuild a nydus image with a prefetch table: from a file list, "
                       "a recorded access pattern, or by recording a command run in a container")
    p.add_argument("--source", required=True, help="source nydus image reference")
    p.add_argument("--target", required=True, help="target nydus image reference")
    _add_registry_access(p)
    files = p.add_mutually_exclusive_group(required=True)
    files.add_argument("--prefetch-files", help="the files to prefetch, in order: upstream's JSON "
                       "({\"version\": \"v1\", \"files\": [{\"path\": ...}]}; ranges prefetch the whole "
                       "file) or one absolute path per line")
    files.add_argument("--access-pattern", help="a nydusd /api/v1/metrics/pattern JSON: prefetch the "
                       "files it records, first read first")
    files.add_argument("--workload", help="a command line (split like a shell does, no shell runs): run "
                       "it with runc in a container on the lazily mounted source image and prefetch the "
                       "files it reads, first read first (needs root and runc)")
    p.add_argument("--workload-timeout", type=_duration, default=300.0,
                   help="stop a workload still running after this long and use what it read until then, "
                   "e.g. 30s, 5m (default 5m)")
    p.add_argument("--output-prefetch-files",
                   help="also write the prefetch list used (one path per line, in order) to this file")
    p.add_argument("--nydusd", default="nydusd",
                   help="nydusd command that mounts the image for --workload (default: nydusd in PATH)")
    p.add_argument("--runc", default="runc", help="runc command for --workload (default: runc in PATH)")
    p.add_argument("--policy", default="separated-blob-with-prefetch-files",
                   choices=("separated-blob-with-prefetch-files",),
                   help="the optimizing way (default and only one: separated-blob-with-prefetch-files; the "
                   "data blobs are reused, chunks stay in place)")
    p.add_argument("--platform", help="accepted for compatibility; ignored (the source must be one image)")
    p.add_argument("--work-dir", default="./tmp", help="working directory (the --workload mount, its cache "
                   "and the container; default ./tmp)")
    p.add_argument("--nydus-image", default="nydus-image", help="ignored: the builder is built in")
    p.add_argument("--push-chunk-size", default="0MB", help="accepted; uploads are monolithic (0MB)")
    _add_source_backend(p, "the source's nydus blobs are in this backend (converted with --backend-type); "
                        "--workload reads them from there")
    p.set_defaults(func=cmd_optimize)


def _read_text(path: str, what: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as e:
        raise InvalidArgument(f"cannot read the {what}: {e.strerror}", path=path) from None


def cmd_optimize(args: argparse.Namespace) -> int:
    from nydusd.converter.optimize import Optimizer, parse_prefetch_files, prefetch_list
    from nydusd.converter.remote import open_remote

    if args.source_backend_type and not (args.source_backend_config or args.source_backend_config_file):
        raise InvalidArgument("--source-backend-type needs --source-backend-config(-file)")
    env = dict(os.environ)
    with contextlib.ExitStack() as stack:
        source = open_remote(args.source, insecure=args.source_insecure, plain_http=args.plain_http, env=env,
                             insecure_flag="--source-insecure")
        stack.callback(source.close)
        target = open_remote(args.target, insecure=args.target_insecure, plain_http=args.plain_http, env=env,
                             insecure_flag="--target-insecure", push=True)
        stack.callback(target.close)
        if args.prefetch_files:
            paths = parse_prefetch_files(_read_text(args.prefetch_files, "prefetch files"))
        elif args.access_pattern:
            try:
                pattern = json.loads(_read_text(args.access_pattern, "access pattern"))
            except ValueError:
                raise InvalidArgument("the access pattern is not JSON", path=args.access_pattern) from None
            paths = prefetch_list(source, pattern)
        else:
            from nydusd.converter.workload import WorkloadOptions, record_workload

            recording = record_workload(source, WorkloadOptions(
                command=args.workload, work_dir=Path(args.work_dir), timeout=args.workload_timeout,
                nydusd=args.nydusd, runc=args.runc, backend_type=args.source_backend_type,
                backend_config=_backend_config_text(args.source_backend_config,
                                                    args.source_backend_config_file)))
            paths = recording.paths
            ended = ("stopped at the timeout" if recording.exit_code is None
                     else f"exit status {recording.exit_code}")
            print(f"workload read {len(paths)} files in {recording.seconds:.2f} s ({ended})")
        if args.output_prefetch_files:
            Path(args.output_prefetch_files).write_text("".join(f"{p}\n" for p in paths))
        result = Optimizer(source, target, paths).optimize()
    print(f"optimized {args.source} -> {result.target} ({result.digest}, "
          f"{result.prefetch_files} prefetch files)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nydusify", description="Convert, check and mount nydus images")
    parser.add_argument("-v", "--version", action=VersionAction, help="print version information")
    parser.add_argument("-D", "--debug", action="store_true", default=bool(os.environ.get("DEBUG_LOG_LEVEL")),
                        help="debug logging (also with DEBUG_LOG_LEVEL set)")
    parser.add_argument("-l", "--log-level", default="info", help="trace, debug, info, warn, error")
    parser.add_argument("--log-file", help="append logs to this file instead of stderr")
    parser.add_argument("--log-format", choices=("json", "console", "text"),
                        help="json, console or text (upstream's '[time] LEVEL message' lines); default: "
                        "$NYDUS_LOG_FORMAT, else console on a terminal, json otherwise")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_convert(sub)
    _add_check(sub)
    _add_mount(sub)
    _add_copy(sub)
    _add_optimize(sub)
    return parser


def _backend_config_text(inline: str | None, path: str | None) -> str:
    if path:
        try:
            return Path(path).read_text()
        except OSError as e:
            raise InvalidArgument(f"cannot read backend config file: {e.strerror}", path=path) from None
    return inline or ""


def _prefetch(args: argparse.Namespace) -> tuple[str, ...]:
    if args.prefetch_patterns:
        lines = sys.stdin.read().splitlines()
    elif args.prefetch_dir:
        lines = [args.prefetch_dir]
    else:
        lines = ["/"]
    from nydusd.builder.options import parse_prefetch_patterns

    return parse_prefetch_patterns(lines) or ("/",)


def cmd_convert(args: argparse.Namespace) -> int:
    from nydusd.cli.progress import TerminalDisplay, wants_display
    from nydusd.converter.convert import Converter, ConvertOptions
    from nydusd.converter.progress import Progress
    from nydusd.converter.remote import Remote, open_remote
    from nydusd.converter.stores import create_store
    from nydusd.oci.reference import parse_reference

    if args.batch_size:
        raise InvalidArgument("--batch-size is not supported by this builder", field="batch-size")
    target_text = args.target
    if target_text is None:
        src = parse_reference(args.source)
        target_text = str(src.with_tag((src.tag or "latest") + args.target_suffix))
    parse_reference(target_text)  # a bad target must fail before anything is pulled
    store = None
    if args.backend_type:
        store = create_store(args.backend_type, _backend_config_text(args.backend_config,
                                                                     args.backend_config_file),
                             force=args.backend_force_push)
    opts = ConvertOptions(
        work_dir=Path(args.work_dir), fs_version=args.fs_version, compressor=args.compressor,
        chunk_size=args.chunk_size, aligned_chunk=args.aligned_chunk, prefetch_patterns=_prefetch(args),
        chunk_dict=args.chunk_dict, oci=args.oci, with_referrer=args.with_referrer,
        platform=args.platform, all_platforms=args.all_platforms, merge_platform=args.merge_platform,
        push_retry_count=args.push_retry_count, push_retry_delay=args.push_retry_delay, blob_store=store)
    env = dict(os.environ)
    with contextlib.ExitStack() as stack:
        if store is not None:
            stack.callback(store.close)
        # Both registries are checked (the target for push access) before anything is pulled.
        source = open_remote(args.source, insecure=args.source_insecure, plain_http=args.plain_http, env=env,
                             insecure_flag="--source-insecure")
        stack.callback(source.close)
        target = open_remote(target_text, insecure=args.target_insecure, plain_http=args.plain_http, env=env,
                             insecure_flag="--target-insecure", push=True)
        stack.callback(target.close)
        # On a terminal: one display, bars at the bottom and the log lines above them.
        display = stack.enter_context(TerminalDisplay()) if wants_display(args.progress) else None

        def factory(ref: str) -> Remote:
            return open_remote(ref, insecure=args.chunk_dict_insecure, plain_http=args.plain_http, env=env,
                               insecure_flag="--chunk-dict-insecure")

        result = Converter(source, target, opts, progress=Progress(display), remote_factory=factory).convert()
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(result.metrics.to_json(), indent=2) + "\n")
    print(f"converted {args.source} -> {result.target} ({result.digest})")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from nydusd.converter.check import Checker, CheckOptions
    from nydusd.converter.remote import open_remote

    env = dict(os.environ)
    store_cfg = None
    if args.target_backend_type:
        store_cfg = (args.target_backend_type, _backend_config_text(args.target_backend_config,
                                                                    args.target_backend_config_file))
    opts = CheckOptions(work_dir=Path(args.work_dir), platform=args.platform,
                        multi_platform=args.multi_platform, backend=store_cfg, nydusd=args.nydusd)
    target = open_remote(args.target, insecure=args.target_insecure, plain_http=args.plain_http, env=env,
                         insecure_flag="--target-insecure")
    source = None
    try:
        if args.source:
            source = open_remote(args.source, insecure=args.source_insecure, plain_http=args.plain_http,
                                 env=env, insecure_flag="--source-insecure")
        report = Checker(target, source, opts).check()
    finally:
        target.close()
        if source is not None:
            source.close()
    for line in report.problems:
        print(line)
    if report.problems:
        print(f"check failed: {len(report.problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"check passed: {report.summary}")
    return 0


def cmd_mount(args: argparse.Namespace) -> int:
    from nydusd.converter.mount import MountOptions, mount_image
    from nydusd.converter.remote import open_remote

    env = dict(os.environ)
    opts = MountOptions(mount_path=Path(args.mount_path), work_dir=Path(args.work_dir),
                        nydusd=args.nydusd, platform=args.platform, prefetch=args.prefetch,
                        backend_type=args.backend_type,
                        backend_config=_backend_config_text(args.backend_config, args.backend_config_file))
    target = open_remote(args.target, insecure=args.target_insecure, plain_http=args.plain_http, env=env,
                         insecure_flag="--target-insecure")
    try:
        return mount_image(target, opts)
    finally:
        target.close()


def cmd_copy(args: argparse.Namespace) -> int:
    from nydusd.converter.copy import CopyOptions, Endpoint, copy_image, is_local, local_layout
    from nydusd.converter.remote import open_remote
    from nydusd.converter.stores import create_store
    from nydusd.oci.reference import parse_reference

    if is_local(args.source) and is_local(args.target):
        raise InvalidArgument("one of --source and --target must be a registry image")
    env = dict(os.environ)
    work = Path(args.work_dir)
    source: Endpoint
    target: Endpoint
    with contextlib.ExitStack() as stack:
        store = None
        if args.source_backend_type:
            store = create_store(args.source_backend_type, _backend_config_text(
                args.source_backend_config, args.source_backend_config_file))
            stack.callback(store.close)
        opts = CopyOptions(platform=args.platform, all_platforms=args.all_platforms, work_dir=work,
                           source_store=store)
        if is_local(args.source):
            tag = parse_reference(args.target).tag
            source = stack.enter_context(local_layout(args.source, tag=tag, work_dir=work, write=False))
        else:
            source = src = open_remote(args.source, insecure=args.source_insecure, plain_http=args.plain_http,
                                       env=env, insecure_flag="--source-insecure")
            stack.callback(src.close)
        if is_local(args.target):
            tag = parse_reference(args.source).tag or "latest"
            target = stack.enter_context(local_layout(args.target, tag=tag, work_dir=work, write=True))
        else:
            target = dst = open_remote(args.target, insecure=args.target_insecure, plain_http=args.plain_http,
                                       env=env, insecure_flag="--target-insecure", push=True)
            stack.callback(dst.close)
        result = copy_image(source, target, opts)
    print(f"copied {args.source} -> {args.target} ({result.digest}): {result.blobs_copied} blob(s) "
          f"copied ({result.bytes_copied} bytes), {result.blobs_present} already there")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        configure_logging("debug" if args.debug else args.log_level, args.log_file, fmt=args.log_format)
        return int(args.func(args))
    except NydusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
