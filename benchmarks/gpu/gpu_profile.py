# ruff: noqa: B023  (closures timed immediately, inside the loop that binds them)
"""Where the time of a GPU-tier hit and of a decode step goes (torch profiler + component timings).

python benchmarks/gpu_profile.py --tokenizer DIR     # on the GPU machine
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_bench import QWEN3_4B_SHAPE, TINY_SHAPE, build_model

from kv_rag import Engine
from kv_rag._compat import forward
from kv_rag.engine import _cache_from_artifacts
from kv_rag.prompt import TokenizedPrompt
from kv_rag.store import GpuTier, Store


def ms(fn, dev, reps=5):  # type: ignore[no-untyped-def]
    """Median ms of fn() with device syncs."""
    out = []
    for _ in range(reps):
        torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize(dev)
        out.append(time.perf_counter() - t0)
    out.sort()
    return round(1000 * out[len(out) // 2], 3)


def main() -> None:
    """Profile."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--lengths", default="4096,32768")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    dev = torch.device("cuda")
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    model = build_model(TINY_SHAPE if args.tiny else QWEN3_4B_SHAPE, dev, torch.bfloat16)
    engine = Engine(model, tokenizer=tok, store=Store([GpuTier(64 << 30, device=dev)]))
    _ = engine.loaded.fingerprint
    from torch.profiler import ProfilerActivity, profile

    for n in (int(x) for x in args.lengths.split(",")):
        g = torch.Generator().manual_seed(n)
        ids = [int(x) for x in torch.randint(10, 40000, (n,), generator=g)]
        tp = TokenizedPrompt(
            segments=(tuple(ids[:32]), tuple(ids[32 : n - 16])), suffix=tuple(ids[n - 16 :]), is_document=(False, True)
        )
        engine.prefill(tp)  # publish (miss)
        for _ in range(3):
            engine.prefill(tp)
        print(f"\n===== {n} tokens")
        print("prefill (gpu hit) ms", ms(lambda: torch.argmax(engine.prefill(tp).logits).item(), dev))
        print("segment_keys ms", ms(lambda: engine.segment_keys(tp), dev))
        keys = engine.segment_keys(tp)
        print(
            "store.get x2 ms",
            ms(
                lambda: [
                    engine.store.get(k, accept=engine._acceptor(tp, i, 0 if i == 0 else 32)) for i, k in enumerate(keys)
                ],
                dev,
            ),
        )
        arts = [engine.store.get(k).artifact for k in keys]
        nl = engine.loaded.num_layers
        print("cache_from_artifacts ms", ms(lambda: _cache_from_artifacts(arts, dev, nl, n + 80), dev))
        sfx = torch.tensor([list(tp.suffix)], device=dev)
        for flag in ("1", "0"):
            os.environ["KV_RAG_FAST"] = flag

            def suffix() -> None:
                c = _cache_from_artifacts(arts, dev, nl, n + 80, model=model if flag == "1" else None)
                with torch.inference_mode():
                    torch.argmax(forward(model, sfx, c, n - 16)).item()

            print(f"copy+suffix forward KV_RAG_FAST={flag} ms", ms(suffix, dev))
        os.environ.pop("KV_RAG_FAST")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            torch.argmax(engine.prefill(tp).logits).item()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12))
        # decode steps with the graph
        pre = engine.prefill(tp, reserve=40)
        pos = n
        with torch.inference_mode():
            t = torch.tensor([[5]], device=dev)
            forward(model, t, pre.cache, pos)
            pos += 1
            forward(model, t, pre.cache, pos)
            pos += 1

            def step() -> None:
                nonlocal pos
                forward(model, t, pre.cache, pos)
                pos += 1

            print("decode step (graph) ms", ms(step, dev, reps=9))
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    step()
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12))
        # attention alone
        cap = n + 80
        q = torch.randn(1, 8, 4, 128, device=dev, dtype=torch.bfloat16)
        k = torch.randn(1, 8, cap, 128, device=dev, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        m = (torch.arange(cap, device=dev) <= n).view(1, 1, 1, cap)
        fm = torch.zeros(1, 1, 1, cap, device=dev, dtype=torch.bfloat16).masked_fill(~m, float("-inf"))
        with torch.inference_mode():
            print("sdpa no mask ms", ms(lambda: F.scaled_dot_product_attention(q, k, v), dev, 9))
            print("sdpa bool mask ms", ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=m), dev, 9))
            print("sdpa float mask ms", ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=fm), dev, 9))
            print("sdpa sliced ms", ms(lambda: F.scaled_dot_product_attention(q, k[:, :, :n], v[:, :, :n]), dev, 9))
            qq = torch.randn(1, 32, 1, 128, device=dev, dtype=torch.bfloat16)
            print("sdpa gqa flash ms", ms(lambda: F.scaled_dot_product_attention(qq, k, v, enable_gqa=True), dev, 9))
            # the whole-step graph's kernel: varlen flash over a capacity, used length on the device
            kt, vt = k[0].transpose(0, 1), v[0].transpose(0, 1)
            for rows in (1, 16):
                qv = torch.randn(rows, 32, 128, device=dev, dtype=torch.bfloat16)
                cq = torch.tensor([0, rows], dtype=torch.int32, device=dev)
                ck = torch.tensor([0, cap], dtype=torch.int32, device=dev)
                used = torch.tensor([n], dtype=torch.int32, device=dev)

                def varlen() -> None:
                    torch.ops.aten._flash_attention_forward(
                        qv, kt, vt, cq, ck, rows, cap, 0.0, True, False, seqused_k=used
                    )

                def dense() -> None:
                    torch.ops.aten._scaled_dot_product_flash_attention(
                        qv.transpose(0, 1).unsqueeze(0), k[:, :, :n], v[:, :, :n], 0.0, True
                    )

                print(f"flash varlen seqused_k q={rows} ms", ms(varlen, dev, 9))
                print(f"flash dense sliced q={rows} ms", ms(dense, dev, 9))
        engine.store.tiers[0].clear()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
