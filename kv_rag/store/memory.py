"""In-process tier: artifacts kept as tensors, least recently used evicted beyond a byte bound."""

from __future__ import annotations

import threading
from collections import OrderedDict

from ..artifact import Artifact
from ..defaults import MEMORY_TIER_BYTES
from . import gone


class MemoryTier:
    """LRU by bytes. Thread-safe (one lock); per process (not shared across processes or forks).

    An artifact larger than ``max_bytes`` is not kept. ``nbytes`` never exceeds ``max_bytes``.
    """

    name = "memory"

    def __init__(self, max_bytes: int = MEMORY_TIER_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, Artifact] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._pinned: set[str] = set()

    @property
    def nbytes(self) -> int:
        """Bytes currently held."""
        return self._bytes

    def footprint(self, artifact: Artifact) -> int:
        """Bytes ``artifact`` takes in this tier (its tensors' bytes here)."""
        return artifact.nbytes

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> Artifact | None:
        """The artifact under ``key`` (marked most recently used), or ``None``."""
        with self._lock:
            art = self._items.get(key)
            if art is not None:
                self._items.move_to_end(key)
            return art

    def put(self, key: str, artifact: Artifact) -> None:
        """Keep ``artifact``, evicting least recently used entries to stay within ``max_bytes``."""
        size = self.footprint(artifact)
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= self.footprint(old)
            if size > self.max_bytes:
                return
            while self._bytes + size > self.max_bytes:
                old_key = next((k for k in self._items if k not in self._pinned), None)
                if old_key is None:  # only pinned entries left: this one is not kept
                    return
                evicted = self._items.pop(old_key)
                self._bytes -= self.footprint(evicted)
                gone.record(old_key, "evicted")
            self._items[key] = artifact
            self._bytes += size

    def pin(self, key: str, on: bool = True) -> bool:
        """Keep ``key`` from eviction (``on=False``: let it go again); ``False`` when not held here.
        In this process only."""
        with self._lock:
            if key not in self._items:
                return False
            (self._pinned.add if on else self._pinned.discard)(key)
            return True

    def pinned_keys(self) -> set[str]:
        """The pinned keys."""
        with self._lock:
            return set(self._pinned)

    def delete(self, key: str) -> None:
        """Drop ``key`` if present."""
        with self._lock:
            self._pinned.discard(key)
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= self.footprint(old)

    def entries(self) -> list[tuple[str, int, float | None]]:
        """``(key, bytes, stored at)`` of every entry (no store time is kept here: ``None``)."""
        with self._lock:
            return [(k, self.footprint(a), None) for k, a in self._items.items()]

    def clear(self) -> None:
        """Drop everything."""
        with self._lock:
            self._items.clear()
            self._pinned.clear()
            self._bytes = 0

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._items
