"""The benchmarks cannot rot: each script runs on tiny inputs, uses public names only, and every result
file says where it comes from (the commit, the machine)."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
SCRIPTS = sorted(BENCH.rglob("*.py"))
KV_RAG = Path(sys.executable).parent / "kv-rag"

#: private names a benchmark may still touch, and why (none of them is kv-rag's)
ALLOWED_PRIVATE = {
    # torch's own flash-attention kernels, timed directly because kv-rag's step graph calls them
    ("gpu/gpu_profile.py", "_flash_attention_forward"),
    ("gpu/gpu_profile.py", "_scaled_dot_product_flash_attention"),
    # transformers keeps the attention implementation of a config under this name only
    ("gpu/gpu_bench.py", "_attn_implementation"),
}

#: every script and the command that smoke-runs it ({tmp}: a temporary folder, {fid}: fidelity's tiny raw file)
SMOKE = {
    "core/table.py": ["{py}", "{script}", "{tmp}/core/bench.json"],
    "fidelity/fidelity.py": ["{py}", "{script}", "--tiny", "--raw", "{fid}", "--out", "{tmp}/fidelity.json"],
    "blend_ceiling/blend_ceiling.py": [
        *("{py}", "{script}", "--tiny", "--baseline", "{fid}"),
        *("--raw", "{tmp}/ceiling/raw.jsonl", "--out", "{tmp}/ceiling.json"),
    ],
    "blend_selection/blend_selection.py": ["{py}", "{script}", "--tiny", "--out", "{tmp}/selection.json"],
    "blend_selection/blend_screen.py": [
        *("{py}", "{script}", "--tiny", "--priming", "intro", "--baseline", "{fid}"),
        *("--raw", "{tmp}/screen/raw.jsonl"),
    ],
    "blend_selection/blend_profile.py": ["{py}", "{script}", "--tiny", "--out", "{tmp}/profile.json"],
    "gpu/gpu_bench.py": [
        *("{py}", "{script}", "--tiny", "--device", "cpu", "--dtype", "float32"),
        *("--store-dir", "{tmp}/gpu_store", "--out", "{tmp}/gpu_bench.json"),
    ],
    "gpu/gpu_profile.py": ["{py}", "{script}", "--tiny", "--device", "cpu", "--out", "{tmp}/gpu_profile.json"],
    "gpu/batch_identity.py": [
        *("{py}", "{script}", "--tiny", "--device", "cpu", "--steps", "2", "--out", "{tmp}/batch_identity.json"),
    ],
    "gpu/gpu_embedded_exactness.py": [
        *("{py}", "{script}", "--tiny", "--device", "cpu", "--out", "{tmp}/exactness.json"),
    ],
    "verify/verify_bench.py": ["{py}", "{script}", "--tiny", "--out", "{tmp}/verify.json"],
    "signing/sign_bench.py": ["{py}", "{script}", "--tiny", "--out", "{tmp}/sign.json"],
    "serving/serving_bench.py": [
        *("{py}", "{script}", "--tiny", "--device", "cpu", "--no-langchain-batch"),
        *("--out", "{tmp}/serving.json"),
    ],
    "soak/soak.py": ["{py}", "{script}", "--tiny", "--out", "{tmp}/soak.json"],
    "scaling/fleet.py": ["{py}", "{script}", "--tiny", "--out", "{tmp}/fleet.json"],
    "scaling/catalogue.py": ["{py}", "{script}", "--catalogue", "12,1000"],
    "scaling/extrapolate.py": ["{py}", "{script}", "--tiny", "--fleet", "{fleet}", "--out", "{tmp}/extrapolate.json"],
}

#: the JSON each smoke run writes (relative to {tmp}); ``None``: the script prints only
WRITES = {
    "core/table.py": None,
    "fidelity/fidelity.py": "fidelity.json",
    "blend_ceiling/blend_ceiling.py": "ceiling.json",
    "blend_selection/blend_selection.py": "selection.json",
    "blend_selection/blend_screen.py": "screen/raw.provenance.json",
    "blend_selection/blend_profile.py": "profile.json",
    "gpu/gpu_bench.py": "gpu_bench.json",
    "gpu/gpu_profile.py": "gpu_profile.json",
    "gpu/batch_identity.py": "batch_identity.json",
    "gpu/gpu_embedded_exactness.py": "exactness.json",
    "verify/verify_bench.py": "verify.json",
    "signing/sign_bench.py": "sign.json",
    "serving/serving_bench.py": "serving.json",
    "soak/soak.py": "soak.json",
    "scaling/fleet.py": "fleet.json",
    "scaling/catalogue.py": None,
    "scaling/extrapolate.py": "extrapolate.json",
}

#: scripts that start redis-server (skipped without it, failed without it under KV_RAG_REQUIRE_REDIS=1)
NEEDS_REDIS = {"soak/soak.py", "scaling/fleet.py"}


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["KV_RAG_HOME"] = str(tmp / "home")  # a default output lands here, never in the checkout
    env["OMP_NUM_THREADS"] = "1"  # one thread each: quicker than two on a shared 2-core machine
    env["MPLBACKEND"] = "Agg"
    return env


def _run(args: list[str], tmp: Path, timeout: int = 300) -> str:
    proc = subprocess.run(args, cwd=tmp, env=_env(tmp), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _commit(prov: dict[str, Any]) -> str:
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", str(prov.get("commit"))), prov
    return str(prov["commit"])


def _head() -> str:
    proc = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else "unknown"


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with ``kv-rag bench``'s tiny result (core/bench.json) and fidelity's tiny raw file."""
    tmp = tmp_path_factory.mktemp("bench")
    tiny = ["--lengths", "48", "--repeats", "1", "--full-repeats", "1", "--greedy-tokens", "2", "--peer", "none"]
    _run([str(KV_RAG), "bench", *tiny, "--device", "cpu", "--plots"], tmp)
    written = sorted((tmp / "home" / "bench" / "core").glob("*/bench.json"))
    assert len(written) == 1, "kv-rag bench without --out writes $KV_RAG_HOME/bench/core/<UTC time>/bench.json"
    (tmp / "core").mkdir()
    for f in written[0].parent.iterdir():
        f.rename(tmp / "core" / f.name)
    cmd = [a.format(py=sys.executable, script=BENCH / "fidelity/fidelity.py", tmp=tmp, fid=tmp / "fid" / "raw.jsonl")
           for a in SMOKE["fidelity/fidelity.py"]]  # fmt: skip
    _run(cmd, tmp)
    return tmp


