"""Tenants: keys derived with a tenant's secret. Same tenant hits, another tenant (or none) misses, in every
tier; public documents are shared on purpose; another tenant's probe cannot tell a used document by time."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from redis_server import RedisServer, redis_server
from tiny import tiny_model

from kv_rag import Engine, Tenant
from kv_rag.errors import InputError
from kv_rag.store import DiskTier, GpuTier, MemoryTier, PinnedTier, RedisTier, Store, Tier

__all__ = ["redis_server"]  # the fixture

A = Tenant("acme", b"a-secret-of-sixteen-bytes-or-more")
B = Tenant("globex", b"another-secret-sixteen-bytes-long")
DOC = "Record 7. The merger with Initech closes on the 14th; the code name is Bluebird."
OTHER = "Record 8. The cafeteria serves soup on Mondays and fish on Fridays."
Q = "When does the merger close?"


@pytest.fixture(scope="module")
def tiny() -> tuple[object, object]:
    return tiny_model("llama", num_hidden_layers=2)


def _redis(server: RedisServer) -> Tier:
    if server.proc is None:
        server.start()
    server.flush()
    return RedisTier(server.url)


TIERS: dict[str, Callable[[Path, RedisServer], Tier]] = {
    "memory": lambda p, r: MemoryTier(),
    "pinned": lambda p, r: PinnedTier(1 << 30),
    "disk": lambda p, r: DiskTier(p / "disk"),
    "redis": lambda p, r: _redis(r),
    "gpu": lambda p, r: GpuTier(1 << 30),
}


@pytest.mark.parametrize("name", list(TIERS))
def test_same_tenant_hits_other_tenants_miss(
    name: str, tiny: tuple, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if name == "gpu" and not torch.cuda.is_available():
        pytest.skip("the GPU tier needs CUDA")
    server = request.getfixturevalue("redis_server") if name == "redis" else None
    model, tok = tiny
    if name == "gpu":
        model = model.to("cuda")  # type: ignore[attr-defined]
    store = Store([TIERS[name](tmp_path, server)])  # type: ignore[arg-type]

    def engine(tenant: Tenant | None) -> Engine:
        return Engine(model, tokenizer=tok, store=store, tenant=tenant)

    ref = engine(None).generate(Q, [DOC], use_cache=False, max_new_tokens=4).token_ids
    assert engine(A).publish([DOC])[0].stored
    again = engine(A).generate(Q, [DOC], max_new_tokens=4)  # a new engine of the same tenant
    assert again.documents[0].cache.value == "hit" and again.token_ids == ref
    plain_key = engine(None).document_key(DOC)
    assert plain_key not in store and engine(B).document_key(DOC) not in store  # not computable without A's secret
    for other in (B, None):  # another tenant, and an engine without one: computed again, the same answer
        gen = engine(other).generate(Q, [DOC], max_new_tokens=4)
        assert gen.documents[0].cache.value == "miss" and gen.token_ids == ref


def test_public_documents_are_shared_on_purpose(tiny: tuple) -> None:
    model, tok = tiny
    store = Store([MemoryTier()])
    a = Engine(model, tokenizer=tok, store=store, tenant=A)
    a.publish([OTHER], public=True)
    b = Engine(model, tokenizer=tok, store=store, tenant=B)
    assert b.generate(Q, [OTHER], max_new_tokens=2).documents[0].cache.value == "miss"  # B was not told
    b.mark_public([OTHER])
    assert b.generate(Q, [OTHER], max_new_tokens=2).documents[0].cache.value == "hit"
    none = Engine(model, tokenizer=tok, store=store)
    assert none.generate(Q, [OTHER], max_new_tokens=2).documents[0].cache.value == "hit"  # plain keys
    assert b.generate(Q, [OTHER, DOC], max_new_tokens=2).documents[1].cache.value == "miss"  # private after public


def test_another_tenant_cannot_tell_a_used_document_by_time(tiny: tuple) -> None:
    """Tenant A asks about 8 documents; tenant B then probes each of them and 8 documents of the same
    length nobody asked about, interleaved, each its first look: every probe is a miss and the two median
    TTFTs are within 1.5x of each other, while A's own hit (the control) is more than 1.5x faster."""
    model, tok = tiny
    store = Store([MemoryTier()])
    a = Engine(model, tokenizer=tok, store=store, tenant=A)
    filler = " The shipment in bay twelve is checked on arrival and signed for by the duty clerk."

    def memo(k: int) -> str:  # same length and token count for every k < 10000
        return f"Memo {k:04d}." + filler * 40

    for i in range(8):
        a.generate(Q, [memo(i)], max_new_tokens=1)
    probe = Engine(model, tokenizer=tok, store=store, tenant=B)
    times: dict[str, list[float]] = {"used": [], "unused": []}
    for i in range(8):
        for name, doc in (("used", memo(i)), ("unused", memo(1000 + i))):
            gen = probe.generate(Q, [doc], max_new_tokens=1)
            assert gen.documents[0].cache.value == "miss"
            times[name].append(gen.ttft_s)
    hit = [a.generate(Q, [memo(0)], max_new_tokens=1).ttft_s for _ in range(5)]
    ratio = statistics.median(times["used"]) / statistics.median(times["unused"])
    assert 1 / 1.5 < ratio < 1.5, (ratio, times)
    assert statistics.median(hit) < statistics.median(times["used"]) / 1.5  # a hit would show


