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


def build_cache(keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> DynamicCache:
    """A ``DynamicCache`` holding the given per-layer tensors, each ``[batch, kv_heads, tokens, head_dim]``.

    Built without a config so that every layer keeps every token (sliding-window models mask by
    position instead), which keeps slicing by position exact.
    """
    cache = DynamicCache()
    for i, (k, v) in enumerate(zip(keys, values, strict=True)):
        cache.update(k, v, i)
    return cache


def cache_layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer ``(keys, values)`` of a transformers cache."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def forward(
    model: Any, input_ids: torch.Tensor, cache: DynamicCache, start: int, logits_to_keep: int = 1
) -> torch.Tensor:
    """Run ``model`` on ``input_ids`` (``[1, n]``) at positions ``start..start+n-1`` on top of ``cache``.

    Returns the logits of the last ``logits_to_keep`` positions as float32 ``[n_keep, vocab]``;
    ``cache`` is extended in place.
    """
    n = input_ids.shape[1]
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
