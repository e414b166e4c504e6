"""Fleet simulation: consumer replicas and publishers sharing a Redis Cluster tier (issue 18, part 8).

``--replicas`` consumer replicas and ``--publishers`` publishers, each a separate OS process, share a
three-node Redis Cluster on loopback (``redis+cluster://``). Every replica has its own memory tier
(and, with ``--disk-mb``, its own disk tier) in front of the cluster, all of it the real
``kv_rag.store`` code (``Store``, ``MemoryTier``, ``DiskTier``, ``RedisTier``). A request draws one
document from a Zipf popularity (rank ``k`` has weight ``1 / k**s`` over ``--catalogue`` documents);
a document's length is one of ``--lengths`` (its rank modulo their number). A hit is timed; on a miss
the replica "recomputes": it sleeps the embedded model's measured CPU prefill time for that length
(``kv_rag.cost.CPU_SMOLLM2_FP32``, the current ``kv-rag bench`` result) times ``--prefill-scale``,
then publishes the artifact through its store (memory, disk, cluster). Publishers walk the catalogue
in popularity order, each its share of the ranks, and publish what the cluster lacks (charged the
same prefill time): ahead of demand. Every phase (one per Zipf ``s`` and catalogue size) starts cold.

Artifacts have the embedded model's KV geometry (SmolLM2-135M: 30 layers, 3 KV heads, head size 64,
float32: 46,080 bytes a token) with random values: the store moves, checks and parses bytes and never
looks at their values, so its timings do not depend on them.

Measured: hits per tier, bytes moved, ``Store.get`` time per tier (p50/p99), a miss's look-up and
publish time, the publishers' write rate, Redis's own counters (memory, evictions, bytes in and out),
and single-client throughput probes. Simulated: the prefill (a sleep), the documents (random KV),
the request stream (Zipf, one document a request, ``--request-s`` of other work a request).

    python benchmarks/scaling/fleet.py --out benchmarks/scaling/results/DATE-fleet.json
    python benchmarks/scaling/fleet.py --tiny --out /tmp/fleet.json   # smoke run (seconds)
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import multiprocessing as mp
import os
import random
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from catalogue import F32, Catalogue, geometry  # noqa: E402

from kv_rag.store.redis import CHUNK_BYTES  # noqa: E402


class Drops(logging.Handler):
    """Counts the Redis tier's "dropping redis artifact" records (a chunk evicted: the artifact is a miss)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        """Count ``record`` if it reports a dropped artifact."""
        self.count += "dropping" in record.getMessage()


def _worker_setup() -> Drops:
    """Quiet warnings, one torch thread, and the counter of dropped Redis artifacts (this process's)."""
    warnings.simplefilter("ignore")  # an evicted chunk warns once per dropped artifact: counted, not printed
    import torch

    torch.set_num_threads(1)
    drops, log = Drops(), logging.getLogger("kv_rag.store.redis")
    log.addHandler(drops)
    log.propagate = False
    return drops


def shared_tier(url: str, opts: dict[str, Any]) -> Any:
    """A client of the cluster tier (``--chunk-bytes`` a chunk)."""
    from kv_rag.store import RedisTier

    return RedisTier(url, chunk_bytes=opts["chunk_bytes"], timeout_s=5.0, retry_s=1.0)


