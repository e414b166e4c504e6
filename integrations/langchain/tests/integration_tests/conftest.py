"""Fixtures on the real embedded model: a chunked corpus and a BM25 retriever over it."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
from langchain_community.retrievers import BM25Retriever
from langchain_core.documents import Document
from langchain_text_splitters import RecursiveCharacterTextSplitter

from kv_rag import models as kv_models

from ..conftest import CORPUS

_STOP_WORDS = frozenset(
    {"a", "an", "the", "of", "to", "in", "is", "are", "be", "do", "does", "what", "when", "how", "which", "that"}
    | {"this", "it", "for", "with", "and", "or", "not"}
)


def bm25_words(text: str) -> list[str]:
    """BM25 terms: lower-case words without stop words (rank_bm25's default is a plain split)."""
    return [w for w in re.findall(r"[a-z_]+", text.lower()) if w not in _STOP_WORDS]


def bm25_retriever(k: int = 2) -> BM25Retriever:
    """A BM25 retriever (rank_bm25) over the corpus chunks."""
    return BM25Retriever.from_documents(corpus_chunks(), k=k, preprocess_func=bm25_words)


@pytest.fixture(scope="session")
def embedded() -> kv_models.LoadedModel:
    """The embedded SmolLM2-135M-Instruct, loaded once (shared with every ChatKVRag in the process)."""
    return kv_models.load(None, "cpu", "float32")


@functools.cache
def corpus_chunks(chunk_size: int = 600) -> list[Document]:
    """The bundled corpus cut into ~150-token chunks with LangChain's splitter."""
    splitter = RecursiveCharacterTextSplitter(chunk_size=chunk_size, chunk_overlap=0)
    docs: list[Document] = []
    for path in sorted(Path(CORPUS).glob("*.md")):
        for i, text in enumerate(splitter.split_text(path.read_text(encoding="utf-8"))):
            docs.append(Document(page_content=text, metadata={"source": f"{path.name}#{i}"}, id=f"{path.name}#{i}"))
    return docs


@pytest.fixture(scope="session")
def chunks() -> list[Document]:
    """The corpus chunks."""
    return corpus_chunks()


@pytest.fixture
def bm25() -> BM25Retriever:
    """A BM25 retriever over the corpus chunks, 2 results."""
    return bm25_retriever(2)
