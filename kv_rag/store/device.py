"""Tiers that keep artifacts where the model reads them: GPU memory, and pinned (page-locked) host memory.

Both are :class:`~kv_rag.store.memory.MemoryTier` (LRU by bytes, thread-safe, per process) that
move the tensors of every artifact they are given once, at ``put``:

* :class:`GpuTier` holds keys and values on the model's device, so a hit costs one
  device-to-device copy into the request's cache. Long artifacts (``roomy_from`` tokens and more)
  put by the engine are kept inside a block laid out like a request's cache (``[layers, 1,
  kv_heads, rows, dim]``, the artifact at its own start row, room after it): a later hit of the
  chain that ends with such an artifact uses the block as the request's cache, without copying
  the KV at all (see :meth:`kv_rag.runtime.ModelRuntime.new_cache`). Copies up from pinned memory stay
  compact: one DMA is the fastest way up, and a strided destination would stage it. Token ids
  stay on the host (the engine compares them with the request's ids without a device round trip).
* :class:`PinnedTier` holds them in page-locked host memory, so that the copy up to the GPU runs
  at the bus's full speed and asynchronously (``non_blocking``). Without CUDA, pinning is not
  possible and it keeps plain host tensors: the same tier, a plain memory tier.

Order them fastest first (``Store([GpuTier(), PinnedTier(), DiskTier(dir)])``): a hit in a
lower tier is copied up, and the copy the engine receives is the one in the top tier.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from ..artifact import Artifact
from ..defaults import GPU_TIER_BYTES, GPU_TIER_LEAD, GPU_TIER_ROOM, GPU_TIER_ROOMY_FROM, PINNED_TIER_BYTES
from ..layout import roomy_block, same_device, stacked_view
from .memory import MemoryTier


def _move(art: Artifact, convert: object) -> Artifact:
    fn = convert  # a callable Tensor -> Tensor
    keys = tuple(fn(k) for k in art.keys)  # type: ignore[operator]
    values = tuple(fn(v) for v in art.values)  # type: ignore[operator]
    return replace(art, keys=keys, values=values)


def _stack_to(ts: tuple[torch.Tensor, ...], device: torch.device | None, pin: bool = False) -> tuple[torch.Tensor, ...]:
    """``ts`` on ``device`` (``None``: host, pinned if ``pin``) as views of one block ``[layers, ...]``.

    Later moves of the artifact are then one copy for all layers (one DMA, one strided copy into
    the static cache buffers) instead of one per layer.
    """
    if not ts or any(t.shape != ts[0].shape or t.dtype != ts[0].dtype for t in ts):
        return ts
    dev = device if device is not None else torch.device("cpu")
    block = torch.empty((len(ts), *ts[0].shape), dtype=ts[0].dtype, device=dev, pin_memory=pin)
    return _copy_layers(block, ts)


def _copy_layers(dst: torch.Tensor, ts: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Copy per-layer ``ts`` into ``dst`` (``[layers, ...]``): one copy when ``ts`` are equally spaced
    views of one storage, else one per layer. Returns ``dst``'s layers as views."""
    whole = stacked_view(ts)
    if whole is not None:
        dst.copy_(whole, non_blocking=True)
    else:
        for d, src in zip(dst.unbind(0), ts, strict=True):
            d.copy_(src, non_blocking=True)
    return tuple(dst.unbind(0))


def _roomy_to(ts: tuple[torch.Tensor, ...], device: torch.device, start: int, room: int) -> tuple[torch.Tensor, ...]:
    """``ts`` (per layer ``[kv_heads, n, dim]``) copied to rows ``start..start+n`` of a new block
    ``[layers, 1, kv_heads, start + n + room, dim]`` on ``device``; returned as views of it."""
    kv_heads, n, dim = ts[0].shape
    block = torch.empty((len(ts), 1, kv_heads, start + n + room, dim), dtype=ts[0].dtype, device=device)
    return _copy_layers(block[:, 0, :, start : start + n, :], ts)


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
    #: hits from this tier may lend their cache-shaped blocks to a request (see :class:`~kv_rag.store.Hit`)
    lends_blocks = True

    def __init__(
        self,
        max_bytes: int = GPU_TIER_BYTES,
        device: str | torch.device | None = None,
        *,
        roomy_from: int = GPU_TIER_ROOMY_FROM,
        room: int = GPU_TIER_ROOM,
        lead: int = GPU_TIER_LEAD,
    ) -> None:
        super().__init__(max_bytes)
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        #: artifacts of at least this many tokens (starting at most ``lead`` rows in) are kept roomy
        self.roomy_from = roomy_from
        #: rows of room after a roomy artifact
        self.room = room
        self.lead = lead

    def footprint(self, artifact: Artifact) -> int:
        """Bytes ``artifact`` holds here: its whole blocks when it lies in roomy blocks."""
        n = artifact.num_layers
        blocks = [roomy_block(t, n) for t in (artifact.keys[0], artifact.values[0])] if n else []
        if blocks and all(b is not None for b in blocks):
            return sum(b.numel() * b.element_size() for b in blocks if b is not None) + (
                artifact.token_ids.numel() * artifact.token_ids.element_size()
            )
        return artifact.nbytes

    def _roomy(self, artifact: Artifact) -> bool:
        ts = (*artifact.keys, *artifact.values)
        return (
            artifact.meta.num_tokens >= self.roomy_from
            # from pinned memory (a copy-up from the pinned tier) one DMA into a compact block is the
            # fastest way up: strided rows would cost a staged copy on the host-tier hit's path
            and not (ts and ts[0].device.type == "cpu" and ts[0].is_pinned())
            and 0 <= artifact.meta.start <= self.lead
            and bool(ts)
            and all(t.dim() == 3 and t.shape == ts[0].shape and t.dtype == ts[0].dtype for t in ts)
            and ts[0].shape[1] == artifact.meta.num_tokens
        )

    def put(self, key: str, artifact: Artifact) -> None:
        """Keep a copy of ``artifact`` with its KV on :attr:`device` (no copy if it is there already)."""
        if artifact.nbytes > self.max_bytes:
            self.delete(key)
            return
        dev = self.device
        if self._roomy(artifact):
            start, n, layers = artifact.meta.start, artifact.meta.num_tokens, artifact.num_layers
            kb, vb = roomy_block(artifact.keys[0], layers), roomy_block(artifact.values[0], layers)
            here = kb is not None and vb is not None and same_device(kb.device, dev)
            if here and kb is not None and kb.shape[3] >= start + n + self.room:
                super().put(key, artifact)  # already in roomy blocks here
                return
            keys = _roomy_to(artifact.keys, dev, start, self.room)
            values = _roomy_to(artifact.values, dev, start, self.room)
            super().put(key, replace(artifact, keys=keys, values=values))
            return
        keys, values = _stack_to(artifact.keys, dev), _stack_to(artifact.values, dev)
        if keys is artifact.keys or values is artifact.values:  # ragged: per tensor
            super().put(key, _move(artifact, lambda t: t.to(dev, non_blocking=True)))
            return
        super().put(key, replace(artifact, keys=keys, values=values))


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
        keys = _stack_to(artifact.keys, None, pin=self.pinned)
        values = _stack_to(artifact.values, None, pin=self.pinned)
        if keys is artifact.keys or values is artifact.values:  # ragged: per tensor
            moved = _move(artifact, self._to_host)
        else:
            moved = replace(artifact, keys=keys, values=values)
        if self.pinned and any(t.device.type != "cpu" for t in artifact.keys):
            torch.cuda.synchronize()
        super().put(key, replace(moved, token_ids=moved.token_ids.to("cpu")))
