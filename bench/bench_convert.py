"""Benchmark: `nydusify convert` of a ~110 MB 3-layer image between two repos of one local
docker-registry, against the baseline a lazy-loading system competes with -- `skopeo copy` of the
source to an OCI layout plus `umoci unpack` -- measured in the same run.

The image is generated with the shape of a debootstrap-based one (rigs.md): layer 1 a "minbase"
rootfs (thousands of small text-like files, some shared libraries and binaries, a few large files),
layer 2 "+python3" (many small .py files and a few .so), layer 3 removes the docs (whiteouts) and
touches a few config files. Content is seeded-random, with compressibility close to real files.

    .venv/bin/python bench/bench_convert.py [--quick] [--runs N] [--scale F]

Prints a table of medians: wall time, bytes pulled and pushed, target size vs source size, and the
ratio of the conversion time to pull+unpack (goal: <= 3x).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.harness.oci_images import run, tool_env  # noqa: E402
from tests.harness.oci_registry import Registry  # noqa: E402

WORDS = tuple("""
the of and to in is for on with as by at from or an be this that are not lib usr share
config value option default error return static int char void struct include define if
else while for case break package version license copyright debian gnu linux module
""".split())  # noqa: SIM905 - a word list reads better as text


class Content:
    """Seeded file contents: a text corpus (compresses ~3-4x) and random bytes (incompressible)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        words = [self.rng.choice(WORDS) + ("\n" if self.rng.random() < 0.08 else " ")
                 for _ in range(400_000)]
        self.corpus = "".join(words).encode()

    def text(self, size: int) -> bytes:
        start = self.rng.randrange(0, len(self.corpus) - min(size, len(self.corpus) - 1))
        out = self.corpus[start:start + size]
        while len(out) < size:
            out += self.corpus[: size - len(out)]
        return out

    def binary(self, size: int) -> bytes:
        # machine code compresses ~2x: interleave random bytes with text-like/zero runs
        parts = []
        while sum(map(len, parts)) < size:
            parts.append(self.rng.randbytes(4096))
            parts.append(self.text(2048) if self.rng.random() < 0.5 else b"\0" * 2048)
        return b"".join(parts)[:size]


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)


def layer_base(rootfs: Path, c: Content, scale: float) -> None:
    rng = c.rng
    for i in range(int(3000 * scale)):  # /usr/share/doc, /usr/share/man, /etc ... small text files
        top = rng.choice(["usr/share/doc", "usr/share/man/man1", "usr/share/locale", "etc",
                          "usr/share/common-licenses", "var/lib/dpkg/info"])
        _write(rootfs / top / f"pkg{i % 300}" / f"file{i}.txt", c.text(int(rng.lognormvariate(7.5, 1.2)) + 1))
    for i in range(int(400 * scale)):  # shared libraries and binaries
        top = rng.choice(["usr/lib/x86_64-linux-gnu", "usr/bin", "usr/sbin", "usr/lib"])
        _write(rootfs / top / f"bin{i}", c.binary(int(rng.lognormvariate(10.5, 1.0)) + 1), 0o755)
    for i in range(3):
        _write(rootfs / f"usr/lib/big{i}.so", c.binary(int(6_000_000 * scale)), 0o755)
    for i in range(int(200 * scale)):
        os.symlink(f"bin{i}", rootfs / f"usr/bin/alias{i}")


def layer_python(rootfs: Path, c: Content, scale: float) -> None:
    rng = c.rng
    for i in range(int(1500 * scale)):
        _write(rootfs / "usr/lib/python3.11" / f"pkg{i % 120}" / f"mod{i}.py",
               c.text(int(rng.lognormvariate(8.5, 1.0)) + 1))
    for i in range(int(60 * scale)):
        _write(rootfs / "usr/lib/python3.11/lib-dynload" / f"ext{i}.so",
               c.binary(int(rng.lognormvariate(11.5, 0.8))), 0o755)
    _write(rootfs / "usr/bin/python3.11", c.binary(int(6_000_000 * scale)), 0o755)


def layer_cleanup(rootfs: Path, c: Content) -> None:
    shutil.rmtree(rootfs / "usr/share/doc")
    shutil.rmtree(rootfs / "usr/share/man")
    _write(rootfs / "etc/hostname", b"bench\n")
    _write(rootfs / "etc/motd", c.text(2000))


