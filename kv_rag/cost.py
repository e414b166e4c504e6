"""The economics of reusing a KV cache: re-prefill, load from a hosted store, or ship the artifact.

After "Can I Buy Your KV Cache?": a document's KV cache can be recomputed (prefill: compute, paid per
GPU-hour) or moved (bytes, paid per GB of network egress, plus the time to load them). For a
document of ``T`` tokens reused ``N`` times:

- **re-prefill**: ``N * prefill_s(T) * price_per_s``.
- **hosted store**: publish once (one prefill), then each of the ``N`` requests pulls the artifact
  over the network: ``prefill_s(T) * price_per_s + N * (kv_gb(T) * egress_per_gb + load_s(T) * price_per_s)``.
- **ship the artifact**: publish once, transfer the artifact once to the serving machine, then
  load it locally ``N`` times: ``prefill_s(T) * price_per_s + kv_gb(T) * egress_per_gb + N * load_s(T) * price_per_s``.

A :class:`Profile` says how fast one machine prefills and loads: prefill time as ``a*T + b*T**2``
(linear work plus attention), KV bytes per token, and load bandwidth. Two profiles ship here:
:data:`H200_QWEN3_4B` (measured on an H200 with a Qwen3-4B-shaped model in bf16; see DESIGN.md) and
:data:`CPU_SMOLLM2_FP32` (the current ``kv-rag bench`` result on the 2-core CPU machine); any
``kv-rag bench`` JSON gives another (:func:`profile_from_bench`).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import InputError


@dataclass(frozen=True)
class Profile:
    """How fast one machine and model prefill and load a document's KV."""

    name: str
    #: prefill seconds = a * tokens + b * tokens**2
    prefill_a: float
    prefill_b: float
    #: bytes of KV per token of the artifact
    kv_bytes_per_token: float
    #: bytes per second at which a stored artifact becomes usable KV (read + copy to the device)
    load_bytes_per_s: float
    #: fixed seconds per load (lookup, parse, per-layer overhead)
    load_overhead_s: float = 0.0
    #: where the figures come from
    source: str = ""

    def prefill_s(self, tokens: float) -> float:
        """Seconds to prefill ``tokens`` tokens."""
        return self.prefill_a * tokens + self.prefill_b * tokens * tokens

    def kv_bytes(self, tokens: float) -> float:
        """Bytes of KV for ``tokens`` tokens."""
        return self.kv_bytes_per_token * tokens

    def load_s(self, tokens: float) -> float:
        """Seconds to load the KV of ``tokens`` tokens once the bytes are local."""
        return self.load_overhead_s + self.kv_bytes(tokens) / self.load_bytes_per_s

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for JSON)."""
        return asdict(self)


def fit_prefill(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """``(a, b)`` of ``seconds = a*T + b*T**2`` by least squares over ``(tokens, seconds)`` points.

    One point gives a linear fit (``b = 0``). Negative coefficients are clipped to 0 and the other refitted.
    """
    pts = [(float(t), float(s)) for t, s in points if t > 0]
    if not pts:
        raise InputError("fit_prefill needs at least one (tokens, seconds) point with tokens > 0")
    if len(pts) == 1:
        t, s = pts[0]
        return s / t, 0.0
    # normal equations for s = a t + b t^2
    s11 = sum(t * t for t, _ in pts)
    s12 = sum(t**3 for t, _ in pts)
    s22 = sum(t**4 for t, _ in pts)
    r1 = sum(t * s for t, s in pts)
    r2 = sum(t * t * s for t, s in pts)
    det = s11 * s22 - s12 * s12
    a, b = ((r1 * s22 - r2 * s12) / det, (s11 * r2 - s12 * r1) / det) if det else (r1 / s11, 0.0)
    if b < 0:
        return r1 / s11, 0.0
    if a < 0:
        return 0.0, r2 / s22
    return a, b


#: H200, Qwen3-4B-shaped model, bf16 (DESIGN.md): full prefill 91 ms at 4k tokens and 1.13 s at 32k;
#: KV 0.147 MB/token; pinned host-to-GPU copies at about 55 GB/s; 40 ms per-load overhead (the
#: plain transformers suffix prefill after a hit costs 35-50 ms of per-layer overhead).
H200_QWEN3_4B = Profile(
    name="h200-qwen3-4b-bf16",
    prefill_a=fit_prefill([(4096, 0.091), (32768, 1.13)])[0],
    prefill_b=fit_prefill([(4096, 0.091), (32768, 1.13)])[1],
    kv_bytes_per_token=0.147e6,
    load_bytes_per_s=55e9,
    load_overhead_s=0.040,
    source="DESIGN.md: H200, Qwen3-4B-shaped model, bf16 (full prefill 91 ms at 4k, 1.13 s at 32k)",
)

#: 2-core CPU VM, the embedded SmolLM2-135M-Instruct in float32: ``profile_from_bench`` of the current
#: ``kv-rag bench`` result (benchmarks/README.md says which is current; a test keeps the two equal).
CPU_SMOLLM2_FP32 = Profile(
    name="cpu-smollm2-135m-instruct-float32",
    prefill_a=0.0014398737034580767,
    prefill_b=3.1739163540400344e-07,
    kv_bytes_per_token=46080.0,
    load_bytes_per_s=1154195856.2834013,
    load_overhead_s=0.13251308600229095,
    source="kv-rag bench, benchmarks/core/results/2026-11-29-cpu-fp32.json (2026-11-29, 2-core CPU VM)",
)

#: Default prices (USD): an on-demand H200 hour, a 2-vCPU cloud instance hour, internet egress per GB.
DEFAULT_GPU_HOUR_USD = 3.50
DEFAULT_CPU_HOUR_USD = 0.10
DEFAULT_EGRESS_USD_PER_GB = 0.09


def profile_from_bench(path: str | Path) -> Profile:
    """A CPU profile from a ``kv-rag bench`` JSON file (see :func:`profile_from_result`)."""
    return profile_from_result(json.loads(Path(path).read_text()), str(path))


def profile_from_result(data: dict[str, Any], path: str = "kv-rag bench") -> Profile:
    """A CPU profile from a bench result: prefill fit over its full-prefill TTFTs, disk-tier load speed,
    the suffix prefill as the per-load overhead."""
    rows = data.get("rows") or []
    if not rows:
        raise InputError(f"{path}: no rows; run `kv-rag bench` first")
    a, b = fit_prefill([(r["doc_tokens"], r["full_prefill_ttft_s"]) for r in rows])
    kv = statistics.median([r["kv_mb_per_token"] * 1e6 for r in rows])
    gbps = [r["disk_load_gb_per_s"] for r in rows if r.get("disk_load_gb_per_s")]
    over = [r["suffix_prefill_s"] for r in rows if r.get("suffix_prefill_s") is not None]
    return Profile(
        name=f"cpu-{data.get('model', 'model')}-{data.get('dtype', '')}",
        prefill_a=a,
        prefill_b=b,
        kv_bytes_per_token=kv,
        load_bytes_per_s=(statistics.median(gbps) if gbps else 1.0) * 1e9,
        load_overhead_s=statistics.median(over) if over else 0.0,
        source=f"measured by kv-rag bench ({path})",
    )


@dataclass(frozen=True)
class Costs:
    """USD for one document of ``tokens`` tokens used ``reuses`` times, three ways."""

    profile: str
    tokens: int
    reuses: int
    kv_mb: float
    prefill_s: float
    load_s: float
    reprefill_usd: float
    hosted_store_usd: float
    ship_artifact_usd: float
    #: reuses after which the hosted store is cheaper than re-prefilling (None: never)
    break_even_hosted: int | None
    #: reuses after which shipping the artifact once is cheaper than re-prefilling (None: never)
    break_even_ship: int | None
    #: egress price per GB at which moving a token's KV costs as much as prefilling it
    egress_parity_usd_per_gb: float

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for JSON)."""
        return asdict(self)


