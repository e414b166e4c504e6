"""KV block layouts shared by the runtime and the device tiers.

A model's KV for one piece of text is per layer ``[kv_heads, tokens, dim]`` (``[1, kv_heads,
tokens, dim]`` inside a request's cache). Two block layouts hold all layers at once:

* a *stacked* block ``[layers, ...]`` whose layers are equally spaced views of one storage, so
  that all layers move in one copy (:func:`stacked_view` recognises one);
* a *cache-shaped* block ``[layers, 1, kv_heads, rows, dim]``, laid out like a request's cache
  with rows to spare: the GPU tier keeps long artifacts in such blocks, and the runtime can take
  the block's layers as a request's cache buffers without copying (:func:`roomy_block`,
  :func:`block_rows`).

Pure functions of tensor metadata (shapes, strides, addresses); nothing is copied here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def same_device(a: torch.device, b: torch.device) -> bool:
    """Whether ``a`` and ``b`` name the same device (an index left out matches any)."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


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


def roomy_block(t: torch.Tensor, layers: int) -> torch.Tensor | None:
    """The block ``[layers, 1, kv_heads, rows, dim]`` spanning ``t``'s whole storage, when ``t``
    (``[..., kv_heads, n, dim]``) lies in it as rows of one layer; else ``None``.

    Found from the storage, not from ``Tensor._base``: views made under ``inference_mode`` have none.
    """
    if t.dim() < 3 or layers < 1:
        return None
    kv_heads, _, dim = t.shape[-3:]
    per_row = layers * kv_heads * dim * t.element_size()
    total = t.untyped_storage().nbytes()
    if not per_row or total % per_row:
        return None
    rows = total // per_row
    if tuple(t.stride()[-3:]) != (rows * dim, dim, 1):
        return None
    layer = kv_heads * rows * dim
    return t.as_strided((layers, 1, kv_heads, rows, dim), (layer, layer, rows * dim, dim, 1), 0)


def block_rows(pieces: Sequence[torch.Tensor], start: int) -> torch.Tensor | None:
    """The cache-shaped block whose rows ``start..`` the per-layer ``pieces`` (``[1, kv_heads, n, dim]``)
    are, layer by layer; ``None`` if they are anything else."""
    block = roomy_block(pieces[0], len(pieces))
    if block is None:
        return None
    n = pieces[0].shape[-2]
    for layer, piece in enumerate(pieces):
        want = block[layer, :, :, start : start + n, :]
        if piece.data_ptr() != want.data_ptr() or piece.shape != want.shape or piece.stride() != want.stride():
            return None
    return block
