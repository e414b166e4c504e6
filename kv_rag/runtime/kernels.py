"""Layer pieces of Llama-family decoders as plain functions of tensors, for ``torch.compile``.

The whole-step CUDA graph (:class:`kv_rag.runtime.pool.StepGraph`) replays every kernel of a step; with plain
modules a step of a 36-layer model is about 2400 kernels, most of them tiny element-wise ones
(norms, rotary, residuals) that cost ~2 us each even inside a graph. Written as functions of
tensors (weights passed in, so one compiled function serves every layer), ``torch.compile``
fuses those into a few kernels per layer. The arithmetic follows transformers' modules
(RMSNorm in float32, rotary in the model dtype); fused kernels round differently in places,
as any kernel change does.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

Weights = tuple[Any, ...]


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm: normalise in float32, cast back, scale."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return (x * cos) + (torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin)


def pre(
    h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, w: Weights, eps: float, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query, key, value ``[1, n, heads, dim]`` (rotary applied) of hidden states ``h`` ``[1, n, hidden]``."""
    ln, wq, bq, wk, bk, wv, bv, qn, kn = w
    x = rms(h, ln, eps)
    n = x.shape[1]
    q = F.linear(x, wq, bq).view(1, n, -1, head_dim)
    k = F.linear(x, wk, bk).view(1, n, -1, head_dim)
    v = F.linear(x, wv, bv).view(1, n, -1, head_dim)
    if qn is not None:
        q = rms(q, qn, eps)
        k = rms(k, kn, eps)
    return rope(q, cos, sin), rope(k, cos, sin), v


def post(h: torch.Tensor, o: torch.Tensor, w: Weights, eps: float) -> torch.Tensor:
    """Hidden states after the output projection of ``o`` ``[n, heads, dim]`` and the MLP."""
    wo, bo, ln, wg, bg, wu, bu, wd, bd = w
    h = h + F.linear(o.reshape(1, o.shape[0], -1), wo, bo)
    x = rms(h, ln, eps)
    return h + F.linear(F.silu(F.linear(x, wg, bg)) * F.linear(x, wu, bu), wd, bd)


def merge(
    o_old: torch.Tensor,
    lse_old: torch.Tensor,
    o_new: torch.Tensor,
    lse_new: torch.Tensor,
    splits: int,
    size: int,
) -> torch.Tensor:
    """Attention output ``[size, heads, dim]`` from split-KV partial results and their log-sum-exp.

    ``o_old`` ``[splits * group * size, kv_heads, dim]`` / ``lse_old`` ``[kv_heads, splits * group * size]``:
    varlen flash over ``splits`` chunks of the cache with query heads packed as rows (group-major);
    ``o_new`` ``[1, heads, size, dim]`` / ``lse_new`` ``[1, heads, size]``: causal flash over the step's keys.
    """
    heads, dim = o_new.shape[1], o_new.shape[3]
    kvh = o_old.shape[1]
    g = heads // kvh
    if lse_old.dim() == 3:  # older flash builds: [splits, kv_heads, rows per split]
        lse_old = lse_old.permute(1, 0, 2).reshape(kvh, -1)
    lo = lse_old.view(kvh, splits, g, size).permute(1, 3, 0, 2).reshape(splits, size, heads)
    oo = o_old.view(splits, g, size, kvh, dim).permute(0, 2, 3, 1, 4).reshape(splits, size, heads, dim)
    lse = torch.cat([lo, lse_new[0].t().unsqueeze(0)])
    lse = torch.nan_to_num(lse, nan=float("-inf"), posinf=float("-inf"))  # empty chunks
    wt = torch.exp(lse - lse.amax(0, keepdim=True))
    parts = torch.cat([oo, o_new[0].transpose(0, 1).unsqueeze(0)]).float()
    out = (parts * wt.unsqueeze(-1)).sum(0) / wt.sum(0).unsqueeze(-1)
    return out.to(o_new.dtype)


def pack(q: torch.Tensor, kv_heads: int, splits: int) -> torch.Tensor:
    """Queries ``[1, n, heads, dim]`` as ``[splits * group * n, kv_heads, dim]`` (heads of a KV head as rows)."""
    n, heads, dim = q.shape[1], q.shape[2], q.shape[3]
    g = heads // kv_heads
    p = q[0].view(n, kv_heads, g, dim).permute(2, 0, 1, 3).reshape(g * n, kv_heads, dim)
    return p.unsqueeze(0).expand(splits, g * n, kv_heads, dim).reshape(splits * g * n, kv_heads, dim)


