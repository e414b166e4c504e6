"""Artifact storage: a :class:`Store` of ordered :class:`Tier` objects (memory, disk)."""

from ._store import Hit, Store
from .base import Tier
from .disk import DiskTier
from .memory import MemoryTier
from .redis import RedisTier

__all__ = ["DiskTier", "Hit", "MemoryTier", "RedisTier", "Store", "Tier"]
