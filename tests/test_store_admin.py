"""Managing a store: listing, sizing, pruning and clearing, in Python and with ``kv-rag store``."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest
from redis_server import RedisServer, redis_server
from test_artifact import make_artifact

from kv_rag import Artifact
from kv_rag.cli import main
from kv_rag.errors import InputError
from kv_rag.store import DiskTier, MemoryTier, RedisTier, Store
from kv_rag.store.admin import parse_duration

__all__ = ["redis_server"]  # the fixture


def keyed(key: str, n: int = 20) -> Artifact:
    art = make_artifact(n=n, layers=2)
    return dataclasses.replace(art, meta=dataclasses.replace(art.meta, key=key)).sealed()


def test_entries_usage_prune_and_clear_in_python(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path / "d")
    store = Store([MemoryTier(), disk])
    for k in ("a" * 64, "b" * 64):
        store.put(k, keyed(k))
    rows = store.entries()
    assert {(e.tier, e.key) for e in rows} == {(t, k) for t in ("memory", "disk") for k in ("a" * 64, "b" * 64)}
    assert all(e.nbytes > 0 for e in rows)
    assert all(e.stored_at is not None and abs(e.stored_at - time.time()) < 60 for e in rows if e.tier == "disk")
    use = {u.tier: u for u in store.usage()}
    assert use["disk"].entries == 2 and use["disk"].limit == disk.size_limit
    assert use["disk"].where == str(disk.directory)
    assert use["memory"].entries == 2 and use["memory"].nbytes == sum(e.nbytes for e in rows if e.tier == "memory")
    assert store.prune(3600) == 0  # nothing is an hour old; the memory tier keeps no times
    assert store.prune(0) == 2 and len(disk) == 0 and len(store.tiers[0]) == 2  # type: ignore[arg-type]
    assert store.clear() == 2 and store.entries() == []
    with pytest.raises(InputError, match="older_than"):
        store.prune(-1)


def test_redis_entries_record_their_time_and_clear_removes_the_chunks(redis_server: RedisServer) -> None:
    if redis_server.proc is None:
        redis_server.start()
    redis_server.flush()
    tier = RedisTier(redis_server.url, chunk_bytes=1000)
    for k in ("c" * 64, "d" * 64):
        tier.put(k, keyed(k, n=60))
    rows = Store([tier]).entries()
    assert len(rows) == 2 and all(e.stored_at is not None and e.nbytes > 1000 for e in rows)
    assert tier.chunk_keys()
    assert Store([tier]).clear() == 2 and tier.keys() == [] and tier.chunk_keys() == []


def test_kv_rag_store_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "s"
    store = Store([DiskTier(folder)])
    for k in ("e" * 64, "f" * 64, "e" * 8 + "0" * 56):
        store.put(k, keyed(k))

    def run(*args: str) -> tuple[int, str, str]:
        code = main(["store", *args, "--store", str(folder)])
        out = capsys.readouterr()
        return code, out.out, out.err

    code, out, _ = run("ls", "--json")
    assert code == 0 and len(json.loads(out)["entries"]) == 3
    code, out, _ = run("du")
    assert code == 0 and "3 entries" in out and str(folder) in out
    code, _, err = run("rm", "eeeeeeee")  # a prefix two keys share
    assert code == 2 and "names 2 stored artifacts" in err
    code, out, _ = run("rm", "f" * 10, "--json")
    assert code == 0 and json.loads(out) == {"removed": ["f" * 64]}
    code, _, err = run("prune")
    assert code == 2 and "--older-than" in err
    assert run("prune", "--older-than", "1d")[1].strip() == "removed 0 artifacts"
    code, _, err = run("clear")
    assert code == 2 and "--yes" in err and len(store.tiers[0]) == 2  # type: ignore[arg-type]
    assert run("clear", "--yes")[1].strip() == "removed 2 artifacts"
    assert json.loads(run("du", "--json")[1])["tiers"][0]["entries"] == 0


def test_pinned_entries_are_never_evicted_nor_pruned(tmp_path: Path) -> None:
    """Disk (across processes: the pin is in the index) and memory tiers: with room for two, storing a
    third evicts the oldest unpinned entry; prune spares pinned entries; unpin lets it go again."""
    one = len(keyed("a" * 64, n=2000).to_bytes())
    disk = DiskTier(tmp_path / "d")
    disk._cache.reset("size_limit", int(disk._cache.volume() + 2.5 * one))  # the index's own pages, and two
    mem = MemoryTier(int(2.5 * keyed("a" * 64, n=2000).nbytes))
    store = Store([mem, disk])
    a, b, c, d = ("a" * 64, "b" * 64, "c" * 64, "d" * 64)
    for k in (a, b):
        store.put(k, keyed(k, n=2000))
        time.sleep(0.01)
    assert store.pin(a) == ["memory", "disk"] and store.pin("z" * 64) == []
    assert DiskTier(tmp_path / "d").pinned_keys() == {a}  # another opener (process) sees the pin
    store.put(c, keyed(c, n=2000))
    assert a in disk and b not in disk and c in disk
    assert mem.get(a) is not None and mem.get(b) is None
    assert {e.key for e in store.entries() if e.pinned} == {a}
    assert store.prune(0) == 1 and a in disk and c not in disk  # the disk records store times; a stayed
    store.pin(c, on=True)
    store.put(c, keyed(c, n=2000))
    store.pin(c)
    with pytest.warns(UserWarning, match="pinned entries"):
        store.put(d, keyed(d, n=2000))  # a and c pinned, no room for d: skipped
    assert d not in disk and mem.get(d) is None  # both tiers full of pinned entries
    store.pin(a, on=False)
    store.pin(c, on=False)
    for k in (c, d):
        store.put(k, keyed(k, n=2000))
        time.sleep(0.01)
    assert a not in disk and mem.get(a) is None


def test_redis_pin_takes_the_artifact_off_its_ttl(redis_server: RedisServer) -> None:
    if redis_server.proc is None:
        redis_server.start()
    redis_server.flush()
    tier = RedisTier(redis_server.url, chunk_bytes=1000, ttl_s=3600)
    k = "p" * 64
    tier.put(k, keyed(k, n=60))
    man = tier.manifest(k)
    assert man is not None
    names = [tier._mkey(k)] + [tier._ckey(k, man["v"], i) for i in range(man["n"])]
    assert all(tier.client.ttl(n) > 0 for n in names)
    assert tier.pin(k) and tier.pinned_keys() == {k}
    assert all(tier.client.ttl(n) == -1 for n in names)  # no expiry
    assert tier.get(k) is not None and all(tier.client.ttl(n) == -1 for n in names)  # a read does not renew it
    tier.put(k, keyed(k, n=60))  # replaced: the new version stays pinned
    assert tier.pinned_keys() == {k} and tier.client.ttl(tier._mkey(k)) == -1
    assert tier.pin(k, on=False) and tier.client.ttl(tier._mkey(k)) > 0 and tier.pinned_keys() == set()
    assert not tier.pin("q" * 64)


def test_kv_rag_store_pin(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "s"
    store = Store([DiskTier(folder)])
    for k in ("g" * 64, "h" * 64):
        store.put(k, keyed(k))
    assert main(["store", "pin", "g" * 8, "--store", str(folder), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"pinned": ["g" * 64]}
    assert main(["store", "ls", "--store", str(folder)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("disk   gggg") and line.endswith("pinned") for line in lines)
    assert not any(line.startswith("disk   hhhh") and line.endswith("pinned") for line in lines)
    assert main(["store", "unpin", "g" * 8, "--store", str(folder)]) == 0
    assert capsys.readouterr().out.strip() == "unpinned 1 artifacts"
    assert main(["store", "pin", "--store", str(folder)]) == 2
    assert "needs artifact keys" in capsys.readouterr().err


def test_durations() -> None:
    assert [parse_duration(t) for t in ("90", "30m", "12h", "7d", "2w", "1.5h")] == [
        90,
        1800,
        43200,
        604800,
        1209600,
        5400,
    ]
    with pytest.raises(InputError, match="older-than"):
        parse_duration("soon")
