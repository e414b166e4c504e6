"""Fidelity of stitch and blend against a full prefill, on multi-document RAG questions.

Text: Python's own documentation as shipped with CPython (``pydoc_data.topics``, the help() topics
of the Language Reference and Library Reference), cut into passages of about 512 tokens at paragraph
boundaries. Each question takes 4 passages; a made-up fact is inserted at a paragraph boundary of one
of them ("The access code for vault 17 is 4821."), and a fact of the same kind with another key and
value into each of the 3 others (distractors), so the answer needs the right document. The order of
the 4 documents is random.

For each question the same prompt is answered (greedy, 32 new tokens at most) by a full prefill
(``use_cache=False``), exact mode, stitch mode and blend mode at several recompute fractions; every
document was published beforehand (not timed). Reported per mode: answer accuracy (the value appears
in the answer), agreement with the full prefill's tokens (all first-32 tokens identical; and the
mean common-prefix fraction), and median TTFT with its speed-up over the full prefill.

Resumable: every question appends one JSON line to ``--raw``; a rerun skips the done ones. Each run
adds its provenance (commit, machine, command: ``kv_rag.bench.provenance``) to ``<raw>.provenance.json``
beside the raw file; the summary JSON carries its own and those of the runs it summarizes.

    .venv/bin/python benchmarks/fidelity/fidelity.py --questions 100    # run (long: about 30 s a question)
    .venv/bin/python benchmarks/fidelity/fidelity.py --summarize        # JSON + PNG + markdown table only
    .venv/bin/python benchmarks/fidelity/fidelity.py --tiny --raw DIR/raw.jsonl --out DIR/f.json  # smoke run

Without ``--raw``/``--out`` it writes under ``$KV_RAG_HOME/bench/fidelity/``, never into the checkout;
the current results in ``benchmarks/fidelity/results/`` were written with explicit dated paths
(see benchmarks/fidelity/README.md). Two processes of one torch thread each can share the questions
(``--shard 0/2`` and ``--shard 1/2``, each with its own raw file beside ``--raw``); ``--summarize``
merges them. Every row records the 1-minute load, the torch threads, its shard, and blend's token
selection.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from kv_rag.bench import provenance, results_dir
from kv_rag.calibration_questions import correct, questions

HERE = Path(__file__).resolve().parent
#: the committed results of this study (read by the other blend studies: the full prefill's answers)
RESULTS = HERE / "results"
#: the current fidelity run's raw file (its shards ``.0of2``/``.1of2`` beside it)
CURRENT_RAW = RESULTS / "2026-11-29-fidelity_raw.jsonl"
MAX_NEW = 32
#: passage length (tokens) and documents per question of the real runs, and of ``--tiny`` smoke runs
PASSAGE_TOKENS, N_DOCS = 500, 4
TINY_PASSAGE_TOKENS, TINY_K, TINY_NEW = 48, 2, 4


def modes(blend_rs: list[float]) -> list[tuple[str, str, float | None]]:
    """(label, mode, recompute) of every configuration compared with the full prefill."""
    return [
        ("exact", "exact", None),
        ("stitch", "stitch", None),
        *[(f"blend r={r:g}", "blend", r) for r in blend_rs],
    ]


def run(args: argparse.Namespace) -> None:
    import torch

    from kv_rag import Engine, MemoryTier, Store

    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    store = Store([MemoryTier(768 * 1024**2)])
    engine = Engine(args.model, store=store, device="cpu", dtype="float32", priming=args.priming)
    tok = engine.tokenizer
    qs = questions(tok, args.questions + 1, args.k, args.seed, args.passage_tokens)
    warm = qs.pop()  # the warm-up question is not one of the measured ones
    shard, n_shards = args.shard
    qs = [q for q in qs if q["id"] % n_shards == shard]
    raw = shard_path(Path(args.raw), args.shard)
    record_run(raw)
    done = {row["id"] for row in read_rows(Path(args.raw))}
    configs = modes(args.blend)
    # warm-up (not recorded): the rotary probe, allocator, first-call costs
    engine.publish(warm["docs"])
    for _label, mode, r in configs:
        engine.generate(warm["question"], warm["docs"], mode=mode, recompute=r, max_new_tokens=2)
    engine.generate(warm["question"], warm["docs"], use_cache=False, max_new_tokens=2)
    for q in qs:
        if q["id"] in done:
            continue
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        engine.publish(q["docs"])
        prompt = engine.prompt(q["question"], q["docs"])
        full = engine.generate(prompt, use_cache=False, max_new_tokens=args.max_new)
        row: dict[str, Any] = {
            "id": q["id"],
            "model": engine.model_name,
            "answer": q["answer"],
            "answer_doc": q["answer_doc"],
            "k": len(q["docs"]),
            "prompt_tokens": full.prompt_tokens,
            "load_1min": load,
            "threads": torch.get_num_threads(),
            "shard": f"{shard}/{n_shards}",
            "selection": repr(engine.options.selection),
            "priming": bool(engine.priming),
            "max_new_tokens": args.max_new,
            "full": {"text": full.text, "tokens": full.token_ids, "ttft_s": full.ttft_s},
        }
        for label, mode, r in configs:
            g = engine.generate(prompt, mode=mode, recompute=r, max_new_tokens=args.max_new)
            row[label] = {
                "text": g.text,
                "tokens": g.token_ids,
                "ttft_s": g.ttft_s,
                "mode_used": g.mode.value,
                "cached_tokens": g.cached_tokens,
                "recomputed_tokens": g.recomputed_tokens,
            }
        row["seconds"] = time.perf_counter() - t0
        with raw.open("a") as f:
            f.write(json.dumps(row) + "\n")
        ok = {lab: correct(q["answer"], row[lab]["text"]) for lab in ["full"] + [c[0] for c in configs]}
        print(
            f"q{q['id']:3d} load {load:.2f} {row['seconds']:.1f}s full {full.ttft_s:.2f}s "
            + " ".join(f"{lab}:{'Y' if v else 'n'}" for lab, v in ok.items()),
            flush=True,
        )


def prefix_fraction(ref: list[int], out: list[int]) -> float:
    """Share of the first ``MAX_NEW`` tokens of ``ref`` that ``out`` repeats before the first difference."""
    ref, out = ref[:MAX_NEW], out[:MAX_NEW]
    n = 0
    for a, b in zip(ref, out, strict=False):
        if a != b:
            break
        n += 1
    if n == len(ref) == len(out):
        return 1.0
    return n / max(len(ref), len(out), 1)


def agreement(rows: list[dict[str, Any]], lab: str) -> dict[str, float]:
    """Answer accuracy of ``lab``'s answers in ``rows``, and their agreement with the full prefill's tokens."""
    return {
        "accuracy": sum(correct(r["answer"], r[lab]["text"]) for r in rows) / len(rows),
        "identical_32_tokens": sum(r[lab]["tokens"][:MAX_NEW] == r["full"]["tokens"][:MAX_NEW] for r in rows)
        / len(rows),
        "mean_common_prefix": statistics.mean(prefix_fraction(r["full"]["tokens"], r[lab]["tokens"]) for r in rows),
    }


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend, or ``None`` (with a note) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no PNG written", file=sys.stderr)
        return None
    return plt


def shard_path(raw: Path, shard: tuple[int, int]) -> Path:
    """The raw file of shard ``i/n``: ``raw`` itself for ``0/1``, else ``<stem>.<i>of<n>.jsonl`` beside it."""
    i, n = shard
    return raw if n == 1 else raw.with_name(f"{raw.stem}.{i}of{n}{raw.suffix}")


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` as ``(i, n)`` (``--shard``)."""
    i, _, n = text.partition("/")
    shard = (int(i), int(n or 1))
    if not 0 <= shard[0] < shard[1]:
        raise argparse.ArgumentTypeError(f"--shard wants i/n with 0 <= i < n, got {text!r}")
    return shard


