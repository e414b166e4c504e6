"""Codec measurements for the benchmark: size, encode/decode speed, disk loads, and int8 token agreement."""

from __future__ import annotations

import statistics
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

from .. import codec
from ..artifact import Artifact
from ..engine import Engine
from ..store import DiskTier, MemoryTier, Store
from . import io as bench_io

QUESTIONS = (
    "Summarize the document in one sentence.",
    "What is the main rule this document describes?",
)


def measure_codecs(
    art: Artifact, key: str, tmp: Path, evict: str, repeats: int, plain_load_s: float | None = None
) -> dict[str, Any]:
    """For each codec: ratio, encode and decode GB/s (of the uncompressed size), disk-tier load time."""
    raw = art.to_bytes()
    out: dict[str, Any] = {"raw_mb": len(raw) / 1e6}
    if plain_load_s is not None:
        out["none"] = {"disk_load_s": plain_load_s, "disk_load_gb_per_s": len(raw) / plain_load_s / 1e9}
    for name in ("zstd", "int8"):
        try:
            codec.check_codec(name)
        except Exception as exc:  # zstandard missing
            out[name] = {"error": str(exc)}
            continue
        enc_t, dec_t = [], []
        data = b""
        for _ in range(repeats):
            t0 = time.perf_counter()
            data = codec.encode(art, name)
            enc_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            codec.decode(data, expect_key=key)
            dec_t.append(time.perf_counter() - t0)
        tier = DiskTier(tmp / f"codec-{name}", codec=name)
        tier.put_bytes(key, data)
        path = tier.path_of(key)
        loads = []
        for _ in range(repeats):
            bench_io.evict(path, evict)
            t0 = time.perf_counter()
            got = tier.get(key)
            loads.append(time.perf_counter() - t0)
            assert got is not None
        tier.delete(key)
        tier.close()
        enc, dec, load = statistics.median(enc_t), statistics.median(dec_t), statistics.median(loads)
        out[name] = {
            "mb": len(data) / 1e6,
            "ratio": len(raw) / len(data),
            "encode_gb_per_s": len(raw) / enc / 1e9,
            "decode_gb_per_s": len(raw) / dec / 1e9,
            "disk_load_s": load,
            "disk_load_gb_per_s": len(raw) / load / 1e9,
            "disk_load_vs_plain": (plain_load_s / load) if plain_load_s else None,
        }
    return out


def _corpus_documents(n: int) -> list[tuple[str, str]]:
    d = resources.files("kv_rag") / "corpus"
    files = sorted((f for f in d.iterdir() if f.name.endswith(".md")), key=lambda f: f.name)
    return [(f.name, f.read_text(encoding="utf-8")) for f in files[:n]]


def int8_agreement(
    engine: Engine, n_docs: int, n_new: int, tmp_dir: Path | None = None, max_tokens: int = 1500
) -> dict[str, Any]:
    """Greedy tokens from an exact hit versus an int8 hit, on ``n_docs`` corpus documents.

    Each document (cut to ``max_tokens``) is published once; the exact KV stays in a memory tier,
    the int8 copy goes to a disk tier with ``codec="int8"``. An exact hit equals a full prefill
    (checked by the main table), so it is the reference.
    """
    loaded = engine.loaded
    tok = loaded.tokenizer
    per_doc: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="kv-rag-int8-", dir=tmp_dir) as tmp:
        mem = MemoryTier()
        q8 = DiskTier(Path(tmp) / "int8", codec="int8")
        publisher = Engine(loaded.model, tokenizer=tok, store=Store([mem, q8]))
        exact = Engine(loaded.model, tokenizer=tok, store=Store([mem]))
        lossy = Engine(loaded.model, tokenizer=tok, store=Store([q8]))
        for name, text in _corpus_documents(n_docs):
            ids = tok(text, add_special_tokens=False)["input_ids"][:max_tokens]
            doc = str(tok.decode(ids))
            publisher.publish([doc], sources=[name])
            for q in QUESTIONS:
                a = exact.generate(q, [doc], max_new_tokens=n_new)
                b = lossy.generate(q, [doc], max_new_tokens=n_new)
                pa = exact.prefill(exact.prompt(q, [doc]))
                pb = lossy.prefill(lossy.prompt(q, [doc]))
                assert pa.logits is not None and pb.logits is not None
                same = 0
                for x, y in zip(a.token_ids, b.token_ids, strict=False):
                    if x != y:
                        break
                    same += 1
                per_doc.append(
                    {
                        "document": name,
                        "doc_tokens": len(ids),
                        "question": q,
                        "tokens_equal": a.token_ids == b.token_ids,
                        "matching_prefix": same,
                        "compared": min(len(a.token_ids), len(b.token_ids)),
                        "first_logit_max_diff": float((pa.logits - pb.logits).abs().max()),
                    }
                )
                r = per_doc[-1]
                print(
                    f"int8 {name:28} {q[:30]:30} equal={r['tokens_equal']} prefix={same}/{r['compared']} "
                    f"maxdiff={r['first_logit_max_diff']:.3f}",
                    flush=True,
                )
    return {
        "codec": "int8",
        "greedy_tokens": n_new,
        "cases": len(per_doc),
        "all_tokens_equal": sum(r["tokens_equal"] for r in per_doc),
        "mean_matching_prefix": statistics.mean(float(r["matching_prefix"]) for r in per_doc) if per_doc else 0.0,
        "per_document": per_doc,
    }
