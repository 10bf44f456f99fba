"""Run a command with its stderr (and stdout) on a pseudo-terminal of a given size, as a person at a
terminal would: tools that draw progress bars only on a TTY draw them here."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import termios
import time
from pathlib import Path


def run_on_pty(argv: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None,
               rows: int = 40, cols: int = 120, timeout: float = 120) -> tuple[int, str]:
    """(exit status, everything written to the terminal, ``\\r\\n`` kept as written)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, cwd=cwd,
                            env={**os.environ, **(env or {})}, close_fds=True)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not data:
                break
            chunks.append(data)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{argv[0]} still running after {timeout}s")
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return code, b"".join(chunks).decode("utf-8", "replace")
