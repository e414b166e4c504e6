"""The ``kv-rag`` command: demo, publish, ask, inspect, bench, cost, verify."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from .defaults import MAX_NEW_TOKENS
from .errors import KVRagError

DEMO_QUESTIONS = (
    "What does the else clause of a for loop do?",
    "In a with statement, when is the __exit__() method of the context manager called?",
    "What does raise ... from do with the second expression?",
)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--store",
        help="store folder for the disk tier, 'memory', or redis://host:port/db for a shared Redis "
        "behind memory and $KV_RAG_HOME/store (default: $KV_RAG_HOME/store)",
    )
    p.add_argument("--model", help="local transformers model folder (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", help="cpu, cuda, cuda:1… (default: cuda when present)")
    p.add_argument(
        "--dtype",
        help="model and KV dtype: float32 (CPU default), bfloat16 (GPU default; on CPUs with AVX512-BF16 "
        "about 2x faster than float32, not held to the 1e-4 exactness bound), float16",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
    parser = argparse.ArgumentParser(prog="kv-rag", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="publish the bundled corpus and answer questions with and without the cache")
    _add_common(p)
    p.add_argument("--max-new-tokens", type=int, default=48)

    p = sub.add_parser("publish", help="compute and store the KV cache of text files")
    _add_common(p)
    p.add_argument("paths", nargs="+", help="text or markdown files, or folders of them")
    p.add_argument("--chunk-tokens", type=int, default=512, help="chunk size in tokens; 0 keeps each file whole")

    p = sub.add_parser("ask", help="answer a question from documents, reusing their KV caches")
    _add_common(p)
    p.add_argument("question")
    p.add_argument("--docs", nargs="+", required=True, help="text or markdown files, or folders of them")
    p.add_argument("--k", type=int, default=1, help="number of chunks to retrieve (BM25)")
    p.add_argument("--chunk-tokens", type=int, default=512, help="chunk size in tokens; 0 keeps each file whole")
    p.add_argument(
        "--mode",
        default="exact",
        help="how to assemble the KV: exact (token-exact chain), stitch (each document's cache moved to its "
        "position) or blend (stitch + recompute a fraction of document tokens); stitch and blend trade answer "
        "accuracy for speed (docs/fidelity.md) (default: %(default)s)",
    )
    p.add_argument(
        "--recompute",
        type=float,
        default=None,
        help="blend: fraction of document tokens to recompute (default: 0.15 in blend mode)",
    )
    p.add_argument(
        "--priming",
        action="store_true",
        help="stitch/blend: use (and store) documents computed after a fixed filler passage rather than right "
        "after the system part (docs/fidelity.md)",
    )
    p.add_argument(
        "--selection",
        default=None,
        help="blend: which document tokens to recompute: attention (the tokens the question attends to), "
        "deviation (CacheBlend's KV deviation) or leading (each document's first tokens) (default: attention)",
    )
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the store")
    p.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--stream", action="store_true", help="print the answer as it is generated")

    p = sub.add_parser("inspect", help="show what an artifact holds")
    p.add_argument("artifact", help="an artifact file, or a key in the store")
    p.add_argument(
        "--store",
        help="store to look the key up in: a folder, or redis://host:port/db (default: $KV_RAG_HOME/store)",
    )
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("bench", help="prefill versus cache-hit TTFT at several document lengths")
    _add_common(p)
    p.add_argument("--lengths", default="256,1024,4096", help="comma-separated document lengths in tokens")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of each cache hit (median is reported)")
    p.add_argument("--out", help="where to save the JSON (default: $KV_RAG_HOME/bench/core/<UTC date-time>/bench.json)")
    p.add_argument("--full-repeats", type=int, default=2, help="full prefills per length and system")
    p.add_argument("--greedy-tokens", type=int, default=32, help="greedy tokens compared with the full prefill")
    p.add_argument("--peer", default="auto", choices=["auto", "llama.cpp", "none"], help="llama.cpp side by side")
    p.add_argument(
        "--evict", default="fadvise", choices=["fadvise", "drop_caches"], help="how disk reads leave the page cache"
    )
    p.add_argument("--codec-docs", type=int, default=0, help="also measure codecs; int8 agreement on N documents")
    p.add_argument(
        "--plots",
        nargs="?",
        const="",
        help="folder for PNG plots (needs matplotlib); without a folder: beside the JSON (default: no plots)",
    )
    p.add_argument("--tmp-dir", help="folder on the disk to measure (default: the system temp folder)")
    p.add_argument("--threads", type=int, help="CPU threads for both systems (default: torch's current setting)")

    p = sub.add_parser("cost", help="cost of re-prefilling versus loading or shipping a document's KV cache")
    p.add_argument("--tokens", type=int, default=4096, help="document length in tokens")
    p.add_argument("--reuses", type=int, default=100, help="how many requests use the document")
    p.add_argument("--gpu-hour", type=float, help="USD per GPU-hour (default 3.50; CPU profile: 0.10)")
    p.add_argument("--egress", type=float, help="USD per GB moved over the network (default 0.09)")
    p.add_argument(
        "--bench",
        help="a kv-rag bench JSON to price the CPU from (default: the current CPU result, built in as "
        "kv_rag.cost.CPU_SMOLLM2_FP32)",
    )
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("verify", help="spot-check an untrusted artifact by recomputing random windows of it")
    _add_common(p)
    p.add_argument("artifact", help="an artifact file, or a key in the store")
    p.add_argument("--fraction", type=float, default=0.1, help="fraction of the artifact's windows to recompute")
    p.add_argument("--window", type=int, default=16, help="tokens per recomputed window")
    p.add_argument("--seed", type=int, help="seed of the window choice (default: random)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kv-rag`` console script. Returns the exit status."""
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", message=".*past_key_values.*")
    try:
        handler = {
            "demo": cmd_demo,
            "publish": cmd_publish,
            "ask": cmd_ask,
            "inspect": cmd_inspect,
            "bench": cmd_bench,
            "cost": cmd_cost,
            "verify": cmd_verify,
        }[args.command]
        return handler(args)
    except KVRagError as exc:
        print(f"kv-rag {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _engine(args: argparse.Namespace, **options: Any) -> Any:
    from .engine import Engine

    return Engine(args.model, store=args.store, device=args.device, dtype=args.dtype, **options)


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False))


