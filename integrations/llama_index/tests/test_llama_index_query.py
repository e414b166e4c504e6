"""Query engines over real documents: nodes found in every synthesizer's prompt, cache hits, exact answers."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from conftest import NUM_OUTPUT, llm_events
from llama_index.core import Settings, VectorStoreIndex
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.schema import MetadataMode, TextNode
from llama_index.retrievers.bm25 import BM25Retriever

from llama_index.llms.kv_rag import METADATA_KEY, KVCacheRetriever, KVRagLLM

QUESTION = "What does the else clause of a for loop do?"


@pytest.fixture(scope="module")
def index(nodes: list[TextNode], embed_model: Any) -> VectorStoreIndex:
    return VectorStoreIndex(nodes, embed_model=embed_model)


@pytest.fixture(scope="module")
def reference(index: VectorStoreIndex) -> str:
    """The answer with the KV store off entirely (every token prefilled)."""
    llm = KVRagLLM(store="memory", use_cache=False, max_new_tokens=NUM_OUTPUT)
    with llm_events() as ev:
        answer = str(index.as_query_engine(llm=llm, similarity_top_k=2).query(QUESTION))
    assert [r["cached_tokens"] for r in ev.reports] == [0]
    assert answer.strip()
    return answer


def test_vector_query_engine_second_query_hits_and_equals_uncached(
    index: VectorStoreIndex, reference: str, tmp_path: Path
) -> None:
    llm = KVRagLLM(store=tmp_path / "store", max_new_tokens=NUM_OUTPUT)
    engine = index.as_query_engine(llm=llm, similarity_top_k=2)
    with llm_events() as ev:
        first = engine.query(QUESTION)
        second = engine.query(QUESTION)
    assert [n.node.node_id for n in first.source_nodes] == [n.node.node_id for n in second.source_nodes]
    cold, warm = ev.reports
    # the retrieved nodes were found in the compact synthesizer's prompt, by their LLM text
    assert len(cold["docs"]) == 2 and {d["cache"] for d in cold["docs"]} == {"miss"}
    assert {d["cache"] for d in warm["docs"]} == {"hit"}
    assert warm["cached_tokens"] > 0
    assert ev.usages[1]["prompt_tokens_details"]["cached_tokens"] == warm["cached_tokens"]
    assert warm["prefilled_tokens"] < cold["prefilled_tokens"] / 3
    assert str(first) == str(second) == reference  # exact mode: same answer as without the cache


@pytest.mark.parametrize("response_mode", ["compact", "refine", "tree_summarize"])
def test_every_synthesizer_prompt_contains_the_nodes(nodes: list[TextNode], response_mode: str, tmp_path: Path) -> None:
    llm = KVRagLLM(store=tmp_path / "store", max_new_tokens=6, watch_retrievals=False)
    retriever = KVCacheRetriever(BM25Retriever.from_defaults(nodes=nodes, similarity_top_k=2), llm)
    engine = RetrieverQueryEngine.from_args(retriever, llm=llm, response_mode=response_mode)
    question = "What happens when an exception is raised with raise ... from ...?"
    with llm_events() as ev:
        first = engine.query(question)
    retrieved = {n.node.metadata["file_name"] for n in first.source_nodes}
    found = [d for r in ev.reports for d in r["docs"]]
    assert ev.reports and all(r["docs"] for r in ev.reports), "every LLM call's prompt holds a retrieved node"
    assert {d["source"] for d in found} == retrieved
    assert sum(d["cache"] == "miss" for d in found) == len(first.source_nodes)  # each node found exactly once
    with llm_events() as ev:
        engine.query(question)
    assert ev.reports[0]["cached_tokens"] > 0
    assert ev.reports[0]["docs"][0]["cache"] == "hit"


def test_retriever_hides_the_key_and_publishes(nodes: list[TextNode], tmp_path: Path) -> None:
    llm = KVRagLLM(store=tmp_path / "store", watch_retrievals=False)
    inner = BM25Retriever.from_defaults(nodes=nodes, similarity_top_k=2)
    retriever = KVCacheRetriever(inner, llm, publish=True)
    assert not KVCacheRetriever(inner, llm).publish  # exact mode: a node's own KV would never be read
    plain = inner.retrieve("context manager __exit__")
    warmed = retriever.retrieve("context manager __exit__")
    assert [n.node.node_id for n in plain] == [n.node.node_id for n in warmed]
    for p, w in zip(plain, warmed, strict=True):
        key = w.node.metadata[METADATA_KEY]
        assert METADATA_KEY not in p.node.metadata  # the wrapped retriever's nodes are not modified
        for mode in (MetadataMode.LLM, MetadataMode.EMBED):
            assert w.node.get_content(metadata_mode=mode) == p.node.get_content(metadata_mode=mode)
        assert "file_name: " in w.node.get_content(metadata_mode=MetadataMode.LLM)  # metadata lines included
        text = w.node.get_content(metadata_mode=MetadataMode.LLM)
        assert key == llm.engine.document_key(text) and key in llm.engine.store
    again = KVCacheRetriever(inner, llm, publish=True)
    assert [n.node.metadata[METADATA_KEY] for n in again.retrieve("context manager __exit__")] == [
        n.node.metadata[METADATA_KEY] for n in warmed
    ]


def test_kv_rag_key_names_the_artifact_the_request_loads(nodes: list[TextNode]) -> None:
    """Stitch mode with priming: each node's kv_rag_key is the key the LLM's request reports as the hit
    it loaded; exact mode without publishing records none."""
    inner = BM25Retriever.from_defaults(nodes=nodes, similarity_top_k=2)
    exact = KVCacheRetriever(inner, KVRagLLM(store="memory", watch_retrievals=False))
    assert all(METADATA_KEY not in n.node.metadata for n in exact.retrieve("context manager __exit__"))
    llm = KVRagLLM(store="memory", mode="stitch", priming=True, max_new_tokens=2, watch_retrievals=False)
    warmed = KVCacheRetriever(inner, llm).retrieve("context manager __exit__")
    texts = [n.node.get_content(metadata_mode=MetadataMode.LLM) for n in warmed]
    prompt = "Context information:\n\n" + "\n\n".join(texts) + "\n\nWhat does __exit__ do?"
    raw = llm.complete(prompt).raw
    assert raw is not None
    want = [("hit", n.node.metadata[METADATA_KEY]) for n in warmed]
    assert [(d["cache"], d["key"]) for d in raw["kv_rag"]["docs"]] == want


def test_streaming_async_and_settings_llm(index: VectorStoreIndex, reference: str, tmp_path: Path) -> None:
    llm = KVRagLLM(store=tmp_path / "store", max_new_tokens=NUM_OUTPUT)
    saved = Settings._llm
    Settings.llm = llm
    try:
        streaming = index.as_query_engine(similarity_top_k=2, streaming=True)  # the LLM from Settings
        with llm_events() as ev:
            streamed = "".join(streaming.query(QUESTION).response_gen)
            answer = asyncio.run(index.as_query_engine(similarity_top_k=2).aquery(QUESTION))
    finally:
        Settings._llm = saved
    assert streamed == str(answer) == reference
    assert ev.reports[-1]["cached_tokens"] > 0
    assert {d["cache"] for d in ev.reports[-1]["docs"]} == {"hit"}


def test_blend_options_reach_the_engine(nodes: list[TextNode]) -> None:
    """mode, recompute, priming and selection set on the LLM (or per call) are what the engine used."""
    llm = KVRagLLM(
        store="memory",
        max_new_tokens=2,
        mode="blend",
        recompute=0.2,
        priming=True,
        selection="leading",
        watch_retrievals=False,
    )
    texts = [n.get_content(metadata_mode=MetadataMode.LLM) for n in nodes[:2]]
    llm.engine.publish(texts)  # plain and primed artifacts (priming is on)
    prompt = "Context:\n" + "\n\n".join(texts) + f"\n\nQuestion: {QUESTION}"
    report = llm.complete(prompt).raw["kv_rag"]
    assert report["mode"] == "blend" and report["options"] == {
        "mode": "blend",
        "recompute": 0.2,
        "priming": True,
        "selection": "leading",
        "use_cache": True,
    }
    assert [d["cache"] for d in report["docs"]] == ["hit", "hit"]
    # the documents moved (the chat template's system part precedes them): their primed artifacts were loaded
    assert all(d["key"] != llm.engine.document_key(t) for d, t in zip(report["docs"], texts, strict=True))
    assert 0 < report["recomputed_tokens"] <= round(0.2 * sum(d["tokens"] for d in report["docs"]))
    again = llm.complete(prompt, recompute=0.5, selection="attention")
    assert again.raw["kv_rag"]["options"]["recompute"] == 0.5
    assert again.raw["kv_rag"]["options"]["selection"] == "attention"
