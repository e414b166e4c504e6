"""APE-style attention on stitched documents (Yang, Chen and Chen, ICLR 2025, "Adaptive Parallel Encoding").

APE encodes the retrieved documents in parallel after a shared prefix (kv-rag's documents are
computed after the system prefix already) and changes how every later token attends to them: the
attention logits ``s_j`` of document tokens are divided by a temperature ``T`` inside the document
block, and the block as a whole enters the softmax with the logit ``T * logsumexp(s / T) + log S``
(the authors' ``llama_attention_prefill_query``). Written per token, a document token's logit becomes

    s_j / T + (T - 1) * logsumexp_docs(s / T) + log S

and the prefix, the text between documents, the question and the answer keep theirs. With
``T = 1`` it is an additive ``log S`` on the documents; ``T = 1, S = 1`` is plain stitching. The
query-dependent term is why this cannot be folded into the cached keys (dividing the keys by ``T``
gives ``s_j / T`` but not the block's weight), so it is an attention function of its own.

:func:`attach_ape` marks a request's cache with the document slots and the settings; the model gets,
once, an attention implementation that computes the above for a forward on a marked cache and defers
to the model's own implementation otherwise (a pre-hook on the model reads the cache argument).
Only forwards through transformers see it: on CUDA with ``KV_RAG_FAST`` the fast decoder does not,
so :func:`attach_ape` refuses there. Known gap: on the CPU, several requests decoded in one step go
through :meth:`~kv_rag.runtime.model.ModelRuntime.forward_batch`'s ragged fast-decoder step, which
does not see it either (read from the code, not tested): an APE request decoded together with others
would get plain stitched attention for those steps. Measured on the fidelity questions, APE did not
improve on stitching (docs/fidelity.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InputError
from ..options import ApeSettings
from ..runtime.decoder import fast_path_enabled
from .geometry import StitchGeometry

_ACTIVE: ContextVar[ApeState | None] = ContextVar("kv_rag_ape", default=None)


@dataclass(frozen=True)
class ApeState:
    """What a marked cache carries: which slots hold document tokens, ``T`` and ``log S``."""

    documents: torch.Tensor
    temperature: float
    log_scale: float


def attach_ape(model: Any, cache: Any, geometry: StitchGeometry, settings: ApeSettings) -> None:
    """Mark ``cache``: every later forward on it attends to the documents as APE does."""
    device = geometry.device
    if fast_path_enabled(device):
        raise InputError("ape needs the transformers forward path; set KV_RAG_FAST=0 to use it on this device")
    _install(model)
    docs = torch.zeros(geometry.total, dtype=torch.bool)
    for a, b in geometry.documents:
        docs[a:b] = True
    cache.ape = ApeState(docs.to(device), float(settings.temperature), math.log(settings.scale))


def _install(model: Any) -> None:
    if getattr(model, "_kv_rag_ape", False):
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    base = model.config._attn_implementation
    own = ALL_ATTENTION_FUNCTIONS.get_interface(base, _eager)
    name = f"kv_rag_ape_{base}"
    AttentionInterface.register(name, _wrap(own))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base if base != "eager" else "eager"])
    model.set_attn_implementation(name)
    tokens: list[Token[ApeState | None]] = []

    def enter(_m: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        tokens.append(_ACTIVE.set(getattr(cache, "ape", None)))

    def leave(*_: Any) -> None:
        if tokens:
            _ACTIVE.reset(tokens.pop())

    model.register_forward_pre_hook(enter, with_kwargs=True)
    model.register_forward_hook(leave, always_call=True)
    model._kv_rag_ape = True


def _eager(*args: Any, **kwargs: Any) -> Any:
    from transformers.models.llama.modeling_llama import eager_attention_forward

    return eager_attention_forward(*args, **kwargs)


def _wrap(own: Callable[..., Any]) -> Callable[..., Any]:
    def attention(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        state = _ACTIVE.get()
        if state is None:
            return own(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        return ape_attention(query, key, value, attention_mask, scaling, state), None

    return attention


def ape_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float | None,
    state: ApeState,
) -> torch.Tensor:
    """APE attention: ``query`` ``[b, heads, q, d]`` over ``key``/``value`` ``[b, kv_heads, k, d]``; returns
    ``[b, q, heads, d]`` (transformers' layout). ``mask``: bool (True: may attend), additive float, or
    ``None`` (causal, aligned to the last key)."""
    groups = query.shape[1] // key.shape[1]
    k = key.float().repeat_interleave(groups, dim=1)
    v = value.float().repeat_interleave(groups, dim=1)
    n_q, n_k = query.shape[-2], k.shape[-2]
    s = query.float() @ k.transpose(-1, -2) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    if mask is None:
        rows = torch.arange(n_q, device=s.device)[:, None] + (n_k - n_q)
        allowed = torch.arange(n_k, device=s.device)[None, :] <= rows
    elif mask.dtype == torch.bool:
        allowed = mask
    else:
        s = s + mask.float()
        allowed = mask > torch.finfo(mask.dtype).min / 2
    allowed = allowed.expand_as(s)
    docs = torch.zeros(n_k, dtype=torch.bool, device=s.device)
    m = min(n_k, int(state.documents.numel()))
    docs[:m] = state.documents[:m]
    neg = float("-inf")
    d = (s[..., docs] / state.temperature).masked_fill(~allowed[..., docs], neg)
    lse = torch.logsumexp(d, dim=-1, keepdim=True)
    shift = ((state.temperature - 1.0) * lse).nan_to_num(0.0, 0.0, 0.0) + state.log_scale
    s[..., docs] = d + shift
    p = s.masked_fill(~allowed, neg).softmax(-1).nan_to_num(0.0)
    return (p @ v).transpose(1, 2).contiguous().to(query.dtype)
