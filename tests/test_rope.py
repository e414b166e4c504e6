"""Moving cached keys: a key shifted by d positions equals the key computed directly d positions later."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tiny import tiny_model

from kv_rag import UnsupportedModelError
from kv_rag import models as kv_models
from kv_rag.rope import RotaryShift, rotary_shift, sliding_window, window_refusal
from kv_rag.runtime import ModelRuntime, build_cache, cache_layers

TOL = 1e-4

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 512,
    "rope_theta": 500000.0,
}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024, "rope_theta": 10000.0}

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-llama3": ("llama", {"rope_parameters": LLAMA3}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "mistral": ("mistral", {}),
    "llama-yarn": ("llama", {"rope_parameters": YARN}),
    "llama-linear": ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}),
    "phi-partial": ("phi", {"partial_rotary_factor": 0.5}),
    "gpt_neox-partial": ("gpt_neox", {"rotary_pct": 0.25}),
}


def _kv(model: Any, ids: torch.Tensor, start: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    cache = build_cache(None, None, n_layers, ids.shape[1])
    with torch.inference_mode():
        ModelRuntime(model).forward(ids, cache, start)
    return cache_layers(cache)


def _shift_errors(model: Any, n: int, src: int, dst: int) -> tuple[RotaryShift, list[float], list[float]]:
    shifter = rotary_shift(model)
    ids = torch.randint(0, 2000, (1, n), generator=torch.Generator().manual_seed(1))
    at_src, at_dst = _kv(model, ids, src), _kv(model, ids, dst)
    rot = shifter.rotation(src, dst, n)
    pairs = list(zip(at_src, at_dst, strict=True))
    k_err = [float((shifter.shift(k0, src, dst, rot) - k1).abs().max()) for (k0, _), (k1, _) in pairs]
    v_err = [float((v0 - v1).abs().max()) for (_, v0), (_, v1) in pairs]
    return shifter, k_err, v_err


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_shift_equals_direct_computation_on_tiny_models(variant: str) -> None:
    arch, overrides = VARIANTS[variant]
    model, _ = tiny_model(arch, **overrides)
    for src, dst in [(3, 1500), (900, 17)]:  # forwards and backwards, far apart
        shifter, k_err, v_err = _shift_errors(model, 24, src, dst)
        assert max(k_err) <= TOL, (variant, src, dst, k_err)
        assert max(v_err) <= TOL
    if "partial" in variant:
        head_dim = model.config.hidden_size // model.config.num_attention_heads
        assert shifter.rotary_dim < head_dim
    expected_type = overrides.get("rope_parameters", {}).get("rope_type", "default")
    assert shifter.rope_type == expected_type
    assert shifter.layout == "half"


def test_yarn_attention_factor_is_not_applied_twice() -> None:
    model, _ = tiny_model("llama", rope_parameters=YARN)
    rotary = next(m for m in model.modules() if hasattr(m, "inv_freq"))
    assert rotary.attention_scaling > 1.05  # the factor that multiplies cos and sin of q and k
    _, k_err, _ = _shift_errors(model, 16, 0, 3000)
    assert max(k_err) <= TOL


def test_shift_on_the_embedded_model(embedded: kv_models.LoadedModel) -> None:
    """First layers exactly; deeper layers within float32 noise that the values (never shifted) show too."""
    shifter, k_err, v_err = _shift_errors(embedded.model, 48, 37, 1800)
    assert k_err[0] <= TOL and k_err[1] <= TOL, k_err[:2]
    # deeper keys differ by the float32 noise of attention at other positions, as the values do
    assert max(k_err) <= 1e-3, k_err
    assert max(k_err) <= 5 * max(v_err) + TOL
    assert shifter.rope_type == "default"


def test_zero_shift_returns_the_keys_unchanged() -> None:
    shifter = RotaryShift(torch.tensor([1.0, 0.1]), "default", "half")
    k = torch.randn(2, 5, 4)
    assert shifter.shift(k, 7, 7) is k
    back = shifter.shift(shifter.shift(k, 7, 100), 100, 7)
    assert float((back - k).abs().max()) < 1e-5


@pytest.mark.parametrize(
    "arch,overrides,reason",
    [
        ("llama", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}}, "dynamic NTK"),
        ("gpt2", {}, "no rotary"),
    ],
)
def test_unshiftable_models_are_refused(arch: str, overrides: dict[str, Any], reason: str) -> None:
    if arch == "gpt2":
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.for_model("gpt2", n_embd=32, n_layer=1, n_head=2, vocab_size=100)
        model = AutoModelForCausalLM.from_config(config)
    else:
        model, _ = tiny_model(arch, **overrides)
    with pytest.raises(UnsupportedModelError, match=reason):
        rotary_shift(model)


def test_a_rotary_embedding_per_layer_type_is_refused_by_name() -> None:
    """Gemma 3 keeps one set of frequencies per layer type (and sliding-window layers): the refusal says so."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "gemma3_text", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, vocab_size=100, sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(
        UnsupportedModelError, match=r"per layer type \(full_attention, sliding_attention\) and sliding"
    ):
        rotary_shift(model)


def test_sliding_window_refused_only_beyond_the_window() -> None:
    model, _ = tiny_model("mistral", sliding_window=64)
    assert sliding_window(model) == 64
    assert window_refusal(model, 64) is None
    msg = window_refusal(model, 65)
    assert msg is not None and "sliding-window" in msg
    qwen, _ = tiny_model("qwen2")  # sliding_window set in the config but not used
    assert sliding_window(qwen) is None
