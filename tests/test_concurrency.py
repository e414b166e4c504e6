"""Several processes and threads publishing and reading the same document through one store folder."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

from kv_rag import CacheStatus, Engine
from kv_rag.bench import document_of_length
from kv_rag.store import DiskTier, Store

WORKER = textwrap.dedent(
    """
    import sys, time, json
    from kv_rag import Engine
    store, doc_file, start_at = sys.argv[1], sys.argv[2], float(sys.argv[3])
    doc = open(doc_file).read()
    engine = Engine(None, store=store, device="cpu", dtype="float32")
    engine.loaded.fingerprint
    while time.time() < start_at:
        time.sleep(0.01)
    rep = engine.publish([doc])[0]
    gen = engine.generate("Summarize it.", [doc], max_new_tokens=6)
    print(json.dumps({"key": rep.key, "publish": rep.cache.value, "tokens": gen.token_ids,
                      "doc_cache": gen.documents[0].cache.value}))
    """
)


def test_processes_publishing_the_same_document(engine: Engine, tmp_path: Path) -> None:
    import json

    doc = document_of_length(engine.tokenizer, 400)
    doc_file = tmp_path / "doc.txt"
    doc_file.write_text(doc)
    store = tmp_path / "shared-store"
    start_at = time.time() + 12  # after every worker has imported torch and loaded the model
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(store), str(doc_file), str(start_at)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    keys = {r["key"] for r in results}
    assert len(keys) == 1
    assert all(r["doc_cache"] == "hit" for r in results)  # each read a complete artifact back
    assert len({tuple(r["tokens"]) for r in results}) == 1
    # the store holds one valid artifact, and it gives the same answer as a from-scratch prefill
    disk = DiskTier(store)
    assert (key := keys.pop()) in disk
    assert disk.get(key) is not None
    reader = Engine(None, store=Store([disk]), device="cpu", dtype="float32")
    gen = reader.generate("Summarize it.", [doc], max_new_tokens=6)
    plain = engine.generate("Summarize it.", [doc], max_new_tokens=6, use_cache=False)
    assert gen.documents[0].cache == CacheStatus.HIT
    assert gen.token_ids == plain.token_ids == results[0]["tokens"]


def test_threads_sharing_one_engine(engine: Engine) -> None:
    doc = document_of_length(engine.tokenizer, 250)
    outputs: list[list[int]] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            outputs.append(engine.generate("What is it?", [doc], max_new_tokens=6).token_ids)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(outputs) == 4 and all(o == outputs[0] for o in outputs)
