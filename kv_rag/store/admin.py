"""Managing a store: what it holds, how much, and removing entries (``kv-rag store`` and ``Store``'s methods).

Tiers that can list themselves have ``entries()`` (``(key, bytes, stored at or None)``) and ``clear()``;
a tier without them is skipped by listing and cleared key by key where it can say its keys.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

from ..errors import InputError


@dataclass(frozen=True)
class Entry:
    """One stored artifact: its tier, key, bytes, and when it was stored (Unix time; ``None``: not recorded)."""

    tier: str
    key: str
    nbytes: int
    stored_at: float | None
    pinned: bool = False


@dataclass(frozen=True)
class TierUsage:
    """One tier's entries and bytes, its byte limit (``None``: not kept by kv-rag) and where it lives."""

    tier: str
    entries: int
    nbytes: int
    limit: int | None
    where: str


def entries(tiers: list[Any]) -> list[Entry]:
    """Every entry of every tier that can list itself, newest first (unknown times last)."""
    out = []
    for t in tiers:
        if hasattr(t, "entries"):
            pins = _pins(t)
            out += [Entry(t.name, k, n, at, k in pins) for k, n, at in t.entries()]
    return sorted(out, key=lambda e: -(e.stored_at or 0.0))


def _pins(tier: Any) -> set[str]:
    return set(tier.pinned_keys()) if hasattr(tier, "pinned_keys") else set()


def pin(tiers: list[Any], key: str, on: bool = True) -> list[str]:
    """Pin ``key`` (``on=False``: unpin) in every tier that holds it and can pin; the names of those tiers."""
    return [t.name for t in tiers if hasattr(t, "pin") and t.pin(key, on)]


def usage(tiers: list[Any]) -> list[TierUsage]:
    """Entries and bytes per tier."""
    out = []
    for t in tiers:
        rows = t.entries() if hasattr(t, "entries") else []
        limit = getattr(t, "size_limit", None) if t.name == "disk" else getattr(t, "max_bytes", None)
        where = str(getattr(t, "directory", "") or getattr(t, "url", "") or "this process")
        out.append(TierUsage(t.name, len(rows), sum(n for _, n, _ in rows), limit, where))
    return out


def prune(tiers: list[Any], older_than_s: float) -> int:
    """Delete the entries stored more than ``older_than_s`` seconds ago (where the tier records when);
    returns how many."""
    if older_than_s < 0:
        raise InputError(f"older_than must be >= 0 seconds, got {older_than_s}")
    cutoff = time.time() - older_than_s
    gone = 0
    for t in tiers:
        if not hasattr(t, "entries"):
            continue
        pins = _pins(t)
        for key, _, at in t.entries():
            if at is not None and at <= cutoff and key not in pins:
                t.delete(key)
                gone += 1
    return gone


def clear(tiers: list[Any]) -> int:
    """Delete every entry of every tier; returns how many there were."""
    gone = 0
    for t in tiers:
        gone += len(t.entries()) if hasattr(t, "entries") else 0
        if hasattr(t, "clear"):
            t.clear()
    return gone


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw]?)")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """Seconds in ``"90"``, ``"30m"``, ``"12h"``, ``"7d"`` or ``"2w"``."""
    m = _DURATION.fullmatch(str(text).strip().lower())
    if m is None:
        raise InputError(f"--older-than takes a number with s, m, h, d or w (7d, 12h, 3600), got {text!r}")
    return float(m.group(1)) * _UNIT[m.group(2)]
