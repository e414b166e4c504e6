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
import bisect
import hashlib
import itertools
import json
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

#: SmolLM2-135M's KV geometry, used when the embedded model's config.json cannot be read
SMOLLM2 = {"layers": 30, "kv_heads": 3, "head_dim": 64}
F32 = I32 = 4  # bytes of a float32 value, of an int32 token id


def geometry() -> dict[str, Any]:
    """The embedded model's KV geometry (layers, KV heads, head size) and where it was read."""
    try:
        from kv_rag.models import embedded_model_path

        cfg = json.loads((embedded_model_path() / "config.json").read_text())
        head = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        layers, heads = int(cfg["num_hidden_layers"]), int(cfg["num_key_value_heads"])
        return {"layers": layers, "kv_heads": heads, "head_dim": int(head), "source": "embedded model config.json"}
    except Exception as exc:  # no embedded model here: its published shape
        return {**SMOLLM2, "source": f"built-in SmolLM2-135M shape ({type(exc).__name__})"}


class Catalogue:
    """``size`` documents ranked by popularity: Zipf weights, keys, lengths, artifacts of random KV.

    Documents of one length share their tensors (made once a process): only the key, token ids and
    metadata differ, which is all the store looks at.
    """

    def __init__(self, size: int, s: float, lengths: list[int], geo: dict[str, Any]) -> None:
        self.size, self.s, self.lengths, self.geo = size, s, lengths, geo
        weights = [1.0 / (k + 1) ** s for k in range(size)]
        self.cum = list(itertools.accumulate(weights))
        self.templates: dict[int, Any] = {}  # length -> (keys, values), made on first use

    def draw(self, rng: random.Random) -> int:
        """A rank drawn from the Zipf popularity."""
        return min(bisect.bisect(self.cum, rng.random() * self.cum[-1]), self.size - 1)

    @staticmethod
    def key(rank: int) -> str:
        """The store key of the document of ``rank`` (sha256 hex, like a real key)."""
        return hashlib.sha256(f"kv-rag fleet document {rank}".encode()).hexdigest()

    def tokens(self, rank: int) -> int:
        """The document's length in tokens."""
        return self.lengths[rank % len(self.lengths)]

    def nbytes(self, rank: int) -> int:
        """Bytes of the document's artifact tensors (KV and token ids)."""
        g, n = self.geo, self.tokens(rank)
        return n * (g["layers"] * 2 * g["kv_heads"] * g["head_dim"] * F32 + I32)

    def total_bytes(self) -> int:
        """Bytes of every document's artifact tensors."""
        return sum(self.nbytes(k) for k in range(self.size))

    def artifact(self, rank: int) -> Any:
        """The document's artifact (unsealed: ``Store.put`` seals it, as when an engine publishes)."""
        import torch

        from kv_rag import Artifact, ArtifactMeta

        n, g = self.tokens(rank), self.geo
        if n not in self.templates:
            gen = torch.Generator().manual_seed(n)
            shape = (g["kv_heads"], n, g["head_dim"])
            self.templates[n] = [tuple(torch.randn(shape, generator=gen) for _ in range(g["layers"])) for _ in "kv"]
        keys, values = self.templates[n]
        meta = ArtifactMeta(
            key=self.key(rank),
            model_digest="fleet-simulation",
            tokenizer_digest="fleet-simulation",
            tokens_digest=hashlib.sha256(str(rank).encode()).hexdigest(),
            num_tokens=n,
            start=0,
            parent="",
            dtype="torch.float32",
            model={"architecture": "LlamaForCausalLM", **{k: g[k] for k in SMOLLM2}},
            rope={"rope_type": "default"},
            source=f"fleet document {rank}",
        )
        return Artifact(keys, values, torch.arange(n, dtype=torch.int32), meta)


def _worker_setup() -> None:
    warnings.simplefilter("ignore")  # a Redis eviction warns once per dropped artifact: counted, not printed
    import torch

    torch.set_num_threads(1)


def replica(idx: int, url: str, opts: dict[str, Any], inbox: Any, outbox: Any) -> None:
    """One consumer replica: serve Zipf-drawn requests phase after phase; one result a phase."""
    _worker_setup()
    from kv_rag.cost import CPU_SMOLLM2_FP32
    from kv_rag.store import DiskTier, MemoryTier, RedisTier, Store, Tier

    outbox.put(("ready", idx, None))
    while (phase := inbox.get()) is not None:
        cat = Catalogue(phase["catalogue"], phase["zipf_s"], opts["lengths"], opts["geometry"])
        memory = MemoryTier(int(opts["memory_mb"] * 2**20))
        tiers: list[Tier] = [memory]
        if opts["disk_mb"]:
            folder = Path(opts["work"]) / f"replica{idx}-phase{phase['index']}"
            tiers.append(DiskTier(folder, size_limit=int(opts["disk_mb"] * 2**20)))
        redis_tier = RedisTier(url, timeout_s=5.0, retry_s=1.0)
        store = Store([*tiers, redis_tier])
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
        summary |= {"memory_entries": len(memory), "redis_failures": redis_tier.failures}
        outbox.put(("replica", idx, summary))


def publisher(idx: int, url: str, opts: dict[str, Any], inbox: Any, outbox: Any) -> None:
    """One publisher: walk its share of the ranks in popularity order, publish what the cluster lacks."""
    _worker_setup()
    from kv_rag.cost import CPU_SMOLLM2_FP32
    from kv_rag.store import RedisTier, Store

    outbox.put(("ready", idx, None))
    while (phase := inbox.get()) is not None:
        cat = Catalogue(phase["catalogue"], phase["zipf_s"], opts["lengths"], opts["geometry"])
        tier = RedisTier(url, timeout_s=5.0, retry_s=1.0)
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


def probe(url: str, cat: Catalogue, seconds: float) -> dict[str, Any]:
    """Single-client throughput of the cluster tier on this machine: put, get (bytes, checks, parse)
    and get_bytes (bytes and the manifest's checks only) of the catalogue's longest artifact."""
    from kv_rag.store import RedisTier

    rank = max(range(len(cat.lengths)), key=cat.tokens)
    art = cat.artifact(rank).sealed()
    tier = RedisTier(url, timeout_s=5.0)
    out: dict[str, Any] = {"artifact_tokens": cat.tokens(rank), "artifact_bytes": art.nbytes}
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
        },
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
    grid = [(float(s), int(c)) for s in args.zipf.split(",") for c in args.catalogue.split(",")]
    extra = ("--maxmemory", f"{args.redis_mb}mb", "--maxmemory-policy", "allkeys-lru")
    nodes = start_cluster(binary, work / "redis", 3, extra)
    ports = [node.port for node in nodes]
    url = f"redis+cluster://127.0.0.1:{ports[0]}"
    procs: list[Any] = []
    phases: list[dict[str, Any]] = []
    try:
        probes = probe(url, Catalogue(1, 1.0, opts["lengths"], geo), args.probe_s)
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
            redis_nodes(ports, reset=True)
            start_at = time.time() + 1.0
            phase = {"index": index, "zipf_s": s, "catalogue": size, "start_at": start_at, "loadavg": os.getloadavg()}
            phase |= {"stop_at": start_at + args.phase_s, "max_requests": args.max_requests}
            for box in inboxes:
                box.put(phase)
            results = [outbox.get(timeout=args.phase_s + 300) for _ in procs]
            phases.append(summarize(phase, results, redis_nodes(ports), opts))
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
