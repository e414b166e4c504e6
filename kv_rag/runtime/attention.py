"""SDPA with grouped KV heads kept grouped when a mask is passed, on CPU.

transformers' ``sdpa`` attention repeats every KV head ``num_key_value_groups`` times whenever an
attention mask is given (it only uses ``enable_gqa`` without a mask, because CUDA's fast kernels
refuse a mask with grouped heads). After a cache hit there is always a mask (the new tokens sit at
an offset), so every suffix step copied the whole cached KV three times per layer for SmolLM2: at
4k tokens the copy and the wider attention took half of a hit's time. On CPU PyTorch's SDPA takes
a mask and ``enable_gqa`` together, with bitwise the same result, so this attention passes them
straight through and defers to transformers' own function for everything else.

:func:`use_grouped_sdpa` switches a CPU model that uses ``sdpa`` to it (registered under
:data:`NAME` with transformers' attention and mask interfaces; the fingerprint ignores the name).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

#: The attention implementation name registered with transformers.
NAME = "kv_rag_sdpa"
_registered = False


def grouped_sdpa_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, with ``enable_gqa`` instead of repeated KV heads under a mask on CPU."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = int(getattr(module, "num_key_value_groups", 1))
    if (
        groups > 1
        and attention_mask is not None
        and query.device.type == "cpu"
        and kwargs.get("position_bias") is None
        and kwargs.get("softcap") is None
        and not kwargs.get("output_attentions", False)
    ):
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True
        )
        return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
    )


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(NAME, grouped_sdpa_forward)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    _registered = True


def use_grouped_sdpa(model: Any) -> bool:
    """Switch ``model`` from ``sdpa`` to :data:`NAME` when it runs on CPU; return whether it did.

    Models with another attention implementation, or on another device, are left as they are.
    """
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    try:
        if next(model.parameters()).device.type != "cpu":
            return False
        _register()
        model.set_attn_implementation(NAME)
    except (StopIteration, AttributeError, ValueError, KeyError, ImportError):
        return False
    return config._attn_implementation == NAME
