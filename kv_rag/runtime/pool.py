"""Static KV buffers and whole-step CUDA graphs (CUDA, half precision).

A cache built by the engine for a half-precision model on CUDA takes its KV buffers from the
model's :class:`StaticPool`: sets of per-layer buffers at fixed addresses (:class:`StaticSlot`),
sized to a capacity bucket, one live cache owning a slot at a time (held through a weak
reference, so a slot is free again once its cache is gone). A whole step (embedding, every layer
with its cache append and attention, the head) is then one CUDA graph (:class:`StepGraph`),
captured once per (slot, step-length bucket) and replayed by every later request that gets the
slot: attention is flash's varlen form, which reads the cached length from a device tensor
(``seqused_k``), and the append is an ``index_copy_`` at a position held on the device. The
host issues one replay per step.

Slots of one capacity are made together in an :class:`~kv_rag.runtime.batch.Arena` (one K and one
V tensor for all of them), so that one batched graph steps every live request of the arena at once
(:class:`~kv_rag.runtime.batch.BatchStep`); a new request takes a free slot in the busiest arena.

A slot can also stand for a block lent by the GPU tier (a cache-shaped block, see
:mod:`kv_rag.layout`): the cache then uses the tier's block as its buffers, without copying the
KV, and the slot keeps only the block's addresses and its graphs.

``KV_RAG_STATIC_BYTES`` caps the pool (default: a quarter of the GPU's memory, at most 48 GiB;
``0`` turns whole-step graphs off); ``KV_RAG_BATCH_SLOTS`` sets the slots per arena (default 32).
"""

from __future__ import annotations

import gc
import os
import time
import warnings
import weakref
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import torch

from .batch import Arena, batch_slots, scratch_slots
from .decoder import MAX_FAST_TOKENS, bucket_size

if TYPE_CHECKING:
    from .decoder import FastDecoder

#: Blocks lent by the GPU tier whose step graphs are kept (least recently used dropped first).
LENT_GRAPH_SETS = 32

#: Least seconds between two garbage collections the pool runs to find a free slot.
GC_INTERVAL_S = 1.0


