"""Stitch and blend: a request's KV assembled from per-document artifacts moved to their positions.

Executes a stitch or blend :class:`~kv_rag.plan.RequestPlan`:

1. the leading text before the first document: its exact chain, loaded or prefilled and stored
   (:func:`~kv_rag.assemble.exact.assemble_chain`);
2. each document: its own artifact (computed once right after the fixed context, or the primed one,
   see :mod:`kv_rag.plan`), keys rotated from where it was computed to where it sits; on a miss
   it is computed after its context now and stored; the text between documents and the suffix
   get zero placeholders;
3. blend: a :class:`~kv_rag.selection.Selector` chooses the document tokens to recompute (from a
   :class:`~kv_rag.assemble.blend.BlendRequest`);
4. one forward pass runs the tokens still to compute (text between documents, the suffix, and in
   blend mode the chosen document tokens) at their true positions (see
   :mod:`~kv_rag.assemble.geometry`); their KV is then moved into their slots. A blend-selected
   token's stale stitched KV is masked out, so r = 1 is a full prefill of everything after the
   leading text and r = 0 is plain stitching.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ..models import LoadedModel
from ..plan import DocumentPlan, RequestPlan
from ..results import CacheStatus, SegmentReport
from ..runtime import cache_layers
from ..store import Store
from .ape import attach_ape
from .base import Prefill, acceptor, computed_status, load_failure, report
from .blend import BlendRequest
from .exact import assemble_chain
from .geometry import StitchGeometry
from .narrow import forward_narrowed


def assemble_stitched(
    loaded: LoadedModel, store: Store, plan: RequestPlan, *, need_logits: bool = True, reserve: int = 0, t0: float
) -> Prefill:
    """KV of a stitch or blend ``plan`` (call with the model's lock held, in inference mode)."""
    return _Stitcher(loaded, store, plan, need_logits, reserve, t0).run()


class _Stitcher:
    """Builds one request's stitched (and blended) cache."""

    def __init__(
        self, loaded: LoadedModel, store: Store, plan: RequestPlan, need_logits: bool, reserve: int, t0: float
    ) -> None:
        self.loaded = loaded
        self.store = store
        self.plan = plan
        self.runtime = loaded.runtime
        self.device = loaded.device
        self.shifter = loaded.rotary
        self.geometry = StitchGeometry(plan, self.device)
        self.need_logits = need_logits
        self.reserve = reserve
        self.t0 = t0
        self.timings: dict[str, float] = {}

    def _lap(self, name: str, since: float) -> float:
        now = time.perf_counter()
        self.timings[name] = self.timings.get(name, 0.0) + now - since
        return now

    def run(self) -> Prefill:
        plan, g = self.plan, self.geometry
        total = g.total
        n_doc = int(g.document_positions.numel())
        r = plan.options.fraction
        n_sel = n_doc if r >= 1 else round(r * n_doc)
        count = getattr(plan.options.selection, "count", None)
        if n_sel and count is not None:  # a strategy that fixes its own number (EPIC's k, narrowing)
            n_sel = min(n_doc, int(count(n_sel, g.moved, n_doc)))
        todo = g.plain
        if self.need_logits and (total - 1) not in set(todo.tolist()):
            todo = torch.cat([todo, torch.tensor([total - 1])])  # prompt ends with a document
        capacity = total + int(todo.numel()) + n_sel + self.reserve

        # 1. the leading text: exact chain (loaded or prefilled and stored)
        t = time.perf_counter()
        lead = assemble_chain(
            self.loaded, self.store, plan.lead, need_logits=False, reserve=capacity - g.n_lead, t0=self.t0
        )
        cache = lead.cache
        reports = list(lead.segments)
        stored, cached = lead.stored_tokens, lead.cached_tokens
        t = self._lap("lead", t)

        # 2. documents at their positions, placeholders for the text between them and the suffix
        layers = cache.layers
        hit_positions: list[torch.Tensor] = []
        for part in plan.parts:
            if not isinstance(part, DocumentPlan):
                self._placeholder(layers, part.length)
                reports.append(report(part, CacheStatus.NONE))
                continue
            keys, values, rep, new = self._document(part)
            for layer, k, v in zip(layers, keys, values, strict=True):
                layer.update(k, v)
            reports.append(rep)
            stored += new
            if rep.cache is CacheStatus.HIT:
                cached += part.piece.length
                hit_positions.append(torch.arange(part.piece.start, part.piece.end))
        self._placeholder(layers, len(plan.suffix))
        t = self._lap("documents", t)

        # 3. blend: choose the document tokens to recompute
        ids = torch.tensor(plan.ids, dtype=torch.long)
        if n_sel >= n_doc:
            selected = g.document_positions
        elif n_sel > 0:
            view = BlendRequest(self.runtime, cache, g, ids, self.shifter)
            selected = plan.options.selection.select(view, n_sel).to(torch.long).cpu()
        else:
            selected = g.document_positions[:0]
        if hit_positions and selected.numel():
            cached -= int(torch.isin(selected, torch.cat(hit_positions)).sum())
        t = self._lap("selection", t)

        # 4. compute the rest on top (APE: the documents' attention tempered and scaled from here on)
        ape = plan.options.ape
        if ape is not None:
            attach_ape(self.loaded.model, cache, g, ape)
        logits = self._compute(cache, ids, todo, selected)
        self._lap("compute", t)
        return Prefill(
            cache=cache,
            logits=logits,
            prompt_tokens=total,
            cached_tokens=cached,
            prefilled_tokens=total - cached,
            stored_tokens=stored,
            seconds=time.perf_counter() - self.t0,
            segments=reports,
            mode=plan.mode,
            recomputed_tokens=int(selected.numel()),
            recomputed_positions=tuple(selected.tolist()),
            timings=self.timings,
        )

    def _placeholder(self, layers: list[Any], n: int) -> None:
        if n <= 0:
            return
        for layer in layers:
            k, v = layer.keys, layer.values
            shape_k = (k.shape[0], k.shape[1], n, k.shape[-1])
            shape_v = (v.shape[0], v.shape[1], n, v.shape[-1])
            layer.update(k.new_zeros(shape_k), v.new_zeros(shape_v))

    def _document(self, doc: DocumentPlan) -> tuple[list[torch.Tensor], list[torch.Tensor], SegmentReport, int]:
        """A document's own KV (loaded, or computed after its context and stored), moved to where it sits:
        per-layer keys and values, its report, the tokens stored."""
        piece = doc.piece
        load = piece.tier is not None and not piece.recompute
        hit = self.store.get(piece.key, accept=acceptor(self.loaded, piece, doc.origin)) if load else None
        stored = 0
        if hit is not None:
            keys = [k.to(self.device, non_blocking=True).unsqueeze(0) for k in hit.artifact.keys]
            values = [v.to(self.device, non_blocking=True).unsqueeze(0) for v in hit.artifact.values]
            rep = report(piece, CacheStatus.HIT, hit.tier)
        else:
            missing = load_failure(self.store, piece, gap=False)  # before the miss chain stores it again
            pre = assemble_chain(self.loaded, self.store, doc.miss, need_logits=False, t0=self.t0)
            keys = [k[:, :, doc.origin :, :] for k, _ in cache_layers(pre.cache)]
            values = [v[:, :, doc.origin :, :] for _, v in cache_layers(pre.cache)]
            stored = pre.stored_tokens
            rep = report(piece, computed_status(piece), missing=missing)
        if piece.start != doc.origin:
            rot = self.shifter.rotation(doc.origin, piece.start, piece.length, self.device)
            keys = [self.shifter.shift(k, doc.origin, piece.start, rot) for k in keys]
        return keys, values, rep, stored

    def _compute(
        self, cache: Any, ids_all: torch.Tensor, todo: torch.Tensor, selected: torch.Tensor
    ) -> torch.Tensor | None:
        """Run the plain text (and ``selected`` document tokens) on top of the stitched cache; settle the cache."""
        g = self.geometry
        positions = torch.unique(torch.cat([todo, selected]))  # sorted
        tail = g.total - int(positions.numel())
        if not selected.numel() and torch.equal(positions, torch.arange(tail, g.total)):
            # only a contiguous tail (one document, or documents back to back): a plain causal forward
            for layer in cache.layers:
                layer.truncate(tail)
            ids = ids_all[tail:].unsqueeze(0).to(self.device)
            return self.runtime.forward(ids, cache, tail)
        narrowing = getattr(self.plan.options.selection, "narrowing", None)
        if narrowing is not None and selected.numel():
            keep = narrowing(int(g.document_positions.numel()), len(cache.layers))
            logits, ran = forward_narrowed(self.runtime, cache, g, ids_all, positions, selected, keep)
            for layer, index in zip(cache.layers, ran, strict=True):
                layer.settle(g.total, index.to(self.device))
            return logits if self.need_logits else None
        dtype = next(self.loaded.model.parameters()).dtype
        mask = g.mask(positions, g.valid(positions), dtype)
        ids = ids_all[positions].unsqueeze(0).to(self.device)
        logits = self.runtime.forward_at(ids, cache, positions, mask)
        index = positions.to(self.device)
        for layer in cache.layers:
            layer.settle(g.total, index)
        return logits if self.need_logits else None