def cmd_publish(args: argparse.Namespace) -> int:
    """``kv-rag publish``."""
    from .retrieve import chunk_documents, read_documents

    docs = read_documents(args.paths)
    engine = _engine(args)
    chunks = chunk_documents(docs, engine.tokenizer, args.chunk_tokens)
    reports = engine.publish([c.text for c in chunks], sources=[c.source for c in chunks], progress=not args.json)
    if args.json:
        _print(
            {
                "published": [r.to_dict() for r in reports],
                "tokens": sum(r.tokens for r in reports),
                "new": sum(r.cache.value == "miss" for r in reports),
            }
        )
    else:
        for r in reports:
            print(f"{r.cache.value:4}  {r.tokens:6d} tok  {r.seconds:6.2f} s  {r.key[:16]}  {r.source}")
        print(
            f"{len(reports)} documents, {sum(r.tokens for r in reports)} tokens, "
            f"{sum(r.cache.value == 'miss' for r in reports)} newly stored"
        )
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    """``kv-rag ask``: the options go to the engine unchanged; it checks them (exit 2 on a bad one)."""
    from .retrieve import BM25, chunk_documents, read_documents

    docs = read_documents(args.docs)
    engine = _engine(args, priming=args.priming)
    options = engine.request_options(
        mode=args.mode,
        recompute=args.recompute,
        selection=args.selection,
        use_cache=not args.no_cache,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        stop=tuple(args.stop),
    )
    chunks = chunk_documents(docs, engine.tokenizer, args.chunk_tokens)
    top = BM25(chunks).search(args.question, args.k)
    prompt = engine.prompt(args.question, [d.text for d in top], sources=[d.source for d in top])
    stream = engine.stream(prompt, options=options)
    for piece in stream:
        if args.stream and not args.json:
            print(piece, end="", flush=True)
    gen = stream.result
    if gen is None:
        raise KVRagError("the answer ended without a result")
    if args.json:
        _print(gen.to_dict())
    else:
        if args.stream:
            print()
        else:
            print(gen.text)
        hits = sum(d.cache.value == "hit" for d in gen.documents)
        print(
            f"\n[{gen.mode.value}] {gen.prompt_tokens} prompt tokens, {gen.cached_tokens} from cache, "
            f"{hits}/{len(gen.documents)} documents hit; TTFT {gen.ttft_s:.3f} s, total {gen.total_s:.2f} s",
            file=sys.stderr,
        )
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """``kv-rag inspect``."""
    from .codec import decode
    from .store import Store

    path = Path(args.artifact)
    if path.is_file():
        art = decode(path.read_bytes())
        where = str(path)
    else:
        art, where = Store.open(args.store).inspect(args.artifact)
    m = art.meta
    k0 = art.keys[0]
    info = {
        "where": where,
        **m.to_dict(),
        "layers": art.num_layers,
        "kv_heads": int(k0.shape[0]),
        "head_dim": int(k0.shape[-1]),
        "bytes": art.nbytes,
        "bytes_per_token": art.nbytes / max(1, m.num_tokens),
        "checksum_ok": True,
    }
    if args.json:
        _print(info)
    else:
        for k, v in info.items():
            print(f"{k:>16}: {v}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """``kv-rag bench``."""
    from .bench import results_dir, run_core_bench

    out = Path(args.out) if args.out else results_dir("core", stamp=True) / "bench.json"
    plots = None if args.plots is None else Path(args.plots) if args.plots else out.parent
    print(f"writing {out}" + (f" and plots in {plots}" if plots else ""), flush=True)
    lengths = [int(x) for x in str(args.lengths).split(",") if x.strip()]
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    result = run_core_bench(
        _engine(args),
        lengths,
        repeats=args.repeats,
        out=out,
        full_repeats=args.full_repeats,
        n_new=args.greedy_tokens,
        peer=args.peer,
        evict=args.evict,
        codec_docs=args.codec_docs,
        plots_dir=plots,
        tmp_dir=Path(args.tmp_dir) if args.tmp_dir else None,
    )
    if args.json:
        _print(result)
    return 0


def cmd_cost(args: argparse.Namespace) -> int:
    """``kv-rag cost``: the three costs for the H200 profile and the measured CPU one (the current
    result built in, or ``--bench``'s)."""
    from . import cost
    from .errors import InputError

    cpu = cost.CPU_SMOLLM2_FP32
    if args.bench:
        if not Path(args.bench).is_file():
            raise InputError(f"--bench: no such file: {args.bench} (leave it out to use the current CPU result)")
        cpu = cost.profile_from_bench(args.bench)
    profiles = [(cost.H200_QWEN3_4B, cost.DEFAULT_GPU_HOUR_USD), (cpu, cost.DEFAULT_CPU_HOUR_USD)]
    egress = cost.DEFAULT_EGRESS_USD_PER_GB if args.egress is None else args.egress
    out = []
    for prof, hour in profiles:
        c = cost.costs(
            prof,
            args.tokens,
            args.reuses,
            hour_usd=hour if args.gpu_hour is None else args.gpu_hour,
            egress_usd_per_gb=egress,
        )
        out.append(
            {
                **c.to_dict(),
                "hour_usd": hour if args.gpu_hour is None else args.gpu_hour,
                "egress_usd_per_gb": egress,
                "source": prof.source,
            }
        )
    if args.json:
        _print(out)
        return 0
    for d in out:
        print(cost.describe(d))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """``kv-rag verify``: exit 0 when the artifact checks out, 1 when it does not, 2 on an error."""
    from .artifact import Artifact
    from .errors import InputError
    from .verify import verify_artifact

    engine = _engine(args)
    path = Path(args.artifact)
    if path.is_file():
        art = Artifact.from_bytes(path.read_bytes())  # ArtifactError (damaged, not an artifact) -> exit 2
    else:
        hit = engine.store.get(args.artifact)
        if hit is None:
            raise InputError(f"{args.artifact!r} is neither an artifact file nor a key in the store")
        art = hit.artifact
    rep = verify_artifact(engine, art, fraction=args.fraction, window=args.window, seed=args.seed)
    if args.json:
        _print({**rep.to_dict(), "detects_16_token_span": rep.detection_probability(16)})
    else:
        print(f"{'OK' if rep.ok else 'FAILED'}: {rep.reason}")
        print(
            f"  {rep.windows_checked}/{rep.windows_total} windows of {rep.window} tokens, "
            f"{rep.context_tokens} context tokens recomputed; cost {rep.cost_fraction:.0%} of a full prefill "
            f"(in tokens), {rep.seconds:.2f} s; a tampered span of {rep.window} tokens is caught with "
            f"probability >= {rep.detection_probability(rep.window):.0%}"
        )
    return 0 if rep.ok else 1


def cmd_demo(args: argparse.Namespace) -> int:
    """``kv-rag demo``: publish the bundled corpus, then answer questions with and without the cache."""
    import time

    from .retrieve import BM25, Document

    corpus_dir = resources.files("kv_rag") / "corpus"
    docs = [
        Document(f.read_text(encoding="utf-8"), f.name)
        for f in sorted(corpus_dir.iterdir(), key=lambda f: f.name)
        if f.name.endswith(".md")
    ]
    print(f"kv-rag demo: {len(docs)} sections of the Python Language Reference (see kv_rag/corpus/SOURCE.txt)")
    t0 = time.perf_counter()
    engine = _engine(args)
    _ = engine.loaded
    print(
        f"model {engine.model_name} loaded in {time.perf_counter() - t0:.1f} s "
        f"({engine.loaded.device}, {engine.loaded.fingerprint.dtype})"
    )
    t0 = time.perf_counter()
    reports = engine.publish([d.text for d in docs], sources=[d.source for d in docs], progress=True)
    new = sum(r.cache.value == "miss" for r in reports)
    print(
        f"published {len(reports)} documents ({sum(r.tokens for r in reports)} tokens, {new} newly computed) "
        f"in {time.perf_counter() - t0:.1f} s\n"
    )
    index = BM25(docs)
    rows = []
    for q in DEMO_QUESTIONS:
        top = index.search(q, 1)
        prompt = engine.prompt(q, [d.text for d in top], sources=[d.source for d in top])
        cold = engine.generate(prompt, use_cache=False, max_new_tokens=args.max_new_tokens)
        warm = engine.generate(prompt, max_new_tokens=args.max_new_tokens)
        same = cold.token_ids == warm.token_ids
        rows.append(
            {
                "question": q,
                "document": top[0].source,
                "answer": warm.text.strip(),
                "prompt_tokens": warm.prompt_tokens,
                "cached_tokens": warm.cached_tokens,
                "ttft_no_cache_s": cold.ttft_s,
                "ttft_cache_s": warm.ttft_s,
                "speedup": cold.ttft_s / warm.ttft_s,
                "identical_tokens": same,
            }
        )
        if not args.json:
            print(
                f"Q: {q}\n   document: {top[0].source} ({warm.prompt_tokens} prompt tokens, "
                f"{warm.cached_tokens} loaded from the store)"
            )
            print(f"A: {warm.text.strip()}")
            print(
                f"   TTFT without cache {cold.ttft_s:.3f} s, with cache {warm.ttft_s:.3f} s "
                f"({cold.ttft_s / warm.ttft_s:.1f}x); same tokens: {'yes' if same else 'NO'}\n"
            )
    if args.json:
        _print({"model": engine.model_name, "questions": rows})
    return 0 if all(r["identical_tokens"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
