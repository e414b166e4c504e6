"""How far can blend's token choice go? Selection methods against oracles that know the full prefill.

Runs the fidelity questions (``benchmarks/fidelity/fidelity.py``: same builder, same seed, same ids)
with blend at ``--recompute`` under several ways of choosing the recomputed tokens, each a
:class:`kv_rag.Selector` passed with the request (``selection=``):

- ``attention``: the library's default (the tokens the question attends to in the stitched cache);
- ``random``: uniform over the moved documents' tokens (seeded by the question id);
- ``deviation L1``: CacheBlend's criterion (KV deviation from a fresh computation at layer 1);
- ``oracle deviation``: the tokens whose stitched KV differs most from the *full prefill's* KV,
  summed over every layer (what CacheBlend's criterion estimates, known exactly);
- ``oracle attention``: the tokens the question attends to when the documents hold the *full
  prefill's* KV (where the full prefill actually reads from).

The oracles need the full prefill of the same prompt, so they are measurements, not modes. With
``--sweep`` the default selection also runs at more fractions. Per question and method: the greedy
answer (32 tokens, decoded here on the prefill's cache; accuracy and agreement with the full
prefill's answer, which is read from the fidelity run's raw file, ``--baseline``), the prefill time
(TTFT), and a teacher-forced view that does not depend on how
the answer is phrased: the fact sentence holding the answer is fed after the prompt, and the log-prob
of the answer's tokens, whether each is the argmax ("answer top-1"), and the KL divergence of the
first answer token's distribution from the full prefill's are recorded.

    .venv/bin/python benchmarks/blend_ceiling/blend_ceiling.py --questions 100 --threads 1 --shard 0/2   # and 1/2
    .venv/bin/python benchmarks/blend_ceiling/blend_ceiling.py --summarize               # JSON + PNG + table
    .venv/bin/python benchmarks/blend_ceiling/blend_ceiling.py --tiny --baseline B --raw R --out O  # smoke run

Without ``--raw``/``--out`` it writes under ``$KV_RAG_HOME/bench/blend_ceiling/``, never into the
checkout. ``--tiny`` needs a baseline from ``fidelity.py --tiny`` (the same tiny questions).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from kv_rag import BlendView
from kv_rag.assemble import BlendRequest
from kv_rag.bench import provenance, results_dir
from kv_rag.calibration import greedy, kl_divergence, teacher_forced

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
    agreement,
    correct,
    parse_shard,
    pyplot,
    questions,
    read_rows,
    record_run,
    runs_of,
    shard_path,
)

OUT_DIR = results_dir("blend_ceiling")
FACT = re.compile(
    r"The access code for vault \d+ is \d+\.|The ferry to [\w ]+ leaves from pier \d+\.|"
    r"Professor \w+'s office is in room \d+\.|The password of the \w+ server is \w+\."
)
METHODS = ("attention", "random", "deviation L1", "oracle deviation", "oracle attention")


def _answer_sentence(q: dict[str, Any]) -> str:
    """The inserted fact sentence that holds ``q``'s answer."""
    for doc in q["docs"]:
        for s in FACT.findall(doc):
            if correct(q["answer"], s.rsplit(" ", 1)[-1]):
                return s
    raise ValueError(f"question {q['id']}: no fact sentence holds {q['answer']!r}")


def _candidates(view: BlendView, n: int) -> tuple[torch.Tensor, int]:
    """The moved documents' positions and how many of them to take (at most all of them)."""
    cand = view.moved_positions()
    return cand, min(n, int(cand.numel()))


def _top(cand: torch.Tensor, scores: torch.Tensor, n: int) -> torch.Tensor:
    return torch.sort(cand[torch.topk(scores.cpu(), n).indices]).values


class RandomSelection:
    """Uniform over the moved documents' tokens, seeded (by the question id)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def select(self, view: BlendView, n: int) -> torch.Tensor:
        """``n`` random moved-document positions."""
        cand, n = _candidates(view, n)
        gen = torch.Generator().manual_seed(self.seed)
        return torch.sort(cand[torch.randperm(int(cand.numel()), generator=gen)[:n]]).values


class DeviationL1Selection:
    """CacheBlend's criterion: KV deviation from a fresh computation at layer 1, over the moved documents."""

    def select(self, view: BlendView, n: int) -> torch.Tensor:
        """The ``n`` moved-document positions whose layer-1 KV deviates most."""
        cand, n = _candidates(view, n)
        return _top(cand, view.deviation_scores(cand, [1]), n)


