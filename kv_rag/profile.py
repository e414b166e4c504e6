"""Calibrated loss profiles: how far stitch and blend stray from a full prefill, for one model.

A :class:`Profile` is made by :func:`kv_rag.calibrate` from per-prompt measurements
(:class:`Row`) and read by auto mode (:mod:`kv_rag.auto`). It is bound to the model's fingerprint
(architecture, configuration, weights, dtype) and the tokenizer's digest: it is stored as a small JSON
file named after both (:func:`profile_path`), so a changed model, tokenizer or dtype finds none, and a
file whose contents name another fingerprint is ignored.

Losses are in accuracy points: the share of prompts, in percent, whose answer the full prefill got
right and the assembly got wrong. Rows are grouped into buckets by prompt shape (moved documents,
document tokens rounded up to a power of two); each bucket holds, per recipe (stitch, blend at r), the
mean accuracy drop, a one-sided upper confidence bound of the loss (Wilson, :data:`CONFIDENCE`), the
greedy agreement with the full prefill's first tokens, the mean KL of the first answer tokens'
distributions and the teacher-forced answer log-prob drop. Auto mode decides on the upper bound.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .defaults import home
from .options import Mode

__all__ = ["Bucket", "Profile", "RecipeStats", "Row", "profile_path", "wilson_upper"]

#: Format of the stored JSON; a file of another version is ignored.
VERSION = 1
#: One-sided confidence of the loss's upper bound.
CONFIDENCE = 0.9
_Z = 1.2815515655446004  # the standard normal quantile of CONFIDENCE


def wilson_upper(k: int, n: int, z: float = _Z) -> float:
    """Upper Wilson bound of a proportion with ``k`` successes in ``n`` trials (1.0 when ``n`` is 0)."""
    if n <= 0:
        return 1.0
    p = k / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return min(1.0, (centre + spread) / (1 + z * z / n))


def token_bin(tokens: int) -> int:
    """The bucket edge of ``tokens`` document tokens: the next power of two (at least 64)."""
    return max(64, 1 << max(0, int(tokens) - 1).bit_length())


@dataclass(frozen=True)
class Row:
    """One calibration prompt: its shape, and per recipe label (``"full"``, ``"stitch"``, ``"blend r=0.3"``)
    the measures: ``correct`` (0/1), ``identical`` (first greedy tokens equal the full prefill's, 0/1),
    ``kl`` (mean KL of the first answer tokens' distributions from the full prefill's), ``lp``
    (teacher-forced answer log-prob) and ``top1`` (every answer token is the argmax, 0/1)."""

    moved: int
    document_tokens: int
    measures: dict[str, dict[str, float]]


@dataclass(frozen=True)
class RecipeStats:
    """What one assembly lost against the full prefill over a bucket's prompts."""

    mode: Mode
    recompute: float
    prompts: int
    #: mean of (full right) - (this right), in accuracy points; answers this got right and the full
    #: prefill did not count against it
    accuracy_drop: float
    #: upper confidence bound (:data:`CONFIDENCE`) of the share of prompts the full prefill got right and
    #: this got wrong, in points: what auto mode decides on
    loss_upper: float
    #: share of prompts whose first greedy tokens equal the full prefill's
    greedy_agreement: float
    #: mean KL divergence of the first answer tokens' distributions from the full prefill's (nats)
    kl_first_answer_tokens: float
    #: mean teacher-forced answer log-prob drop against the full prefill (nats; positive: less likely)
    logprob_drop: float
    #: share of prompts whose answer tokens are all the argmax under teacher forcing
    answer_top1: float

    @property
    def label(self) -> str:
        """``"stitch"`` or ``"blend r=0.3"``."""
        return "stitch" if self.mode is Mode.STITCH else f"blend r={self.recompute:g}"


@dataclass(frozen=True)
class Bucket:
    """Prompts with ``moved`` moved documents and at most ``max_document_tokens`` document tokens (but more
    than half that), and each recipe's losses over them, cheapest recipe first."""

    moved: int
    max_document_tokens: int
    prompts: int
    full_accuracy: float
    recipes: tuple[RecipeStats, ...]

    def covers(self, moved: int, document_tokens: int) -> bool:
        """Whether this bucket's losses bound a request's: as many moved documents or more, and as many
        document tokens or more (a prompt with fewer of either loses less, in the measurements so far)."""
        return self.moved >= moved and self.max_document_tokens >= token_bin(document_tokens)


def _label(mode: Mode, r: float) -> str:
    return "stitch" if mode is Mode.STITCH else f"blend r={r:g}"


def _recipe(label: str, rows: Sequence[Row]) -> RecipeStats:
    mode, r = (Mode.STITCH, 0.0) if label == "stitch" else (Mode.BLEND, float(label.split("=", 1)[1]))
    full = [row.measures["full"] for row in rows]
    got = [row.measures[label] for row in rows]
    lost = sum(1 for f, g in zip(full, got, strict=True) if f["correct"] and not g["correct"])
    return RecipeStats(
        mode=mode,
        recompute=r,
        prompts=len(rows),
        accuracy_drop=100 * statistics.mean(f["correct"] - g["correct"] for f, g in zip(full, got, strict=True)),
        loss_upper=100 * wilson_upper(lost, len(rows)),
        greedy_agreement=statistics.mean(g["identical"] for g in got),
        kl_first_answer_tokens=statistics.mean(g["kl"] for g in got),
        logprob_drop=statistics.mean(f["lp"] - g["lp"] for f, g in zip(full, got, strict=True)),
        answer_top1=statistics.mean(g["top1"] for g in got),
    )


@dataclass(frozen=True)
class Profile:
    """A model's calibrated losses, bound to its fingerprint; see the module's docstring."""

    model: str
    model_digest: str
    tokenizer_digest: str
    dtype: str
    #: what the measurements assumed: ``selection`` (blend's token choice), ``priming``, ``system_prompt``,
    #: ``max_new_tokens``, ``questions`` (where they came from)
    settings: dict[str, Any]
    buckets: tuple[Bucket, ...]
    rows: tuple[Row, ...] = ()
    created: str = ""
    version: int = VERSION
    confidence: float = CONFIDENCE
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_rows(cls, rows: Sequence[Row], **fields: Any) -> Profile:
        """A profile of ``rows`` (every row measures the same recipes), bucketed by shape; ``fields`` are the
        other attributes (``model``, ``model_digest``, ``tokenizer_digest``, ``dtype``, ``settings``...)."""
        groups: dict[tuple[int, int], list[Row]] = {}
        for row in rows:
            groups.setdefault((row.moved, token_bin(row.document_tokens)), []).append(row)
        buckets = []
        for (moved, edge), members in sorted(groups.items()):
            labels = [lab for lab in members[0].measures if lab != "full"]
            recipes = sorted(
                (_recipe(lab, members) for lab in labels), key=lambda s: (s.mode is Mode.BLEND, s.recompute)
            )
            full = statistics.mean(r.measures["full"]["correct"] for r in members)
            buckets.append(Bucket(moved, edge, len(members), 100 * full, tuple(recipes)))
        return cls(buckets=tuple(buckets), rows=tuple(rows), **fields)

    def bucket_for(self, moved: int, document_tokens: int) -> Bucket | None:
        """The smallest bucket that covers a request's shape (:meth:`Bucket.covers`), or ``None``."""
        fits = [b for b in self.buckets if b.covers(moved, document_tokens)]
        return min(fits, key=lambda b: (b.max_document_tokens, b.moved)) if fits else None

    def choose(self, moved: int, document_tokens: int, budget: float) -> tuple[RecipeStats | None, Bucket | None]:
        """The cheapest recipe whose loss bound fits ``budget`` (points) for this shape, and its bucket;
        ``(None, bucket)`` when none fits, ``(None, None)`` when no bucket covers the shape."""
        bucket = self.bucket_for(moved, document_tokens)
        if bucket is None:
            return None, None
        return next((s for s in bucket.recipes if s.loss_upper <= budget), None), bucket

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON."""
        d = asdict(self)
        for b in d["buckets"]:
            for s in b["recipes"]:
                s["mode"] = s["mode"].value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Profile:
        """The profile :meth:`to_dict` wrote (raises ``KeyError``/``TypeError``/``ValueError`` on another shape)."""
        buckets = tuple(
            Bucket(
                **{k: v for k, v in b.items() if k != "recipes"},
                recipes=tuple(RecipeStats(**{**s, "mode": Mode(s["mode"])}) for s in b["recipes"]),
            )
            for b in d["buckets"]
        )
        rows = tuple(Row(**r) for r in d.get("rows", ()))
        return cls(**{**d, "buckets": buckets, "rows": rows})

    def save(self, path: str | Path) -> Path:
        """Write the profile to ``path`` (atomically: a temporary file renamed); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Profile | None:
        """The profile in ``path``, or ``None`` when there is none or it is not a profile of this version."""
        try:
            data = json.loads(Path(path).read_text())
            return cls.from_dict(data) if data.get("version") == VERSION else None
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def matches(self, model_digest: str, tokenizer_digest: str) -> bool:
        """Whether this profile was made for the model and tokenizer with these digests."""
        return self.model_digest == model_digest and self.tokenizer_digest == tokenizer_digest


def profile_dir(store: Any) -> Path:
    """Where profiles are kept for ``store``: ``profiles/`` inside the folder of its disk tier (beside the
    artifacts), or ``$KV_RAG_HOME/profiles`` for a store without one."""
    for tier in reversed(getattr(store, "tiers", ())):
        directory = getattr(tier, "directory", None)
        if directory is not None:
            return Path(directory) / "profiles"
    return home() / "profiles"


def profile_path(store: Any, model_digest: str, tokenizer_digest: str) -> Path:
    """The file of the profile of a model and tokenizer (by their digests) beside ``store``'s artifacts."""
    return profile_dir(store) / f"{model_digest[:32]}-{tokenizer_digest[:16]}.json"
