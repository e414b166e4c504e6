"""Extrapolation: from the loopback fleet to thousands of replicas, priced with ``kv-rag cost``.

Three steps, each written into ``--out`` with its inputs:

1. **The hit-rate model, checked against the fleet run** (``--fleet``, a ``fleet.py`` result). Each
   tier is an LRU cache fed by Poisson requests (Che's approximation: a document stays while it was
   asked for within the last ``t_c`` seconds, ``t_c`` being when the documents asked for fill the
   tier), over the run's finite horizon, a replica's memory tier on its own requests, the cluster on
   every replica's memory misses, the publishers storing documents in popularity order at their
   measured pace. The model's shares (memory, Redis, miss) stand beside the measured ones, phase by
   phase (of ``--fleet`` and of each ``--check`` run).
2. **The measured hit rates, priced**: each phase's measured memory, Redis and miss shares applied to a
   document of ``--tokens`` tokens for each model, at each egress price.
3. **Thousands of replicas**: the model in steady state (the shared tier keeps an artifact for
   ``--ttl-h`` hours after its last use, as ``RedisTier`` renews its TTL on every hit), a replica's
   local tier of ``--local-gb``; for each model, Zipf ``s``, egress price and fleet size, the fleet's
   cost an hour with and without the shared store (the store's memory at ``--ram-usd-gb-h``), the
   fleet size from which the shared store pays, and the store nodes the bandwidth and the memory need
   (what breaks first).

Costs per event come from :func:`kv_rag.cost.costs`, the function behind ``kv-rag cost`` (checked
against the command's ``--json`` output for its two built-in profiles): a prefill; a local hit (load
at the profile's own speed); a shared hit (egress for the artifact's bytes plus its load over a
``--nic-gbit`` link); a miss with a shared store (a prefill plus the egress of publishing it).
Profiles: the embedded model on the 2-core CPU (measured), a Qwen3-4B-shaped model on an H200
(measured), and a 70B-shaped model (estimated: the Qwen3-4B fit scaled by the FLOPs of a Llama-3-70B
layer stack, KV of 80 layers x 8 KV heads x 128 in bf16).

    python benchmarks/scaling/extrapolate.py --fleet benchmarks/scaling/results/DATE-fleet.json \
        [--check OTHER-fleet.json ...] --out OUT.json
    python benchmarks/scaling/extrapolate.py --tiny --out /tmp/extrapolate.json   # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import io
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
from redis.crc import key_slot

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))

from catalogue import Catalogue  # noqa: E402

from kv_rag import cost  # noqa: E402
from kv_rag.bench import provenance, results_dir  # noqa: E402

#: Nodes of the fleet run's cluster (fleet.py starts three, each serving a third of the hash slots)
NODES = 3
#: Llama-3-70B against Qwen3-4B: weights that every token multiplies (68.4e9 / 3.63e9, embeddings left
#: out) and attention width over the stack (80 layers x 64 heads x 128 / 36 x 32 x 128)
LINEAR_RATIO, ATTENTION_RATIO = 68.4e9 / 3.63e9, (80 * 64 * 128) / (36 * 32 * 128)
H200_70B_LIKE = dataclasses.replace(
    cost.H200_QWEN3_4B,
    name="h200-70b-like-bf16 (estimated)",
    prefill_a=cost.H200_QWEN3_4B.prefill_a * LINEAR_RATIO,
    prefill_b=cost.H200_QWEN3_4B.prefill_b * ATTENTION_RATIO,
    kv_bytes_per_token=80 * 2 * 8 * 128 * 2,
    load_overhead_s=cost.H200_QWEN3_4B.load_overhead_s * 80 / 36,
    source="estimated: the H200 Qwen3-4B fit scaled by a Llama-3-70B stack's FLOPs (GPU-seconds, any number of GPUs)",
)
#: (profile, USD an hour of the machine it runs on, measured or estimated)
MODELS = [
    (cost.CPU_SMOLLM2_FP32, cost.DEFAULT_CPU_HOUR_USD, "measured (kv-rag bench, 2-core CPU)"),
    (cost.H200_QWEN3_4B, cost.DEFAULT_GPU_HOUR_USD, "measured (H200, DESIGN.md)"),
    (H200_70B_LIKE, cost.DEFAULT_GPU_HOUR_USD, "estimated (scaled from the Qwen3-4B fit)"),
]


# ----------------------------------------------------------------------------- the hit-rate model
def che_time(rates: np.ndarray, sizes: np.ndarray, capacity: float, horizon: float = math.inf) -> float:
    """Che's characteristic time: the ``t`` at which the documents asked for within the last ``t`` seconds
    fill ``capacity`` bytes; ``inf`` when they never do (within ``horizon``)."""
    limit = horizon if math.isfinite(horizon) else 1e12
    if float(np.sum(sizes * -np.expm1(-rates * limit))) <= capacity:
        return math.inf
    lo, hi = 0.0, limit
    for _ in range(100):
        mid = math.sqrt(lo * hi) if lo > 0 else hi / 1e6  # bisection in log space
        lo, hi = (mid, hi) if float(np.sum(sizes * -np.expm1(-rates * mid))) < capacity else (lo, mid)
        if hi - lo <= 1e-7 * hi:
            break
    return hi


def lru_hits(
    rates: np.ndarray,
    sizes: np.ndarray,
    capacity: float,
    horizon: float,
    published_at: np.ndarray | None = None,
    ttl: float = math.inf,
) -> np.ndarray:
    """Expected hits of each document in an LRU tier that starts empty, over ``horizon`` seconds.

    A document's first request misses unless a publisher stored it before (``published_at``, seconds
    after the start); each later request hits when the one before it came less than
    ``min(t_c, ttl)`` ago (exponential gaps). With ``horizon=inf``: the hit ratio per request in
    steady state instead.
    """
    t = min(ttl, che_time(rates, sizes, capacity, horizon))
    stay = np.exp(-rates * t) if math.isfinite(t) else np.zeros_like(rates)  # P(the gap outlives the entry)
    if not math.isfinite(horizon):
        return 1.0 - stay
    n = rates * horizon
    anyone = -np.expm1(-n)
    first = anyone if published_at is None else -np.expm1(-rates * np.minimum(published_at, horizon))
    return n - first - (n - anyone) * stay


def predict_phase(fleet: dict[str, Any], phase: dict[str, Any]) -> dict[str, float]:
    """The model's local (memory and disk), Redis and miss shares for one measured phase (same catalogue,
    rates, sizes)."""
    cfg = fleet["config"]
    cat = Catalogue(phase["catalogue"], phase["zipf_s"], cfg["lengths"], fleet["geometry"])
    p = np.array(cat.probabilities())
    sizes = np.array([cat.nbytes(k) for k in range(cat.size)], dtype=float)
    replicas, horizon = len(phase["requests_per_replica"]), phase["seconds"]
    q = phase["requests"] / replicas / horizon  # each replica's measured request rate
    local_mb = max(cfg["memory_mb"], cfg["disk_mb"])
    local = lru_hits(q * p, sizes, local_mb * 2**20, horizon) / np.maximum(q * p * horizon, 1e-300)
    # each node is an LRU of its own over the documents whose hash slot it serves (a third of the slots
    # each), with room for maxmemory over what Redis spends per byte stored (measured by the probe)
    room = cfg["redis_mb"] * 2**20 / fleet["probes"]["redis_memory_per_byte"]
    node = np.array([min(key_slot(cat.key(k).encode()) // (16384 // NODES), NODES - 1) for k in range(cat.size)])
    pace = phase["publishers"]["ranks_per_s_first_pass"]
    visited = phase["publishers"]["ranks_first_visited"]
    at = np.array([k / pace if pace and k < visited else math.inf for k in range(cat.size)])
    rates, shared = replicas * q * p * (1 - local), np.zeros(cat.size)
    for n in range(NODES):
        on = node == n
        shared[on] = lru_hits(rates[on], sizes[on], room, horizon, published_at=at[on])
    total = replicas * q * horizon
    mem = float(np.sum(replicas * q * horizon * p * local)) / total
    red = float(np.sum(shared)) / total
    return {"local": mem, "redis": red, "miss": 1 - mem - red}


def redis_gb_per_cpu_s(phase: dict[str, Any]) -> float:
    """GB in and out of the cluster per CPU-second its nodes spent, in one measured phase: what one
    single-threaded Redis node moves while its thread is busy."""
    t = phase["redis"]["total"]
    return (t["total_net_input_bytes"] + t["total_net_output_bytes"]) / 1e9 / (t["used_cpu_sys"] + t["used_cpu_user"])


def validate(fleet: dict[str, Any]) -> list[dict[str, Any]]:
    """Measured against modelled shares (local tiers, Redis, misses), phase by phase."""
    rows = []
    for ph in fleet["phases"]:
        local = sum(ph["tiers"][t]["share"] for t in ("memory", "disk") if t in ph["tiers"])
        measured = {"local": local, "redis": ph["tiers"]["redis"]["share"]}
        measured["miss"] = ph["misses"]["share"]
        rows.append(
            {"zipf_s": ph["zipf_s"], "catalogue": ph["catalogue"], "requests": ph["requests"], "measured": measured}
            | {"model": predict_phase(fleet, ph), "redis_evicted_keys": ph["redis"]["total"].get("evicted_keys")}
        )
    return rows


# ----------------------------------------------------------------------------- prices
def per_event(profile: cost.Profile, tokens: int, hour: float, egress: float, nic_gbit: float) -> dict[str, float]:
    """USD of a prefill, a local hit, a shared hit and a miss that publishes, from :func:`kv_rag.cost.costs`."""
    remote = dataclasses.replace(profile, load_bytes_per_s=min(profile.load_bytes_per_s, nic_gbit * 1e9 / 8))

    def usd(prof: cost.Profile, reuses: int, way: str) -> float:
        return float(getattr(cost.costs(prof, tokens, reuses, hour_usd=hour, egress_usd_per_gb=egress), way))

    return {
        "prefill": usd(profile, 1, "reprefill_usd"),
        "local_hit": usd(profile, 1, "ship_artifact_usd") - usd(profile, 0, "ship_artifact_usd"),
        "shared_hit": usd(remote, 1, "hosted_store_usd") - usd(remote, 0, "hosted_store_usd"),
        "miss_publish": usd(profile, 0, "ship_artifact_usd"),
        "prefill_s": profile.prefill_s(tokens),
        "remote_load_s": remote.load_s(tokens),
        "gb": profile.kv_bytes(tokens) / 1e9,
    }


def cli_check(tokens: int, egress: float) -> dict[str, Any]:
    """``kv-rag cost --json`` for 1 and 0 reuses against :func:`per_event` (its two built-in profiles)."""
    from kv_rag.cli import main as kv_rag_main

    outs = []
    for reuses in (1, 0):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            kv_rag_main(["cost", "--tokens", str(tokens), "--reuses", str(reuses), "--egress", str(egress), "--json"])
        outs.append(json.loads(buf.getvalue()))
    rows = []
    for one, zero in zip(*outs, strict=True):
        prof = next(m for m in MODELS if m[0].name == one["profile"])[0]
        mine = per_event(prof, tokens, one["hour_usd"], egress, math.inf)
        cli = {"prefill": one["reprefill_usd"], "shared_hit": one["hosted_store_usd"] - zero["hosted_store_usd"]}
        same = all(math.isclose(cli[k], mine[k], rel_tol=1e-9) for k in cli)
        rows.append({"profile": one["profile"], "kv_rag_cost": cli, "here": {k: mine[k] for k in cli}, "equal": same})
    return {"command": f"kv-rag cost --tokens {tokens} --reuses 1|0 --egress {egress} --json", "rows": rows}


def price_measured(fleet: dict[str, Any], tokens: int, egresses: list[float], nic: float) -> list[dict[str, Any]]:
    """Each phase's measured shares priced per 1,000 requests, with and without the shared store."""
    rows = []
    for ph in fleet["phases"]:
        f_loc = sum(ph["tiers"][t]["share"] for t in ("memory", "disk") if t in ph["tiers"])
        f_sh, f_miss = ph["tiers"]["redis"]["share"], ph["misses"]["share"]
        for prof, hour, _ in MODELS:
            for egress in egresses:
                e = per_event(prof, tokens, hour, egress, nic)
                base = 1000 * (f_loc * e["local_hit"] + (1 - f_loc) * e["prefill"])
                with_store = 1000 * (f_loc * e["local_hit"] + f_sh * e["shared_hit"] + f_miss * e["miss_publish"])
                rows.append(
                    {"zipf_s": ph["zipf_s"], "catalogue": ph["catalogue"], "model": prof.name, "egress": egress}
                    | {"usd_per_1000_without": base, "usd_per_1000_with": with_store, "pays": with_store < base}
                )
    return rows