def round_capacity(n: int) -> int:
    """``n`` rounded up to a coarse bucket (multiples of 1024, or of 1/16 of ``n`` when larger)."""
    step = max(1024, 1 << max(0, n.bit_length() - 4))
    return -(-n // step) * step


def pool_limit(device: torch.device) -> int:
    """Bytes the static pool may hold on ``device`` (``KV_RAG_STATIC_BYTES``, else min(48 GiB, 1/4 of the GPU))."""
    env = os.environ.get("KV_RAG_STATIC_BYTES", "").strip()
    if env:
        return int(env)
    total = int(torch.cuda.get_device_properties(device).total_memory)
    return min(48 << 30, total // 4)


def cache_buffers(cache: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The per-layer K and V buffers of a cache of :class:`~kv_rag.runtime.cache.PreallocatedLayer`."""
    return [cl.key_buffer for cl in cache.layers], [cl.value_buffer for cl in cache.layers]


#: Split-KV of a one-request step graph: chunks of at least this many cached rows, at most this many chunks.
STEP_SPLIT_ROWS = 256
STEP_MAX_SPLITS = 32


def _anchor_graph(device: torch.device, mempool: Any) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor] | None:
    """A graph of one addition captured into ``mempool`` (and its tensors), to be kept (see :class:`StaticPool`);
    ``None`` (with a warning) where capturing it fails: the pool then works as before, without the anchor."""
    try:
        with torch.cuda.device(device):
            x = torch.zeros(1, device=device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=mempool, capture_error_mode="thread_local"):
                y = x + 1
    except RuntimeError as exc:
        warnings.warn(f"kv-rag: the static pool's anchor graph was refused ({exc})", stacklevel=3)
        return None
    return graph, x, y


class StaticPool:
    """Static KV buffer sets (slots) of one model, least recently used first, bounded in bytes."""

    def __init__(self, dec: FastDecoder, device: torch.device, dtype: torch.dtype) -> None:
        self.dec = dec
        self.device = device
        #: the model's dtype (the dtype of the slots made for it)
        self.dtype = dtype
        self.max_bytes = pool_limit(device)
        #: slots of the same capacity are made together, in an arena (batched steps run per arena)
        self.arenas: list[Arena] = []
        self.slots: list[StaticSlot] = []
        #: step graphs of blocks lent by the GPU tier, by (K address, V address, layout): replayed only
        #: for a live cache whose buffers are exactly there, so they stay valid as long as they are kept
        self.adopted: OrderedDict[tuple[Any, ...], StaticSlot] = OrderedDict()
        self.mempool = torch.cuda.graph_pool_handle()
        #: a one-operation graph captured into the pool and kept while the pool lives: it holds the pool's
        #: use count above zero. Without it, dropping every arena destroys every graph of the pool while
        #: its memory may still be cached, and the next capture into it trips PyTorch's assertion
        #: (``use_count > 0`` in the CUDA caching allocator): every later graph is refused.
        self._anchor = _anchor_graph(device, self.mempool)
        self._collected = float("-inf")

    def _may_collect(self) -> bool:
        """Whether a garbage collection may run now: at most one a second (a burst of new requests, each
        finding every slot busy, would otherwise collect once per request)."""
        now = time.monotonic()
        if now - self._collected < GC_INTERVAL_S:
            return False
        self._collected = now
        return True

    @property
    def nbytes(self) -> int:
        """Bytes held by every arena."""
        return sum(a.nbytes for a in self.arenas)

    def _free_slot(self, cap: int, dtype: torch.dtype) -> StaticSlot | None:
        """A free slot of ``cap`` tokens, in the arena with the most live requests (so that concurrent
        requests share batched steps), the lowest index first."""
        best: tuple[int, StaticSlot] | None = None
        for arena in self.arenas:
            if arena.cap != cap or arena.dtype != dtype:
                continue
            busy = sum(not s.free() for s in arena.slots)
            slot = next((s for s in arena.slots if s.free()), None)
            if slot is not None and (best is None or busy > best[0]):
                best = (busy, slot)
        return best[1] if best is not None else None

    def acquire(self, cache: Any, capacity: int, dtype: torch.dtype) -> StaticSlot | None:
        """A free slot for ``cache`` with room for ``capacity`` tokens and a padded step (made if needed)."""
        cap = round_capacity(capacity + MAX_FAST_TOKENS)
        for attempt in range(2):
            slot = self._free_slot(cap, dtype)
            if slot is not None:
                self.arenas.remove(slot.arena)  # type: ignore[arg-type]
                self.arenas.append(slot.arena)  # type: ignore[arg-type]
                slot.take(cache)
                return slot
            if attempt or not any(a.cap == cap for a in self.arenas) or not self._may_collect():
                break
            gc.collect()  # a finished request's cache may be waiting in a reference cycle
        cfg = self.dec.model.config
        kv_heads = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
        shape = (1, kv_heads, cap, self.dec.head_dim)
        elem = torch.empty((), dtype=dtype).element_size()
        per_slot = 2 * len(self.dec.inner.layers) * cap * kv_heads * self.dec.head_dim * elem
        if per_slot > self.max_bytes:
            return None
        want, scratch = batch_slots(), scratch_slots()
        need = per_slot * (want + scratch)
        while self.nbytes + need > self.max_bytes:
            victim = next((a for a in self.arenas if a.free()), None)
            if victim is None:
                break
            self._drop(victim)
        room = (self.max_bytes - self.nbytes) // per_slot
        if room < 1 + scratch:
            return None
        n = min(want, room - scratch)  # a smaller arena where the pool is short (its graphs run as many rows)
        try:
            arena = Arena(self, n, shape, dtype)
        except torch.cuda.OutOfMemoryError:
            return None
        arena.slots = [StaticSlot(self, shape, dtype, arena=arena, index=i) for i in range(n)]
        self.arenas.append(arena)
        self.slots.extend(arena.slots)
        slot = arena.slots[0]
        slot.take(cache)
        return slot

    def _drop(self, arena: Arena) -> None:
        """Forget a free arena (its buffers and graphs go when nothing references them)."""
        self.arenas.remove(arena)
        self.slots = [s for s in self.slots if s.arena is not arena]

    def adopt(self, cache: Any, kblock: torch.Tensor, vblock: torch.Tensor) -> StaticSlot | None:
        """The slot standing for the GPU tier's blocks ``[layers, 1, kv_heads, cap, dim]``, given to
        ``cache``; ``None`` while another live cache uses them."""
        key = (kblock.data_ptr(), vblock.data_ptr(), tuple(kblock.shape), kblock.dtype)
        slot = self.adopted.get(key)
        if slot is None:
            slot = StaticSlot(self, tuple(kblock.shape[1:]), kblock.dtype, lent=(kblock, vblock))  # type: ignore[arg-type]
            self.adopted[key] = slot
            while len(self.adopted) > LENT_GRAPH_SETS:
                victim = next((k for k, s in self.adopted.items() if s.free()), None)
                if victim is None:
                    break
                del self.adopted[victim]
        elif not slot.free():
            if self._may_collect():
                gc.collect()  # a finished request's cache may be waiting in a reference cycle
            if not slot.free():
                return None
        self.adopted.move_to_end(key)
        slot.take(cache)
        return slot


class StaticSlot:
    """Per-layer K/V buffers ``[1, kv_heads, cap, dim]`` at fixed addresses and their step graphs.

    A slot either owns its buffers (made here, kept by the pool) or stands for a block lent by the
    GPU tier (``lent``: the buffers are the block's, held by the tier and the cache using it; the
    slot keeps only their addresses and its graphs).
    """

    def __init__(
        self,
        pool: StaticPool,
        shape: tuple[int, int, int, int],
        dtype: torch.dtype,
        lent: tuple[torch.Tensor, torch.Tensor] | None = None,
        arena: Arena | None = None,
        index: int = 0,
    ) -> None:
        self.pool = pool
        self.dec = pool.dec
        self.cap = shape[2]
        self.dtype = dtype
        #: the arena whose row ``index`` holds the slot's buffers (``None`` for a lent block)
        self.arena = arena
        self.index = index
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        if arena is not None:
            # the arena's row: layers are equally spaced views, so the engine fills all layers with one strided copy
            self.k, self.v = arena.buffers(index)
            self.k_ptr, self.v_ptr = self.k[0].data_ptr(), self.v[0].data_ptr()
        elif lent is not None:
            self.k_ptr, self.v_ptr = lent[0].data_ptr(), lent[1].data_ptr()
        else:
            raise ValueError("a static slot needs an arena or a lent block")
        self.steps: dict[int, StepGraph | None] = {}
        self._owner: weakref.ref[Any] | None = None

    def free(self) -> bool:
        """Whether no live cache owns the slot."""
        return self._owner is None or self._owner() is None

    def take(self, cache: Any) -> None:
        """Give the slot to ``cache`` (until it is freed)."""
        self._owner = weakref.ref(cache)

    def release(self) -> None:
        """Free the slot now (its cache moved to another one)."""
        self._owner = None

    def release_from(self, cache: Any) -> None:
        """Free the slot now if ``cache`` owns it (a finished request: its slot is free for the next one at
        once, not when the garbage collector finds the cache)."""
        if self._owner is not None and self._owner() is cache:
            self._owner = None

    def run(self, input_ids: torch.Tensor, cache: Any, start: int) -> torch.Tensor | None:
        """One step through the whole-step graph, or ``None`` when ``cache`` no longer fits the slot."""
        first = cache.layers[0]
        size = bucket_size(input_ids.shape[1])
        kb, vb = getattr(first, "key_buffer", None), getattr(first, "value_buffer", None)
        if kb is None or vb is None or kb.data_ptr() != self.k_ptr or vb.data_ptr() != self.v_ptr:
            return None  # the cache outgrew its buffers (or never had them)
        if kb.shape[-2] != self.cap or first.length + size > self.cap:
            return None
        if size not in self.steps:
            try:
                self.steps[size] = StepGraph(self, size, cache)
            except RuntimeError as exc:  # capture or the varlen kernel refused: per-layer path from now on
                warnings.warn(f"kv-rag: whole-step CUDA graph unavailable ({exc})", stacklevel=3)
                self.steps[size] = None
        step = self.steps[size]
        return step.run(input_ids, cache, start) if step is not None else None


class StepGraph:
    """One CUDA graph for a whole step of up to ``size`` tokens on one slot's buffers.

    Inputs (static, on the device): ``ids`` and ``meta`` = (first position for rotary, first cache
    row to write, real tokens). Output: float32 logits of the last real token.
    """

    def __init__(self, slot: StaticSlot, size: int, cache: Any) -> None:
        self.slot = slot
        self.dec = slot.dec
        self.size = size
        dev = slot.pool.device
        self.ids = torch.zeros((1, size), dtype=torch.long, device=dev)
        # warm-up writes rows past every valid one (the caller checked free_from + size <= cap)
        self.meta = torch.tensor([0, slot.cap - size, 1], dtype=torch.long, device=dev)
        self.rows = torch.arange(size, device=dev)
        self.pinned = torch.cuda.is_available()
        # split-KV over the cached rows: chunks of at least STEP_SPLIT_ROWS rows, at most STEP_MAX_SPLITS
        self.n_splits = max(1, min(STEP_MAX_SPLITS, slot.cap // STEP_SPLIT_ROWS))
        self.splits = torch.arange(self.n_splits + 1, device=dev)
        self.max_k = -(-slot.cap // self.n_splits)
        self.max_q = size * (int(self.dec.model.config.num_attention_heads) // self.dec.kv_heads)
        self.cum_q = torch.arange(0, (self.n_splits + 1) * self.max_q, self.max_q, dtype=torch.int32, device=dev)
        self.graph: Any = None
        cur = torch.cuda.current_stream(dev)
        side = torch.cuda.Stream(dev)
        side.wait_stream(cur)
        bufs = cache_buffers(cache)
        with torch.cuda.stream(side):
            try:  # warm-up: compiles, makes handles and workspaces; raises if a kernel refuses
                self.body(*bufs)
            except Exception as exc:
                kern = self.dec.kernels()[0]
                if not kern.compiled:
                    raise
                warnings.warn(f"kv-rag: compiled layer functions failed ({exc}); using plain ones", stacklevel=4)
                kern.plain()
                self.body(*bufs)
        cur.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=slot.pool.mempool, capture_error_mode="thread_local"):
            self.logits = self.body(*bufs)
        self.graph = graph

    def body(self, kbufs: list[torch.Tensor], vbufs: list[torch.Tensor]) -> torch.Tensor:
        """The step: embed, every layer (append + attention), head of the last real row.

        ``kbufs``/``vbufs``: the cache's per-layer buffers (the slot's, at the slot's addresses).
        """
        dec, meta = self.dec, self.meta
        h, cos, sin = dec.embed(self.ids, (meta[0] + self.rows).unsqueeze(0))
        cos, sin = cos.transpose(1, 2), sin.transpose(1, 2)  # [1, n, 1, dim]
        rows = meta[1] + self.rows
        bounds = ((meta[1] * self.splits) // self.n_splits).to(torch.int32)
        used = bounds[1:] - bounds[:-1]
        kern, w_pre, w_post, eps = dec.kernels()
        for i in range(len(kbufs)):
            if dec.fusable:
                q, k, v = kern.pre(h, cos, sin, w_pre[i], eps, dec.head_dim)
            else:
                q, k, v = dec.pre_rows(i, h, cos, sin)
            kb, vb = kbufs[i], vbufs[i]
            kb.index_copy_(2, rows, k.transpose(1, 2))
            vb.index_copy_(2, rows, v.transpose(1, 2))
            o = self.attend(kern, q, k, v, kb, vb, bounds, used)
            h = kern.post(h, o, w_post[i], eps) if dec.fusable else dec.post_rows(i, h, o)
        return dec.head(h.index_select(1, meta[2:3] - 1))

    def attend(
        self,
        kern: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kb: torch.Tensor,
        vb: torch.Tensor,
        bounds: torch.Tensor,
        used: torch.Tensor,
    ) -> torch.Tensor:
        """Attention of the step's queries ``[1, n, heads, dim]``: ``[n, heads, dim]``.

        Split-KV by hand, with every length on the device: flash's varlen kernel over ``B`` chunks
        of the cached rows (one batch element per chunk; the query heads that share a KV head
        packed as rows, so each KV row is read once; no mask: every cached row precedes the step),
        dense causal flash over the step's own keys, then the partial results merged by their
        log-sum-exp.
        """
        b, scale = self.n_splits, self.dec.scaling
        qs = kern.pack(q, self.dec.kv_heads, b)
        o_old, lse_old = torch.ops.aten._flash_attention_forward(
            qs,
            kb[0].transpose(0, 1),
            vb[0].transpose(0, 1),
            self.cum_q,
            bounds,
            self.max_q,
            self.max_k,
            0.0,
            False,
            False,
            scale=scale,
            seqused_k=used,
        )[:2]
        o_new, lse_new = torch.ops.aten._scaled_dot_product_flash_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, True, scale=scale
        )[:2]
        return kern.merge(o_old, lse_old, o_new, lse_new, b, self.size)

    def run(self, input_ids: torch.Tensor, cache: Any, start: int) -> torch.Tensor:
        n = input_ids.shape[1]
        first = int(cache.layers[0].length)
        self.ids[:, :n].copy_(input_ids)
        # from pinned memory: a pageable copy would hold the host until the stream drains (the KV copy)
        meta = torch.tensor([start, first, n], dtype=torch.long)
        self.meta.copy_(meta.pin_memory() if self.pinned else meta, non_blocking=True)
        if self.dec.replay:
            self.graph.replay()
            out = self.logits
        else:
            out = self.body(*cache_buffers(cache))
        for cl in cache.layers:
            cl.filled_to(first + n)
        return out.clone()
