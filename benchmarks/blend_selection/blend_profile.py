"""Where blend's time goes: wall time of each step of a stitch/blend prefill, per recompute fraction.

Patches timers around the steps of ``kv_rag.stitch._Assembler`` (leading chain, documents, selection,
the recompute pass) and reports their medians over ``--questions`` fidelity questions, next to a full
prefill's. Records the 1-minute load and torch threads.

    .venv/bin/python benchmarks/blend_profile.py --questions 4 --threads 1 --blend 0,0.15,0.3
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
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from fidelity import RESULTS, questions  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--questions", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--blend", type=lambda s: [float(x) for x in s.split(",")], default=[0.0, 0.15, 0.3])
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS / "blend_profile.json"))
    args = p.parse_args()

    import torch

    from kv_rag import Engine, stitch
    from kv_rag.store import MemoryTier, Store

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    engine = Engine(None, store=Store([MemoryTier(768 * 1024**2)]), device="cpu", dtype="float32")
    times: dict[str, float] = defaultdict(float)

    def timed(name: str, fn: Any) -> Any:
        def wrap(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                times[name] += time.perf_counter() - t

        return wrap

    A = stitch._Assembler
    A._document = timed("documents (load + move)", A._document)  # type: ignore[method-assign]
    A._choose = timed("selection (question attention pass)", A._choose)  # type: ignore[method-assign]
    A._compute = timed("recompute pass (glue + suffix + selected)", A._compute)  # type: ignore[method-assign]
    A._mask = timed("  of which: masks", A._mask)  # type: ignore[method-assign]
    qs = questions(engine.tokenizer, args.questions + 1, 4, 7)
    samples: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for qi, q in enumerate(qs):
        engine.publish(q["docs"])
        prompt = engine.prompt(q["question"], q["docs"])
        for rep in range(args.repeat + (1 if qi == 0 else 0)):
            runs = [("full", None)] + [(f"blend r={r:g}", r) for r in args.blend]
            for label, r in runs:
                times.clear()
                t = time.perf_counter()
                if r is None:
                    engine.prefill(prompt, use_cache=False)
                else:
                    engine.prefill(prompt, mode="blend", recompute=r)
                total = time.perf_counter() - t
                if qi == 0 and rep == 0:
                    continue  # warm-up
                samples[label]["total"].append(total)
                for k, v in times.items():
                    samples[label][k].append(v)
        if qi + 1 >= args.questions:
            break
    result = {
        "benchmark": "blend_profile",
        "load_1min": os.getloadavg()[0],
        "threads": torch.get_num_threads(),
        "questions": args.questions,
        "repeat": args.repeat,
        "median_s": {lab: {k: statistics.median(v) for k, v in d.items()} for lab, d in samples.items()},
    }
    print(json.dumps(result, indent=1))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