# ----------------------------------------------------------------------------- thousands of replicas
@dataclasses.dataclass(frozen=True)
class Settings:
    """The assumptions at scale (the command line's; hashable, so that shares are computed once)."""

    tokens: int
    catalogue: int
    rate: float
    local_gb: float
    ttl_h: float
    store_gb: float | None
    ram_usd_gb_h: float
    nic_gbit: float
    node_ram_gb: float
    redis_gb_s: float | None


@functools.cache
def steady_shares(size: float, s: float, replicas: int, min_rate: float, a: Settings) -> tuple[float, ...]:
    """Steady-state shares of requests served by the local tier, by the shared tier, and by a prefill that
    publishes (a miss of a document the store keeps), and the GB the shared tier holds, for documents of
    ``size`` bytes; the store keeps only documents asked of it at least ``min_rate`` times a second (0:
    every one, for the TTL)."""
    p = np.array(Catalogue(a.catalogue, s, [1], {"layers": 1, "kv_heads": 1, "head_dim": 1}).probabilities())
    sizes = np.full(p.shape, size)
    local = lru_hits(a.rate * p, sizes, a.local_gb * 1e9, math.inf)
    rates = replicas * a.rate * p * (1 - local)
    kept = rates >= min_rate
    cap = math.inf if a.store_gb is None else a.store_gb * 1e9
    shared = np.zeros_like(p)
    if kept.any():
        shared[kept] = lru_hits(rates[kept], sizes[kept], cap, math.inf, ttl=a.ttl_h * 3600)
    f_loc, f_sh = float(np.sum(p * local)), float(np.sum(p * (1 - local) * shared))
    f_pub = float(np.sum((p * (1 - local) * (1 - shared))[kept]))
    held_gb = min(float(np.sum(sizes * shared)), cap) / 1e9  # a document is held while asked for within the TTL
    return f_loc, f_sh, f_pub, held_gb


