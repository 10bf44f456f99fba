"""The llfuse session's SIGUSR1 handling outlives its loop.

``FuseSession.stop`` ends the loop from a helper thread that keeps sending SIGUSR1 to the workers
and the main thread until it sees the loop done; its last signal can land after ``run`` returned.
Regression: ``run`` restored SIGUSR1's default action on the way out, so that late signal killed
nydusd (exit by signal 10 instead of 0; seen in test_upstream_forms under load, with 132 workers
making each interrupt round longer).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import llfuse
from nydusd.fs import session

llfuse.main = lambda **kw: None  # a loop that ends at once, as after a stop
sess = session.FuseSession(None, {mnt!r})  # type: ignore[arg-type]
sess.run()
session._interrupt_fuse_threads()  # the stop thread's last round, after the loop is done
print("alive", flush=True)
"""


def test_a_late_stop_interrupt_does_not_kill_the_process(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-c", SCRIPT.format(mnt=str(tmp_path))], cwd=str(ROOT),
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, (res.returncode, res.stderr[-2000:])
    assert res.stdout.strip() == "alive"
