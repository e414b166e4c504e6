"""What every assembly strategy shares: the result type, the check that a stored artifact fits, storing one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..artifact import Artifact, ArtifactMeta
from ..fingerprint import token_bytes, tokens_digest
from ..models import LoadedModel
from ..options import Mode
from ..plan import Piece
from ..results import AutoChoice, CacheStatus, SegmentReport
from ..runtime import cache_layers


@dataclass
class Prefill:
    """The KV of a whole prompt, ready for decoding, and how it was obtained."""

    cache: Any
    logits: torch.Tensor | None
    prompt_tokens: int
    cached_tokens: int
    prefilled_tokens: int
    stored_tokens: int
    seconds: float
    segments: list[SegmentReport]
    #: how the KV was assembled (exact where stitching was refused or there was nothing to stitch)
    mode: Mode = Mode.EXACT
    #: document tokens recomputed by blend mode
    recomputed_tokens: int = 0
    #: their positions in the prompt (blend mode)
    recomputed_positions: tuple[int, ...] = ()
    #: seconds spent in each step of the assembly (stitch and blend: lead, documents, selection, compute)
    timings: dict[str, float] = field(default_factory=dict)
    #: tokens left to run, and the position of the first, when the last forward was deferred (``defer``):
    #: the cache holds everything before them and ``logits`` is ``None`` until the caller runs them
    pending: tuple[tuple[int, ...], int] | None = None
    #: the prompt's token ids (exact mode), and whose they are (a tenant's scope), for
    #: :class:`~kv_rag.conversations.Conversations`; empty: the request's KV is not kept
    token_ids: tuple[int, ...] = ()
    scope: str = ""
    #: store writes left for after the first token (``defer``): each reads its rows from ``cache``, so
    #: the caller runs them (with the model's lock held) before the cache is released
    stores: list[Callable[[], None]] = field(default_factory=list)
    #: in auto mode, what it chose (``mode`` is the mode chosen) and the expected loss
    auto: AutoChoice | None = None


def acceptor(loaded: LoadedModel, piece: Piece, start: int) -> Callable[[Artifact], str | None]:
    """A check that a stored artifact holds ``piece``'s tokens computed at ``start`` by this model and
    tokenizer (the ids compared exactly, as int64 bytes). Returns ``None`` to accept, else the reason."""
    fp = loaded.fingerprint
    tok = loaded.tokenizer_digest
    n_layers = loaded.num_layers

    def accept(art: Artifact) -> str | None:
        m = art.meta
        if m.model_digest != fp.digest:
            return f"computed by another model ({m.model.get('architecture')}, {m.dtype})"
        if m.tokenizer_digest != tok:
            return "made with another tokenizer"
        if m.start != start or m.num_tokens != piece.length or art.num_layers != n_layers:
            return "position, length or layer count differ from this request"
        if token_bytes(art.token_ids) != piece.ids_bytes:
            return "token ids differ from this request"
        return None

    return accept


def artifact_of(loaded: LoadedModel, cache: Any, piece: Piece, start: int | None = None) -> Artifact:
    """The sealed artifact of ``piece`` from rows ``start..`` of ``cache`` (default: ``piece.start``)."""
    fp = loaded.fingerprint
    a = piece.start if start is None else start
    end = a + piece.length
    ks, vs = [], []
    for k, v in cache_layers(cache):
        ks.append(k[0, :, a:end, :].to("cpu", copy=True).contiguous())
        vs.append(v[0, :, a:end, :].to("cpu", copy=True).contiguous())
    meta = ArtifactMeta(
        key=piece.key,
        model_digest=fp.digest,
        tokenizer_digest=loaded.tokenizer_digest,
        tokens_digest=tokens_digest(piece.ids_bytes),
        num_tokens=piece.length,
        start=a,
        parent=piece.parent,
        dtype=fp.dtype,
        model=fp.to_dict(),
        rope=fp.rope,
        source=piece.source,
    )
    return Artifact(tuple(ks), tuple(vs), torch.tensor(list(piece.ids), dtype=torch.int32), meta).sealed()


def report(piece: Piece, status: CacheStatus, tier: str | None = None, missing: str = "") -> SegmentReport:
    """The report of ``piece``: its key (unless it was not cached at all), why it was recomputed, or
    why it missed (``missing``, else the plan's code; see :mod:`kv_rag.misses`)."""
    key = piece.key if status is not CacheStatus.NONE else None
    reason = None
    if status is CacheStatus.RECOMPUTED:
        reason = piece.recompute
    elif status is CacheStatus.MISS:
        reason = missing or piece.missing or "absent"
    return SegmentReport(piece.source, piece.length, status, key, tier, piece.document, reason)


def load_failure(store: Any, piece: Piece, gap: bool) -> str:
    """The miss code of a piece the plan found stored but that was not loaded: ``after_miss`` after an
    earlier gap in its chain, else what removed it (``damaged``, ``evicted``; ``absent``)."""
    if piece.tier is None:
        return ""
    return "after_miss" if gap else store.why_missing(piece.key)


def computed_status(piece: Piece) -> CacheStatus:
    """How a piece that was computed here is reported: recomputed (the store had it), miss, or not cached."""
    if piece.recompute:
        return CacheStatus.RECOMPUTED
    return CacheStatus.MISS if piece.key else CacheStatus.NONE