def costs(
    profile: Profile,
    tokens: int,
    reuses: int,
    *,
    hour_usd: float = DEFAULT_GPU_HOUR_USD,
    egress_usd_per_gb: float = DEFAULT_EGRESS_USD_PER_GB,
) -> Costs:
    """The three costs of serving a ``tokens``-token document ``reuses`` times on ``profile``."""
    if tokens <= 0 or reuses < 0:
        raise InputError(f"tokens must be > 0 and reuses >= 0; got tokens={tokens}, reuses={reuses}")
    if hour_usd < 0 or egress_usd_per_gb < 0:
        raise InputError("prices must be >= 0")
    per_s = hour_usd / 3600.0
    pre = profile.prefill_s(tokens)
    load = profile.load_s(tokens)
    gb = profile.kv_bytes(tokens) / 1e9
    reprefill = reuses * pre * per_s
    hosted = pre * per_s + reuses * (gb * egress_usd_per_gb + load * per_s)
    ship = pre * per_s + gb * egress_usd_per_gb + reuses * load * per_s
    parity = pre * per_s / gb if gb else math.inf
    return Costs(
        profile=profile.name,
        tokens=tokens,
        reuses=reuses,
        kv_mb=gb * 1e3,
        prefill_s=pre,
        load_s=load,
        reprefill_usd=reprefill,
        hosted_store_usd=hosted,
        ship_artifact_usd=ship,
        break_even_hosted=break_even(pre * per_s, gb * egress_usd_per_gb + load * per_s, pre * per_s),
        break_even_ship=break_even(pre * per_s + gb * egress_usd_per_gb, load * per_s, pre * per_s),
        egress_parity_usd_per_gb=parity,
    )


def break_even(fixed: float, per_use_reuse: float, per_use_prefill: float) -> int | None:
    """Smallest ``N >= 1`` with ``fixed + N * per_use_reuse < N * per_use_prefill``; ``None`` if none.

    With measured times: ``fixed`` = publish seconds, ``per_use_reuse`` = hit TTFT,
    ``per_use_prefill`` = full-prefill TTFT.
    """
    gain = per_use_prefill - per_use_reuse
    if gain <= 0:
        return None
    return max(1, math.floor(fixed / gain) + 1)


def describe(d: dict[str, Any]) -> str:
    """The text ``kv-rag cost`` prints for one profile's costs (a :meth:`Costs.to_dict` plus ``hour_usd``,
    ``egress_usd_per_gb`` and ``source``)."""
    return (
        f"{d['profile']} ({d['source']})\n"
        f"  {d['tokens']} tokens, {d['reuses']} reuses, ${d['hour_usd']:g}/hour, "
        f"${d['egress_usd_per_gb']:g}/GB egress: "
        f"KV {d['kv_mb']:.1f} MB, prefill {d['prefill_s']:.3f} s, load {d['load_s']:.3f} s\n"
        f"  re-prefill every time    ${d['reprefill_usd']:.6f}\n"
        f"  load from hosted store   ${d['hosted_store_usd']:.6f}  "
        f"(cheaper after {d['break_even_hosted'] or 'no number of'} reuses)\n"
        f"  ship the artifact once   ${d['ship_artifact_usd']:.6f}  "
        f"(cheaper after {d['break_even_ship'] or 'no number of'} reuses)\n"
        f"  egress price at which moving KV costs as much as computing it: ${d['egress_parity_usd_per_gb']:.6f}/GB"
    )
