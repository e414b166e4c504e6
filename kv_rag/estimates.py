"""How long loading a piece from a tier takes, and how long computing it would take, measured as requests run.

A hit is only worth loading when the load is faster than a prefill of the same tokens: on a GPU, a
disk-tier hit of a 4k-token document took 572 ms against 91 ms for the full prefill (H200,
Qwen3-4B shape). The store measures every load per tier (:meth:`Speeds.loaded`, bytes over
seconds), the engine measures every long enough prefill (:meth:`Speeds.prefilled`, tokens over
seconds); both are exponentially weighted moving averages, so they follow the page cache, a
loaded disk or a busy GPU. The planner (:mod:`kv_rag.plan`) recomputes a piece whose estimated
load is slower than its estimated prefill. Until the disk or Redis tier has been measured, its
speed is taken as :data:`PRIOR_BYTES_PER_S` (so a first disk hit on a GPU is recomputed rather than
loaded at several times a prefill's cost); until the prefill has been measured once, nothing is
recomputed (loading is assumed to pay).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

#: Weight of the newest measurement in the moving averages.
ALPHA = 0.3

#: Recompute only when loading is estimated this much slower than prefilling (a margin for noise).
MARGIN = 1.05

#: Prefills shorter than this many tokens are not measured (fixed overheads dominate them).
MIN_PREFILL_TOKENS = 128

#: Load speeds (bytes/s) assumed for tiers outside the process until they are measured: about what
#: a 4k-token artifact's first load from local disk reached on the H200 machine (604 MB in 0.56 s).
PRIOR_BYTES_PER_S = {"disk": 1.0e9, "redis": 0.5e9}

#: Loads smaller than this many bytes are not measured (opening a file or a round trip dominates them,
#: which would make a tier look slower per byte than it is for the long pieces that matter).
MIN_LOAD_BYTES = 4 << 20


@dataclass
class Rate:
    """A moving average of an amount per second (``None`` until measured)."""

    per_s: float | None = None

    def update(self, amount: float, seconds: float) -> None:
        """Fold in one measurement of ``amount`` done in ``seconds``."""
        if amount <= 0 or seconds <= 0:
            return
        rate = amount / seconds
        self.per_s = rate if self.per_s is None else (1 - ALPHA) * self.per_s + ALPHA * rate

    def seconds(self, amount: float) -> float | None:
        """Estimated seconds for ``amount`` (``None`` until measured)."""
        return None if not self.per_s else amount / self.per_s


class Speeds:
    """Measured load speed per tier (bytes/s) and prefill speed (tokens/s). Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.tiers: dict[str, Rate] = {}
        self.prefill = Rate()
        #: ``False``: estimates are still kept but never offered, so every stored piece is loaded (to
        #: measure a tier itself, as ``benchmarks/gpu/gpu_bench.py`` does)
        self.decide = True

    def loaded(self, tier: str, nbytes: int, seconds: float) -> None:
        """Record that ``nbytes`` came from ``tier`` in ``seconds`` (reading, checking, copying up); loads
        smaller than :data:`MIN_LOAD_BYTES` are ignored."""
        if nbytes >= MIN_LOAD_BYTES:
            with self._lock:
                self.tiers.setdefault(tier, Rate()).update(nbytes, seconds)

    def prefilled(self, tokens: int, seconds: float) -> None:
        """Record a prefill of ``tokens`` that took ``seconds`` (shorter ones than
        :data:`MIN_PREFILL_TOKENS` are ignored)."""
        if tokens >= MIN_PREFILL_TOKENS:
            with self._lock:
                self.prefill.update(tokens, seconds)

    def load_s(self, tier: str, nbytes: int) -> float | None:
        """Estimated seconds to load ``nbytes`` from ``tier`` (``None`` when not deciding, or until measured
        for a tier without a :data:`PRIOR_BYTES_PER_S`)."""
        if not self.decide:
            return None
        with self._lock:
            rate = self.tiers.get(tier)
            if rate is not None and rate.per_s:
                return rate.seconds(nbytes)
        prior = PRIOR_BYTES_PER_S.get(tier)
        return nbytes / prior if prior else None

    def prefill_s(self, tokens: int) -> float | None:
        """Estimated seconds to prefill ``tokens`` (``None`` until measured)."""
        with self._lock:
            return self.prefill.seconds(tokens)


def recompute_reason(store: Speeds, model: Speeds, tier: str, nbytes: int, tokens: int) -> str | None:
    """Why loading ``nbytes`` from ``tier`` (the store's measured speeds) should give way to prefilling
    its ``tokens`` (the model's), or ``None`` when loading is not known to be slower."""
    load, compute = store.load_s(tier, nbytes), model.prefill_s(tokens)
    if load is None or compute is None or load <= MARGIN * compute:
        return None
    return (
        f"faster than loading from the {tier} tier "
        f"(estimated {1000 * load:.0f} ms to load, {1000 * compute:.0f} ms to compute)"
    )
