"""Benchmark: full prefill versus cache hits (memory and disk tiers), side by side with llama.cpp.

A benchmark, not a test: it prints a table, saves JSON and (optionally) PNG plots. For every
document length it measures, alternating the two systems in one run:

- ours: full-prefill TTFT, hit TTFT from the memory tier and from the disk tier (a fresh
  :class:`~kv_rag.store.DiskTier` with no memory tier, the artifact file evicted from the page cache
  first), the suffix prefill alone, the disk load alone (GB/s), KV MB/token, greedy tokens and
  max logit difference versus the full prefill;
- llama.cpp (``llama-cpp-python``, optional) on the same GGUF file and the same token ids: full
  prefill versus restoring its saved state from memory and from its own state file;
- ``dd`` on the same artifact file (evicted first), for the disk-throughput target;
- break-even reuse counts from the measured times.

:mod:`kv_rag.bench.codec` adds the artifact-codec measurements, :mod:`kv_rag.bench.plot` the plots.
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

from ..cost import break_even
from ..engine import Engine
from ..runtime import build_cache, pieces_of
from ..store import DiskTier, MemoryTier, Store
from . import io as bench_io

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
    return bench_io.fadvise_dontneed(path)


def _load() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def _med(xs: list[float]) -> float:
    return float(statistics.median(xs))


def _ours_full(engine: Engine, prompt: Any, n_new: int) -> tuple[float, torch.Tensor | None, list[int]]:
    """Full prefill (no store): ``(ttft_s, first logits or None, greedy tokens)``.

    With ``n_new == 0`` it runs :meth:`Engine.prefill` and picks the first token (returns logits);
    otherwise :meth:`Engine.generate` (returns tokens). Both are the same path up to the first token.
    """
    if n_new == 0:
        t0 = time.perf_counter()
        pre = engine.prefill(prompt, use_cache=False)
        assert pre.logits is not None
        tok = int(pre.logits.argmax())
        return time.perf_counter() - t0, pre.logits, [tok]
    gen = engine.generate(prompt, use_cache=False, max_new_tokens=n_new)
    return gen.ttft_s, None, gen.token_ids


def _hit(engine: Engine, prompt: Any, n_new: int = 1) -> tuple[float, list[int]]:
    gen = engine.generate(prompt, max_new_tokens=n_new)
    if gen.cached_tokens == 0:
        raise RuntimeError("expected a cache hit but the document was prefilled")
    return gen.ttft_s, gen.token_ids


def _suffix_and_build(engine: Engine, arts: list[Any], tp: Any, n_new: int) -> tuple[float, float]:
    """Seconds to copy the chain's artifacts into a fresh cache, and to prefill the suffix on top of it."""
    loaded = engine.loaded
    rest = list(tp.suffix)
    pre_ids = tp.ids[: len(tp) - len(rest)]
    with loaded.lock, torch.inference_mode():
        t0 = time.perf_counter()
        keys, values = pieces_of(arts, loaded.device, loaded.num_layers)
        cache = build_cache(keys, values, loaded.num_layers, len(tp) + n_new)
        t1 = time.perf_counter()
        loaded.runtime.forward(torch.tensor([rest], dtype=torch.long), cache, len(pre_ids))
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def run_core_bench(
    engine: Engine,
    lengths: list[int],
    repeats: int = 3,
    out: Path | None = None,
    *,
    full_repeats: int = 2,
    n_new: int = 32,
    peer: str = "auto",
    evict: str = "fadvise",
    codec_docs: int = 0,
    plots_dir: Path | None = None,
    tmp_dir: Path | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Measure each length (both systems, alternating); print a table; save JSON to ``out``.

    ``peer``: ``"auto"`` (llama.cpp when ``llama_cpp`` imports), ``"llama.cpp"`` (required) or
    ``"none"``. ``evict``: how artifact files leave the page cache before disk reads: ``"fadvise"``
    (``posix_fadvise DONTNEED`` on the file) or ``"drop_caches"`` (the whole page cache; root).
    ``codec_docs`` > 0 adds the codec measurements (:mod:`kv_rag.bench.codec`) on that many documents.
    ``tmp_dir``: where artifacts are written (default: the system temp folder; it should be the
    disk you care about). ``command``: the command line recorded in the result's ``provenance``
    (default: this process's, see :func:`kv_rag.bench.provenance`). Returns the result dict.
    """
    from ..models import gguf_path
    from . import llama as bench_llama
    from .provenance import provenance

    loaded = engine.loaded
    tok = loaded.tokenizer
    threads = torch.get_num_threads()
    use_peer = peer == "llama.cpp" or (peer == "auto" and bench_llama.available())
    if peer == "llama.cpp" and not bench_llama.available():
        raise RuntimeError("llama-cpp-python is not installed: pip install 'kv-rag[bench]' (or make bench)")
    llama = bench_llama.LlamaPeer(gguf_path(), loaded.context_window, threads) if use_peer else None
    prov = provenance(command)
    load_before = _load()
    rows = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kv-rag-bench-", dir=tmp_dir) as tmp:
        disk = DiskTier(Path(tmp) / "disk")
        mem_engine = Engine(loaded.model, tokenizer=tok, store=Store([MemoryTier(), disk]))
        disk_engine = Engine(loaded.model, tokenizer=tok, store=Store([disk]))
        for n in lengths:
            doc = document_of_length(tok, n)
            prompt = engine.prompt(QUESTION, [doc])
            tp = engine.tokenize(prompt)
            suffix_ids = list(tp.suffix)
            prefix_ids = list(tp.ids[: len(tp) - len(suffix_ids)])
            # publish (both systems)
            t0 = time.perf_counter()
            pub = mem_engine.publish([doc])[0]
            publish_s = time.perf_counter() - t0
            mem_tier = mem_engine.store.tier("memory")
            chain = [mem_tier.get(k) for k in mem_engine.segment_keys(tp)]
            arts = [a for a in chain if a is not None]
            art = arts[-1]
            assert art.meta.key == pub.key
            path = disk.path_of(pub.key)
            assert path is not None
            file_bytes = path.stat().st_size
            lrow: dict[str, Any] = {}
            state_file = Path(tmp) / f"llama-{n}.state"
            if llama is not None:
                lpub_s, state = llama.publish(prefix_ids, state_file)
                lrow.update(
                    publish_s=lpub_s,
                    state_mb=len(state) / 1e6,
                    state_mb_per_token=len(state) / len(prefix_ids) / 1e6,
                    state_file_mb=state_file.stat().st_size / 1e6,
                )
            # full prefills, alternating
            full_runs: list[float] = []
            lfull_runs: list[float] = []
            full_logits: torch.Tensor | None = None
            full_tokens: list[int] = []
            lfull_logits = None
            lfull_tokens: list[int] = []
            for r in range(max(1, full_repeats)):
                s, lg, toks = _ours_full(engine, prompt, 0 if r == 0 else n_new)
                full_runs.append(s)
                if lg is not None:
                    full_logits = lg
                if r == 1 or full_repeats == 1:
                    full_tokens = toks
                if llama is not None:
                    s, llg, ltoks = llama.full(tp.ids, n_new if r == 0 else 1)
                    lfull_runs.append(s)
                    if r == 0:
                        lfull_logits, lfull_tokens = llg, ltoks
            if full_repeats == 1:  # the single run gave logits only: get the tokens from a hit-free generate
                gen = engine.generate(prompt, use_cache=False, max_new_tokens=n_new)
                full_runs.append(gen.ttft_s)
                full_tokens = gen.token_ids
            # hits, alternating
            mem_runs: list[float] = []
            disk_runs: list[float] = []
            lmem_runs: list[float] = []
            lpy_runs: list[float] = []
            ldisk_runs: list[float] = []
            evicted: list[bool] = []
            resident: list[int | None] = []
            for _ in range(repeats):
                mem_runs.append(_hit(mem_engine, prompt)[0])
                if llama is not None:
                    lmem_runs.append(llama.restore(state, prefix_ids, suffix_ids)[0])
                    lpy_runs.append(llama.restore_py(suffix_ids))
                ok, res = bench_io.evict(path, evict)
                evicted.append(ok)
                resident.append(res)
                disk_runs.append(_hit(disk_engine, prompt)[0])
                if llama is not None:
                    bench_io.evict(state_file, evict)
                    ldisk_runs.append(llama.restore_file(state_file, prefix_ids, suffix_ids)[0])
            # components: disk load alone, plain read, dd, suffix prefill, cache build
            load_runs: list[float] = []
            read_runs: list[float] = []
            for _ in range(repeats):
                bench_io.evict(path, evict)
                t0 = time.perf_counter()
                got = disk.get(pub.key)
                load_runs.append(time.perf_counter() - t0)
                assert got is not None
                bench_io.evict(path, evict)
                t0 = time.perf_counter()
                with open(path, "rb") as f:
                    f.read()
                read_runs.append(time.perf_counter() - t0)
            dd = bench_io.dd_read(path, evict)
            builds, suffixes = zip(*[_suffix_and_build(engine, arts, tp, n_new) for _ in range(repeats)], strict=True)
            # exactness
            hit = mem_engine.prefill(prompt)
            assert hit.logits is not None and full_logits is not None
            hit_s, hit_tokens = _hit(mem_engine, prompt, n_new)
            mem_runs.append(hit_s)
            if llama is not None:
                s, rlg, rtoks = llama.restore(state, prefix_ids, suffix_ids, n_new)
                lmem_runs.append(s)
                lrow.update(
                    full_prefill_ttft_s=_med(lfull_runs),
                    memory_restore_ttft_s=_med(lmem_runs),
                    py_load_state_ttft_s=_med(lpy_runs),
                    disk_restore_ttft_s=_med(ldisk_runs),
                    memory_speedup=_med(lfull_runs) / _med(lmem_runs),
                    disk_speedup=_med(lfull_runs) / _med(ldisk_runs),
                    greedy_tokens_equal=rtoks == lfull_tokens,
                    max_logit_diff=float(abs(rlg - lfull_logits).max()),
                    greedy_tokens_equal_to_ours=lfull_tokens == full_tokens,
                    break_even_memory=break_even(lrow["publish_s"], _med(lmem_runs), _med(lfull_runs)),
                    runs={"full": lfull_runs, "memory": lmem_runs, "py_load_state": lpy_runs, "disk": ldisk_runs},
                )
            full = _med(full_runs)
            mem = _med(mem_runs)
            dsk = _med(disk_runs)
            kv_bytes = sum(t.numel() * t.element_size() for a in arts for t in (*a.keys, *a.values))
            row: dict[str, Any] = {
                "doc_tokens": pub.tokens,
                "prompt_tokens": len(tp),
                "suffix_tokens": len(suffix_ids),
                "full_prefill_ttft_s": full,
                "memory_hit_ttft_s": mem,
                "disk_hit_ttft_s": dsk,
                "memory_speedup": full / mem,
                "disk_speedup": full / dsk,
                "suffix_prefill_s": _med(list(suffixes)),
                "cache_build_s": _med(list(builds)),
                "memory_load_gb_per_s": kv_bytes / _med(list(builds)) / 1e9,
                "disk_load_s": _med(load_runs),
                "disk_load_gb_per_s": file_bytes / _med(load_runs) / 1e9,
                "disk_read_gb_per_s": file_bytes / _med(read_runs) / 1e9,
                "dd_gb_per_s": dd["gb_per_s"],
                "dd": dd,
                "disk_load_vs_dd": (file_bytes / _med(load_runs) / 1e9) / float(dd["gb_per_s"] or 1.0),
                "publish_s": publish_s,
                "kv_mb_per_token": kv_bytes / len(prefix_ids) / 1e6,
                "artifact_mb": kv_bytes / 1e6,
                "artifact_file_mb": file_bytes / 1e6,
                "page_cache_dropped": all(evicted),
                "evict_method": evict,
                "resident_bytes_after_evict": resident,
                "greedy_16_tokens_equal": full_tokens[:16] == hit_tokens[:16],
                "greedy_tokens_equal": full_tokens == hit_tokens,
                "greedy_tokens": len(hit_tokens),
                "max_logit_diff": float((hit.logits - full_logits).abs().max()),
                "break_even_memory": break_even(publish_s, mem, full),
                "break_even_disk": break_even(publish_s, dsk, full),
                "runs": {"full": full_runs, "memory": mem_runs, "disk": disk_runs, "disk_load": load_runs},
                "load_avg": _load(),
            }
            if codec_docs > 0:
                from .codec import measure_codecs

                row["codecs"] = measure_codecs(art, pub.key, Path(tmp), evict, repeats, plain_load_s=_med(load_runs))
            if llama is not None:
                row["llama_cpp"] = lrow
                row["ours_vs_llama_restore"] = lrow["memory_restore_ttft_s"] / mem
            rows.append(row)
            _print_row(row)
            if out is not None:  # save as we go: a long run interrupted keeps its finished rows
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps({"provenance": prov, "partial": True, "rows": rows}, indent=2))
            disk.delete(pub.key)
            for k in mem_engine.segment_keys(tp):
                mem_engine.store.delete(k)
    result: dict[str, Any] = {
        "provenance": prov,
        "benchmark": "core" if llama is None else "core+llama.cpp",
        "command": "kv-rag bench",
        "model": engine.model_name,
        "gguf": str(gguf_path()),
        "dtype": loaded.fingerprint.dtype,
        "device": str(loaded.device),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": threads,
            "llama_cpp_python": llama.version if llama else None,
            "llama_cpp_threads": llama.threads if llama else None,
        },
        "load_avg_before": load_before,
        "load_avg_after": _load(),
        "seconds": time.perf_counter() - t_start,
        "question": QUESTION,
        "repeats": repeats,
        "full_repeats": full_repeats,
        "greedy_tokens": n_new,
        "evict": evict,
        "rows": rows,
    }
    if codec_docs > 0:
        from .codec import int8_agreement

        result["int8_agreement"] = int8_agreement(engine, codec_docs, n_new, tmp_dir=tmp_dir)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(f"saved {out}")
    if plots_dir is not None:
        from ..cost import profile_from_result
        from .plot import plot_all

        for p in plot_all(result, plots_dir, profile_from_result(result)):
            print(f"saved {p}")
    return result


def _print_row(r: dict[str, Any]) -> None:
    print(
        f"{r['doc_tokens']:6d} tok  ours: full {r['full_prefill_ttft_s']:7.3f} s  "
        f"mem-hit {r['memory_hit_ttft_s']:6.3f} s ({r['memory_speedup']:5.1f}x)  "
        f"disk-hit {r['disk_hit_ttft_s']:6.3f} s ({r['disk_speedup']:5.1f}x)  "
        f"suffix {r['suffix_prefill_s']:.3f} s  "
        f"disk load {r['disk_load_gb_per_s']:.2f} GB/s (dd {r['dd_gb_per_s']:.2f})  "
        f"{r['kv_mb_per_token']:.4f} MB/tok  equal={r['greedy_tokens_equal']}  maxdiff={r['max_logit_diff']:.1e}",
        flush=True,
    )
    lr = r.get("llama_cpp")
    if lr:
        print(
            f"{'':6}      llama.cpp: full {lr['full_prefill_ttft_s']:7.3f} s  "
            f"restore {lr['memory_restore_ttft_s']:6.3f} s ({lr['memory_speedup']:5.1f}x)  "
            f"file-restore {lr['disk_restore_ttft_s']:6.3f} s  py load_state {lr['py_load_state_ttft_s']:.3f} s  "
            f"{lr['state_mb_per_token']:.4f} MB/tok  equal={lr['greedy_tokens_equal']}  "
            f"maxdiff={lr['max_logit_diff']:.1e}",
            flush=True,
        )