def provenance_path(raw: Path) -> Path:
    """The file beside ``raw`` that lists the provenance of every run that appended to it."""
    return raw.with_name(raw.stem + ".provenance.json")


def record_run(raw: Path, command: str | None = None) -> None:
    """Add this run's provenance (``kv_rag.bench.provenance``) to ``raw``'s provenance file (made if needed)."""
    raw.parent.mkdir(parents=True, exist_ok=True)
    side = provenance_path(raw)
    data: dict[str, Any] = json.loads(side.read_text()) if side.exists() else {"raw": raw.name, "runs": []}
    data["runs"].append(provenance(command))
    side.write_text(json.dumps(data, indent=2) + "\n")


def runs_of(raw: Path) -> list[dict[str, Any]]:
    """The recorded runs of ``raw`` and of its shard files, as :func:`record_run` wrote them."""
    files = [raw, *sorted(raw.parent.glob(f"{raw.stem}.*of*{raw.suffix}"))]
    runs: list[dict[str, Any]] = []
    for f in files:
        side = provenance_path(f)
        if side.exists():
            runs += [{"raw": f.name, **r} for r in json.loads(side.read_text()).get("runs", [])]
    return runs


def read_rows(raw: Path) -> list[dict[str, Any]]:
    """Rows of ``raw`` and of its shard files (``<stem>.<i>of<n>.jsonl``), one per question id, by id."""
    files = [raw, *sorted(raw.parent.glob(f"{raw.stem}.*of*{raw.suffix}"))]
    rows: dict[int, dict[str, Any]] = {}
    for f in files:
        if f.exists():
            for line in f.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    rows.setdefault(row["id"], row)
    return [rows[i] for i in sorted(rows)]


