"""GPU path: the GPU and pinned tiers, the fast suffix/decode forward, CUDA graphs.

The tier logic and the fast forward's exactness run on CPU (CI); what needs CUDA is skipped there.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny import tiny_model

from kv_rag import Engine, _fastpath
from kv_rag._compat import build_cache, forward
from kv_rag.artifact import Artifact, ArtifactMeta
from kv_rag.store import DiskTier, GpuTier, MemoryTier, PinnedTier, Store

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _tiny(arch: str, **overrides: Any) -> tuple[Any, Any]:
    """A tiny model on CUDA machines, where the embedded model's package may be absent.

    ``KV_RAG_TEST_TOKENIZER`` names a tokenizer folder to use instead of the embedded model's.
    """
    path = os.environ.get("KV_RAG_TEST_TOKENIZER")
    if not path:
        return tiny_model(arch, **overrides)
    import tiny
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    config = AutoConfig.for_model(arch, **{**tiny._BASE, **tiny.ARCHS[arch], "vocab_size": len(tok), **overrides})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval(), tok


def _art(key: str, tokens: int = 8, layers: int = 2, device: str = "cpu") -> Artifact:
    g = torch.Generator().manual_seed(tokens)
    ks = tuple(torch.randn(2, tokens, 4, generator=g).to(device) for _ in range(layers))
    vs = tuple(torch.randn(2, tokens, 4, generator=g).to(device) for _ in range(layers))
    meta = ArtifactMeta(key, "m", "t", "d", tokens, 0, "", "float32", {}, {})
    return Artifact(ks, vs, torch.arange(tokens, dtype=torch.int32), meta).sealed()


def test_pinned_tier_falls_back_to_plain_memory_without_cuda() -> None:
    tier = PinnedTier(1 << 20)
    assert tier.pinned == torch.cuda.is_available()
    a = _art("a")
    tier.put("a", a)
    got = tier.get("a")
    assert got is not None and got.keys[0].device.type == "cpu"
    assert torch.equal(got.keys[1], a.keys[1]) and got.checksum() == a.meta.checksum
    assert PinnedTier(1 << 20, pin=False).pinned is False


def test_device_tiers_are_lru_by_bytes() -> None:
    one = _art("x").nbytes
    for tier in (GpuTier(2 * one, device="cpu"), PinnedTier(2 * one)):
        for k in "abc":
            tier.put(k, _art(k))
        assert "a" not in tier and "b" in tier and "c" in tier
        assert tier.nbytes <= 2 * one
        tier.put("huge", _art("huge", tokens=64))  # larger than the tier: not kept
        assert "huge" not in tier and len(tier) == 2


def test_copy_up_hands_the_top_tier_copy(tmp_path: Path) -> None:
    gpu, pinned, disk = GpuTier(1 << 20, device="cpu"), PinnedTier(1 << 20), DiskTier(tmp_path)
    store = Store([gpu, pinned, disk])
    store.put("k", _art("k"))
    gpu.delete("k")
    pinned.delete("k")
    hit = store.get("k")
    assert hit is not None and hit.tier == "disk"
    assert "k" in pinned and "k" in gpu
    assert hit.artifact is gpu.get("k")  # the engine copies from the top tier, nothing twice


def test_store_open_on_cuda_puts_gpu_and_pinned_tiers_first(tmp_path: Path) -> None:
    names = [t.name for t in Store.open(tmp_path / "s", device="cuda").tiers]
    assert names == ["gpu", "pinned", "disk"]
    assert [t.name for t in Store.open("memory", device="cpu").tiers] == ["memory"]
    assert isinstance(Store.open("memory", device="cuda:0").tiers[0], GpuTier)
    assert not isinstance(Store.open("memory").tiers[0], (GpuTier, PinnedTier)) and isinstance(
        Store.open("memory").tiers[0], MemoryTier
    )


def test_fast_path_refuses_sliding_window_models() -> None:
    model, _ = _tiny("mistral", sliding_window=32)
    assert _fastpath.runner_for(model) is None
    model, _ = _tiny("qwen3")
    assert _fastpath.runner_for(model) is not None


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_fast_suffix_and_decode_match_transformers(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model, _ = _tiny(arch)
    ids = torch.randint(0, 1000, (1, 50), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = model(input_ids=ids, use_cache=False).logits[0].float()
        monkeypatch.setenv("KV_RAG_FAST", "0")
        cache = build_cache(None, None, model.config.num_hidden_layers, 64)
        forward(model, ids[:, :30], cache, 0)
        monkeypatch.setenv("KV_RAG_FAST", "1")
        suffix = forward(model, ids[:, 30:45], cache, 30, logits_to_keep=15)
        assert (suffix - ref[30:45]).abs().max().item() <= 1e-5
        for p in range(45, 50):
            step = forward(model, ids[:, p : p + 1], cache, p)[-1]
            assert (step - ref[p]).abs().max().item() <= 1e-5
    assert cache.layers[0].get_seq_length() == 50


def test_engine_hit_through_fast_path_is_exact(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KV_RAG_FAST", "1")
    doc = "The lighthouse keeper logged every ship that passed the northern cape in a green ledger. " * 6
    engine.publish([doc])
    prompt = engine.prompt("What colour was the ledger?", [doc])
    pre = engine.prefill(prompt)
    assert pre.cached_tokens > 0
    ref = engine.reference_logits(engine.tokenize(prompt).ids)
    assert pre.logits is not None and (pre.logits - ref).abs().max().item() <= 1e-4
    hit = engine.generate(prompt, max_new_tokens=8)
    monkeypatch.setenv("KV_RAG_FAST", "0")
    cold = engine.generate(prompt, max_new_tokens=8, use_cache=False)
    assert hit.token_ids == cold.token_ids


@cuda
def test_cuda_tiers_hold_device_and_pinned_tensors() -> None:
    a = _art("a", device="cuda")
    pinned = PinnedTier(1 << 20)
    pinned.put("a", a)
    held = pinned.get("a")
    assert held is not None and held.keys[0].is_pinned() and torch.equal(held.keys[0], a.keys[0].cpu())
    gpu = GpuTier(1 << 20)
    gpu.put("a", held)
    got = gpu.get("a")
    assert got is not None and got.keys[0].is_cuda and got.token_ids.device.type == "cpu"
    assert torch.equal(got.values[1], a.values[1])


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_decode_matches_transformers(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    model, _ = _tiny("qwen3")
    model.to("cuda", dtype)
    ids = torch.randint(0, 1000, (1, 60), generator=torch.Generator().manual_seed(2)).cuda()
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    with torch.inference_mode():
        ref = model(input_ids=ids, use_cache=False).logits[0].float()
        monkeypatch.setenv("KV_RAG_FAST", "0")
        cache = build_cache(None, None, model.config.num_hidden_layers, 64)
        forward(model, ids[:, :40], cache, 0)
        monkeypatch.delenv("KV_RAG_FAST")
        for p in range(40, 60):
            step = forward(model, ids[:, p : p + 1], cache, p)[-1]
            assert (step - ref[p]).abs().max().item() <= tol, p
    fast = _fastpath.runner_for(model)
    assert fast is not None and fast._graphs.get(1) is not None  # the steps were replayed from graphs
    assert cache.layers[0].get_seq_length() == 60


@cuda
def test_cuda_graph_suffix_pads_to_a_bucket(monkeypatch: pytest.MonkeyPatch) -> None:
    model, _ = _tiny("llama")
    model.to("cuda")
    ids = torch.randint(0, 1000, (1, 50), generator=torch.Generator().manual_seed(3)).cuda()
    with torch.inference_mode():
        ref = model(input_ids=ids, use_cache=False).logits[0].float()
        monkeypatch.setenv("KV_RAG_FAST", "0")
        cache = build_cache(None, None, model.config.num_hidden_layers, 64)
        forward(model, ids[:, :30], cache, 0)
        monkeypatch.delenv("KV_RAG_FAST")
        out = forward(model, ids[:, 30:43], cache, 30)[-1]  # 13 tokens: the 16-token graphs
        assert (out - ref[42]).abs().max().item() <= 1e-4
        out = forward(model, ids[:, 43:50], cache, 43)[-1]  # 7 tokens: the 8-token graphs
        assert (out - ref[49]).abs().max().item() <= 1e-4
    assert cache.layers[0].get_seq_length() == 50


@cuda
def test_cuda_engine_hit_greedy_equal(tmp_path: Path) -> None:
    model, tok = _tiny("qwen3")
    model.to("cuda", torch.bfloat16)
    eng = Engine(model, tokenizer=tok, store=tmp_path / "store")
    assert [t.name for t in eng.store.tiers] == ["gpu", "pinned", "disk"]
    doc = "Kettles sing when the water inside them nears its boiling point. " * 8
    eng.publish([doc])
    prompt = eng.prompt("Why do kettles sing?", [doc])
    hit = eng.generate(prompt, max_new_tokens=12)
    cold = eng.generate(prompt, max_new_tokens=12, use_cache=False)
    assert hit.cached_tokens > 0 and any(s.tier == "gpu" for s in hit.segments)
    assert hit.token_ids == cold.token_ids


def test_engine_on_a_model_object_opens_a_store_for_its_device(tmp_path: Path) -> None:
    model, tok = _tiny("llama")
    eng = Engine(model, tokenizer=tok, store=tmp_path / "store")
    assert [t.name for t in eng.store.tiers] == ["memory", "disk"]  # the model is on the CPU