def replica(idx: int, url: str, opts: dict[str, Any], inbox: Any, outbox: Any) -> None:
    """One consumer replica: serve Zipf-drawn requests phase after phase; one result a phase."""
    drops = _worker_setup()
    from kv_rag.cost import CPU_SMOLLM2_FP32
    from kv_rag.store import DiskTier, MemoryTier, Store, Tier

    outbox.put(("ready", idx, None))
    while (phase := inbox.get()) is not None:
        cat = Catalogue(phase["catalogue"], phase["zipf_s"], opts["lengths"], opts["geometry"])
        memory = MemoryTier(int(opts["memory_mb"] * 2**20))
        tiers: list[Tier] = [memory]
        if opts["disk_mb"]:
            folder = Path(opts["work"]) / f"replica{idx}-phase{phase['index']}"
            tiers.append(DiskTier(folder, size_limit=int(opts["disk_mb"] * 2**20)))
        redis_tier = shared_tier(url, opts)
        store = Store([*tiers, redis_tier])
        drops.count = 0
        rng = random.Random(f"{opts['seed']}/{phase['index']}/{idx}")
        rows: list[list[Any]] = []  # rank, tier or "miss", get seconds, bytes, charged prefill s, put seconds
        inserts = inserted = 0  # artifacts and bytes that entered the memory tier
        time.sleep(max(0.0, phase["start_at"] - time.time()))
        while time.time() < phase["stop_at"] and len(rows) < phase["max_requests"]:
            t_req = time.perf_counter()
            rank = cat.draw(rng)
            hit = store.get(cat.key(rank))
            get_s = time.perf_counter() - t_req
            if hit is not None:
                rows.append([rank, hit.tier, get_s, hit.artifact.nbytes, 0.0, 0.0])
            else:
                art = cat.artifact(rank)
                charged = CPU_SMOLLM2_FP32.prefill_s(art.meta.num_tokens)
                time.sleep(charged * opts["prefill_scale"])
                t_put = time.perf_counter()
                store.put(cat.key(rank), art)
                rows.append([rank, "miss", get_s, art.nbytes, charged, time.perf_counter() - t_put])
            if rows[-1][1] != "memory":
                inserts, inserted = inserts + 1, inserted + rows[-1][3]
            time.sleep(max(0.0, opts["request_s"] - (time.perf_counter() - t_req)))
        summary = {"rows": rows, "memory_inserts": inserts, "memory_inserted_bytes": inserted}
        summary |= {"memory_entries": len(memory), "redis_failures": redis_tier.failures, "dropped": drops.count}
        outbox.put(("replica", idx, summary))


def publisher(idx: int, url: str, opts: dict[str, Any], inbox: Any, outbox: Any) -> None:
    """One publisher: walk its share of the ranks in popularity order, publish what the cluster lacks."""
    _worker_setup()
    from kv_rag.cost import CPU_SMOLLM2_FP32
    from kv_rag.store import Store

    outbox.put(("ready", idx, None))
    while (phase := inbox.get()) is not None:
        cat = Catalogue(phase["catalogue"], phase["zipf_s"], opts["lengths"], opts["geometry"])
        tier = shared_tier(url, opts)
        store = Store([tier])
        ranks = list(range(idx, cat.size, opts["publishers"])) or [0]
        rows: list[list[Any]] = []  # rank, seconds since start, put seconds, bytes, charged prefill s
        first_visit: dict[int, float] = {}  # rank -> seconds since the start when first looked at
        skipped = published_before = 0
        time.sleep(max(0.0, phase["start_at"] - time.time()))
        for pos in itertools.count():
            if time.time() >= phase["stop_at"]:
                break
            rank = ranks[pos % len(ranks)]
            if rank == ranks[0]:
                if pos and len(rows) == published_before:
                    time.sleep(0.5)  # a whole pass found everything present: wait instead of spinning
                published_before = len(rows)
            first_visit.setdefault(rank, time.time() - phase["start_at"])
            if cat.key(rank) in tier:
                skipped += 1
                continue
            art = cat.artifact(rank)
            charged = CPU_SMOLLM2_FP32.prefill_s(art.meta.num_tokens)
            time.sleep(charged * opts["prefill_scale"])
            t_put = time.perf_counter()
            store.put(cat.key(rank), art)
            put_s = time.perf_counter() - t_put
            rows.append([rank, time.time() - phase["start_at"], put_s, art.nbytes, charged])
        outbox.put(("publisher", idx, {"rows": rows, "skipped": skipped, "first_visit": first_visit}))


