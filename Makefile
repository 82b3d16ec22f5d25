# Two commands for a new user: `make demo` (the main job) and `make test` (the suite).
# Each installs the project into a venv in the repo first, with torch pinned by constraints.txt.
# The demo and benchmark targets pass ARGS to their script, e.g. make bench ARGS="--lengths 1024 2048 --repeats 2".
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: install lint format test demo demo-attention bench bench-generate long-context kvpress-venv clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --constraint constraints.txt --editable ".[test,bench,data,eval,peft,serve,convert]"
	touch $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

test: $(STAMP)
	$(PY) tests/helpers/transformers_common.py
	$(PY) -m pytest -n 2 --durations=15 tests

demo: $(STAMP)
	$(PY) scripts/main_demo.py $(ARGS)

demo-attention: $(STAMP)
	$(PY) scripts/demo_attention.py $(ARGS)

bench: $(STAMP)
	$(PY) scripts/bench_attention.py $(ARGS)

bench-generate: $(STAMP)
	$(PY) scripts/bench_generate.py $(ARGS)

# The long-context suite (docs/long_context.md) on SmolLM2's GGUF file (read with the convert extra, installed above).
# ARGS: further flags.
long-context: $(STAMP)
	$(PY) scripts/eval_long_context.py $(ARGS)

# The kvpress baselines of the long-context suite (--systems kvpress_*): kvpress 0.5.5 needs transformers < 5.3, so it
# gets a venv of its own, which benchmarks/kvpress_runner.py runs in (torch pinned as above; gguf reads SmolLM2's file).
KVPRESS_VENV ?= .venv-kvpress
KVPRESS_STAMP := $(KVPRESS_VENV)/.installed

kvpress-venv: $(KVPRESS_STAMP)

$(KVPRESS_STAMP): constraints.txt
	$(PYTHON) -m venv $(KVPRESS_VENV)
	$(KVPRESS_VENV)/bin/python -m pip install --quiet --constraint constraints.txt kvpress==0.5.5 transformers==5.2.0 gguf==0.19.0
	touch $(KVPRESS_STAMP)

clean:
	rm -rf $(VENV) $(KVPRESS_VENV) outputs .pytest_cache
