"""Store tiers: LRU bound, promotion, and damaged or foreign artifacts become misses that are recomputed."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from test_artifact import make_artifact

from kv_rag import CacheStatus, Engine
from kv_rag.bench import document_of_length
from kv_rag.store import DiskTier, MemoryTier, Store


def test_memory_tier_stays_within_its_byte_bound() -> None:
    one = make_artifact(n=50).nbytes
    tier = MemoryTier(max_bytes=one * 3 + 10)
    for i in range(20):
        tier.put(f"k{i}", make_artifact(n=50))
        assert tier.nbytes <= tier.max_bytes
    assert len(tier) == 3
    assert "k19" in tier and "k0" not in tier
    tier.get("k17")  # most recently used now
    tier.put("k20", make_artifact(n=50))
    assert "k17" in tier and "k18" not in tier
    tier.put("huge", make_artifact(n=1000))
    assert "huge" not in tier and tier.nbytes <= tier.max_bytes


def test_lower_tier_hit_is_copied_up(tmp_path: Path) -> None:
    mem, disk = MemoryTier(), DiskTier(tmp_path)
    disk.put("a", dataclasses.replace(make_artifact(), meta=dataclasses.replace(make_artifact().meta, key="a")))
    store = Store([mem, disk])
    hit = store.get("a")
    assert hit is not None and hit.tier == "disk"
    assert "a" in mem
    hit2 = store.get("a")
    assert hit2 is not None and hit2.tier == "memory"


def test_disk_tier_drops_damaged_entry_with_a_warning(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path)
    art = make_artifact()
    key = art.meta.key
    disk.put(key, art)
    path = disk.path_of(key)
    assert path is not None
    path.write_bytes(path.read_bytes()[:-100])  # truncated file
    with pytest.warns(UserWarning, match="dropping stored artifact"):
        assert disk.get(key) is None
    assert key not in disk


def test_store_open_specs(tmp_path: Path) -> None:
    assert [t.name for t in Store.open("memory").tiers] == ["memory"]
    assert [t.name for t in Store.open(tmp_path / "s").tiers] == ["memory", "disk"]
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="must be a folder"):
        Store.open(tmp_path / "f")


def _stored_file(engine: Engine, key: str) -> Path:
    disk = engine.store.tier("disk")
    assert isinstance(disk, DiskTier)
    path = disk.path_of(key)
    assert path is not None
    return path


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_damaged_artifact_is_recomputed_and_replaced(engine: Engine, tmp_path: Path, damage: str) -> None:
    doc = document_of_length(engine.tokenizer, 300)
    prompt = engine.prompt("What is this about?", [doc])
    first = engine.generate(prompt, max_new_tokens=8)
    key = first.documents[0].key
    assert key is not None
    path = _stored_file(engine, key)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[-10] ^= 0xFF
    else:
        data = bytearray(b"\x00garbage" * 100)
    path.write_bytes(bytes(data))

    fresh = Engine(None, store=tmp_path / "store", device="cpu", dtype="float32")  # empty memory tier
    with pytest.warns(UserWarning, match="recomputed"):
        again = fresh.generate(prompt, max_new_tokens=8)
    assert again.documents[0].cache == CacheStatus.MISS
    assert again.token_ids == first.token_ids
    # replaced by a good artifact: a third engine hits
    third = Engine(None, store=Store([DiskTier(tmp_path / "store")]), device="cpu", dtype="float32")
    assert third.generate(prompt, max_new_tokens=8).documents[0].cache == CacheStatus.HIT


@pytest.mark.parametrize("foreign", ["model", "tokenizer", "ids"])
def test_foreign_artifact_under_our_key_is_a_miss(engine: Engine, tmp_path: Path, foreign: str) -> None:
    doc = document_of_length(engine.tokenizer, 200)
    prompt = engine.prompt("What is this about?", [doc])
    first = engine.generate(prompt, max_new_tokens=6)
    key = first.documents[0].key
    assert key is not None
    disk = engine.store.tier("disk")
    hit = engine.store.get(key)
    assert hit is not None
    meta = hit.artifact.meta
    if foreign == "ids":  # same length, one token changed
        ids = hit.artifact.token_ids.clone()
        ids[len(ids) // 2] += 1
        fake = dataclasses.replace(hit.artifact, token_ids=ids, meta=dataclasses.replace(meta, checksum=""))
    else:
        field = "model_digest" if foreign == "model" else "tokenizer_digest"
        fake = dataclasses.replace(hit.artifact, meta=dataclasses.replace(meta, **{field: "f" * 32}, checksum=""))
    disk.put(key, fake.sealed())  # a well-formed artifact of another model / tokenizer / text
    fresh = Engine(None, store=tmp_path / "store", device="cpu", dtype="float32")
    with pytest.warns(UserWarning, match="token ids differ" if foreign == "ids" else "another"):
        again = fresh.generate(prompt, max_new_tokens=6)
    assert again.documents[0].cache == CacheStatus.MISS
    assert again.token_ids == first.token_ids


def test_disk_hit_tensors_are_views_of_one_read(tmp_path: Path) -> None:
    """A disk read lands in memory once: the loaded keys and values share one buffer."""
    disk = DiskTier(tmp_path / "d")
    art = make_artifact(n=64)
    disk.put(art.meta.key, art)
    got = disk.get(art.meta.key)
    assert got is not None
    tensors = (*got.keys, *got.values)
    lo = min(t.data_ptr() for t in tensors)
    hi = max(t.data_ptr() + t.numel() * t.element_size() for t in tensors)
    path = disk.path_of(art.meta.key)
    assert path is not None
    assert hi - lo <= path.stat().st_size  # all inside one buffer the size of the file
    assert all(torch.equal(a, b) for a, b in zip((*art.keys, *art.values), (*got.keys, *got.values), strict=True))
