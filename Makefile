# Two commands set up a fresh machine: `make demo` (the embedded-default demo) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vlweave-installed

.PHONY: env demo test test-fast bench assets clean

env: $(STAMP)

# torch is pinned to the CPU build (2.13.0); an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

assets: env
	$(VENV)/bin/vlweave assets pull dinov2-small smollm2-135m-instruct easy-vqa

demo: env
	$(VENV)/bin/vlweave demo

test: env
	$(PY) -m pytest -q

test-fast: env
	$(PY) -m pytest -q -m "not slow"

bench: env
	$(PY) bench/bench_llava.py

clean:
	rm -rf runs .pytest_cache
