"""The README's and the integration READMEs' quick starts run as written (issue 17: "the README snippets
are run by make test as written").

Every ```python block that is a whole program (it starts with its imports) is run from the repository
root in a fresh process, on the embedded model, with ``$KV_RAG_HOME`` in a temporary folder (its
converted model shared with the tests'); blocks
that continue another one (they start with a statement) are not programs and are left out.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
READMES = ["README.md", "integrations/langchain/README.md", "integrations/llama_index/README.md"]


def _programs() -> list[tuple[str, str]]:
    out = []
    for name in READMES:
        blocks = re.findall(r"^```python\n(.*?)^```", (ROOT / name).read_text(), flags=re.S | re.M)
        for i, code in enumerate(blocks):
            if code.lstrip().startswith(("from ", "import ")):
                out.append((f"{name}#{i + 1}", code))
    return out


PROGRAMS = _programs()


def test_every_readme_has_a_quick_start() -> None:
    assert {p.split("#")[0] for p, _ in PROGRAMS} == set(READMES)


@pytest.mark.parametrize(("where", "code"), PROGRAMS, ids=[p for p, _ in PROGRAMS])
def test_readme_snippet_runs_as_written(where: str, code: str, tmp_path: Path) -> None:
    from kv_rag.defaults import models_dir

    home = tmp_path / "home"
    home.mkdir()
    models_dir().mkdir(parents=True, exist_ok=True)
    (home / models_dir().name).symlink_to(models_dir(), target_is_directory=True)  # converted once, shared
    env = {**os.environ, "KV_RAG_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    paths = [str(ROOT), str(ROOT / "integrations" / "langchain"), str(ROOT / "integrations" / "llama_index")]
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False
    )
    assert proc.returncode == 0, f"{where}:\n{proc.stderr[-3000:]}"
    assert proc.stdout.strip(), f"{where} printed nothing"
