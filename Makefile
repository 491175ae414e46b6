# Two commands set up a fresh machine: `make demo` (the embedded-default demo) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vlweave-installed

.PHONY: env demo test test-fast test-lmms bench assets clean

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

# The lmms-eval plugin against the real lmms-eval, in a separate venv (not part of `make test`; docs/eval.md).
# Every install step runs under constraints-lmms.txt: the venv verified with lmms-eval 0.7.3, frozen (torch held at
# the CPU 2.13.0 build; filelock<4 among the pins, see the file's header for why and how to regenerate it).
# lmms-eval's torchvision is removed again afterwards (vlweave does not use it).
LMMS_VENV ?= /tmp/lmms-venv
LMMS_PY := $(LMMS_VENV)/bin/python
LMMS_STAMP := $(LMMS_VENV)/.vlweave-lmms-installed
LMMS_CONSTRAINTS := constraints-lmms.txt

$(LMMS_STAMP): pyproject.toml $(LMMS_CONSTRAINTS)
	$(PYTHON) -m venv $(LMMS_VENV)
	$(LMMS_PY) -m pip install -q -c $(LMMS_CONSTRAINTS) torch==2.13.0
	$(LMMS_PY) -m pip install -q -c $(LMMS_CONSTRAINTS) "lmms-eval==0.7.3"
	$(LMMS_PY) -m pip uninstall -q -y torchvision
	$(LMMS_PY) -m pip install -q -c $(LMMS_CONSTRAINTS) -e ".[test]"
	touch $(LMMS_STAMP)

# The import check first: without lmms-eval the file's two lmms-eval tests would be skipped, not failed.
test-lmms: $(LMMS_STAMP)
	$(LMMS_PY) -c "import lmms_eval"
	HF_HUB_OFFLINE=1 $(LMMS_PY) -m pytest -q tests/test_lmms_eval_plugin.py

bench: env
	$(PY) bench/bench_llava.py

clean:
	rm -rf runs .pytest_cache
