"""The cost model: prefill fit, break-even counts, the three costs, and ``kv-rag cost``."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from kv_rag import InputError
from kv_rag.cli import main
from kv_rag.cost import (
    CPU_SMOLLM2_FP32,
    H200_QWEN3_4B,
    Profile,
    break_even,
    costs,
    fit_prefill,
    profile_from_bench,
)

ROOT = Path(__file__).resolve().parents[1]


def test_h200_profile_reproduces_its_two_measurements() -> None:
    assert H200_QWEN3_4B.prefill_s(4096) == pytest.approx(0.091, rel=1e-9)
    assert H200_QWEN3_4B.prefill_s(32768) == pytest.approx(1.13, rel=1e-9)
    assert H200_QWEN3_4B.kv_bytes(1000) == pytest.approx(0.147e9)


def test_fit_recovers_a_quadratic_and_clips_negative_terms() -> None:
    pts = [(t, 2e-4 * t + 3e-8 * t * t) for t in (256, 1024, 4096, 7168)]
    a, b = fit_prefill(pts)
    assert a == pytest.approx(2e-4, rel=1e-6) and b == pytest.approx(3e-8, rel=1e-6)
    assert fit_prefill([(1000, 2.0)]) == (0.002, 0.0)
    a, b = fit_prefill([(1000, 2.0), (2000, 3.0)])  # concave: b would be negative
    assert b == 0.0 and a > 0
    with pytest.raises(InputError):
        fit_prefill([])


@pytest.mark.parametrize(
    ("fixed", "reuse", "prefill", "expected"),
    [(10.0, 1.0, 11.0, 2), (10.0, 1.0, 2.0, 11), (0.0, 1.0, 2.0, 1), (5.0, 2.0, 2.0, None), (5.0, 3.0, 2.0, None)],
)
def test_break_even_is_the_first_n_that_pays(fixed: float, reuse: float, prefill: float, expected: int | None) -> None:
    n = break_even(fixed, reuse, prefill)
    assert n == expected
    if n is not None:
        assert fixed + n * reuse < n * prefill
        assert n == 1 or fixed + (n - 1) * reuse >= (n - 1) * prefill


def test_costs_add_up() -> None:
    p = Profile("p", prefill_a=1e-3, prefill_b=0.0, kv_bytes_per_token=1e5, load_bytes_per_s=1e9, load_overhead_s=0.01)
    c = costs(p, 1000, 10, hour_usd=3600.0, egress_usd_per_gb=2.0)  # 1 USD per second
    assert c.prefill_s == pytest.approx(1.0) and c.load_s == pytest.approx(0.11)
    assert c.kv_mb == pytest.approx(100.0)
    assert c.reprefill_usd == pytest.approx(10.0)
    assert c.hosted_store_usd == pytest.approx(1.0 + 10 * (0.1 * 2.0 + 0.11))
    assert c.ship_artifact_usd == pytest.approx(1.0 + 0.2 + 10 * 0.11)
    assert c.break_even_ship == 2 and c.break_even_hosted == 2
    assert c.egress_parity_usd_per_gb == pytest.approx(10.0)
    free = costs(p, 1000, 0, hour_usd=0.0, egress_usd_per_gb=0.0)
    assert free.reprefill_usd == free.hosted_store_usd == free.ship_artifact_usd == 0.0
    with pytest.raises(InputError):
        costs(p, 0, 1)


def test_internet_egress_never_beats_h200_prefill() -> None:
    c = costs(H200_QWEN3_4B, 4096, 100, hour_usd=3.5, egress_usd_per_gb=0.09)
    assert c.break_even_hosted is None
    assert c.hosted_store_usd > c.reprefill_usd
    assert c.egress_parity_usd_per_gb < 0.001


def _bench_json(path: Path) -> Path:
    rows = [
        {
            "doc_tokens": t,
            "full_prefill_ttft_s": 3e-4 * t,
            "kv_mb_per_token": 0.046,
            "disk_load_gb_per_s": 0.5,
            "suffix_prefill_s": 0.05,
        }
        for t in (256, 1024, 4096)
    ]
    path.write_text(json.dumps({"model": "m", "dtype": "float32", "rows": rows}))
    return path


def test_profile_from_bench(tmp_path: Path) -> None:
    p = profile_from_bench(_bench_json(tmp_path / "b.json"))
    assert p.prefill_s(2048) == pytest.approx(3e-4 * 2048, rel=1e-6)
    assert p.kv_bytes_per_token == pytest.approx(46000)
    assert p.load_bytes_per_s == pytest.approx(0.5e9)


def test_cost_command_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = _bench_json(tmp_path / "b.json")
    assert main(["cost", "--tokens", "2048", "--reuses", "7", "--egress", "0", "--bench", str(bench), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [d["profile"] for d in out] == ["h200-qwen3-4b-bf16", "cpu-m-float32"]
    assert all(d["tokens"] == 2048 and d["reuses"] == 7 and d["egress_usd_per_gb"] == 0 for d in out)
    assert main(["cost", "--bench", str(tmp_path / "missing.json")]) == 2
    assert "--bench: no such file" in capsys.readouterr().err


def test_cost_command_defaults_to_the_current_cpu_result(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cost", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [d["source"] for d in out] == [H200_QWEN3_4B.source, CPU_SMOLLM2_FP32.source]


def test_cpu_profile_is_the_current_bench_result() -> None:
    """The built-in CPU profile is ``profile_from_bench`` of the result file its ``source`` names (no drift)."""
    found = re.search(r"benchmarks/\S+\.json", CPU_SMOLLM2_FP32.source)
    assert found is not None, CPU_SMOLLM2_FP32.source
    name = found.group(0)
    path = ROOT / name
    assert path.is_file(), f"{name}: the current CPU result named by CPU_SMOLLM2_FP32.source is missing"
    measured = profile_from_bench(path)
    assert dataclasses.replace(measured, source=CPU_SMOLLM2_FP32.source) == CPU_SMOLLM2_FP32
