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

from kv_rag import Engine
from kv_rag.artifact import Artifact, ArtifactMeta
from kv_rag.layout import block_rows, roomy_block
from kv_rag.runtime import ModelRuntime, PreallocatedLayer, build_cache, fill_static, kernels
from kv_rag.store import DiskTier, GpuTier, MemoryTier, PinnedTier, Store

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

_RUNTIMES: dict[int, tuple[Any, ModelRuntime]] = {}


def runtime_of(model: Any) -> ModelRuntime:
    """One :class:`ModelRuntime` per test model (its decoder, graphs and pool live there)."""
    got = _RUNTIMES.get(id(model))
    if got is None or got[0] is not model:
        got = _RUNTIMES[id(model)] = (model, ModelRuntime(model))
    return got[1]


def forward(model: Any, ids: torch.Tensor, cache: Any, start: int, logits_to_keep: int = 1) -> torch.Tensor:
    return runtime_of(model).forward(ids, cache, start, logits_to_keep)


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
    assert runtime_of(model).decoder is None
    model, _ = _tiny("qwen3")
    assert runtime_of(model).decoder is not None


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
    fast = runtime_of(model).decoder
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


def test_cpu_caches_use_their_own_buffers() -> None:
    model, _ = _tiny("qwen3")
    cache = runtime_of(model).new_cache(16)
    assert cache.slot is None  # static buffers are a CUDA half-precision thing
    assert runtime_of(model).pool(torch.device("cpu")) is None


def _bf16_qwen3() -> Any:
    model, _ = _tiny("qwen3", head_dim=32)
    return model.to("cuda", torch.bfloat16)


@cuda
def test_cuda_whole_step_graph_matches_transformers_and_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KV_RAG_FAST", raising=False)
    model = _bf16_qwen3()
    ids = torch.randint(0, 1000, (1, 80), generator=torch.Generator().manual_seed(4)).cuda()
    fast = runtime_of(model).decoder
    assert fast is not None

    def run(replay: bool) -> tuple[list[torch.Tensor], Any]:
        fast.replay = replay
        cache = runtime_of(model).new_cache(100)
        out = [forward(model, ids[:, :60], cache, 0)[-1]]  # long chunk: transformers into the static buffers
        out.append(forward(model, ids[:, 60:73], cache, 60)[-1])  # 13 tokens: the 16-token step graph
        for p in range(73, 80):
            out.append(forward(model, ids[:, p : p + 1], cache, p)[-1])
        return out, cache

    with torch.inference_mode():
        ref = model(input_ids=ids, use_cache=False).logits[0].float()
        graph_out, cache = run(True)
        slot = cache.slot
        assert cache.layers[0].key_buffer is slot.k[0] and cache.layers[0].get_seq_length() == 80
        assert slot.steps.get(1) is not None and slot.steps.get(16) is not None
        del cache
        eager_out, cache = run(False)
        assert cache.slot is slot  # the freed cache's slot was taken again
    fast.replay = True
    for p, (g, e) in zip([59, 72, *range(73, 80)], zip(graph_out, eager_out, strict=True), strict=True):
        assert torch.equal(g, e), p  # replay = the same kernels as the eager step
        assert (g - ref[p]).abs().max().item() <= 5e-2, p


@cuda
def test_cuda_static_slots_are_per_live_cache_and_outgrowing_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KV_RAG_FAST", raising=False)
    model = _bf16_qwen3()
    n_layers = model.config.num_hidden_layers
    assert len(runtime_of(model).new_cache(50).layers) == n_layers
    a = runtime_of(model).new_cache(50)
    b = runtime_of(model).new_cache(50)
    assert a.slot is not b.slot  # both alive: two slots
    cap = a.slot.cap
    ids = torch.randint(0, 1000, (1, cap + 40), generator=torch.Generator().manual_seed(5)).cuda()
    with torch.inference_mode():
        ref = model(input_ids=ids, use_cache=False).logits[0].float()
        forward(model, ids[:, : cap - 8], a, 0)
        out = forward(model, ids[:, cap - 8 : cap + 10], a, cap - 8)[-1]  # past the slot: buffers grow
        assert a.layers[0].key_buffer is not a.slot.k[0]
        assert (out - ref[cap + 9]).abs().max().item() <= 5e-2
        for p in range(cap + 10, cap + 14):  # decode on the grown cache: per-layer path, still right
            out = forward(model, ids[:, p : p + 1], a, p)[-1]
            assert (out - ref[p]).abs().max().item() <= 5e-2