def pack_rows(q: torch.Tensor, kv_heads: int, splits: int) -> torch.Tensor:
    """Queries ``[1, rows, heads, dim]`` (one token per request) as ``[rows * kv_heads * splits * group, 1, dim]``:
    one varlen element per (request, KV head, split), the query heads of that KV head as its rows."""
    rows, heads, dim = q.shape[1], q.shape[2], q.shape[3]
    g = heads // kv_heads
    p = q[0].view(rows, kv_heads, 1, g, dim).expand(rows, kv_heads, splits, g, dim)
    return p.reshape(-1, 1, dim)


def merge_rows(o: torch.Tensor, lse: torch.Tensor, rows: int, kv_heads: int, splits: int) -> torch.Tensor:
    """Attention ``[rows, heads, dim]`` from the partial results of :func:`pack_rows`' elements.

    ``o`` ``[rows * kv_heads * splits * group, 1, dim]``; ``lse`` with one entry per row of ``o``
    (``[1, n]``, or ``[elements, 1, group]`` from older flash builds). Empty splits weigh nothing.
    """
    dim = o.shape[-1]
    g = o.shape[0] // (rows * kv_heads * splits)
    lf = lse.float().reshape(rows, kv_heads, splits, g)
    lf = torch.nan_to_num(lf, nan=float("-inf"), posinf=float("-inf"))  # empty splits
    wt = torch.exp(lf - lf.amax(2, keepdim=True))
    parts = torch.nan_to_num(o.float().view(rows, kv_heads, splits, g, dim))
    out = (parts * wt.unsqueeze(-1)).sum(2) / wt.sum(2).unsqueeze(-1)
    return out.to(o.dtype).reshape(rows, kv_heads * g, dim)


def pack_batch(q: torch.Tensor, kv_heads: int, rows: int, splits: int) -> torch.Tensor:
    """Queries ``[1, rows * size, heads, dim]`` (``size`` tokens per request) as
    ``[rows * splits * group * size, kv_heads, dim]``: one varlen element per (request, split of its
    cached rows), the query heads that share a KV head packed as its rows (each KV row read once)."""
    n, heads, dim = q.shape[1], q.shape[2], q.shape[3]
    g, size = heads // kv_heads, n // rows
    p = q[0].view(rows, size, kv_heads, g, dim).permute(0, 3, 1, 2, 4).reshape(rows, 1, g * size, kv_heads, dim)
    return p.expand(rows, splits, g * size, kv_heads, dim).reshape(rows * splits * g * size, kv_heads, dim)


def merge_batch(
    o_old: torch.Tensor, lse_old: torch.Tensor, o_new: torch.Tensor, lse_new: torch.Tensor, rows: int, splits: int
) -> torch.Tensor:
    """Attention ``[rows * size, heads, dim]`` from the partial results of :func:`pack_batch`'s elements
    (``o_old`` ``[rows * splits * group * size, kv_heads, dim]``, ``lse_old`` ``[kv_heads, that many]``) and
    of varlen causal flash over each request's own keys (``o_new`` ``[rows * size, heads, dim]``,
    ``lse_new`` ``[heads, rows * size]``). Empty splits weigh nothing.

    The parts are added one split after another (element-wise, no reduction over splits): the order of
    the additions is then fixed whatever kernel the compiler makes for a shape, so that a request's
    result is bit-identical in the graphs of every number of requests. With a ``sum`` over splits it
    was not, inside the batched prefill graphs on the H200 (why exactly was not shown: the same
    function compiled on its own gave a row the same bits at every row count; docs/gpu.md)."""
    kvh, dim = o_old.shape[1], o_old.shape[2]
    heads = o_new.shape[1]
    g, size = heads // kvh, o_new.shape[0] // rows
    if lse_old.dim() == 3:  # older flash builds: [elements, heads, rows per element]
        lse_old = lse_old.permute(1, 0, 2).reshape(kvh, -1)
    if lse_new.dim() == 3:
        lse_new = lse_new.permute(1, 0, 2).reshape(heads, -1)
    lo = lse_old.view(kvh, rows, splits, g, size).permute(1, 2, 4, 0, 3).reshape(rows, splits, size, heads)
    lo = torch.nan_to_num(lo.float(), nan=float("-inf"), posinf=float("-inf"))  # empty splits
    ln = lse_new.float().view(heads, rows, size).permute(1, 2, 0)  # [rows, size, heads]
    top = torch.maximum(lo.amax(1), ln)  # a maximum does not depend on the order
    oo = o_old.view(rows, splits, g, size, kvh, dim)
    w = torch.exp(ln - top)
    total = w
    out = o_new.view(rows, size, heads, dim).float() * w.unsqueeze(-1)
    for s in range(splits):
        w = torch.exp(lo[:, s] - top)
        part = oo[:, s].permute(0, 2, 3, 1, 4).reshape(rows, size, heads, dim)
        out = out + torch.nan_to_num(part.float()) * w.unsqueeze(-1)
        total = total + w
    return (out / total.unsqueeze(-1)).to(o_new.dtype).reshape(rows * size, heads, dim)


