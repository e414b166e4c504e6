"""Which document tokens should blend recompute? A comparison of selection methods at one fraction.

Runs the first ``--questions`` questions of ``benchmarks/fidelity/fidelity.py`` (same builder, same
seed) and, for each, a full prefill, stitch, and blend at ``--recompute`` with every selection method
below (each a :class:`kv_rag.Selector` passed with the request). Reports answer accuracy, identical
first 32 greedy tokens against the full prefill, the mean common prefix, median TTFT, and where the
chosen tokens lie (the share inside the inserted fact sentences, and inside the first 10% of each
document). The chosen positions are what the selector returned to blend (a :class:`Recorded`
selector passes the method's choice through and keeps it).

    .venv/bin/python benchmarks/blend_selection/blend_selection.py --questions 16 --threads 2
    .venv/bin/python benchmarks/blend_selection/blend_selection.py --tiny --out DIR/sel.json   # smoke run

Without ``--out`` it writes under ``$KV_RAG_HOME/bench/blend_selection/``, never into the checkout.
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

import torch

from kv_rag import AttentionSelection, BlendView, DeviationSelection, LeadingSelection, Selector
from kv_rag.bench import provenance, results_dir

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "fidelity"))

from fidelity import (  # noqa: E402
    MAX_NEW,
    N_DOCS,
    PASSAGE_TOKENS,
    TINY_K,
    TINY_NEW,
    TINY_PASSAGE_TOKENS,
    correct,
    prefix_fraction,
    questions,
)


def methods(n_layers: int) -> dict[str, Selector]:
    """The compared selection methods by table label."""
    mid = n_layers // 2
    return {
        "deviation L1 (CacheBlend, old)": DeviationSelection(layers=(1,)),
        "deviation L1-4": DeviationSelection(layers=(1, 2, 3, 4)),
        "leading tokens of each doc": LeadingSelection(),
        f"attention L{mid}": AttentionSelection(layers=(mid,)),
        f"attention L0-{mid}": AttentionSelection(layers=tuple(range(mid + 1))),
        f"attention L0-{n_layers - 1}": AttentionSelection(layers=tuple(range(n_layers))),
        f"sink 8 + attention L0-{mid}": AttentionSelection(layers=tuple(range(mid + 1)), sink=8),
    }


class Recorded:
    """A selector that passes ``inner``'s choice to blend unchanged and keeps it in ``last``."""

    def __init__(self, inner: Selector) -> None:
        self.inner = inner
        self.last: torch.Tensor | None = None

    def select(self, view: BlendView, n: int) -> torch.Tensor:
        """``inner``'s positions (also kept in ``last``)."""
        self.last = self.inner.select(view, n)
        return self.last