def test_kv_rag_bench_writes_under_kv_rag_home_with_provenance(smoke_dir: Path) -> None:
    result = json.loads((smoke_dir / "core" / "bench.json").read_text())
    assert _commit(result["provenance"]) == _head()
    assert result["provenance"]["command"].startswith("kv-rag bench")
    assert result["rows"][0]["greedy_tokens_equal"]
    assert (smoke_dir / "core" / "ttft_vs_length.png").is_file()


def test_kv_rag_cost_defaults_to_the_current_result_and_prices_any_bench(smoke_dir: Path) -> None:
    from kv_rag.cost import CPU_SMOLLM2_FP32

    out = json.loads(_run([str(KV_RAG), "cost", "--json"], smoke_dir))
    assert out[1]["source"] == CPU_SMOLLM2_FP32.source
    out = json.loads(_run([str(KV_RAG), "cost", "--json", "--bench", "core/bench.json"], smoke_dir))
    assert "core/bench.json" in out[1]["source"]


@pytest.mark.parametrize("script", sorted(SMOKE))
def test_benchmark_script_runs_tiny(script: str, smoke_dir: Path) -> None:
    if script in NEEDS_REDIS:
        from redis_server import redis_binary

        if redis_binary() is None:
            if os.environ.get("KV_RAG_REQUIRE_REDIS") == "1":
                pytest.fail("redis-server is required (KV_RAG_REQUIRE_REDIS=1) but not installed")
            pytest.skip("redis-server is not installed: apt-get install -y redis-server (.ci/run does this)")
        pytest.importorskip("redis")
    if script == "fidelity/fidelity.py":  # run by the fixture (the others read its answers)
        out = smoke_dir / "fidelity.json"
    else:
        fields = {"py": sys.executable, "script": BENCH / script, "tmp": smoke_dir, "fid": smoke_dir / "fid/raw.jsonl"}
        fields["fleet"] = ["", *sorted(str(p) for p in (BENCH / "scaling/results").glob("*-fleet.json"))][-1]
        printed = _run([a.format(**fields) for a in SMOKE[script]], smoke_dir)
        name = WRITES[script]
        if name is None:
            assert printed.strip()
            return
        out = smoke_dir / name
    data = json.loads(out.read_text())
    prov = data["runs"][-1] if "runs" in data else data["provenance"]
    assert _commit(prov) == _head()
    assert prov["machine"]["cores"] and prov["command"]
    elsewhere = [p.name for p in (smoke_dir / "home" / "bench").iterdir() if p.name != "core"]
    assert not elsewhere, f"told where to write, a smoke run wrote under $KV_RAG_HOME/bench too: {elsewhere}"


