"""Core benchmark: full prefill versus cache hits from the memory and disk tiers, per document length.

A benchmark, not a test: it prints a table and saves JSON. Disk-tier hits read a fresh
:class:`~kv_rag.store.DiskTier` (no memory tier) after asking the kernel to drop the artifact
file from the page cache (``posix_fadvise(DONTNEED)``); the JSON says whether that succeeded.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .engine import Engine
from .store import DiskTier, MemoryTier, Store

QUESTION = "Summarize the document in one sentence."


def corpus_text() -> str:
    """All bundled corpus files, concatenated (real text to cut documents from)."""
    d = resources.files("kv_rag") / "corpus"
    return "\n\n".join(
        f.read_text(encoding="utf-8") for f in sorted(d.iterdir(), key=lambda f: f.name) if f.name.endswith(".md")
    )


def document_of_length(tokenizer: Any, n_tokens: int) -> str:
    """A real-text document of about ``n_tokens`` tokens (the corpus, repeated if needed, cut)."""
    text = corpus_text()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    while len(ids) < n_tokens:
        ids = ids + ids
    return str(tokenizer.decode(ids[:n_tokens]))


def drop_page_cache(path: Path | None) -> bool:
    """Ask the kernel to evict ``path`` from the page cache. True if the call succeeded."""
    if path is None or not hasattr(os, "posix_fadvise"):
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return True
    except OSError:
        return False


def _ttft(engine: Engine, doc: str, use_cache: bool) -> tuple[float, Any]:
    gen = engine.generate(QUESTION, [doc], use_cache=use_cache, max_new_tokens=1)
    return gen.ttft_s, gen


def run_core_bench(engine: Engine, lengths: list[int], repeats: int = 3, out: Path | None = None) -> dict[str, Any]:
    """Measure each length; print a table; save JSON to ``out``. Returns the result dict."""
    loaded = engine.loaded
    rows = []
    with tempfile.TemporaryDirectory(prefix="kv-rag-bench-") as tmp:
        disk = DiskTier(Path(tmp) / "disk")
        mem_engine = Engine(loaded.model, tokenizer=loaded.tokenizer, store=Store([MemoryTier(), disk]))
        disk_engine = Engine(loaded.model, tokenizer=loaded.tokenizer, store=Store([disk]))
        for n in lengths:
            doc = document_of_length(loaded.tokenizer, n)
            full_runs = [_ttft(engine, doc, use_cache=False)[0] for _ in range(max(1, repeats - 1))]
            t0 = time.perf_counter()
            pub = mem_engine.publish([doc])[0]
            publish_s = time.perf_counter() - t0
            mem_runs, mem_gen = [], None
            for _ in range(repeats):
                s, mem_gen = _ttft(mem_engine, doc, use_cache=True)
                mem_runs.append(s)
            disk_runs, dropped = [], []
            for _ in range(repeats):
                dropped.append(drop_page_cache(disk.path_of(pub.key)))
                s, _g = _ttft(disk_engine, doc, use_cache=True)
                disk_runs.append(s)
            prompt = engine.prompt(QUESTION, [doc])
            ref = engine.reference_logits(engine.tokenize(prompt).ids)
            hit = mem_engine.prefill(prompt)
            assert hit.logits is not None
            full_gen = engine.generate(QUESTION, [doc], use_cache=False, max_new_tokens=16)
            hit_gen = mem_engine.generate(QUESTION, [doc], max_new_tokens=16)
            art_bytes = sum(t.numel() * t.element_size() for t in _artifact_tensors(mem_engine, pub.key))
            full = statistics.median(full_runs)
            mem = statistics.median(mem_runs)
            dsk = statistics.median(disk_runs)
            rows.append(
                {
                    "doc_tokens": pub.tokens,
                    "prompt_tokens": mem_gen.prompt_tokens if mem_gen else None,
                    "full_prefill_ttft_s": full,
                    "memory_hit_ttft_s": mem,
                    "disk_hit_ttft_s": dsk,
                    "memory_speedup": full / mem,
                    "disk_speedup": full / dsk,
                    "publish_s": publish_s,
                    "kv_mb_per_token": art_bytes / pub.tokens / 1e6,
                    "artifact_mb": art_bytes / 1e6,
                    "page_cache_dropped": all(dropped),
                    "greedy_16_tokens_equal": full_gen.token_ids == hit_gen.token_ids,
                    "max_logit_diff": float((hit.logits - ref).abs().max()),
                    "runs": {"full": full_runs, "memory": mem_runs, "disk": disk_runs},
                }
            )
            r = rows[-1]
            print(
                f"{r['doc_tokens']:6d} tok  full {full:7.3f} s  mem-hit {mem:6.3f} s ({r['memory_speedup']:5.1f}x)  "
                f"disk-hit {dsk:6.3f} s ({r['disk_speedup']:5.1f}x)  {r['kv_mb_per_token']:.4f} MB/tok  "
                f"equal={r['greedy_16_tokens_equal']}  maxdiff={r['max_logit_diff']:.2e}",
                flush=True,
            )
    result = {
        "benchmark": "core",
        "model": engine.model_name,
        "dtype": loaded.fingerprint.dtype,
        "device": str(loaded.device),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "question": QUESTION,
        "repeats": repeats,
        "rows": rows,
    }
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(f"saved {out}")
    return result


def _artifact_tensors(engine: Engine, key: str) -> list[torch.Tensor]:
    hit = engine.store.get(key)
    if hit is None:
        return []
    a = hit.artifact
    return [*a.keys, *a.values]
