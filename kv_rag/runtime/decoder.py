"""A lean forward for short steps (the suffix after a cache hit, and decoding) of Llama-family models.

After a hit only a few tokens are left to compute, and transformers' forward then costs more in
Python and kernel launches than the GPU needs for the arithmetic (about 1 ms per layer for a
36-layer model). :class:`FastDecoder` runs the same modules' weights with fewer operations:

* attention is one ``scaled_dot_product_attention`` call per layer over the cached length, with
  grouped KV heads (``enable_gqa``) and a lower-right causal mask for the new tokens (flash
  kernels on CUDA), no mask building or KV repetition;
* on CUDA with a half-precision model, a cache whose buffers come from the model's static pool
  (:mod:`kv_rag.runtime.pool`) runs a whole step as one CUDA graph (:class:`~kv_rag.runtime.pool.StepGraph`);
* otherwise on CUDA (fp32 models, caches with their own buffers) everything between two
  attention calls is replayed from per-bucket CUDA graphs (:class:`LayerGraphs`) that touch only
  the decoder's own buffers, and the host issues the cache append and the attention call per layer.

Steps are padded to a power-of-two bucket; padded rows are computed and ignored (rows are
independent outside attention, the attention reads only real rows, and the KV rows written
past the step's end are overwritten before they are ever read).

It writes into the same :class:`~kv_rag.runtime.cache.PreallocatedLayer` cache as transformers' own
forward, so long prefills (misses) keep running through transformers and both paths can be
mixed on one cache. Only decoder-only models whose layers are plain pre-norm attention + MLP
blocks with full attention are handled (llama, qwen2, qwen3, mistral without a sliding window);
:meth:`FastDecoder.build` returns ``None`` for anything else and the caller uses transformers.

Switch: environment variable ``KV_RAG_FAST`` = ``0`` (never), ``1`` (always, CPU too); unset:
on for models on CUDA (:func:`fast_path_enabled`).
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from .cpu_pack import PackedLayers
from .kernels import rope

#: Longest step (tokens) run here; longer chunks go to transformers (they are compute-bound anyway).
MAX_FAST_TOKENS = 512

#: Half-precision dtypes (flash kernels and whole-step graphs need one of them).
HALF_DTYPES = (torch.float16, torch.bfloat16)

_SUPPORTED = frozenset({"llama", "qwen2", "qwen3", "mistral"})
_POSITION_DEPENDENT_ROPE = frozenset({"dynamic", "longrope"})


def fast_path_enabled(device: torch.device) -> bool:
    """Whether the fast path applies on ``device`` under the ``KV_RAG_FAST`` switch."""
    flag = os.environ.get("KV_RAG_FAST", "").strip()
    if flag == "0":
        return False
    if flag == "1":
        return True
    return device.type == "cuda"


def bucket_size(n: int) -> int:
    """``n`` rounded up to a power of two (the step lengths graphs are captured for)."""
    return 1 << max(0, (n - 1).bit_length())


def append(layer: Any, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``layer.update(k, v)`` with fewer host operations when a preallocated layer has room."""
    kb, vb = getattr(layer, "key_buffer", None), getattr(layer, "value_buffer", None)
    if kb is None or vb is None:
        return layer.update(k, v)
    a = layer.length
    b = a + k.shape[2]
    if b > kb.shape[2]:
        return layer.update(k, v)
    kb[:, :, a:b].copy_(k)
    vb[:, :, a:b].copy_(v)
    layer.filled_to(b)
    return layer.keys, layer.values


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
        self._graphs: dict[int, LayerGraphs | None] = {}
        self.flash = self.head_dim % 8 == 0 and self.head_dim <= 256
        self._kernels: Any = None
        self._packed: PackedLayers | None = None
        self._packing: threading.Thread | None = None
        cfg = model.config
        self.kv_heads = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
        #: whether the layers are the plain blocks :mod:`kv_rag.runtime.kernels` writes out (SiLU MLP, RMSNorm)
        self.fusable = getattr(cfg, "hidden_act", None) in ("silu", "swish") and all(
            hasattr(layer.input_layernorm, "variance_epsilon") for layer in self.inner.layers
        )
        #: Whole-step graphs are replayed (``False``: the same step code runs eagerly, for comparisons).
        self.replay = True

    def kernels(self) -> Any:
        """The fused layer functions (:class:`kv_rag.runtime.kernels.Kernels`) and per-layer weights, made once."""
        if self._kernels is None:
            from .kernels import Kernels, layer_weights

            ws = [layer_weights(layer) for layer in self.inner.layers]
            self._kernels = (Kernels(), [w[0] for w in ws], [w[1] for w in ws], ws[0][2])
        return self._kernels

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
        return rope(q, cos, sin), rope(k, cos, sin), v

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
        if self.flash and q.is_cuda and q.dtype in HALF_DTYPES:
            try:
                return torch.ops.aten._scaled_dot_product_flash_attention(
                    q, keys, values, 0.0, True, False, scale=self.scaling
                )[0]
            except RuntimeError as exc:
                warnings.warn(f"kv-rag: flash attention unavailable ({exc}); using the dispatcher", stacklevel=2)
                self.flash = False
        if q.shape[2] == 1:  # one new token sees every cached one: no mask
            return F.scaled_dot_product_attention(q, keys, values, scale=self.scaling, enable_gqa=True)
        mask = causal_lower_right(q.shape[2], keys.shape[2])
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scaling, enable_gqa=True)

    # ------------------------------------------------------------------ entry point
    def forward(self, input_ids: torch.Tensor, cache: Any, start: int, logits_to_keep: int = 1) -> torch.Tensor:
        """Logits (float32 ``[keep, vocab]``) of ``input_ids`` ``[1, n]`` at ``start..``; extends ``cache``."""
        n = input_ids.shape[1]
        if input_ids.is_cuda and logits_to_keep == 1:
            slot = getattr(cache, "slot", None)
            if slot is not None:
                out = slot.run(input_ids, cache, start)
                if out is not None:
                    return out
            graphs = self.bucket(n, input_ids.device)
            if graphs is not None:
                return graphs.run(input_ids, cache, start)
        pos = torch.arange(start, start + n, device=input_ids.device).unsqueeze(0)
        h, cos, sin = self.embed(input_ids, pos)
        for i, cl in enumerate(cache.layers):
            q, k, v = self.pre(i, h, cos, sin)
            keys, values = cl.update(k, v)
            h = self.post(i, h, self.attend(q, keys, values))
        return self.head(h[:, -logits_to_keep:, :])

    def forward_ragged(self, items: Sequence[tuple[torch.Tensor, Any, int]]) -> torch.Tensor:
        """One step of several requests, each on its own cache: float32 logits ``[B, vocab]`` of each
        request's last token.

        ``items``: ``(ids [n_j], cache_j, start_j)``; request ``j``'s tokens sit at ``start_j..`` on top of
        ``cache_j``, which is extended in place. The projections and the MLP run once over all
        requests' tokens (the weights are read once: a decode step is memory-bound); the cache append
        and the attention run per request, over that request's cache only.
        """
        ids = torch.cat([t.reshape(-1) for t, _, _ in items]).unsqueeze(0)
        device = ids.device
        spans: list[tuple[int, int]] = []
        pos_parts: list[torch.Tensor] = []
        at = 0
        for t, _, start in items:
            n = t.numel()
            spans.append((at, at + n))
            pos_parts.append(torch.arange(start, start + n, device=device))
            at += n
        h, cos, sin = self.embed(ids, torch.cat(pos_parts).unsqueeze(0))
        packed = self.packed(wait=False) if device.type == "cpu" else None
        pre, post = (packed.pre, packed.post) if packed is not None else (self.pre, self.post)
        for i in range(len(self.inner.layers)):
            q, k, v = pre(i, h, cos, sin)
            outs = []
            for (a, b), (_, cache, _) in zip(spans, items, strict=True):
                keys, values = append(cache.layers[i], k[:, :, a:b], v[:, :, a:b])
                outs.append(self.attend(q[:, :, a:b], keys, values))
            h = post(i, h, outs[0] if len(outs) == 1 else torch.cat(outs, dim=2))
        h = h.index_select(1, torch.tensor([b - 1 for _, b in spans], device=device))
        return packed.logits(h) if packed is not None else self.head(h)

    def packed(self, wait: bool = True) -> PackedLayers | None:
        """The layers' projections packed for the CPU's batched step (see :mod:`kv_rag.runtime.cpu_pack`;
        ``None`` when they do not apply). The first call starts packing in a background thread (about a
        second for a 135M model); ``wait=False`` returns ``None`` until it is done, so the first
        batched steps run on the plain weights instead of stalling every request."""
        if self._packing is None:
            # not a daemon: the interpreter waits for it at exit (a thread inside a oneDNN call while
            # the process shuts down aborts it: "terminate called without an active exception")
            self._packing = threading.Thread(target=self._pack, name="kv-rag-cpu-pack", daemon=False)
            self._packing.start()
        if wait:
            self._packing.join()
        return self._packed

    def _pack(self) -> None:
        with torch.inference_mode():
            self._packed = PackedLayers.build(self)

    def bucket(self, n: int, device: torch.device) -> LayerGraphs | None:
        """The per-layer graphs for steps of up to ``n`` tokens (captured on first use; ``None`` if refused)."""
        size = bucket_size(n)
        if size not in self._graphs:
            try:
                self._graphs[size] = LayerGraphs(self, size, device)
            except RuntimeError as exc:  # capture refused: run this size eagerly from now on
                warnings.warn(f"kv-rag: CUDA graph capture failed ({exc}); running without graphs", stacklevel=3)
                self._graphs[size] = None
        return self._graphs[size]

    @property
    def graph_buckets(self) -> list[int]:
        """Step sizes whose per-layer CUDA graphs have been captured so far (sorted; for reports)."""
        return sorted(size for size, graphs in self._graphs.items() if graphs is not None)


class LayerGraphs:
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
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
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
            keys, values = append(cl, k, v)
            out = dec.attend(q, keys, values)
            (o_bufs[i] if n == self.size else o_bufs[i][:, :, :n]).copy_(out)
            graphs[i + 1].replay()
        assert self.logits is not None  # made at capture
        return self.logits.clone()
