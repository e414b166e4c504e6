"""Artifact storage: a :class:`Store` of ordered :class:`Tier` objects (GPU, pinned host memory, memory, disk)."""

from ._store import Hit, Store
from .base import Tier
from .device import GpuTier, PinnedTier
from .disk import DiskTier
from .memory import MemoryTier
from .redis import RedisTier

__all__ = ["DiskTier", "GpuTier", "Hit", "MemoryTier", "PinnedTier", "RedisTier", "Store", "Tier"]
