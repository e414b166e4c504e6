"""Projections of the CPU batched step from weights packed once for oneDNN.

A decode step of a small model on the CPU is bound by reading the weights. ``F.linear`` of a few
rows (several requests' tokens) took about twice as long as of one row on a 2-core x86 VM, so a
step of 4 requests cost about twice one request's. Weights packed once in oneDNN's blocked layout
(``torch.ops.mkldnn._reorder_linear_weight``, read by ``torch.ops.mkldnn._linear_pointwise``) took
about half as long; the query, key and value projections are one packed matrix, and so are the
MLP's gate and up projections.

The packed copy costs as much memory as the model's projection weights, so it is made only for
float32 models on the CPU whose projections take at most :data:`PACK_LIMIT_BYTES` (switch:
``KV_RAG_CPU_PACK`` = ``0`` never, ``1`` whatever the size). Results equal ``F.linear``'s up to
rounding (another summation order: about 5e-5 on the embedded model's logits), as the batched
step's already did (:mod:`kv_rag.serving`).
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
import torch.nn.functional as F

from .kernels import rms, rope

#: Largest total size of the projection weights that are packed (their copy doubles that memory).
PACK_LIMIT_BYTES = 2 << 30

#: Rows the packed layout is tuned for (several requests' tokens per step).
PACK_ROWS = 4


class PackedLinear:
    """One linear map (weight ``[out, in]``, optional bias) with the weight packed for oneDNN."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.out = int(weight.shape[0])
        self.bias = bias.detach().contiguous() if bias is not None else None
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), PACK_ROWS)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ weight.T + bias`` for ``x`` ``[..., in]``."""
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), self.packed, self.bias, "none", [], "")
        return y.view(*x.shape[:-1], self.out)


def _fused(*linears: Any) -> PackedLinear:
    """The linears' weights stacked along their outputs (one product for all of them)."""
    weight = torch.cat([lin.weight.detach() for lin in linears])
    biases = [getattr(lin, "bias", None) for lin in linears]
    if all(b is None for b in biases):
        return PackedLinear(weight, None)
    bias = torch.cat(
        [
            b.detach() if b is not None else weight.new_zeros(lin.weight.shape[0])
            for b, lin in zip(biases, linears, strict=True)
        ]
    )
    return PackedLinear(weight, bias)


def pack_enabled(model: Any) -> bool:
    """Whether the CPU batched step of ``model`` uses packed weights (see the module's docstring)."""
    flag = os.environ.get("KV_RAG_CPU_PACK", "").strip()
    if flag == "0" or not torch.backends.mkldnn.is_available():
        return False
    head = model.lm_head.weight
    if head.device.type != "cpu" or head.dtype != torch.float32:
        return False
    if flag == "1":
        return True
    size = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, torch.nn.Linear))
    return size <= PACK_LIMIT_BYTES


class PackedLayers:
    """Every layer's projections (q/k/v fused, gate/up fused, o, down) and the head, packed.

    Built by :meth:`build`; :meth:`pre` and :meth:`post` follow :func:`kv_rag.runtime.kernels.pre`
    and :func:`~kv_rag.runtime.kernels.post` (the same RMSNorm, rotary and SiLU MLP).
    """

    def __init__(self, dec: Any) -> None:
        layers = dec.inner.layers
        self.qkv = [_fused(x.self_attn.q_proj, x.self_attn.k_proj, x.self_attn.v_proj) for x in layers]
        self.o = [_fused(x.self_attn.o_proj) for x in layers]
        self.gate_up = [_fused(x.mlp.gate_proj, x.mlp.up_proj) for x in layers]
        self.down = [_fused(x.mlp.down_proj) for x in layers]
        self.head = _fused(dec.lm_head)
        self.norms = [(x.input_layernorm.weight.detach(), x.post_attention_layernorm.weight.detach()) for x in layers]
        a = layers[0].self_attn
        self.qk_norms = [
            (x.self_attn.q_norm.weight.detach(), x.self_attn.k_norm.weight.detach()) if dec.qk_norm else None
            for x in layers
        ]
        self.eps = float(layers[0].input_layernorm.variance_epsilon)
        self.final_norm = dec.inner.norm
        self.head_dim = dec.head_dim
        self.q_out = int(a.q_proj.weight.shape[0])
        self.kv_out = int(a.k_proj.weight.shape[0])
        self.ffn = int(layers[0].mlp.gate_proj.weight.shape[0])

    @classmethod
    def build(cls, dec: Any) -> PackedLayers | None:
        """Packed layers for ``dec`` (a :class:`~kv_rag.runtime.decoder.FastDecoder`), or ``None`` when
        they do not apply (see :func:`pack_enabled`) or packing fails (then plain modules are used)."""
        if not dec.fusable or not pack_enabled(dec.model):
            return None
        try:
            return cls(dec)
        except (RuntimeError, AttributeError) as exc:
            warnings.warn(f"kv-rag: packed CPU weights unavailable ({exc}); using plain ones", stacklevel=3)
            return None

    def pre(
        self, i: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer ``i``'s query, key and value ``[1, heads, n, dim]`` (cos/sin ``[1, 1, n, dim]``)."""
        n, d = h.shape[1], self.head_dim
        qkv = self.qkv[i](rms(h, self.norms[i][0], self.eps))
        q, k, v = qkv.split((self.q_out, self.kv_out, self.kv_out), dim=-1)
        q, k, v = q.view(1, n, -1, d), k.reshape(1, n, -1, d), v.reshape(1, n, -1, d)
        norms = self.qk_norms[i]
        if norms is not None:
            q, k = rms(q, norms[0], self.eps), rms(k, norms[1], self.eps)
        cos, sin = cos.transpose(1, 2), sin.transpose(1, 2)
        return rope(q, cos, sin).transpose(1, 2), rope(k, cos, sin).transpose(1, 2), v.transpose(1, 2)

    def post(self, i: int, h: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """Hidden states after layer ``i``'s output projection and MLP (``o``: ``[1, heads, n, dim]``)."""
        h = h + self.o[i](o.transpose(1, 2).reshape(1, o.shape[2], -1))
        gate, up = self.gate_up[i](rms(h, self.norms[i][1], self.eps)).split(self.ffn, dim=-1)
        return h + self.down[i](F.silu(gate) * up)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Float32 logits ``[n, vocab]`` of hidden states ``h`` ``[1, n, hidden]``."""
        return self.head(self.final_norm(h))[0].float()
