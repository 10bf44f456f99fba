"""`make demo` end to end: it must build, mount, read lazily, report and clean up after itself."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.harness.daemon import ROOT

pytestmark = pytest.mark.fuse


def test_demo_runs_and_fetches_only_what_it_reads():
    with open("/proc/self/mounts") as f:
        before = f.read().count("nydus-demo-")
    r = subprocess.run([sys.executable, "-m", "nydusd.demo"], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "nydusd is RUNNING" in r.stdout and "/usr/lib/libbig.so  5242880 bytes" in r.stdout
    fetched = re.search(r"fetched from the backend: (\d+) of (\d+) blob bytes", r.stdout)
    assert fetched and 0 < int(fetched.group(1)) < int(fetched.group(2)) // 2
    assert "still mounted: False" in r.stdout
    with open("/proc/self/mounts") as f:
        assert f.read().count("nydus-demo-") == before