def test_a_tenant_finds_nothing_of_another_in_process_memory(tiny: tuple) -> None:
    """Engines on one model share its tokenizer memo and document index; a tenant's entries are its own:
    another tenant's first look at a document re-tokenizes it (no faster path to time) and never learns
    the source name it was published under."""
    model, tok = tiny
    store = Store([MemoryTier()])
    doc = DOC + " This copy is only used here."  # no earlier test of this module has tokenized it
    a = Engine(model, tokenizer=tok, store=store, tenant=A)
    a.publish([doc], sources=["merger-memo.txt"])
    b = Engine(model, tokenizer=tok, store=store, tenant=B)
    memo = b.loaded.prompt_tokenizer
    before = dict(memo.stats)
    gen = b.generate(Q, [doc], max_new_tokens=1)
    assert memo.stats["tokenized"] == before["tokenized"] + 1 and memo.stats["reused"] == before["reused"]
    assert gen.documents[0].source == "doc0" and gen.documents[0].cache.value == "miss"
    assert a.generate(Q, [doc], max_new_tokens=1).documents[0].source == "merger-memo.txt"


def test_bad_tenants_are_refused_with_the_argument_named(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InputError, match="tenant secret must be at least 16 bytes"):
        Tenant("acme", b"short")
    with pytest.raises(InputError, match="tenant name"):
        Tenant("a b", b"x" * 16)
    monkeypatch.delenv("KV_RAG_TENANT_SECRET", raising=False)
    with pytest.raises(InputError, match=r"KV_RAG_TENANT_SECRET"):
        Engine(None, store="memory", tenant="acme")
    with pytest.raises(InputError, match="tenant must be"):
        Engine(None, store="memory", tenant=3)  # type: ignore[arg-type]
    assert "secret" not in repr(A) and "sixteen" not in repr(A)


