"""Token-exactness of cache hits on the real embedded model: miss, hit and no-cache runs agree."""

from __future__ import annotations

from pathlib import Path

import pytest

from kv_rag import CacheStatus, Engine
from kv_rag.bench import document_of_length
from kv_rag.store import DiskTier, Store

QUESTION = "What is this document about? Answer in one sentence."
LOGIT_TOL = 1e-4


@pytest.mark.parametrize("n_tokens", [200, 1000, 3100])
def test_hit_equals_from_scratch_prefill(engine: Engine, tmp_path: Path, n_tokens: int) -> None:
    doc = document_of_length(engine.tokenizer, n_tokens)
    prompt = engine.prompt(QUESTION, [doc])
    ids = engine.tokenize(prompt).ids
    reference = engine.reference_logits(ids)

    cold = engine.generate(prompt, max_new_tokens=24)
    assert cold.cached_tokens == 0
    assert [d.cache for d in cold.documents] == [CacheStatus.MISS]
    assert cold.stored_tokens >= n_tokens - 5

    warm = engine.generate(prompt, max_new_tokens=24)
    assert [d.cache for d in warm.documents] == [CacheStatus.HIT]
    assert warm.cached_tokens == cold.stored_tokens
    assert warm.prefilled_tokens == warm.prompt_tokens - warm.cached_tokens

    plain = engine.generate(prompt, max_new_tokens=24, use_cache=False)
    assert [d.cache for d in plain.documents] == [CacheStatus.NONE]

    assert cold.token_ids == warm.token_ids == plain.token_ids
    assert len(cold.token_ids) > 0

    hit = engine.prefill(prompt)
    assert hit.cached_tokens > n_tokens - 5
    assert hit.logits is not None
    assert float((hit.logits - reference).abs().max()) <= LOGIT_TOL
    assert int(hit.logits.argmax()) == int(reference.argmax())


def test_disk_tier_hit_in_a_fresh_store_is_exact(engine: Engine, tmp_path: Path) -> None:
    doc = document_of_length(engine.tokenizer, 600)
    engine.publish([doc])
    disk_only = Engine(None, store=Store([DiskTier(tmp_path / "store")]), device="cpu", dtype="float32")
    prompt = engine.prompt(QUESTION, [doc])
    pre = disk_only.prefill(prompt)
    assert [s.tier for s in pre.segments if s.document] == ["disk"]
    assert pre.logits is not None
    ref = engine.reference_logits(engine.tokenize(prompt).ids)
    assert float((pre.logits - ref).abs().max()) <= LOGIT_TOL


def test_longest_cached_chain_is_reused(engine: Engine) -> None:
    """Documents in order form a chain: a request extending a cached chain loads its start."""
    a = document_of_length(engine.tokenizer, 150)
    b = "A second, different document about the with statement and context managers."
    engine.generate(engine.prompt(QUESTION, [a]), max_new_tokens=2)
    gen = engine.generate(engine.prompt(QUESTION, [a, b]), max_new_tokens=8)
    assert [d.cache for d in gen.documents] == [CacheStatus.HIT, CacheStatus.MISS]
    again = engine.generate(engine.prompt(QUESTION, [a, b]), max_new_tokens=8)
    assert [d.cache for d in again.documents] == [CacheStatus.HIT, CacheStatus.HIT]
    plain = engine.generate(engine.prompt(QUESTION, [a, b]), max_new_tokens=8, use_cache=False)
    assert gen.token_ids == again.token_ids == plain.token_ids
    # the other order is another chain: its first document is not the cached one
    swapped = engine.generate(engine.prompt(QUESTION, [b, a]), max_new_tokens=2)
    assert swapped.documents[0].cache == CacheStatus.MISS


def test_fully_cached_prompt_without_suffix_gives_exact_logits(engine: Engine) -> None:
    """When every token is cached, the last one is recomputed to get its logits."""
    from kv_rag.prompt import Prompt, Segment

    doc = document_of_length(engine.tokenizer, 120)
    prompt = Prompt((Segment("Notes:\n"), Segment(doc, True, "d")))
    engine.prefill(prompt)
    pre = engine.prefill(prompt)
    assert pre.cached_tokens == pre.prompt_tokens
    assert pre.logits is not None
    ref = engine.reference_logits(engine.tokenize(prompt).ids)
    assert float((pre.logits - ref).abs().max()) <= LOGIT_TOL
