"""The storage value types (``storage.chunk``) load without the runtime stack: rafs and the builder
use them without pulling in caches, backends or the device. (Import cycles between any modules are
checked for the whole tree in tests/test_architecture.py.)"""

from __future__ import annotations

import subprocess
import sys


def test_value_types_load_without_the_runtime_storage_stack() -> None:
    code = ("import sys; import nydusd.storage.chunk, nydusd.rafs, nydusd.builder.tree; "
            "print(sorted(m for m in sys.modules if m.startswith('nydusd.storage')))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "['nydusd.storage', 'nydusd.storage.chunk']", out.stdout
