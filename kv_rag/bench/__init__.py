"""``kv-rag bench``: prefill against cache-hit TTFT on the embedded model, side by side with llama.cpp.

:mod:`~kv_rag.bench.core` runs it; :mod:`~kv_rag.bench.io` measures the disk, :mod:`~kv_rag.bench.llama`
drives the llama.cpp peer, :mod:`~kv_rag.bench.codec` the artifact codecs, :mod:`~kv_rag.bench.plot`
draws the plots, :mod:`~kv_rag.bench.provenance` records where a result comes from (commit, machine,
versions, command) for every benchmark's JSON.
"""

from .core import QUESTION, corpus_text, document_of_length, drop_page_cache, run_core_bench
from .provenance import code_version, provenance, results_dir

__all__ = [
    "QUESTION",
    "code_version",
    "corpus_text",
    "document_of_length",
    "drop_page_cache",
    "provenance",
    "results_dir",
    "run_core_bench",
]
