"""A reader load for the failover tests, run as a subprocess: ``python -m tests.harness.reader
SPEC.json``. Spec: ``{"files": {path: sha256}, "threads": N, "stop": path, "progress": path}``.
Each thread reads every file again and again (whole file, 256 KiB reads, fresh open each time,
page cache dropped after each file so the reads reach nydusd), plus one file kept open for the whole
run (its handle outlives the daemon that opened it). Writes ``{"passes", "errors", "mismatches"}``
as JSON to stdout when the stop file appears; the progress file holds the number of full passes."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    files: dict[str, str] = spec["files"]
    lock = threading.Lock()
    result = {"passes": 0, "reads": 0, "errors": [], "mismatches": []}

    def read_whole(fd: int) -> str:
        h = hashlib.sha256()
        off = 0
        while True:
            data = os.pread(fd, 256 << 10, off)
            if not data:
                return h.hexdigest()
            h.update(data)
            off += len(data)

    def worker(n: int) -> None:
        names = sorted(files)
        keep = os.open(names[n % len(names)], os.O_RDONLY)
        try:
            while not os.path.exists(spec["stop"]):
                for path in names[n:] + names[:n]:
                    try:
                        fd = os.open(path, os.O_RDONLY)
                        try:
                            digest = read_whole(fd)
                            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                        finally:
                            os.close(fd)
                        kept = read_whole(keep)
                        os.posix_fadvise(keep, 0, 0, os.POSIX_FADV_DONTNEED)
                    except OSError as e:
                        with lock:
                            result["errors"].append(f"{path}: {e.errno} {e.strerror}")
                        continue
                    with lock:
                        result["reads"] += 2
                        if digest != files[path]:
                            result["mismatches"].append(path)
                        if kept != files[names[n % len(names)]]:
                            result["mismatches"].append("kept:" + names[n % len(names)])
                with lock:
                    result["passes"] += 1
                    with open(spec["progress"], "w") as f:
                        f.write(str(result["passes"]))
        finally:
            os.close(keep)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(spec["threads"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
