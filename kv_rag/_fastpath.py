"""A lean forward for short steps (the suffix after a cache hit, and decoding) of Llama-family models.

After a hit only a few tokens are left to compute, and transformers' forward then costs more in
Python and kernel launches than the GPU needs for the arithmetic (about 1 ms per layer for a
36-layer model). This module runs the same modules' weights with fewer operations:

* attention is one ``scaled_dot_product_attention`` call per layer over the cached length, with
  grouped KV heads (``enable_gqa``) and a lower-right causal mask for the new tokens (flash
  kernels on CUDA), no mask building or KV repetition;
* on CUDA with a half-precision model, caches built by the engine take their KV buffers from a
  per-model pool of *static* buffers (fixed addresses, sized to a capacity bucket; one cache
  owns a slot of the pool while it lives). A whole step (embedding, every layer with its
  cache append and attention, the head) is then one CUDA graph, captured once per (slot,
  step-length bucket) and replayed by every later request that gets the slot: attention is
  flash's varlen form, which reads the cached length from a device tensor (``seqused_k``), and
  the append is an ``index_copy_`` at a position held on the device. The host issues one
  replay per step;
* otherwise on CUDA (fp32 models, caches with their own buffers) everything between two
  attention calls is replayed from per-bucket CUDA graphs that touch only the decoder's own
  buffers, and the host issues the cache append and the attention call per layer.

Steps are padded to a power-of-two bucket; padded rows are computed and ignored (rows are
independent outside attention, the attention reads only real rows, and the KV rows written
past the step's end are overwritten before they are ever read).

It writes into the same :class:`~kv_rag._compat.PreallocatedLayer` cache as transformers' own
forward, so long prefills (misses) keep running through transformers and both paths can be
mixed on one cache. Only decoder-only models whose layers are plain pre-norm attention + MLP
blocks with full attention are handled (llama, qwen2, qwen3, mistral without a sliding window);
:func:`runner_for` returns ``None`` for anything else and the caller uses transformers.

Switch: environment variable ``KV_RAG_FAST`` = ``0`` (never), ``1`` (always, CPU too); unset:
on for models on CUDA. ``KV_RAG_STATIC_BYTES`` caps the static-buffer pool (default: a quarter
of the GPU's memory, at most 16 GiB; ``0`` turns whole-step graphs off).
"""

from __future__ import annotations

import gc
import os
import warnings
import weakref
from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

#: Longest step (tokens) run here; longer chunks go to transformers (they are compute-bound anyway).
MAX_FAST_TOKENS = 512

_SUPPORTED = frozenset({"llama", "qwen2", "qwen3", "mistral"})
_POSITION_DEPENDENT_ROPE = frozenset({"dynamic", "longrope"})
_ATTR = "_kv_rag_fast"
_SLOT_ATTR = "_kv_rag_static_slot"
_HALF = (torch.float16, torch.bfloat16)


def enabled(device: torch.device) -> bool:
    """Whether the fast path applies on ``device`` under the ``KV_RAG_FAST`` switch."""
    flag = os.environ.get("KV_RAG_FAST", "").strip()
    if flag == "0":
        return False
    if flag == "1":
        return True
    return device.type == "cuda"


def runner_for(model: Any) -> FastDecoder | None:
    """The model's :class:`FastDecoder` (made once and kept on the model), or ``None`` if unsupported."""
    cached = getattr(model, _ATTR, None)
    if cached is None:
        dec = FastDecoder.build(model)
        cached = dec if dec is not None else False
        try:
            object.__setattr__(model, _ATTR, cached)
        except (AttributeError, TypeError):
            return dec
    return cached if isinstance(cached, FastDecoder) else None


def _static_decoder(model: Any, num_layers: int) -> tuple[FastDecoder, torch.device, torch.dtype] | None:
    """The model's decoder, device and dtype when whole-step graphs apply to its caches, else ``None``."""
    if not torch.cuda.is_available():
        return None
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(emb, "weight", None)
    if weight is None or weight.device.type != "cuda" or weight.dtype not in _HALF or not enabled(weight.device):
        return None
    dec = runner_for(model)
    if dec is None or not dec._flash or num_layers != len(dec.inner.layers):
        return None
    return dec, weight.device, weight.dtype


