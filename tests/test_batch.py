"""Batched decode on CUDA: arenas of static slots, one graph stepping every live request of an arena.

Everything here needs CUDA (skipped on the CPU, where :meth:`FastDecoder.forward_ragged` batches
instead; see test_serving.py).
"""

from __future__ import annotations

import gc
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from test_gpu import _tiny

from kv_rag import Engine
from kv_rag.runtime import ModelRuntime
from kv_rag.runtime.pool import StaticPool
from kv_rag.store import GpuTier, Store

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _model() -> Any:
    model, tok = _tiny("qwen3", head_dim=32)
    return model.to("cuda", torch.bfloat16), tok


@cuda
def test_graphs_can_be_captured_after_every_graph_of_the_pool_was_dropped() -> None:
    """Dropping every arena (a longer context's arena evicts them) destroys every graph of the static pool
    while blocks of the pool may still be alive; capturing into the pool again must still work."""
    pool = StaticPool(None, torch.device("cuda"), torch.bfloat16)  # type: ignore[arg-type]
    x = torch.ones(4, device="cuda")
    first = torch.cuda.CUDAGraph()
    with torch.cuda.graph(first, pool=pool.mempool):
        y = x * 2
    first.replay()  # y = 2 (a capture only records)
    del first  # every graph that captured into the pool is gone; y (the pool's memory) lives on
    again = torch.cuda.CUDAGraph()
    with torch.cuda.graph(again, pool=pool.mempool):
        z = y + 1
    again.replay()
    assert z.tolist() == [3.0] * 4


@cuda
def test_batched_step_matches_a_full_forward_and_ignores_its_neighbours(monkeypatch: pytest.MonkeyPatch) -> None:
    """Three caches of different lengths stepped at once: each row is its own request's next-token
    logits (against a from-scratch forward), bit-identical to the same request stepped alone."""
    monkeypatch.delenv("KV_RAG_FAST", raising=False)
    monkeypatch.setenv("KV_RAG_BATCH_SLOTS", "4")
    model, _ = _model()
    rt = ModelRuntime(model)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 1000, (1, n), generator=g).cuda() for n in (40, 75, 130)]
    nxt = [int(torch.randint(0, 1000, (1,), generator=g)) for _ in prompts]
    with torch.inference_mode():
        refs = [model(input_ids=torch.cat([p, torch.tensor([[t]], device="cuda")], 1)).logits[0, -1].float()
                for p, t in zip(prompts, nxt, strict=True)]  # fmt: skip

        def caches() -> list[Any]:
            out = []
            for p in prompts:
                c = rt.new_cache(200)
                rt.forward(p, c, 0)
                out.append(c)
            return out

        together = caches()
        arena = together[0].slot.arena
        assert arena is not None and arena.n == 4 and all(c.slot.arena is arena for c in together)
        rows = rt.forward_batch([((t,), c, p.shape[1]) for t, c, p in zip(nxt, together, prompts, strict=True)])
        assert arena.step() is not None and arena.step().rows == 4  # padded to the arena's rows
        del together
        alone = []
        for t, c, p in zip(nxt, caches(), prompts, strict=True):
            alone.append(rt.forward_batch([((t,), c, p.shape[1])])[0])
            assert c.layers[0].get_seq_length() == p.shape[1] + 1
    for row, one, ref in zip(rows, alone, refs, strict=True):
        assert torch.equal(row, one)  # the neighbours change nothing
        assert (row - ref).abs().max().item() <= 5e-2


@cuda
def test_batched_prefill_matches_a_full_forward_and_ignores_its_neighbours(monkeypatch: pytest.MonkeyPatch) -> None:
    """The prompt tails of three requests (5-7 tokens on caches of 40-130) prefilled in one graph: each
    row is its request's last-token logits (against a from-scratch forward), bit-identical to the
    same request prefilled alone; the rows written are right (the next decode step matches too)."""
    monkeypatch.delenv("KV_RAG_FAST", raising=False)
    monkeypatch.setenv("KV_RAG_BATCH_SLOTS", "4")
    model, _ = _model()
    rt = ModelRuntime(model)
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, 1000, (1, n), generator=g).cuda() for n in (40, 75, 130)]
    tails = [tuple(int(t) for t in torch.randint(0, 1000, (k,), generator=g)) for k in (5, 7, 6)]
    nxt = [int(t) for t in torch.randint(0, 1000, (3,), generator=g)]
    with torch.inference_mode():
        jobs = list(zip(prompts, tails, nxt, strict=True))
        refs = [model(input_ids=torch.cat([p, torch.tensor([[*t, x]], device="cuda")], 1)).logits[0, -2:].float()
                for p, t, x in jobs]  # fmt: skip

        def caches() -> list[Any]:
            out = []
            for p in prompts:
                c = rt.new_cache(200)
                rt.forward(p, c, 0)
                out.append(c)
            return out

        together = caches()
        arena = together[0].slot.arena
        rows = rt.forward_batch([(t, c, p.shape[1]) for t, c, p in zip(tails, together, prompts, strict=True)])
        # one graph for the three (bucket of 8 tokens, attention for 4 rows); those for 1 and 2 requests came with it
        assert all(arena._prefills.get((8, n)) is not None for n in (1, 2, 4))
        ends = [p.shape[1] + len(t) for p, t, _ in jobs]
        assert [c.layers[0].get_seq_length() for c in together] == ends
        step = rt.forward_batch([((x,), c, e) for (_, _, x), c, e in zip(jobs, together, ends, strict=True)])
        del together
        alone = []
        for t, c, p in zip(tails, caches(), prompts, strict=True):
            alone.append(rt.forward_batch([(t, c, p.shape[1])])[0])
    for row, one, nx, ref in zip(rows, alone, step, refs, strict=True):
        assert torch.equal(row, one)  # the neighbours change nothing
        assert (row - ref[0]).abs().max().item() <= 5e-2
        assert (nx - ref[1]).abs().max().item() <= 5e-2  # the tail's keys and values landed in the right rows


