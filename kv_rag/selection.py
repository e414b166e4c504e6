"""Which document tokens blend mode recomputes: selection strategies, passed in as objects.

Blend recomputes a fraction of the document tokens on top of the stitched KV (see
:class:`~kv_rag.options.Mode`). A :class:`Selector` chooses them for one request from a
:class:`BlendView` (the request's stitched cache and its scores, built by
:mod:`kv_rag.assemble.blend`). Give one to ``Engine(selection=...)`` or to a single request
(``engine.generate(..., selection=...)``), or name a built-in one (:data:`SELECTORS`): a
benchmark passes its own selector (an oracle, say) instead of patching the library.

Only tokens of *moved* documents are candidates where there are enough of them: a document that
directly follows exactly the fixed prefix it was computed after (usually the first) already has
the full prefill's KV, and recomputing it would change nothing.

Built-in strategies (all :class:`ScoredSelection`):

- :class:`AttentionSelection` (default): the tokens the question attends to most in the stitched
  cache, summed over heads, question tokens and layers; one pass of the few question tokens.
- :class:`DeviationSelection`: CacheBlend's criterion (Yao et al. 2024), the tokens whose KV at
  early layers deviates most from a fresh computation; a pass of every document token through
  those layers. On the embedded model it did no better than stitching (docs/fidelity.md).
- :class:`LeadingSelection`: the first tokens of every moved document (EPIC's attention-sink fix);
  ``per_document=k`` recomputes exactly ``k`` per moved document whatever the fraction.
- :class:`NarrowingSelection`: CacheBlend's gradual filtering: a larger set at the first layers,
  narrowed layer by layer to the tokens whose fresh KV deviates most from the stitched one.

A selector may fix how many tokens it recomputes (:meth:`ScoredSelection.count`) and may ask the
recompute pass to narrow its set layer by layer (:attr:`NarrowingSelection.narrowing`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from .errors import InputError

#: Layer whose KV deviation :class:`DeviationSelection` scores unless told otherwise (0-based: the
#: first layer whose KV depends on context).
PROBE_LAYER = 1


def _count_arg(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InputError(f"{name} must be a whole number of tokens >= 0; got {value!r}")


class BlendView(Protocol):
    """What a selector may read of one blend request (implemented by :mod:`kv_rag.assemble.blend`)."""

    #: number of decoder layers
    num_layers: int

    @property
    def document_positions(self) -> torch.Tensor:
        """Positions of every document token in the prompt (sorted)."""
        ...

    def moved_positions(self) -> torch.Tensor:
        """Positions of the tokens of moved documents, whose stitched KV can differ from a full prefill's."""
        ...

    def document_ranges(self, positions: torch.Tensor) -> list[tuple[int, int]]:
        """``(start, end)`` of every document holding one of ``positions``."""
        ...

    def attention_scores(self, positions: torch.Tensor, layers: list[int]) -> torch.Tensor | None:
        """Attention the question pays to each of ``positions`` in the stitched cache, summed over
        ``layers`` (``None`` when there is no question or no query projection to read)."""
        ...

    def deviation_scores(self, positions: torch.Tensor, layers: list[int]) -> torch.Tensor:
        """How far each of ``positions``' stitched KV is from a fresh computation, summed over ``layers``."""
        ...


@runtime_checkable
class Selector(Protocol):
    """Chooses the document positions blend recomputes."""

    def select(self, view: BlendView, n: int) -> torch.Tensor:
        """``n`` document positions to recompute (sorted, int64, distinct)."""
        ...


