"""GPU benchmark: cache hits from the GPU, pinned-host and disk tiers against full prefill.

Runs on a CUDA machine with a Qwen3-4B-shaped model with random bf16 weights built in place
(36 layers, hidden 2560, 32 query / 8 KV heads, head_dim 128, vocab 151936, rope_theta 1e6,
intermediate 9728): compute cost does not depend on the weights' values. Writes ``--out`` (default:
``$KV_RAG_HOME/bench/gpu/gpu_bench.json``, never into the checkout; a PNG beside it when matplotlib
is present) with its provenance, and prints a table.

    python benchmarks/gpu/gpu_bench.py --tokenizer DIR --out benchmarks/gpu/results/DATE-gpu_bench.json  # GPU
    python benchmarks/gpu/gpu_bench.py --tiny --device cpu --out DIR/gpu_bench.json  # smoke run of every step

Per length: full-prefill TTFT (plain transformers, sdpa); hit TTFT with the document's KV in the
GPU, pinned-host and disk tier (every hit goes through ``Engine.prefill``: store look-up, token
check, copy into the request's cache, suffix prefill, first token); the transfer bound (KV bytes
over the host-to-GPU bandwidth measured in this run); the disk's own read speed on the artifact's
file (page cache dropped first); decode tokens/s after a hit; logits difference and greedy tokens
of the hit path against a from-scratch prefill.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from kv_rag import Engine, TokenizedPrompt  # noqa: E402
from kv_rag.bench import drop_page_cache, provenance, results_dir  # noqa: E402
from kv_rag.layout import roomy_block  # noqa: E402
from kv_rag.store import DiskTier, GpuTier, PinnedTier, Store  # noqa: E402

QWEN3_4B_SHAPE: dict[str, Any] = dict(
    vocab_size=151936,
    hidden_size=2560,
    intermediate_size=9728,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=40960,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "rope_theta": 1e6},
)
TINY_SHAPE: dict[str, Any] = dict(
    QWEN3_4B_SHAPE,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
)


def sync(device: torch.device) -> None:
    """Wait for the device."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Seconds of ``fn()`` (device synchronized before and after) and its result."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def median_ms(xs: list[float]) -> float:
    """Median of seconds, in ms."""
    return round(1000 * statistics.median(xs), 3)


def build_model(shape: dict[str, Any], device: torch.device, dtype: torch.dtype) -> Any:
    """A Qwen3 model of ``shape`` with random weights, built directly on ``device``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("qwen3", **shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    model.eval()
    return model


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, reps: int = 5) -> dict[str, float]:
    """Pinned host -> device and device -> device copy speed (GB/s, median of ``reps``)."""
    if device.type != "cuda":
        return {"h2d_GBps": float("nan"), "d2d_GBps_copy": float("nan")}
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    host.random_(0, 255)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dev2 = torch.empty_like(dev)
    h2d, d2d = [], []
    for _ in range(reps + 1):
        h2d.append(timed(lambda: dev.copy_(host, non_blocking=True), device)[0])
        d2d.append(timed(lambda: dev2.copy_(dev), device)[0])
    h2d, d2d = h2d[1:], d2d[1:]
    return {
        "h2d_GBps": round(nbytes / statistics.median(h2d) / 1e9, 2),
        "d2d_GBps_copy": round(nbytes / statistics.median(d2d) / 1e9, 2),
    }


def disk_read_speed(path: Path) -> dict[str, Any]:
    """Plain sequential read of ``path`` after dropping it from the page cache (GB/s)."""
    dropped = drop_page_cache(path)
    buf = bytearray(64 << 20)
    view = memoryview(buf)
    size = 0
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(view)
            if not n:
                break
            size += n
    dt = time.perf_counter() - t0
    return {"bytes": size, "seconds": round(dt, 4), "GBps": round(size / dt / 1e9, 3), "page_cache_dropped": dropped}


def first_token(pre: Any) -> int:
    """The greedy first token (forces the logits to the host: the end of TTFT)."""
    return int(torch.argmax(pre.logits).item())


def greedy(engine: Engine, pre: Any, steps: int) -> tuple[list[int], list[float]]:
    """Greedy tokens decoded on top of ``pre`` through the engine's decode step; seconds per step."""
    loaded = engine.loaded
    logits = pre.logits
    pos = pre.prompt_tokens
    toks: list[int] = []
    times: list[float] = []
    with torch.inference_mode():
        for _ in range(steps):
            t0 = time.perf_counter()
            tid = int(torch.argmax(logits).item())
            toks.append(tid)
            ids = torch.tensor([[tid]], dtype=torch.long, device=loaded.device)
            logits = loaded.runtime.forward(ids, pre.cache, pos)[-1]
            pos += 1
            times.append(time.perf_counter() - t0)
    sync(loaded.device)
    return toks, times


