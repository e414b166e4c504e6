"""kv-rag's KV cache: transformers' ``DynamicCache`` of layers that write into preallocated buffers.

Kept to transformers' public cache API (``DynamicCache``, ``update``, ``layers[i].keys/.values``) so
that it runs on transformers 5.17 (the GPU machine) and on the newest 5.x. :class:`PreallocatedLayer`
is named, as transformers names its layers, by how it allocates: once, with room to grow in place.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ..layout import same_device, stacked_view


class KVCache(DynamicCache):
    """A ``DynamicCache`` of :class:`PreallocatedLayer`; ``slot`` is the static-pool slot whose buffers
    it uses while it lives (see :mod:`kv_rag.runtime.pool`), or ``None``."""

    def __init__(self) -> None:
        super().__init__()
        self.slot: Any = None


class PreallocatedLayer(DynamicLayer):
    """A cache layer that writes into a buffer with spare room instead of concatenating.

    transformers' ``DynamicLayer`` concatenates on every update, copying the whole cache for each
    prefill chunk and each decoded token. This layer copies the loaded KV once into a buffer sized
    for the prompt and the answer, then appends in place (doubling when full); ``keys``/``values``
    are views of the filled part, made when first read after a change (a batched step moves the
    length of every layer of every request: slicing them all each step would cost more host time
    than the step's launch).
    """

    def __init__(self, capacity: int, buffers: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        self.key_buffer: torch.Tensor | None = None
        self.value_buffer: torch.Tensor | None = None
        self._views: tuple[torch.Tensor, torch.Tensor] | None = None
        self._unbuffered: list[torch.Tensor | None] = [None, None]
        super().__init__()
        self.capacity = max(1, capacity)
        self.length = 0
        #: rows below this belong to someone else (a GPU-tier block lent to this cache): they are
        #: copied into buffers of the layer's own before anything could write below it
        self._lent_rows = 0
        if buffers is not None:  # given buffers (static ones for whole-step CUDA graphs): used until full
            self.key_buffer, self.value_buffer = buffers
            self.is_initialized = True
            self.device = self.key_buffer.device
            self.dtype = self.key_buffer.dtype

    def _filled(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        views = self._views
        if views is None and self.key_buffer is not None and self.value_buffer is not None:
            n = self.length
            views = self._views = (self.key_buffer[..., :n, :], self.value_buffer[..., :n, :])
        return views

    @property
    def keys(self) -> torch.Tensor | None:
        """The cached keys ``[batch, kv_heads, length, dim]`` (a view of the buffer), ``None`` before any."""
        views = self._filled()
        return views[0] if views is not None else self._unbuffered[0]

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        self._set(0, value)

    @property
    def values(self) -> torch.Tensor | None:
        """The cached values, like :attr:`keys`."""
        views = self._filled()
        return views[1] if views is not None else self._unbuffered[1]

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        self._set(1, value)

    def _set(self, which: int, value: torch.Tensor | None) -> None:
        """transformers' base class assigns ``keys``/``values`` (``None`` at first); the cache lives in
        the buffers, so assigning anything else once they exist is refused rather than ignored."""
        if self.key_buffer is not None and value is not None:
            raise RuntimeError("PreallocatedLayer keys/values are views of its buffers: use update() or truncate()")
        self._unbuffered[which] = value

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``[batch, heads, n, dim]`` states; return the views of everything cached."""
        n = key_states.shape[-2]
        if self.key_buffer is None or self.value_buffer is None:
            self._own(key_states[..., :0, :], value_states[..., :0, :], max(self.capacity, n))
        elif self.length + n > self.key_buffer.shape[-2]:
            cap = max(2 * self.key_buffer.shape[-2], self.length + n)
            self._own(self.key_buffer[..., : self.length, :], self.value_buffer[..., : self.length, :], cap)
        assert self.key_buffer is not None and self.value_buffer is not None
        _copy_into(self.key_buffer[..., self.length : self.length + n, :], key_states)
        _copy_into(self.value_buffer[..., self.length : self.length + n, :], value_states)
        self.filled_to(self.length + n)
        return cast(torch.Tensor, self.keys), cast(torch.Tensor, self.values)  # set just now

    def get_seq_length(self) -> int:
        """Number of cached tokens."""
        return self.length

    def truncate(self, length: int) -> None:
        """Forget every token from index ``length`` on (the buffer is kept, unless it is lent)."""
        length = max(0, min(self.length, length))
        if length < self._lent_rows:
            self._own(self.key_buffer[..., :length, :], self.value_buffer[..., :length, :])  # type: ignore[index]
        self.filled_to(length)

    def lend(self, rows: int) -> None:
        """Mark the buffers' first ``rows`` as lent: writing below them first copies the cache."""
        self._lent_rows = rows

    def _own(self, keys: torch.Tensor, values: torch.Tensor, capacity: int | None = None) -> None:
        """Make ``keys``/``values`` ``[batch, heads, n, dim]`` the whole cache, in new buffers of the layer's own
        (``capacity`` rows; default: as many as the current buffer)."""
        n = keys.shape[-2]
        if capacity is None:
            capacity = self.key_buffer.shape[-2] if self.key_buffer is not None else self.capacity
        cap = max(n, capacity)
        new_k = keys.new_empty((*keys.shape[:2], cap, keys.shape[-1]))
        new_v = values.new_empty((*values.shape[:2], cap, values.shape[-1]))
        new_k[..., :n, :] = keys
        new_v[..., :n, :] = values
        self.key_buffer, self.value_buffer, self._lent_rows = new_k, new_v, 0
        self.is_initialized = True
        self.device, self.dtype = new_k.device, new_k.dtype
        self.filled_to(n)

    # transformers' cache operations replace ``keys``/``values``; here they go through the buffers
    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (transformers' ``DynamicLayer.crop`` convention)."""
        if tokens_to_remove > 0:
            super().crop(tokens_to_remove)  # raises: a positive value is refused there too
        self.truncate(self.length - abs(tokens_to_remove))

    def reset(self) -> None:
        """Forget every token."""
        self.truncate(0)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the batch for beam search."""
        if self.length:
            idx = beam_idx.to(self.device)
            self._own(self.keys.index_select(0, idx), self.values.index_select(0, idx))  # type: ignore[union-attr]

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every batch entry ``repeats`` times."""
        if self.length:
            self._own(self.keys.repeat_interleave(repeats, 0), self.values.repeat_interleave(repeats, 0))  # type: ignore[union-attr]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the batch entries ``indices``."""
        if self.length:
            self._own(self.keys[indices, ...], self.values[indices, ...])  # type: ignore[index]

    def offload(self) -> None:
        """Move the cache to the CPU (transformers' offloading)."""
        if self.length:
            device = self.device
            self._own(self.keys.to("cpu"), self.values.to("cpu"))  # type: ignore[union-attr]
            self.device = device  # where prefetch brings it back

    def prefetch(self) -> None:
        """Move an offloaded cache back to its device."""
        if self.length and self.key_buffer is not None and self.key_buffer.device != self.device:
            self._own(self.keys.to(self.device), self.values.to(self.device))  # type: ignore[union-attr]

    def filled_to(self, length: int) -> None:
        """Take the buffer's first ``length`` rows as the cached tokens (rows written into it directly)."""
        self.length = length
        self._views = None  # made again when read

    def settle(self, length: int, index: torch.Tensor) -> None:
        """Move the tokens after ``length`` into the slots ``index`` (all ``< length``), then truncate to ``length``.

        Used when tokens were computed out of order on top of a cache that already has their slots.
        """
        n = int(index.numel())
        if n and int(index.min()) < self._lent_rows:
            self._own(self.key_buffer[..., : self.length, :], self.value_buffer[..., : self.length, :])  # type: ignore[index]
        if n and self.key_buffer is not None and self.value_buffer is not None:
            k = self.key_buffer[..., length : length + n, :].clone()
            v = self.value_buffer[..., length : length + n, :].clone()
            self.key_buffer.index_copy_(2, index.to(self.key_buffer.device), k)
            self.value_buffer.index_copy_(2, index.to(self.value_buffer.device), v)
        self.truncate(length)


def _copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst[...] = src``; half-precision rows are moved as 8-byte words (a strided copy runs ~3x faster)."""
    if dst.dtype == src.dtype and dst.element_size() < 8 and dst.shape == src.shape:
        try:
            dst.view(torch.int64).copy_(src.view(torch.int64))
            return
        except RuntimeError:  # rows not a multiple of 8 bytes, or strides that forbid the view
            pass
    dst.copy_(src)


#: Per-layer lists of KV pieces: ``pieces[layer][j]`` is piece ``j`` as ``[1, kv_heads, tokens, dim]``.
Pieces = Sequence[Sequence[torch.Tensor]]


def build_cache(
    keys: Pieces | None,
    values: Pieces | None,
    num_layers: int,
    capacity: int,
    buffers: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
    cache: KVCache | None = None,
) -> KVCache:
    """A :class:`KVCache` of :class:`PreallocatedLayer` with room for ``capacity`` tokens per layer.

    ``keys[layer]`` / ``values[layer]`` are lists of ``[batch, kv_heads, tokens, head_dim]`` tensors
    copied in order (once) into each layer's buffer; ``None`` gives an empty cache. Every layer keeps
    every token (sliding-window models mask by position instead), which keeps slicing exact.

    ``buffers``: per-layer ``(keys, values)`` buffers to write into (the static pool's, see
    :meth:`kv_rag.runtime.ModelRuntime.new_cache`) instead of allocating; the cache is the same
    either way. ``cache``: fill this (empty) cache instead of a new one.
    """
    cache = cache if cache is not None else KVCache()
    layers = [PreallocatedLayer(capacity, buffers[i] if buffers is not None else None) for i in range(num_layers)]
    cache.layers.extend(layers)
    if keys is None or values is None:
        return cache
    if buffers is not None and fill_static(layers, keys, values):
        return cache
    for layer, ks, vs in zip(layers, keys, values, strict=True):
        for k, v in zip(ks, vs, strict=True):
            layer.update(k, v)
    return cache


def lend_cache(
    cache: KVCache,
    buffers: Sequence[tuple[torch.Tensor, torch.Tensor]],
    start: int,
    keys: Pieces,
    values: Pieces,
    capacity: int,
) -> KVCache:
    """``cache`` over lent ``buffers`` whose rows ``start..`` already hold the last piece: the earlier
    pieces are copied in front of it, the last is not copied. Writing below the last piece's end
    first copies the cache into buffers of its own (see :meth:`PreallocatedLayer.lend`)."""
    layers = [PreallocatedLayer(capacity, b) for b in buffers]
    cache.layers.extend(layers)
    lead_k, lead_v = [list(ks[:-1]) for ks in keys], [list(vs[:-1]) for vs in values]
    if start and not fill_static(layers, lead_k, lead_v):
        for layer, ks, vs in zip(layers, lead_k, lead_v, strict=True):
            for k, v in zip(ks, vs, strict=True):
                layer.update(k, v)
    end = start + int(keys[0][-1].shape[-2])
    for layer in layers:
        layer.filled_to(end)
        layer.lend(end)
    return cache


def fill_static(
    layers: Sequence[PreallocatedLayer],
    keys: Sequence[Sequence[torch.Tensor]],
    values: Sequence[Sequence[torch.Tensor]],
) -> bool:
    """Copy every layer's pieces into the layers' given buffers with few host operations.

    Where the buffers of all layers are equally spaced views of one block (the static pool's) and
    so are a piece's tensors (the GPU tier's), the piece is one strided copy for all layers;
    anything else goes into one multi-tensor copy. Returns ``False`` (nothing copied) when the
    pieces do not fit the buffers as they are.
    """
    kbufs = [la.key_buffer for la in layers]
    vbufs = [la.value_buffer for la in layers]
    lengths = [int(k.shape[-2]) for k in keys[0]]
    total = sum(lengths)
    kb = kbufs[0]
    if kb is None:
        return False
    for k, v in zip(kbufs, vbufs, strict=True):
        if k is None or v is None or total > k.shape[-2] or total > v.shape[-2]:
            return False
    wholes = (stacked_view(kbufs), stacked_view(vbufs))  # type: ignore[arg-type]
    dst: list[torch.Tensor] = []
    src: list[torch.Tensor] = []
    for whole, bufs, pieces in ((wholes[0], kbufs, keys), (wholes[1], vbufs, values)):
        at = 0
        for j, n in enumerate(lengths):
            col = [p[j] for p in pieces]
            block = stacked_view(col)  # all layers alike: checking the first checks them all
            if not all(_fits(p, kb, n) for p in (col[:1] if block is not None else col)):
                return False
            if whole is not None and block is not None:
                dst.append(whole[..., at : at + n, :])
                src.append(block)
            else:
                dst += [b[..., at : at + n, :] for b in bufs]  # type: ignore[index]
                src += col
            at += n
    try:  # as 8-byte words where every piece allows it (a strided copy of 2-byte elements is ~3x slower)
        dst_w, src_w = [t.view(torch.int64) for t in dst], [t.view(torch.int64) for t in src]
    except RuntimeError:
        dst_w, src_w = dst, src
    if len(dst_w) <= 8:
        for d, s in zip(dst_w, src_w, strict=True):
            d.copy_(s)
    else:
        torch._foreach_copy_(dst_w, src_w)
    for layer in layers:
        layer.filled_to(total)
    return True


def _fits(piece: torch.Tensor, buffer: torch.Tensor, n: int) -> bool:
    """Whether ``piece`` (``n`` rows) can be copied into rows of ``buffer`` as it is."""
    shape = piece.shape
    return (
        shape[-2] == n
        and shape[:2] == buffer.shape[:2]
        and shape[-1] == buffer.shape[-1]
        and piece.dtype == buffer.dtype
        and piece.device == buffer.device
    )


def cache_layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer ``(keys, values)`` of a transformers cache."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def pieces_of(
    artifacts: Sequence[Any], device: torch.device, num_layers: int, drop_last: bool = False
) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]:
    """The artifacts' per-layer KV as :data:`Pieces` on ``device`` (queued with ``non_blocking``), in order;
    ``drop_last`` leaves out the last artifact's last token."""
    keys: list[list[torch.Tensor]] = []
    values: list[list[torch.Tensor]] = []
    blocks = [_blocks_on(a, device, num_layers) for a in artifacts]
    if artifacts and all(b is not None for b in blocks):
        # each artifact's layers are views of one block on ``device`` (the GPU tier's): one view op each
        if drop_last:
            kb, vb = blocks[-1]  # type: ignore[misc]
            blocks[-1] = (kb[..., :-1, :], vb[..., :-1, :])
        per_art = [(kb.unsqueeze(1).unbind(0), vb.unsqueeze(1).unbind(0)) for kb, vb in blocks]  # type: ignore[misc]
        keys = [[ks[layer] for ks, _ in per_art] for layer in range(num_layers)]
        values = [[vs[layer] for _, vs in per_art] for layer in range(num_layers)]
        return keys, values
    for layer in range(num_layers):
        ks = [a.keys[layer].to(device, non_blocking=True).unsqueeze(0) for a in artifacts]
        vs = [a.values[layer].to(device, non_blocking=True).unsqueeze(0) for a in artifacts]
        if drop_last:
            ks[-1], vs[-1] = ks[-1][..., :-1, :], vs[-1][..., :-1, :]
        keys.append(ks)
        values.append(vs)
    return keys, values


def _blocks_on(artifact: Any, device: torch.device, num_layers: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``artifact``'s keys and values as blocks ``[layers, kv_heads, n, dim]`` when each lies, ``num_layers``
    layers, in one block on ``device`` (views, nothing copied); else ``None``."""
    ks, vs = artifact.keys, artifact.values
    if len(ks) != num_layers or len(vs) != num_layers or not num_layers or not same_device(ks[0].device, device):
        return None
    kb, vb = stacked_view(ks), stacked_view(vs)
    return (kb, vb) if kb is not None and vb is not None else None


def move_to_slot(cache: Any, slot: Any) -> None:
    """Copy ``cache``'s rows into ``slot``'s buffers (one run per layer and KV head, contiguous in the pool's
    and the GPU tier's layouts) and make them the cache's buffers; the cache's previous slot is released."""
    layers = cache.layers
    n = int(layers[0].length)
    src = _runs([cl.key_buffer for cl in layers] + [cl.value_buffer for cl in layers], n)
    # a few multi-tensor launches (one strided copy of every layer ran the generic element-wise kernel:
    # 3 ms for a 4k Qwen3-4B-shaped cache on the H200)
    torch._foreach_copy_(_runs([*slot.k, *slot.v], n), src)
    previous = getattr(cache, "slot", None)
    for cl, kb, vb in zip(layers, slot.k, slot.v, strict=True):
        cl.key_buffer, cl.value_buffer = kb, vb
        cl.lend(0)
        cl.filled_to(n)
    cache.slot = slot
    if previous is not None and previous is not slot:
        previous.release()


def _runs(buffers: Sequence[torch.Tensor], n: int) -> list[torch.Tensor]:
    """The first ``n`` rows of every KV head of ``buffers`` (``[1, kv_heads, cap, dim]`` each), one view per head."""
    return [run for b in buffers for run in b[0, :, :n, :].unbind(0)]
