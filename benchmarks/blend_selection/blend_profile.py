"""Where blend's time goes: wall time of each step of a stitch/blend prefill, per recompute fraction.

Reads each prefill's step timings (:attr:`kv_rag.Prefill.timings`: leading chain, documents,
selection, the recompute pass) and reports their medians over ``--questions`` fidelity questions,
next to a full prefill's. Records the 1-minute load and torch threads.

    .venv/bin/python benchmarks/blend_selection/blend_profile.py --questions 4 --threads 1 --blend 0,0.15,0.3
    .venv/bin/python benchmarks/blend_selection/blend_profile.py --tiny --out DIR/profile.json   # smoke run

Without ``--out`` it writes under ``$KV_RAG_HOME/bench/blend_profile/``, never into the checkout.
The 2026-11-29 result was measured with timers patched around private methods, which also timed the
attention masks inside the recompute pass (``"  of which: masks"``); :attr:`~kv_rag.Prefill.timings`
has no such split, so that line is gone, and ``"lead (leading chain)"`` is new.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

from kv_rag.bench import provenance, results_dir

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "fidelity"))

from fidelity import N_DOCS, PASSAGE_TOKENS, TINY_K, TINY_PASSAGE_TOKENS, questions  # noqa: E402

#: table labels of the steps in :attr:`kv_rag.Prefill.timings` (the labels of the earlier results)
STEPS = {
    "lead": "lead (leading chain)",
    "documents": "documents (load + move)",
    "selection": "selection (question attention pass)",
    "compute": "recompute pass (glue + suffix + selected)",
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--questions", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--blend", type=lambda s: [float(x) for x in s.split(",")], default=[0.0, 0.15, 0.3])
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--out", default=str(results_dir("blend_profile") / "blend_profile.json"))
    p.add_argument(
        "--tiny", action="store_true", help=f"smoke run: 1 question of {TINY_K} short documents, blend 0.15, 1 repeat"
    )
    args = p.parse_args()
    k, target = (TINY_K, TINY_PASSAGE_TOKENS) if args.tiny else (N_DOCS, PASSAGE_TOKENS)
    if args.tiny:
        args.questions, args.blend, args.repeat = 1, [0.15], 1

    import torch

    from kv_rag import Engine, MemoryTier, Store

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    prov = provenance()
    engine = Engine(None, store=Store([MemoryTier(768 * 1024**2)]), device="cpu", dtype="float32")
    qs = questions(engine.tokenizer, args.questions + 1, k, 7, target)
    samples: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for qi, q in enumerate(qs):
        engine.publish(q["docs"])
        prompt = engine.prompt(q["question"], q["docs"])
        for rep in range(args.repeat + (1 if qi == 0 else 0)):
            runs = [("full", None)] + [(f"blend r={r:g}", r) for r in args.blend]
            for label, r in runs:
                t = time.perf_counter()
                if r is None:
                    pre = engine.prefill(prompt, use_cache=False)
                else:
                    pre = engine.prefill(prompt, mode="blend", recompute=r)
                total = time.perf_counter() - t
                if qi == 0 and rep == 0:
                    continue  # warm-up
                samples[label]["total"].append(total)
                for step, v in pre.timings.items():
                    if step == "selection" and r == 0:
                        continue  # nothing to select at r = 0 (the earlier timers never ran there)
                    samples[label][STEPS.get(step, step)].append(v)
                del pre
        if qi + 1 >= args.questions:
            break
    result = {
        "provenance": prov,
        "benchmark": "blend_profile",
        "load_1min": os.getloadavg()[0],
        "threads": torch.get_num_threads(),
        "questions": args.questions,
        "repeat": args.repeat,
        "median_s": {lab: {k: statistics.median(v) for k, v in d.items()} for lab, d in samples.items()},
    }
    print(json.dumps(result, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