def build_image(tmp: Path, scale: float) -> tuple[Path, int, int, int]:
    layout, bundle = tmp / "oci", tmp / "bundle"
    env = tool_env(tmp)
    c = Content(42)
    run(["umoci", "init", "--layout", str(layout)], env)
    run(["umoci", "new", "--image", f"{layout}:v1"], env)
    run(["umoci", "unpack", "--image", f"{layout}:v1", str(bundle)], env)
    for step in (lambda r: layer_base(r, c, scale), lambda r: layer_python(r, c, scale),
                 lambda r: layer_cleanup(r, c)):
        step(bundle / "rootfs")
        run(["umoci", "repack", "--refresh-bundle", "--image", f"{layout}:v1", str(bundle)], env)
    entries = sum(len(d) + len(f) for _, d, f in os.walk(bundle / "rootfs"))
    usize = sum(os.lstat(os.path.join(p, f)).st_size for p, _, fs in os.walk(bundle / "rootfs") for f in fs)
    shutil.rmtree(bundle)
    index = json.loads((layout / "index.json").read_text())
    mdigest = index["manifests"][0]["digest"].split(":")[1]
    manifest = json.loads((layout / "blobs/sha256" / mdigest).read_text())
    size = sum(layer["size"] for layer in manifest["layers"])
    return layout, size, entries, usize


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    run(cmd, env)
    return time.perf_counter() - t0


def baseline(tmp: Path, host: str, i: int) -> float:
    env = tool_env(tmp)
    dest = tmp / f"pull{i}"
    t = timed(["skopeo", "--tmpdir", str(tmp / "home/run"), "copy", "--src-tls-verify=false",
               f"docker://{host}/src/bench:v1", f"oci:{dest}:v1"], env)
    t += timed(["umoci", "unpack", "--image", f"{dest}:v1", str(tmp / f"unpack{i}")], env)
    shutil.rmtree(dest)
    shutil.rmtree(tmp / f"unpack{i}")
    return t


def convert(tmp: Path, host: str, i: int) -> tuple[float, dict[str, int]]:
    out = tmp / f"metrics{i}.json"
    cmd = [sys.executable, "-m", "nydusd.cli.convert", "--log-level", "warn", "convert",
           "--source", f"{host}/src/bench:v1", "--target", f"{host}/dst{i}/bench:nydus", "--plain-http",
           "--work-dir", str(tmp / f"work{i}"), "--output-json", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"convert failed: {proc.stderr[-2000:]}")
    shutil.rmtree(tmp / f"work{i}", ignore_errors=True)
    return elapsed, json.loads(out.read_text())


def mib(n: float) -> str:
    return f"{n / 1048576:.1f} MiB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller image, one measured run")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--scale", type=float, default=2.3, help="2.3 gives ~110 MB compressed")
    args = ap.parse_args()
    scale = 0.3 if args.quick else args.scale
    runs = 1 if args.quick else args.runs
    tmp = Path(tempfile.mkdtemp(prefix="bench-convert-"))
    try:
        t0 = time.perf_counter()
        layout, src_size, entries, usize = build_image(tmp, scale)
        print(f"image: 3 layers, {entries} entries, rootfs {mib(usize)}, {mib(src_size)} compressed "
              f"(generated in {time.perf_counter() - t0:.1f}s)")
        with Registry(tmp / "registry") as reg:
            env = tool_env(tmp)
            run(["skopeo", "--tmpdir", str(tmp / "home/run"), "copy", "--dest-tls-verify=false",
                 f"oci:{layout}:v1", f"docker://{reg.host}/src/bench:v1"], env)
            baseline(tmp, reg.host, 0)  # warm-up (page cache, registry)
            convert(tmp, reg.host, 0)
            base_t, conv_t, metrics = [], [], []
            for i in range(1, runs + 1):
                base_t.append(baseline(tmp, reg.host, i))
                t, m = convert(tmp, reg.host, i)
                conv_t.append(t)
                metrics.append(m)
        report(src_size, base_t, conv_t, metrics)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def report(src_size: int, base_t: list[float], conv_t: list[float], metrics: list[dict[str, int]]) -> None:
    b, c = statistics.median(base_t), statistics.median(conv_t)
    last = metrics[-1]
    rows = [
        ("skopeo copy + umoci unpack (baseline)", f"{b:.2f}s", mib(src_size), "-", "-", "1.00x"),
        ("nydusify convert", f"{c:.2f}s", mib(last["BytesPulled"]), mib(last["BytesPushed"]),
         f"{last['TargetImageSize'] / max(1, last['SourceImageSize']):.2f}", f"{c / b:.2f}x"),
    ]
    head = ("operation", "time (median)", "pulled", "pushed", "target/source size", "vs baseline")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)))
    def med(key: str) -> float:
        return statistics.median(m[key] for m in metrics) / 1e9

    print(f"convert phases (median): pull {med('SourcePullElapsed'):.2f}s, "
          f"build {med('ConversionElapsed'):.2f}s, push {med('TargetPushElapsed'):.2f}s; "
          f"runs: baseline {[round(x, 2) for x in base_t]}, convert {[round(x, 2) for x in conv_t]}")
    verdict = "OK" if c <= 3 * b else "SLOWER THAN GOAL"
    print(f"goal: conversion <= 3x pull+unpack -> {c / b:.2f}x {verdict}")


if __name__ == "__main__":
    sys.exit(main())