def static_buffers(model: Any, cache: Any, num_layers: int, capacity: int) -> list[tuple[Any, Any]] | None:
    """Static per-layer ``(keys, values)`` buffers for a new ``cache`` of ``model``, or ``None``.

    ``None`` (the cache then allocates its own) unless the fast path applies to the model on CUDA
    in half precision and the pool has room. The buffers hold at least ``capacity`` tokens plus
    room for a padded step; the slot stays with ``cache`` until the cache is freed.
    """
    got = _static_decoder(model, num_layers)
    if got is None:
        return None
    dec, device, dtype = got
    slot = dec.pool(device).acquire(cache, capacity, dtype)
    if slot is None:
        return None
    object.__setattr__(cache, _SLOT_ATTR, slot)
    return list(zip(slot.k, slot.v, strict=True))


def _block_rows(pieces: list[torch.Tensor], start: int) -> torch.Tensor | None:
    """The block ``[layers, 1, kv_heads, rows, dim]`` whose rows ``start..`` the per-layer ``pieces``
    (``[1, kv_heads, n, dim]``) are, layer by layer; ``None`` if they are anything else."""
    from .store.device import roomy_block

    block = roomy_block(pieces[0], len(pieces))
    if block is None:
        return None
    n = pieces[0].shape[-2]
    for layer, piece in enumerate(pieces):
        want = block[layer, :, :, start : start + n, :]
        if piece.data_ptr() != want.data_ptr() or piece.shape != want.shape or piece.stride() != want.stride():
            return None
    return block


def adopt_buffers(
    model: Any,
    cache: Any,
    num_layers: int,
    capacity: int,
    keys: Any,
    values: Any,
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int] | None:
    """Buffers for a new ``cache`` that already hold its last piece of KV: no copy for it.

    ``keys[layer]`` / ``values[layer]`` are the pieces the cache is to hold in order. When the last
    piece of every layer lies in one cache-shaped block of the GPU tier (see
    :class:`kv_rag.store.GpuTier`) at the row where it belongs, with room for ``capacity`` tokens
    and a padded step, and no other live cache is using that block, the cache is given the
    block's layers as its static buffers. Returns them and the rows before the last piece (the
    caller copies the earlier pieces there: the same values for every request, since the block's
    artifact is keyed by the whole chain before it), or ``None`` (then copy as usual).

    The cache must never write below its length (the engine's exact path only appends); the tier's
    artifact stays valid because the cache writes only the rows before and after it.
    """
    got = _static_decoder(model, num_layers)
    if got is None or not keys or not keys[0]:
        return None
    dec, device, dtype = got
    start = sum(int(p.shape[-2]) for p in keys[0][:-1])
    n = int(keys[0][-1].shape[-2])
    kb = _block_rows([ks[-1] for ks in keys], start)
    vb = _block_rows([vs[-1] for vs in values], start)
    if kb is None or vb is None or kb.shape != vb.shape or kb.dtype != dtype or vb.dtype != dtype:
        return None
    if kb.device != device or kb.shape[3] < start + n or kb.shape[3] < capacity + MAX_FAST_TOKENS:
        return None
    pool = dec.pool(device)
    if pool.max_bytes <= 0:  # KV_RAG_STATIC_BYTES=0: whole-step graphs are off
        return None
    slot = pool.adopt(cache, kb, vb)
    if slot is None:
        return None
    object.__setattr__(cache, _SLOT_ATTR, slot)
    return list(zip(kb.unbind(0), vb.unbind(0), strict=True)), start


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return (x * cos) + (_rotate_half(x) * sin)


