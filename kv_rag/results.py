"""Typed results of engine calls."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from .options import Mode

__all__ = ["AutoChoice", "CacheStatus", "Generation", "MissReason", "Mode", "PublishReport", "SegmentReport"]


class CacheStatus(str, Enum):
    """What happened to one segment: loaded from the store, prefilled and stored, not cached, or
    found in the store but recomputed because loading it would have been slower (see ``reason``)."""

    HIT = "hit"
    MISS = "miss"
    NONE = "none"
    RECOMPUTED = "recomputed"


class MissReason(str, Enum):
    """Why a ``miss`` was not loaded (:attr:`SegmentReport.reason` of a miss; see :mod:`kv_rag.misses`)."""

    #: no tier holds it, and nothing says it was ever stored here
    ABSENT = "absent"
    #: a tier of this process dropped it to make room
    EVICTED = "evicted"
    #: a tier held it, but it failed its checks and was dropped
    DAMAGED = "damaged"
    #: a tier held it, but trust is required and it is unsigned, signed by an untrusted key or tampered
    #: with after signing (kept in the tier: another consumer may trust its publisher)
    UNTRUSTED = "untrusted"
    #: the same document is stored after other preceding text (exact mode)
    OTHER_CONTEXT = "other_context"
    #: stored, but a piece before it in the chain missed
    AFTER_MISS = "after_miss"


@dataclass(frozen=True)
class SegmentReport:
    """One segment of a request (the prefix or a document)."""

    source: str
    tokens: int
    cache: CacheStatus
    key: str | None = None
    tier: str | None = None
    document: bool = False
    #: why a piece found in the store was recomputed; for a miss, its :class:`MissReason` code
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON."""
        d = asdict(self)
        d["cache"] = self.cache.value
        return d


@dataclass(frozen=True)
class AutoChoice:
    """What auto mode chose for one request (see :mod:`kv_rag.auto`), and why.

    ``expected_loss`` is the calibrated loss the choice was made on, in accuracy points: the upper
    confidence bound of the profile's bucket for stitch and blend, 0 for exact mode where the budget
    or the cache chose it, ``None`` when there was no profile (or no bucket) to estimate it from.
    """

    mode: Mode
    recompute: float
    expected_loss: float | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON (``mode_chosen``, ``recompute``, ``expected_loss``, ``reason``)."""
        return {
            "mode_chosen": self.mode.value,
            "recompute": self.recompute,
            "expected_loss": self.expected_loss,
            "reason": self.reason,
        }


@dataclass
class Generation:
    """The answer to one request and what it cost."""

    text: str
    token_ids: list[int]
    finish_reason: str
    mode: Mode
    prompt_tokens: int
    cached_tokens: int
    prefilled_tokens: int
    stored_tokens: int
    ttft_s: float
    total_s: float
    prefill_s: float
    segments: list[SegmentReport] = field(default_factory=list)
    #: document tokens recomputed by blend mode
    recomputed_tokens: int = 0
    #: the request's options as plain values (mode asked for, blend fraction, priming, selection, use_cache)
    options: dict[str, Any] = field(default_factory=dict)
    #: in auto mode, what it chose (``mode`` is the mode chosen) and the expected loss; ``None`` otherwise
    auto: AutoChoice | None = None

    @property
    def expected_loss(self) -> float | None:
        """Auto mode's expected loss for this request in accuracy points (``None``: not auto, or no profile)."""
        return self.auto.expected_loss if self.auto is not None else None

    @property
    def documents(self) -> list[SegmentReport]:
        """The reports of the document segments (plain text segments left out)."""
        return [s for s in self.segments if s.document]

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON (``answer`` is the text)."""
        return {
            "answer": self.text,
            "mode": self.mode.value,
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "prefilled_tokens": self.prefilled_tokens,
            "stored_tokens": self.stored_tokens,
            "recomputed_tokens": self.recomputed_tokens,
            "completion_tokens": len(self.token_ids),
            "ttft_s": round(self.ttft_s, 6),
            "prefill_s": round(self.prefill_s, 6),
            "total_s": round(self.total_s, 6),
            "docs": [
                {"source": s.source, "cache": s.cache.value, "tokens": s.tokens, "key": s.key}
                | ({"reason": s.reason} if s.reason else {})
                for s in self.documents
            ],
            "options": dict(self.options),
        } | ({"auto": self.auto.to_dict()} if self.auto is not None else {})


@dataclass(frozen=True)
class PublishReport:
    """One published document: its artifact key, size, whether it was already stored (``cache``), and
    whether the store's last tier holds it once the whole publish is done (``stored``: false when
    that tier is read-only, could not write it, or evicted it for a later document)."""

    source: str
    key: str
    tokens: int
    cache: CacheStatus
    seconds: float
    stored: bool = True

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON."""
        d = asdict(self)
        d["cache"] = self.cache.value
        return d
