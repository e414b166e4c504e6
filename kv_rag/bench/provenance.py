"""Where a benchmark result comes from: the code's commit, the machine, the versions, the command.

Every benchmark script (and ``kv-rag bench``) stores :func:`provenance` in its JSON under
``"provenance"``, so that a result file says by itself which code made it, on what, and how.
:func:`results_dir` is where a run writes when it is not told where: under ``$KV_RAG_HOME``, never
into the checkout.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..defaults import home

#: The folder holding the ``kv_rag`` package (the checkout's root when run from a git checkout).
PACKAGE_ROOT = Path(__file__).resolve().parents[2]


def _git(*args: str) -> str | None:
    try:
        proc = subprocess.run(
            ["git", "-C", str(PACKAGE_ROOT), *args], capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def code_version() -> dict[str, Any]:
    """``{"commit", "dirty"}`` of the git checkout the running ``kv_rag`` package comes from.

    ``commit`` is ``git rev-parse HEAD`` there and ``dirty`` whether tracked files differ from it;
    ``"unknown"`` and ``None`` when the package is not in a git checkout (an installed wheel, say,
    or a folder inside someone else's repository).
    """
    top = _git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != PACKAGE_ROOT:
        return {"commit": "unknown", "dirty": None}
    commit = _git("rev-parse", "HEAD") or "unknown"
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def machine() -> dict[str, Any]:
    """Platform, CPU model, cores, RAM (GB) and the CUDA device's name (``None`` without CUDA)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gb: float | None = None
    with contextlib.suppress(AttributeError, OSError, ValueError):
        ram_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1)
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name()
    except Exception:  # a broken CUDA set-up must not stop the record
        gpu = None
    return {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(), "ram_gb": ram_gb, "gpu": gpu}


def versions() -> dict[str, str | None]:
    """Python, torch, transformers and kv-rag versions (``None`` for one that is not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "transformers", "kv_rag"):
        try:
            out[name] = str(__import__(name).__version__)
        except Exception:
            out[name] = None
    return out


def command_line(argv: Sequence[str] | None = None) -> str:
    """``argv`` (default: this process's ``sys.argv``) as one shell line, ``python`` before a script."""
    args = list(sys.argv if argv is None else argv)
    if not args:
        return ""
    head = args[0]
    if head.endswith(".py"):
        return "python " + shlex.join(args)
    return shlex.join([Path(head).name, *args[1:]])


def provenance(command: str | Sequence[str] | None = None) -> dict[str, Any]:
    """The record every benchmark result carries under ``"provenance"``.

    ``commit``/``dirty`` (:func:`code_version`), ``date_utc`` (ISO 8601, seconds), ``machine``
    (:func:`machine`), ``versions`` (:func:`versions`), ``load_1min`` (the 1-minute load average,
    ``None`` where there is none) and ``command`` (a string, an argv list, or ``None`` for this
    process's command line). Cheap (two ``git`` calls); safe to call from any benchmark.
    """
    try:
        load: float | None = round(os.getloadavg()[0], 3)
    except (AttributeError, OSError):
        load = None
    cmd = command if isinstance(command, str) else command_line(command)
    return {
        **code_version(),
        "date_utc": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        "machine": machine(),
        "versions": versions(),
        "load_1min": load,
        "command": cmd,
        "recorded": "at run time",
    }


def results_dir(study: str, *, stamp: bool = False) -> Path:
    """Default output folder of benchmark ``study``: ``$KV_RAG_HOME/bench/<study>`` (plus a UTC
    date-time folder with ``stamp``), so that a run never writes into the checkout unless told to."""
    base = home() / "bench" / study
    if stamp:
        base = base / datetime.now(timezone.utc).strftime("%Y-%m-%dT%H%M%SZ")
    return base