class Kernels:
    """The functions above, compiled with ``torch.compile`` where it works (``KV_RAG_COMPILE=0``: never;
    ``KV_RAG_COMPILE_DYNAMIC=0``: one static compile per shape, as before 2a1e158)."""

    def __init__(self) -> None:
        self.pre: Callable[..., Any] = pre
        self.post: Callable[..., Any] = post
        self.merge: Callable[..., Any] = merge
        self.pack: Callable[..., Any] = pack
        self.pack_rows: Callable[..., Any] = pack_rows
        self.merge_rows: Callable[..., Any] = merge_rows
        self.pack_batch: Callable[..., Any] = pack_batch
        self.merge_batch: Callable[..., Any] = merge_batch
        self.compiled = False
        if os.environ.get("KV_RAG_COMPILE", "1").strip() != "0":
            try:
                # dynamic=None: the first shape compiles static, a second one compiles a kernel whose
                # token/row counts are symbolic, which then serves every later step size (static
                # compiles per size were a multi-second stall for each new question length)
                dynamic = None if os.environ.get("KV_RAG_COMPILE_DYNAMIC", "1").strip() != "0" else False
                opts: dict[str, Any] = {"dynamic": dynamic, "fullgraph": True}
                self.pre = torch.compile(pre, **opts)
                self.post = torch.compile(post, **opts)
                self.merge = torch.compile(merge, **opts)
                self.pack = torch.compile(pack, **opts)
                self.pack_rows = torch.compile(pack_rows, **opts)
                self.merge_rows = torch.compile(merge_rows, **opts)
                self.pack_batch = torch.compile(pack_batch, **opts)
                self.merge_batch = torch.compile(merge_batch, **opts)
                self.compiled = True
            except Exception as exc:  # no compiler here: plain functions
                warnings.warn(f"kv-rag: torch.compile unavailable ({exc}); using plain functions", stacklevel=2)
                self.plain()

    def plain(self) -> None:
        """Fall back to the uncompiled functions."""
        self.pre, self.post, self.merge, self.pack = pre, post, merge, pack
        self.pack_rows, self.merge_rows = pack_rows, merge_rows
        self.pack_batch, self.merge_batch = pack_batch, merge_batch
        self.compiled = False


def layer_weights(layer: Any) -> tuple[Weights, Weights, float]:
    """``(pre weights, post weights, rms eps)`` of a Llama-family decoder layer."""
    a, m = layer.self_attn, layer.mlp

    def t(x: Any) -> Any:  # plain tensors (not Parameters): one compiled function for every layer
        return x.detach() if x is not None else None

    def wb(lin: Any) -> tuple[Any, Any]:
        return t(lin.weight), t(getattr(lin, "bias", None))

    qn = getattr(a, "q_norm", None)
    kn = getattr(a, "k_norm", None)
    pre_w = (
        t(layer.input_layernorm.weight),
        *wb(a.q_proj),
        *wb(a.k_proj),
        *wb(a.v_proj),
        t(qn.weight) if qn is not None else None,
        t(kn.weight) if kn is not None else None,
    )
    post_w = (
        *wb(a.o_proj),
        t(layer.post_attention_layernorm.weight),
        *wb(m.gate_proj),
        *wb(m.up_proj),
        *wb(m.down_proj),
    )
    return pre_w, post_w, float(layer.input_layernorm.variance_epsilon)
