"""Tiers that keep artifacts where the model reads them: GPU memory, and pinned (page-locked) host memory.

Both are :class:`~kv_rag.store.memory.MemoryTier` (LRU by bytes, thread-safe, per process) that
move the tensors of every artifact they are given once, at ``put``:

* :class:`GpuTier` holds keys and values on the model's device, so a hit costs one
  device-to-device copy into the request's cache. Token ids stay on the host (the engine
  compares them with the request's ids without a device round trip).
* :class:`PinnedTier` holds them in page-locked host memory, so that the copy up to the GPU runs
  at the bus's full speed and asynchronously (``non_blocking``). Without CUDA, pinning is not
  possible and it keeps plain host tensors: the same tier, a plain memory tier.

Order them fastest first (``Store([GpuTier(), PinnedTier(), DiskTier(dir)])``): a hit in a
lower tier is copied up, and the copy the engine receives is the one in the top tier.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..artifact import Artifact
from ..defaults import GPU_TIER_BYTES, PINNED_TIER_BYTES
from .memory import MemoryTier


def _move(art: Artifact, convert: object) -> Artifact:
    fn = convert  # a callable Tensor -> Tensor
    keys = tuple(fn(k) for k in art.keys)  # type: ignore[operator]
    values = tuple(fn(v) for v in art.values)  # type: ignore[operator]
    return replace(art, keys=keys, values=values)


def pinning_available() -> bool:
    """Whether page-locked host memory can be allocated here (needs CUDA)."""
    return torch.cuda.is_available()


class GpuTier(MemoryTier):
    """Artifacts resident in GPU memory, least recently used evicted beyond ``max_bytes``.

    ``device`` defaults to ``cuda`` when present, else ``cpu`` (then it is a plain memory tier,
    which is how it is tested on machines without a GPU). Copies from pinned host tensors are
    asynchronous on the current stream, so later work on that stream sees them complete.
    """

    name = "gpu"

    def __init__(self, max_bytes: int = GPU_TIER_BYTES, device: str | torch.device | None = None) -> None:
        super().__init__(max_bytes)
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))

    def put(self, key: str, artifact: Artifact) -> None:
        """Keep a copy of ``artifact`` with its KV on :attr:`device` (no copy if it is there already)."""
        if artifact.nbytes > self.max_bytes:
            self.delete(key)
            return
        dev = self.device
        super().put(key, _move(artifact, lambda t: t.to(dev, non_blocking=True)))


class PinnedTier(MemoryTier):
    """Artifacts in page-locked host memory (plain host memory where CUDA is absent).

    ``pinned`` says which of the two this tier is. Tensors from the GPU are copied down with
    ``non_blocking`` and synchronized once per artifact; host tensors are copied into pinned
    memory once; tensors already pinned are kept as they are.
    """

    name = "pinned"

    def __init__(self, max_bytes: int = PINNED_TIER_BYTES, pin: bool | None = None) -> None:
        super().__init__(max_bytes)
        self.pinned = pinning_available() if pin is None else (pin and pinning_available())

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        if not self.pinned:
            return t.to("cpu")
        if t.device.type == "cpu":
            return t if t.is_pinned() else t.pin_memory()
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        out.copy_(t, non_blocking=True)
        return out

    def put(self, key: str, artifact: Artifact) -> None:
        """Keep a host (pinned when possible) copy of ``artifact``."""
        if artifact.nbytes > self.max_bytes:
            self.delete(key)
            return
        moved = _move(artifact, self._to_host)
        if self.pinned and any(t.device.type != "cpu" for t in artifact.keys):
            torch.cuda.synchronize()
        super().put(key, replace(moved, token_ids=moved.token_ids.to("cpu")))
