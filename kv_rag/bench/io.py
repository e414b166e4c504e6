"""Disk helpers for the benchmark: evict a file from the page cache, check residency, time ``dd``."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path


def fadvise_dontneed(path: Path | None) -> bool:
    """``posix_fadvise(DONTNEED)`` on ``path`` (after fsync). True if the call succeeded."""
    if path is None or not hasattr(os, "posix_fadvise"):
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return True
    except OSError:
        return False


def drop_caches() -> bool:
    """``sync; echo 1 > /proc/sys/vm/drop_caches`` (the whole page cache; needs root). True if it worked."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return True
    except OSError:
        return False


def resident_bytes(path: Path | None) -> int | None:
    """Bytes of ``path`` in the page cache (``fincore``), or ``None`` when that cannot be told."""
    exe = shutil.which("fincore")
    if path is None or exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "--bytes", "--noheadings", "--output", "RES", str(path)],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        return int(out.split()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def evict(path: Path | None, method: str) -> tuple[bool, int | None]:
    """Evict ``path`` with ``method`` (``fadvise`` or ``drop_caches``): ``(call succeeded, bytes still resident)``."""
    ok = drop_caches() if method == "drop_caches" else fadvise_dontneed(path)
    return ok, resident_bytes(path)


def dd_read(path: Path, method: str = "fadvise") -> dict[str, float | bool | int | None]:
    """Evict ``path``, then read it with ``dd bs=4M`` to /dev/null: seconds and GB/s (dd's own figure)."""
    ok, resident = evict(path, method)
    size = path.stat().st_size
    t0 = time.perf_counter()
    proc = subprocess.run(
        ["dd", f"if={path}", "of=/dev/null", "bs=4M"], capture_output=True, text=True, timeout=120, check=False
    )
    wall = time.perf_counter() - t0
    m = re.search(r"copied, ([0-9.eE+-]+) s", proc.stderr)
    secs = float(m.group(1)) if m else wall
    return {
        "bytes": size,
        "seconds": secs,
        "gb_per_s": size / secs / 1e9 if secs > 0 else None,
        "evicted": ok,
        "resident_after_evict": resident,
    }
