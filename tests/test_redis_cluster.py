"""The shared tier on a Redis Cluster (issue 18, part 6): three real redis-server nodes on loopback.

An artifact's manifest and chunks share one hash slot (one node), artifacts spread over the nodes,
an engine publishes and hits through the cluster with the greedy tokens of a full prefill, and a
node killed mid-run is a miss (one warning), never a wrong answer or an exception.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator

import pytest
from redis_server import RedisServer, redis_binary, start_cluster
from test_artifact import make_artifact

from kv_rag import Artifact, Engine
from kv_rag.models import LoadedModel
from kv_rag.store import MemoryTier, RedisTier, Store

NODES = 3


def keyed(key: str, n: int = 60) -> Artifact:
    art = make_artifact(n=n, layers=2)
    return dataclasses.replace(art, meta=dataclasses.replace(art.meta, key=key)).sealed()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RedisServer]]:
    """Three cluster-enabled redis-server nodes, each serving a third of the 16384 slots."""
    binary = redis_binary()
    if binary is None:
        import os

        if os.environ.get("KV_RAG_REQUIRE_REDIS") == "1":
            pytest.fail("redis-server is required (KV_RAG_REQUIRE_REDIS=1) but not installed")
        pytest.skip("redis-server is not installed: apt-get install -y redis-server (.ci/run does this)")
    pytest.importorskip("redis")
    nodes = start_cluster(binary, tmp_path_factory.mktemp("cluster"), NODES)
    try:
        yield nodes
    finally:
        for node in nodes:
            node.stop()


def url(nodes: list[RedisServer]) -> str:
    return f"redis+cluster://127.0.0.1:{nodes[0].port}"


def test_an_artifact_lives_in_one_slot_and_artifacts_spread_over_the_nodes(cluster: list[RedisServer]) -> None:
    tier = RedisTier(url(cluster), chunk_bytes=1000)
    keys = [f"{i:02d}" + "a" * 62 for i in range(24)]
    for k in keys:
        tier.put(k, keyed(k))
    got = tier.get(keys[0])
    assert got is not None and got.checksum() == keyed(keys[0]).checksum()
    client = tier.client
    for k in keys:
        man = tier.manifest(k)
        assert man is not None and man["n"] > 1  # several chunks
        slots = {client.keyslot(tier._mkey(k))} | {client.keyslot(tier._ckey(k, man["v"], i)) for i in range(man["n"])}
        assert len(slots) == 1
    nodes = {client.get_node_from_key(tier._mkey(k)).port for k in keys}
    assert len(nodes) == NODES  # spread over every node
    assert sorted(tier.keys()) == sorted(keys)
    assert tier.pin(keys[1]) and tier.pinned_keys() == {keys[1]}
    tier.clear()
    assert tier.keys() == []


def test_engine_through_the_cluster_and_a_node_that_dies(cluster: list[RedisServer], embedded: LoadedModel) -> None:
    doc = "The ferry to Gull Island leaves from pier 7 at noon; the last boat back is at six. " * 4
    q = "Which pier does the ferry leave from?"
    publisher = Engine(None, store=Store([RedisTier(url(cluster))]), device="cpu", dtype="float32")
    publisher.publish([doc])
    reader = Engine(None, store=Store([MemoryTier(), RedisTier(url(cluster))]), device="cpu", dtype="float32")
    ref = reader.generate(q, [doc], max_new_tokens=8, use_cache=False).token_ids
    hit = reader.generate(q, [doc], max_new_tokens=8)
    assert (hit.documents[0].cache.value, hit.documents[0].tier) == ("hit", "redis") and hit.token_ids == ref
    # the node holding the document's slot dies: a fresh reader misses (one warning) and answers the same
    tier = RedisTier(url(cluster), timeout_s=0.5)
    port = tier.client.get_node_from_key(tier._mkey(publisher.document_key(doc))).port
    victim = next(n for n in cluster if n.port == port)
    victim.stop()
    try:
        fresh = Engine(None, store=Store([MemoryTier(), tier]), device="cpu", dtype="float32")
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            gen = fresh.generate(q, [doc], max_new_tokens=8)
        assert gen.documents[0].cache.value == "miss" and gen.token_ids == ref
        assert sum("Redis" in str(w.message) for w in seen) == 1
    finally:
        victim.start()
