"""The kv-rag command: ask/publish/inspect output, cache reporting, and clean errors for user mistakes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kv_rag.cli import main
from kv_rag.models import LoadedModel


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def docs(tmp_path: Path, corpus_dir: Path) -> Path:
    d = tmp_path / "docs"
    d.mkdir()
    for name in ("for-statement.md", "with-statement.md", "exceptions.md"):
        shutil.copy(corpus_dir / name, d / name)
    return d


def test_ask_json_misses_then_hits(
    capsys: pytest.CaptureFixture[str], embedded: LoadedModel, docs: Path, tmp_path: Path
) -> None:
    store = str(tmp_path / "store")
    q = "What does the else clause of a for loop do?"
    args = ["ask", q, "--docs", str(docs), "--json", "--store", store, "--max-new-tokens", "12"]
    code, out, _ = run(capsys, *args)
    assert code == 0
    first = json.loads(out)
    for field in ("answer", "mode", "prompt_tokens", "cached_tokens", "prefilled_tokens", "ttft_s", "total_s", "docs"):
        assert field in first
    assert first["mode"] == "exact"
    assert first["docs"][0]["source"].endswith("for-statement.md")
    assert first["docs"][0]["cache"] == "miss" and first["cached_tokens"] == 0

    code, out, _ = run(capsys, *args)
    second = json.loads(out)
    assert second["docs"][0]["cache"] == "hit"
    assert second["cached_tokens"] > 0
    assert second["prefilled_tokens"] == second["prompt_tokens"] - second["cached_tokens"]
    assert second["answer"] == first["answer"]

    code, out, _ = run(capsys, *args, "--no-cache")
    third = json.loads(out)
    assert third["docs"][0]["cache"] == "none" and third["cached_tokens"] == 0
    assert third["answer"] == first["answer"]


def test_publish_then_inspect(
    capsys: pytest.CaptureFixture[str], embedded: LoadedModel, docs: Path, tmp_path: Path
) -> None:
    store = str(tmp_path / "store")
    code, out, _ = run(capsys, "publish", str(docs), "--chunk-tokens", "0", "--json", "--store", store)
    assert code == 0
    pub = json.loads(out)
    assert len(pub["published"]) == 3 and pub["new"] == 3
    key = pub["published"][0]["key"]
    code, out, _ = run(capsys, "publish", str(docs), "--chunk-tokens", "0", "--json", "--store", store)
    assert json.loads(out)["new"] == 0
    code, out, _ = run(capsys, "inspect", key, "--store", store, "--json")
    assert code == 0
    info = json.loads(out)
    assert info["key"] == key and info["layers"] == 30 and info["kv_heads"] == 3 and info["head_dim"] == 64
    assert info["num_tokens"] == pub["published"][0]["tokens"]
    assert info["model"]["architecture"] == "LlamaForCausalLM"
    assert info["dtype"] == "float32"


def test_chunking_splits_long_files(
    capsys: pytest.CaptureFixture[str], embedded: LoadedModel, docs: Path, tmp_path: Path
) -> None:
    _code, out, _ = run(
        capsys,
        "publish",
        str(docs / "with-statement.md"),
        "--chunk-tokens",
        "200",
        "--json",
        "--store",
        str(tmp_path / "s"),
    )
    pub = json.loads(out)["published"]
    assert len(pub) > 2
    assert all(p["tokens"] <= 230 for p in pub)
    assert pub[0]["source"].endswith("#chunk0")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ask", "q?", "--docs", "/nonexistent/dir"], "no such file or folder"),
        (["ask", "   ", "--docs", "DOCS"], "question is empty"),
        (["ask", "q?", "--docs", "DOCS", "--k", "0"], "--k must be >= 1"),
        (["ask", "q?", "--docs", "DOCS", "--mode", "fastest"], "mode must be one of"),
        (["ask", "q?", "--docs", "DOCS", "--max-loss", "2"], "max_loss=2 applies to mode 'auto' only"),
        (["ask", "q?", "--docs", "DOCS", "--mode", "auto", "--max-loss", "-1"], "max_loss must be a number"),
        (["calibrate", "--questions-file", "/nonexistent.json"], "--questions-file: no such file"),
        (["calibrate", "DOCS", "--blend", "0.3,x"], "--blend wants comma-separated numbers"),
        (["ask", "q?", "--docs", "BINARY"], "not UTF-8"),
        (["publish", "EMPTY"], "no text found"),
        (["inspect", "deadbeef"], "neither a file nor a key"),
        (["ask", "q?", "--docs", "DOCS", "--model", "/nonexistent/model"], "neither a local transformers model folder"),
    ],
)
def test_user_mistakes_get_one_clear_line(
    capsys: pytest.CaptureFixture[str], embedded: LoadedModel, docs: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00bad latin1 \xe9")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.md").write_text("  \n")
    subst = {"DOCS": str(docs), "BINARY": str(binary), "EMPTY": str(empty)}
    argv = [subst.get(a, a) for a in args] + ["--store", str(tmp_path / "s")]
    code, _out, err = run(capsys, *argv)
    assert code == 2
    assert message in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_console_script_is_installed() -> None:
    exe = Path(sys.executable).parent / "kv-rag"
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for cmd in ("demo", "publish", "ask", "calibrate", "inspect", "bench"):
        assert cmd in proc.stdout


def test_version_and_defaults_in_help(capsys: pytest.CaptureFixture[str]) -> None:
    import kv_rag

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"kv-rag {kv_rag.__version__}"
    with pytest.raises(SystemExit):
        main(["ask", "--help"])
    out = capsys.readouterr().out
    assert "(default: 1)" in out and "(default: 512)" in out  # --k, --chunk-tokens
    assert "(default: None)" not in out and "(default: False)" not in out