def summarize(args: argparse.Namespace) -> dict[str, Any]:
    rows = read_rows(Path(args.raw))
    if not rows:
        raise SystemExit(f"no results in {args.raw}: run without --summarize first")
    labels = ["full"] + [k for k in rows[0] if k.startswith(("exact", "stitch", "blend"))]
    full_ttft = statistics.median(r["full"]["ttft_s"] for r in rows)
    table = []
    for lab in labels:
        ttft = statistics.median(r[lab]["ttft_s"] for r in rows)
        speedups = [r["full"]["ttft_s"] / r[lab]["ttft_s"] for r in rows]
        table.append(
            {
                "mode": lab,
                **agreement(rows, lab),
                "ttft_median_s": ttft,
                "speedup_median_ttft": full_ttft / ttft,
                "speedup_median_per_question": statistics.median(speedups),
                "modes_used": sorted({r[lab].get("mode_used", "exact") for r in rows}),
            }
        )
    loads = [r["load_1min"] for r in rows]
    result = {
        "provenance": {**provenance(), "raw_runs": runs_of(Path(args.raw))},
        "benchmark": "fidelity",
        "model": f"{rows[0].get('model', 'SmolLM2-135M-Instruct (embedded)')}, float32, CPU",
        "text_source": "pydoc_data.topics (CPython's help() topics), passages of ~500 tokens, a made-up fact "
        "inserted into one of k documents and same-kind distractor facts into the others",
        "questions": len(rows),
        "k": rows[0].get("k", args.k),
        "prompt_tokens_median": statistics.median(r["prompt_tokens"] for r in rows),
        "max_new_tokens": rows[0].get("max_new_tokens", MAX_NEW),
        "load_1min": {"min": min(loads), "median": statistics.median(loads), "max": max(loads)},
        "cpu_count": os.cpu_count(),
        "torch_threads_per_process": sorted({r.get("threads", 0) for r in rows}),
        "shards": sorted({r.get("shard", "0/1") for r in rows}),
        "blend_selection": sorted({r.get("selection", "deviation at layer 1 (v1)") for r in rows}),
        "priming": sorted({r.get("priming", False) for r in rows}),
        "command": "python benchmarks/fidelity/fidelity.py " + " ".join(sys.argv[1:]),
        "run_as": _run_as(rows),
        "table": table,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    _plot(result, out.with_suffix(".png"))
    return result


def _run_as(rows: list[dict[str, Any]]) -> str:
    """How the rows were produced, from what they record."""
    shards = sorted({r.get("shard", "0/1") for r in rows})
    threads = ",".join(str(t) for t in sorted({r.get("threads", 0) for r in rows}))
    blends = ",".join(k.split("=", 1)[1] for k in rows[0] if k.startswith("blend r="))
    n = shards[0].split("/")[1] if shards else "1"
    how = f"python benchmarks/fidelity/fidelity.py --questions {len(rows)} --blend {blends} --threads {threads}"
    return how + (f" --shard i/{n}: {n} processes at once" if n != "1" else "")


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| mode | answer accuracy | identical first 32 tokens | mean common prefix | median TTFT | TTFT speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for t in result["table"]:
        lines.append(
            f"| {t['mode']} | {100 * t['accuracy']:.1f}% | {100 * t['identical_32_tokens']:.1f}% | "
            f"{100 * t['mean_common_prefix']:.1f}% | {t['ttft_median_s']:.3f} s | {t['speedup_median_ttft']:.1f}x |"
        )
    return "\n".join(lines)


def _plot(result: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [t["speedup_median_ttft"] for t in result["table"]]
    ax.plot(xs, [100 * t["accuracy"] for t in result["table"]], "o", label="answer accuracy")
    ax.plot(xs, [100 * t["identical_32_tokens"] for t in result["table"]], "s", label="identical 32 tokens")
    for t, x in zip(result["table"], xs, strict=True):
        ax.annotate(t["mode"], (x, 100 * t["accuracy"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("TTFT speed-up over full prefill (median, log scale)")
    ax.set_ylabel("%")
    ax.set_title(
        f"{result['questions']} questions, k={result['k']}, ~{result['prompt_tokens_median']:.0f} prompt tokens "
        f"(load {result['load_1min']['median']:.1f})"
    )
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model to study (a folder or hub id; default: the embedded one)")
    p.add_argument("--questions", type=int, default=100)
    p.add_argument("--k", type=int, default=N_DOCS)
    p.add_argument("--passage-tokens", type=int, default=PASSAGE_TOKENS, help="passage length of the documents")
    p.add_argument("--max-new", type=int, default=MAX_NEW, help="greedy tokens per answer")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--blend", type=lambda s: [float(x) for x in s.split(",")], default=[0.05, 0.15, 0.3])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument(
        "--priming", action="store_true", help="Engine(priming=True): moved documents computed after a filler"
    )
    p.add_argument("--raw", default=str(results_dir("fidelity") / "fidelity_raw.jsonl"))
    p.add_argument("--out", default=str(results_dir("fidelity") / "fidelity.json"))
    p.add_argument("--summarize", action="store_true", help="only summarize what --raw holds")
    p.add_argument(
        "--shard", type=parse_shard, default=(0, 1), help="i/n: run only questions with id %% n == i (own raw file)"
    )
    p.add_argument(
        "--tiny",
        action="store_true",
        help=f"smoke run: 1 question of {TINY_K} documents of ~{TINY_PASSAGE_TOKENS} tokens, {TINY_NEW} new "
        "tokens, blend at 0.15 only",
    )
    args = p.parse_args()
    if args.tiny:
        args.questions, args.k, args.passage_tokens, args.max_new, args.blend = (
            1,
            TINY_K,
            TINY_PASSAGE_TOKENS,
            TINY_NEW,
            [0.15],
        )
    if not args.summarize:
        run(args)
        if args.shard[1] > 1:
            return  # summarize once every shard is done
    summarize(args)


if __name__ == "__main__":
    main()
