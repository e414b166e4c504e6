"""Why a piece of a request was not loaded: the reason code every ``miss`` carries.

Codes (:class:`kv_rag.results.MissReason`):

- ``absent``: no tier holds the artifact, and nothing says it was ever stored here;
- ``evicted``: a tier of this process dropped it to make room;
- ``damaged``: a tier held it, but it failed its checks (corrupt, truncated, foreign, mismatched)
  and was dropped;
- ``untrusted``: a tier held it, but the store requires trust (``Engine(trust=...)``) and it is
  unsigned, signed by an untrusted key, or tampered with after signing; it was skipped, not deleted;
- ``other_context``: the same document is stored, but after other preceding text (in exact mode a
  document's artifact is valid only after the same text before it; see docs/concepts.md);
- ``after_miss``: the artifact is stored, but a piece before it in the chain missed, so it was
  computed with that piece (a chain loads up to its first gap).

:class:`MissExplainer` remembers, per planner (hence per tenant: one tenant's documents never
explain another's misses), which keys each document's tokens were planned under.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

#: Documents remembered per planner, and keys per document.
DOCUMENTS = 4096
KEYS_PER_DOCUMENT = 8


class MissExplainer:
    """Reason codes for pieces a store does not hold. Thread-safe."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self._keys: OrderedDict[str, list[str]] = OrderedDict()
        self._lock = threading.Lock()

    def seen(self, digest: str, key: str) -> None:
        """A document whose tokens have ``digest`` was planned under ``key``."""
        with self._lock:
            keys = self._keys.pop(digest, [])
            if key not in keys:
                keys = [*keys[-(KEYS_PER_DOCUMENT - 1) :], key]
            self._keys[digest] = keys
            while len(self._keys) > DOCUMENTS:
                self._keys.popitem(last=False)

    def explain(self, key: str, digest: str, document: bool, after_gap: bool) -> str:
        """The reason code for ``key`` missing. ``after_gap``: an earlier piece of its chain missed
        (the key was not looked up)."""
        if after_gap and self.store.locate(key) is not None:
            return "after_miss"
        code = str(self.store.why_missing(key))
        if code != "absent" or not document:
            return code
        with self._lock:
            others = [k for k in self._keys.get(digest, ()) if k != key]
        if any(self.store.locate(k) is not None for k in others):
            return "other_context"
        return code
