"""Where things sit in a stitched request's cache, and who may attend to what.

Layout of the cache being built (storage index = position in the prompt): the leading text
before the first document (an exact chain), then each document's KV at its position, zero
placeholders for the text between documents and for the suffix. Tokens still to compute run on
top at their true positions with a mask that lets each attend to every valid cached slot before
it and every computed token before it.
"""

from __future__ import annotations

import torch

from ..plan import DocumentPlan, RequestPlan


class StitchGeometry:
    """Positions of one stitched request: the leading text, the documents, the text to compute."""

    def __init__(self, plan: RequestPlan, device: torch.device) -> None:
        self.plan = plan
        self.device = device
        self.total = plan.total
        #: tokens of the leading text (the exact chain before the first document)
        self.n_lead = plan.lead.length
        #: position after the last document (where the question and generation prompt begin)
        self.chain_end = self.total - len(plan.suffix)
        #: (start, end) of every non-empty document, in order
        self.documents = [(d.piece.start, d.piece.end) for d in plan.documents]
        #: (start, end) of the documents that moved (their KV can differ from a full prefill's)
        self.moved = [(d.piece.start, d.piece.end) for d in plan.documents if d.moved]
        glue = [torch.arange(p.start, p.end) for p in plan.parts if not isinstance(p, DocumentPlan)]
        #: positions of the text after the first document that is not a document (glue and suffix)
        self.plain = torch.cat([*glue, torch.arange(self.chain_end, self.total)])
        self.document_positions = torch.cat([torch.arange(a, b) for a, b in self.documents])

    def ranges_holding(self, positions: torch.Tensor) -> list[tuple[int, int]]:
        """(start, end) of every document that holds one of ``positions``."""
        return [(a, b) for a, b in self.documents if bool(((positions >= a) & (positions < b)).any())]

    def valid(self, exclude: torch.Tensor) -> torch.Tensor:
        """Slots holding usable KV: the leading text and the documents, minus ``exclude``."""
        valid = torch.zeros(self.total, dtype=torch.bool)
        valid[: self.n_lead] = True
        for a, b in self.documents:
            valid[a:b] = True
        if exclude.numel():
            valid[exclude] = False
        return valid

    def mask(self, query_pos: torch.Tensor, valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask: query ``j`` sees valid cached slots at positions <= its own, and new tokens before it."""
        q = query_pos.to(self.device)
        slots = torch.arange(self.total, device=self.device)
        see_cached = valid.to(self.device)[None, :] & (slots[None, :] <= q[:, None])
        see_new = q[None, :] <= q[:, None]
        allowed = torch.cat([see_cached, see_new], dim=1)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=self.device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        return mask[None, None]