def test_cli_tenant_from_the_environment(embedded: object, tmp_path: Path) -> None:
    """``kv-rag publish/ask --tenant NAME`` with the secret in the environment: the same tenant hits,
    another tenant misses, and ``verify`` accepts the tenant's artifact."""
    doc = tmp_path / "memo.txt"
    doc.write_text(DOC + "\n")
    cli = "import sys; from kv_rag.cli import main; sys.exit(main())"
    store = str(tmp_path / "store")

    def run(tenant: str, secret: str, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**__import__("os").environ, "KV_RAG_TENANT_SECRET": secret}
        argv = [sys.executable, "-c", cli, *args, "--store", store, "--tenant", tenant, "--json"]
        return subprocess.run(argv, env=env, capture_output=True, text=True)

    assert run("acme", "acme-secret-0123456789", "publish", str(doc)).returncode == 0
    ask = ["ask", Q, "--docs", str(doc), "--max-new-tokens", "3"]
    same = run("acme", "acme-secret-0123456789", *ask)
    other = run("globex", "globex-secret-0123456789", *ask)
    assert same.returncode == 0 and other.returncode == 0, same.stderr[-2000:] + other.stderr[-2000:]
    assert json.loads(same.stdout)["docs"][0]["cache"] == "hit"
    assert json.loads(other.stdout)["docs"][0]["cache"] == "miss"
    key = json.loads(same.stdout)["docs"][0]["key"]
    ok = run("acme", "acme-secret-0123456789", "verify", key, "--fraction", "0.2")
    assert ok.returncode == 0, ok.stdout + ok.stderr[-2000:]


def test_stitched_documents_are_the_tenants_even_when_public(tiny: tuple) -> None:
    """Stitch looks a document up under the tenant's key and computes it under that key on a miss (never
    under the plain keys public documents get in exact mode): the second request hits, another tenant
    misses."""
    model, tok = tiny
    store = Store([MemoryTier()])
    a = Engine(model, tokenizer=tok, store=store, tenant=A, mode="stitch")
    a.publish([OTHER], public=True)
    a.generate(Q, [DOC, OTHER], max_new_tokens=2)
    again = a.generate(Q, [DOC, OTHER], max_new_tokens=2)
    assert again.mode == "stitch" and [d.cache.value for d in again.documents] == ["hit", "hit"]
    b = Engine(model, tokenizer=tok, store=store, tenant=B, mode="stitch")
    b.mark_public([OTHER])  # public sharing is an exact-mode thing: stitched artifacts stay each tenant's
    assert [d.cache.value for d in b.generate(Q, [DOC, OTHER], max_new_tokens=2).documents] == ["miss", "miss"]


def test_ten_thousand_cross_tenant_probes_find_nothing(
    tiny: tuple, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Issue 18's target: 0 cross-tenant hits in 10,000 probes across all tiers. Tenant A publishes 40
    documents into a store of every tier (memory, pinned, disk, Redis; GPU when there is one); then 10,000
    probes, each the key another party computes for one of A's documents (tenant B, a third tenant, no
    tenant: the plain key anyone can compute), looked up in every tier and through ``Store.get``. A's own
    keys are the control: in every tier."""
    model, tok = tiny
    names = ["memory", "pinned", "disk", "redis"] + (["gpu"] if torch.cuda.is_available() else [])
    server = request.getfixturevalue("redis_server")
    tiers = [TIERS[n](tmp_path, server) for n in names]
    store = Store(tiers)
    docs = [f"Record {i}. Account {i * 7919 % 10007} moved {i * 31 % 97} crates to dock {i % 5}." for i in range(40)]
    a = Engine(model, tokenizer=tok, store=store, tenant=A)
    reports = a.publish(docs)
    assert all(r.stored for r in reports)
    own = [a.document_key(d) for d in docs]
    assert all(k in tier for k in own for tier in tiers)  # the control: A's artifacts are there
    probers = [Engine(model, tokenizer=tok, store=store, tenant=t) for t in (B, Tenant("initech", b"x" * 32), None)]
    keys = {(p, d): probers[p].document_key(docs[d]) for p in range(len(probers)) for d in range(len(docs))}
    assert not set(keys.values()) & set(own)
    hits = probes = 0
    for i in range(10_000):
        key = keys[(i % len(probers), (i // len(probers)) % len(docs))]
        tier = tiers[i % len(tiers)]
        probes += 1
        hits += (key in tier) + (tier.get(key) is not None) + (i % 25 == 0 and store.get(key) is not None)
    assert probes == 10_000 and hits == 0
