"""Conversations keep their KV: the next turn of a chat loads its history instead of prefilling it.

In exact mode, when a request ends, the KV of its prompt and of the answer it generated is kept here
(per loaded model, per tenant, in memory, bounded by bytes, least recently used first). A later
prompt that starts with the same tokens (the same conversation with a new message appended, as
LangChain message histories and LlamaIndex chat engines build them) loads the longest such start
and prefills only what follows. Only a continuation is loaded: the new prompt must go on past the
kept turn's prompt into its answer (a prompt asked again is served by the store as before). The
match is on token ids, so what is loaded was computed from
exactly the same tokens at the same positions: the same KV a full prefill computes (as any exact
hit). A kept turn that a longer one extends is dropped (the longer one holds it).

``KV_RAG_CONVERSATION_BYTES`` bounds the memory (default 256 MiB; ``0`` turns it off).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

#: Default bound on the kept KV, in bytes.
CONVERSATION_BYTES = 256 << 20

#: Shortest start worth loading from a kept turn (shorter ones are prefilled).
MIN_TOKENS = 16


def conversation_bytes() -> int:
    """``KV_RAG_CONVERSATION_BYTES`` or :data:`CONVERSATION_BYTES`."""
    env = os.environ.get("KV_RAG_CONVERSATION_BYTES", "").strip()
    return max(0, int(env)) if env else CONVERSATION_BYTES


@dataclass(frozen=True)
class Turn:
    """A kept prompt-and-answer: its token ids, per-layer keys and values ``[kv_heads, n, dim]``, and how
    many of the ids were its prompt."""

    ids: torch.Tensor
    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    prompt: int = 0

    @property
    def nbytes(self) -> int:
        """Bytes of its tensors."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def head(self, n: int) -> Turn:
        """Its first ``n`` tokens (views)."""
        return Turn(self.ids[:n], tuple(k[:, :n] for k in self.keys), tuple(v[:, :n] for v in self.values), self.prompt)


class Conversations:
    """Kept turns of one loaded model. Thread-safe."""

    def __init__(self, max_bytes: int | None = None) -> None:
        self.max_bytes = conversation_bytes() if max_bytes is None else max_bytes
        self._turns: OrderedDict[int, tuple[str, Turn]] = OrderedDict()
        self._bytes = 0
        self._next = 0
        self._lock = threading.Lock()

    def fits(self, tokens: int, cache: Any) -> bool:
        """Whether a turn of ``tokens`` tokens of ``cache`` could be kept (long enough, and within the bound)."""
        layers = list(cache.layers)  # sized from the buffers' shapes: no views made
        return bool(layers) and tokens >= MIN_TOKENS and tokens * sum(_row_bytes(la) for la in layers) <= self.max_bytes

    def keep(self, scope: str, ids: Sequence[int], cache: Any, prompt: int = 0) -> None:
        """Keep the KV ``cache`` holds for ``ids`` (its first ``len(ids)`` rows) under ``scope`` (a tenant);
        the first ``prompt`` ids were the request's prompt, the rest its answer."""
        layers = list(cache.layers)
        n = min(len(ids), int(layers[0].keys.shape[-2])) if layers else 0
        if not self.fits(n, cache):
            return
        keys = tuple(layer.keys[0, :, :n].clone() for layer in layers)
        values = tuple(layer.values[0, :, :n].clone() for layer in layers)
        turn = Turn(torch.tensor(list(ids[:n]), dtype=torch.long), keys, values, prompt)
        with self._lock:
            for k in [k for k, (s, t) in self._turns.items() if s == scope and _starts(turn.ids, t.ids)]:
                self._bytes -= self._turns.pop(k)[1].nbytes  # held by the new, longer turn
            self._turns[self._next] = (scope, turn)
            self._next += 1
            self._bytes += turn.nbytes
            while self._bytes > self.max_bytes and self._turns:
                self._bytes -= self._turns.popitem(last=False)[1][1].nbytes

    def match(self, scope: str, ids: Sequence[int]) -> tuple[int, Turn | None]:
        """The longest start of ``ids`` a kept turn of ``scope`` holds, among the turns ``ids`` continue (it
        goes on past their prompt): ``(tokens, the turn)`` (0, ``None``: none)."""
        if not self._turns or len(ids) < MIN_TOKENS:
            return 0, None
        want = torch.tensor(list(ids), dtype=torch.long)
        best, found = 0, None
        with self._lock:
            for k, (s, turn) in self._turns.items():
                if s != scope:
                    continue
                m = _common(turn.ids, want)
                if m > best and m > turn.prompt:
                    best, found = m, k
            if found is None or best < MIN_TOKENS:
                return 0, None
            self._turns.move_to_end(found)
            return best, self._turns[found][1]

    def __len__(self) -> int:
        return len(self._turns)

    def clear(self) -> None:
        """Forget every kept turn."""
        with self._lock:
            self._turns.clear()
            self._bytes = 0


def _common(a: torch.Tensor, b: torch.Tensor) -> int:
    """Length of the common start of two 1-D id tensors."""
    n = min(len(a), len(b))
    diff = (a[:n] != b[:n]).nonzero()
    return int(diff[0, 0]) if len(diff) else n


def _starts(longer: torch.Tensor, shorter: torch.Tensor) -> bool:
    """Whether ``shorter`` is a start of ``longer``."""
    return len(shorter) <= len(longer) and _common(longer, shorter) == len(shorter)


def _row_bytes(layer: Any) -> int:
    """Bytes one token takes in a cache layer (keys and values), from its buffers' shapes when it has them."""
    ts: list[Any] = [getattr(layer, "key_buffer", None), getattr(layer, "value_buffer", None)]
    if any(t is None for t in ts):
        ts = [layer.keys, layer.values]
    return sum(t.element_size() * t.shape[1] * t.shape[-1] for t in ts)
