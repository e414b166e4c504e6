"""Signing benchmark: what a trust check costs against loading the artifact from the disk tier.

Run: .venv/bin/python benchmarks/signing/sign_bench.py [--tokens 4096] [--repeats 7] [--out PATH]
     .venv/bin/python benchmarks/signing/sign_bench.py --tiny --out DIR/sign.json   # smoke run

A publisher engine (embedded model, float32, CPU) signs and publishes one document into a disk-only
store. Then, alternating, with and without ``TrustPolicy`` required: the load of the document's
artifact from the disk tier (``Store.get`` into a fresh memory tier, the file in the page cache, and
again after ``posix_fadvise(DONTNEED)``; with trust the disk tier hashes the bytes in a second thread
while it reads them, and skips the checksum pass), the digest of the stored bytes alone (BLAKE3, the
CPU time the check adds), the check from tensors (``TrustPolicy.check``: serialize, digest, one
Ed25519 verification), the check of an in-process copy (signature only), signing, and the user's
path: TTFT of ``Engine.generate`` on a fresh engine whose memory tier is empty.
Writes ``--out`` (default: ``$KV_RAG_HOME/bench/signing/sign_bench.json``, never into the checkout).
A benchmark, not a test: timings depend on the load, which is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kv_rag import Engine, SigningKey, TrustPolicy
from kv_rag.bench import document_of_length, drop_page_cache, provenance, results_dir
from kv_rag.digest import of_bytes
from kv_rag.store import DiskTier, MemoryTier, Store


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--tmp-dir", help="folder on the disk to measure (default: the system temp folder)")
    ap.add_argument("--out", default=str(results_dir("signing") / "sign_bench.json"))
    ap.add_argument("--tiny", action="store_true", help="smoke run: a 64-token document, 2 repeats")
    args = ap.parse_args()
    if args.tiny:
        args.tokens, args.repeats = 64, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    prov = provenance()
    load_before = os.getloadavg()
    folder = Path(tempfile.mkdtemp(prefix="kv-rag-sign-", dir=args.tmp_dir))
    key = SigningKey.generate()
    trust = TrustPolicy([key.public_key])
    publisher = Engine(None, store=Store([DiskTier(folder)]), device="cpu", dtype="float32", sign_key=key)
    doc = document_of_length(publisher.tokenizer, args.tokens)
    t0 = time.perf_counter()
    rep = publisher.publish([doc])[0]
    publish_s = time.perf_counter() - t0
    disk = DiskTier(folder)
    art = disk.get(rep.key)
    assert art is not None and trust.check(art) is None
    path = disk.path_of(rep.key)

    def load(policy: TrustPolicy | None, cold: bool) -> float:
        if cold:
            drop_page_cache(path)
        store = Store([MemoryTier(), DiskTier(folder)], trust=policy)
        return timed(lambda: store.get(rep.key))

    rows: dict[str, list[float]] = {
        k: [] for k in ("load_warm", "load_warm_trust", "load_cold", "load_cold_trust", "check", "check_stored")
    }
    rows |= {"check_in_process": [], "digest_stored": [], "sign": [], "ttft": [], "ttft_trust": []}
    stored = art.to_bytes()
    question = "What is this document about?"
    for _ in range(args.repeats):
        for policy, tag in ((None, ""), (trust, "_trust")):  # alternating: the load drifts on a shared machine
            rows["load_warm" + tag].append(load(policy, cold=False))
            rows["load_cold" + tag].append(load(policy, cold=True))
            fresh = Store([MemoryTier(), DiskTier(folder)])
            user = Engine(None, store=fresh, device="cpu", dtype="float32", trust=policy)
            gen = user.generate(question, [doc], max_new_tokens=1)
            assert gen.documents[0].cache.value == "hit", gen.documents
            rows["ttft" + tag].append(gen.ttft_s)
        rows["check"].append(timed(lambda: trust.check(art)))
        rows["digest_stored"].append(timed(lambda: of_bytes(stored)))
        rows["check_in_process"].append(timed(lambda: trust.check(art, tensors=False)))
        rows["check_stored"].append(rows["digest_stored"][-1] + rows["check_in_process"][-1])
        rows["sign"].append(timed(lambda: key.sign(art)))
    med = {k: statistics.median(v) for k, v in rows.items()}
    result = {
        "provenance": prov,
        "model": publisher.model_name,
        "document_tokens": art.meta.num_tokens,
        "artifact_bytes": art.nbytes,
        "stored_bytes": path.stat().st_size if path is not None else None,
        "publish_s": publish_s,
        "repeats": args.repeats,
        "median_s": med,
        "check_over_load": {  # CPU time of the check on stored bytes against a load without trust
            "warm": med["check_stored"] / med["load_warm"],
            "cold": med["check_stored"] / med["load_cold"],
            "from_tensors_warm": med["check"] / med["load_warm"],
        },
        "added_to_load": {  # wall time trust adds to a disk-tier load (the hashing overlaps the read)
            "warm": med["load_warm_trust"] / med["load_warm"] - 1,
            "cold": med["load_cold_trust"] / med["load_cold"] - 1,
        },
        "trust_over_no_trust": {
            "load_warm": med["load_warm_trust"] / med["load_warm"],
            "load_cold": med["load_cold_trust"] / med["load_cold"],
            "ttft": med["ttft_trust"] / med["ttft"],
        },
        "digest_gb_per_s": len(stored) / med["digest_stored"] / 1e9,
        "samples_s": rows,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    shutil.rmtree(folder, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k not in ("samples_s", "provenance")}, indent=2))


if __name__ == "__main__":
    main()
