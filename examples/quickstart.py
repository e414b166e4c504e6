"""Quickstart: publish a document's KV once, then answer questions by loading it.

Run: .venv/bin/python examples/quickstart.py   (CI runs it too: tests/test_examples.py)
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from kv_rag import Engine

CORPUS = Path(__file__).resolve().parents[1] / "kv_rag" / "corpus"


def main(store: str) -> int:
    engine = Engine(store=store)  # embedded SmolLM2-135M-Instruct; memory tier in front of `store`
    doc = (CORPUS / "for-statement.md").read_text(encoding="utf-8")
    report = engine.publish([doc], sources=["for-statement.md"])[0]
    print(f"published {report.tokens} tokens as {report.key[:16]}… ({report.cache.value})")

    question = "What does the else clause of a for loop do?"
    cold = engine.generate(question, [doc], max_new_tokens=32, use_cache=False)
    warm = engine.generate(question, [doc], max_new_tokens=32)
    print("answer:", warm.text.strip())
    print(
        f"TTFT without cache {cold.ttft_s:.3f} s, with cache {warm.ttft_s:.3f} s; "
        f"{warm.cached_tokens}/{warm.prompt_tokens} prompt tokens loaded"
    )
    print("streaming:", end=" ")
    for piece in engine.stream("What does the break statement do in a for loop?", [doc], max_new_tokens=24):
        print(piece, end="", flush=True)
    print()
    return 0 if cold.token_ids == warm.token_ids else 1


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else tmp))