#: what the shared tier keeps: every artifact until its TTL runs out, or only those asked for often
#: enough that their hits pay for the memory they take
POLICIES = ("keep-all", "keep-paying")


def at_scale(
    prof: cost.Profile, hour: float, s: float, egress: float, replicas: int, policy: str, a: Settings
) -> dict[str, Any]:
    """Steady state of a fleet of ``replicas``: tier shares, cost an hour with and without the store, limits."""
    size = prof.kv_bytes(a.tokens)
    e = per_event(prof, a.tokens, hour, egress, a.nic_gbit)
    margin = e["prefill"] - e["shared_hit"]  # what a shared hit saves
    rent = size / 1e9 * a.ram_usd_gb_h / 3600  # what keeping the artifact costs a second
    min_rate = 0.0 if policy == "keep-all" else (rent / margin if margin > 0 else math.inf)
    f_loc, f_sh, f_pub, held_gb = steady_shares(size, s, replicas, min_rate, a)
    f_miss = max(0.0, 1 - f_loc - f_sh)
    per_h = replicas * a.rate * 3600
    without = per_h * (f_loc * e["local_hit"] + (1 - f_loc) * e["prefill"])
    store_usd = held_gb * a.ram_usd_gb_h
    # every miss is a prefill; a miss of a document the store keeps is published too (egress)
    with_store = per_h * (f_loc * e["local_hit"] + f_sh * e["shared_hit"] + f_miss * e["prefill"]) + store_usd
    writes = replicas * a.rate * f_pub
    with_store += writes * 3600 * (e["miss_publish"] - e["prefill"])
    read, write = replicas * a.rate * f_sh * size / 1e9, writes * size / 1e9
    need = {
        "bandwidth": (read + write) / (a.nic_gbit / 8),
        "memory": held_gb / a.node_ram_gb,
        "redis_thread": (read + write) / (a.redis_gb_s or math.inf),
    }
    return {
        "model": prof.name,
        "zipf_s": s,
        "egress": egress,
        "replicas": replicas,
        "policy": policy,
        "keep_if_asked_per_hour": min_rate * 3600,
        "shares": {"local": f_loc, "shared": f_sh, "miss": f_miss},
        "usd_per_h_without": without,
        "usd_per_h_with": with_store,
        "store_memory_usd_per_h": store_usd,
        "saving_usd_per_h": without - with_store,
        "pays": with_store < without,
        "store_gb": held_gb,
        "read_gb_s": read,
        "write_gb_s": write,
        "publishes_per_s": writes,
        "replica_link_share": a.rate * f_sh * size / 1e9 / (a.nic_gbit / 8),
        "nodes_needed": {k: math.ceil(v) for k, v in need.items()},
        "breaks_first": max(need, key=lambda k: need[k]) if any(need.values()) else None,
    }