def test_every_benchmark_script_has_a_smoke_run() -> None:
    names = {str(p.relative_to(BENCH)) for p in SCRIPTS}
    assert names == set(SMOKE) == set(WRITES)


def _private_uses(source: str, rel: str) -> list[str]:
    """Imports of private names, private attributes and ``getattr``-style access, and assignments to
    attributes of anything imported from kv_rag (monkeypatching), less :data:`ALLOWED_PRIVATE` for ``rel``."""
    tree = ast.parse(source)
    found: list[str] = []
    from_kv_rag: set[str] = set()

    def private(name: str) -> bool:
        return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if any(private(part) for part in a.name.split(".")):
                    found.append(f"import {a.name}")
                if a.name.split(".")[0] == "kv_rag":
                    from_kv_rag.add((a.asname or a.name).split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if any(private(part) for part in module.split(".")):
                found.append(f"from {module} import ...")
            for a in node.names:
                if private(a.name):
                    found.append(f"from {module} import {a.name}")
                if module.split(".")[0] == "kv_rag":
                    from_kv_rag.add(a.asname or a.name)
        elif isinstance(node, ast.Attribute) and private(node.attr):
            found.append(f".{node.attr}")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
            and len(node.args) > 1
        ):
            arg = node.args[1]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and private(arg.value):
                found.append(f"{node.func.id}(..., {arg.value!r})")
    for node in ast.walk(tree):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("setattr", "delattr"):
            targets = [ast.Attribute(value=node.args[0], attr="?")] if node.args else []
        for t in targets:
            if isinstance(t, ast.Attribute):
                root = t.value
                while isinstance(root, ast.Attribute):
                    root = root.value
                if isinstance(root, ast.Name) and root.id in from_kv_rag:
                    found.append(f"patches {root.id}.{t.attr}")
    return [f for f in found if not any(rel == a and f.strip(".'\")").endswith(n) for a, n in ALLOWED_PRIVATE)]


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: str(p.relative_to(BENCH)))
def test_benchmark_uses_public_names_only(path: Path) -> None:
    assert _private_uses(path.read_text(), str(path.relative_to(BENCH))) == []


def test_the_private_name_check_finds_what_it_should() -> None:
    bad = (
        "import kv_rag._compat\nfrom kv_rag import _fastpath, stitch\nfrom kv_rag.engine import _eos_ids\n"
        "x = engine._loaded\ny = getattr(cache, '_k')\nstitch.SELECTION = 1\nstitch.A._choose = 2\n"
        "z = torch.ops.aten._flash_attention_forward\n"
    )
    assert len(_private_uses(bad, "selfcheck.py")) == 9
    assert len(_private_uses(bad, "gpu/gpu_profile.py")) == 8


def _results() -> list[Path]:
    return sorted(p for p in BENCH.glob("*/results/**/*.json"))


def test_every_result_records_its_commit_and_machine() -> None:
    files = _results()
    assert files
    for f in files:
        data = json.loads(f.read_text())
        provs = data["runs"] if f.name.endswith(".provenance.json") else [data.get("provenance")]
        for prov in provs:
            assert isinstance(prov, dict), f"{f}: no provenance"
            assert re.fullmatch(r"[0-9a-f]{40}", _commit(prov)), f"{f}: commit {prov.get('commit')}"
            assert prov.get("machine"), f"{f}: no machine"


def test_the_index_names_every_result_and_the_current_cpu_profile() -> None:
    from kv_rag.cost import CPU_SMOLLM2_FP32

    index = (BENCH / "README.md").read_text()
    for f in _results():
        if not f.name.endswith(".provenance.json"):
            assert f.name in index, f"benchmarks/README.md does not list {f.relative_to(BENCH)}"
    for study in sorted({p.parent.name for p in SCRIPTS}):
        assert (BENCH / study / "README.md").is_file(), f"benchmarks/{study}/README.md is missing"
    current = re.search(r"benchmarks/\S+\.json", CPU_SMOLLM2_FP32.source)
    assert current is not None and Path(current.group(0)).name in index