def test_static_fill_equals_update() -> None:
    g = torch.Generator().manual_seed(6)
    pieces = [[torch.randn(1, 2, t, 8, generator=g) for t in (5, 7)] for _ in range(3)]
    vals = [[torch.randn(1, 2, t, 8, generator=g) for t in (5, 7)] for _ in range(3)]
    bufs = [(torch.zeros(1, 2, 20, 8), torch.zeros(1, 2, 20, 8)) for _ in range(3)]
    layers = [PreallocatedLayer(20, b) for b in bufs]
    assert fill_static(layers, pieces, vals)
    ref = build_cache(pieces, vals, 3, 20)
    for got, want in zip(layers, ref.layers, strict=True):
        assert got.get_seq_length() == 12 and torch.equal(got.keys, want.keys) and torch.equal(got.values, want.values)
        assert got.key_buffer is not None and got.keys.data_ptr() == got.key_buffer.data_ptr()
    # blocks (the pool's buffers, the GPU tier's pieces): one strided copy per piece
    kblock, vblock = torch.zeros(3, 1, 2, 20, 8), torch.zeros(3, 1, 2, 20, 8)
    stacked = [PreallocatedLayer(20, b) for b in zip(kblock.unbind(0), vblock.unbind(0), strict=True)]
    kp = [list(t) for t in zip(torch.stack([p[0] for p in pieces]).unbind(0), [p[1] for p in pieces], strict=True)]
    vp = [list(t) for t in zip(torch.stack([p[0] for p in vals]).unbind(0), [p[1] for p in vals], strict=True)]
    assert fill_static(stacked, kp, vp)
    for got, want in zip(stacked, ref.layers, strict=True):
        assert torch.equal(got.keys, want.keys) and torch.equal(got.values, want.values)
    small = [PreallocatedLayer(4, (torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8))) for _ in range(3)]
    assert not fill_static(small, pieces, vals)  # does not fit: the caller appends (and grows) instead


@pytest.mark.parametrize("arch", ["qwen3", "qwen2"])
def test_fused_layer_functions_match_the_modules(arch: str) -> None:

    model, _ = _tiny(arch)
    dec = runtime_of(model).decoder
    assert dec is not None and dec.fusable
    g = torch.Generator().manual_seed(7)
    h = torch.randn(1, 5, model.config.hidden_size, generator=g)
    with torch.inference_mode():
        _, cos, sin = dec.embed(torch.zeros((1, 5), dtype=torch.long), torch.arange(3, 8).unsqueeze(0))
        cos, sin = cos.transpose(1, 2), sin.transpose(1, 2)
        w_pre, w_post, eps = kernels.layer_weights(model.model.layers[1])
        got = kernels.pre(h, cos, sin, w_pre, eps, dec.head_dim)
        want = dec.pre_rows(1, h, cos, sin)
        for a, b in zip(got, want, strict=True):
            assert torch.allclose(a, b, atol=1e-6)
        o = torch.randn(5, model.config.num_attention_heads, dec.head_dim, generator=g)
        assert torch.allclose(kernels.post(h, o, w_post, eps), dec.post_rows(1, h, o), atol=1e-5)


