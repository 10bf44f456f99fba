"""`nydusctl`: a command-line client of nydusd's admin API over its unix socket.

Owns: argument parsing and human-readable rendering (plain-text tables) for
``nydusctl -S SOCK [--raw] info | metrics [KIND] [--id ID] [-I N] | mount -b BOOT -c CFG -m MP |
umount -m MP | set log-level LEVEL`` (upstream nydusctl's commands and flags, spec §8.5, plus the
seed's ``mount -b``), and ``supervise`` (``cli/supervise.py``: restart a crashed nydusd and hand its
FUSE session over). It only talks HTTP through ``api.client`` (stdlib http.client over AF_UNIX).
Must not import: the daemon, fs, storage or rafs (it is a client); ``requests``.
Threading: single-threaded; ``metrics --interval`` polls until interrupted or ``--count`` rounds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from api.client import ApiClient, ApiError

FOPS = ("getattr", "readlink", "open", "release", "read", "statfs", "getxattr", "listxattr", "opendir",
        "lookup", "readdir", "readdirplus", "access", "forget", "batch_forget")
SIZES = ("<1K", "1K-4K", "4K-16K", "16K-64K", "64K-128K", "128K-512K", "512K-1M", ">=1M")
FS_LATENCY = ("<=200us", "<=1ms", "<=20ms", "<=50ms", "<=500ms", "<=1s", "<=2s", ">2s")
METRIC_KINDS = {"fsstats": "", "backend": "backend", "cache": "blobcache", "blobcache": "blobcache",
                "files": "files", "pattern": "pattern", "inflight": "inflight"}


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str] | None = None) -> str:
    """Plain-text table with left-aligned columns separated by two spaces."""
    cells = [[str(c) for c in r] for r in ([headers] if headers else []) + list(rows)]
    if not cells:
        return ""
    widths = [max(len(r[i]) for r in cells if i < len(r)) for i in range(max(map(len, cells)))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip() for r in cells]
    if headers:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def render_info(info: dict[str, Any]) -> str:
    version = info.get("version") or {}
    head = table([("State", info.get("state")), ("Version", version.get("package_ver", "")),
                  ("Git commit", version.get("git_commit", "")), ("ID", info.get("id") or "-"),
                  ("Supervisor", info.get("supervisor") or "-")])
    mounts = info.get("backend_collection") or {}
    if not mounts:
        return head + "\n\nNo filesystem mounted."
    rows = []
    for mp, inst in sorted(mounts.items()):
        cfg = inst.get("config") or {}
        backend = (cfg.get("backend") or {}).get("type", "-") if isinstance(cfg, dict) else "-"
        rows.append((mp, inst.get("backend_type", ""), backend, inst.get("mounted_time", "")))
    return head + "\n\n" + table(rows, ("MOUNTPOINT", "TYPE", "BACKEND", "MOUNTED"))


def _nonzero(names: Sequence[str], values: Sequence[int]) -> str:
    parts = [f"{n}={v}" for n, v in zip(names, values, strict=False) if v]
    return " ".join(parts) or "-"


def render_metrics(kind: str, m: Any) -> str:
    if kind == "":
        return table([("ID", m.get("id")), ("Data read", human_bytes(m.get("data_read", 0))),
                      ("Open files", m.get("nr_opens")),
                      ("FOP hits", _nonzero(FOPS, m.get("fop_hits", []))),
                      ("FOP errors", _nonzero(FOPS, m.get("fop_errors", []))),
                      ("Reads by size", _nonzero(SIZES, m.get("block_count_read", []))),
                      ("Latency", _nonzero(FS_LATENCY, m.get("read_latency_dist", [])))])
    if kind == "backend":
        return table([("Backend", m.get("backend_type")), ("Reads", m.get("read_count")),
                      ("Errors", m.get("read_errors")), ("Read", human_bytes(m.get("read_amount_total", 0))),
                      ("Latency total", f"{m.get('read_cumulative_latency_millis_total', 0)} ms")])
    if kind == "blobcache":
        return table([("Store", m.get("store_path")), ("Reads", m.get("total")),
                      ("Whole hits", m.get("whole_hits")), ("Partial hits", m.get("partial_hits")),
                      ("Ready chunks", m.get("entries_count")),
                      ("Prefetched", human_bytes(m.get("prefetch_data_amount", 0))),
                      ("All ready", m.get("data_all_ready")),
                      ("Cache files", ", ".join(m.get("underlying_files", [])) or "-")])
    if kind == "files":
        if isinstance(m, list):
            return table([(" ".join(map(str, run)),) for run in m], ("INODES READ",))
        return table([(ino, v.get("total_fops"), human_bytes(v.get("data_read", 0)))
                      for ino, v in sorted(m.items(), key=lambda kv: int(kv[0]))], ("INODE", "FOPS", "READ"))
    if kind == "pattern":
        return table([(p["ino"], p["nr_read"], p["first_access_time_secs"]) for p in m],
                     ("INODE", "READS", "FIRST ACCESS (s)"))
    if kind == "inflight":
        if not m:
            return "No request in flight."
        return table([(r["inode"], r["opcode"], r["unique"], r["timestamp_secs"]) for r in m],
                     ("INODE", "OPCODE", "UNIQUE", "SINCE (s)"))
    return json.dumps(m, indent=2)


#: metrics kinds kept per mount (``--id`` = mountpoint); the others are daemon-wide
PER_MOUNT_KINDS = ("", "backend", "blobcache", "files", "pattern")


def mount_ids(client: ApiClient) -> list[str]:
    """The mountpoints of the daemon's filesystems, sorted."""
    return sorted((client.info().get("backend_collection") or {}).keys())


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="nydusctl", description="Query and control nydusd over its API socket")
    p.add_argument("-S", "--sock", required=True, help="nydusd API unix socket")
    p.add_argument("-r", "--raw", action="store_true", help="print raw JSON")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="daemon state, version and mounts")
    m = sub.add_parser("metrics", help="filesystem / backend / cache metrics")
    m.add_argument("kind", nargs="?", default="fsstats", choices=sorted(METRIC_KINDS))
    m.add_argument("--id", help="mountpoint (or cache config id)")
    m.add_argument("-I", "--interval", type=float, help="repeat every N seconds")
    m.add_argument("--count", type=int, help="with --interval: stop after N rounds")
    mt = sub.add_parser("mount", help="mount a RAFS image at a path inside the daemon")
    mt.add_argument("-b", "-s", "--bootstrap", "--source", dest="source", required=True)
    mt.add_argument("-c", "--config", required=True, help="config file")
    mt.add_argument("-m", "--mountpoint", required=True)
    mt.add_argument("-t", "--type", default="rafs", dest="fs_type")
    um = sub.add_parser("umount", help="umount a filesystem")
    um.add_argument("-m", "--mountpoint", required=True)
    st = sub.add_parser("set", help="set a daemon option")
    st.add_argument("option", choices=["log-level"])
    st.add_argument("value")
    from nydusd.cli import supervise

    supervise.add_parser(sub)
    return p.parse_args(list(argv))


