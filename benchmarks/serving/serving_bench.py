"""Serving benchmark: what users see. TTFT through the public API, several users at once, the planner.

Three parts, every request through kv-rag's public path (text in, tokens out):

1. **User path** per prompt length: TTFT of a cached document's request four ways: the harness
   (``Engine.prefill`` of a ready tokenized prompt, as ``benchmarks/gpu/gpu_bench.py`` measures),
   ``Engine.generate(question, [doc])`` from text, ``ChatKVRag.invoke(messages)`` (wall time of a
   one-token answer, and the TTFT kv-rag reports), and a full prefill (``use_cache=False``).
2. **Concurrency**: ``N`` requests on ``N`` different cached documents, each with its own question,
   ``--new-tokens`` tokens each, for every ``N`` of ``--concurrency``: one after another, then all at
   once from ``N`` threads twice (the first burst, then the steady state): total wall time, aggregate
   tokens/s, p50 and p99 TTFT, and whether the greedy tokens equal the one-after-another ones. Also
   ``ChatKVRag.batch`` over the same ``N`` questions.
3. **Load or recompute**: a document stored only in the pinned or only in the disk tier, requested
   through ``Engine.generate`` after the tier's and the prefill's speeds are measured: what the
   planner chose per document (hit or recomputed) and the TTFT against a full prefill.

On CUDA the model is Qwen3-4B-shaped with random bf16 weights (as gpu_bench builds it); on the CPU
the embedded SmolLM2-135M-Instruct in float32; ``--tiny`` a tiny Qwen3 (smoke run). Writes ``--out``
(default ``$KV_RAG_HOME/bench/serving/serving_bench.json``) with its provenance.

    python benchmarks/serving/serving_bench.py --tokenizer DIR --out OUT.json          # GPU
    python benchmarks/serving/serving_bench.py --device cpu --out OUT.json             # CPU, embedded model
    python benchmarks/serving/serving_bench.py --tiny --device cpu --out /tmp/s.json   # smoke run
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))

from gpu_bench import QWEN3_4B_SHAPE, TINY_SHAPE, build_model, sync  # noqa: E402

from kv_rag import Engine, Generation  # noqa: E402
from kv_rag.bench import document_of_length, provenance, results_dir  # noqa: E402
from kv_rag.store import DiskTier, GpuTier, MemoryTier, PinnedTier, Store  # noqa: E402

QUESTIONS = [
    "What is this document about?",
    "Summarize the first paragraph in one sentence.",
    "Which statement does the text describe?",
    "Name one rule the document states.",
]


def pct(xs: list[float], q: float) -> float:
    """The ``q`` quantile of ``xs`` (nearest rank), in ms."""
    s = sorted(xs)
    return round(1000 * s[min(len(s) - 1, max(0, round(q * len(s)) - 1))], 2)


_T0 = time.perf_counter()


def log(msg: str) -> None:
    """A progress line on stderr, with the seconds since the start."""
    print(f"[{time.perf_counter() - _T0:8.1f}s] {msg}", file=sys.stderr, flush=True)


def ms(x: float) -> float:
    """Seconds as ms, rounded."""
    return round(1000 * x, 2)


def make_engine(args: argparse.Namespace, store_dir: Path) -> tuple[Engine, dict[str, Any]]:
    """The engine (model on the device, store of every tier there is) and a description of the model."""
    device = torch.device(args.device)
    tiers: list[Any]
    if device.type == "cuda":
        tiers = [GpuTier(80 << 30, device=device), PinnedTier(64 << 30), DiskTier(store_dir, size_limit=60 << 30)]
    else:
        tiers = [MemoryTier(8 << 30), DiskTier(store_dir, size_limit=60 << 30)]
    if not args.disk:
        tiers = tiers[:-1]
    if args.tiny or device.type == "cuda":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.tokenizer) if args.tokenizer else None
        if tok is None:
            from kv_rag import models

            tok = models.load(None, "cpu", "float32").tokenizer
        shape = TINY_SHAPE if args.tiny else QWEN3_4B_SHAPE
        model = build_model(shape, device, getattr(torch, args.dtype))
        engine = Engine(model, tokenizer=tok, store=Store(tiers))
        desc = {"name": "tiny Qwen3, random weights" if args.tiny else "Qwen3-4B-shaped, random weights"}
    else:
        engine = Engine(None, store=Store(tiers), device="cpu", dtype=args.dtype)
        desc = {"name": "SmolLM2-135M-Instruct (embedded)"}
    desc["dtype"] = str(next(engine.model.parameters()).dtype)
    desc["params"] = sum(p.numel() for p in engine.model.parameters())
    _ = engine.loaded.fingerprint
    return engine, desc


def user_path(engine: Engine, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """TTFT of one cached document of about ``n`` tokens, four ways."""
    from langchain_core.messages import HumanMessage, SystemMessage
    from langchain_kv_rag import ChatKVRag

    dev = engine.loaded.device
    doc = document_of_length(engine.tokenizer, n)
    question = QUESTIONS[0]
    prompt = engine.prompt(question, [doc])
    tp = engine.tokenize(prompt)
    engine.publish([doc])
    row: dict[str, Any] = {"prompt_tokens": len(tp)}

    def harness() -> float:
        sync(dev)
        t0 = time.perf_counter()
        pre = engine.prefill(tp)
        int(torch.argmax(pre.logits).item())  # type: ignore[arg-type]
        return time.perf_counter() - t0

    def generate(use_cache: bool = True) -> Generation:
        return engine.generate(question, [doc], max_new_tokens=1, use_cache=use_cache)

    reps = args.reps
    harness()
    row["harness_prefill_ttft_ms"] = ms(statistics.median(harness() for _ in range(reps)))
    generate()
    gens = [generate() for _ in range(reps)]
    row["generate_ttft_ms"] = ms(statistics.median(g.ttft_s for g in gens))
    row["generate_cache"] = [d.cache.value for d in gens[-1].documents]
    chat = ChatKVRag.from_engine(engine, max_tokens=1)
    messages = [SystemMessage(f"Use only this document:\n\n{doc}"), HumanMessage(question)]
    chat.invoke(messages)
    walls, reported = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        msg = chat.invoke(messages)
        walls.append(time.perf_counter() - t0)
        reported.append(msg.response_metadata["kv_rag"]["ttft_s"])
    row["chat_invoke_wall_ms"] = ms(statistics.median(walls))
    row["chat_invoke_ttft_ms"] = ms(statistics.median(reported))
    row["chat_invoke_cache"] = [d["cache"] for d in msg.response_metadata["kv_rag"]["docs"]]
    full = [generate(use_cache=False).ttft_s for _ in range(max(2, reps // 2))]
    row["full_prefill_ttft_ms"] = ms(statistics.median(full))
    for k in ("harness_prefill_ttft_ms", "generate_ttft_ms", "chat_invoke_wall_ms"):
        row[k.replace("_ms", "_speedup")] = round(row["full_prefill_ttft_ms"] / max(1e-6, row[k]), 1)
    return row


def run_all(engine: Engine, jobs: list[tuple[str, str]], new: int) -> tuple[float, list[Generation]]:
    """All ``jobs`` (question, document) at once from one thread each: wall seconds and the generations."""
    out: list[Generation | None] = [None] * len(jobs)
    barrier = threading.Barrier(len(jobs) + 1)

    def run(i: int) -> None:
        barrier.wait()
        q, d = jobs[i]
        out[i] = g = engine.generate(q, [d], max_new_tokens=new)
        log(f"  request {i} done: ttft {ms(g.ttft_s)} ms, {len(g.token_ids)} tokens")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return wall, [g for g in out if g is not None]


def _first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first token where ``a`` and ``b`` differ (``None``: equal)."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def concurrency(engine: Engine, n: int, args: argparse.Namespace, docs: list[str]) -> dict[str, Any]:
    """``n`` requests one after another, then at once twice; LangChain's batch."""
    from langchain_core.messages import HumanMessage, SystemMessage
    from langchain_kv_rag import ChatKVRag

    new = args.new_tokens
    jobs = [(QUESTIONS[i % len(QUESTIONS)], docs[i]) for i in range(n)]
    paths = engine.loaded.runtime.batch_paths

    def since(before: dict[str, int]) -> dict[str, int]:
        return {k: v - before.get(k, 0) for k, v in paths.items() if v - before.get(k, 0)}

    log(f"{n} requests one after another")
    ran = dict(paths)
    t0 = time.perf_counter()
    seq = []
    for q, d in jobs:
        seq.append(engine.generate(q, [d], max_new_tokens=new))
        log(f"  request {len(seq) - 1} done: ttft {ms(seq[-1].ttft_s)} ms")
    seq_wall = time.perf_counter() - t0
    tokens = sum(len(g.token_ids) for g in seq)
    row: dict[str, Any] = {
        "requests": n,
        "new_tokens": new,
        "one_after_another_s": round(seq_wall, 3),
        "one_after_another_tok_s": round(tokens / seq_wall, 1),
        "lone_ttft_p50_ms": pct([g.ttft_s for g in seq], 0.5),
        "paths": since(ran),  # requests stepped per path (batched graph, CPU ragged step, eager)
    }
    for label in ("first_burst", "steady"):
        log(f"{n} requests at once ({label})")
        before, ran = dict(engine.scheduler.stats), dict(paths)
        wall, gens = run_all(engine, jobs, new)
        ttfts = [g.ttft_s for g in gens]
        stats = engine.scheduler.stats
        row[label] = {
            "wall_s": round(wall, 3),
            "tok_s": round(sum(len(g.token_ids) for g in gens) / wall, 1),
            "speedup_vs_one_after_another": round(seq_wall / wall, 2),
            "ttft_p50_ms": pct(ttfts, 0.5),
            "ttft_p99_ms": pct(ttfts, 0.99),
            "greedy_equal_one_after_another": sum(g.token_ids == s.token_ids for g, s in zip(gens, seq, strict=True)),
            # per request: the first token that differs from one after another's (None: all equal)
            "greedy_differs_at": [_first_difference(g.token_ids, s.token_ids) for g, s in zip(gens, seq, strict=True)],
            "paths": since(ran),
            "mean_batch": round((stats["stepped"] - before["stepped"]) / max(1, stats["steps"] - before["steps"]), 2),
        }
    if args.langchain_batch:
        chat = ChatKVRag.from_engine(engine, max_tokens=new)
        batch = [[SystemMessage(f"Use only this document:\n\n{d}"), HumanMessage(q)] for q, d in jobs]
        # the messages put each document in a system turn of its own text, so their first batch is
        # misses (prefilled and stored one at a time); the second one hits
        for key in ("langchain_batch_first_s", "langchain_batch_s"):
            log(f"ChatKVRag.batch of {n} ({key})")
            t0 = time.perf_counter()
            chat.batch(batch, config={"max_concurrency": n})
            row[key] = round(time.perf_counter() - t0, 3)
    return row


