"""``kv-rag bench``: prefill against cache-hit TTFT on the embedded model, side by side with llama.cpp.

:mod:`~kv_rag.bench.core` runs it; :mod:`~kv_rag.bench.io` measures the disk, :mod:`~kv_rag.bench.llama`
drives the llama.cpp peer, :mod:`~kv_rag.bench.codec` the artifact codecs, :mod:`~kv_rag.bench.plot`
draws the plots.
"""

from .core import QUESTION, corpus_text, document_of_length, drop_page_cache, run_core_bench

__all__ = ["QUESTION", "corpus_text", "document_of_length", "drop_page_cache", "run_core_bench"]