class Switch:
    """Sets ``KV_RAG_FAST`` for a block (``"0"``: plain transformers)."""

    def __init__(self, value: str | None) -> None:
        self.value = value
        self.old: str | None = None

    def __enter__(self) -> None:
        self.old = os.environ.get("KV_RAG_FAST")
        if self.value is None:
            os.environ.pop("KV_RAG_FAST", None)
        else:
            os.environ["KV_RAG_FAST"] = self.value

    def __exit__(self, *exc: object) -> None:
        if self.old is None:
            os.environ.pop("KV_RAG_FAST", None)
        else:
            os.environ["KV_RAG_FAST"] = self.old


def run_length(
    engine: Engine, tiers: dict[str, Any], n: int, args: argparse.Namespace, h2d: float, first: bool
) -> dict[str, Any]:
    """Every measurement at one prompt length ``n`` (prefix + document + question = ``n`` tokens)."""
    dev = engine.loaded.device
    g = torch.Generator().manual_seed(n)
    vocab = len(engine.tokenizer)
    rand = lambda k: tuple(int(x) for x in torch.randint(10, vocab - 10, (k,), generator=g))  # noqa: E731
    prefix, question = rand(32), rand(args.suffix_tokens)
    doc = rand(n - 32 - args.suffix_tokens)
    tp = TokenizedPrompt(segments=(prefix, doc), suffix=question, is_document=(False, True), sources=("text", "doc"))
    pub = TokenizedPrompt(segments=(prefix, doc), suffix=(), is_document=(False, True), sources=("text", "doc"))
    keys = engine.segment_keys(tp)
    big = n >= 16384
    reps = args.reps_big if big else args.reps
    row: dict[str, Any] = {"tokens": n, "suffix_tokens": args.suffix_tokens}

    # full prefill (plain transformers: the step is longer than the fast path takes)
    if first:
        timed(lambda: first_token(engine.prefill(tp, use_cache=False)), dev)
    full = [timed(lambda: first_token(engine.prefill(tp, use_cache=False)), dev)[0] for _ in range(reps)]
    row["full_prefill_ttft_ms"] = median_ms(full)

    # publish (fills every tier)
    dt = timed(lambda: engine.prefill(pub, need_logits=False), dev)[0]  # its cache freed: the slot too
    row["publish_s"] = round(dt, 3)
    arts = [tiers["gpu"].get(k) for k in keys]
    kv_bytes = sum(sum(t.numel() * t.element_size() for t in (*a.keys, *a.values)) for a in arts)
    row["kv_bytes"] = kv_bytes
    row["kv_MB_per_token"] = round(kv_bytes / n / 1e6, 4)
    row["transfer_bound_ms"] = round(1000 * kv_bytes / (h2d * 1e9), 3) if h2d == h2d else None

    lent: list[bool] = []

    def hit(tier: str) -> float:
        dt, pre = timed(lambda: (lambda p: (first_token(p), p))(engine.prefill(tp)), dev)
        got = {s.tier for s in pre[1].segments if s.tier}
        if got != {tier}:
            raise RuntimeError(f"expected hits from the {tier} tier, got {got}")
        if tier == "gpu":
            lent.append(uses_tier_block(pre[1], tiers["gpu"].get(keys[-1])))
        return dt

    # GPU tier (fast path), then plain transformers for the suffix on the same hit
    hit("gpu")
    lent.clear()
    row["gpu_hit_ttft_ms"] = median_ms([hit("gpu") for _ in range(args.reps)])
    row["gpu_hit_without_kv_copy"] = f"{sum(lent)}/{len(lent)}"
    # the same hit kept for the exactness checks below (the tier's block, when it is lent)
    lent_pre = engine.prefill(tp, reserve=args.decode_tokens + 2)
    lent_toks, _ = greedy(engine, lent_pre, args.decode_tokens)
    lent_logits = lent_pre.logits
    row["exactness_hit_without_kv_copy"] = uses_tier_block(lent_pre, tiers["gpu"].get(keys[-1]))
    del lent_pre
    with Switch("0"):
        hit("gpu")
        row["gpu_hit_ttft_ms_plain_transformers"] = median_ms([hit("gpu") for _ in range(3)])

    # pinned host tier
    def host_hit() -> float:
        for k in keys:
            tiers["gpu"].delete(k)
        return hit("pinned")

    row["host_hit_ttft_ms"] = median_ms([host_hit() for _ in range(reps)])

    # disk tier
    disk: DiskTier = tiers["disk"]
    paths = [disk.path_of(k) for k in keys]
    file_bytes = sum(p.stat().st_size for p in paths if p is not None)

    def disk_hit() -> float:
        for k in keys:
            tiers["gpu"].delete(k)
            tiers["pinned"].delete(k)
        for p in paths:
            drop_page_cache(p)
        return hit("disk")

    disk_times = [disk_hit() for _ in range(1 if big else 2)]
    row["disk_hit_ttft_ms"] = median_ms(disk_times)
    row["disk_file_bytes"] = file_bytes
    row["disk_tier_GBps"] = round(file_bytes / statistics.median(disk_times) / 1e9, 3)
    doc_path = paths[-1]
    row["disk_read"] = disk_read_speed(doc_path) if doc_path is not None else None

    # exactness: hit (GPU tier, whole-step graphs) against a from-scratch prefill and plain decode
    runtime = engine.loaded.runtime
    fast = runtime.decoder
    pre = engine.prefill(tp, reserve=args.decode_tokens + 2)
    ref = engine.reference_logits(tp.ids)
    row["logits_max_abs_diff"] = float((pre.logits - ref).abs().max())
    row["logits_max_abs_diff_gpu_tier_hit"] = float((lent_logits - ref).abs().max())
    row["logits_gpu_tier_hit_equal_copied_hit"] = bool(torch.equal(lent_logits, pre.logits))
    row["logits_ref_max_abs"] = float(ref.abs().max())
    hit_toks, step_s = greedy(engine, pre, args.decode_tokens)
    row["static_slot"] = getattr(pre.cache, "slot", None) is not None
    del pre
    # the same step code run eagerly (no graph replay): must agree exactly
    if fast is not None:
        fast.replay = False
        try:
            epre = engine.prefill(tp, reserve=args.decode_tokens + 2)
            eager_toks, _ = greedy(engine, epre, args.decode_tokens)
        finally:
            fast.replay = True
        row["graph_vs_eager_greedy_equal"] = f"{_prefix(hit_toks, eager_toks)}/{len(eager_toks)}"
        del epre
    with Switch("0"):
        ref_pre = engine.prefill(tp, use_cache=False, reserve=args.check_tokens + 2)
        ref_toks, plain_s = greedy(engine, ref_pre, args.check_tokens)
        del ref_pre
        ref2 = engine.prefill(tp, use_cache=False, reserve=args.check_tokens + 2)
        ref2_toks, _ = greedy(engine, ref2, args.check_tokens)
        del ref2
        tfhit = engine.prefill(tp, reserve=args.check_tokens + 2)  # transformers on the cached KV
        row["logits_max_abs_diff_plain_transformers_hit"] = float((tfhit.logits - ref).abs().max())
        tfhit_toks, _ = greedy(engine, tfhit, args.check_tokens)
        del tfhit
    row["greedy_checked"] = len(ref_toks)
    row["greedy_equal_prefix"] = _prefix(hit_toks, ref_toks)
    row["greedy_gpu_tier_hit_vs_copied_hit"] = f"{_prefix(lent_toks, hit_toks)}/{len(hit_toks)}"
    row["greedy_equal_prefix_plain_transformers_hit"] = _prefix(tfhit_toks, ref_toks)
    row["greedy_equal_prefix_plain_transformers_rerun"] = _prefix(ref2_toks, ref_toks)
    row["greedy_tokens_hit"] = hit_toks[: len(ref_toks)]
    row["greedy_tokens_ref"] = ref_toks
    row["greedy_tokens_plain_transformers_hit"] = tfhit_toks
    row["graph_buckets_per_layer"] = fast.graph_buckets if fast is not None else []
    pool = runtime.pool(dev) if fast is not None else None
    row["static_slots"] = [
        {"cap": sl.cap, "step_graphs": sorted(k for k, v in sl.steps.items() if v is not None)}
        for sl in (pool.slots if pool is not None else [])
    ]
    row["lent_blocks"] = [
        {"cap": sl.cap, "step_graphs": sorted(k for k, v in sl.steps.items() if v is not None)}
        for sl in (pool.adopted.values() if pool is not None else [])
    ]
    row["decode_first_step_ms"] = round(1000 * step_s[0], 3)
    row["decode_tok_s"] = round((len(step_s) - 2) / sum(step_s[2:]), 1)
    row["decode_tok_s_plain_transformers"] = round((len(plain_s) - 2) / sum(plain_s[2:]), 1)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return row


