# Two commands set everything up: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed-$(shell cat setup.py | md5sum | cut -c1-8)
PYTEST := $(PY) -m pytest
# Where pip finds torch; empty: pip's own configuration (here: a local wheel mirror). On a machine
# whose pip reaches PyPI, a bare torch is the multi-GB CUDA build: for the CPU build say
#   make venv TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=

.PHONY: venv test test-fast test-dist test-slurm test-reliability demo demo-small bench clean

venv: $(STAMP)

# torch 2.13.0 first, so that the package's `torch` requirement is already met.
$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -q -e '.[dev]'
	touch $@

# The whole suite CI runs (unit, distributed, e2e, reliability, slurm); none needs a GPU.
test: venv
	$(PYTEST) -q tests

# Unit tests only, for quick iteration.
test-fast: venv
	$(PYTEST) -q tests/unit -m "not slow"

test-dist: venv
	$(PYTEST) -q tests/dist

test-slurm: venv
	$(PYTEST) -q tests/slurm

test-reliability: venv
	$(PYTEST) -q tests/reliability

demo: venv
	$(PY) launch/demo.py

bench: venv
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs demo_out .pytest_cache
