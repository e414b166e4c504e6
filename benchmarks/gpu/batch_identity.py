"""Does a request's arithmetic depend on its neighbours in the batched steps?

Eight caches of random tokens (a Qwen3-4B-shaped model with random weights, or ``--tiny``); each
request's prompt tail (16-19 tokens) and ``--steps`` greedy decode steps run (A) alone, (B) all eight
together, (A2) alone again, through ``ModelRuntime.forward_batch`` (the scheduler's step, without the
scheduler); the logits of every step are compared bit for bit. On CUDA the batched graphs are meant
to give a request the same bits whichever requests share its step; on the CPU the ragged step's
matrix products round with the batch (differences of about 1e-5 are expected there).

    python benchmarks/gpu/batch_identity.py --out OUT.json                      # CUDA (about 60 s on an H200)
    python benchmarks/gpu/batch_identity.py --tiny --device cpu --out /tmp/i.json  # smoke run

Writes ``--out`` (default ``$KV_RAG_HOME/bench/gpu/batch_identity.json``) with its provenance.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gpu_bench import QWEN3_4B_SHAPE, TINY_SHAPE, build_model

from kv_rag.bench import provenance, results_dir
from kv_rag.runtime import ModelRuntime

TAILS = (16, 19, 17, 17, 16, 19, 17, 17)


Logits = dict[int, list[torch.Tensor]]


def run(
    rt: ModelRuntime, prompts: list[torch.Tensor], tails: list[tuple[int, ...]], groups: list[list[int]], steps: int
) -> Logits:
    """Each group of requests stepped together (fresh caches): per request the logits of every step."""
    n = prompts[0].shape[1]
    out: Logits = {i: [] for i in range(len(prompts))}
    for group in groups:
        caches: dict[int, Any] = {}
        for i in group:
            caches[i] = rt.new_cache(n + max(len(t) for t in tails) + steps + 8)
            rt.forward(prompts[i], caches[i], 0)
        logits = rt.forward_batch([(tails[i], caches[i], n) for i in group])
        toks = {i: int(logits[r].argmax()) for r, i in enumerate(group)}
        for r, i in enumerate(group):
            out[i].append(logits[r].float().cpu())
        pos = {i: n + len(tails[i]) for i in group}
        for _ in range(steps):
            logits = rt.forward_batch([((toks[i],), caches[i], pos[i]) for i in group])
            for r, i in enumerate(group):
                out[i].append(logits[r].float().cpu())
                toks[i] = int(logits[r].argmax())
                pos[i] += 1
        del caches
    return out


def first_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> int | None:
    """The first step whose logits are not bit-identical (``None``: all equal)."""
    return next((s for s, (x, y) in enumerate(zip(a, b, strict=True)) if not torch.equal(x, y)), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a tiny Qwen3 and 96-token caches")
    ap.add_argument("--length", type=int, default=None, help="cached tokens per request (default 4123; --tiny: 96)")
    ap.add_argument("--steps", type=int, default=24, help="greedy decode steps after the tail")
    ap.add_argument("--out", default=str(results_dir("gpu") / "batch_identity.json"))
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = build_model(TINY_SHAPE if args.tiny else QWEN3_4B_SHAPE, device, dtype)
    rt = ModelRuntime(model)
    length = args.length or (96 if args.tiny else 4123)
    vocab = int(model.config.vocab_size)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, vocab, (1, length), generator=g).to(device) for _ in TAILS]
    tails = [tuple(int(t) for t in torch.randint(0, vocab, (k,), generator=g)) for k in TAILS]
    everyone = list(range(len(TAILS)))
    with torch.inference_mode():
        alone = run(rt, prompts, tails, [[i] for i in everyone], args.steps)
        together = run(rt, prompts, tails, [everyone], args.steps)
        again = run(rt, prompts, tails, [[i] for i in everyone], args.steps)
    rows = []
    for i in everyone:
        tokens_a = [int(x.argmax()) for x in alone[i]]
        tokens_b = [int(x.argmax()) for x in together[i]]
        row = {
            "request": i,
            "tail_tokens": TAILS[i],
            # the first step (0: the tail's logits) whose logits differ between alone and together
            "logits_differ_from_step": first_difference(alone[i], together[i]),
            "first_logits_max_diff": float((alone[i][0] - together[i][0]).abs().max()),
            "alone_twice_differ_from_step": first_difference(alone[i], again[i]),
            "tokens_differ_from": next(
                (s for s, (x, y) in enumerate(zip(tokens_a, tokens_b, strict=True)) if x != y), None
            ),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        "provenance": provenance(),
        "benchmark": "batch_identity",
        "model": "tiny Qwen3" if args.tiny else "Qwen3-4B-shaped",
        "device": str(device),
        "dtype": str(dtype),
        "cached_tokens": length,
        "steps": args.steps,
        "paths": dict(rt.batch_paths),
        "identical": sum(r["logits_differ_from_step"] is None for r in rows),
        "requests": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{result['identical']} of {len(rows)} requests bit-identical alone and together; wrote {out}")


if __name__ == "__main__":
    main()
