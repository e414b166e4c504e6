"""Batched decode on CUDA: one CUDA graph steps every live request of an arena at once.

The static pool (:mod:`kv_rag.runtime.pool`) makes its slots of one capacity in an :class:`Arena`:
per layer one K and one V tensor ``[slots (+ scratch), kv_heads, cap, dim]``. Each slot's cache
uses its row of the arena as buffers; the rows ``(slot, kv head)`` are contiguous runs of ``cap``
tokens, so flash's varlen kernel reads any set of slots from one tensor, with the offsets and
lengths on the device. A :class:`BatchStep` is one graph per arena for a decode step of up to
``slots`` requests (one token each): the projections and the MLP run once for all of them (the
weights are read once), each request's key and value go into its own slot, and attention is
split-KV over each request's cached rows, merged by log-sum-exp.

The graph always runs :func:`batch_slots` rows, however many slots its arena has (a smaller arena is
made when the pool has no room for a full one): missing requests are padding rows that write into the
arena's scratch slot. A request's arithmetic is therefore the same whichever and however many other
requests share its step, and in whichever arena it is (matrix products of one fixed shape round each
row the same way), so greedy answers do not depend on the load. A request on a block lent by the GPU
tier is first moved into an arena slot (one copy on the device, before its first batched step).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from .decoder import bucket_size

if TYPE_CHECKING:
    from .decoder import FastDecoder

#: Requests an arena holds, hence the rows of its batched step (``KV_RAG_BATCH_SLOTS``; 1: no batching).
BATCH_SLOTS = 32

#: Fewest cached rows per split of the batched attention (a request's rows are cut into at most
#: ``cap // SPLIT_ROWS`` chunks, at most :data:`MAX_SPLITS`).
SPLIT_ROWS = 512
MAX_SPLITS = 16

#: Tokens of one batched prefill run (requests x their padded length); longer prompt tails, and
#: caches longer than :data:`PREFILL_CONTEXT`, are prefilled one request at a time.
PREFILL_TOKENS = 256
PREFILL_CONTEXT = 8192


def prefill_bucket(n: int) -> int:
    """Tokens per request of the batched prefill of an ``n``-token prompt tail: 2, 4 or 8 for short tails,
    else 32 (or 64): a chat turn's tail (a question and the template's framing, typically 10-30 tokens)
    lands in one bucket, so that the tails of a burst of requests run as one graph."""
    if n <= 8:
        return bucket_size(n)
    return 32 if n <= 32 else 64


def batch_slots() -> int:
    """Slots per arena: ``KV_RAG_BATCH_SLOTS`` or :data:`BATCH_SLOTS`."""
    env = os.environ.get("KV_RAG_BATCH_SLOTS", "").strip()
    return max(1, int(env)) if env else BATCH_SLOTS


def scratch_slots() -> int:
    """Scratch slots an arena has besides its own (where the padding rows of batched steps write): one,
    none without batching."""
    return 1 if batch_slots() > 1 else 0


class Arena:
    """K/V buffers of ``n`` slots of ``cap`` tokens and a scratch slot (index ``n``, for the padding rows of
    batched steps; none when :func:`batch_slots` is 1: no batching), in one tensor each.

    ``k``/``v``: ``[layers, n + 1, kv_heads, cap, dim]``. Slot ``i``'s per-layer buffers are
    ``k[layer, i:i+1]`` (``[1, kv_heads, cap, dim]``, the shape a cache layer uses).
    """

    def __init__(self, pool: Any, n: int, shape: tuple[int, int, int, int], dtype: torch.dtype) -> None:
        """``pool``: the :class:`~kv_rag.runtime.pool.StaticPool` making it (the pool imports this module)."""
        _, kv_heads, cap, dim = shape
        layers = len(pool.dec.inner.layers)
        self.pool = pool
        self.n = n
        self.cap = cap
        self.dtype = dtype
        total = n + scratch_slots()
        self.k = torch.empty((layers, total, kv_heads, cap, dim), dtype=dtype, device=pool.device)
        self.v = torch.empty((layers, total, kv_heads, cap, dim), dtype=dtype, device=pool.device)
        self.nbytes = 2 * self.k.numel() * self.k.element_size()
        #: its :class:`~kv_rag.runtime.pool.StaticSlot`\ s, made by the pool
        self.slots: list[Any] = []
        self._step: BatchStep | None = None
        self._refused = False
        self._prefills: dict[tuple[int, int], BatchPrefill | None] = {}

    def buffers(self, i: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Slot ``i``'s per-layer K and V buffers ``[1, kv_heads, cap, dim]``."""
        return list(self.k[:, i : i + 1].unbind(0)), list(self.v[:, i : i + 1].unbind(0))

    def free(self) -> bool:
        """Whether no live cache owns any of its slots."""
        return all(s.free() for s in self.slots)

    def step(self) -> BatchStep | None:
        """The batched step graph (captured on first use; ``None`` if capture was refused)."""
        if self._step is None and not self._refused:
            try:
                self._step = BatchStep(self)
            except RuntimeError as exc:
                warnings.warn(f"kv-rag: batched decode graph unavailable ({exc}); stepping one by one", stacklevel=3)
                self._refused = True
        return self._step

    @staticmethod
    def prefill_rows(size: int) -> int:
        """Requests one batched prefill of ``size`` tokens each runs at most (about :data:`PREFILL_TOKENS`
        tokens in all: the matrix products stay memory-bound). The same in every arena, so that a
        request's arithmetic does not depend on the arena it got."""
        return max(1, min(batch_slots(), PREFILL_TOKENS // size))

    def prefill(self, size: int, requests: int = 1) -> BatchPrefill | None:
        """The batched prefill graph for ``requests`` requests of ``size`` tokens each (``None`` if capture
        was refused). The first call for a ``size`` captures the graphs of
        every number of requests at once (see :class:`BatchPrefill`'s ``live``), so that a later burst
        captures nothing."""
        rows = self.prefill_rows(size)
        live = min(rows, 1 << max(0, requests - 1).bit_length())
        if (size, live) not in self._prefills:
            for n in sorted({min(rows, 1 << i) for i in range(rows.bit_length() + 1)}):
                try:
                    self._prefills[size, n] = BatchPrefill(self, size, n)
                except RuntimeError as exc:
                    warnings.warn(
                        f"kv-rag: batched prefill graph unavailable ({exc}); prefilling one by one", stacklevel=3
                    )
                    self._prefills[size, n] = None
        return self._prefills[size, live]


def _capture(step: Any, dec: Any, dev: torch.device, mempool: Any) -> tuple[Any, torch.Tensor]:
    """Warm ``step.body`` up on a side stream (compiles, handles, workspaces; plain functions if the
    compiled ones fail), then capture it as a CUDA graph: ``(graph, its output)``."""
    cur = torch.cuda.current_stream(dev)
    side = torch.cuda.Stream(dev)
    side.wait_stream(cur)
    with torch.cuda.stream(side):
        try:
            step.body()
        except Exception as exc:
            kern = dec.kernels()[0]
            if not kern.compiled:
                raise
            warnings.warn(f"kv-rag: compiled layer functions failed ({exc}); using plain ones", stacklevel=5)
            kern.plain()
            step.body()
    cur.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=mempool, capture_error_mode="thread_local"):
        out = step.body()
    return graph, out


class BatchStep:
    """One CUDA graph for a decode step of up to ``arena.n`` requests, one token each, in one arena; it runs
    :func:`batch_slots` rows in every arena (the rest padding).

    Inputs (static, on the device): ``meta`` ``[4, rows]`` = token ids, rotary positions, slot index
    and the cache row each token is written to. Output: float32 logits ``[rows, vocab]``.
    """

    def __init__(self, arena: Arena) -> None:
        self.arena = arena
        dec: FastDecoder = arena.pool.dec
        self.dec = dec
        dev = arena.pool.device
        #: rows of the graph: the same in every arena (matrix products of one shape)
        self.rows = max(arena.n, batch_slots())
        cfg = dec.model.config
        self.kv_heads = dec.kv_heads
        self.group = int(cfg.num_attention_heads) // dec.kv_heads
        self.splits = max(1, min(MAX_SPLITS, arena.cap // SPLIT_ROWS))
        self.max_k = -(-arena.cap // self.splits)
        elements = self.rows * self.kv_heads * self.splits
        self.cum_q = torch.arange(0, (elements + 1) * self.group, self.group, dtype=torch.int32, device=dev)
        self.heads = torch.arange(self.kv_heads, device=dev)
        self.cut = torch.arange(self.splits + 1, device=dev)
        self.end = torch.tensor([arena.k.shape[1] * self.kv_heads * arena.cap], dtype=torch.int32, device=dev)
        self.meta = torch.zeros((4, self.rows), dtype=torch.long, device=dev)
        self.meta.copy_(self._padding(0).to(dev))
        self.pinned = torch.cuda.is_available()
        self.graph, self.logits = _capture(self, dec, dev, arena.pool.mempool)

    def _padding(self, real: int) -> torch.Tensor:
        """Host ``meta`` with rows ``real..`` as padding: token 0 at position 0, written to distinct rows
        of the scratch slot."""
        meta = torch.zeros((4, self.rows), dtype=torch.long)
        meta[2, real:] = self.arena.n
        meta[3, real:] = torch.arange(self.rows - real) % self.arena.cap
        return meta

    def body(self) -> torch.Tensor:
        """The step: embed, every layer (append + attention), head of every row."""
        dec, arena, meta = self.dec, self.arena, self.meta
        ids, pos, slot, row = meta[0], meta[1], meta[2], meta[3]
        h, cos, sin = dec.embed(ids.unsqueeze(0), pos.unsqueeze(0))
        cos, sin = cos.transpose(1, 2), sin.transpose(1, 2)  # [1, rows, 1, dim]
        # every (row, kv head, split) is one varlen element: its start in the flattened arena and its length
        lens = row + 1
        bounds = (lens.unsqueeze(1) * self.cut.unsqueeze(0)) // self.splits  # [rows, splits + 1]
        base = (slot.unsqueeze(1) * self.kv_heads + self.heads.unsqueeze(0)) * arena.cap  # [rows, kv_heads]
        starts = (base.unsqueeze(2) + bounds[:, None, :-1]).reshape(-1)
        used = (bounds[:, 1:] - bounds[:, :-1]).unsqueeze(1).expand(-1, self.kv_heads, -1).reshape(-1)
        cu_k = torch.cat([starts.to(torch.int32), self.end])
        used = used.to(torch.int32)
        at = (slot.unsqueeze(1), self.heads.unsqueeze(0), row.unsqueeze(1))
        kern, w_pre, w_post, eps = dec.kernels()
        for i in range(arena.k.shape[0]):
            if dec.fusable:
                q, k, v = kern.pre(h, cos, sin, w_pre[i], eps, dec.head_dim)
            else:
                q, k, v = dec.pre_rows(i, h, cos, sin)
            kb, vb = arena.k[i], arena.v[i]
            kb.index_put_(at, k[0])
            vb.index_put_(at, v[0])
            o = self.attend(kern, q, kb, vb, cu_k, used)
            h = kern.post(h, o, w_post[i], eps) if dec.fusable else dec.post_rows(i, h, o)
        return dec.head(h)

    def attend(
        self, kern: Any, q: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor, cu_k: torch.Tensor, used: torch.Tensor
    ) -> torch.Tensor:
        """Attention of each row's query ``[1, rows, heads, dim]`` over its own slot: ``[rows, heads, dim]``."""
        dim = q.shape[-1]
        qs = kern.pack_rows(q, self.kv_heads, self.splits)
        o, lse = torch.ops.aten._flash_attention_forward(
            qs,
            kb.view(-1, 1, dim),
            vb.view(-1, 1, dim),
            self.cum_q,
            cu_k,
            self.group,
            self.max_k,
            0.0,
            False,
            False,
            scale=self.dec.scaling,
            seqused_k=used,
        )[:2]
        return kern.merge_rows(o, lse, self.rows, self.kv_heads, self.splits)

    def run(self, items: Sequence[tuple[int, Any, int]]) -> torch.Tensor:
        """Logits ``[len(items), vocab]`` of one token per request: ``(token, cache, position)`` per request,
        every cache on a slot of this arena; the caches are extended by one row."""
        n = len(items)
        if not 0 < n <= self.rows:
            raise ValueError(f"a batched step takes 1..{self.rows} requests, got {n}")
        meta = self._padding(n)
        firsts = []
        for j, (tid, cache, pos) in enumerate(items):
            first = int(cache.layers[0].length)
            meta[0, j], meta[1, j], meta[2, j], meta[3, j] = tid, pos, cache.slot.index, first
            firsts.append(first)
        self.meta.copy_(meta.pin_memory() if self.pinned else meta, non_blocking=True)
        if self.dec.replay:
            self.graph.replay()
            out = self.logits
        else:
            out = self.body()
        for (_, cache, _), first in zip(items, firsts, strict=True):
            for cl in cache.layers:
                cl.filled_to(first + 1)
        return out[:n].clone()


class BatchPrefill:
    """One CUDA graph prefilling up to :attr:`rows` requests of one arena with ``size`` tokens each.

    The last few prompt tokens of several hits (their questions) run as one forward: the weights are
    read once for all of them. Requests with fewer tokens are padded at their end (the padding
    tokens are written past the request's rows, which later steps overwrite); missing requests are
    padding rows in the scratch slot. The graph always runs :attr:`rows` x ``size`` tokens, so a
    request's arithmetic does not depend on which others share it. Attention: split-KV over each
    request's cached rows in its slot of the arena plus causal attention over its own tokens
    (flash's varlen kernel for both), merged by log-sum-exp.

    ``live``: the graph attends for the first ``live`` rows only (the padding rows' attention output is
    zero). Attention is computed row by row (every row's varlen elements are its own), so a request's
    arithmetic is the same in the graphs of every ``live``, while the matrix products always run all
    :attr:`rows`: a lone request does not pay the attention of seven padding rows.

    Inputs (static, on the device): ``meta`` ``[4, rows * size]`` = token ids, rotary positions, slot
    index and the cache row each token is written to; ``real`` ``[rows]`` = real tokens per request.
    Output: float32 logits ``[rows, vocab]`` of each request's last real token.
    """

    def __init__(self, arena: Arena, size: int, live: int | None = None) -> None:
        self.arena = arena
        self.size = size
        dec: FastDecoder = arena.pool.dec
        self.dec = dec
        dev = arena.pool.device
        #: rows of the matrix products: about PREFILL_TOKENS tokens in all (they stay memory-bound)
        self.rows = arena.prefill_rows(size)
        #: requests per run: the rows attention is computed for
        self.live = self.rows if live is None else max(1, min(live, self.rows))
        self.kv_heads = dec.kv_heads
        cap, total = arena.cap, arena.k.shape[1]
        # the arena's layer as varlen keys: token t of slot s, head h at ((s * kv_heads + h) * cap + t) * dim
        self.flat_len = (total * self.kv_heads - (self.kv_heads - 1)) * cap
        self.cum_q = torch.arange(0, (self.live + 1) * size, size, dtype=torch.int32, device=dev)
        self.end = torch.tensor([total * self.kv_heads * cap], dtype=torch.int32, device=dev)
        # split-KV over each request's cached rows (flash-decoding): one varlen element per (request,
        # chunk), so that a long cache is read by many thread blocks at once, not by one per head
        self.group = int(dec.model.config.num_attention_heads) // self.kv_heads
        self.splits = max(1, min(MAX_SPLITS, min(cap, PREFILL_CONTEXT) // SPLIT_ROWS))
        self.max_k = -(-min(cap, PREFILL_CONTEXT) // self.splits)
        rows_q = self.group * size
        self.cum_q_old = torch.arange(0, (self.live * self.splits + 1) * rows_q, rows_q, dtype=torch.int32, device=dev)
        self.cut = torch.arange(self.splits + 1, device=dev)
        self.offsets = torch.arange(size, device=dev)
        self.meta = torch.zeros((4, self.rows * size), dtype=torch.long, device=dev)
        self.real = torch.ones(self.rows, dtype=torch.long, device=dev)
        self.meta.copy_(self._padding(0)[0].to(dev))
        self.pinned = torch.cuda.is_available()
        self.graph, self.logits = _capture(self, dec, dev, arena.pool.mempool)

    def _padding(self, real: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Host ``meta`` and ``real`` with rows ``real..`` as padding: token 0 at positions 0.., written
        to the scratch slot's first rows."""
        meta = torch.zeros((4, self.rows, self.size), dtype=torch.long)
        meta[1, real:] = torch.arange(self.size)
        meta[2, real:] = self.arena.n
        meta[3, real:] = torch.arange(self.size)
        return meta.view(4, -1), torch.full((self.rows,), self.size, dtype=torch.long)

    def _keys(self, buf: torch.Tensor) -> torch.Tensor:
        """An arena layer ``[slots, kv_heads, cap, dim]`` as varlen keys ``[tokens, kv_heads, dim]``."""
        dim = buf.shape[-1]
        return buf.as_strided((self.flat_len, self.kv_heads, dim), (dim, self.arena.cap * dim, 1))

    def body(self) -> torch.Tensor:
        """The prefill: embed, every layer (append + attention), head of each request's last real token."""
        dec, arena, meta, size = self.dec, self.arena, self.meta, self.size
        ids, pos, slot, row = meta[0], meta[1], meta[2], meta[3]
        h, cos, sin = dec.embed(ids.unsqueeze(0), pos.unsqueeze(0))
        cos, sin = cos.transpose(1, 2), sin.transpose(1, 2)  # [1, tokens, 1, dim]
        firsts = meta[:, : self.live * size : size]  # each request's first token: its slot, its cached rows
        bounds = (firsts[3].unsqueeze(1) * self.cut.unsqueeze(0)) // self.splits  # [rows, splits + 1]
        starts = (firsts[2] * self.kv_heads * arena.cap).unsqueeze(1) + bounds[:, :-1]  # chunk starts
        cu_k = torch.cat([starts.reshape(-1).to(torch.int32), self.end])
        used = (bounds[:, 1:] - bounds[:, :-1]).reshape(-1).to(torch.int32)
        last = torch.arange(self.rows, device=ids.device) * size + self.real - 1
        heads = torch.arange(self.kv_heads, device=ids.device)
        at = (slot.unsqueeze(1), heads.unsqueeze(0), row.unsqueeze(1))
        attended = self.live * size
        pad = None
        if self.live < self.rows:  # the padding rows' attention output
            n_heads = self.group * self.kv_heads
            pad = h.new_zeros(((self.rows - self.live) * size, n_heads, dec.head_dim))
        kern, w_pre, w_post, eps = dec.kernels()
        for i in range(arena.k.shape[0]):
            if dec.fusable:
                q, k, v = kern.pre(h, cos, sin, w_pre[i], eps, dec.head_dim)
            else:
                q, k, v = dec.pre_rows(i, h, cos, sin)
            kb, vb = arena.k[i], arena.v[i]
            kb.index_put_(at, k[0])
            vb.index_put_(at, v[0])
            o = self.attend(kern, q[:, :attended], k[:, :attended], v[:, :attended], kb, vb, cu_k, used)
            if pad is not None:
                o = torch.cat([o, pad])
            h = kern.post(h, o, w_post[i], eps) if dec.fusable else dec.post_rows(i, h, o)
        return dec.head(h.index_select(1, last))

    def attend(
        self,
        kern: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kb: torch.Tensor,
        vb: torch.Tensor,
        cu_k: torch.Tensor,
        used: torch.Tensor,
    ) -> torch.Tensor:
        """Attention of every request's tokens (``q``/``k``/``v`` ``[1, rows * size, heads, dim]``):
        ``[rows * size, heads, dim]``. Split-KV over the cached rows (no mask: they all precede the
        step), causal flash over each request's own tokens, merged by log-sum-exp (as the
        one-request :class:`~kv_rag.runtime.pool.StepGraph` does)."""
        size, scale = self.size, self.dec.scaling
        qs = kern.pack_batch(q, self.kv_heads, self.live, self.splits)
        o_old, lse_old = torch.ops.aten._flash_attention_forward(
            qs, self._keys(kb), self._keys(vb), self.cum_q_old, cu_k, self.group * size, self.max_k, 0.0, False,
            False, scale=scale, seqused_k=used,
        )[:2]  # fmt: skip
        o_new, lse_new = torch.ops.aten._flash_attention_forward(
            q[0], k[0], v[0], self.cum_q, self.cum_q, size, size, 0.0, True, False, scale=scale
        )[:2]
        return kern.merge_batch(o_old, lse_old, o_new, lse_new, self.live, self.splits)

    def run(self, items: Sequence[tuple[Sequence[int], Any, int]]) -> torch.Tensor:
        """Logits ``[len(items), vocab]`` of each request's last token: ``(ids, cache, position)`` per
        request (at most :attr:`rows`, at most ``size`` ids each, every cache on a slot of this arena,
        with room for ``size`` more rows); the caches are extended by their ids."""
        n = len(items)
        if not 0 < n <= self.live:
            raise ValueError(f"this batched prefill takes 1..{self.live} requests, got {n}")
        meta3, real = self._padding(n)
        meta = meta3.view(4, self.rows, self.size)
        firsts = []
        for j, (ids, cache, pos) in enumerate(items):
            k = len(ids)
            if not 0 < k <= self.size:
                raise ValueError(f"a batched prefill of {self.size} tokens got {k}")
            first = int(cache.layers[0].length)
            meta[0, j, :k] = torch.tensor(list(ids))
            meta[1, j] = pos + torch.arange(self.size)
            meta[2, j] = cache.slot.index
            meta[3, j] = first + torch.arange(self.size)
            real[j] = k
            firsts.append(first + k)
        if self.pinned:
            meta3, real = meta3.pin_memory(), real.pin_memory()
        self.meta.copy_(meta3, non_blocking=True)
        self.real.copy_(real, non_blocking=True)
        if self.dec.replay:
            self.graph.replay()
            out = self.logits
        else:
            out = self.body()
        for (_, cache, _), last in zip(items, firsts, strict=True):
            for cl in cache.layers:
                cl.filled_to(last)
        return out[:n].clone()