def _attn_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Math attention of ``q`` ``[rows, heads, dim]`` over ``k``/``v``: output and lse ``[heads, rows]``."""
    s = torch.einsum("rhd,khd->hrk", q, k)
    if causal:
        rows, keys = q.shape[0], k.shape[0]
        s = s.masked_fill(torch.ones(rows, keys, dtype=torch.bool).triu(keys - rows + 1), float("-inf"))
    lse = torch.logsumexp(s, -1)
    out = torch.einsum("hrk,khd->rhd", torch.softmax(s, -1), v)
    if k.shape[0] == 0:
        return torch.zeros_like(q), torch.full_like(lse, float("inf"))  # flash's empty-range convention
    return out, lse


@pytest.mark.parametrize("cached", [0, 3, 29])
def test_split_kv_pack_and_merge_equal_plain_attention(cached: int) -> None:

    g = torch.Generator().manual_seed(cached)
    n, heads, kvh, dim, splits = 4, 8, 2, 16, 3
    q = torch.randn(1, n, heads, dim, generator=g)
    k_all = torch.randn(cached + n, kvh, dim, generator=g)
    v_all = torch.randn(cached + n, kvh, dim, generator=g)
    rep = heads // kvh
    want, _ = _attn_lse(q[0], k_all.repeat_interleave(rep, 1), v_all.repeat_interleave(rep, 1), causal=True)
    # what the varlen call computes: every chunk of the cached rows, packed queries, no mask
    packed = kernels.pack(q, kvh, splits).view(splits, rep * n, kvh, dim)
    bounds = [(cached * i) // splits for i in range(splits + 1)]
    outs, lses = [], []
    for c in range(splits):
        o, lse = _attn_lse(packed[c], k_all[bounds[c] : bounds[c + 1]], v_all[bounds[c] : bounds[c + 1]], False)
        outs.append(o)
        lses.append(lse)
    o_old, lse_old = torch.cat(outs), torch.cat(lses, dim=1)
    kn, vn = k_all[cached:].repeat_interleave(rep, 1), v_all[cached:].repeat_interleave(rep, 1)
    o_new, lse_new = _attn_lse(q[0], kn, vn, causal=True)
    got = kernels.merge(o_old, lse_old, o_new.transpose(0, 1).unsqueeze(0), lse_new.unsqueeze(0), splits, n)
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("cached", [(0, 29), (5, 3)])
def test_batched_split_kv_pack_and_merge_equal_plain_attention(cached: tuple[int, int]) -> None:
    """Two requests' prompt tails in one batched prefill (:class:`~kv_rag.runtime.batch.BatchPrefill`'s
    attention): each row's merged result is plain causal attention over its own cache and tail, empty
    splits (a request with no cached rows) included."""
    g = torch.Generator().manual_seed(sum(cached))
    rows, size, heads, kvh, dim, splits = 2, 4, 8, 2, 16, 3
    rep = heads // kvh
    q = torch.randn(1, rows * size, heads, dim, generator=g)
    packed = kernels.pack_batch(q, kvh, rows, splits).view(rows, splits, rep * size, kvh, dim)
    outs, lses, news, new_lses, wants = [], [], [], [], []
    for r, c in enumerate(cached):
        k_all = torch.randn(c + size, kvh, dim, generator=g)
        v_all = torch.randn(c + size, kvh, dim, generator=g)
        mine = q[0, r * size : (r + 1) * size]
        want, _ = _attn_lse(mine, k_all.repeat_interleave(rep, 1), v_all.repeat_interleave(rep, 1), causal=True)
        wants.append(want)
        bounds = [(c * i) // splits for i in range(splits + 1)]
        for s in range(splits):
            o, lse = _attn_lse(packed[r, s], k_all[bounds[s] : bounds[s + 1]], v_all[bounds[s] : bounds[s + 1]], False)
            outs.append(o)
            lses.append(lse)
        kn, vn = k_all[c:].repeat_interleave(rep, 1), v_all[c:].repeat_interleave(rep, 1)
        o, lse = _attn_lse(mine, kn, vn, causal=True)
        news.append(o)
        new_lses.append(lse)
    got = kernels.merge_batch(
        torch.cat(outs), torch.cat(lses, 1), torch.cat(news), torch.cat(new_lses, 1), rows, splits
    )
    assert torch.allclose(got, torch.cat(wants), atol=1e-5)


def _art_at(key: str, start: int, tokens: int, layers: int = 2) -> Artifact:
    a = _art(key, tokens, layers)
    meta = ArtifactMeta(key, "m", "t", "d", tokens, start, "", "float32", {}, {})
    return Artifact(a.keys, a.values, a.token_ids, meta).sealed()


def test_gpu_tier_keeps_long_artifacts_in_cache_shaped_blocks_with_room() -> None:

    tier = GpuTier(1 << 20, device="cpu", roomy_from=8, room=5, lead=4)
    a = _art_at("a", start=3, tokens=8)
    tier.put("a", a)
    got = tier.get("a")
    assert got is not None
    kb, vb = roomy_block(got.keys[0], 2), roomy_block(got.values[1], 2)
    assert kb is not None and vb is not None and kb.shape == (2, 1, 2, 3 + 8 + 5, 4)
    for layer in range(2):  # each layer's artifact rows sit at its start row of the block
        assert got.keys[layer].data_ptr() == kb[layer, 0, :, 3].data_ptr()
        assert torch.equal(got.keys[layer], a.keys[layer]) and torch.equal(got.values[layer], a.values[layer])
    assert got.checksum() == a.meta.checksum
    assert tier.footprint(got) == 2 * kb.numel() * kb.element_size() + a.token_ids.numel() * 4 > got.nbytes
    assert tier.nbytes == tier.footprint(got)
    tier.put("a", got)  # already in place: kept as it is
    again = tier.get("a")
    assert again is not None and again.keys[0].data_ptr() == got.keys[0].data_ptr()
    for key, art in (("short", _art_at("short", 0, 7)), ("late", _art_at("late", 5, 8))):
        tier.put(key, art)  # too short, or starting past the lead: compact
        kept = tier.get(key)
        assert kept is not None and tier.footprint(kept) == kept.nbytes
        block = roomy_block(kept.keys[0], 2)  # one block, rows = the artifact's tokens: no room
        assert block is not None and block.shape[3] == art.meta.num_tokens
    pinned = PinnedTier(1 << 20)
    pinned.put("a", got)  # copied down from the roomy views: the same values
    down = pinned.get("a")
    assert down is not None and down.checksum() == a.meta.checksum
    tier.delete("a")
    assert tier.nbytes == sum(tier.footprint(x) for x in (tier.get("short"), tier.get("late")) if x is not None)


def test_lent_block_is_found_only_where_the_pieces_belong() -> None:
    tier = GpuTier(1 << 20, device="cpu", roomy_from=8, room=5, lead=4)
    tier.put("a", _art_at("a", start=3, tokens=8))
    tier.put("c", _art_at("c", start=0, tokens=7))  # compact
    a, c = tier.get("a"), tier.get("c")
    assert a is not None and c is not None
    pieces = [k.unsqueeze(0) for k in a.keys]  # as the engine passes them: [1, kv_heads, n, dim]
    block = block_rows(pieces, 3)
    assert block is not None and block.shape == (2, 1, 2, 16, 4)
    assert block_rows(pieces, 2) is None  # not at the row where it belongs
    assert block_rows(pieces[::-1], 3) is None  # layers out of order
    assert block_rows([k.unsqueeze(0) for k in a.values], 3) is not None
    assert block_rows([k.unsqueeze(0).clone() for k in a.keys], 3) is None  # a copy
    compact = block_rows([k.unsqueeze(0) for k in c.keys], 0)
    assert compact is not None and compact.shape[3] == 7  # found, but no room: a request cannot be lent it


def _roomy_engine(model: Any, tok: Any, roomy_from: int) -> Engine:
    return Engine(model, tokenizer=tok, store=Store([GpuTier(1 << 30, roomy_from=roomy_from, room=1024)]))


@cuda
def test_cuda_gpu_tier_hit_uses_the_tier_block_without_copying(monkeypatch: pytest.MonkeyPatch) -> None:

    monkeypatch.delenv("KV_RAG_FAST", raising=False)
    model, tok = _tiny("qwen3", head_dim=32)
    model.to("cuda", torch.bfloat16)
    doc = "Kettles sing when the water inside them nears its boiling point. " * 12
    lent, copied = _roomy_engine(model, tok, 64), _roomy_engine(model, tok, 1 << 30)  # the prefix stays compact
    prompt = lent.prompt("Why do kettles sing?", [doc])
    tp = lent.tokenize(prompt)
    for eng in (lent, copied):
        eng.publish([doc])
    keys = lent.segment_keys(tp)
    assert len(tp.segments) == 2 and tp.is_document == (False, True)
    art = lent.store.tiers[0].get(keys[-1])  # the document: the last cached segment
    assert art is not None
    block = roomy_block(art.keys[0], art.num_layers)
    assert block is not None
    before = art.checksum()
    with torch.inference_mode():
        pre = lent.prefill(tp, reserve=20)
        assert pre.cached_tokens == len(tp) - len(tp.suffix)
        assert pre.cache.layers[0].key_buffer.data_ptr() == block.data_ptr()  # the tier's block: no copy
        other = lent.prefill(tp, reserve=20)  # the block is in use: this one copies
        assert other.cache.layers[0].key_buffer.data_ptr() != block.data_ptr()
        assert torch.equal(pre.logits, other.logits) or (pre.logits - other.logits).abs().max().item() <= 5e-2
        ref = lent.reference_logits(tp.ids)
        assert (pre.logits - ref).abs().max().item() <= 5e-2
        del pre, other
    hit = lent.generate(prompt, max_new_tokens=16)
    base = copied.generate(prompt, max_new_tokens=16)
    assert any(s.tier == "gpu" for s in hit.segments)
    assert hit.token_ids == base.token_ids
    after = lent.store.tiers[0].get(keys[-1])
    assert after is not None and after.checksum() == before == art.meta.checksum  # the tier's rows untouched
