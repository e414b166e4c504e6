"""Screen a stitch/blend variant on the first fidelity questions against the saved full-prefill answers.

Rebuilds the questions of ``benchmarks/fidelity/fidelity.py`` (same builder and seed, so the same
ids), reads the full prefill's (and the baseline stitch/blend) answers from the saved fidelity raw
files (``--baseline``, default: the current fidelity run), and runs only stitch and blend at
``--blend`` with the variant named by ``--priming`` / ``--span`` / ``--balanced`` (an
:class:`kv_rag.AttentionSelection` passed with each request). Each question's artifacts are computed
by an untimed warm-up call first. One JSON line per question; each run's provenance goes to
``<raw>.provenance.json`` beside the raw file.

    .venv/bin/python benchmarks/blend_selection/blend_screen.py --ids 0:40 --shard 0/2 --priming intro --raw R
    .venv/bin/python benchmarks/blend_selection/blend_screen.py --summary R             # counts of the rows
    .venv/bin/python benchmarks/blend_selection/blend_screen.py --tiny --baseline B --raw R   # smoke run
    .venv/bin/python benchmarks/blend_selection/blend_screen.py --ids 100:120 --recipes stitch,lead:16 --raw R
    .venv/bin/python benchmarks/blend_selection/blend_screen.py --report 'R.*of2.jsonl' OUT.json [BASELINE [CEILING]]

``--recipes`` runs named recipes instead of stitch and ``--blend`` (issue 16, part 3): ``stitch``,
``blend:R`` (the default attention selection), ``ape:T:S`` (stitch with APE attention,
:class:`kv_rag.ApeSettings`), ``lead:K`` (blend recomputing the first K tokens of every moved
document, ``LeadingSelection(per_document=K)``), ``narrow:FIRST:LAST`` (CacheBlend's layer-by-layer
narrowing, ``NarrowingSelection``; ``narrowatt:FIRST:LAST`` starts from the question's attention).
Question ids without a baseline row (calibration ids past the reported 100) run without one.

``--tiny`` needs a baseline from ``fidelity.py --tiny`` (the same tiny questions).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from kv_rag import ApeSettings, AttentionSelection, LeadingSelection, NarrowingSelection
from kv_rag.options import PRIMING_TEXT

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "fidelity"))

from fidelity import (  # noqa: E402
    CURRENT_RAW,
    MAX_NEW,
    N_DOCS,
    PASSAGE_TOKENS,
    TINY_K,
    TINY_NEW,
    TINY_PASSAGE_TOKENS,
    correct,
    questions,
    read_rows,
    record_run,
)

#: named filler passages for context-primed document encoding (``Engine(priming=...)``)
FILLERS = {
    "none": "",
    "intro": PRIMING_TEXT,
    "long": "Libraries keep written material so that it can be found again. A catalogue lists every work by "
    "its title, its author and its subject, and a reader who knows any one of these can follow it to the "
    "shelf where the work is kept. Most collections are arranged by subject, so that works on related "
    "questions stand near one another, and a reader who finds one useful book often finds others beside "
    "it. Reference works are different: they are not read from the first page to the last but consulted "
    "for a single fact, a definition or a short explanation, and they are written so that each entry can "
    "be understood on its own. Manuals, handbooks and encyclopaedias belong to this kind, as do the help "
    "pages of software, which describe one command, one function or one setting at a time and assume that "
    "the reader arrives from a search rather than from the previous page. Good reference text therefore "
    "repeats the names it needs, says plainly what each thing does, gives a short example where one helps, "
    "and points to related entries for the rest. A reader who searches such a collection usually receives "
    "several passages at once, only some of which answer the question, and must compare them before "
    "relying on any one.",
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ids", default="0:40")
    p.add_argument("--shard", default="0/1")
    p.add_argument("--blend", type=lambda s: [float(x) for x in s.split(",")], default=[0.15])
    p.add_argument("--priming", default="none")
    p.add_argument("--span", type=int, default=0, help="blend: AttentionSelection(span=N)")
    p.add_argument("--balanced", action="store_true", help="blend: AttentionSelection(balanced=True)")
    p.add_argument("--recipes", default="", help="comma-separated recipes (see above) instead of stitch and --blend")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--baseline", default=str(CURRENT_RAW), help="fidelity raw file (default: the current run)")
    p.add_argument("--raw", required=True)
    p.add_argument(
        "--tiny",
        action="store_true",
        help=f"smoke run: question 0 of fidelity.py --tiny's, {TINY_NEW} new tokens",
    )
    args = p.parse_args()
    k, target, max_new = (TINY_K, TINY_PASSAGE_TOKENS, TINY_NEW) if args.tiny else (N_DOCS, PASSAGE_TOKENS, MAX_NEW)
    if args.tiny:
        args.ids = "0:1"

    import torch

    from kv_rag import Engine, MemoryTier, Store

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    selection = AttentionSelection(span=args.span, balanced=args.balanced)
    a, b = (int(x) for x in args.ids.split(":"))
    si, sn = (int(x) for x in args.shard.split("/"))
    base = {r["id"]: r for r in read_rows(Path(args.baseline))}
    filler = FILLERS.get(args.priming, args.priming)
    engine = Engine(None, store=Store([MemoryTier(768 * 1024**2)]), device="cpu", dtype="float32", priming=filler)
    qs = [q for q in questions(engine.tokenizer, b, k, 7, target)[a:b] if q["id"] % sn == si]
    raw = Path(args.raw)
    record_run(raw)
    done = {json.loads(x)["id"] for x in raw.read_text().splitlines()} if raw.exists() else set()
    configs: list[tuple[str, dict[str, Any]]] = [("stitch", {"mode": "stitch"})] + [
        (f"blend r={r:g}", {"mode": "blend", "recompute": r, "selection": selection}) for r in args.blend
    ]
    if args.recipes:
        configs = [(name, recipe(name)) for name in args.recipes.split(",")]
    for q in qs:
        if q["id"] in done:
            continue
        ref = base.get(q["id"], {"full": None})
        engine.publish(q["docs"])
        prompt = engine.prompt(q["question"], q["docs"])
        if args.recipes:  # untimed: the first request after a publish pays for more than its own work
            engine.generate(prompt, mode="stitch", max_new_tokens=1)
        row: dict[str, Any] = {
            "id": q["id"],
            "answer": q["answer"],
            "priming": args.priming,
            "selection": repr(selection),
            "load_1min": os.getloadavg()[0],
            "threads": torch.get_num_threads(),
            "full": ref["full"],
            "base": {k: ref[k]["text"] for k in ref if k.startswith(("stitch", "blend")) and ref[k]},
        }
        for label, opts in configs:
            if args.recipes:
                row[label] = measured(engine, prompt, q, opts, max_new)
                continue
            g = engine.generate(prompt, max_new_tokens=max_new, **opts)
            row[label] = {"text": g.text, "tokens": g.token_ids, "ttft_s": g.ttft_s, "recomputed": g.recomputed_tokens}
        with raw.open("a") as f:
            f.write(json.dumps(row) + "\n")
        labels = (["full"] if row["full"] else []) + [c[0] for c in configs]
        marks = " ".join(f"{k}:{'Y' if correct(q['answer'], row[k]['text']) else 'n'}" for k in labels)
        print(f"q{q['id']:3d} load {row['load_1min']:.2f} {marks}", flush=True)


def measured(engine: Any, prompt: Any, q: dict[str, Any], opts: dict[str, Any], max_new: int) -> dict[str, Any]:
    """One recipe on one question as ``blend_ceiling.py`` measures it: TTFT is the prefill's time; the greedy
    answer; then the fact sentence fed after the prompt: the answer's log-prob and whether every answer token
    is the argmax (no full prefill needed)."""
    import time

    import torch

    from kv_rag.calibration import greedy, teacher_forced

    tok = engine.tokenizer
    tp = engine.tokenize(prompt)
    total = len(tp)
    sentence = q["fact"]
    at = sentence.rindex(q["answer"])
    cont = tok(sentence, add_special_tokens=False)["input_ids"]
    n_head = len(tok(sentence[:at].rstrip(), add_special_tokens=False)["input_ids"])
    n_upto = len(tok(sentence[: at + len(q["answer"])], add_special_tokens=False)["input_ids"])
    with torch.inference_mode():
        t0 = time.perf_counter()
        pre = engine.prefill(tp, reserve=max_new + len(cont), **opts)
        ttft = time.perf_counter() - t0
        tokens = greedy(engine.loaded, pre, total, max_new)
        for layer in pre.cache.layers:
            layer.truncate(total)
        lp, top, _ = teacher_forced(engine.loaded, pre, total, cont, slice(n_head, n_upto))
    return {
        "text": tok.decode(tokens, skip_special_tokens=True),
        "tokens": tokens,
        "ttft_s": ttft,
        "recomputed": pre.recomputed_tokens,
        "lp": lp,
        "top1": top,
    }


def recipe(name: str) -> dict[str, Any]:
    """Request options of a named recipe (``stitch``, ``blend:R``, ``ape:T:S``, ``lead:K``, ``narrow:F:L``)."""
    kind, *vals = name.split(":")
    if kind == "stitch" and not vals:
        return {"mode": "stitch"}
    if kind == "blend" and len(vals) == 1:
        return {"mode": "blend", "recompute": float(vals[0])}
    if kind == "ape" and len(vals) == 2:
        return {"mode": "stitch", "ape": ApeSettings(float(vals[0]), float(vals[1]))}
    if kind == "lead" and len(vals) == 1:
        return {"mode": "blend", "selection": LeadingSelection(per_document=int(vals[0]))}
    if kind in ("narrow", "narrowatt") and len(vals) == 2:
        crit = "attention" if kind == "narrowatt" else "deviation"
        sel = NarrowingSelection(first=float(vals[0]), last=float(vals[1]), criterion=crit)
        return {"mode": "blend", "selection": sel}
    raise SystemExit(f"unknown recipe {name!r}: stitch, blend:R, ape:T:S, lead:K, narrow:FIRST:LAST, narrowatt:F:L")


def summary(paths: list[str]) -> None:
    rows: dict[int, Any] = {}
    for pth in paths:
        for f in sorted(Path(pth).parent.glob(Path(pth).name)):
            for line in f.read_text().splitlines():
                r = json.loads(line)
                rows[r["id"]] = r
    if not rows:
        return
    fixed = {"id", "answer", "priming", "selection", "load_1min", "threads", "full", "base"}
    labels = [k for k in next(iter(rows.values())) if k not in fixed]
    n = len(rows)
    with_full = [r for r in rows.values() if r["full"]]
    out: dict[str, Any] = {"questions": n, "with_full": len(with_full)}
    out["full"] = sum(correct(r["answer"], r["full"]["text"]) for r in with_full)
    if with_full:
        ts = sorted(r["full"]["ttft_s"] for r in with_full)
        out["ttft full"] = ts[len(ts) // 2]
    for lab in labels:
        out[lab] = sum(correct(r["answer"], r[lab]["text"]) for r in rows.values())
        out["base " + lab] = sum(correct(r["answer"], r["base"].get(lab, "")) for r in rows.values() if "base" in r)
        out["same32 " + lab] = sum(r[lab]["tokens"][:MAX_NEW] == r["full"]["tokens"][:MAX_NEW] for r in with_full)
        ts = sorted(r[lab]["ttft_s"] for r in rows.values())
        out["ttft " + lab] = ts[len(ts) // 2]
        rec = sorted(r[lab].get("recomputed", 0) for r in rows.values())
        out["recomputed " + lab] = rec[len(rec) // 2]
        if all("lp" in r[lab] for r in rows.values()):
            out["lp " + lab] = round(sum(r[lab]["lp"] for r in rows.values()) / n, 3)
            out["top1 " + lab] = sum(r[lab]["top1"] for r in rows.values())
    out["load"] = sorted(r["load_1min"] for r in rows.values())[n // 2]
    print(json.dumps(out))


def report(pattern: str, out: str, baseline: str = str(CURRENT_RAW), ceiling: str = "") -> None:
    """The fidelity-table figures of recipe rows (``--recipes`` runs) matching ``pattern``, beside the
    baseline's full prefill, stitch and blend on the same question ids (and, with ``ceiling``, the
    blend_ceiling raw rows' answer log-probs), written to ``out`` with this run's provenance."""
    import statistics

    from kv_rag.bench import provenance

    rows: dict[int, Any] = {}
    for f in sorted(Path(pattern).parent.glob(Path(pattern).name)):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            rows[r["id"]] = r
    ids = sorted(rows)
    base = {r["id"]: r for r in read_rows(Path(baseline))}
    ceil = {r["id"]: r for r in read_rows(Path(ceiling))} if ceiling else {}
    fixed = {"id", "answer", "priming", "selection", "load_1min", "threads", "full", "base"}
    labels = [k for k in rows[ids[0]] if k not in fixed]
    full_all = statistics.median(r["full"]["ttft_s"] for r in base.values())

    def figures(get: Any) -> dict[str, Any]:
        got = [(i, get(i)) for i in ids]
        got = [(i, g) for i, g in got if g is not None]
        ref = {i: base[i]["full"]["tokens"][:MAX_NEW] for i, _ in got}
        prefix = [
            next((j for j, (a, b) in enumerate(zip(g["tokens"], ref[i], strict=False)) if a != b), len(ref[i]))
            / max(1, len(ref[i]))
            for i, g in got
        ]
        ttft = statistics.median(g["ttft_s"] for _, g in got)
        fig: dict[str, Any] = {
            "questions": len(got),
            "accuracy": sum(correct(rows[i]["answer"], g["text"]) for i, g in got) / len(got),
            "identical_32": sum(g["tokens"][:MAX_NEW] == ref[i] for i, g in got) / len(got),
            "mean_common_prefix": statistics.mean(prefix),
            "median_ttft_s": ttft,
            "speedup_vs_baseline_full": full_all / ttft,
        }
        if all("lp" in g for _, g in got):
            fig["answer_logprob_mean"] = statistics.mean(g["lp"] for _, g in got)
            fig["answer_top1"] = sum(bool(g["top1"]) for _, g in got) / len(got)
        if all("recomputed" in g for _, g in got):
            fig["recomputed_median"] = statistics.median(g["recomputed"] for _, g in got)
        return fig

    result: dict[str, Any] = {
        "rows": pattern,
        "ids": [ids[0], ids[-1]],
        "load_1min": [min(r["load_1min"] for r in rows.values()), max(r["load_1min"] for r in rows.values())],
        "load_1min_median": statistics.median(r["load_1min"] for r in rows.values()),
        "baseline_full_median_ttft_s_all": full_all,
        "baseline": {
            "full": figures(lambda i: base[i]["full"]),
            "stitch": figures(lambda i: base[i].get("stitch")),
            "blend r=0.15": figures(lambda i: base[i].get("blend r=0.15")),
        },
        "recipes": {lab: figures(lambda i, lab=lab: rows[i][lab]) for lab in labels},
    }
    if ceil:
        for name, key in (("full", "full"), ("stitch", "stitch"), ("blend r=0.15", "attention r=0.15")):
            have = [ceil[i][key] for i in ids if i in ceil]
            result["baseline"][name]["ceiling_answer_logprob_mean"] = statistics.mean(h["lp"] for h in have)
            result["baseline"][name]["ceiling_answer_top1"] = sum(bool(h["top1"]) for h in have) / len(have)
    result["provenance"] = provenance()
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--summary":
        summary(sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "--report":
        report(*sys.argv[2:])
    else:
        main()
