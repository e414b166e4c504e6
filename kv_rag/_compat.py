"""The few places where kv-rag meets transformers' cache API, kept to its public surface.

transformers 5.x renamed the forward argument ``past_key_values`` to ``cache`` (5.2x); the GPU
machine runs 5.17. Everything else uses ``DynamicCache``, ``update`` and ``layers[i].keys/.values``.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from . import _fastpath

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

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = max(1, capacity)
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._len = 0

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``[batch, heads, n, dim]`` states; return the views of everything cached."""
        n = key_states.shape[-2]
        if self._k is None or self._v is None:
            b, h, _, d = key_states.shape
            cap = max(self.capacity, n)
            self._k = key_states.new_empty((b, h, cap, d))
            self._v = value_states.new_empty((b, h, cap, value_states.shape[-1]))
            self.is_initialized = True
            self.device = key_states.device
            self.dtype = key_states.dtype
        elif self._len + n > self._k.shape[-2]:
            cap = max(2 * self._k.shape[-2], self._len + n)
            k, v = self._k, self._v
            self._k = k.new_empty((*k.shape[:2], cap, k.shape[-1]))
            self._v = v.new_empty((*v.shape[:2], cap, v.shape[-1]))
            self._k[..., : self._len, :] = k[..., : self._len, :]
            self._v[..., : self._len, :] = v[..., : self._len, :]
        _copy_into(self._k[..., self._len : self._len + n, :], key_states)
        _copy_into(self._v[..., self._len : self._len + n, :], value_states)
        self._len += n
        self.keys = self._k[..., : self._len, :]
        self.values = self._v[..., : self._len, :]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        """Number of cached tokens."""
        return self._len

    def truncate(self, length: int) -> None:
        """Forget every token from index ``length`` on (the buffer is kept)."""
        self._len = max(0, min(self._len, length))
        if self._k is not None and self._v is not None:
            self.keys = self._k[..., : self._len, :]
            self.values = self._v[..., : self._len, :]

    def settle(self, length: int, index: torch.Tensor) -> None:
        """Move the tokens after ``length`` into the slots ``index`` (all ``< length``), then truncate to ``length``.

        Used when tokens were computed out of order on top of a cache that already has their slots.
        """
        n = int(index.numel())
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
) -> DynamicCache:
    """A ``DynamicCache`` of :class:`PreallocatedLayer` with room for ``capacity`` tokens per layer.

    ``keys[layer]`` / ``values[layer]`` are lists of ``[batch, kv_heads, tokens, head_dim]`` tensors
    copied in order (once) into each layer's buffer; ``None`` gives an empty cache. Every layer keeps
    every token (sliding-window models mask by position instead), which keeps slicing exact.
    """
    cache = DynamicCache()
    for i in range(num_layers):
        layer = PreallocatedLayer(capacity)
        if keys is not None and values is not None:
            for k, v in zip(keys[i], values[i], strict=True):
                layer.update(k, v)
        cache.layers.append(layer)
    return cache


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