def pct(values: list[float], q: float) -> float | None:
    """The ``q`` quantile (0..1) of ``values`` by nearest rank; ``None`` when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def timing(values: list[float]) -> dict[str, Any]:
    """Count, p50 and p99 (seconds) of ``values``."""
    return {"n": len(values), "p50_s": pct(values, 0.50), "p99_s": pct(values, 0.99)}


def probe(url: str, cat: Catalogue, seconds: float, opts: dict[str, Any]) -> dict[str, Any]:
    """Single-client throughput of the cluster tier on this machine: put, get (bytes, checks, parse)
    and get_bytes (bytes and the manifest's checks only) of the catalogue's longest artifact; and the
    Redis memory it takes (``MEMORY USAGE`` of its manifest and chunks) per byte stored."""
    rank = max(range(len(cat.lengths)), key=cat.tokens)
    art = cat.artifact(rank).sealed()
    tier, key, size = shared_tier(url, opts), art.meta.key, len(art.to_bytes())
    tier.put(key, art)
    man = tier.manifest(key) or {}
    names = [f"{tier.prefix}m:{{{key}}}"] + [f"{tier.prefix}c:{{{key}}}:{man['v']}:{i}" for i in range(man["n"])]
    held = sum(tier.client.memory_usage(name) or 0 for name in names)
    out: dict[str, Any] = {"artifact_tokens": cat.tokens(rank), "artifact_bytes": art.nbytes, "stored_bytes": size}
    out |= {"chunk_bytes": tier.chunk_bytes, "redis_memory_bytes": held, "redis_memory_per_byte": held / size}
    ops: dict[str, Callable[[], object]] = {"put": lambda: tier.put(art.meta.key, art)}
    ops |= {"get": lambda: tier.get(art.meta.key), "get_bytes": lambda: tier.get_bytes(art.meta.key)}
    for name, op in ops.items():
        samples: list[float] = []
        stop = time.perf_counter() + seconds
        while time.perf_counter() < stop or len(samples) < 3:
            t0 = time.perf_counter()
            op()
            samples.append(time.perf_counter() - t0)
        p50 = pct(samples, 0.5) or 0.0
        out[name] = {**timing(samples), "mb_per_s_at_p50": art.nbytes / p50 / 1e6 if p50 else None}
    tier.delete(art.meta.key)
    return out


def redis_nodes(ports: list[int], reset: bool = False) -> list[dict[str, Any]]:
    """Each node's memory, eviction, keyspace, network and CPU counters (``INFO``); with ``reset``, empty
    every node and zero its statistics first."""
    import redis

    names = ["used_memory", "maxmemory", "evicted_keys", "expired_keys", "keyspace_hits", "keyspace_misses"]
    names += ["total_net_input_bytes", "total_net_output_bytes", "used_cpu_sys", "used_cpu_user"]
    out = []
    for port in ports:
        client = redis.Redis(port=port)
        if reset:
            client.flushall()
            client.config_resetstat()
        info = client.info()
        out.append({"port": port, **{k: info.get(k) for k in names}})
    return out


def summarize(
    phase: dict[str, Any], results: list[tuple[str, int, Any]], nodes: list[dict[str, Any]], opts: dict[str, Any]
) -> dict[str, Any]:
    """One phase's figures: hits, bytes and load times per tier, misses, publishers, Redis, pressure."""
    reps = [r for kind, _, r in results if kind == "replica"]
    pubs = [r for kind, _, r in results if kind == "publisher"]
    rows = [row for r in reps for row in r["rows"]]
    n = len(rows)
    dur = phase["stop_at"] - phase["start_at"]
    tiers: dict[str, Any] = {}
    for name in ("memory", "disk", "redis"):
        got = [row for row in rows if row[1] == name]
        if got or name != "disk" or opts["disk_mb"]:
            nbytes = sum(row[3] for row in got)
            tiers[name] = {"hits": len(got), "share": len(got) / n if n else None, "bytes": nbytes}
            tiers[name] |= {"mb_per_s": nbytes / dur / 1e6, **timing([row[2] for row in got])}
    missed = [row for row in rows if row[1] == "miss"]
    published = [row[0] for row in missed] + [row[0] for p in pubs for row in p["rows"]]
    reached_shared = len(missed) + tiers["redis"]["hits"]
    pub_rows = [row for p in pubs for row in p["rows"]]
    visits = sorted(t for p in pubs for t in p["first_visit"].values())
    mem_bytes = opts["memory_mb"] * 2**20 * max(1, len(reps))
    counters = {k: sum(node[k] or 0 for node in nodes) for k in nodes[0] if k != "port"} if nodes else {}
    return {
        "index": phase["index"],
        "zipf_s": phase["zipf_s"],
        "catalogue": phase["catalogue"],
        "catalogue_bytes": Catalogue(phase["catalogue"], 1.0, opts["lengths"], opts["geometry"]).total_bytes(),
        "seconds": dur,
        "requests": n,
        "requests_per_replica": [len(r["rows"]) for r in reps],
        "hit_rate": 1 - len(missed) / n if n else None,
        "shared_hit_rate": tiers["redis"]["hits"] / reached_shared if reached_shared else None,
        "tiers": tiers,
        "misses": {
            "count": len(missed),
            "share": len(missed) / n if n else None,
            "lookup": timing([row[2] for row in missed]),
            "publish": timing([row[5] for row in missed]),
            "bytes_published": sum(row[3] for row in missed),
            "charged_prefill_s": sum(row[4] for row in missed),
            "dropped_partial": sum(r["dropped"] for r in reps),
        },
        # publishes (replicas and publishers) of a document published before in this phase: after an
        # eviction, or two writers racing; the replaced version's chunks stay for RedisTier's grace period
        "republished": len(published) - len(set(published)),
        "memory_tier": {
            "inserts": sum(r["memory_inserts"] for r in reps),
            "inserted_bytes": sum(r["memory_inserted_bytes"] for r in reps),
            "evictions": sum(r["memory_inserts"] - r["memory_entries"] for r in reps),
            "turnovers_per_minute": sum(r["memory_inserted_bytes"] for r in reps) / mem_bytes / dur * 60,
        },
        "publishers": {
            "count": len(pubs),
            "published": len(pub_rows),
            "skipped_present": sum(p["skipped"] for p in pubs),
            "bytes": sum(row[3] for row in pub_rows),
            "artifacts_per_s": len(pub_rows) / dur,
            "mb_per_s": sum(row[3] for row in pub_rows) / dur / 1e6,
            "put": timing([row[2] for row in pub_rows]),
            "ranks_first_visited": len(visits),
            "ranks_per_s_first_pass": len(visits) / visits[-1] if len(visits) > 1 and visits[-1] > 0 else None,
        },
        "redis": {"nodes": nodes, "total": counters, "replica_failures": sum(r["redis_failures"] for r in reps)},
        "loadavg_start": phase["loadavg"],
        "loadavg_end": os.getloadavg(),
    }


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line (``--tiny`` shrinks every bound)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--replicas", type=int, default=4)
    ap.add_argument("--publishers", type=int, default=1)
    ap.add_argument("--zipf", default="0.8,1.2", help="Zipf exponents s, one phase set each (comma-separated)")
    ap.add_argument("--catalogue", default="50,200", help="catalogue sizes (documents), one phase each per s")
    ap.add_argument("--lengths", default="128,512,1024", help="document lengths in tokens (rank modulo their number)")
    ap.add_argument("--phase-s", type=float, default=45.0, help="seconds of requests a phase")
    ap.add_argument("--max-requests", type=int, default=100_000, help="requests a replica a phase, at most")
    ap.add_argument("--memory-mb", type=float, default=256, help="each replica's memory tier")
    ap.add_argument("--disk-mb", type=float, default=0, help="each replica's disk tier (0: none)")
    ap.add_argument("--redis-mb", type=int, default=640, help="maxmemory of each of the 3 nodes (allkeys-lru)")
    ap.add_argument("--chunk-bytes", type=int, default=CHUNK_BYTES, help="RedisTier chunk size (default: its own)")
    ap.add_argument("--prefill-scale", type=float, default=1.0, help="times the measured prefill a miss sleeps")
    ap.add_argument("--request-s", type=float, default=0.1, help="a request's other work (slept), at least")
    ap.add_argument("--probe-s", type=float, default=3.0, help="seconds of each single-client probe")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="result JSON (default: $KV_RAG_HOME/bench/scaling/fleet.json)")
    ap.add_argument("--tiny", action="store_true", help="smoke run: 2 replicas, 1 publisher, one 3 s phase")
    args = ap.parse_args(argv)
    if args.tiny:
        args.replicas, args.publishers, args.zipf, args.catalogue, args.lengths = 2, 1, "1.0", "12", "32,128"
        args.phase_s, args.memory_mb, args.redis_mb, args.probe_s, args.prefill_scale = 3.0, 8, 64, 0.3, 0.2
    return args