class OracleDeviationSelection:
    """The tokens whose stitched KV differs most from the full prefill's KV (``full_kv``), summed over layers."""

    def __init__(self, full_kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.full_kv = full_kv

    def select(self, view: BlendView, n: int) -> torch.Tensor:
        """The ``n`` moved-document positions farthest from the full prefill's KV."""
        if not isinstance(view, BlendRequest):
            raise TypeError("the oracle reads the stitched cache: it needs kv_rag.assemble.BlendRequest")
        cand, n = _candidates(view, n)
        scores = torch.zeros(int(cand.numel()))
        for layer, (fk, fv) in zip(view.cache.layers, self.full_kv, strict=True):
            for old, new in ((layer.keys[0], fk[0]), (layer.values[0], fv[0])):
                o, f = old.index_select(1, cand).float(), new.index_select(1, cand).float()
                scores += (f - o).pow(2).sum(dim=(0, 2)) / f.pow(2).sum(dim=(0, 2)).mean().clamp_min(1e-12)
        return _top(cand, scores, n)


class OracleAttentionSelection:
    """The tokens the question attends to (every layer) when the documents hold the full prefill's KV."""

    def __init__(self, full_kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.full_kv = full_kv

    def select(self, view: BlendView, n: int) -> torch.Tensor:
        """The ``n`` moved-document positions with the most attention, scored on the full prefill's KV."""
        if not isinstance(view, BlendRequest):
            raise TypeError("the oracle swaps the stitched cache's KV: it needs kv_rag.assemble.BlendRequest")
        cand, n = _candidates(view, n)
        a, b = view.lead_length, view.chain_end
        saved = []
        for layer, (fk, fv) in zip(view.cache.layers, self.full_kv, strict=True):
            saved.append((layer.keys[..., a:b, :].clone(), layer.values[..., a:b, :].clone()))
            layer.keys[..., a:b, :].copy_(fk[..., a:b, :])
            layer.values[..., a:b, :].copy_(fv[..., a:b, :])
        try:
            scores = view.attention_scores(cand, list(range(view.num_layers)))
        finally:
            for layer, (k, v) in zip(view.cache.layers, saved, strict=True):
                layer.keys[..., a:b, :].copy_(k)
                layer.values[..., a:b, :].copy_(v)
        if scores is None:
            raise RuntimeError("this model's attention cannot be read (no question or no q_proj)")
        return _top(cand, scores, n)


def selector(method: str, question_id: int, full_kv: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    """The selector of ``method`` for one question (``None``: the library's default, attention)."""
    if method == "attention":
        return None
    if method == "random":
        return RandomSelection(question_id)
    if method == "deviation L1":
        return DeviationL1Selection()
    if method == "oracle deviation":
        return OracleDeviationSelection(full_kv)
    if method == "oracle attention":
        return OracleAttentionSelection(full_kv)
    raise ValueError(f"unknown method {method!r}")


def run(args: argparse.Namespace) -> None:
    from kv_rag import Engine, MemoryTier, Store
    from kv_rag.runtime import cache_layers

    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    base = {r["id"]: r for r in read_rows(Path(args.baseline))}
    if not base:
        raise SystemExit(f"no full-prefill answers in {args.baseline}: run benchmarks/fidelity/fidelity.py first")
    engine = Engine(None, store=Store([MemoryTier(768 * 1024**2)]), device="cpu", dtype="float32")
    tok = engine.tokenizer
    configs = [("stitch", "stitch", None, "attention")]
    configs += [(f"{m} r={args.recompute:g}", "blend", args.recompute, m) for m in METHODS]
    configs += [(f"attention r={r:g}", "blend", r, "attention") for r in args.sweep]
    shard, n_shards = args.shard
    qs = questions(tok, args.questions + 1, args.k, 7, args.passage_tokens)
    warm = qs.pop()
    raw = shard_path(Path(args.raw), args.shard)
    record_run(raw)
    done = {r["id"] for r in read_rows(Path(args.raw))}
    engine.publish(warm["docs"])
    engine.generate(warm["question"], warm["docs"], mode="blend", max_new_tokens=2)
    for q in qs:
        if q["id"] % n_shards != shard or q["id"] in done:
            continue
        ref = base[q["id"]]
        load = os.getloadavg()[0]
        engine.publish(q["docs"])
        prompt = engine.prompt(q["question"], q["docs"])
        tp = engine.tokenize(prompt)
        total = len(tp)
        sentence = _answer_sentence(q)
        head = sentence[: sentence.rindex(q["answer"])].rstrip()
        cont = tok(sentence, add_special_tokens=False)["input_ids"]
        n_head = len(tok(head, add_special_tokens=False)["input_ids"])
        n_upto = len(
            tok(sentence[: sentence.rindex(q["answer"]) + len(q["answer"])], add_special_tokens=False)["input_ids"]
        )
        span = slice(n_head, n_upto)
        row: dict[str, Any] = {
            "id": q["id"],
            "answer": q["answer"],
            "answer_doc": q["answer_doc"],
            "load_1min": load,
            "threads": torch.get_num_threads(),
            "shard": f"{shard}/{n_shards}",
        }
        with torch.inference_mode():
            t0 = time.perf_counter()
            full = engine.prefill(tp, use_cache=False)
            full_s = time.perf_counter() - t0
            full_kv = [(k.clone(), v.clone()) for k, v in cache_layers(full.cache)]
            lp, top, p_full = teacher_forced(engine.loaded, full, total, cont, span)
        del full
        row["full"] = {**ref["full"], "prefill_s": full_s, "lp": lp, "top1": top}
        for label, mode, r, method in configs:
            chosen = selector(method, q["id"], full_kv)
            with torch.inference_mode():
                t0 = time.perf_counter()
                pre = engine.prefill(tp, mode=mode, recompute=r, selection=chosen, reserve=args.max_new + len(cont))
                ttft = time.perf_counter() - t0
                tokens = greedy(engine.loaded, pre, total, args.max_new)
                for layer in pre.cache.layers:
                    layer.truncate(total)
                lp, top, p = teacher_forced(engine.loaded, pre, total, cont, span)
            kl = kl_divergence(p_full[0], p[0])  # the first answer token's
            row[label] = {
                "text": tok.decode(tokens, skip_special_tokens=True),
                "tokens": tokens,
                "ttft_s": ttft,
                "recomputed_tokens": pre.recomputed_tokens,
                "lp": lp,
                "top1": top,
                "kl_first_answer_token": kl,
            }
        del full_kv
        with raw.open("a") as f:
            f.write(json.dumps(row) + "\n")
        marks = " ".join(
            f"{lab.split(' r=')[0][:6]}:{'Y' if correct(q['answer'], row[lab]['text']) else 'n'}"
            for lab in ["full", *(c[0] for c in configs)]
        )
        print(f"q{q['id']:3d} load {load:.2f} full {full_s:.2f}s {marks}", flush=True)


def summarize(args: argparse.Namespace) -> dict[str, Any]:
    rows = read_rows(Path(args.raw))
    if not rows:
        raise SystemExit(f"no results in {args.raw}: run without --summarize first")
    labels = [k for k in rows[0] if isinstance(rows[0][k], dict)]
    full_s = statistics.median(r["full"]["prefill_s"] for r in rows)
    table = []
    for lab in labels:
        xs = [r[lab] for r in rows]
        entry: dict[str, Any] = {
            "mode": lab,
            **agreement(rows, lab),
            "answer_top1": sum(x["top1"] for x in xs) / len(rows),
            "answer_logprob_mean": statistics.mean(x["lp"] for x in xs),
        }
        if lab == "full":
            entry["ttft_median_s"] = full_s
        else:
            entry["ttft_median_s"] = statistics.median(x["ttft_s"] for x in xs)
            entry["kl_first_answer_token_mean"] = statistics.mean(x["kl_first_answer_token"] for x in xs)
        entry["speedup_median_ttft"] = full_s / entry["ttft_median_s"]
        table.append(entry)
    loads = [r["load_1min"] for r in rows]
    result = {
        "provenance": {**provenance(), "raw_runs": runs_of(Path(args.raw))},
        "benchmark": "blend_ceiling",
        "model": "SmolLM2-135M-Instruct (embedded), float32, CPU",
        "questions": len(rows),
        "full_prefill": "engine.prefill(use_cache=False) of the same tokens, timed here; its greedy answer from "
        + str(args.baseline),
        "load_1min": {"min": min(loads), "median": statistics.median(loads), "max": max(loads)},
        "cpu_count": os.cpu_count(),
        "torch_threads_per_process": sorted({r.get("threads", 0) for r in rows}),
        "shards": sorted({r.get("shard", "0/1") for r in rows}),
        "command": "python benchmarks/blend_ceiling/blend_ceiling.py " + " ".join(sys.argv[1:]),
        "run_as": f"python benchmarks/blend_ceiling/blend_ceiling.py --questions {len(rows)} --threads "
        + ",".join(str(t) for t in sorted({r.get("threads", 0) for r in rows}))
        + f" --shard i/{len({r.get('shard', '0/1') for r in rows})}, the shards at once",
        "table": table,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    _plot(result, out.with_suffix(".png"))
    return result


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| mode | accuracy | identical 32 tokens | answer top-1 (forced) | answer log-prob | KL first answer token "
        "| median TTFT | speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in result["table"]:
        kl = f"{t['kl_first_answer_token_mean']:.3f}" if "kl_first_answer_token_mean" in t else "-"
        lines.append(
            f"| {t['mode']} | {100 * t['accuracy']:.0f}% | {100 * t['identical_32_tokens']:.0f}% | "
            f"{100 * t['answer_top1']:.0f}% | {t['answer_logprob_mean']:.2f} | {kl} | "
            f"{t['ttft_median_s']:.2f} s | {t['speedup_median_ttft']:.1f}x |"
        )
    return "\n".join(lines)


def _plot(result: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    full = next(t for t in result["table"] if t["mode"] == "full")
    ax.axhspan(
        100 * full["accuracy"] - 2, 100 * full["accuracy"], color="green", alpha=0.1, label="within 2 points of full"
    )
    ax.axvline(3, color="grey", ls=":", lw=1)
    for t in result["table"]:
        marker = "*" if t["mode"].startswith("oracle") else "o"
        ax.plot(t["speedup_median_ttft"], 100 * t["accuracy"], marker, ms=9 if marker == "*" else 6)
        ax.annotate(
            t["mode"],
            (t["speedup_median_ttft"], 100 * t["accuracy"]),
            textcoords="offset points",
            xytext=(4, 3),
            fontsize=7,
        )
    ax.set_xscale("log")
    ax.set_xlabel("TTFT speed-up over full prefill (median, log scale)")
    ax.set_ylabel("answer accuracy, %")
    ax.set_title(
        f"blend token choice vs oracles: {result['questions']} questions (load {result['load_1min']['median']:.1f})"
    )
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--questions", type=int, default=100)
    p.add_argument("--recompute", type=float, default=0.15)
    p.add_argument("--sweep", type=lambda s: [float(x) for x in s.split(",") if x], default=[0.5])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--baseline", default=str(CURRENT_RAW), help="fidelity raw file (full answers; default: current)")
    p.add_argument("--raw", default=str(OUT_DIR / "raw.jsonl"))
    p.add_argument("--out", default=str(OUT_DIR / "blend_ceiling.json"))
    p.add_argument("--summarize", action="store_true")
    p.add_argument("--shard", type=parse_shard, default=(0, 1), help="i/n: only questions with id %% n == i")
    p.add_argument(
        "--tiny",
        action="store_true",
        help=f"smoke run: fidelity.py --tiny's question (1, from --baseline), no sweep, {TINY_NEW} new tokens",
    )
    args = p.parse_args()
    args.k, args.passage_tokens, args.max_new = N_DOCS, PASSAGE_TOKENS, MAX_NEW
    if args.tiny:
        args.questions, args.sweep = 1, []
        args.k, args.passage_tokens, args.max_new = TINY_K, TINY_PASSAGE_TOKENS, TINY_NEW
    if not args.summarize:
        run(args)
        if args.shard[1] > 1:
            return
    summarize(args)


if __name__ == "__main__":
    main()
