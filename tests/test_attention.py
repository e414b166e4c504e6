"""Grouped-query SDPA on CPU: the same bits as transformers' repeated-KV SDPA, without the copies."""

from __future__ import annotations

import torch
from tiny import tiny_model

from kv_rag import Engine
from kv_rag.runtime import ModelRuntime, attention, build_cache


def _hit_logits(model: object, ids: torch.Tensor, cut: int, layers: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits of ``ids[cut:]`` on top of a cache of ``ids[:cut]``, and the cache's keys."""
    with torch.inference_mode():
        cache = build_cache(None, None, layers, ids.shape[1] + 4)
        runtime = ModelRuntime(model)
        runtime.forward(ids[:, :cut], cache, 0)
        logits = runtime.forward(ids[:, cut:], cache, cut, logits_to_keep=ids.shape[1] - cut)
    return logits, [layer.keys.clone() for layer in cache.layers]


def test_grouped_sdpa_is_bitwise_equal_to_transformers_sdpa() -> None:
    model, _ = tiny_model("qwen2", num_attention_heads=8, num_key_value_heads=2)
    assert model.config._attn_implementation == "sdpa"
    ids = torch.randint(0, 1000, (1, 90), generator=torch.Generator().manual_seed(0))
    plain, plain_keys = _hit_logits(model, ids, 70, 2)
    assert attention.use_grouped_sdpa(model)
    assert model.config._attn_implementation == attention.NAME
    grouped, grouped_keys = _hit_logits(model, ids, 70, 2)
    assert torch.equal(plain, grouped)
    assert all(torch.equal(a, b) for a, b in zip(plain_keys, grouped_keys, strict=True))


def test_loaded_cpu_models_use_it_and_other_implementations_are_left_alone() -> None:
    assert Engine().model.config._attn_implementation == attention.NAME
    model, _ = tiny_model("llama", attn_implementation="eager")
    assert not attention.use_grouped_sdpa(model)
    assert model.config._attn_implementation == "eager"