def main(argv: list[str] | None = None) -> int:
    """Start the cluster, probe it, run every phase with the same processes, write the result."""
    args = parse(argv)
    from redis_server import redis_binary, start_cluster

    from kv_rag.bench import provenance, results_dir

    binary = redis_binary()
    if binary is None:
        print("fleet: redis-server is not installed", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else results_dir("scaling") / "fleet.json"
    command = "python benchmarks/scaling/fleet.py " + " ".join(argv if argv is not None else sys.argv[1:])
    prov, load_before = provenance(command.strip()), os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="kv-rag-fleet-"))
    geo = geometry()
    lengths = [int(x) for x in args.lengths.split(",")]
    opts: dict[str, Any] = {"geometry": geo, "lengths": lengths, "work": str(work)}
    opts |= {k: getattr(args, k) for k in ("memory_mb", "disk_mb", "prefill_scale", "request_s", "seed", "publishers")}
    opts["chunk_bytes"] = args.chunk_bytes
    grid = [(float(s), int(c)) for s in args.zipf.split(",") for c in args.catalogue.split(",")]
    extra = ("--maxmemory", f"{args.redis_mb}mb", "--maxmemory-policy", "allkeys-lru")
    nodes = start_cluster(binary, work / "redis", 3, extra)
    ports = [node.port for node in nodes]
    url = f"redis+cluster://127.0.0.1:{ports[0]}"
    procs: list[Any] = []
    phases: list[dict[str, Any]] = []
    try:
        probes = probe(url, Catalogue(1, 1.0, opts["lengths"], geo), args.probe_s, opts)
        ctx = mp.get_context("spawn")
        outbox = ctx.Queue()
        inboxes = []
        for role, count in ((replica, args.replicas), (publisher, args.publishers)):
            for i in range(count):
                inboxes.append(ctx.Queue())
                procs.append(ctx.Process(target=role, args=(i, url, opts, inboxes[-1], outbox), daemon=True))
                procs[-1].start()
        for _ in procs:
            outbox.get(timeout=300)
        for index, (s, size) in enumerate(grid):
            before = redis_nodes(ports, reset=True)
            start_at = time.time() + 1.0
            phase = {"index": index, "zipf_s": s, "catalogue": size, "start_at": start_at, "loadavg": os.getloadavg()}
            phase |= {"stop_at": start_at + args.phase_s, "max_requests": args.max_requests}
            for box in inboxes:
                box.put(phase)
            results = [outbox.get(timeout=args.phase_s + 300) for _ in procs]
            after = redis_nodes(ports)
            for node, was in zip(after, before, strict=True):  # CPU seconds are not reset: this phase's
                node |= {k: node[k] - was[k] for k in ("used_cpu_sys", "used_cpu_user")}
            phases.append(summarize(phase, results, after, opts))
            p = phases[-1]
            print(f"s={s} catalogue={size}: {p['requests']} requests, hit rate {p['hit_rate']:.3f} "
                  f"(memory {p['tiers']['memory']['share']:.3f}, redis {p['tiers']['redis']['share']:.3f}), "
                  f"evicted keys {p['redis']['total'].get('evicted_keys')}", flush=True)  # fmt: skip
        for box in inboxes:
            box.put(None)
        for proc in procs:
            proc.join(30)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
        for node in nodes:
            node.stop()
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "provenance": prov,
        "what": "fleet simulation: replicas and publishers on a 3-node loopback Redis Cluster, Zipf requests",
        "config": {k: v for k, v in vars(args).items() if k != "out"} | {"lengths": opts["lengths"]},
        "geometry": geo,
        "kv_bytes_per_token": geo["layers"] * 2 * geo["kv_heads"] * geo["head_dim"] * F32,
        "prefill_charged_from": "kv_rag.cost.CPU_SMOLLM2_FP32 (the current kv-rag bench result, 2-core CPU, fp32)",
        "probes": probes,
        "phases": phases,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "cpus": os.cpu_count(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