def uses_tier_block(pre: Any, doc: Any) -> bool:
    """Whether the request's cache is the GPU tier's block of ``doc`` (a hit without a KV copy)."""
    block = roomy_block(doc.keys[0], doc.num_layers) if doc is not None else None
    return block is not None and pre.cache.layers[0].key_buffer.data_ptr() == block.data_ptr()


def _prefix(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token lists."""
    same = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        same += 1
    return same


def plot(result: dict[str, Any], png: Path) -> bool:
    """Bar chart of the TTFTs per length (needs matplotlib); returns whether it was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = result["rows"]
    labels = [f"{r['tokens'] // 1024}k" for r in rows]
    series = [
        ("full prefill", "full_prefill_ttft_ms"),
        ("disk hit", "disk_hit_ttft_ms"),
        ("pinned-host hit", "host_hit_ttft_ms"),
        ("transfer bound", "transfer_bound_ms"),
        ("GPU hit (plain transformers)", "gpu_hit_ttft_ms_plain_transformers"),
        ("GPU hit", "gpu_hit_ttft_ms"),
    ]
    fig, ax = plt.subplots(figsize=(9, 4.8))
    w = 0.8 / len(series)
    for i, (name, key) in enumerate(series):
        xs = [j + (i - len(series) / 2 + 0.5) * w for j in range(len(rows))]
        ax.bar(xs, [r.get(key) or 0 for r in rows], w, label=name)
    ax.set_yscale("log")
    ax.set_xticks(range(len(rows)), labels)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("time to first token (ms, log)")
    ax.set_title(f"kv-rag on {result['env']['device_name']}: {result['model']['name']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    return True


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write JSON (+ PNG)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default=None, help="prompt lengths (default 1024,4096,16384,32768; --tiny: 256)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument(
        "--tiny",
        action="store_true",
        help="smoke test of the script: a tiny Qwen3, one 256-token length, 2 repeats, 8 decode tokens",
    )
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the embedded model's)")
    ap.add_argument("--store-dir", default=None, help="disk tier folder (default: a temporary folder)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--reps-big", type=int, default=3)
    ap.add_argument("--suffix-tokens", type=int, default=16)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--check-tokens", type=int, default=16)
    ap.add_argument("--out", default=str(results_dir("gpu") / "gpu_bench.json"))
    args = ap.parse_args(argv)
    if args.lengths is None:
        args.lengths = "256" if args.tiny else "1024,4096,16384,32768"
    if args.tiny:
        args.reps, args.reps_big, args.decode_tokens, args.check_tokens = 2, 1, 8, 4

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    from transformers import AutoTokenizer

    if args.tokenizer:
        tok = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        from kv_rag import models

        tok = models.load(None, "cpu", "float32").tokenizer
    shape = TINY_SHAPE if args.tiny else QWEN3_4B_SHAPE
    t0 = time.perf_counter()
    model = build_model(shape, device, dtype)
    sync(device)
    build_s = time.perf_counter() - t0
    bw = copy_bandwidth(device)
    store_dir = Path(args.store_dir) if args.store_dir else Path(tempfile.mkdtemp(prefix="kvrag-gpu-bench-"))
    tiers = {
        "gpu": GpuTier(64 << 30, device=device),
        "pinned": PinnedTier(64 << 30),
        "disk": DiskTier(store_dir, size_limit=60 << 30),
    }
    engine = Engine(model, tokenizer=tok, store=Store([tiers["gpu"], tiers["pinned"], tiers["disk"]]))
    # every hit is loaded from the tier it is measured on, even where computing it would be faster
    # (benchmarks/serving/serving_bench.py measures what the planner chooses)
    engine.store.speeds.decide = False
    _ = engine.loaded.fingerprint  # hashes the weights once, outside every timing
    cfg = model.config
    command = "python benchmarks/gpu/gpu_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result: dict[str, Any] = {
        "provenance": provenance(command),
        "benchmark": "gpu_bench",
        "command": command,
        "env": {
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "python": platform.python_version(),
            "loadavg": os.getloadavg(),
            "store_dir": str(store_dir),
            "pinned_tier_pinned": tiers["pinned"].pinned,
        },
        "model": {
            "name": "Qwen3-4B-shaped, random weights" if not args.tiny else "tiny Qwen3, random weights",
            "dtype": str(dtype),
            "layers": cfg.num_hidden_layers,
            "hidden": cfg.hidden_size,
            "heads": cfg.num_attention_heads,
            "kv_heads": cfg.num_key_value_heads,
            "head_dim": cfg.head_dim,
            "vocab": cfg.vocab_size,
            "intermediate": cfg.intermediate_size,
            "rope": getattr(cfg, "rope_parameters", None),
            "attn_implementation": getattr(cfg, "_attn_implementation", None),
            "params": sum(p.numel() for p in model.parameters()),
            "build_s": round(build_s, 2),
        },
        "bandwidth": bw,
        "rows": [],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    h2d = bw.get("h2d_GBps", float("nan"))
    for i, n in enumerate(int(x) for x in args.lengths.split(",")):
        t1 = time.perf_counter()
        row = run_length(engine, tiers, n, args, h2d, first=(i == 0))
        row["length_wall_s"] = round(time.perf_counter() - t1, 1)
        result["rows"].append(row)
        out.write_text(json.dumps(result, indent=1))
        print(json.dumps({k: v for k, v in row.items() if not k.startswith("greedy_tokens")}), flush=True)
    for r in result["rows"]:
        r["gpu_hit_speedup"] = round(r["full_prefill_ttft_ms"] / r["gpu_hit_ttft_ms"], 1)
        if r.get("transfer_bound_ms"):
            r["host_hit_over_bound"] = round(r["host_hit_ttft_ms"] / r["transfer_bound_ms"], 3)
    result["png"] = plot(result, out.with_suffix(".png"))
    out.write_text(json.dumps(result, indent=1))
    print(table(result))
    return 0


def table(result: dict[str, Any]) -> str:
    """A Markdown table of the main numbers."""
    head = (
        "| tokens | full prefill | GPU hit | speedup | GPU hit (plain tf) | pinned hit | transfer bound | "
        "pinned/bound | disk hit | disk tier GB/s | disk read GB/s | decode tok/s | decode tok/s (plain tf) "
        "| logits diff | greedy equal (tf hit; tf re-run) | graph vs eager |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in result["rows"]:
        dr = r.get("disk_read") or {}
        lines.append(
            f"| {r['tokens']} | {r['full_prefill_ttft_ms']} ms | {r['gpu_hit_ttft_ms']} ms | "
            f"{r.get('gpu_hit_speedup')}x | {r['gpu_hit_ttft_ms_plain_transformers']} ms | "
            f"{r['host_hit_ttft_ms']} ms | {r['transfer_bound_ms']} ms | {r.get('host_hit_over_bound')} | "
            f"{r['disk_hit_ttft_ms']} ms | {r['disk_tier_GBps']} | {dr.get('GBps')} | {r['decode_tok_s']} | "
            f"{r['decode_tok_s_plain_transformers']} | {r['logits_max_abs_diff']:.3g} | "
            f"{r['greedy_equal_prefix']}/{r['greedy_checked']} ({r['greedy_equal_prefix_plain_transformers_hit']}; "
            f"{r['greedy_equal_prefix_plain_transformers_rerun']}) | {r.get('graph_vs_eager_greedy_equal')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
