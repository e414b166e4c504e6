"""The embedded model: converted once from the GGUF file to safetensors, with identical logits."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from kv_rag import models


def test_conversion_is_exact_and_done_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KV_RAG_HOME", str(tmp_path / "home"))
    path = models.embedded_model_path()
    assert path.is_relative_to(tmp_path / "home" / "models")
    assert (path / "kv_rag_converted.json").is_file()
    assert (path / "model.safetensors").is_file()
    mtime = (path / "model.safetensors").stat().st_mtime
    t0 = time.perf_counter()
    assert models.embedded_model_path() == path  # second call: no conversion
    assert time.perf_counter() - t0 < 1.0
    assert (path / "model.safetensors").stat().st_mtime == mtime

    gguf = models.gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    converted = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    ids = torch.tensor([[1, 504, 3458, 282, 4119, 314, 253, 1028, 30]])
    with torch.inference_mode():
        assert torch.equal(reference(ids).logits, converted(ids).logits)


def test_engines_share_one_loaded_model() -> None:
    a = models.load(None, "cpu", "float32")
    b = models.load("smollm2", "cpu", torch.float32)
    assert a is b


def test_any_local_model_folder_loads(tmp_path: Path) -> None:
    from tiny import tiny_model

    from kv_rag import Engine

    model, tok = tiny_model("qwen2")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    engine = Engine(str(tmp_path / "m"), store="memory", device="cpu")
    gen = engine.generate("Hi?", ["A document."], max_new_tokens=3)
    assert engine.model_name == "m"
    assert len(gen.token_ids) >= 1 or gen.finish_reason == "stop"


def test_known_documents_are_bounded_least_recent_first() -> None:
    from kv_rag.models import LoadedModel

    lm = LoadedModel(model=None, tokenizer=None, name="x", path="x")
    lm.remember_documents([("a" * 10, "1"), ("b" * 10, "2"), ("c" * 10, "3")], max_chars=30)
    assert list(lm.documents) == ["a" * 10, "b" * 10, "c" * 10]
    lm.remember_documents([("a" * 10, "other source"), ("  ", "blank")], max_chars=30)  # a: most recent again
    assert lm.documents["a" * 10] == "1" and list(lm.documents)[-1] == "a" * 10
    lm.remember_documents([("d" * 15, "4")], max_chars=30)  # b and c are the least recent: both go
    assert list(lm.documents) == ["a" * 10, "d" * 15]
    lm.remember_documents([("e" * 50, "5")], max_chars=30)  # one over-long document is still kept
    assert list(lm.documents) == ["e" * 50]


REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
HUB_WORKER = """
import json, sys, warnings
warnings.simplefilter("ignore")
from kv_rag import Engine
from kv_rag.errors import ModelLoadError
spec, store, doc = sys.argv[1:4]
eng = Engine(spec, store=store, device="cpu", dtype="float32")
gen = eng.generate("Which pier?", [doc], max_new_tokens=6)
try:
    Engine("nobody/no-such-model", store="memory", device="cpu").loaded
    missing = ""
except ModelLoadError as exc:
    missing = str(exc)
chat = None
try:  # the LangChain integration, where it is installed: the same hub id as ChatKVRag(model=...)
    from langchain_core.messages import HumanMessage, SystemMessage
    from langchain_kv_rag import ChatKVRag
    msg = ChatKVRag(model=spec, store=store, device="cpu", dtype="float32", max_tokens=6).invoke(
        [SystemMessage("Use only this document:\\n\\n" + doc), HumanMessage("Which pier?")], documents=[doc])
    chat = msg.response_metadata["kv_rag"]["docs"][0]["cache"]
except ImportError:
    pass
print(json.dumps({"ids": gen.token_ids, "cache": gen.documents[0].cache.value, "name": eng.model_name,
                  "missing": missing, "chat": chat}))
"""


def _hub_cache(root: Path) -> Path:
    """A Hugging Face hub cache (the layout huggingface_hub writes) holding the embedded model as :data:`REPO`."""
    repo_dir = root / ("models--" + REPO.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in models.embedded_model_path().iterdir():
        if f.is_file():
            (snap / f.name).symlink_to(f)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    return root


def test_a_hub_id_loads_offline_from_the_hub_cache(tmp_path: Path) -> None:
    """``Engine("org/name")``, ``org/name@main`` and ``kv-rag --model org/name`` offline against a hub cache
    holding the embedded model: the same weights (so the KV the embedded engine stored is a hit) and the
    same tokens; a hub id that is not cached is one clear error naming ``model`` and the offline cache."""
    import json
    import os
    import subprocess
    import sys

    from kv_rag import Engine

    hub = _hub_cache(tmp_path / "hub")
    doc = "The ferry leaves from pier 7 at nine each morning."
    store = tmp_path / "store"
    local = Engine(None, store=store, device="cpu", dtype="float32")
    local.publish([doc])
    ref = local.generate("Which pier?", [doc], max_new_tokens=6).token_ids
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    for spec in (REPO, f"{REPO}@main"):
        out = subprocess.run(
            [sys.executable, "-c", HUB_WORKER, spec, str(store), doc], env=env, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr[-3000:]
        row = json.loads(out.stdout.strip().splitlines()[-1])
        assert row["ids"] == ref and row["cache"] == "hit" and row["name"] == spec
        assert row["missing"].startswith("model nobody/no-such-model:") and "HF_HUB_OFFLINE" in row["missing"]
        assert row["chat"] in (None, "hit", "miss")  # ChatKVRag loaded the hub id (None: LangChain not installed)
    (tmp_path / "ferry.txt").write_text(doc)
    cli = "import sys; from kv_rag.cli import main; sys.exit(main())"
    args = ["ask", "Which pier?", "--docs", str(tmp_path / "ferry.txt"), "--store", str(store), "--json"]
    out = subprocess.run([sys.executable, "-c", cli, *args, "--model", REPO], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout)["docs"][0]["cache"] == "hit"
    bad = subprocess.run(
        [sys.executable, "-c", cli, *args, "--model", "nobody/x"], env=env, capture_output=True, text=True
    )
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("kv-rag ask: error: model nobody/x")
