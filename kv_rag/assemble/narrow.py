"""Blend's recompute pass with a set that narrows layer by layer (CacheBlend's gradual filtering).

The plain recompute pass (:mod:`~kv_rag.assemble.stitch`) runs the same tokens through every layer.
Here the selected document tokens run through the first layers and, before each later layer, only
those whose fresh KV at the layer before deviates most from their stitched KV there go on (the
counts come from :meth:`~kv_rag.selection.NarrowingSelection.narrowing`). A token dropped before
layer ``i`` keeps its stitched KV from layer ``i`` on, and every other token attends to that stale
KV there, as in CacheBlend. The text between documents and the suffix run through every layer.

It is the model's own forward, with a pre-hook on every decoder layer that hands the layer the
rows still running: hidden states, position ids, rotary embeddings and a mask of its own (whose
valid slots include the stale KV of the tokens dropped so far). Each layer appends the KV of its
own rows; :func:`forward_narrowed` returns which rows each layer computed so that the caller can
move them into their slots.
"""

from __future__ import annotations

from typing import Any

import torch

from ..runtime import ModelRuntime
from .blend import decoder_layers
from .geometry import StitchGeometry


def forward_narrowed(
    runtime: ModelRuntime,
    cache: Any,
    geometry: StitchGeometry,
    ids_all: torch.Tensor,
    positions: torch.Tensor,
    selected: torch.Tensor,
    keep: list[int],
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run ``positions`` (sorted: plain text and the ``selected`` document tokens) on top of the stitched
    ``cache``, the document tokens narrowed to ``keep[i]`` before layer ``i``.

    Returns the last token's float32 logits and, per layer, the positions whose KV that layer
    appended after ``geometry.total`` (in that order). The cache is not settled.
    """
    g, model = geometry, runtime.model
    n_layers = len(cache.layers)
    decoder = decoder_layers(model, n_layers)
    if decoder is None:
        raise RuntimeError("layer-by-layer narrowing needs the model's list of decoder layers")
    device = g.device
    dtype = next(model.parameters()).dtype
    is_doc = torch.isin(positions, selected)
    state = {"rows": torch.arange(int(positions.numel()))}  # rows of ``positions`` running now
    ran: list[torch.Tensor] = []

    def narrow(li: int, rows: torch.Tensor) -> torch.Tensor:
        """The rows kept before layer ``li``: every plain row, the ``keep[li]`` most deviating document rows."""
        doc_rows = rows[is_doc[rows]]
        if li == 0 or int(doc_rows.numel()) <= keep[li]:
            return rows
        layer = cache.layers[li - 1]
        at = torch.nonzero(is_doc[rows]).flatten()  # where the document rows were appended at layer li - 1
        fresh_k = layer.keys[0].index_select(1, (g.total + at).to(device)).float()
        fresh_v = layer.values[0].index_select(1, (g.total + at).to(device)).float()
        slots = positions[doc_rows].to(device)
        old_k = layer.keys[0].index_select(1, slots).float()
        old_v = layer.values[0].index_select(1, slots).float()
        dk = (fresh_k - old_k).pow(2).sum(dim=(0, 2)) / fresh_k.pow(2).sum(dim=(0, 2)).mean().clamp_min(1e-12)
        dv = (fresh_v - old_v).pow(2).sum(dim=(0, 2)) / fresh_v.pow(2).sum(dim=(0, 2)).mean().clamp_min(1e-12)
        best = doc_rows[torch.topk((dk + dv).cpu(), keep[li]).indices]
        return torch.sort(torch.cat([rows[~is_doc[rows]], best])).values

    def pre(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        li = len(ran)
        prev = state["rows"]
        rows = narrow(li, prev)
        state["rows"] = rows
        ran.append(positions[rows])
        hidden = args[0] if args else kwargs.pop("hidden_states")
        hidden = hidden[:, torch.isin(prev, rows).to(hidden.device)]
        pos = positions[rows]
        kwargs["attention_mask"] = g.mask(pos, g.valid(pos), dtype)
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = pos.to(device).unsqueeze(0)
        emb = kwargs.get("position_embeddings")
        if emb is not None:
            idx = rows.to(emb[0].device)
            kwargs["position_embeddings"] = tuple(e.index_select(-2, idx) for e in emb)
        if kwargs.get("cache_position") is not None:
            kwargs["cache_position"] = kwargs["cache_position"][rows.to(device)]
        return (hidden, *args[1:]), kwargs

    handles = [layer.register_forward_pre_hook(pre, with_kwargs=True) for layer in decoder]
    ids = ids_all[positions].unsqueeze(0).to(device)
    try:
        logits = runtime.forward_at(ids, cache, positions, g.mask(positions, g.valid(positions), dtype))
    finally:
        for h in handles:
            h.remove()
    return logits, ran
