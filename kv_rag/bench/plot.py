"""PNG plots of a benchmark result (needs matplotlib: ``pip install 'kv-rag[bench]'``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..cost import DEFAULT_CPU_HOUR_USD, DEFAULT_EGRESS_USD_PER_GB, DEFAULT_GPU_HOUR_USD, H200_QWEN3_4B, Profile, costs


def plot_all(result: dict[str, Any], out_dir: Path, cpu_profile: Profile | None = None) -> list[Path]:
    """TTFT against document length (log scale) and the cost curves; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    rows = result["rows"]
    x = [r["doc_tokens"] for r in rows]
    paths = []

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    series = [
        ("kv-rag full prefill", "full_prefill_ttft_s", None, "C0", "-", "o"),
        ("kv-rag memory-tier hit", "memory_hit_ttft_s", None, "C0", "--", "s"),
        ("kv-rag disk-tier hit", "disk_hit_ttft_s", None, "C0", ":", "^"),
        ("llama.cpp full prefill", "full_prefill_ttft_s", "llama_cpp", "C3", "-", "o"),
        ("llama.cpp state restore (memory)", "memory_restore_ttft_s", "llama_cpp", "C3", "--", "s"),
        ("llama.cpp state restore (file)", "disk_restore_ttft_s", "llama_cpp", "C3", ":", "^"),
    ]
    for label, key, sub, color, ls, marker in series:
        pts = [(r["doc_tokens"], (r.get(sub) or {}).get(key) if sub else r.get(key)) for r in rows]
        pts = [(a, b) for a, b in pts if b]
        if pts:
            ax.plot(*zip(*pts, strict=True), label=label, color=color, linestyle=ls, marker=marker)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(x, [str(v) for v in x])
    ax.set_xlabel("document tokens")
    ax.set_ylabel("time to first token (s)")
    load = result.get("load_avg_before") or ["?"]
    ax.set_title(f"{result['model']} ({result['dtype']}), {result['machine']['threads']} threads, load {load[0]}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    p = out_dir / "ttft_vs_length.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    paths.append(p)

    fig, axes = plt.subplots(1, 2 if cpu_profile else 1, figsize=(11 if cpu_profile else 6.5, 4.5), squeeze=False)
    panels = [(H200_QWEN3_4B, DEFAULT_GPU_HOUR_USD, 4096)]
    if cpu_profile:
        panels.append((cpu_profile, DEFAULT_CPU_HOUR_USD, 4096))
    ns = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]
    for ax, (prof, hour, tokens) in zip(axes[0], panels, strict=False):
        for egress, ls in ((DEFAULT_EGRESS_USD_PER_GB, "-"), (0.0, ":")):
            cs = [costs(prof, tokens, n, hour_usd=hour, egress_usd_per_gb=egress) for n in ns]
            tag = f"egress ${egress:g}/GB"
            ax.plot(ns, [c.hosted_store_usd for c in cs], color="C1", linestyle=ls, label=f"hosted store, {tag}")
            ax.plot(ns, [c.ship_artifact_usd for c in cs], color="C2", linestyle=ls, label=f"ship artifact once, {tag}")
        cs = [costs(prof, tokens, n, hour_usd=hour) for n in ns]
        ax.plot(ns, [c.reprefill_usd for c in cs], color="C0", linewidth=2, label="re-prefill every time")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("reuses of one document")
        ax.set_ylabel("USD")
        ax.set_title(f"{prof.name}, {tokens} tokens, ${hour:g}/h", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    p = out_dir / "cost_curve.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    paths.append(p)
    return paths