def run(args: argparse.Namespace, client: ApiClient, out: TextIO) -> int:
    """Execute one command; raises ApiError/OSError for the caller to report."""
    def emit(data: Any, text: str) -> None:
        out.write((json.dumps(data, indent=2) if args.raw else text) + "\n")

    if args.command == "info":
        info = client.info()
        emit(info, render_info(info))
    elif args.command == "metrics":
        kind = METRIC_KINDS[args.kind]
        rounds = 0
        while True:
            ids = [args.id] if args.id or kind not in PER_MOUNT_KINDS else mount_ids(client)
            if len(ids) <= 1:
                data = client.metrics(kind, args.id)
                emit(data, render_metrics(kind, data))
            else:
                # Several mounts and no --id: nydusd has no global counters then; show each mount.
                per = {mp: client.metrics(kind, mp) for mp in ids}
                emit(per, "\n\n".join(f"== {mp} ==\n{render_metrics(kind, m)}" for mp, m in per.items()))
            rounds += 1
            if not args.interval or (args.count and rounds >= args.count):
                break
            out.flush()
            time.sleep(args.interval)
    elif args.command == "mount":
        try:
            config = Path(args.config).read_text()
        except OSError as e:
            print(f"nydusctl: cannot read config file {args.config}: {e.strerror}", file=sys.stderr)
            return 1
        client.mount(args.mountpoint, args.source, config, fs_type=args.fs_type)
        out.write(f"Mounted {args.source} at {args.mountpoint}\n")
    elif args.command == "umount":
        client.umount(args.mountpoint)
        out.write(f"Unmounted {args.mountpoint}\n")
    elif args.command == "set":
        client.call("PUT", "/api/v1/daemon", {"log_level": args.value})
        out.write(f"log level set to {args.value}\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "supervise":
        from nydusd.cli import supervise

        return supervise.run(args)
    try:
        with ApiClient(args.sock) as client:
            return run(args, client, sys.stdout)
    except ApiError as e:
        print(f"nydusctl: {args.command} failed: {e.api_message} (HTTP {e.status})", file=sys.stderr)
        if args.command == "metrics" and e.status == 404:
            print(f"nydusctl: no metrics under {'id ' + repr(args.id) if args.id else 'this id'}; "
                  "pass --id <mountpoint> of a mounted filesystem (see `nydusctl info`)", file=sys.stderr)
    except OSError as e:
        print(f"nydusctl: cannot talk to nydusd at {args.sock}: {e.strerror or e}", file=sys.stderr)
    except KeyboardInterrupt:
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