class FastDecoder:
    """Short forward steps of one Llama-family model over a :class:`PreallocatedLayer` cache.

    Not thread-safe by itself: the engine calls it under the model's lock.
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self.inner = model.model
        self.lm_head = model.lm_head
        attn = self.inner.layers[0].self_attn
        self.head_dim = int(attn.head_dim)
        self.scaling = float(attn.scaling)
        self.qk_norm = hasattr(attn, "q_norm") and hasattr(attn, "k_norm")
        self._graphs: dict[int, _BucketGraphs | None] = {}
        self._flash = self.head_dim % 8 == 0 and self.head_dim <= 256
        self._pool: _StaticPool | None = None
        self._kernels: Any = None
        cfg = model.config
        self.kv_heads = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
        #: whether the layers are the plain blocks :mod:`kv_rag._fused` writes out (SiLU MLP, RMSNorm)
        self.fusable = getattr(cfg, "hidden_act", None) in ("silu", "swish") and all(
            hasattr(layer.input_layernorm, "variance_epsilon") for layer in self.inner.layers
        )
        #: Whole-step graphs are replayed (``False``: the same step code runs eagerly, for comparisons).
        self.replay = True

    def kernels(self) -> Any:
        """The fused layer functions (:class:`kv_rag._fused.Kernels`) and per-layer weights, made once."""
        if self._kernels is None:
            from . import _fused

            ws = [_fused.layer_weights(layer) for layer in self.inner.layers]
            self._kernels = (_fused.Kernels(), [w[0] for w in ws], [w[1] for w in ws], ws[0][2])
        return self._kernels

    def pool(self, device: torch.device) -> _StaticPool:
        """The model's pool of static KV buffers (made on first use)."""
        if self._pool is None:
            self._pool = _StaticPool(self, device)
        return self._pool

    @classmethod
    def build(cls, model: Any) -> FastDecoder | None:
        """A decoder for ``model``, or ``None`` when its architecture is not one this module handles."""
        cfg = getattr(model, "config", None)
        if cfg is None or getattr(cfg, "model_type", None) not in _SUPPORTED:
            return None
        inner = getattr(model, "model", None)
        if inner is None or not hasattr(inner, "rotary_emb") or not hasattr(model, "lm_head"):
            return None
        types = getattr(cfg, "layer_types", None)
        if types is not None:
            if any(t != "full_attention" for t in types):
                return None
        elif getattr(cfg, "sliding_window", None) is not None:
            return None
        rope = getattr(inner.rotary_emb, "rope_type", "default")
        if rope in _POSITION_DEPENDENT_ROPE:
            return None
        return cls(model)

    # ------------------------------------------------------------------ pieces (graph bodies)
    def embed(self, ids: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Hidden states of ``ids`` and the rotary cos/sin of positions ``pos`` (both ``[1, n]``)."""
        h = self.inner.embed_tokens(ids)
        cos, sin = self.inner.rotary_emb(h, pos)
        return h, cos.unsqueeze(1), sin.unsqueeze(1)

    def pre(
        self, i: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer ``i``'s query, key and value ``[1, heads, n, dim]`` of hidden states ``h``."""
        q, k, v = self.pre_rows(i, h, cos.transpose(1, 2), sin.transpose(1, 2))
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def pre_rows(
        self, i: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Like :meth:`pre` in token-major layout: ``[1, n, heads, dim]`` (cos/sin ``[1, n, 1, dim]``)."""
        layer = self.inner.layers[i]
        a = layer.self_attn
        x = layer.input_layernorm(h)
        n = x.shape[1]
        q = a.q_proj(x).view(1, n, -1, self.head_dim)
        k = a.k_proj(x).view(1, n, -1, self.head_dim)
        v = a.v_proj(x).view(1, n, -1, self.head_dim)
        if self.qk_norm:
            q = a.q_norm(q)
            k = a.k_norm(k)
        return _rope(q, cos, sin), _rope(k, cos, sin), v

    def post_rows(self, i: int, h: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """Like :meth:`post` with ``o`` in token-major layout ``[n, heads, dim]``."""
        layer = self.inner.layers[i]
        h = h + layer.self_attn.o_proj(o.reshape(1, o.shape[0], -1))
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def post(self, i: int, h: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """Hidden states after layer ``i``'s output projection and MLP (``o``: ``[1, heads, n, dim]``)."""
        layer = self.inner.layers[i]
        o = o.transpose(1, 2).reshape(1, o.shape[2], -1)
        h = h + layer.self_attn.o_proj(o)
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Float32 logits ``[n, vocab]`` of hidden states ``h`` ``[1, n, hidden]``."""
        return self.lm_head(self.inner.norm(h))[0].float()

    def attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Attention of ``n`` new queries over the whole cached length (lower-right causal).

        Half precision on CUDA calls the flash kernel directly (grouped KV heads natively; its
        causal mask is aligned lower-right), skipping the dispatcher's per-call checks and its
        cuDNN choice, whose plan cache misses on every new length (about 1 ms per call).
        """
        if self._flash and q.is_cuda and q.dtype in _HALF:
            try:
                return torch.ops.aten._scaled_dot_product_flash_attention(
                    q, keys, values, 0.0, True, False, scale=self.scaling
                )[0]
            except RuntimeError as exc:
                warnings.warn(f"kv-rag: flash attention unavailable ({exc}); using the dispatcher", stacklevel=2)
                self._flash = False
        mask = causal_lower_right(q.shape[2], keys.shape[2])
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scaling, enable_gqa=True)

    # ------------------------------------------------------------------ entry point
    def forward(self, input_ids: torch.Tensor, cache: Any, start: int, logits_to_keep: int = 1) -> torch.Tensor:
        """Logits (float32 ``[keep, vocab]``) of ``input_ids`` ``[1, n]`` at ``start..``; extends ``cache``."""
        n = input_ids.shape[1]
        if input_ids.is_cuda and logits_to_keep == 1:
            slot = getattr(cache, _SLOT_ATTR, None)
            if slot is not None:
                out = slot.run(input_ids, cache, start)
                if out is not None:
                    return out
            graphs = self._bucket(n, input_ids.device)
            if graphs is not None:
                return graphs.run(input_ids, cache, start)
        pos = torch.arange(start, start + n, device=input_ids.device).unsqueeze(0)
        h, cos, sin = self.embed(input_ids, pos)
        for i, cl in enumerate(cache.layers):
            q, k, v = self.pre(i, h, cos, sin)
            keys, values = cl.update(k, v)
            h = self.post(i, h, self.attend(q, keys, values))
        return self.head(h[:, -logits_to_keep:, :])

    def _bucket(self, n: int, device: torch.device) -> _BucketGraphs | None:
        size = 1 << max(0, (n - 1).bit_length())
        if size not in self._graphs:
            try:
                self._graphs[size] = _BucketGraphs(self, size, device)
            except RuntimeError as exc:  # capture refused: run this size eagerly from now on
                warnings.warn(f"kv-rag: CUDA graph capture failed ({exc}); running without graphs", stacklevel=3)
                self._graphs[size] = None
        return self._graphs[size]


class _BucketGraphs:
    """CUDA graphs of every piece between attention calls, for steps of up to ``size`` tokens.

    Graph 0 embeds and runs layer 0's ``pre``; graph ``i`` (1..L-1) runs layer ``i-1``'s ``post``
    and layer ``i``'s ``pre``; graph L runs the last ``post`` and the head on the last real row.
    Inputs and outputs are static tensors owned here; padded rows are computed and ignored
    (rows are independent outside attention, and attention and the cache see only real rows).
    """

    def __init__(self, dec: FastDecoder, size: int, device: torch.device) -> None:
        self.dec = dec
        self.size = size
        n_layers = len(dec.inner.layers)
        dtype = dec.inner.embed_tokens.weight.dtype
        heads = int(dec.model.config.num_attention_heads)
        self.ids = torch.zeros((1, size), dtype=torch.long, device=device)
        self.start = torch.zeros((1,), dtype=torch.long, device=device)
        self.last = torch.zeros((1,), dtype=torch.long, device=device)
        self.base = torch.arange(size, device=device).unsqueeze(0)
        self.o = [torch.zeros((1, heads, size, dec.head_dim), dtype=dtype, device=device) for _ in range(n_layers)]
        self.qkv: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.graphs: list[Any] = []
        self.logits: torch.Tensor | None = None
        cur = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(cur)
        with torch.cuda.stream(side):
            self._pieces(capture=False)  # warm-up: lazily made handles and workspaces
        cur.wait_stream(side)
        self._pieces(capture=True)

    def _pieces(self, capture: bool) -> None:
        dec = self.dec
        n_layers = len(dec.inner.layers)
        pool = None
        state: dict[str, Any] = {}

        def run(i: int) -> None:
            if i == 0:
                h, cos, sin = dec.embed(self.ids, self.base + self.start)
                state.update(cos=cos, sin=sin)
            else:
                h = dec.post(i - 1, state["h"], self.o[i - 1])
            state["h"] = h
            if i < n_layers:
                qkv = dec.pre(i, h, state["cos"], state["sin"])
                if capture:
                    self.qkv.append(qkv)
            else:
                self.logits = dec.head(h.index_select(1, self.last))

        if capture:
            self._state = state  # tensors passed between graphs stay referenced
        for i in range(n_layers + 1):
            if not capture:
                run(i)
                continue
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                run(i)
            pool = graph.pool()
            self.graphs.append(graph)

    def run(self, input_ids: torch.Tensor, cache: Any, start: int) -> torch.Tensor:
        n = input_ids.shape[1]
        self.ids[:, :n].copy_(input_ids, non_blocking=True)
        self.start.fill_(start)
        self.last.fill_(n - 1)
        self.graphs[0].replay()
        dec = self.dec
        graphs, o_bufs = self.graphs, self.o
        for i, cl in enumerate(cache.layers):
            q, k, v = self.qkv[i]
            if n < self.size:
                q, k, v = q[:, :, :n], k[:, :, :n], v[:, :, :n]
            keys, values = _append(cl, k, v)
            out = dec.attend(q, keys, values)
            (o_bufs[i] if n == self.size else o_bufs[i][:, :, :n]).copy_(out)
            graphs[i + 1].replay()
        assert self.logits is not None  # made at capture
        return self.logits.clone()


def _buffers(cache: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The per-layer K and V buffers of a cache of :class:`~kv_rag._compat.PreallocatedLayer`."""
    return [cl._k for cl in cache.layers], [cl._v for cl in cache.layers]


def _append(cl: Any, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``cl.update(k, v)`` with fewer host operations when a preallocated layer has room."""
    kb, vb = getattr(cl, "_k", None), getattr(cl, "_v", None)
    if kb is None or vb is None:
        return cl.update(k, v)
    a = cl._len
    b = a + k.shape[2]
    if b > kb.shape[2]:
        return cl.update(k, v)
    kb[:, :, a:b].copy_(k)
    vb[:, :, a:b].copy_(v)
    cl.filled_to(b)
    return cl.keys, cl.values


def _bucket_size(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _round_capacity(n: int) -> int:
    """``n`` rounded up to a coarse bucket (multiples of 1024, or of 1/16 of ``n`` when larger)."""
    step = max(1024, 1 << max(0, n.bit_length() - 4))
    return -(-n // step) * step


def _pool_limit(device: torch.device) -> int:
    env = os.environ.get("KV_RAG_STATIC_BYTES", "").strip()
    if env:
        return int(env)
    total = int(torch.cuda.get_device_properties(device).total_memory)
    return min(16 << 30, total // 4)


class _StaticPool:
    """Static KV buffer sets (slots) of one model, least recently used first, bounded in bytes."""

    def __init__(self, dec: FastDecoder, device: torch.device) -> None:
        self.dec = dec
        self.device = device
        self.max_bytes = _pool_limit(device)
        self.slots: list[_Slot] = []
        #: step graphs of blocks lent by the GPU tier, by (K address, V address, layout): replayed only
        #: for a live cache whose buffers are exactly there, so they stay valid as long as they are kept
        self.adopted: OrderedDict[tuple[Any, ...], _Slot] = OrderedDict()
        self.mempool = torch.cuda.graph_pool_handle()

    @property
    def nbytes(self) -> int:
        """Bytes held by every slot."""
        return sum(s.nbytes for s in self.slots)

    def acquire(self, cache: Any, capacity: int, dtype: torch.dtype) -> _Slot | None:
        """A free slot for ``cache`` with room for ``capacity`` tokens and a padded step (made if needed)."""
        cap = _round_capacity(capacity + MAX_FAST_TOKENS)
        for attempt in range(2):
            for s in self.slots:
                if s.cap == cap and s.dtype == dtype and s.free():
                    self.slots.remove(s)
                    self.slots.append(s)
                    s.take(cache)
                    return s
            if attempt or not any(s.cap == cap for s in self.slots):
                break
            gc.collect()  # a finished request's cache may be waiting in a reference cycle
        cfg = self.dec.model.config
        kv_heads = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
        shape = (1, kv_heads, cap, self.dec.head_dim)
        elem = torch.empty((), dtype=dtype).element_size()
        need = 2 * len(self.dec.inner.layers) * cap * kv_heads * self.dec.head_dim * elem
        if need > self.max_bytes:
            return None
        while self.nbytes + need > self.max_bytes:
            victim = next((s for s in self.slots if s.free()), None)
            if victim is None:
                return None
            self.slots.remove(victim)
        try:
            slot = _Slot(self, shape, dtype)
        except torch.cuda.OutOfMemoryError:
            return None
        self.slots.append(slot)
        slot.take(cache)
        return slot

    def adopt(self, cache: Any, kblock: torch.Tensor, vblock: torch.Tensor) -> _Slot | None:
        """The slot standing for the GPU tier's blocks ``[layers, 1, kv_heads, cap, dim]``, given to
        ``cache``; ``None`` while another live cache uses them."""
        key = (kblock.data_ptr(), vblock.data_ptr(), tuple(kblock.shape), kblock.dtype)
        slot = self.adopted.get(key)
        if slot is None:
            slot = _Slot(self, tuple(kblock.shape[1:]), kblock.dtype, lent=(kblock, vblock))  # type: ignore[arg-type]
            self.adopted[key] = slot
            while len(self.adopted) > _LENT_GRAPH_SETS:
                victim = next((k for k, s in self.adopted.items() if s.free()), None)
                if victim is None:
                    break
                del self.adopted[victim]
        elif not slot.free():
            gc.collect()  # a finished request's cache may be waiting in a reference cycle
            if not slot.free():
                return None
        self.adopted.move_to_end(key)
        slot.take(cache)
        return slot


#: Blocks lent by the GPU tier whose step graphs are kept (least recently used dropped first).
_LENT_GRAPH_SETS = 32


class _Slot:
    """Per-layer K/V buffers ``[1, kv_heads, cap, dim]`` at fixed addresses and their step graphs.

    A slot either owns its buffers (made here, kept by the pool) or stands for a block lent by the
    GPU tier (``lent``: the buffers are the block's, held by the tier and the cache using it; the
    slot keeps only their addresses and its graphs).
    """

    def __init__(
        self,
        pool: _StaticPool,
        shape: tuple[int, int, int, int],
        dtype: torch.dtype,
        lent: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        self.pool = pool
        self.dec = pool.dec
        self.cap = shape[2]
        self.dtype = dtype
        n_layers = len(self.dec.inner.layers)
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        if lent is None:
            # one block per K and V, layers as views: the engine fills all layers with one strided copy
            self.k = list(torch.empty((n_layers, *shape), dtype=dtype, device=pool.device).unbind(0))
            self.v = list(torch.empty((n_layers, *shape), dtype=dtype, device=pool.device).unbind(0))
            self.k_ptr, self.v_ptr = self.k[0].data_ptr(), self.v[0].data_ptr()
            self.nbytes = 2 * n_layers * self.k[0].numel() * self.k[0].element_size()
        else:
            self.k_ptr, self.v_ptr = lent[0].data_ptr(), lent[1].data_ptr()
            self.nbytes = 0  # the tier's memory
        self.steps: dict[int, _StepGraph | None] = {}
        self._owner: weakref.ref[Any] | None = None

    def free(self) -> bool:
        """Whether no live cache owns the slot."""
        return self._owner is None or self._owner() is None

    def take(self, cache: Any) -> None:
        """Give the slot to ``cache`` (until it is freed)."""
        self._owner = weakref.ref(cache)

    def run(self, input_ids: torch.Tensor, cache: Any, start: int) -> torch.Tensor | None:
        """One step through the whole-step graph, or ``None`` when ``cache`` no longer fits the slot."""
        first = cache.layers[0]
        size = _bucket_size(input_ids.shape[1])
        kb, vb = getattr(first, "_k", None), getattr(first, "_v", None)
        if kb is None or vb is None or kb.data_ptr() != self.k_ptr or vb.data_ptr() != self.v_ptr:
            return None  # the cache outgrew its buffers (or never had them)
        if kb.shape[-2] != self.cap or first._len + size > self.cap:
            return None
        if size not in self.steps:
            try:
                self.steps[size] = _StepGraph(self, size, cache)
            except RuntimeError as exc:  # capture or the varlen kernel refused: per-layer path from now on
                warnings.warn(f"kv-rag: whole-step CUDA graph unavailable ({exc})", stacklevel=3)
                self.steps[size] = None
        step = self.steps[size]
        return step.run(input_ids, cache, start) if step is not None else None


class _StepGraph:
    """One CUDA graph for a whole step of up to ``size`` tokens on one slot's buffers.

    Inputs (static, on the device): ``ids`` and ``meta`` = (first position for rotary, first cache
    row to write, real tokens). Output: float32 logits of the last real token.
    """

    def __init__(self, slot: _Slot, size: int, cache: Any) -> None:
        self.slot = slot
        self.dec = slot.dec
        self.size = size
        dev = slot.pool.device
        self.ids = torch.zeros((1, size), dtype=torch.long, device=dev)
        # warm-up writes rows past every valid one (the caller checked free_from + size <= cap)
        self.meta = torch.tensor([0, slot.cap - size, 1], dtype=torch.long, device=dev)
        self.rows = torch.arange(size, device=dev)
        self.pinned = torch.cuda.is_available()
        # split-KV over the cached rows: chunks of at least 256 rows, at most 32
        self.n_splits = max(1, min(32, slot.cap // 256))
        self.splits = torch.arange(self.n_splits + 1, device=dev)
        self.max_k = -(-slot.cap // self.n_splits)
        self.max_q = size * (int(self.dec.model.config.num_attention_heads) // self.dec.kv_heads)
        self.cum_q = torch.arange(0, (self.n_splits + 1) * self.max_q, self.max_q, dtype=torch.int32, device=dev)
        self.graph: Any = None
        cur = torch.cuda.current_stream(dev)
        side = torch.cuda.Stream(dev)
        side.wait_stream(cur)
        bufs = _buffers(cache)
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
        with torch.cuda.graph(graph, pool=slot.pool.mempool):
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
        first = int(cache.layers[0]._len)
        self.ids[:, :n].copy_(input_ids)
        # from pinned memory: a pageable copy would hold the host until the stream drains (the KV copy)
        meta = torch.tensor([start, first, n], dtype=torch.long)
        self.meta.copy_(meta.pin_memory() if self.pinned else meta, non_blocking=True)
        if self.dec.replay:
            self.graph.replay()
            out = self.logits
        else:
            out = self.body(*_buffers(cache))
        for cl in cache.layers:
            cl.filled_to(first + n)
        return out.clone()
