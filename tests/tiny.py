"""Tiny random-initialised causal LMs of several architectures, built in the test process (no downloads)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from kv_rag import models as kv_models

_BASE: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
)

#: llama3-scaled rotary parameters (original context 256, so tests reach the scaled frequencies)
LLAMA3_ROPE: dict[str, Any] = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 256,
}

#: model_type -> extra config entries
ARCHS: dict[str, dict[str, Any]] = {
    "llama": {},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "mistral": {"sliding_window": None},
}


def tiny_model(model_type: str, seed: int = 0, **overrides: Any) -> tuple[Any, Any]:
    """(model, tokenizer): a random ``model_type`` model using the embedded model's tokenizer."""
    tok = kv_models.load(None, "cpu", "float32").tokenizer
    kwargs = {**_BASE, **ARCHS.get(model_type, {}), "vocab_size": len(tok), **overrides}
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    return model, tok