def load_or_recompute(engine: Engine, n: int, tier: str, args: argparse.Namespace) -> dict[str, Any]:
    """A document of ``n`` tokens stored only in ``tier``: what the planner chooses, and the TTFT."""
    doc = document_of_length(engine.tokenizer, n) + f"\n(copy for the {tier} tier)"
    question = QUESTIONS[0]
    engine.publish([doc])
    names = [t.name for t in engine.store.tiers]
    full = [engine.generate(question, [doc], max_new_tokens=1, use_cache=False).ttft_s for _ in range(2)]

    def only_in_tier() -> Generation:
        keys = [s.key for s in engine.prefill(engine.prompt(question, [doc]), need_logits=False).segments if s.key]
        for t in engine.store.tiers[: names.index(tier)]:
            for k in keys:
                t.delete(k)
        return engine.generate(question, [doc], max_new_tokens=1)

    first = only_in_tier()  # measures the tier (and the planner may already decide)
    runs = [only_in_tier() for _ in range(args.reps)]
    return {
        "tier": tier,
        "prompt_tokens": runs[-1].prompt_tokens,
        "full_prefill_ttft_ms": ms(statistics.median(full)),
        "first_ttft_ms": ms(first.ttft_s),
        "first_choice": [d.cache.value for d in first.documents],
        "ttft_ms": ms(statistics.median(g.ttft_s for g in runs)),
        "choice": [d.cache.value for d in runs[-1].documents],
        "reason": next((d.reason for d in runs[-1].documents if d.reason), None),
        "ttft_over_full_prefill": round(statistics.median(g.ttft_s for g in runs) / statistics.median(full), 3),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on the CPU")
    ap.add_argument("--tiny", action="store_true", help="smoke run: a tiny Qwen3, short documents, few tokens")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the embedded model's)")
    ap.add_argument("--lengths", default=None, help="user-path prompt lengths (GPU 4096,32768; CPU 1024,4096)")
    ap.add_argument("--concurrency", default=None, help="requests at once (GPU 1,8,32; CPU 1,4)")
    ap.add_argument("--doc-tokens", type=int, default=None, help="concurrency documents' tokens (GPU 4096; CPU 1024)")
    ap.add_argument("--new-tokens", type=int, default=None, help="tokens per request (GPU 64; CPU 32)")
    ap.add_argument("--planner-lengths", default=None, help="load-or-recompute lengths (GPU 4096,32768; CPU 2048)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument(
        "--langchain-batch", action=argparse.BooleanOptionalAction, default=True, help="time ChatKVRag.batch too"
    )
    ap.add_argument("--disk", action=argparse.BooleanOptionalAction, default=True, help="a disk tier below the others")
    ap.add_argument("--trace", type=float, default=0, help="dump every thread's stack to stderr every N s (0: never)")
    ap.add_argument("--out", default=str(results_dir("serving") / "serving_bench.json"))
    args = ap.parse_args(argv)
    gpu = args.device.startswith("cuda")
    defaults = (
        ("64", "1,2", 64, 4, "64") if args.tiny else ("4096,32768", "1,8,32", 4096, 64, "4096,32768")
        if gpu else ("1024,4096", "1,4", 1024, 32, "2048")
    )  # fmt: skip
    for name, value in zip(
        ("lengths", "concurrency", "doc_tokens", "new_tokens", "planner_lengths"), defaults, strict=True
    ):
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    if args.tiny:
        args.reps = 2
    command = "python benchmarks/serving/serving_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.trace > 0:
        faulthandler.dump_traceback_later(args.trace, repeat=True)
    store_dir = Path(tempfile.mkdtemp(prefix="kvrag-serving-"))
    engine, model = make_engine(args, store_dir)
    log(f"engine ready: {model}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "provenance": provenance(command),
        "benchmark": "serving_bench",
        "command": command,
        "model": model,
        "device": torch.cuda.get_device_name(0) if gpu else "cpu",
        "threads": torch.get_num_threads(),
        "user_path": [],
        "concurrency": [],
        "load_or_recompute": [],
    }

    def save() -> None:
        out.write_text(json.dumps(result, indent=1) + "\n")

    for n in (int(x) for x in args.lengths.split(",") if x):
        log(f"user path at {n} tokens")
        result["user_path"].append(user_path(engine, n, args))
        save()
        print(json.dumps(result["user_path"][-1]), flush=True)
    counts = [int(x) for x in args.concurrency.split(",") if x]
    docs = [document_of_length(engine.tokenizer, args.doc_tokens) + f"\n(document {i})" for i in range(max(counts))]
    log(f"publishing {len(docs)} documents of {args.doc_tokens} tokens")
    engine.publish(docs)
    log("warm-up request")
    for q in QUESTIONS:  # warm-up: every question's step sizes and the decode steps (compiles, graph captures)
        engine.generate(q, [docs[0]], max_new_tokens=args.new_tokens)
    for n in counts:
        result["concurrency"].append(concurrency(engine, n, args, docs))
        save()
        print(json.dumps(result["concurrency"][-1]), flush=True)
    tiers = [t.name for t in engine.store.tiers][1:]  # every tier below the top one
    for n in (int(x) for x in args.planner_lengths.split(",") if x):
        for tier in tiers:
            log(f"load or recompute: {n} tokens in the {tier} tier")
            result["load_or_recompute"].append(load_or_recompute(engine, n, tier, args))
            save()
            print(json.dumps(result["load_or_recompute"][-1]), flush=True)
    result["scheduler"] = dict(engine.scheduler.stats)
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
