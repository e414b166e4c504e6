"""Soak run: readers and a publisher in separate processes on one shared store, under injected faults.

Every request's greedy tokens are compared with a no-cache reference computed up front; the run
counts requests, wrong answers, hits per tier, misses per reason, and the faults injected:

- the publisher process killed with SIGKILL at random moments (and started again);
- bytes flipped in, and files truncated, among the disk tier's artifact files;
- Redis killed (SIGKILL) and started again; a Redis chunk overwritten in place;
- a disk tier with a small size limit in the publisher, so that it evicts all the time (the "full
  disk" of a small filesystem, without mounting one).

The readers keep nothing in memory, so every hit is read from the disk folder or Redis, where the
faults are. Bounded in requests (``--requests``) and time (``--max-s``); loopback Redis only.
Writes ``--out``.

    python benchmarks/soak/soak.py --requests 1000 --out OUT.json
    python benchmarks/soak/soak.py --tiny --out /tmp/soak.json      # smoke run
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import signal
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

FACTS = [
    ("the ferry", "pier 7"), ("the museum", "Tuesday"), ("the library", "room 12"), ("the bakery", "rye bread"),
    ("the clinic", "Dr. Ahmed"), ("the garage", "blue van"), ("the school", "Ms. Lind"), ("the market", "Saturday"),
    ("the harbour", "gate B"), ("the theatre", "row F"), ("the station", "platform 3"), ("the hotel", "room 404"),
]  # fmt: skip
DOCS = [f"Notice {i}. About {what}: the answer is {ans}. " * 4 + f"(notice {i})" for i, (what, ans) in enumerate(FACTS)]
QUESTIONS = [f"What is the answer about {what}?" for what, _ in FACTS]
NEW = 6


def _store(folder: str, redis_url: str, disk_limit: int | None = None, memory: int = 64 << 20) -> Any:
    from kv_rag.store import DiskTier, MemoryTier, RedisTier, Store

    disk = DiskTier(folder) if disk_limit is None else DiskTier(folder, size_limit=disk_limit)
    return Store([MemoryTier(memory), disk, RedisTier(redis_url, retry_s=1.0, timeout_s=1.0)])


def reader(idx: int, folder: str, redis_url: str, refs: dict[str, list[int]], log: str, stop_at: float) -> None:
    """Ask random questions until ``stop_at``; one JSON line per request."""
    warnings.simplefilter("ignore")
    import torch

    torch.set_num_threads(1)
    from kv_rag import Engine

    # no room in memory: every hit is read (and checked) from the disk folder or Redis, where the faults are
    eng = Engine(None, store=_store(folder, redis_url, memory=0), device="cpu", dtype="float32")
    rng = random.Random(idx)
    with open(log, "a") as out:
        while time.time() < stop_at:
            i = rng.randrange(len(DOCS))
            try:
                gen = eng.generate(QUESTIONS[i], [DOCS[i]], max_new_tokens=NEW)
                d = gen.documents[0]
                row = {"ok": gen.token_ids == refs[str(i)], "cache": d.cache.value, "tier": d.tier, "reason": d.reason}
            except Exception as exc:  # an exception is a failed request, counted apart from wrong answers
                row = {"error": f"{type(exc).__name__}: {exc}"}
            out.write(json.dumps(row) + "\n")
            out.flush()


def publisher(folder: str, redis_url: str, stop_at: float, disk_limit: int) -> None:
    """Publish random documents and delete random ones, until ``stop_at`` (or SIGKILL)."""
    warnings.simplefilter("ignore")
    import torch

    torch.set_num_threads(1)
    from kv_rag import Engine

    eng = Engine(None, store=_store(folder, redis_url, disk_limit), device="cpu", dtype="float32")
    rng = random.Random(os.getpid())
    while time.time() < stop_at:
        docs = rng.sample(DOCS, 2)
        eng.publish(docs)
        if rng.random() < 0.3:
            eng.store.delete(eng.document_key(rng.choice(DOCS)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--readers", type=int, default=2)
    ap.add_argument("--max-s", type=float, default=900)
    ap.add_argument("--fault-every-s", type=float, default=1.5)
    ap.add_argument("--tiny", action="store_true", help="smoke run: 20 requests")
    ap.add_argument("--out", default="soak.json")
    args = ap.parse_args(argv)
    if args.tiny:
        args.requests, args.max_s = 20, 120
    warnings.simplefilter("ignore")
    from redis_server import RedisServer, redis_binary

    from kv_rag import Engine
    from kv_rag.bench import provenance

    binary = redis_binary()
    if binary is None:
        print("soak: redis-server is not installed", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="kvrag-soak-"))
    server = RedisServer(binary, work)
    server.start()
    ref_engine = Engine(None, store="memory", device="cpu", dtype="float32")
    refs = {
        str(i): ref_engine.generate(QUESTIONS[i], [DOCS[i]], max_new_tokens=NEW, use_cache=False).token_ids
        for i in range(len(DOCS))
    }
    folder = str(work / "store")
    logs = [str(work / f"reader{i}.jsonl") for i in range(args.readers)]
    ctx = mp.get_context("spawn")
    t0 = time.time()
    stop_at = t0 + args.max_s
    readers = [
        ctx.Process(target=reader, args=(i, folder, server.url, refs, logs[i], stop_at)) for i in range(args.readers)
    ]
    for p in readers:
        p.start()
    disk_limit = 3 * 1024 * 1024  # about six documents' artifacts: the publisher's tier evicts all the time

    def start_publisher() -> Any:
        p = ctx.Process(target=publisher, args=(folder, server.url, stop_at, disk_limit))
        p.start()
        return p

    pub = start_publisher()
    faults: Counter[str] = Counter()
    rng = random.Random(0)

    def done() -> int:
        n = 0
        for f in logs:
            if os.path.exists(f):
                with open(f) as fh:
                    n += sum(1 for _ in fh)
        return n

    import redis

    while time.time() < stop_at and done() < args.requests:
        time.sleep(args.fault_every_s)
        kind = rng.choice(["kill publisher", "flip bytes", "truncate", "restart redis", "overwrite redis chunk"])
        if kind == "kill publisher":
            os.kill(pub.pid, signal.SIGKILL)
            pub.join()
            pub = start_publisher()
        elif kind in ("flip bytes", "truncate"):
            files = [p for p in Path(folder).rglob("*.val")]
            if not files:
                continue
            f = rng.choice(files)
            try:
                data = bytearray(f.read_bytes())
                if kind == "flip bytes" and data:
                    data[rng.randrange(len(data))] ^= 0xFF
                else:
                    data = data[: len(data) // 2]
                f.write_bytes(bytes(data))
            except OSError:
                continue
        elif kind == "restart redis":
            server.stop()
            time.sleep(0.3)
            server.start()
        else:
            client = redis.Redis(port=server.port)
            chunks = [k for k in client.scan_iter(match="kvrag:c:*", count=1000)]
            if not chunks:
                continue
            client.setrange(rng.choice(chunks), 100, b"\x00garbage\x00")
        faults[kind] += 1
    for p in [*readers, pub]:
        if p.is_alive():
            os.kill(p.pid, signal.SIGKILL)
        p.join()
    server.stop()
    rows = []
    for f in logs:
        if os.path.exists(f):
            with open(f) as fh:
                rows += [json.loads(line) for line in fh if line.strip()]
    command = "python benchmarks/soak/soak.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {
        "provenance": provenance(command),
        "benchmark": "soak",
        "command": command,
        "seconds": round(time.time() - t0, 1),
        "requests": len(rows),
        "wrong_answers": sum(1 for r in rows if r.get("ok") is False),
        "failed_requests": sum(1 for r in rows if "error" in r),
        "errors": Counter(r["error"] for r in rows if "error" in r).most_common(5),
        "cache": dict(Counter(r.get("cache") for r in rows if "cache" in r)),
        "hits_by_tier": dict(Counter(r["tier"] for r in rows if r.get("cache") == "hit")),
        "misses_by_reason": dict(Counter(r["reason"] for r in rows if r.get("cache") == "miss")),
        "faults": dict(faults),
        "readers": args.readers,
        "documents": len(DOCS),
        "new_tokens": NEW,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 1 if result["wrong_answers"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
