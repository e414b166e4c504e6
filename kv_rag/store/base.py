"""The tier interface: a small mapping from key to :class:`~kv_rag.artifact.Artifact`."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from ..artifact import Artifact


@runtime_checkable
class Tier(Protocol):
    """One storage tier. Implementations document their thread and process safety.

    ``get`` returns ``None`` on a miss and never raises for a damaged entry: it drops the entry,
    warns, and returns ``None``. ``put`` may silently skip an artifact it cannot hold. A tier may set
    ``lends_blocks = True`` when it keeps long artifacts in cache-shaped blocks that a request may
    use as its cache (:class:`~kv_rag.store.GpuTier`).
    """

    name: str

    def get(self, key: str) -> Artifact | None:
        """The artifact stored under ``key``, verified, or ``None``."""
        ...

    def put(self, key: str, artifact: Artifact) -> None:
        """Store ``artifact`` under ``key`` (replacing any entry)."""
        ...

    def delete(self, key: str) -> None:
        """Remove ``key`` if present."""
        ...

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` has an entry (without verifying it)."""
        ...
