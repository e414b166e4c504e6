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

from collections.abc import Sequence
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


def stacked_view(ts: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """``torch.stack(ts)`` as a view, when ``ts`` are equally spaced views of one storage (else ``None``)."""
    first = ts[0]
    if len(ts) < 2:
        return first.unsqueeze(0)
    size = first.element_size()
    step, rem = divmod(ts[1].data_ptr() - first.data_ptr(), size)
    if rem or step <= 0 or first.untyped_storage().data_ptr() != ts[-1].untyped_storage().data_ptr():
        return None
    base = first.data_ptr()
    for i, t in enumerate(ts):
        if t.shape != first.shape or t.stride() != first.stride() or t.data_ptr() != base + i * step * size:
            return None
    return first.as_strided((len(ts), *first.shape), (step, *first.stride()))


def _stack_to(ts: tuple[torch.Tensor, ...], device: torch.device | None, pin: bool = False) -> tuple[torch.Tensor, ...]:
    """``ts`` on ``device`` (``None``: host, pinned if ``pin``) as views of one block ``[layers, ...]``.

    Later moves of the artifact are then one copy for all layers (one DMA, one strided copy into
    the static cache buffers) instead of one per layer.
    """
    if not ts or any(t.shape != ts[0].shape or t.dtype != ts[0].dtype for t in ts):
        return ts
    dev = device if device is not None else torch.device("cpu")
    block = torch.empty((len(ts), *ts[0].shape), dtype=ts[0].dtype, device=dev, pin_memory=pin)
    whole = stacked_view(ts)
    if whole is not None:
        block.copy_(whole, non_blocking=True)
    else:
        for dst, src in zip(block.unbind(0), ts, strict=True):
            dst.copy_(src, non_blocking=True)
    return tuple(block.unbind(0))


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