@cuda
def test_concurrent_answers_equal_one_after_another(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Four requests on four cached documents, one after another and then all at once through the
    scheduler: the same greedy tokens, and the concurrent run shared batched steps."""
    monkeypatch.delenv("KV_RAG_FAST", raising=False)
    model, tok = _model()
    eng = Engine(model, tokenizer=tok, store=tmp_path / "store")
    facts = [" ".join(f"Fact {j} of {i} is {(i * 7 + j) % 31}." for j in range(30)) for i in range(4)]
    docs = [f"Document {i}. {f}" for i, f in enumerate(facts)]
    eng.publish(docs)
    alone = [eng.generate("Which fact?", [d], max_new_tokens=24).token_ids for d in docs]
    out: dict[int, list[int]] = {}

    def run(i: int) -> None:
        out[i] = eng.generate("Which fact?", [docs[i]], max_new_tokens=24).token_ids

    before = dict(eng.scheduler.stats)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [out[i] for i in range(4)] == alone
    stats = eng.scheduler.stats
    assert stats["stepped"] - before["stepped"] > stats["steps"] - before["steps"]  # some steps held several
    pool = eng.loaded.runtime.pool(torch.device("cuda"))
    assert pool is not None and any(a._step is not None for a in pool.arenas)


@cuda
def test_a_lent_gpu_tier_block_moves_into_an_arena_and_the_tier_keeps_its_rows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A GPU-tier hit decodes on the tier's block for its first token, then moves into an arena slot:
    same tokens as a copied hit, the tier's rows untouched."""
    monkeypatch.delenv("KV_RAG_FAST", raising=False)
    model, tok = _model()
    doc = "Kettles sing when the water inside them nears its boiling point. " * 12
    lent = Engine(model, tokenizer=tok, store=Store([GpuTier(1 << 30, roomy_from=64, room=1024)]))
    copied = Engine(model, tokenizer=tok, store=Store([GpuTier(1 << 30, roomy_from=1 << 30, room=1024)]))
    for eng in (lent, copied):
        eng.publish([doc])
    key = lent.document_key(doc)
    before = lent.store.tiers[0].get(key)
    assert before is not None
    checksum = before.checksum()
    hit = lent.generate("Why do kettles sing?", [doc], max_new_tokens=16)
    base = copied.generate("Why do kettles sing?", [doc], max_new_tokens=16)
    assert any(s.tier == "gpu" for s in hit.segments) and hit.token_ids == base.token_ids
    pool = lent.loaded.runtime.pool(torch.device("cuda"))
    assert pool is not None and pool.arenas and all(s.free() for s in pool.adopted.values())
    after = lent.store.tiers[0].get(key)
    assert after is not None and after.checksum() == checksum


@cuda
def test_warm_up_captures_the_graphs_requests_then_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After ``Engine.warm_up`` the arena a prompt of that length gets holds its decode graph and the tail
    prefill graphs of every bucket; a request of that length captures nothing new and answers as without it."""
    monkeypatch.delenv("KV_RAG_FAST", raising=False)
    model, tok = _model()
    eng = Engine(model, tokenizer=tok, store=tmp_path / "store")
    doc = "Document. " + " ".join(f"Fact {j} is {j % 7}." for j in range(40))
    eng.publish([doc])
    n = len(eng.tokenize(eng.prompt("Which fact?", [doc])))
    assert eng.warm_up([n]) > 0
    pool = eng.loaded.runtime.pool(torch.device("cuda"))
    assert pool is not None
    warm = [a for a in pool.arenas if a._step is not None]
    assert len(warm) == 1 and {size for size, _ in warm[0]._prefills} == {2, 4, 8, 32, 64}
    graphs = {id(a): (a._step, dict(a._prefills)) for a in pool.arenas}
    got = eng.generate("Which fact?", [doc]).token_ids  # the engine's default max_new_tokens, as warm_up
    assert {id(a): (a._step, dict(a._prefills)) for a in pool.arenas} == graphs  # nothing captured by it
    fresh = Engine(_model()[0], tokenizer=tok, store=tmp_path / "store2")
    fresh.publish([doc])
    assert fresh.generate("Which fact?", [doc]).token_ids == got


@cuda
def test_a_smaller_arena_runs_as_many_rows_and_rounds_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no room for a full arena the pool makes a smaller one; its batched graphs run as many rows as a
    full arena's, so a request's tail prefill and decode logits are bit-identical in either arena."""
    monkeypatch.delenv("KV_RAG_FAST", raising=False)
    monkeypatch.setenv("KV_RAG_BATCH_SLOTS", "4")
    model, _ = _model()
    rt = ModelRuntime(model)
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, 1000, (1, 60), generator=g).cuda()
    tail = tuple(int(t) for t in torch.randint(0, 1000, (6,), generator=g))

    def run(cache: Any) -> tuple[torch.Tensor, torch.Tensor]:
        rt.forward(prompt, cache, 0)
        first = rt.forward_batch([(tail, cache, 60)])[0]
        second = rt.forward_batch([((int(first.argmax()),), cache, 66)])[0]
        return first, second

    with torch.inference_mode():
        held = [rt.new_cache(200) for _ in range(4)]  # every slot of a full arena taken
        pool = rt.pool(torch.device("cuda"))
        big = held[0].slot.arena
        assert pool is not None and big.n == 4 and all(c.slot.arena is big for c in held)
        pool.max_bytes = big.nbytes + 2 * (big.nbytes // 5)  # room for one slot and its scratch slot
        cache = rt.new_cache(200)
        small = cache.slot.arena
        assert small is not big and small.n == 1
        in_small = run(cache)
        held[3].slot.release_from(held[3])  # a finished request gives its slot back
        cache = rt.new_cache(200)
        assert cache.slot.arena is big
        in_big = run(cache)
    assert small.step() is not None and small.step().rows == big.step().rows == 4
    assert torch.equal(in_small[0], in_big[0]) and torch.equal(in_small[1], in_big[1])


@cuda
def test_a_finished_request_frees_its_slot_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The scheduler frees a request's static slot when it ends, without waiting for the garbage collector
    (a slot that stays taken sends the next requests to another arena or to their own forward)."""
    monkeypatch.delenv("KV_RAG_FAST", raising=False)
    model, tok = _model()
    eng = Engine(model, tokenizer=tok, store=tmp_path / "store")
    doc = "Document. " + " ".join(f"Fact {j} is {j % 7}." for j in range(40))
    eng.publish([doc])
    eng.generate("Which fact?", [doc], max_new_tokens=4)  # the arena exists
    pool = eng.loaded.runtime.pool(torch.device("cuda"))
    assert pool is not None and pool.slots
    gc.collect()
    taken = sum(not s.free() for s in pool.slots)
    gc.disable()
    try:
        for _ in range(3):
            eng.generate("Which fact?", [doc], max_new_tokens=4)
            assert sum(not s.free() for s in pool.slots) == taken
    finally:
        gc.enable()


@cuda
def test_compiled_batched_merge_gives_a_row_the_same_bits_at_every_row_count() -> None:
    """The batched prefill's merge of split-KV parts, compiled, at the Qwen3-4B shape's sizes: a row's
    result does not depend on how many rows the graph attends for (with a sum over splits, a request's
    first-token logits inside the prefill graphs depended on how many requests arrived with it)."""
    from kv_rag.runtime.kernels import Kernels

    kern = Kernels()
    if not kern.compiled:
        pytest.skip("torch.compile unavailable")
    splits, g, size, kvh, dim = 10, 4, 32, 8, 128
    gen = torch.Generator(device="cuda").manual_seed(0)

    def parts(rows: int) -> tuple[torch.Tensor, ...]:
        o_old = torch.randn(rows * splits * g * size, kvh, dim, device="cuda", generator=gen, dtype=torch.bfloat16)
        lse_old = torch.randn(kvh, rows * splits * g * size, device="cuda", generator=gen) * 4
        o_new = torch.randn(rows * size, g * kvh, dim, device="cuda", generator=gen, dtype=torch.bfloat16)
        lse_new = torch.randn(g * kvh, rows * size, device="cuda", generator=gen) * 4
        return o_old, lse_old, o_new, lse_new

    mine = parts(1)
    results = []
    with torch.inference_mode():
        for rows in (1, 2, 8):
            args = list(mine)
            if rows > 1:  # the row first, then others (the lse tensors are [heads, rows], the rest rows first)
                args = [
                    torch.cat([a, b], dim=1 if a.dim() == 2 else 0) for a, b in zip(mine, parts(rows - 1), strict=True)
                ]
            results.append(kern.merge_batch(*args, rows, splits)[:size])
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