def _fact_positions(tok: Any, tp: Any, sentences: list[str]) -> set[int]:
    """Prompt positions of the inserted fact sentences (token subsequence search, first token dropped)."""
    ids = list(tp.ids)
    out: set[int] = set()
    for s in sentences:
        sub = tok(s, add_special_tokens=False)["input_ids"][1:]
        for i in range(len(ids) - len(sub) + 1):
            if ids[i : i + len(sub)] == sub:
                out.update(range(i, i + len(sub)))
                break
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--questions", type=int, default=16)
    p.add_argument("--recompute", type=float, default=0.15)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--only", default="", help="comma-separated substrings of method names to run")
    p.add_argument("--out", default=str(results_dir("blend_selection") / "blend_selection.json"))
    p.add_argument(
        "--tiny",
        action="store_true",
        help=f"smoke run: 1 question of {TINY_K} documents of ~{TINY_PASSAGE_TOKENS} tokens, {TINY_NEW} new tokens, "
        "2 methods",
    )
    args = p.parse_args()
    k, target, max_new = (TINY_K, TINY_PASSAGE_TOKENS, TINY_NEW) if args.tiny else (N_DOCS, PASSAGE_TOKENS, MAX_NEW)
    if args.tiny:
        args.questions, args.only = 1, args.only or "deviation L1-4,sink"

    from kv_rag import Engine, MemoryTier, Store

    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = Engine(None, store=Store([MemoryTier(768 * 1024**2)]), device="cpu", dtype="float32")
    tok = engine.tokenizer
    n_layers = engine.model.config.num_hidden_layers
    table_methods = methods(n_layers)
    if args.only:
        keep = args.only.split(",")
        table_methods = {k: v for k, v in table_methods.items() if any(s in k for s in keep)}
    qs = questions(tok, args.questions, k, 7, target)
    prov = provenance()
    # warm-up
    engine.publish(qs[0]["docs"])
    engine.generate(qs[0]["question"], qs[0]["docs"], mode="blend", recompute=args.recompute, max_new_tokens=2)
    rows = []
    for q in qs:
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        engine.publish(q["docs"])
        prompt = engine.prompt(q["question"], q["docs"])
        tp = engine.tokenize(prompt)
        facts = [line for d in q["docs"] for line in d.split("\n\n") if line.startswith(("The ", "Professor "))]
        fact_pos = _fact_positions(tok, tp, [f for f in facts if f.endswith(".") and len(f) < 80])
        full = engine.generate(prompt, use_cache=False, max_new_tokens=max_new)
        row: dict[str, Any] = {"id": q["id"], "answer": q["answer"], "load_1min": load}
        row["full"] = {"text": full.text, "tokens": full.token_ids, "ttft_s": full.ttft_s}
        st = engine.generate(prompt, mode="stitch", max_new_tokens=max_new)
        row["stitch"] = {"text": st.text, "tokens": st.token_ids, "ttft_s": st.ttft_s}
        starts = [sum(len(seg) for seg in tp.segments[:i]) for i in range(len(tp.segments))]
        for name, sel in table_methods.items():
            rec = Recorded(sel)
            g = engine.generate(prompt, mode="blend", recompute=args.recompute, selection=rec, max_new_tokens=max_new)
            pos = set(rec.last.tolist()) if rec.last is not None else set()
            docs = [i for i in range(len(tp.segments)) if tp.document(i)]
            leading: set[int] = set()
            for i in docs:
                n = len(tp.segments[i])
                leading.update(range(starts[i], starts[i] + max(1, n // 10)))
            row[name] = {
                "text": g.text,
                "tokens": g.token_ids,
                "ttft_s": g.ttft_s,
                "recomputed": g.recomputed_tokens,
                "in_facts": len(pos & fact_pos) / max(1, len(pos)),
                "facts_covered": len(pos & fact_pos) / max(1, len(fact_pos)),
                "in_leading_10pct": len(pos & leading) / max(1, len(pos)),
            }
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        marks = " ".join(
            f"{'Y' if correct(q['answer'], row[k]['text']) else 'n'}" for k in ["full", "stitch", *table_methods]
        )
        print(f"q{q['id']:3d} load {load:.2f} {row['seconds']:.0f}s {marks}", flush=True)
        labels = ["full", "stitch", *table_methods]
        report(rows, labels, args, torch.get_num_threads(), quiet=q is not qs[-1], prov=prov)


def report(
    rows: list[dict[str, Any]],
    labels: list[str],
    args: argparse.Namespace,
    threads: int,
    quiet: bool,
    prov: dict[str, Any] | None = None,
) -> None:
    """Write the JSON of ``rows`` (after every question) and, unless ``quiet``, print the table."""
    table = []
    for lab in labels:
        rs = [r[lab] for r in rows]
        entry = {
            "method": lab,
            "accuracy": sum(correct(r["answer"], r[lab]["text"]) for r in rows) / len(rows),
            "identical_32_tokens": sum(
                x["tokens"][:MAX_NEW] == r["full"]["tokens"][:MAX_NEW] for x, r in zip(rs, rows, strict=True)
            )
            / len(rows),
            "mean_common_prefix": statistics.mean(
                prefix_fraction(r["full"]["tokens"], x["tokens"]) for x, r in zip(rs, rows, strict=True)
            ),
            "ttft_median_s": statistics.median(x["ttft_s"] for x in rs),
        }
        entry["speedup_median_ttft"] = statistics.median(r["full"]["ttft_s"] for r in rows) / entry["ttft_median_s"]
        for extra in ("in_facts", "facts_covered", "in_leading_10pct"):
            if extra in rs[0]:
                entry[extra] = statistics.mean(x[extra] for x in rs)
        table.append(entry)
    loads = [r["load_1min"] for r in rows]
    result = {
        "provenance": prov or provenance(),
        "benchmark": "blend_selection",
        "recompute": args.recompute,
        "questions": len(rows),
        "threads": threads,
        "load_1min": {"min": min(loads), "median": statistics.median(loads), "max": max(loads)},
        "command": "python benchmarks/blend_selection/blend_selection.py " + " ".join(sys.argv[1:]),
        "table": table,
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    if quiet:
        return
    print(
        "| method | accuracy | identical 32 | common prefix | median TTFT | speed-up "
        "| in facts | facts covered | in first 10% |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for t in table:
        print(
            f"| {t['method']} | {100 * t['accuracy']:.1f}% | {100 * t['identical_32_tokens']:.1f}% | "
            f"{100 * t['mean_common_prefix']:.1f}% | {t['ttft_median_s']:.3f} s | {t['speedup_median_ttft']:.1f}x | "
            + " | ".join(
                f"{100 * t[e]:.0f}%" if e in t else "" for e in ("in_facts", "facts_covered", "in_leading_10pct")
            )
            + " |"
        )


if __name__ == "__main__":
    main()
