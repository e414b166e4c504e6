"""Blend's per-request state: the stitched cache and the scores a :class:`~kv_rag.selection.Selector` reads.

After LMCache's split of fixed blend settings (``LMCBlendCommonMetadata``) from per-request state:
the fixed part is the request's options (the fraction and the selector); :class:`BlendRequest`
is the per-request part, built on the stitched cache before anything is recomputed, and handed
to the selector as its :class:`~kv_rag.selection.BlendView`.
"""

from __future__ import annotations

from typing import Any

import torch

from ..rope import RotaryShift
from ..runtime import ModelRuntime, build_cache
from .geometry import StitchGeometry


class _StopProbe(Exception):
    """Raised by a hook to end a forward pass after the last layer of interest."""


class BlendRequest:
    """One blend request's stitched cache, seen by a selector (implements :class:`~kv_rag.selection.BlendView`).

    ``cache`` holds the leading text, the documents at their positions and placeholders for the
    rest; scoring leaves it as it was.
    """

    def __init__(
        self, runtime: ModelRuntime, cache: Any, geometry: StitchGeometry, ids: torch.Tensor, shifter: RotaryShift
    ) -> None:
        self.runtime = runtime
        self.cache = cache
        self.geometry = geometry
        #: every prompt token id, ``[total]``
        self.ids = ids
        self.shifter = shifter
        self.num_layers = len(cache.layers)
        self.device = geometry.device
        #: tokens of the leading text (before the first document)
        self.lead_length = geometry.n_lead
        #: position after the last document
        self.chain_end = geometry.chain_end

    # ------------------------------------------------------------------ positions
    @property
    def document_positions(self) -> torch.Tensor:
        """Positions of every document token (sorted)."""
        return self.geometry.document_positions

    def moved_positions(self) -> torch.Tensor:
        """Positions of the tokens of moved documents (sorted)."""
        parts = [torch.arange(a, b) for a, b in self.geometry.moved]
        return torch.cat(parts) if parts else self.document_positions[:0]

    def document_ranges(self, positions: torch.Tensor) -> list[tuple[int, int]]:
        """``(start, end)`` of every document holding one of ``positions``."""
        return self.geometry.ranges_holding(positions)

    # ------------------------------------------------------------------ scores
    def attention_scores(self, positions: torch.Tensor, layers: list[int]) -> torch.Tensor | None:
        """Attention the question pays to each of ``positions`` in the stitched cache, summed over ``layers``.

        Runs the text to compute (glue and suffix) on top of the stitched cache up to the last of
        ``layers``, captures the suffix's queries there, and sums their softmax attention (over
        every valid slot, as the model computes it) on ``positions`` across heads, queries and
        layers. The cache is left as it was. ``None`` where there is no suffix or the model's
        attention has no ``q_proj`` to read queries from.
        """
        g, cache, model = self.geometry, self.cache, self.runtime.model
        n_suf = g.total - g.chain_end
        decoder = decoder_layers(model, self.num_layers)
        if n_suf <= 0 or decoder is None:
            return None
        found = [getattr(decoder[i], "self_attn", None) for i in layers]
        attns = [a for a in found if a is not None and hasattr(a, "q_proj")]
        if len(attns) != len(layers):
            return None
        todo = g.plain
        captured: dict[int, torch.Tensor] = {}
        handles = []
        for li, attn in zip(layers, attns, strict=True):

            def grab(_m: Any, _inp: Any, out: torch.Tensor, li: int = li) -> None:
                captured[li] = out[0, -n_suf:].detach()

            handles.append(attn.q_proj.register_forward_hook(grab))
        last = max(layers)
        if last + 1 < len(decoder):
            handles.append(decoder[last + 1].register_forward_pre_hook(_stop))
        dtype = next(model.parameters()).dtype
        valid = g.valid(todo)
        ids = self.ids[todo].unsqueeze(0).to(self.device)
        try:
            self.runtime.forward_at(ids, cache, todo, g.mask(todo, valid, dtype))
        except _StopProbe:
            pass
        finally:
            for h in handles:
                h.remove()
        n_todo = int(todo.numel())
        slots = positions.to(self.device)
        suf_pos = torch.arange(g.chain_end, g.total, device=self.device)
        see = torch.cat(
            [valid.to(self.device)[None, :].expand(n_suf, -1), todo.to(self.device)[None, :] <= suf_pos[:, None]], dim=1
        )
        angles = self.shifter.angles(g.chain_end, n_suf).double()
        rot = (angles.cos().to(self.device), angles.sin().to(self.device))
        total = torch.zeros(int(positions.numel()), dtype=torch.float32, device=self.device)
        for li, attn in zip(layers, attns, strict=True):
            layer = cache.layers[li]
            k = layer.keys[0, :, : g.total + n_todo].float()  # [kv, slots, d]
            kv_heads, _, d = k.shape
            q = captured[li].view(n_suf, -1, int(getattr(attn, "head_dim", d)))
            norm = getattr(attn, "q_norm", None)
            if norm is not None:
                q = norm(q)
            q = q.transpose(0, 1).float()  # [heads, n_suf, d]
            q = self.shifter.shift(q, 0, g.chain_end, rot)  # query j rotated to position chain_end + j
            q = q.view(kv_heads, -1, n_suf, d)
            scale = float(getattr(attn, "scaling", d**-0.5))
            scores = torch.einsum("kgqd,ksd->kgqs", q, k) * scale
            scores = scores.masked_fill(~see[None, None], float("-inf")).softmax(-1)
            total += scores.index_select(-1, slots).sum(dim=(0, 1, 2))
        for layer in cache.layers:
            layer.truncate(g.total)
        return total

    def deviation_scores(self, positions: torch.Tensor, layers: list[int]) -> torch.Tensor:
        """How far each of ``positions``' stitched KV is from a fresh computation, summed over ``layers``.

        The fresh KV comes from a plain causal prefill of everything after the leading text, on a
        separate cache holding only the leading text, stopped after the last of ``layers``. Per
        layer: relative squared error of keys plus values, summed over heads (CacheBlend).
        """
        g, cache, model = self.geometry, self.cache, self.runtime.model
        layer_idx = max(layers)
        lead_k = [
            [layer.keys[..., : g.n_lead, :]] if g.n_lead and i <= layer_idx else []
            for i, layer in enumerate(cache.layers)
        ]
        lead_v = [
            [layer.values[..., : g.n_lead, :]] if g.n_lead and i <= layer_idx else []
            for i, layer in enumerate(cache.layers)
        ]
        probe = build_cache(lead_k, lead_v, self.num_layers, g.chain_end)
        ids = self.ids[g.n_lead : g.chain_end].unsqueeze(0).to(self.device)
        decoder = decoder_layers(model, self.num_layers)
        handle = None
        if decoder is not None and layer_idx + 1 < len(decoder):
            handle = decoder[layer_idx + 1].register_forward_pre_hook(_stop)
        try:
            self.runtime.forward(ids, probe, g.n_lead)
        except _StopProbe:
            pass
        finally:
            if handle is not None:
                handle.remove()
        slots = positions.to(self.device)
        total = torch.zeros(int(positions.numel()), dtype=torch.float32, device=self.device)
        for li in layers:
            fresh_layer: Any = probe.layers[li]
            old_layer: Any = cache.layers[li]
            fresh_k = fresh_layer.keys[0].index_select(1, slots).float()
            fresh_v = fresh_layer.values[0].index_select(1, slots).float()
            old_k = old_layer.keys[0].index_select(1, slots).float()
            old_v = old_layer.values[0].index_select(1, slots).float()
            dk = (fresh_k - old_k).pow(2).sum(dim=(0, 2)) / fresh_k.pow(2).sum(dim=(0, 2)).mean().clamp_min(1e-12)
            dv = (fresh_v - old_v).pow(2).sum(dim=(0, 2)) / fresh_v.pow(2).sum(dim=(0, 2)).mean().clamp_min(1e-12)
            total += dk + dv
        return total


def _stop(*_: Any) -> None:
    raise _StopProbe


def decoder_layers(model: Any, num_layers: int) -> Any:
    """The model's list of decoder layers (the first ``ModuleList`` with one entry per layer), or ``None``."""
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == num_layers:
            return module
    return None