@dataclass(frozen=True)
class ScoredSelection:
    """The common frame of the built-in selectors: candidates, a leading ``sink``, spans, balance.

    ``sink``: this many leading tokens of every moved document are always recomputed, the rest of
    the budget by the strategy. ``span``: recompute windows of this many tokens on either side of
    the best-scored tokens (best first, within their document) instead of single tokens, up to the
    same budget. ``balanced``: the budget is split evenly over the moved documents, each taking its
    own best-scored tokens (instead of the best-scored overall). ``layers``: the layers scored
    (empty: the strategy's default).
    """

    layers: tuple[int, ...] = ()
    sink: int = 0
    span: int = 0
    balanced: bool = False

    def scores(self, view: BlendView, positions: torch.Tensor) -> torch.Tensor | None:
        """One score per position (higher: recompute first); ``None``: no scores (take leading tokens)."""
        return None

    def count(self, n: int, moved: list[tuple[int, int]], n_doc: int) -> int:
        """How many document tokens to recompute: ``n`` (the request's fraction of the ``n_doc`` document
        tokens) unless the strategy fixes its own number from the ``moved`` documents' ``(start, end)``."""
        return n

    def select(self, view: BlendView, n: int) -> torch.Tensor:
        """``n`` positions: the sink, then the best-scored candidates, then other document tokens in order."""
        doc = view.document_positions
        moved = view.moved_positions()
        cand = moved if int(moved.numel()) >= n else doc
        forced = cand[:0]
        if self.sink > 0:
            forced = _leading(view, cand, min(self.sink, n // max(1, len(view.document_ranges(cand)))))
        rest = cand[~torch.isin(cand, forced)]
        need = n - int(forced.numel())
        if need <= 0 or not rest.numel():
            picked = rest[:0]
        else:
            scores = self.scores(view, rest)
            if scores is None:
                per = -(-need // max(1, len(view.document_ranges(rest))))
                picked = _leading(view, rest, per)[:need]
            elif self.balanced:
                picked = _balanced(view, rest, scores.cpu(), need)
            elif self.span > 0:
                picked = spans(rest, scores.cpu(), need, self.span)
            else:
                picked = rest[torch.topk(scores.cpu(), min(need, int(rest.numel()))).indices]
        out = torch.cat([forced, picked])
        if out.numel() < n:  # fewer candidates than asked for: fill with the other document tokens in order
            others = doc[~torch.isin(doc, out)]
            out = torch.cat([out, others[: n - int(out.numel())]])
        return torch.sort(out).values


@dataclass(frozen=True)
class AttentionSelection(ScoredSelection):
    """The tokens the question attends to most in the stitched cache (every layer unless ``layers``).

    Falls back to :class:`DeviationSelection`'s score where there is no question to score with or
    the model's attention modules have no ``q_proj``.
    """

    def scores(self, view: BlendView, positions: torch.Tensor) -> torch.Tensor | None:
        """Attention scores, or deviation at :data:`PROBE_LAYER` where attention cannot be read."""
        last = view.num_layers - 1
        layers = [min(i, last) for i in (self.layers or range(view.num_layers))]
        got = view.attention_scores(positions, layers)
        return got if got is not None else view.deviation_scores(positions, [min(PROBE_LAYER, last)])


@dataclass(frozen=True)
class DeviationSelection(ScoredSelection):
    """CacheBlend: the tokens whose KV deviates most from a fresh computation (at :data:`PROBE_LAYER`
    unless ``layers``)."""

    def scores(self, view: BlendView, positions: torch.Tensor) -> torch.Tensor | None:
        """Relative squared KV error per position, summed over the probe layers."""
        last = view.num_layers - 1
        return view.deviation_scores(positions, [min(i, last) for i in (self.layers or (PROBE_LAYER,))])


@dataclass(frozen=True)
class LeadingSelection(ScoredSelection):
    """The first tokens of every moved document, an even share each (EPIC's attention-sink fix).

    ``per_document``: recompute exactly this many leading tokens of every moved document (EPIC's
    ``k``; all of a shorter one), whatever the request's fraction; 0 (default): an even share of the
    fraction's budget.
    """

    per_document: int = 0

    def __post_init__(self) -> None:
        _count_arg("per_document", self.per_document)

    def count(self, n: int, moved: list[tuple[int, int]], n_doc: int) -> int:
        """``per_document`` tokens of every moved document (capped at its length), else ``n``."""
        if self.per_document <= 0:
            return n
        return sum(min(self.per_document, b - a) for a, b in moved)

    def select(self, view: BlendView, n: int) -> torch.Tensor:
        """The first ``per_document`` tokens of every moved document, else the even share of ``n``."""
        if self.per_document <= 0:
            return super().select(view, n)
        moved = view.moved_positions()
        return torch.sort(_leading(view, moved, self.per_document)[:n]).values


@dataclass(frozen=True)
class NarrowingSelection(ScoredSelection):
    """CacheBlend's gradual filtering (Yao et al. 2024, section 4.3): recompute more document tokens at
    the first layers and fewer at later ones.

    The first layer's set is the ``first`` fraction of document tokens whose KV deviates most from a
    fresh computation at :data:`PROBE_LAYER` (CacheBlend; ``criterion="attention"``: the question's
    attention, as :class:`AttentionSelection`). The recompute pass then narrows the set linearly to
    the ``last`` fraction at the last layer: before each layer it keeps the tokens whose fresh KV at
    the layer before deviates most from their stitched KV there. A token dropped at layer ``i`` keeps
    its stitched KV from layer ``i`` on. The mean fraction over layers is ``(first + last) / 2``
    (``first=0.25, last=0.05``: the compute of r = 0.15). The request's ``recompute`` is ignored.
    """

    first: float = 0.25
    last: float = 0.05
    criterion: str = "deviation"

    def __post_init__(self) -> None:
        for name in ("first", "last"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < float(v) <= 1.0:
                raise InputError(f"{name} must be a fraction in (0, 1] of document tokens; got {v!r}")
        if self.last > self.first:
            raise InputError(
                f"last must not exceed first (the set only narrows); got first={self.first}, last={self.last}"
            )
        if self.criterion not in ("deviation", "attention"):
            raise InputError(f"criterion must be 'deviation' or 'attention'; got {self.criterion!r}")

    def count(self, n: int, moved: list[tuple[int, int]], n_doc: int) -> int:
        """The first layers' set: ``first`` of the document tokens."""
        return max(1, round(self.first * n_doc))

    def scores(self, view: BlendView, positions: torch.Tensor) -> torch.Tensor | None:
        """Deviation at :data:`PROBE_LAYER` (or the question's attention over every layer)."""
        last = view.num_layers - 1
        if self.criterion == "attention":
            got = view.attention_scores(positions, list(range(view.num_layers)))
            if got is not None:
                return got
        return view.deviation_scores(positions, [min(PROBE_LAYER, last)])

    def narrowing(self, n_doc: int, num_layers: int) -> list[int]:
        """Document tokens kept at each layer: ``first`` of ``n_doc`` at layer 0, linearly to ``last``."""
        span = max(1, num_layers - 1)
        return [max(1, round(n_doc * (self.first + (self.last - self.first) * i / span))) for i in range(num_layers)]


#: Built-in selectors by name (``kv-rag ask --selection``, the integrations' ``selection`` field).
SELECTORS: dict[str, Selector] = {
    "attention": AttentionSelection(),
    "deviation": DeviationSelection(),
    "leading": LeadingSelection(),
}

#: The selector blend uses unless told otherwise.
DEFAULT_SELECTION = "attention"


def resolve_selector(selection: Selector | str | None) -> Selector:
    """A :class:`Selector` from an object, a name in :data:`SELECTORS`, or ``None`` (the default)."""
    if selection is None:
        return SELECTORS[DEFAULT_SELECTION]
    if isinstance(selection, str):
        try:
            return SELECTORS[selection]
        except KeyError:
            raise InputError(
                f"selection must be one of {', '.join(SELECTORS)} or a Selector object; got {selection!r}"
            ) from None
    if not isinstance(selection, Selector):
        raise InputError(
            f"selection must be one of {', '.join(SELECTORS)} or an object with a select(view, n) method; "
            f"got {type(selection).__name__}"
        )
    return selection


def selector_name(selection: Selector) -> str | None:
    """The :data:`SELECTORS` name of ``selection``, or ``None`` for a selector of the caller's own."""
    return next((k for k, v in SELECTORS.items() if v == selection), None)


def spans(positions: torch.Tensor, scores: torch.Tensor, need: int, span: int) -> torch.Tensor:
    """Up to ``need`` of ``positions``: windows of ``span`` tokens either side of the best-scored ones.

    Seeds are taken best first; each adds the candidate positions within ``span`` of it (a window
    stops at a gap in ``positions``, i.e. at a document's edge), nearest first, until ``need``.
    """
    pos = positions.tolist()
    index = {p: j for j, p in enumerate(pos)}
    taken = torch.zeros(len(pos), dtype=torch.bool)
    count = 0
    for j in torch.argsort(scores, descending=True).tolist():
        if count >= need:
            break
        if taken[j]:
            continue
        p = pos[j]
        for d in range(span + 1):
            for q in (p - d, p + d) if d else (p,):
                k = index.get(q)
                if k is not None and not taken[k] and count < need and _same_run(pos, j, k):
                    taken[k] = True
                    count += 1
    return positions[taken]


def _same_run(pos: list[int], a: int, b: int) -> bool:
    """Whether candidates ``a`` and ``b`` are joined by consecutive positions (no gap between them)."""
    lo, hi = min(a, b), max(a, b)
    return pos[hi] - pos[lo] == hi - lo


def _balanced(view: BlendView, positions: torch.Tensor, scores: torch.Tensor, need: int) -> torch.Tensor:
    """``need`` of ``positions``: an even share per document, each document's best-scored first."""
    ranges = view.document_ranges(positions)
    parts = []
    left = need
    for n, (a, b) in enumerate(ranges):
        inside = (positions >= a) & (positions < b)
        share = min(int(inside.sum()), left // (len(ranges) - n))
        idx = torch.nonzero(inside).flatten()
        parts.append(positions[idx[torch.topk(scores[idx], share).indices]])
        left -= share
    return torch.cat(parts) if parts else positions[:0]


def _leading(view: BlendView, positions: torch.Tensor, per_doc: int) -> torch.Tensor:
    """The first ``per_doc`` of ``positions`` in each document."""
    parts = []
    for a, b in view.document_ranges(positions):
        inside = positions[(positions >= a) & (positions < b)]
        parts.append(inside[:per_doc])
    return torch.cat(parts) if parts else positions[:0]
