"""Verify benchmark: cost of `kv-rag verify` versus a full prefill, and detection rates of tampered spans.

Run: .venv/bin/python benchmarks/verify/verify_bench.py [--tokens 1024] [--trials 200] [--out PATH]
     .venv/bin/python benchmarks/verify/verify_bench.py --tiny --out DIR/verify.json   # smoke run

Writes ``--out`` (default: ``$KV_RAG_HOME/bench/verify/verify_bench.json``, never into the checkout).
A benchmark, not a test: timings depend on the load, which is recorded. Detection rates are measured
on the embedded model (one layer scaled by 1.1 on one span; a dishonest publisher re-seals the
checksum) and compared with the documented bound.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

from kv_rag import Artifact, Engine
from kv_rag.bench import document_of_length, provenance, results_dir
from kv_rag.verify import detection_probability, verify_artifact


def resealed(art: Artifact, keys: Any, values: Any) -> Artifact:
    """``art`` with other KV, re-sealed (a dishonest publisher fixes the checksum)."""
    meta = dataclasses.replace(art.meta, checksum="")
    return dataclasses.replace(art, keys=tuple(keys), values=tuple(values), meta=meta).sealed()


def kinds(art: Artifact, rng: random.Random) -> dict[str, Artifact]:
    """One forgery of each kind the issue names, at a random place."""
    import torch

    n, mid = art.meta.num_tokens, art.num_layers // 2
    i, j = rng.sample(range(n), 2)
    swap = [t.clone() for t in art.keys], [t.clone() for t in art.values]
    for ts in swap:
        for t in ts:
            t[:, [i, j]] = t[:, [j, i]]  # two tokens' KV exchanged in every layer
    layer = list(art.keys), list(art.values)
    layer[1][mid] = layer[1][mid] * 1.1  # one layer's values, every token
    head = list(art.keys), [t.clone() for t in art.values]
    head[1][mid][rng.randrange(head[1][mid].shape[0])] *= 1.1  # one KV head of one layer, every token
    scaled = [t * 1.01 for t in art.keys], [t * 1.01 for t in art.values]
    gen = torch.Generator().manual_seed(rng.randrange(1 << 30))
    noise = (
        [torch.randn(t.shape, generator=gen) * t.std() for t in art.keys],
        [torch.randn(t.shape, generator=gen) * t.std() for t in art.values],
    )  # KV of the right shape and scale from elsewhere (another model's), under this model's name
    return {
        "two tokens' KV swapped (all layers)": resealed(art, *swap),
        "one layer's values x1.1 (middle layer, all tokens)": resealed(art, *layer),
        "one KV head x1.1 (middle layer, all tokens)": resealed(art, *head),
        "all keys and values x1.01": resealed(art, *scaled),
        "another model's KV (same shapes and scale)": resealed(art, *noise),
    }


def tamper(art: Artifact, layer: int, start: int, length: int, scale: float) -> Artifact:
    vals = list(art.values)
    t = vals[layer].clone()
    t[:, start : start + length] *= scale
    vals[layer] = t
    return dataclasses.replace(art, values=tuple(vals), meta=dataclasses.replace(art.meta, checksum="")).sealed()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--trials", type=int, default=60)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--out", default=str(results_dir("verify") / "verify_bench.json"))
    ap.add_argument("--tiny", action="store_true", help="smoke run: a 96-token document, 2 trials")
    args = ap.parse_args()
    if args.tiny:
        args.tokens, args.trials = 96, 2
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    prov = provenance()
    load_before = os.getloadavg()
    engine = Engine(None, store="memory", device="cpu", dtype="float32")
    doc = document_of_length(engine.tokenizer, args.tokens)
    t0 = time.perf_counter()
    key = engine.publish([doc])[0].key
    prefill_s = time.perf_counter() - t0
    hit = engine.store.get(key)
    assert hit is not None
    art = hit.artifact
    cost = []
    for fraction in (0.05, 0.1, 0.25):
        times = [verify_artifact(engine, art, fraction=fraction, seed=s).seconds for s in range(3)]
        rep = verify_artifact(engine, art, fraction=fraction, seed=0)
        cost.append(
            {
                "fraction": fraction,
                "windows_checked": rep.windows_checked,
                "windows_total": rep.windows_total,
                "cost_fraction_tokens": rep.cost_fraction,
                "verify_s_median": statistics.median(times),
                "verify_over_prefill_time": statistics.median(times) / prefill_s,
                "honest_ok": rep.ok,
                "max_rel_diff_honest": max(c.rel_diff for c in rep.windows),
                "bound_16": detection_probability(args.tokens, 16, rep.windows_checked, 16),
                "bound_64": detection_probability(args.tokens, 16, rep.windows_checked, 64),
                "bound_256": detection_probability(args.tokens, 16, rep.windows_checked, 256),
            }
        )
    from kv_rag.spotcheck import first_layer_problem

    t0 = time.perf_counter()
    for _ in range(5):
        first_layer_problem(engine.loaded, art)
    first_layer_s = (time.perf_counter() - t0) / 5
    rng = random.Random(0)
    by_kind: dict[str, dict[str, Any]] = {}
    for trial in range(max(1, args.trials // 4)):
        for name, bad in kinds(art, rng).items():
            row = by_kind.setdefault(
                name, {"kind": name, "fraction": 0.1, "trials": 0, "caught": 0, "by_first_layer": 0}
            )
            rep = verify_artifact(engine, bad, fraction=0.1, seed=trial)
            row["trials"] += 1
            row["caught"] += not rep.ok
            row["by_first_layer"] += rep.reason.startswith("first layer:")
    for row in by_kind.values():
        row["caught_rate"] = row["caught"] / row["trials"]
    detect = []
    last = art.num_layers - 1
    for layer, span in ((last, 16), (last, 64), (min(10, last), 16)):
        caught = 0
        for trial in range(args.trials):
            start = rng.randrange(0, art.meta.num_tokens - span + 1)
            caught += not verify_artifact(engine, tamper(art, layer, start, span, 1.1), fraction=0.1, seed=trial).ok
        n_win = -(-art.meta.num_tokens // 16)
        k = max(1, -(-n_win // 10))
        detect.append(
            {
                "layer": layer,
                "span_tokens": span,
                "scale": 1.1,
                "fraction": 0.1,
                "trials": args.trials,
                "caught_rate": caught / args.trials,
                "bound": detection_probability(art.meta.num_tokens, 16, k, span),
            }
        )
    result = {
        "provenance": prov,
        "model": engine.model_name,
        "document_tokens": art.meta.num_tokens,
        "context_tokens": art.meta.start,
        "full_prefill_s": prefill_s,
        "cost": cost,
        "first_layer_check_s": first_layer_s,
        "first_layer_check_over_prefill_time": first_layer_s / prefill_s,
        "kinds": list(by_kind.values()),
        "detection": detect,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
