"""Why a key is missing: what this process saw happen to artifacts that are no longer stored.

A miss carries a reason code (:class:`kv_rag.results.MissReason`). The tiers record here, by key,
what removed an artifact: ``evicted`` (dropped to make room) or ``damaged`` (found but failing its
checks, then dropped); the store records ``untrusted`` (found, failing its trust policy, skipped);
:meth:`kv_rag.store.Store.why_missing` reads it back. The record is per
process and bounded (the oldest entries go first): an artifact another process evicted, or one
removed long ago, is reported as ``absent``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

#: Keys remembered.
LIMIT = 8192

_lock = threading.Lock()
_gone: OrderedDict[str, str] = OrderedDict()


def record(key: str, code: str) -> None:
    """Remember that ``key`` was removed, and why (a :class:`~kv_rag.results.MissReason` value)."""
    with _lock:
        _gone.pop(key, None)
        _gone[key] = code
        while len(_gone) > LIMIT:
            _gone.popitem(last=False)


def forget(key: str) -> None:
    """``key`` was stored again: nothing to explain any more."""
    with _lock:
        _gone.pop(key, None)


def why(key: str) -> str | None:
    """What removed ``key`` (``None``: nothing this process saw)."""
    with _lock:
        return _gone.get(key)
