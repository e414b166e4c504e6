# ruff: noqa: B023  (closures timed immediately, inside the loop that binds them)
"""Where the time of a GPU-tier hit and of a decode step goes (torch profiler + component timings).

    python benchmarks/gpu/gpu_profile.py --tokenizer DIR --out PATH     # on the GPU machine
    python benchmarks/gpu/gpu_profile.py --tiny --device cpu --out DIR/gpu_profile.json   # smoke run

Prints the component timings and the profiler's tables; writes the timings (ms, per length) with
the run's provenance to ``--out`` (default: ``$KV_RAG_HOME/bench/gpu/gpu_profile.json``, never into
the checkout). The flash-attention kernel timings need CUDA and are left out elsewhere.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gpu_bench import QWEN3_4B_SHAPE, TINY_SHAPE, build_model, sync

from kv_rag import Engine, TokenizedPrompt
from kv_rag.assemble import acceptor
from kv_rag.bench import provenance, results_dir
from kv_rag.runtime import build_cache, pieces_of
from kv_rag.store import GpuTier, Store


def ms(fn: Callable[[], Any], dev: torch.device, reps: int = 5) -> float:
    """Median ms of fn() with device syncs."""
    out = []
    for _ in range(reps):
        sync(dev)
        t0 = time.perf_counter()
        fn()
        sync(dev)
        out.append(time.perf_counter() - t0)
    out.sort()
    return round(1000 * out[len(out) // 2], 3)


def main() -> None:
    """Profile."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the embedded model's)")
    ap.add_argument("--tiny", action="store_true", help="a tiny Qwen3 (default lengths: 256)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--lengths", default=None, help="prompt lengths (default 4096,32768; --tiny: 256)")
    ap.add_argument("--out", default=str(results_dir("gpu") / "gpu_profile.json"))
    args = ap.parse_args()
    from transformers import AutoTokenizer

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    lengths = [int(x) for x in (args.lengths or ("256" if args.tiny else "4096,32768")).split(",")]
    if args.tokenizer:
        tok = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        from kv_rag import models

        tok = models.load(None, "cpu", "float32").tokenizer
    dtype = torch.bfloat16 if cuda else torch.float32
    model = build_model(TINY_SHAPE if args.tiny else QWEN3_4B_SHAPE, dev, dtype)
    gpu_tier = GpuTier(64 << 30, device=dev)
    engine = Engine(model, tokenizer=tok, store=Store([gpu_tier]))
    _ = engine.loaded.fingerprint
    runtime = engine.loaded.runtime
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    sort_device = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    result: dict[str, Any] = {
        "provenance": provenance(),
        "benchmark": "gpu_profile",
        "device": str(dev),
        "model": "tiny Qwen3, random weights" if args.tiny else "Qwen3-4B-shaped, random weights",
        "dtype": str(dtype),
        "ms": {},
    }
    for n in lengths:
        times: dict[str, float] = {}
        result["ms"][str(n)] = times

        def show(name: str, value: float) -> None:
            times[name] = value
            print(name, value)

        g = torch.Generator().manual_seed(n)
        ids = [int(x) for x in torch.randint(10, 40000, (n,), generator=g)]
        tp = TokenizedPrompt(
            segments=(tuple(ids[:32]), tuple(ids[32 : n - 16])), suffix=tuple(ids[n - 16 :]), is_document=(False, True)
        )
        engine.prefill(tp)  # publish (miss)
        for _ in range(3):
            engine.prefill(tp)
        print(f"\n===== {n} tokens")
        show("prefill (gpu hit) ms", ms(lambda: torch.argmax(engine.prefill(tp).logits).item(), dev))
        show("segment_keys ms", ms(lambda: engine.segment_keys(tp), dev))
        pieces = [p for p in engine.plan(tp).lead.pieces if p.key]
        loaded = engine.loaded
        show(
            "store.get x2 ms",
            ms(lambda: [engine.store.get(p.key, accept=acceptor(loaded, p, p.start)) for p in pieces], dev),
        )
        keys = engine.segment_keys(tp)
        hits = [engine.store.get(k) for k in keys]
        arts = [h.artifact for h in hits if h is not None]
        nl = loaded.num_layers

        def from_artifacts(pool: bool) -> Any:
            k, v = pieces_of(arts, dev, nl)
            return runtime.new_cache(n + 80, k, v) if pool else build_cache(k, v, nl, n + 80)

        show("cache_from_artifacts ms", ms(lambda: from_artifacts(True), dev))
        sfx = torch.tensor([list(tp.suffix)], device=dev)
        for flag in ("1", "0"):
            os.environ["KV_RAG_FAST"] = flag

            def suffix() -> None:
                c = from_artifacts(flag == "1")
                with torch.inference_mode():
                    torch.argmax(runtime.forward(sfx, c, n - 16)).item()

            show(f"copy+suffix forward KV_RAG_FAST={flag} ms", ms(suffix, dev))
        os.environ.pop("KV_RAG_FAST")
        with profile(activities=activities) as prof:
            torch.argmax(engine.prefill(tp).logits).item()
            sync(dev)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
        if cuda:
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12))
        # decode steps with the graph
        pre = engine.prefill(tp, reserve=40)
        pos = n
        with torch.inference_mode():
            t = torch.tensor([[5]], device=dev)
            runtime.forward(t, pre.cache, pos)
            pos += 1
            runtime.forward(t, pre.cache, pos)
            pos += 1

            def step() -> None:
                nonlocal pos
                runtime.forward(t, pre.cache, pos)
                pos += 1

            show("decode step (graph) ms", ms(step, dev, reps=9))
            with profile(activities=activities) as prof:
                for _ in range(3):
                    step()
                sync(dev)
            print(prof.key_averages().table(sort_by=sort_device, row_limit=12))
        # attention alone
        cap = n + 80
        q = torch.randn(1, 8, 4, 128, device=dev, dtype=dtype)
        k = torch.randn(1, 8, cap, 128, device=dev, dtype=dtype)
        v = torch.randn_like(k)
        m = (torch.arange(cap, device=dev) <= n).view(1, 1, 1, cap)
        fm = torch.zeros(1, 1, 1, cap, device=dev, dtype=dtype).masked_fill(~m, float("-inf"))
        with torch.inference_mode():
            show("sdpa no mask ms", ms(lambda: F.scaled_dot_product_attention(q, k, v), dev, 9))
            show("sdpa bool mask ms", ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=m), dev, 9))
            show("sdpa float mask ms", ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=fm), dev, 9))
            show("sdpa sliced ms", ms(lambda: F.scaled_dot_product_attention(q, k[:, :, :n], v[:, :, :n]), dev, 9))
            qq = torch.randn(1, 32, 1, 128, device=dev, dtype=dtype)
            show("sdpa gqa flash ms", ms(lambda: F.scaled_dot_product_attention(qq, k, v, enable_gqa=True), dev, 9))
            if cuda:  # the whole-step graph's kernel: varlen flash over a capacity, used length on the device
                kt, vt = k[0].transpose(0, 1), v[0].transpose(0, 1)
                for rows in (1, 16):
                    qv = torch.randn(rows, 32, 128, device=dev, dtype=dtype)
                    cq = torch.tensor([0, rows], dtype=torch.int32, device=dev)
                    ck = torch.tensor([0, cap], dtype=torch.int32, device=dev)
                    used = torch.tensor([n], dtype=torch.int32, device=dev)

                    # torch's own private flash kernels (torch.ops.aten._*): the kernels kv-rag's step graph uses
                    def varlen() -> None:
                        torch.ops.aten._flash_attention_forward(
                            qv, kt, vt, cq, ck, rows, cap, 0.0, True, False, seqused_k=used
                        )

                    def dense() -> None:
                        torch.ops.aten._scaled_dot_product_flash_attention(
                            qv.transpose(0, 1).unsqueeze(0), k[:, :, :n], v[:, :, :n], 0.0, True
                        )

                    show(f"flash varlen seqused_k q={rows} ms", ms(varlen, dev, 9))
                    show(f"flash dense sliced q={rows} ms", ms(dense, dev, 9))
        gpu_tier.clear()
        if cuda:
            torch.cuda.empty_cache()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