def break_even(prof: cost.Profile, hour: float, s: float, egress: float, policy: str, a: Settings) -> int | None:
    """The fewest replicas (powers of 2 up to 2**20) from which the shared store pays; ``None``: none do."""
    for k in range(21):
        if at_scale(prof, hour, s, egress, 2**k, policy, a)["pays"]:
            return 2**k
    return None


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line; every assumption is an option (``--tiny`` shrinks the sweep)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fleet", help="a fleet.py result to check the model against and price (default: none)")
    ap.add_argument("--check", action="append", default=[], help="another fleet.py result to check the model against")
    ap.add_argument("--tokens", type=int, default=4096, help="document length at scale")
    ap.add_argument("--catalogue", type=int, default=100_000, help="documents at scale")
    ap.add_argument("--zipf", default="0.8,1.2", help="Zipf exponents at scale (the fleet run's)")
    ap.add_argument("--replicas", default="10,100,1000,5000", help="fleet sizes")
    ap.add_argument("--egress", default="0,0.01,0.02,0.09", help="USD per GB moved to or from the store")
    ap.add_argument("--rate", type=float, default=1.0, help="requests a second a replica")
    ap.add_argument("--local-gb", type=float, default=16.0, help="each replica's local (memory) tier")
    ap.add_argument("--ttl-h", type=float, default=24.0, help="hours the store keeps an artifact after its last use")
    ap.add_argument("--store-gb", type=float, default=None, help="the store's memory (default: whatever the TTL holds)")
    ap.add_argument("--ram-usd-gb-h", type=float, default=0.01, help="USD per GB-hour of the store's memory")
    ap.add_argument("--nic-gbit", type=float, default=100.0, help="link of a replica and of a store node, Gbit/s")
    ap.add_argument("--node-ram-gb", type=float, default=256.0, help="memory of one store node")
    ap.add_argument(
        "--redis-gb-s", type=float, default=None, help="GB/s one Redis node moves (default: --fleet's, per CPU-second)"
    )
    ap.add_argument("--out", default=None, help="result JSON (default: $KV_RAG_HOME/bench/scaling/extrapolate.json)")
    ap.add_argument("--tiny", action="store_true", help="smoke run: a 2,000-document catalogue, two fleet sizes")
    args = ap.parse_args(argv)
    if args.tiny:
        args.catalogue, args.replicas, args.egress, args.zipf = 2000, "10,1000", "0,0.09", "1.0"
    return args


