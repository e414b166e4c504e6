"""Load or recompute: a stored piece is recomputed when loading it is measured slower than computing it."""

from __future__ import annotations

from pathlib import Path

import pytest

from kv_rag import CacheStatus, Engine
from kv_rag.bench import document_of_length
from kv_rag.estimates import MARGIN, PRIOR_BYTES_PER_S, Rate, Speeds, recompute_reason
from kv_rag.store import DiskTier, MemoryTier, Store

QUESTION = "What is this document about?"


def test_rates_are_moving_averages_and_unknown_until_measured() -> None:
    r = Rate()
    assert r.seconds(10) is None
    r.update(100, 1.0)
    assert r.seconds(100) == pytest.approx(1.0)
    r.update(100, 0.5)  # faster now: the average moves towards it
    assert 0.5 < r.seconds(100) < 1.0  # type: ignore[operator]
    disk, model = Speeds(), Speeds()
    assert recompute_reason(disk, model, "disk", 10**6, 100) is None  # nothing measured: load
    assert disk.load_s("memory", 10**6) is None  # a tier in the process: no prior
    assert disk.load_s("disk", 10**9) == pytest.approx(10**9 / PRIOR_BYTES_PER_S["disk"])  # the prior
    disk.loaded("disk", 10**5, 1.0)  # under MIN_LOAD_BYTES: ignored
    assert disk.load_s("disk", 10**6) == pytest.approx(10**6 / PRIOR_BYTES_PER_S["disk"])
    disk.loaded("disk", 10**7, 10.0)  # 1 MB/s
    model.prefilled(100, 0.1)  # under MIN_PREFILL_TOKENS: ignored
    assert recompute_reason(disk, model, "disk", 10**6, 100) is None
    model.prefilled(1000, 1.0)  # 1000 tokens/s
    assert "faster than loading from the disk tier" in (recompute_reason(disk, model, "disk", 10**6, 100) or "")
    assert recompute_reason(disk, model, "disk", 10**6, 1000) is None  # about 1 s either way: keep loading
    assert recompute_reason(disk, model, "disk", int(10**6 * MARGIN * 1.01), 1000) is not None


def _disk_only_engine(tmp_path: Path, doc: str, slow_disk: bool) -> Engine:
    """A fresh engine whose memory tier is empty and whose disk tier holds ``doc`` (published before)."""
    Engine(None, store=tmp_path / "store", device="cpu", dtype="float32").publish([doc])
    eng = Engine(None, store=Store([MemoryTier(), DiskTier(tmp_path / "store")]), device="cpu", dtype="float32")
    assert eng.loaded.speeds.prefill_s(1) is not None  # the publish above measured the model's prefill
    if slow_disk:
        eng.store.speeds.loaded("disk", 1 << 23, 1000.0)  # 8 KB/s: slower than any prefill
    return eng


def test_a_slow_tier_is_recomputed_exactly_and_copied_to_the_faster_tiers(tmp_path: Path) -> None:
    doc = document_of_length(Engine(None, store="memory").tokenizer, 300)
    eng = _disk_only_engine(tmp_path, doc, slow_disk=True)
    prompt = eng.prompt(QUESTION, [doc])
    pre = eng.prefill(prompt)
    head, seg = pre.segments
    # the chain (system part, then the document) is on disk only: computing it is estimated faster
    assert head.cache is CacheStatus.RECOMPUTED and "faster than loading from the disk tier" in (head.reason or "")
    assert seg.cache is CacheStatus.RECOMPUTED and seg.reason == "computed with the stored piece before it"
    assert pre.cached_tokens == 0 and pre.stored_tokens == 0
    ref = eng.reference_logits(eng.tokenize(prompt).ids)
    assert pre.logits is not None and float((pre.logits - ref).abs().max()) <= 1e-4
    assert seg.key in eng.store.tiers[0]  # the memory tier has it now: the next request hits there
    again = eng.generate(prompt, max_new_tokens=2)
    assert [(d.cache, d.tier) for d in again.documents] == [(CacheStatus.HIT, "memory")]
    assert again.to_dict()["docs"][0]["cache"] == "hit"


def test_a_first_disk_hit_is_recomputed_when_the_prior_says_loading_is_slower(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the disk tier is measured its prior speed decides: a model that prefills faster than the
    prior loads (here: the prefill measured as very fast) recomputes the stored chain on first contact."""
    doc = document_of_length(Engine(None, store="memory").tokenizer, 300)
    eng = _disk_only_engine(tmp_path, doc, slow_disk=False)
    assert "disk" not in eng.store.speeds.tiers
    monkeypatch.setattr(eng.loaded.speeds.prefill, "per_s", 1e9)  # tokens/s: any load from disk is slower
    pre = eng.prefill(eng.prompt(QUESTION, [doc]))
    assert [s.cache for s in pre.segments] == [CacheStatus.RECOMPUTED, CacheStatus.RECOMPUTED]
    assert "faster than loading from the disk tier" in (pre.segments[0].reason or "")


def test_a_tier_faster_than_prefill_is_loaded(tmp_path: Path) -> None:
    doc = document_of_length(Engine(None, store="memory").tokenizer, 300)
    eng = _disk_only_engine(tmp_path, doc, slow_disk=False)
    gen = eng.generate(eng.prompt(QUESTION, [doc]), max_new_tokens=2)
    assert [(d.cache, d.tier) for d in gen.documents] == [(CacheStatus.HIT, "disk")]
    assert eng.store.speeds.load_s("disk", 10**6) is not None  # that load was measured


def test_stitch_recomputes_a_document_on_a_slow_tier(tmp_path: Path) -> None:
    tok = Engine(None, store="memory").tokenizer
    docs = [document_of_length(tok, 200), "A second document about the with statement and its context managers."]
    Engine(None, store=tmp_path / "store", device="cpu", dtype="float32").publish(docs)
    eng = _disk_only_engine(tmp_path, docs[0], slow_disk=True)
    gen = eng.generate(eng.prompt(QUESTION, docs), mode="stitch", max_new_tokens=2)
    report = gen.to_dict()["docs"]
    assert report[1]["cache"] == "recomputed" and "disk tier" in report[1]["reason"]


def test_prefetch_copies_stored_documents_into_the_faster_tiers(tmp_path: Path) -> None:
    doc = "The ferry to Blue Island leaves from pier 7 every morning at six."
    eng = _disk_only_engine(tmp_path, doc, slow_disk=False)
    key = eng.document_key(doc)
    memory = eng.store.tiers[0]
    assert key not in memory
    eng.prefetch([doc, "a document nobody stored"])
    assert eng.store.prefetch([key]).result(timeout=60) == 1  # queued after the first: both are done now
    assert key in memory
