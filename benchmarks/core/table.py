"""Print the markdown tables of a ``kv-rag bench`` JSON (as quoted in the README).

python benchmarks/core/table.py [PATH]     # default: the current CPU result (float32)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

#: the current ``kv-rag bench`` result on the CPU (benchmarks/README.md lists the current results)
CURRENT = Path(__file__).resolve().parent / "results" / "2026-11-29-cpu-fp32.json"


def main(path: str) -> None:
    """Print the TTFT, disk and codec tables."""
    data = json.loads(Path(path).read_text())
    rows = data["rows"]
    dtype = str(data.get("dtype", "float32")).removeprefix("torch.")
    print(
        "| doc tokens | ours full | ours memory hit | speed-up | ours disk hit | suffix alone | llama.cpp full "
        "| llama.cpp restore | llama.cpp file restore | py load_state | ours / llama restore | N* ours | N* llama "
        "| equal (ours, llama) | max logit diff (ours, llama) |"
    )
    print("|" + "---:|" * 15)
    for r in rows:
        lr = r.get("llama_cpp", {})
        print(
            f"| {r['doc_tokens']} | {r['full_prefill_ttft_s']:.3f} s | {r['memory_hit_ttft_s']:.3f} s "
            f"| {r['memory_speedup']:.1f}x | {r['disk_hit_ttft_s']:.3f} s | {r['suffix_prefill_s']:.3f} s "
            f"| {lr.get('full_prefill_ttft_s', 0):.3f} s | {lr.get('memory_restore_ttft_s', 0):.3f} s "
            f"| {lr.get('disk_restore_ttft_s', 0):.3f} s | {lr.get('py_load_state_ttft_s', 0):.3f} s "
            f"| {1 / r.get('ours_vs_llama_restore', 1):.2f} | {r['break_even_memory']} | {lr.get('break_even_memory')} "
            f"| {'yes' if r['greedy_tokens_equal'] else 'no'}, {'yes' if lr.get('greedy_tokens_equal') else 'no'} "
            f"| {r['max_logit_diff']:.1e}, {lr.get('max_logit_diff', 0):.1e} |"
        )
    print()
    print(
        f"| doc tokens | KV MB/token (ours {dtype}, llama.cpp f16 state) | artifact MB | disk load GB/s "
        "| plain read GB/s | dd GB/s | load / dd | resident after evict | load avg |"
    )
    print("|" + "---:|" * 9)
    for r in rows:
        lr = r.get("llama_cpp", {})
        print(
            f"| {r['doc_tokens']} | {r['kv_mb_per_token']:.4f}, {lr.get('state_mb_per_token', 0):.4f} "
            f"| {r['artifact_file_mb']:.0f} | {r['disk_load_gb_per_s']:.2f} | {r['disk_read_gb_per_s']:.2f} "
            f"| {r['dd_gb_per_s']:.2f} | {r['disk_load_vs_dd']:.2f} | {r['resident_bytes_after_evict']} "
            f"| {r['load_avg'][0]:.1f} |"
        )
    if any("codecs" in r for r in rows):
        print()
        print("| doc tokens | codec | ratio | encode GB/s | decode GB/s | disk load s | vs plain load |")
        print("|" + "---:|" * 7)
        for r in rows:
            for name in ("zstd", "int8"):
                c = r.get("codecs", {}).get(name)
                if c and "ratio" in c:
                    print(
                        f"| {r['doc_tokens']} | {name} | {c['ratio']:.2f} | {c['encode_gb_per_s']:.2f} "
                        f"| {c['decode_gb_per_s']:.2f} | {c['disk_load_s']:.3f} | {c['disk_load_vs_plain']:.2f}x |"
                    )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(CURRENT))
