"""Faults: concurrent processes and threads on one Redis, killed writers, full disks, truncated files,
a byte-bounded memory tier under 1000 documents, and bad input that must not end in a traceback."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import redis as redis_client
from redis_server import RedisServer, redis_server
from test_artifact import make_artifact
from tiny import tiny_model

from kv_rag import Artifact, Engine
from kv_rag.bench import document_of_length
from kv_rag.cli import main
from kv_rag.store import DiskTier, MemoryTier, RedisTier, Store

__all__ = ["redis_server"]  # the fixture
TESTS = Path(__file__).resolve().parent


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny() -> tuple[object, object]:
    return tiny_model("llama", num_hidden_layers=4)


def _doc(i: int) -> str:
    return f"Record {i}. " + " ".join(f"Entry {j} of record {i} reads {(i * 31 + j) % 89}." for j in range(10))


SHARED_WORKER = textwrap.dedent(
    """
    import json, sys, threading, warnings
    sys.path.insert(0, sys.argv[3])
    warnings.simplefilter("ignore")
    import torch; torch.set_num_threads(1)
    from tiny import tiny_model
    from kv_rag import Engine, Store
    url, docs = sys.argv[1], json.loads(sys.argv[2])
    model, tok = tiny_model("llama", num_hidden_layers=4)
    engine = Engine(model, tokenizer=tok, store=Store.open(url))
    out, lock = [], threading.Lock()
    def run(order):
        for i in order:
            g = engine.generate("Which entry?", [docs[i]], max_new_tokens=4)
            with lock:
                out.append([i, g.token_ids, g.documents[0].cache.value, g.documents[0].tier])
    ts = [threading.Thread(target=run, args=(o,)) for o in ([0, 1, 2, 0, 1, 2], [2, 1, 0, 2, 1, 0])]
    [t.start() for t in ts]; [t.join() for t in ts]
    print(json.dumps(out))
    """
)


def test_processes_and_threads_share_one_redis(redis_server: RedisServer, tmp_path: Path, tiny: tuple) -> None:
    """3 processes x 2 threads, same 3 documents, separate disks, one Redis: right answers, whole artifacts."""
    if redis_server.proc is None:
        redis_server.start()
    redis_server.flush()
    model, tok = tiny
    docs = [_doc(i) for i in range(3)]
    ref_engine = Engine(model, tokenizer=tok, store="memory")
    ref = [ref_engine.generate("Which entry?", [d], use_cache=False, max_new_tokens=4).token_ids for d in docs]
    procs = []
    for p in range(3):
        env = {**os.environ, "KV_RAG_HOME": str(tmp_path / f"host{p}")}
        (tmp_path / f"host{p}").mkdir()
        models = Path(os.environ.get("KV_RAG_HOME", Path.home() / ".cache" / "kv-rag")) / "models"
        (tmp_path / f"host{p}" / "models").symlink_to(models)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", SHARED_WORKER, redis_server.url, json.dumps(docs), str(TESTS)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    rows = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        rows.extend(json.loads(out))
    assert len(rows) == 3 * 12
    for i, ids, _cache, _tier in rows:
        assert ids == ref[i]
    misses = {i: sum(1 for r in rows if r[0] == i and r[2] == "miss") for i in range(3)}
    assert all(1 <= m <= 3 for m in misses.values()), misses  # at most one computation per process
    tier = RedisTier(redis_server.url)
    keys = tier.keys()
    doc_keys = {ref_engine.document_key(d) for d in docs}
    assert doc_keys <= set(keys)
    assert all(tier.get(k) is not None for k in keys)  # every manifest points at whole, verified chunks
    client = redis_client.Redis.from_url(redis_server.url)
    live = {f"{tier.prefix}c:{k}:{tier.manifest(k)['v']}:" for k in keys}  # type: ignore[index]
    for ck in tier.chunk_keys():  # other chunks are replaced versions, expiring within the grace period
        assert any(ck.startswith(v) for v in live) or 0 < client.ttl(ck) <= tier.grace_s


KILLED_WRITER = textwrap.dedent(
    """
    import sys, dataclasses
    sys.path.insert(0, sys.argv[3])
    from test_artifact import make_artifact
    from kv_rag.store import DiskTier, RedisTier
    disk, red = DiskTier(sys.argv[1]), RedisTier(sys.argv[2], chunk_bytes=65536)
    art = make_artifact(n=4000, layers=8)
    i = 0
    while True:
        key = f"{i:064d}"
        a = dataclasses.replace(art, meta=dataclasses.replace(art.meta, key=key)).sealed()
        disk.put(key, a)
        red.put(key, a)
        print(i, flush=True)
        i += 1
    """
)


def test_process_killed_mid_write_leaves_a_consistent_store(redis_server: RedisServer, tmp_path: Path) -> None:
    if redis_server.proc is None:
        redis_server.start()
    redis_server.flush()
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(tmp_path / "disk"), redis_server.url, str(TESTS)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    for _ in range(3):  # a few whole writes, then SIGKILL in the middle of the next ones
        proc.stdout.readline()
    time.sleep(0.05)
    proc.kill()
    proc.wait(30)
    disk, red = DiskTier(tmp_path / "disk"), RedisTier(redis_server.url)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a damaged entry may be dropped with a warning: that is a miss
        for tier in (disk, red):
            keys = tier.keys()
            assert len(keys) >= 3
            for key in keys:
                got = tier.get(key)
                assert got is None or got.meta.key == key
    client = redis_client.Redis.from_url(redis_server.url)
    assert all(client.ttl(k) > 0 for k in red.chunk_keys())  # orphaned chunks expire, nothing immortal
    store = Store([MemoryTier(), disk, red])
    art = dataclasses.replace(make_artifact(), meta=dataclasses.replace(make_artifact().meta, key="z" * 64)).sealed()
    store.put("z" * 64, art)
    assert disk.get("z" * 64) is not None and red.get("z" * 64) is not None


class FullTier:
    """A tier on a full disk: every write raises ENOSPC."""

    name = "full"

    def get(self, key: str) -> Artifact | None:
        return None

    def put(self, key: str, artifact: Artifact) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    def delete(self, key: str) -> None:
        pass

    def __contains__(self, key: object) -> bool:
        return False


def test_full_disk_simulated_request_still_answers(tiny: tuple) -> None:
    model, tok = tiny
    engine = Engine(model, tokenizer=tok, store=Store([MemoryTier(), FullTier()]))
    ref = engine.generate("Which entry?", [_doc(1)], use_cache=False, max_new_tokens=4).token_ids
    with pytest.warns(UserWarning, match="full tier could not write.*No space left"):
        gen = engine.generate("Which entry?", [_doc(1)], max_new_tokens=4)
    assert gen.token_ids == ref
    again = engine.generate("Which entry?", [_doc(1)], max_new_tokens=4)
    assert again.token_ids == ref and again.documents[0].tier == "memory"


def test_full_disk_on_a_tiny_tmpfs(tiny: tuple, tmp_path: Path) -> None:
    mnt = tmp_path / "tiny-fs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}); the simulated full-disk test covers it")
    try:
        model, tok = tiny
        disk = DiskTier(mnt / "store")
        engine = Engine(model, tokenizer=tok, store=Store([MemoryTier(0), disk]))
        doc = document_of_length(tok, 600)  # 600 tokens x 1 KiB/token > 400 KiB
        ref = engine.generate("Which entry?", [doc], use_cache=False, max_new_tokens=4).token_ids
        with pytest.warns(UserWarning, match="disk tier could not write"):
            gen = engine.generate("Which entry?", [doc], max_new_tokens=4)
        assert gen.token_ids == ref
        small = _doc(2)  # still room for a small artifact: the tier keeps working
        engine.generate("Which entry?", [small], max_new_tokens=4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            keys = disk.keys()
            for key in keys:
                got = disk.get(key)
                assert got is None or got.meta.key == key
        assert engine.generate("Which entry?", [small], max_new_tokens=4).documents[0].tier == "disk"
        disk.close()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_truncated_file_is_recomputed_and_replaced(tiny: tuple, tmp_path: Path) -> None:
    model, tok = tiny
    disk = DiskTier(tmp_path / "s")
    engine = Engine(model, tokenizer=tok, store=Store([MemoryTier(0), disk]))
    doc = _doc(3)
    first = engine.generate("Which entry?", [doc], max_new_tokens=4)
    key = engine.document_key(doc)
    path = disk.path_of(key)
    assert path is not None
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.warns(UserWarning, match="dropping stored artifact"):
        second = engine.generate("Which entry?", [doc], max_new_tokens=4)
    assert second.token_ids == first.token_ids and second.documents[0].cache.value == "miss"
    assert disk.get(key) is not None  # replaced by a good one


class PeakMemoryTier(MemoryTier):
    """Records the most bytes ever held."""

    peak = 0

    def put(self, key: str, artifact: Artifact) -> None:
        super().put(key, artifact)
        self.peak = max(self.peak, self.nbytes)


def test_memory_tier_bound_under_1000_distinct_documents(tiny: tuple) -> None:
    model, tok = tiny
    bound = 2_000_000
    mem = PeakMemoryTier(bound)
    engine = Engine(model, tokenizer=tok, store=Store([mem]))
    docs = [f"Note {i}: " + "word " * (5 + i % 60) for i in range(1000)]
    reports = engine.publish(docs)
    assert sum(r.cache.value == "miss" for r in reports) == 1000
    assert mem.peak <= bound and mem.nbytes <= bound
    assert 10 < len(mem) < 1000  # it did evict
    assert engine.document_key(docs[-1]) in mem and engine.document_key(docs[0]) not in mem


def test_foreign_artifact_under_a_key_is_a_clean_miss(tiny: tuple, tmp_path: Path) -> None:
    model, tok = tiny
    other_model, _ = tiny_model("qwen2")
    engine = Engine(model, tokenizer=tok, store=tmp_path / "s")
    other = Engine(other_model, tokenizer=tok, store="memory")
    doc = _doc(4)
    key = engine.document_key(doc)
    engine.publish([_doc(9)])  # the system prefix is stored, so the lookup reaches the document
    other.publish([doc])
    hit = other.store.get(other.document_key(doc))
    assert hit is not None
    forged = dataclasses.replace(hit.artifact, meta=dataclasses.replace(hit.artifact.meta, key=key)).sealed()
    engine.store.put(key, forged)  # another model's KV filed under this model's key
    ref = engine.generate("Which entry?", [doc], use_cache=False, max_new_tokens=4).token_ids
    with pytest.warns(UserWarning, match="another model"):
        gen = engine.generate("Which entry?", [doc], max_new_tokens=4)
    assert gen.token_ids == ref and gen.documents[0].cache.value == "miss"
    fixed = engine.store.tier("disk").get(key)
    assert fixed is not None and fixed.meta.model_digest == engine.loaded.fingerprint.digest


def test_unreachable_redis_in_the_python_api_and_the_cli(
    tiny: tuple, embedded: object, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KV_RAG_HOME", str(tmp_path / "home"))  # the embedded model is already loaded
    url = "redis://127.0.0.1:1/0"  # nothing listens on port 1
    model, tok = tiny
    engine = Engine(model, tokenizer=tok, store=url)
    ref = engine.generate("What is entry 2?", [_doc(5)], use_cache=False, max_new_tokens=3).token_ids
    with pytest.warns(UserWarning, match="Redis at redis://127.0.0.1:1/0 failed"):
        gen = engine.generate("What is entry 2?", [_doc(5)], max_new_tokens=3)
    assert gen.token_ids == ref
    assert [t.name for t in engine.store.tiers] == ["memory", "disk", "redis"]
    doc = tmp_path / "d.txt"
    doc.write_text("Entry 2 reads 41.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["ask", "What is entry 2?", "--docs", str(doc), "--store", url, "--max-new-tokens", "2"]) == 0
    assert "Traceback" not in capsys.readouterr().err


def test_cli_bad_input(embedded: object, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    long = tmp_path / "long.txt"
    long.write_text(document_of_length(embedded.tokenizer, 8300))  # type: ignore[attr-defined]
    cases = [
        (["publish", str(long), "--chunk-tokens", "0"], "reads at most 8192"),
        (["verify", "0" * 64, "--fraction", "1.5"], "neither an artifact file nor a key"),
    ]
    for argv, msg in cases:
        code = main([*argv, "--store", str(tmp_path / "s")])
        err = capsys.readouterr().err
        assert code == 2 and msg in err and "Traceback" not in err, err


def _bind_read_only(src: Path, mnt: Path) -> None:
    """``mnt``: a read-only view of ``src`` (a bind mount), or skip where mounting is not allowed."""
    mnt.mkdir()
    r = subprocess.run(["mount", "--bind", str(src), str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot bind-mount here ({r.stderr.strip()})")
    r = subprocess.run(["mount", "-o", "remount,bind,ro", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        pytest.skip(f"cannot remount read-only here ({r.stderr.strip()})")


def test_read_only_store_answers_from_what_it_holds_and_publish_refuses_in_one_line(
    embedded: object, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A store on a read-only mount: `ask` hits what is there (one warning line), a missing folder on it
    answers by prefill, `publish` exits 2 with one line; a writable twin gives the same answer."""
    src, mnt = tmp_path / "src", tmp_path / "ro"
    src.mkdir()
    doc = tmp_path / "ferry.txt"
    doc.write_text("The ferry leaves from pier 7 at nine each morning. Tickets are sold on board.\n")
    q = "Which pier does the ferry leave from?"

    def ask(store: Path) -> int:
        return main(["ask", q, "--docs", str(doc), "--store", str(store), "--max-new-tokens", "8", "--json"])

    assert main(["publish", str(doc), "--store", str(src / "store"), "--json"]) == 0
    capsys.readouterr()
    assert ask(src / "store") == 0
    want = json.loads(capsys.readouterr().out)["answer"]
    _bind_read_only(src, mnt)
    try:
        with pytest.warns(UserWarning, match="cannot be written") as rec:
            assert ask(mnt / "store") == 0
        assert len([w for w in rec if str(w.message).startswith("kv-rag")]) == 1
        out = capsys.readouterr()
        got = json.loads(out.out)
        assert got["answer"] == want and got["docs"][0]["cache"] == "hit" and "Traceback" not in out.err
        with pytest.warns(UserWarning, match="cannot be written"):
            assert ask(mnt / "new") == 0
        assert json.loads(capsys.readouterr().out)["answer"] == want  # nothing stored there: a prefill
        assert main(["publish", str(doc), "--store", str(mnt / "store")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("kv-rag publish: error:") and "cannot be written" in err[0]
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_small_disk_tier_keeps_the_newest_documents_and_their_chain_head(tiny: tuple, tmp_path: Path) -> None:
    """A disk tier with room for about two documents, five published: the last ones and the system prefix
    they extend are held (diskcache alone evicted ten entries at once: all of them), the reports say which
    were not kept, and a request on the last document hits."""
    model, tok = tiny
    docs = [_doc(i) for i in range(5)]
    probe = Engine(model, tokenizer=tok, store="memory")
    hit = probe.store.get(probe.publish(docs[:1])[0].key)
    assert hit is not None
    per_doc = hit.artifact.nbytes
    disk = DiskTier(tmp_path / "small", size_limit=int(2.6 * per_doc) + 64 * 1024)
    engine = Engine(model, tokenizer=tok, store=Store([MemoryTier(0), disk]))
    reports = engine.publish(docs)
    assert reports[-1].stored and not reports[0].stored
    held = set(disk.keys())
    assert {r.key for r in reports if r.stored} <= held
    heads = {disk.get(k).meta.parent for k in held} - {""}  # type: ignore[union-attr]
    assert heads and heads <= held  # what the documents extend is still there
    assert disk._cache.volume() <= disk.size_limit
    gen = engine.generate("Which entry?", [docs[-1]], max_new_tokens=4)
    assert gen.documents[0].cache.value == "hit" and gen.documents[0].tier == "disk"
