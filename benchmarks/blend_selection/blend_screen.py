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

from kv_rag import AttentionSelection
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
    configs = [("stitch", "stitch", None)] + [(f"blend r={r:g}", "blend", r) for r in args.blend]
    for q in qs:
        if q["id"] in done:
            continue
        ref = base[q["id"]]
        engine.publish(q["docs"])
        prompt = engine.prompt(q["question"], q["docs"])
        row: dict[str, Any] = {
            "id": q["id"],
            "answer": q["answer"],
            "priming": args.priming,
            "selection": repr(selection),
            "load_1min": os.getloadavg()[0],
            "threads": torch.get_num_threads(),
            "full": ref["full"],
            "base": {k: ref[k]["text"] for k in ref if k.startswith(("stitch", "blend"))},
        }
        for label, mode, r in configs:
            g = engine.generate(prompt, mode=mode, recompute=r, selection=selection, max_new_tokens=max_new)
            row[label] = {"text": g.text, "tokens": g.token_ids, "ttft_s": g.ttft_s}
        with raw.open("a") as f:
            f.write(json.dumps(row) + "\n")
        marks = " ".join(
            f"{k}:{'Y' if correct(q['answer'], row[k]['text']) else 'n'}" for k in ["full"] + [c[0] for c in configs]
        )
        print(f"q{q['id']:3d} load {row['load_1min']:.2f} {marks}", flush=True)


def summary(paths: list[str]) -> None:
    rows: dict[int, Any] = {}
    for pth in paths:
        for f in sorted(Path(pth).parent.glob(Path(pth).name)):
            for line in f.read_text().splitlines():
                r = json.loads(line)
                rows[r["id"]] = r
    if not rows:
        return
    labels = [k for k in next(iter(rows.values())) if k.startswith(("stitch", "blend"))]
    n = len(rows)
    out = {"questions": n, "full": sum(correct(r["answer"], r["full"]["text"]) for r in rows.values())}
    for lab in labels:
        out[lab] = sum(correct(r["answer"], r[lab]["text"]) for r in rows.values())
        out["base " + lab] = sum(correct(r["answer"], r["base"].get(lab, "")) for r in rows.values())
        out["same32 " + lab] = sum(r[lab]["tokens"][:MAX_NEW] == r["full"]["tokens"][:MAX_NEW] for r in rows.values())
        ts = sorted(r[lab]["ttft_s"] for r in rows.values())
        out["ttft " + lab] = ts[len(ts) // 2]
    out["load"] = sorted(r["load_1min"] for r in rows.values())[n // 2]
    print(json.dumps(out))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--summary":
        summary(sys.argv[2:])
    else:
        main()
