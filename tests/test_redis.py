"""The Redis tier against a real redis-server: chunking, atomic publication, damage, outages, sharing."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import redis as redis_client
from redis_server import RedisServer, redis_server
from test_artifact import make_artifact
from tiny import tiny_model

from kv_rag import Artifact, Engine
from kv_rag.store import MemoryTier, RedisTier, Store

__all__ = ["redis_server"]  # the fixture


def keyed(art: Artifact, key: str) -> Artifact:
    return dataclasses.replace(art, meta=dataclasses.replace(art.meta, key=key)).sealed()


@pytest.fixture
def server(redis_server: RedisServer) -> RedisServer:
    if redis_server.proc is None:
        redis_server.start()
    redis_server.flush()
    return redis_server


def test_round_trip_in_chunks(server: RedisServer) -> None:
    tier = RedisTier(server.url, chunk_bytes=1000)
    art = keyed(make_artifact(n=200, layers=3), "a" * 64)
    tier.put("a" * 64, art)
    man = tier.manifest("a" * 64)
    assert man is not None and man["n"] == -(-len(art.to_bytes()) // 1000) and man["n"] > 5
    back = tier.get("a" * 64)
    assert back is not None and back.checksum() == art.checksum()
    assert "a" * 64 in tier and "b" * 64 not in tier and tier.get("b" * 64) is None
    # replacing: the old version's chunks expire after the grace period; the new one is whole
    tier.put("a" * 64, keyed(make_artifact(n=100, layers=3), "a" * 64))
    client = redis_client.Redis.from_url(server.url)
    old = [k for k in tier.chunk_keys() if man["v"] in k]
    assert old and all(0 < client.ttl(k) <= tier.grace_s for k in old)
    got = tier.get("a" * 64)
    assert got is not None and got.meta.num_tokens == 100
    ttl = client.ttl(f"{tier.prefix}m:{'a' * 64}")
    assert 0 < ttl <= tier.ttl_s  # type: ignore[operator]
    tier.delete("a" * 64)
    assert "a" * 64 not in tier and tier.get("a" * 64) is None


class _WriterBetweenReads:
    """A redis client whose first ``mget`` lets another writer replace the key first (a forced race)."""

    def __init__(self, real: redis_client.Redis, writer: RedisTier, key: str, art: Artifact) -> None:
        self.real, self.writer, self.key, self.art, self.raced = real, writer, key, art, False

    def mget(self, names: list[str]) -> list[bytes | None]:
        if not self.raced:
            self.raced = True
            self.writer.put(self.key, self.art)
        return self.real.mget(names)  # type: ignore[no-any-return]

    def __getattr__(self, name: str) -> object:
        return getattr(self.real, name)


def test_a_read_racing_a_replace_does_not_revive_the_old_version(server: RedisServer) -> None:
    """A reader renews TTLs; if a writer replaced the key meanwhile, the old chunks still expire in grace."""
    key = "c" * 64
    writer = RedisTier(server.url, chunk_bytes=1000)
    writer.put(key, keyed(make_artifact(n=200, layers=3), key))
    first = writer.manifest(key)
    assert first is not None
    client = redis_client.Redis.from_url(server.url)
    racer = _WriterBetweenReads(client, writer, key, keyed(make_artifact(n=100, layers=3), key))
    reader = RedisTier(server.url, chunk_bytes=1000, client=racer)
    got = reader.get(key)  # read the old manifest, then the writer replaced it, then the renewal
    assert racer.raced
    assert got is not None and got.meta.num_tokens == 200  # the old version's chunks were still whole
    old = [k for k in writer.chunk_keys() if first["v"] in k]
    assert old and all(0 < client.ttl(k) <= writer.grace_s for k in old), [client.ttl(k) for k in old]
    new = writer.get(key)
    assert new is not None and new.meta.num_tokens == 100


@pytest.mark.parametrize("damage", ["missing chunk", "flipped byte", "bad manifest", "foreign bytes"])
def test_damaged_entries_are_dropped_as_misses(server: RedisServer, damage: str) -> None:
    tier = RedisTier(server.url, chunk_bytes=500)
    key = "d" * 64
    tier.put(key, keyed(make_artifact(n=50), key))
    man = tier.manifest(key)
    assert man is not None
    client = redis_client.Redis.from_url(server.url)
    chunk = f"{tier.prefix}c:{key}:{man['v']}:1"
    if damage == "missing chunk":
        client.delete(chunk)
    elif damage == "flipped byte":
        data = bytearray(client.get(chunk))  # type: ignore[arg-type]
        data[10] ^= 0xFF
        client.set(chunk, bytes(data))
    elif damage == "bad manifest":
        client.set(f"{tier.prefix}m:{key}", b"{not json")
    else:  # whole, self-consistent bytes of another artifact stored under this key
        tier.put_bytes(key, keyed(make_artifact(n=50), "e" * 64).to_bytes())
    with pytest.warns(UserWarning, match="dropping Redis artifact"):
        assert tier.get(key) is None
    assert key not in tier


def test_concurrent_writers_and_readers_never_see_a_torn_artifact(server: RedisServer) -> None:
    key = "c" * 64
    versions = [keyed(make_artifact(n=40 + 10 * i, layers=4), key) for i in range(4)]
    sums = {v.checksum() for v in versions}
    tier = RedisTier(server.url, chunk_bytes=700)
    seen: list[str] = []
    errors: list[BaseException] = []
    stop = time.time() + 3

    def write(art: Artifact) -> None:
        while time.time() < stop:
            tier.put(key, art)

    def read() -> None:
        try:
            while time.time() < stop:
                with warnings.catch_warnings():
                    warnings.simplefilter("error")  # a torn read would warn and drop
                    got = tier.get(key)
                if got is not None:
                    seen.append(got.checksum())
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(v,)) for v in versions]
    threads += [threading.Thread(target=read) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(seen) > 20 and set(seen) <= sums
    # consistent afterwards: one manifest, its chunks all present
    assert tier.keys() == [key] and tier.get(key) is not None


def test_unreachable_redis_is_a_miss_with_one_warning_and_comes_back(redis_server: RedisServer) -> None:
    tier = RedisTier(redis_server.url, retry_s=0.3, timeout_s=0.5)
    key = "u" * 64
    art = keyed(make_artifact(), key)
    redis_server.stop()
    with pytest.warns(UserWarning, match="Redis at .* failed") as rec:
        assert tier.get(key) is None
        tier.put(key, art)  # skipped while the breaker is open: no second warning, no waiting
        assert key not in tier
    assert len(rec) == 1 and not tier.available
    redis_server.start()
    time.sleep(0.35)
    assert tier.available
    tier.put(key, art)
    got = tier.get(key)
    assert got is not None and got.checksum() == art.checksum()


def _doc(i: int) -> str:
    return f"Document number {i}. " + " ".join(f"The value of item {j} in set {i} is {i * j % 97}." for j in range(12))


def test_redis_killed_and_restarted_during_a_run(redis_server: RedisServer) -> None:
    """Every request answers with the tokens of a cache-free run while Redis dies and comes back."""
    model, tok = tiny_model("llama")
    if redis_server.proc is None:
        redis_server.start()
    redis_server.flush()
    tier = RedisTier(redis_server.url, retry_s=0.3, timeout_s=0.5)
    engine = Engine(model, tokenizer=tok, store=Store([MemoryTier(0), tier]))  # memory keeps nothing
    docs = [_doc(i) for i in range(4)]
    ref = {d: engine.generate("Which value?", [d], use_cache=False, max_new_tokens=5).token_ids for d in docs}
    tiers: list[str | None] = []
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for step in range(12):
            if step == 4:
                redis_server.stop()  # killed: nothing persisted (--save "")
            if step == 8:
                redis_server.start()
                time.sleep(0.35)
            d = docs[step % 4]
            gen = engine.generate("Which value?", [d], max_new_tokens=5)
            assert gen.token_ids == ref[d], f"step {step}"
            tiers.append(gen.documents[0].tier)
    assert any("Redis at" in str(w.message) for w in rec)
    assert tiers[:4] == [None] * 4 and tiers[4:8] == [None] * 4  # misses: first use, then Redis down
    assert tiers[8:] == [None] * 4 or "redis" in tiers[8:]
    gen = engine.generate("Which value?", [docs[0]], max_new_tokens=5)
    assert gen.documents[0].tier == "redis" and gen.token_ids == ref[docs[0]]
    keys = tier.keys()
    for key in keys:  # consistent: every manifest verifies
        assert tier.get(key) is not None


WORKER = """
import json, sys, warnings
from kv_rag import Engine
warnings.simplefilter("ignore")
engine = Engine(None, store=sys.argv[1], device="cpu", dtype="float32")
gen = engine.generate("What is the value of item 3?", [open(sys.argv[2]).read()], max_new_tokens=4)
print(json.dumps({"tier": gen.documents[0].tier, "cache": gen.documents[0].cache.value, "ids": gen.token_ids}))
"""


def test_store_spec_shares_kv_between_processes_with_separate_disks(
    server: RedisServer, tmp_path: Path, embedded: object
) -> None:
    store = Store.open(server.url)
    assert [t.name for t in store.tiers] == ["memory", "disk", "redis"]
    doc = tmp_path / "doc.txt"
    doc.write_text(_doc(7))
    outs = []
    for home in ("machine-a", "machine-b"):  # separate disk tiers: only Redis is shared
        env = {**os.environ, "KV_RAG_HOME": str(tmp_path / home)}
        models = Path(os.environ.get("KV_RAG_HOME", Path.home() / ".cache" / "kv-rag")) / "models"
        (tmp_path / home).mkdir()
        (tmp_path / home / "models").symlink_to(models)
        out = subprocess.run(
            [sys.executable, "-c", WORKER, server.url, str(doc)], env=env, capture_output=True, text=True, timeout=300
        )
        assert out.returncode == 0, out.stderr[-2000:]
        outs.append(json.loads(out.stdout))
    assert outs[0]["cache"] == "miss" and outs[1]["cache"] == "hit" and outs[1]["tier"] == "redis"
    assert outs[0]["ids"] == outs[1]["ids"]


def test_inspect_finds_a_key_held_only_in_redis(
    server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from kv_rag.cli import main

    monkeypatch.setenv("KV_RAG_HOME", str(tmp_path))  # an empty disk tier in front of Redis
    art = keyed(make_artifact(n=40, layers=2), "c" * 64)
    RedisTier(server.url).put("c" * 64, art)
    assert main(["inspect", "c" * 64, "--store", server.url, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["key"] == "c" * 64 and info["num_tokens"] == 40 and info["where"] == "redis tier (key)"
    assert main(["inspect", "d" * 64, "--store", server.url]) == 2
    assert "tiers: memory, disk, redis" in capsys.readouterr().err


def test_forged_pier_in_redis_is_refused_under_trust(server: RedisServer, embedded: object, tmp_path: Path) -> None:
    """Issue 18: the forged "pier 2" artifact (A's metadata and signature, B's KV, checksum re-sealed)
    written into Redis by another process is an ``untrusted`` miss when trust is required, and the
    answer is the full prefill's; the signed original loads (its digest taken from the Redis bytes)."""
    pytest.importorskip("cryptography")
    pytest.importorskip("blake3")
    from kv_rag import SigningKey

    ferry_a, ferry_b = "The ferry leaves from pier 7.", "The ferry leaves from pier 2."
    question = "Which pier does the ferry leave from?"
    key = SigningKey.generate()

    def engine(**kw: object) -> Engine:
        return Engine(None, store=Store([MemoryTier(), RedisTier(server.url)]), device="cpu", dtype="float32", **kw)

    reports = engine(sign_key=key).publish([ferry_a, ferry_b])
    redis_tier = RedisTier(server.url)
    a, b = (redis_tier.get(r.key) for r in reports)
    assert a is not None and b is not None and a.meta.signed
    full = engine().generate(question, [ferry_a], max_new_tokens=10, use_cache=False)
    gen = engine(trust=[key.public_key]).generate(question, [ferry_a], max_new_tokens=10)
    assert [(d.cache.value, d.reason) for d in gen.documents] == [("hit", None)]
    assert gen.token_ids == full.token_ids

    forged = dataclasses.replace(a, keys=b.keys, values=b.values).sealed()
    (tmp_path / "forged.kv").write_bytes(forged.to_bytes())
    subprocess.run(  # written from another process, as an attacker with write access would
        [
            sys.executable,
            "-c",
            "import sys; from kv_rag.store import RedisTier; "
            "RedisTier(sys.argv[1]).put_bytes(sys.argv[2], open(sys.argv[3], 'rb').read())",
            server.url,
            reports[0].key,
            str(tmp_path / "forged.kv"),
        ],
        check=True,
    )
    naive = engine().generate(question, [ferry_a], max_new_tokens=10)
    assert naive.documents[0].cache.value == "hit" and naive.token_ids != full.token_ids
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gen = engine(trust=[key.public_key]).generate(question, [ferry_a], max_new_tokens=10)
    assert [(d.cache.value, d.reason) for d in gen.documents] == [("miss", "untrusted")]
    assert any("tampered after signing" in str(w.message) for w in caught)
    assert gen.token_ids == full.token_ids
    assert reports[0].key in redis_tier  # kept: another consumer may trust its publisher
