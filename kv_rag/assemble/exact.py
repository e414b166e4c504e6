"""Exact assembly: load the longest cached part of a chain, prefill the rest, store what was new.

Token-exact: each artifact was computed given exactly the text before it (its key covers the
whole chain before it), so the cache equals a from-scratch prefill's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from ..conversations import MIN_TOKENS
from ..estimates import MIN_PREFILL_TOKENS
from ..models import LoadedModel
from ..plan import Chain, Piece
from ..results import CacheStatus, SegmentReport
from ..runtime import pieces_of
from ..store import Store
from .base import Prefill, acceptor, artifact_of, computed_status, load_failure, report


def assemble_chain(
    loaded: LoadedModel,
    store: Store,
    chain: Chain,
    *,
    need_logits: bool = True,
    reserve: int = 0,
    t0: float | None = None,
    defer: int = 0,
    conversation: str | None = None,
) -> Prefill:
    """KV of ``chain`` (call with the model's lock held, in inference mode).

    Loads the pieces in order up to the first one the store does not have (or whose artifact does
    not fit), prefills the rest on top and stores each newly computed piece that has a key.
    ``reserve`` makes room for that many more tokens without reallocating; ``need_logits``: the
    logits of the last token are wanted (when everything is cached, the last token is recomputed).
    ``defer``: when the logits are wanted and at most this many tokens are left to run and none of
    them is to be stored, they are not run here but returned as :attr:`Prefill.pending` (the
    scheduler runs them together with other requests' tokens); and (whenever nonzero) the store
    writes of computed pieces are returned as :attr:`Prefill.stores` for after the first token.
    ``conversation``: a tenant's scope (``""``: none) whose kept turns (:mod:`kv_rag.conversations`) may
    hold a longer start of the prompt than the store's chain; the longest is loaded instead, and
    the result carries the prompt's ids for keeping this request's own turn. ``None``: neither.
    """
    t0 = time.perf_counter() if t0 is None else t0
    reports: list[SegmentReport] = []
    hits: list[Any] = []
    lendable = False
    full = chain.ids
    m, turn = loaded.conversations.match(conversation, full) if conversation is not None else (0, None)
    m = min(m, len(full) - 1)
    if turn is not None and m >= _stored_run(chain) + MIN_TOKENS:  # a kept turn holds more than the store
        first_uncached = next((i for i, p in enumerate(chain.pieces) if p.end > m), len(chain.pieces))
        for piece in chain.pieces[:first_uncached]:
            status = CacheStatus.HIT if piece.key else CacheStatus.NONE
            reports.append(report(piece, status, "conversation" if piece.key else None))
        hits, pos = [turn.head(m)], m
    else:
        first_uncached = _load(loaded, store, chain, hits, reports)
        lendable = bool(hits) and bool(getattr(hits[-1], "lendable", False))
        hits = [getattr(h, "artifact", h) for h in hits]
        pos = chain.pieces[first_uncached].start if first_uncached < len(chain.pieces) else chain.length
    rest: list[int] = full[pos:]
    drop_last = not rest and need_logits  # all cached but logits wanted: recompute the last token
    runtime = loaded.runtime
    capacity = chain.total + reserve
    if hits:
        keys, values = pieces_of(hits, loaded.device, loaded.num_layers, drop_last=drop_last)
        # the last hit's rows are never rewritten, so a lendable block may be used in place; not right
        # after a copy-up: a new block needs new step graphs (~50 ms), while copying is cheaper once
        cache = runtime.new_cache(capacity, keys, values, lend=lendable and not drop_last)
    else:
        cache = runtime.new_cache(capacity)
    if drop_last:
        rest = chain.ids[-1:]
    start = pos - 1 if drop_last else pos
    logits: torch.Tensor | None = None
    pending: tuple[tuple[int, ...], int] | None = None
    to_store = any(p.key for p in chain.pieces[first_uncached:])
    if rest and need_logits and not to_store and len(rest) <= defer:
        pending = (tuple(rest), start)
    elif rest:
        t_fwd = time.perf_counter()
        logits = runtime.forward(ids_on(rest, loaded.device), cache, start)[-1]
        if len(rest) >= MIN_PREFILL_TOKENS:
            if logits.is_cuda:
                torch.cuda.synchronize(logits.device)
            loaded.speeds.prefilled(len(rest), time.perf_counter() - t_fwd)
    stored = 0
    later: list[Callable[[], None]] = []
    for n, piece in enumerate(chain.pieces[first_uncached:]):
        status = computed_status(piece)
        missing = load_failure(store, piece, gap=n > 0)  # before the put below forgets what removed it
        if piece.key:  # a recomputed piece goes only to the tiers in front of the one that holds it
            put = partial(_put, loaded, store, cache, piece, piece.tier if piece.recompute else None)
            if defer:  # the scheduler stores it after the first token (copying it out costs more than a hit)
                later.append(put)
            else:
                put()
            stored += piece.length if status is CacheStatus.MISS else 0
        reports.append(report(piece, status, missing=missing))
    return Prefill(
        cache=cache,
        logits=logits,
        prompt_tokens=chain.total,
        cached_tokens=pos,
        prefilled_tokens=chain.total - pos,
        stored_tokens=stored,
        seconds=time.perf_counter() - t0,
        segments=reports,
        pending=pending,
        token_ids=tuple(full) if conversation is not None else (),
        scope=conversation or "",
        stores=later,
    )


def ids_on(ids: list[int], device: torch.device) -> torch.Tensor:
    """``[1, n]`` token ids on ``device``, queued without waiting: on CUDA they go from pinned memory, as
    a copy from pageable memory would hold the host until the stream drains (another request's step
    may be running: the scheduler assembles requests while one runs)."""
    ids_t = torch.tensor([ids], dtype=torch.long)
    if device.type != "cuda":
        return ids_t.to(device)
    return ids_t.pin_memory().to(device, non_blocking=True)


def _put(loaded: LoadedModel, store: Store, cache: Any, piece: Piece, above: str | None) -> None:
    """Store ``piece``'s rows of ``cache`` (only in the tiers in front of ``above`` when given)."""
    store.put(piece.key, artifact_of(loaded, cache, piece), above=above)


def _load(loaded: LoadedModel, store: Store, chain: Chain, hits: list[Any], reports: list[SegmentReport]) -> int:
    r"""Load ``chain``'s pieces in order into ``hits`` (the store's :class:`~kv_rag.store.Hit`\ s) up to the
    first the store does not have (or whose artifact does not fit); returns that piece's index."""
    for i, piece in enumerate(chain.pieces):
        if piece.recompute:  # the planner found loading it slower than computing it
            return i
        if not piece.key:
            if piece.length:
                return i
            reports.append(report(piece, CacheStatus.NONE))
            continue
        look = piece.tier is not None or not chain.located
        hit = store.get(piece.key, accept=acceptor(loaded, piece, piece.start)) if look else None
        if hit is None:
            return i
        hits.append(hit)
        reports.append(report(piece, CacheStatus.HIT, hit.tier))
    return len(chain.pieces)


def _stored_run(chain: Chain) -> int:
    """Tokens of the chain's leading pieces the store held when the plan was made (0: not looked up)."""
    end = 0
    for piece in chain.pieces if chain.located else ():
        if piece.key and piece.tier is not None and not piece.recompute:
            end = piece.end
        elif piece.length:
            break
    return end
