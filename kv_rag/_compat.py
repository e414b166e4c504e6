"""The few places where kv-rag meets transformers' cache API, kept to its public surface.

transformers 5.x renamed the forward argument ``past_key_values`` to ``cache`` (5.2x); the GPU
machine runs 5.17. Everything else uses ``DynamicCache``, ``update`` and ``layers[i].keys/.values``.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, cast

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from . import _fastpath
from .store.device import stacked_view as _stacked

_CACHE_KWARG: dict[type, str] = {}


def cache_kwarg(model: Any) -> str:
    """Name of the forward argument that takes the KV cache for ``model`` (``cache`` or ``past_key_values``)."""
    cls = type(model)
    name = _CACHE_KWARG.get(cls)
    if name is None:
        params = inspect.signature(model.forward).parameters
        name = "cache" if "cache" in params else "past_key_values"
        _CACHE_KWARG[cls] = name
    return name


class PreallocatedLayer(DynamicLayer):
    """A cache layer that writes into a buffer with spare room instead of concatenating.

    transformers' ``DynamicLayer`` concatenates on every update, copying the whole cache for each
    prefill chunk and each decoded token. This layer copies the loaded KV once into a buffer sized
    for the prompt and the answer, then appends in place (doubling when full); ``keys``/``values``
    are views of the filled part.
    """

    def __init__(self, capacity: int, buffers: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.capacity = max(1, capacity)
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._len = 0
        #: rows below this belong to someone else (a GPU-tier block lent to this cache): they are
        #: copied into buffers of the layer's own before anything could write below it
        self._lent_rows = 0
        if buffers is not None:  # given buffers (static ones for whole-step CUDA graphs): used until full
            self._k, self._v = buffers
            self.is_initialized = True
            self.device = self._k.device
            self.dtype = self._k.dtype
            self.keys = self._k[..., :0, :]
            self.values = self._v[..., :0, :]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``[batch, heads, n, dim]`` states; return the views of everything cached."""
        n = key_states.shape[-2]
        if self._k is None or self._v is None:
            self._own(key_states[..., :0, :], value_states[..., :0, :], max(self.capacity, n))
        elif self._len + n > self._k.shape[-2]:
            cap = max(2 * self._k.shape[-2], self._len + n)
            self._own(self._k[..., : self._len, :], self._v[..., : self._len, :], cap)
        assert self._k is not None and self._v is not None
        _copy_into(self._k[..., self._len : self._len + n, :], key_states)
        _copy_into(self._v[..., self._len : self._len + n, :], value_states)
        self.filled_to(self._len + n)
        return cast(torch.Tensor, self.keys), cast(torch.Tensor, self.values)  # set just now

    def get_seq_length(self) -> int:
        """Number of cached tokens."""
        return self._len

    def truncate(self, length: int) -> None:
        """Forget every token from index ``length`` on (the buffer is kept, unless it is lent)."""
        length = max(0, min(self._len, length))
        if length < self._lent_rows:
            self._own(self._k[..., :length, :], self._v[..., :length, :])  # type: ignore[index]
        self.filled_to(length)

    def lend(self, rows: int) -> None:
        """Mark the buffers' first ``rows`` as lent: writing below them first copies the cache."""
        self._lent_rows = rows

    def _own(self, keys: torch.Tensor, values: torch.Tensor, capacity: int | None = None) -> None:
        """Make ``keys``/``values`` ``[batch, heads, n, dim]`` the whole cache, in new buffers of the layer's own
        (``capacity`` rows; default: as many as the current buffer)."""
        n = keys.shape[-2]
        if capacity is None:
            capacity = self._k.shape[-2] if self._k is not None else self.capacity
        cap = max(n, capacity)
        new_k = keys.new_empty((*keys.shape[:2], cap, keys.shape[-1]))
        new_v = values.new_empty((*values.shape[:2], cap, values.shape[-1]))
        new_k[..., :n, :] = keys
        new_v[..., :n, :] = values
        self._k, self._v, self._lent_rows = new_k, new_v, 0
        self.is_initialized = True
        self.device, self.dtype = new_k.device, new_k.dtype
        self.filled_to(n)

    # transformers' cache operations replace ``keys``/``values``; here they go through the buffers
    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (transformers' ``DynamicLayer.crop`` convention)."""
        if tokens_to_remove > 0:
            super().crop(tokens_to_remove)  # raises: a positive value is refused there too
        self.truncate(self._len - abs(tokens_to_remove))

    def reset(self) -> None:
        """Forget every token."""
        self.truncate(0)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the batch for beam search."""
        if self._len:
            idx = beam_idx.to(self.device)
            self._own(self.keys.index_select(0, idx), self.values.index_select(0, idx))  # type: ignore[union-attr]

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every batch entry ``repeats`` times."""
        if self._len:
            self._own(self.keys.repeat_interleave(repeats, 0), self.values.repeat_interleave(repeats, 0))  # type: ignore[union-attr]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the batch entries ``indices``."""
        if self._len:
            self._own(self.keys[indices, ...], self.values[indices, ...])  # type: ignore[index]

    def offload(self) -> None:
        """Move the cache to the CPU (transformers' offloading)."""
        if self._len:
            device = self.device
            self._own(self.keys.to("cpu"), self.values.to("cpu"))  # type: ignore[union-attr]
            self.device = device  # where prefetch brings it back

    def prefetch(self) -> None:
        """Move an offloaded cache back to its device."""
        if self._len and self._k is not None and self._k.device != self.device:
            self._own(self.keys.to(self.device), self.values.to(self.device))  # type: ignore[union-attr]

    def filled_to(self, length: int) -> None:
        """Take the buffer's first ``length`` rows as the cached tokens (rows written into it directly)."""
        self._len = length
        if self._k is not None and self._v is not None:
            self.keys = self._k[..., :length, :]
            self.values = self._v[..., :length, :]

    def settle(self, length: int, index: torch.Tensor) -> None:
        """Move the tokens after ``length`` into the slots ``index`` (all ``< length``), then truncate to ``length``.

        Used when tokens were computed out of order on top of a cache that already has their slots.
        """
        n = int(index.numel())
        if n and int(index.min()) < self._lent_rows:
            self._own(self._k[..., : self._len, :], self._v[..., : self._len, :])  # type: ignore[index]
        if n and self._k is not None and self._v is not None:
            k = self._k[..., length : length + n, :].clone()
            v = self._v[..., length : length + n, :].clone()
            self._k.index_copy_(2, index.to(self._k.device), k)
            self._v.index_copy_(2, index.to(self._v.device), v)
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


def build_cache(
    keys: Sequence[Sequence[torch.Tensor]] | None,
    values: Sequence[Sequence[torch.Tensor]] | None,
    num_layers: int,
    capacity: int,
    model: Any = None,
    adopt: bool = False,
) -> DynamicCache:
    """A ``DynamicCache`` of :class:`PreallocatedLayer` with room for ``capacity`` tokens per layer.

    ``keys[layer]`` / ``values[layer]`` are lists of ``[batch, kv_heads, tokens, head_dim]`` tensors
    copied in order (once) into each layer's buffer; ``None`` gives an empty cache. Every layer keeps
    every token (sliding-window models mask by position instead), which keeps slicing exact.

    With ``model`` given, the buffers may come from the fast path's pool of static buffers (CUDA,
    half precision; see :mod:`kv_rag._fastpath`), so that whole forward steps on this cache can be
    replayed as one CUDA graph. The cache is the same either way.

    ``adopt``: the cache may use the GPU tier's block that holds the last piece as its buffers
    instead of copying it (see :func:`kv_rag._fastpath.adopt_buffers`); only for callers that never
    write into the cache below its length.
    """
    cache = DynamicCache()
    if adopt and model is not None and keys is not None and values is not None:
        lent = _fastpath.adopt_buffers(model, cache, num_layers, capacity, keys, values)
        if lent is not None:
            return _adopted(cache, lent[0], lent[1], keys, values, capacity)
    bufs = _fastpath.static_buffers(model, cache, num_layers, capacity) if model is not None else None
    layers = [PreallocatedLayer(capacity, bufs[i] if bufs is not None else None) for i in range(num_layers)]
    cache.layers.extend(layers)
    if keys is None or values is None:
        return cache
    if bufs is not None and _fill_static(layers, keys, values):
        return cache
    for layer, ks, vs in zip(layers, keys, values, strict=True):
        for k, v in zip(ks, vs, strict=True):
            layer.update(k, v)
    return cache


def _adopted(
    cache: DynamicCache,
    bufs: Sequence[tuple[torch.Tensor, torch.Tensor]],
    start: int,
    keys: Sequence[Sequence[torch.Tensor]],
    values: Sequence[Sequence[torch.Tensor]],
    capacity: int,
) -> DynamicCache:
    """``cache`` over lent buffers whose rows ``start..`` hold the last piece: the earlier pieces are
    copied in front of it, the last is not copied."""
    layers = [PreallocatedLayer(capacity, b) for b in bufs]
    cache.layers.extend(layers)
    lead_k, lead_v = [list(ks[:-1]) for ks in keys], [list(vs[:-1]) for vs in values]
    if start and not _fill_static(layers, lead_k, lead_v):
        for layer, ks, vs in zip(layers, lead_k, lead_v, strict=True):
            for k, v in zip(ks, vs, strict=True):
                layer.update(k, v)
    end = start + int(keys[0][-1].shape[-2])
    for layer in layers:
        layer.filled_to(end)
        layer.lend(end)
    return cache


def _fill_static(
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
    total = sum(int(k.shape[-2]) for k in keys[0])
    for layer in layers:
        kb = layer._k
        if kb is None or layer._v is None or total > kb.shape[-2]:
            return False
    for ks in (*keys, *values):
        for piece, ref in zip(ks, keys[0], strict=True):
            kb = layers[0]._k
            assert kb is not None
            same = piece.shape == ref.shape and piece.shape[:2] == kb.shape[:2] and piece.shape[-1] == kb.shape[-1]
            if not same or piece.dtype != kb.dtype or piece.device != kb.device:
                return False
    dst: list[torch.Tensor] = []
    src: list[torch.Tensor] = []
    for bufs, pieces in (([la._k for la in layers], keys), ([la._v for la in layers], values)):
        whole = _stacked(bufs)  # type: ignore[arg-type]
        at = 0
        for j in range(len(pieces[0])):
            col = [p[j] for p in pieces]
            n = int(col[0].shape[-2])
            block = _stacked(col)
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


def cache_layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer ``(keys, values)`` of a transformers cache."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def forward_at(
    model: Any,
    input_ids: torch.Tensor,
    cache: DynamicCache,
    positions: torch.Tensor,
    attention_mask: torch.Tensor,
    logits_to_keep: int = 1,
) -> torch.Tensor:
    """Run ``model`` on ``input_ids`` (``[1, n]``) at arbitrary ``positions`` (``[n]``) with a custom mask.

    ``attention_mask`` is an additive float mask ``[1, 1, n, cached + n]`` (0 where a query may attend,
    the dtype's minimum where not), passed to the model as a prepared 4D mask. The new tokens are
    appended to ``cache`` after what it holds. Returns float32 logits of the last ``logits_to_keep``.
    """
    kwargs = {cache_kwarg(model): cache}
    out = model(
        input_ids=input_ids,
        position_ids=positions.to(input_ids.device).unsqueeze(0),
        attention_mask=attention_mask,
        use_cache=True,
        logits_to_keep=logits_to_keep,
        **kwargs,
    )
    return out.logits[0].float()


def forward(
    model: Any, input_ids: torch.Tensor, cache: DynamicCache, start: int, logits_to_keep: int = 1
) -> torch.Tensor:
    """Run ``model`` on ``input_ids`` (``[1, n]``) at positions ``start..start+n-1`` on top of ``cache``.

    Returns the logits of the last ``logits_to_keep`` positions as float32 ``[n_keep, vocab]``;
    ``cache`` is extended in place. Short steps of supported models on CUDA go through
    :mod:`kv_rag._fastpath` (same weights, same cache, fewer launches; see ``KV_RAG_FAST``).
    """
    n = input_ids.shape[1]
    if n <= _fastpath.MAX_FAST_TOKENS and _fastpath.enabled(input_ids.device):
        fast = _fastpath.runner_for(model)
        if fast is not None:
            return fast.forward(input_ids, cache, start, logits_to_keep)
    position_ids = torch.arange(start, start + n, device=input_ids.device).unsqueeze(0)
    kwargs = {cache_kwarg(model): cache}
    out = model(
        input_ids=input_ids,
        position_ids=position_ids,
        use_cache=True,
        logits_to_keep=logits_to_keep,
        **kwargs,
    )
    return out.logits[0].float()