def main(argv: list[str] | None = None) -> int:
    """Check the model, price the measured shares, extrapolate; write ``--out`` and print a summary."""
    args = parse(argv)
    command = "python benchmarks/scaling/extrapolate.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out) if args.out else results_dir("scaling") / "extrapolate.json"
    fleet = json.loads(Path(args.fleet).read_text()) if args.fleet else None
    if args.redis_gb_s is None and fleet is not None:
        args.redis_gb_s = statistics.median(redis_gb_per_cpu_s(ph) for ph in fleet["phases"])
    egresses = [float(x) for x in args.egress.split(",")]
    zipfs = [float(x) for x in args.zipf.split(",")]
    fleets = [int(x) for x in args.replicas.split(",")]
    st = Settings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)})
    result: dict[str, Any] = {"provenance": provenance(command.strip()), "fleet": args.fleet}
    result["assumptions"] = {k: v for k, v in vars(args).items() if k not in ("out", "fleet", "check", "tiny")}
    result["models"] = [{**prof.to_dict(), "hour_usd": hour, "figures": how} for prof, hour, how in MODELS]
    result["kv_rag_cost_check"] = cli_check(args.tokens, egresses[-1])
    result["per_event"] = [
        {"model": prof.name, "egress": egress, **per_event(prof, args.tokens, hour, egress, args.nic_gbit)}
        for prof, hour, _ in MODELS
        for egress in egresses
    ]
    result["load_vs_prefill"] = [
        {"model": prof.name, "nic_gbit": nic, **per_event(prof, args.tokens, hour, 0.0, nic)}
        for prof, hour, _ in MODELS
        for nic in (25.0, 100.0, 400.0)
    ]
    if fleet is not None:
        result["validation"] = [{"fleet": args.fleet, **row} for row in validate(fleet)]
        result["validation"] += [
            {"fleet": other, **row} for other in args.check for row in validate(json.loads(Path(other).read_text()))
        ]
        result["measured_priced"] = price_measured(fleet, args.tokens, egresses, args.nic_gbit)
    combos = [
        (prof, hour, s, egress, pol)
        for prof, hour, _ in MODELS
        for s in zipfs
        for egress in egresses
        for pol in POLICIES
    ]
    result["at_scale"] = [
        at_scale(prof, hour, s, egress, n, pol, st) for prof, hour, s, egress, pol in combos for n in fleets
    ]
    result["break_even_replicas"] = [
        {"model": prof.name, "zipf_s": s, "egress": egress, "policy": pol}
        | {"replicas": break_even(prof, hour, s, egress, pol, st)}
        for prof, hour, s, egress, pol in combos
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    for row in result.get("validation", []):
        m, d = row["measured"], row["model"]
        shares = "/".join(f"{m[k]:.3f}" for k in m), "/".join(f"{d[k]:.3f}" for k in d)
        where = f"{Path(row['fleet']).name}, s={row['zipf_s']} catalogue={row['catalogue']}"
        print(f"{where}: local/redis/miss measured {shares[0]}, model {shares[1]}")
    for row in result["break_even_replicas"]:
        where = f"{row['model']}, s={row['zipf_s']}, egress ${row['egress']}/GB, {row['policy']}"
        print(f"{where}: pays from {row['replicas']} replicas")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
